"""Checkpointing: a crash-safe commit protocol, asynchronous persistence from a memory snapshot,
and resuming a run bit for bit.

Sources. The course article 大模型断点续训(Checkpointing):利用异步持久化与内存快照减少训练中断开销
(what to save, how often, async persistence, memory snapshots); J. Mohan, A. Phanishayee,
V. Chidambaram, "CheckFreq: Frequent, Fine-Grained DNN Checkpointing", FAST 2021 (snapshot into
host memory, persist in the background, pick the frequency from measured costs); Z. Wang et al.,
"Gemini: Fast Failure Recovery in Distributed Training with In-Memory Checkpoints", SOSP 2023
(checkpoints held in CPU memory); PyTorch Distributed Checkpoint's `async_save` (stage to CPU, write
in a background thread, at most one save in flight); T. S. Pillai et al., "All File Systems Are Not
Created Equal", OSDI 2014, and D. Luu, "Files are hard" (2015) (write, fsync, rename, fsync the
directory); J. W. Young, "A first order approximation to the optimum checkpoint interval",
CACM 1974.

The protocol. One writer per directory; one sub-directory per checkpoint:

    directory/
      step-000000100/
        model-3f9a1c2e.pt        one shard per top-level key of `state` (torch.save), the suffix
        optimizer-3f9a1c2e.pt    a random nonce per save, so a re-save never overwrites a live file
        MANIFEST.json            {"format", "step", "shards": {key: {"file", "bytes", "sha256"}}}

    1. mkdir step-N (if new), fsync the parent directory          the entry survives a power cut
    2. per shard: write <key>-<nonce>.pt, fsync it                  the bytes are on disk
    3. fsync step-N                                                 so are the shards' entries
    4. write MANIFEST.json.tmp-<nonce>, fsync, os.replace it onto MANIFEST.json, fsync step-N
                                                                    <- the commit: atomic rename
    5. delete the files of step-N the new manifest does not name    (a replaced save of step N)
    6. purge: keep the newest `keep_last` committed checkpoints     manifest first, then the rest

A checkpoint exists exactly when its MANIFEST.json names shards whose sizes and SHA-256 digests
match. `load_latest` walks the checkpoints newest first and returns the first that verifies,
skipping torn, partial, purged-halfway or bit-flipped ones without raising. Killed at any point
of steps 1-6, the directory therefore holds the old checkpoint (crash before the rename) or the
new one (crash after it), never a mixture. fsync matters for an OS crash or a power cut (data in
the page cache is lost, a rename may reach the disk before the data it points to); a killed
process loses nothing already written. Loading uses `torch.load(weights_only=True)`: no pickled
code runs, so every value saved is a tensor or a plain Python value (RNG states included).

Asynchronous saves. A synchronous save blocks training for the copy-out, the serialisation, the
hashing and the writes. `AsyncCheckpointer.save` (and `async_save`) blocks only for a snapshot:
every tensor is copied into host memory (pinned for CUDA tensors; on a GPU the copies are
enqueued on the current stream and the writer thread waits for them), after which training may
mutate the live tensors at once; a background thread persists the snapshot with the protocol
above. At most one save is in flight: a save that finds the previous one still writing waits for
it first (bounded memory: one snapshot, whose size is `state_nbytes(state)`).

The cost model. A run of steps of `step_ms`, saving after every `interval` steps; a save is a
snapshot (`snapshot_ms`) and a persist (`persist_ms`). Synchronous: each save blocks for
snapshot_ms + persist_ms. Asynchronous: each save blocks for max(0, end of the previous persist
- now) + snapshot_ms, so as long as interval * step_ms >= persist_ms only the snapshot is paid.
Young's interval: with a blocked cost C per checkpoint and a mean time between failures M, the
fraction of time lost, W(τ) = C/τ + τ/(2M) (saving, plus on average half an interval of
recomputation per failure), is smallest at τ* = √(2CM), where W* = √(2C/M). Cutting C by async
saving lets a run checkpoint more often and lose less.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from labkit import _checks

FORMAT = "labkit-checkpoint/1"
MANIFEST = "MANIFEST.json"
CRASH_ENV = "LABKIT_CKPT_CRASH_AT"  # kill the process after this many I/O steps (fault injection)
_DIR_RE = re.compile(r"^step-(\d+)$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WRITE_CHUNK = 1 << 20  # bytes written between two I/O points


class CheckpointError(Exception):
    """A checkpoint that does not verify (missing shard, wrong size or digest, bad manifest)."""


# --- fault injection: every I/O step of a save goes through an IOTrace ------------------------


class IOTrace:
    """Counts the I/O steps of saves (each write chunk, fsync, rename, unlink, mkdir).

    crash_at=k kills the process with SIGKILL right after the k-th step (1-based), the way the OOM
    killer or `kill -9` stops it (a power cut also loses data not yet fsync'd, which a killed
    process cannot simulate: the page cache survives it); record=True keeps every step's label in
    `events`; on_event(count, label) is called at every step (tests block a writer with it);
    write_chunk: bytes between two write steps (small values give torn files more chances).
    One trace counts across all the saves it is passed to; it is thread-safe.
    """

    def __init__(self, crash_at: int | None = None, *, record: bool = False, write_chunk: int = _WRITE_CHUNK,
                 on_event: Callable[[int, str], None] | None = None):
        self.crash_at = None if crash_at is None else _checks.integer("IOTrace", "crash_at", crash_at, low=1)
        self.write_chunk = _checks.integer("IOTrace", "write_chunk", write_chunk, low=1)
        if on_event is not None and not callable(on_event):
            raise TypeError(f"IOTrace: on_event must be callable or None, got {type(on_event).__name__}")
        self.record, self.on_event = bool(record), on_event
        self.count = 0
        self.events: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, label: str) -> None:
        with self._lock:
            self.count += 1
            count = self.count
            if self.record:
                self.events.append(label)
        if self.on_event is not None:
            self.on_event(count, label)
        if self.crash_at is not None and count == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


_ENV_TRACE: IOTrace | None = None


def default_trace() -> IOTrace:
    """The process-wide trace used when a save gets io=None; env LABKIT_CKPT_CRASH_AT=k arms it."""
    global _ENV_TRACE
    if _ENV_TRACE is None:
        raw = os.environ.get(CRASH_ENV, "").strip()
        if raw and not raw.isdigit():
            raise ValueError(f"{CRASH_ENV} must be a positive int, got {raw!r}")
        _ENV_TRACE = IOTrace(crash_at=int(raw) if raw and int(raw) > 0 else None)
    return _ENV_TRACE


# --- validation --------------------------------------------------------------------------------


def _directory(owner: str, directory) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{owner}: directory must be a str or os.PathLike, got {type(directory).__name__}")
    return Path(directory)


def _check_state(owner: str, state) -> dict:
    if not isinstance(state, dict) or not state:
        raise TypeError(f"{owner}: state must be a non-empty dict of shard name -> value, got "
                        f"{type(state).__name__} {state!r}"[:200])
    for key in state:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"{owner}: state's keys must be identifiers (they name the shard files), got {key!r}")
    return state


def _check_io(owner: str, io_trace) -> IOTrace:
    if io_trace is None:
        return default_trace()
    if not isinstance(io_trace, IOTrace):
        raise TypeError(f"{owner}: io must be an IOTrace or None, got {type(io_trace).__name__}")
    return io_trace


def step_dir_name(step: int) -> str:
    """'step-000000100' for step 100 (zero-padded so names sort like numbers)."""
    return f"step-{step:09d}"


# --- low-level durable writes ------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file object for torch.save: writes through to fd, hashing as it goes, with an
    I/O point each time another io.write_chunk bytes have been written (a crash there tears the file)."""

    def __init__(self, fd: int, label: str, io_trace: IOTrace):
        self.fd, self.label, self.io = fd, label, io_trace
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        chunk = self.io.write_chunk
        while len(view):
            piece = view[:chunk - self.nbytes % chunk]      # up to the next chunk boundary
            self.sha.update(piece)
            self.nbytes += len(piece)
            view = view[len(piece):]
            while len(piece):                               # os.write may write less than asked
                piece = piece[os.write(self.fd, piece):]
            if self.nbytes % chunk == 0:
                self.io(f"write {self.label} ({self.nbytes} B)")
        return len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes

    def flush(self) -> None:
        pass


def _write_shard(folder: Path, key: str, nonce: str, value, io_trace: IOTrace) -> dict:
    """torch.save(value) into folder/<key>-<nonce>.pt, fsync'd; returns its manifest entry."""
    name = f"{key}-{nonce}.pt"
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        out = _HashingFile(fd, f"{key} shard", io_trace)
        torch.save(value, out)
        os.fsync(fd)
        io_trace(f"fsync {key} shard")
    finally:
        os.close(fd)
    return {"file": name, "bytes": out.nbytes, "sha256": out.sha.hexdigest()}


def _write_manifest(folder: Path, manifest: dict, nonce: str, io_trace: IOTrace) -> None:
    """The commit: MANIFEST.json.tmp-<nonce> written and fsync'd, renamed onto MANIFEST.json, dir fsync'd."""
    tmp = folder / f"{MANIFEST}.tmp-{nonce}"
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
        io_trace("write manifest (temporary name)")
        os.fsync(fd)
        io_trace("fsync manifest")
    finally:
        os.close(fd)
    os.replace(tmp, folder / MANIFEST)
    io_trace("rename manifest -> MANIFEST.json (commit)")
    _fsync_dir(folder)
    io_trace("fsync checkpoint dir")


# --- verifying and listing -----------------------------------------------------------------------


def verify_manifest(manifest, step: int, read: Callable[[str], bytes]) -> dict[str, bytes]:
    """Check a parsed manifest against the files `read(name) -> bytes` returns; returns key -> bytes.

    Raises CheckpointError naming the first problem: wrong format or step, a missing shard, a
    size or a SHA-256 digest that differs from the manifest's.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"manifest format is not {FORMAT!r}")
    if manifest.get("step") != step:
        raise CheckpointError(f"manifest says step {manifest.get('step')!r}, expected {step}")
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not shards:
        raise CheckpointError("manifest names no shards")
    blobs = {}
    for key, entry in shards.items():
        if not isinstance(entry, dict) or not {"file", "bytes", "sha256"} <= set(entry):
            raise CheckpointError(f"shard {key!r}: entry lacks file/bytes/sha256")
        try:
            data = read(entry["file"])
        except (OSError, KeyError) as e:
            raise CheckpointError(f"shard {key!r}: cannot read {entry['file']!r} ({type(e).__name__})") from None
        if len(data) != entry["bytes"]:
            raise CheckpointError(f"shard {key!r}: {len(data)} bytes, manifest says {entry['bytes']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"shard {key!r}: sha256 differs from the manifest (corrupted)")
        blobs[key] = data
    return blobs


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One step-N directory: status 'valid', 'invalid' (committed but fails to verify/load) or
    'uncommitted' (no manifest: a save that did not finish, or a purge that did not)."""

    step: int
    path: Path
    status: str
    reason: str = ""


def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-N directory, newest first."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), Path(e.path)) for e in entries if (m := _DIR_RE.match(e.name)) and e.is_dir()]
    return sorted(found, reverse=True)


def _read_committed(path: Path, step: int, map_location) -> dict:
    """Verify and load one checkpoint directory (raises on any problem)."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointError("no manifest (uncommitted)") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise CheckpointError("manifest is not valid JSON") from None
    blobs = verify_manifest(manifest, step, lambda name: (path / name).read_bytes())
    return {key: torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
            for key, data in blobs.items()}


def list_checkpoints(directory, *, verify: bool = True) -> list[CheckpointInfo]:
    """Every checkpoint directory under `directory`, newest first, with its status.

    verify=False only checks that a manifest exists (cheap); verify=True reads, hashes and loads.
    """
    directory = _directory("list_checkpoints", directory)
    out = []
    for step, path in _step_dirs(directory):
        if not (path / MANIFEST).exists():
            out.append(CheckpointInfo(step, path, "uncommitted", "no manifest"))
            continue
        if not verify:
            out.append(CheckpointInfo(step, path, "valid"))
            continue
        try:
            _read_committed(path, step, "cpu")
        except Exception as e:  # any failure to verify or load makes it unusable
            out.append(CheckpointInfo(step, path, "invalid", f"{type(e).__name__}: {e}"))
        else:
            out.append(CheckpointInfo(step, path, "valid"))
    return out


def load_latest(directory, *, map_location="cpu") -> tuple[int, dict] | None:
    """(step, state) of the newest checkpoint that verifies, or None; never raises for a bad checkpoint.

    Every shard is read once, its size and SHA-256 checked against the manifest, and loaded
    with torch.load(weights_only=True, map_location=map_location).
    """
    directory = _directory("load_latest", directory)
    for step, path in _step_dirs(directory):
        try:
            return step, _read_committed(path, step, map_location)
        except Exception:  # torn, partial, corrupted or unreadable: try the next older one
            continue
    return None


# --- purge: keep the newest k -------------------------------------------------------------------


def purge_plan(committed: Iterable[int], partial: Iterable[int], keep_last: int) -> list[int]:
    """Steps to delete: every checkpoint, committed or partial, older than the keep_last-th newest
    committed one (nothing while fewer than keep_last are committed). Sorted ascending."""
    _checks.integer("purge_plan", "keep_last", keep_last, low=1)
    committed = sorted(set(committed), reverse=True)
    if len(committed) < keep_last:
        return []
    oldest_kept = committed[keep_last - 1]
    return sorted(s for s in set(committed) | set(partial) if s < oldest_kept)


def _remove_dir(path: Path, io_trace: IOTrace) -> None:
    """Delete a checkpoint directory, manifest first, so a crash halfway leaves it uncommitted."""
    if (path / MANIFEST).exists():
        os.unlink(path / MANIFEST)
        io_trace(f"unlink {path.name}/{MANIFEST} (uncommit)")
        _fsync_dir(path)
        io_trace(f"fsync {path.name}")
    for entry in sorted(os.listdir(path)):
        os.unlink(path / entry)
        io_trace(f"unlink {path.name}/<shard>")
    os.rmdir(path)
    io_trace(f"rmdir {path.name}")
    _fsync_dir(path.parent)
    io_trace("fsync checkpoints dir")


def purge(directory, keep_last: int, *, io: IOTrace | None = None) -> list[int]:
    """Delete the checkpoints `purge_plan` names (returns their steps). Keep keep_last >= 2 if a
    corrupted newest checkpoint must not leave you with nothing."""
    directory = _directory("purge", directory)
    _checks.integer("purge", "keep_last", keep_last, low=1)
    io_trace = _check_io("purge", io)
    dirs = dict(_step_dirs(directory))
    committed = [s for s, p in dirs.items() if (p / MANIFEST).exists()]
    doomed = purge_plan(committed, set(dirs) - set(committed), keep_last)
    for step in doomed:
        _remove_dir(dirs[step], io_trace)
    return doomed


# --- save -------------------------------------------------------------------------------------------


def _save_now(state: dict, directory: Path, step: int, keep_last: int | None, io_trace: IOTrace) -> Path:
    if not directory.is_dir():
        directory.mkdir(parents=True)
        _fsync_dir(directory.parent)
    folder = directory / step_dir_name(step)
    if not folder.is_dir():
        os.mkdir(folder)
        io_trace("mkdir checkpoint dir")
    _fsync_dir(directory)                                # the step dir's entry (new, or left by a crash)
    io_trace("fsync checkpoints dir")
    nonce = os.urandom(4).hex()
    shards = {key: _write_shard(folder, key, nonce, value, io_trace) for key, value in state.items()}
    _fsync_dir(folder)
    io_trace("fsync checkpoint dir (shard entries)")
    _write_manifest(folder, {"format": FORMAT, "step": step, "shards": shards}, nonce, io_trace)
    keep = {MANIFEST} | {entry["file"] for entry in shards.values()}
    for name in sorted(set(os.listdir(folder)) - keep):  # a replaced save of this step, stale temporaries
        os.unlink(folder / name)
        io_trace("unlink stale file")
    if keep_last is not None:
        purge(directory, keep_last, io=io_trace)
    return folder


def save(state: dict, directory, step: int, *, keep_last: int | None = None, io: IOTrace | None = None) -> Path:
    """Write `state` (shard name -> tensors / plain values) as checkpoint `step`, durably and atomically.

    Returns the checkpoint's directory. keep_last: afterwards keep only the newest keep_last
    committed checkpoints. io: an IOTrace (fault injection, recording); default: the process's.
    """
    _check_state("save", state)
    directory = _directory("save", directory)
    step = _checks.integer("save", "step", step, low=0)
    if keep_last is not None:
        _checks.integer("save", "keep_last", keep_last, low=1)
    return _save_now(state, directory, step, keep_last, _check_io("save", io))


# --- the memory snapshot ------------------------------------------------------------------------------


def _tensors(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)


def _alias_key(t: torch.Tensor) -> tuple:
    """Tensors with this key are the same view of the same storage (tied weights): copied once."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def state_nbytes(state) -> int:
    """Bytes of tensor data in `state` (aliases of one tensor counted once): a snapshot's host memory."""
    seen, total, leaves = set(), 0, []
    _tensors(state, leaves)
    for t in leaves:
        key = _alias_key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class _SnapshotBuffers:
    """Host buffers a snapshot copies into; reused while the state's layout stays the same."""

    def __init__(self):
        self.signature: tuple | None = None
        self.buffers: list[torch.Tensor] = []

    def get(self, sources: list[torch.Tensor], reuse: bool) -> list[torch.Tensor]:
        signature = tuple((tuple(t.shape), t.dtype) for t in sources)
        if reuse and signature == self.signature:
            return self.buffers
        buffers = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
                   for t in sources]                        # pinned: the device-to-host copy can be async
        if reuse:
            self.signature, self.buffers = signature, buffers
        return buffers


def _snapshot(state, buffers: _SnapshotBuffers, reuse: bool):
    """Copy every tensor of `state` into host buffers; other values are deep-copied.

    Returns (copy, event): on CUDA the device-to-host copies are enqueued (non_blocking) and
    `event` marks their end on the current stream; the reader must event.synchronize() first.
    Later kernels on that stream (the next optimizer step) run after the copies, so training
    may go on at once.
    """
    leaves: list[torch.Tensor] = []
    _tensors(state, leaves)
    unique: dict[tuple, torch.Tensor] = {}
    for t in leaves:
        unique.setdefault(_alias_key(t), t)
    sources = list(unique.values())
    targets = buffers.get(sources, reuse)
    cuda = False
    with torch.no_grad():
        for src, dst in zip(sources, targets):
            cuda |= src.device.type == "cuda"
            dst.copy_(src.detach(), non_blocking=src.device.type == "cuda")
    copy_of = {key: dst for key, dst in zip(unique, targets)}

    def rebuild(obj):
        if isinstance(obj, torch.Tensor):
            return copy_of[_alias_key(obj)]
        if isinstance(obj, dict):
            out = type(obj)((k, rebuild(v)) for k, v in obj.items())  # dict or OrderedDict (a state_dict)
            if hasattr(obj, "_metadata"):                               # module versions, kept for load_state_dict
                out._metadata = copy.deepcopy(obj._metadata)
            return out
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(rebuild(v) for v in obj)
        if isinstance(obj, list):
            return [rebuild(v) for v in obj]
        return copy.deepcopy(obj)

    result = rebuild(state)
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    return result, event


def snapshot(state):
    """A copy of `state` with every tensor in (fresh) host memory, finished before returning."""
    result, event = _snapshot(state, _SnapshotBuffers(), reuse=False)
    if event is not None:
        event.synchronize()
    return result


# --- asynchronous saves --------------------------------------------------------------------------------


class AsyncCheckpointer:
    """Saves from a host-memory snapshot in one background thread; at most one save in flight.

    `save(...)` blocks for (waiting on the previous save, if still writing) + the snapshot, then
    returns a Future of the checkpoint's directory; the live tensors may change right away.
    reuse_buffers=True keeps one set of host buffers (pinned with CUDA) between saves: no
    allocation per save, at the price of holding `state_nbytes` bytes of host memory for good.
    `last_wait_s` / `last_snapshot_s` time the two blocking parts of the latest save.
    A failed save's exception is raised by its Future, and again by the next save() or wait().
    """

    def __init__(self, *, reuse_buffers: bool = True):
        self.reuse_buffers = bool(reuse_buffers)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labkit-checkpoint")
        self._buffers = _SnapshotBuffers()
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self._lock = threading.Lock()
        self.last_wait_s = 0.0
        self.last_snapshot_s = 0.0

    def wait(self) -> None:
        """Block until the save in flight (if any) has finished; re-raise its error."""
        pending, step = self._pending, self._pending_step
        if pending is None:
            return
        try:
            pending.result()
        except Exception as e:
            raise RuntimeError(f"AsyncCheckpointer: the save of step {step} failed: {e}") from e
        finally:
            self._pending = None

    def save(self, state: dict, directory, step: int, *, keep_last: int | None = None,
             io: IOTrace | None = None) -> Future:
        """Snapshot `state` now and persist it in the background as checkpoint `step` (see save())."""
        _check_state("AsyncCheckpointer.save", state)
        directory = _directory("AsyncCheckpointer.save", directory)
        step = _checks.integer("AsyncCheckpointer.save", "step", step, low=0)
        if keep_last is not None:
            _checks.integer("AsyncCheckpointer.save", "keep_last", keep_last, low=1)
        io_trace = _check_io("AsyncCheckpointer.save", io)
        with self._lock:
            t0 = time.perf_counter()
            self.wait()                                  # at most one in flight: its buffers are ours again
            t1 = time.perf_counter()
            snap, event = _snapshot(state, self._buffers, self.reuse_buffers)
            t2 = time.perf_counter()
            self.last_wait_s, self.last_snapshot_s = t1 - t0, t2 - t1

            def persist() -> Path:
                if event is not None:
                    event.synchronize()                  # the device-to-host copies have landed
                return _save_now(snap, directory, step, keep_last, io_trace)

            self._pending, self._pending_step = self._executor.submit(persist), step
            return self._pending

    def close(self) -> None:
        """Finish the save in flight and stop the thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DEFAULT_ASYNC: AsyncCheckpointer | None = None


def async_save(state: dict, directory, step: int, *, keep_last: int | None = None,
               io: IOTrace | None = None) -> Future:
    """save() in the background after a snapshot to host memory; returns a Future of the directory.

    Uses one process-wide AsyncCheckpointer (fresh buffers each save, freed when written): at most
    one save in flight, so a call made while the previous save is still writing waits for it.
    """
    global _DEFAULT_ASYNC
    if _DEFAULT_ASYNC is None:
        _DEFAULT_ASYNC = AsyncCheckpointer(reuse_buffers=False)
    return _DEFAULT_ASYNC.save(state, directory, step, keep_last=keep_last, io=io)


def wait_for_saves() -> None:
    """Block until the process-wide async_save in flight (if any) is written."""
    if _DEFAULT_ASYNC is not None:
        _DEFAULT_ASYNC.wait()


# --- what a training run needs to continue exactly ----------------------------------------------------


def rng_state() -> dict:
    """The states of Python's `random`, NumPy's global RNG, torch's CPU RNG and every CUDA device's,
    as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    out = {"python": {"version": version, "state": list(internal), "gauss": gauss},
           "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned (CUDA states only if CUDA is present)."""
    if not isinstance(state, dict) or "python" not in state or "torch" not in state:
        raise TypeError(f"set_rng_state: state must be a dict from rng_state(), got {type(state).__name__}")
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                   data_position=None) -> dict:
    """The shards of a resumable checkpoint: model, optimizer, scheduler, RNG states, data position.

    data_position: whatever locates the data stream (a step count, a torch.Generator's
    get_state(), ...), made of tensors and plain values. The tensors are the live ones: pass the
    result to save() / async_save(), which copy them.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"training_state: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"training_state: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "data": {"position": data_position}}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None):
    """Load a training_state() back into model, optimizer and scheduler, set the RNG states;
    returns the data position. Call it last, right before the next training step."""
    if not isinstance(state, dict) or not {"model", "optimizer", "rng", "data"} <= set(state):
        raise ValueError(f"restore: state must come from training_state(), got keys "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    if (scheduler is None) != ("scheduler" not in state):
        raise ValueError("restore: pass a scheduler exactly when the checkpoint holds one "
                         f"(checkpoint has one: {'scheduler' in state}, scheduler given: {scheduler is not None})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["data"]["position"]


# --- the cost model --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SaveSchedule:
    """A simulated run: spans for labkit.viz.timeline_figure (ms), and the totals."""

    mode: str
    spans: list[dict]
    blocked_ms: float  # time the trainer did not compute because of saves
    wall_ms: float     # until the last step is done and the last save is on disk
    saves: int


def save_schedule(n_steps: int, step_ms: float, interval: int, snapshot_ms: float, persist_ms: float,
                  mode: str, *, lane_prefix: str = "") -> SaveSchedule:
    """Simulate `n_steps` training steps with a save after every `interval`-th step.

    mode 'sync': each save blocks for snapshot_ms + persist_ms. mode 'async': each save waits for
    the previous persist (if it is still running), blocks for snapshot_ms, and persists in the
    background; the run ends when the last persist is done.
    """
    owner = "save_schedule"
    n_steps = _checks.integer(owner, "n_steps", n_steps, low=1)
    step_ms = _checks.number(owner, "step_ms", step_ms, low=0.0)
    interval = _checks.integer(owner, "interval", interval, low=1)
    snapshot_ms = _checks.number(owner, "snapshot_ms", snapshot_ms, low=0.0)
    persist_ms = _checks.number(owner, "persist_ms", persist_ms, low=0.0)
    _checks.choice(owner, "mode", mode, ("sync", "async"))
    trainer, writer = f"{lane_prefix}{mode}: trainer", f"{lane_prefix}{mode}: writer thread"
    spans: list[dict] = []
    t = blocked = 0.0
    persist_end = 0.0
    saves = 0
    for step in range(1, n_steps + 1):
        spans.append(dict(lane=trainer, start=t, end=t + step_ms, kind="train step", label=""))
        t += step_ms
        if step % interval:
            continue
        saves += 1
        if mode == "sync":
            spans.append(dict(lane=trainer, start=t, end=t + snapshot_ms + persist_ms, kind="save (blocking)",
                              label=f"save {step}"))
            t += snapshot_ms + persist_ms
            blocked += snapshot_ms + persist_ms
            persist_end = t
            continue
        wait = max(0.0, persist_end - t)
        if wait > 0:
            spans.append(dict(lane=trainer, start=t, end=t + wait, kind="wait for previous save", label="wait"))
        spans.append(dict(lane=trainer, start=t + wait, end=t + wait + snapshot_ms, kind="snapshot", label=""))
        t += wait + snapshot_ms
        blocked += wait + snapshot_ms
        spans.append(dict(lane=writer, start=t, end=t + persist_ms, kind="persist (background)",
                          label=f"save {step}"))
        persist_end = t + persist_ms
    return SaveSchedule(mode, spans, blocked, max(t, persist_end), saves)


def blocked_ms(n_steps: int, step_ms: float, interval: int, snapshot_ms: float,
               persist_ms: float) -> tuple[float, float]:
    """(sync, async) total time the trainer is blocked by saves, from save_schedule."""
    return tuple(save_schedule(n_steps, step_ms, interval, snapshot_ms, persist_ms, m).blocked_ms
                 for m in ("sync", "async"))


def young_interval(save_cost_s: float, mtbf_s: float) -> tuple[float, float]:
    """Young's optimum: (τ* = √(2CM) seconds of work between checkpoints, lost fraction W* = √(2C/M))."""
    c = _checks.number("young_interval", "save_cost_s", save_cost_s, low=0.0, low_open=True)
    m = _checks.number("young_interval", "mtbf_s", mtbf_s, low=0.0, low_open=True)
    return math.sqrt(2 * c * m), math.sqrt(2 * c / m)


__all__ = [
    "AsyncCheckpointer", "CRASH_ENV", "CheckpointError", "CheckpointInfo", "IOTrace", "SaveSchedule",
    "async_save", "blocked_ms", "default_trace", "list_checkpoints", "load_latest", "purge", "purge_plan",
    "restore", "rng_state", "save", "save_schedule", "set_rng_state", "snapshot", "state_nbytes",
    "step_dir_name", "training_state", "verify_manifest", "wait_for_saves", "young_interval",
]
