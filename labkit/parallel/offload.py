"""ZeRO-Infinity: parameters and optimizer states offloaded to CPU memory and to NVMe (here: files).

S. Rajbhandari, O. Ruwase, J. Rasley, S. Smith, Y. He, "ZeRO-Infinity: Breaking the GPU Memory Wall
for Extreme Scale Deep Learning", SC21 (arXiv:2104.07857); J. Ren et al., "ZeRO-Offload:
Democratizing Billion-Scale Model Training", USENIX ATC 2021.

Memory tiers. A GPU has tens of GB of HBM at TB/s; its host has hundreds of GB of DRAM behind a PCIe
link of tens of GB/s; NVMe drives hold TBs at a few GB/s each. ZeRO-Infinity (ZeRO stage 3 plus
offload) keeps on the GPU only what the current layer needs: the parameters live in CPU memory or
on NVMe and are fetched layer by layer, the fp32 master weights and the optimizer states live there
too, and the optimizer step runs on the CPU, next to them.

Bandwidth-centric analysis (the paper's Sec. 4). With peak throughput `peak` (FLOP/s) and a tier
that moves data at `bw` (bytes/s), a step spends compute = flops / peak and transfer = bytes / bw:

    efficiency = compute / (compute + transfer) = ait bw / (ait bw + peak),   ait = flops / bytes

For a transformer with activation checkpointing a step costs 2 x 4 x bsz x seq x params FLOPs
(forward, recompute, backward = 2 forwards). The arithmetic intensity with respect to
    parameters + gradients (fp16 weights read 3 times, gradients written once: 2 x 4 x params bytes)
        ait = seq x bsz
    optimizer states (fp32 weights, gradients, momentum, variance read and written: 2 x 16 x params bytes)
        ait = seq x bsz / 4
    activation checkpoints (one fp16 hidden state per ci layers, written and read)
        ait = 24 x hd x ci
so the optimizer states need 4x the bandwidth of the parameters for the same efficiency, and the
checkpoints almost none. Bandwidth-centric partitioning: each rank reads only its 1/N of every
parameter from its own PCIe link and the ranks all-gather the rest over the faster GPU
interconnect, so the bandwidth a GPU sees grows with N (capped by that interconnect).

Overlap. `OffloadedModel` trains a stack of layers one layer at a time: while layer l computes, a
fetcher thread reads layer l+1's parameters (a pool of I/O threads reading file chunks with
os.preadv, which releases the GIL; on a GPU into pinned buffers, then a copy on a side stream). The
forward pass keeps only each layer's input (activation checkpoints); the backward pass fetches the
layers again in reverse, recomputes each one with autograd, and hands its flat gradient to the
optimizer step on the CPU, whose states are read from and written back to their tier.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit import _checks, runtime
from labkit.models.gpt import IGNORE_INDEX, TinyGPT
from labkit.parallel.zero import STAGES, FlatBucket, memory_per_rank

TIERS = ("gpu", "cpu", "nvme")
DEFAULT_CHUNK_BYTES = 4 << 20  # one I/O request

# --------------------------------------------------------------------------- the bandwidth-centric analysis


def efficiency(ait: float, bandwidth: float, peak_flops: float) -> float:
    """compute / (compute + transfer) = ait bw / (ait bw + peak): the fraction of peak a step keeps when
    its data moves at `bandwidth` bytes/s, with no overlap (the paper's Sec. 4.2)."""
    owner = "efficiency"
    ait = _checks.number(owner, "ait", ait, low=0.0)
    bw = _checks.number(owner, "bandwidth", bandwidth, low=0.0)
    peak = _checks.number(owner, "peak_flops", peak_flops, low=0.0, low_open=True)
    return ait * bw / (ait * bw + peak)


def required_bandwidth(ait: float, peak_flops: float, target: float = 0.5) -> float:
    """Bytes/s a tier must deliver for `efficiency` to reach target: target peak / (ait (1 - target))."""
    owner = "required_bandwidth"
    ait = _checks.number(owner, "ait", ait, low=0.0, low_open=True)
    peak = _checks.number(owner, "peak_flops", peak_flops, low=0.0, low_open=True)
    target = _checks.number(owner, "target", target, low=0.0, high=1.0, high_open=True)
    return target * peak / (ait * (1.0 - target))


def ait_params_grads(seq: int, bsz: int) -> float:
    """(2 x 4 x bsz x seq x params FLOPs) / (2 x 4 x params bytes) = seq x bsz."""
    return float(_checks.integer("ait_params_grads", "seq", seq, low=1)
                 * _checks.integer("ait_params_grads", "bsz", bsz, low=1))


def ait_optimizer_states(seq: int, bsz: int) -> float:
    """(2 x 4 x bsz x seq x params FLOPs) / (2 x 16 x params bytes) = seq x bsz / 4."""
    return float(_checks.integer("ait_optimizer_states", "seq", seq, low=1)
                 * _checks.integer("ait_optimizer_states", "bsz", bsz, low=1)) / 4


def ait_activations(hidden: int, ci: int = 1) -> float:
    """24 x hd x ci: per block 2 x 4 x bsz x seq x 12 hd^2 FLOPs over 2 x 2 x bsz x seq x hd / ci bytes."""
    return 24.0 * _checks.integer("ait_activations", "hidden", hidden, low=1) \
        * _checks.integer("ait_activations", "ci", ci, low=1)


def effective_bandwidth(link_bandwidth: float, world_size: int, interconnect: float | None = None) -> float:
    """Bandwidth-centric partitioning: N ranks each read 1/N over their own link, then all-gather:
    N x link, at most the GPU interconnect's bandwidth."""
    bw = _checks.number("effective_bandwidth", "link_bandwidth", link_bandwidth, low=0.0)
    n = _checks.integer("effective_bandwidth", "world_size", world_size, low=1)
    total = n * bw
    if interconnect is not None:
        total = min(total, _checks.number("effective_bandwidth", "interconnect", interconnect, low=0.0))
    return total


@dataclass(frozen=True)
class Tier:
    """A memory tier as one GPU sees it: capacity (bytes) and bandwidth to the GPU (bytes/s), nominal."""

    name: str
    capacity: float
    bandwidth: float
    source: str


# One GPU's share of a DGX H100-class node (8 GPUs): datasheet (nominal) numbers, not measurements. The
# bandwidth is what one GPU's data crosses: HBM; the PCIe link to host memory; one NVMe drive.
NODE_TIERS = {
    "gpu": Tier("GPU HBM3", 80e9, 3.35e12, "H100 SXM: 80 GB HBM3 at 3.35 TB/s"),
    "cpu": Tier("CPU DRAM", 2e12 / 8, 64e9, "2 TB of host memory per 8 GPUs, over PCIe 5.0 x16 (64 GB/s a direction; "
                "the host's own DRAM bandwidth per GPU is similar: 2 sockets x 8 DDR5-4800 channels / 8 = 77 GB/s)"),
    "nvme": Tier("NVMe", 3.84e12, 7e9, "one 3.84 TB PCIe 4.0 x4 NVMe drive per GPU (~7 GB/s sequential read)"),
}
NVLINK_BANDWIDTH = 900e9  # H100 SXM NVLink 4, all links together: caps bandwidth-centric parameter gathering
# name -> (memory bytes, dense bf16 FLOP/s), from the datasheets
GPUS = {"A100 40GB": (40e9, 312e12), "A100 80GB": (80e9, 312e12), "H100 80GB": (80e9, 989e12),
        "H200 141GB": (141e9, 989e12)}
PARTS = ("parameters", "gradients", "optimizer states", "working set", "activations")


def tier_breakdown(num_params: int, world_size: int, stage: int, *, param_tier: str = "gpu",
                   optimizer_tier: str = "gpu", optimizer: str = "adam", dtype: torch.dtype = torch.bfloat16,
                   working_params: int = 0, activations: float = 0.0) -> dict[str, dict[str, float]]:
    """Bytes one rank keeps on each tier, by kind: {tier: {part: bytes}} (tiers "gpu", "cpu", "nvme";
    parts PARTS), at a ZeRO stage with offload.

    optimizer_tier != "gpu" (ZeRO-Offload): the optimizer states (with the fp32 master) and the gradients
    (streamed off as the backward pass makes them) live there; the step runs on the CPU.
    param_tier != "gpu" (ZeRO-Infinity, needs stage 3): the parameters live there too; the GPU holds a
    working set of 2 x working_params (the layer computing and the one prefetched). Activations stay
    on the GPU.
    """
    owner = "tier_breakdown"
    _checks.choice(owner, "param_tier", param_tier, TIERS)
    _checks.choice(owner, "optimizer_tier", optimizer_tier, TIERS)
    working = _checks.integer(owner, "working_params", working_params)
    activations = _checks.number(owner, "activations", activations, low=0.0)
    mem = memory_per_rank(num_params, stage, world_size, optimizer, dtype)
    if param_tier != "gpu" and stage != 3:
        raise ValueError(f"{owner}: param_tier={param_tier!r} needs stage 3 (a rank offloads its partition of "
                         f"the parameters), got stage {stage}")
    out = {t: dict.fromkeys(PARTS, 0.0) for t in TIERS}
    out[param_tier]["parameters"] += mem.params
    out[optimizer_tier]["gradients"] += mem.grads
    out[optimizer_tier]["optimizer states"] += mem.optimizer
    out["gpu"]["working set"] += 2 * working * dtype.itemsize if param_tier != "gpu" else 0.0
    out["gpu"]["activations"] += activations
    return out


def tier_bandwidth(tier: str, world_size: int, stage: int, *, for_params: bool) -> float:
    """Bytes/s one GPU of a DGX H100-class node sees from a tier (nominal NODE_TIERS numbers).

    Parameters: from the GPU's own HBM below stage 3; at stage 3 gathered from the other GPUs over
    NVLink; offloaded, each of the N ranks reads 1/N over its own link and they all-gather
    (bandwidth-centric partitioning): N x link, at most NVLink. Optimizer states: from stage 1 on each
    rank steps only its 1/N, so the data per GPU shrinks N-fold: N x the tier's bandwidth."""
    owner = "tier_bandwidth"
    bw = NODE_TIERS[_checks.choice(owner, "tier", tier, TIERS)].bandwidth
    n = _checks.integer(owner, "world_size", world_size, low=1)
    stage = _checks.choice(owner, "stage", stage, STAGES)
    if for_params:
        if tier == "gpu":
            return NVLINK_BANDWIDTH if stage == 3 else bw
        return effective_bandwidth(bw, n, NVLINK_BANDWIDTH)
    return effective_bandwidth(bw, n if stage >= 1 else 1)


def tier_bytes(num_params: int, world_size: int, stage: int, **kwargs) -> dict[str, float]:
    """Total bytes one rank keeps on each tier: tier_breakdown summed over the parts."""
    return {t: sum(parts.values()) for t, parts in tier_breakdown(num_params, world_size, stage, **kwargs).items()}


def fits(usage: dict[str, float], capacity: dict[str, float]) -> bool:
    """Whether every tier's usage is within its capacity."""
    return all(usage[t] <= capacity[t] for t in usage)


# --------------------------------------------------------------------------- asynchronous file I/O


class IOHandle:
    """Chunks of one read or write in flight; wait() blocks until all are done (re-raising errors)."""

    def __init__(self, futures: list[Future], keep: torch.Tensor):
        self._futures, self._keep = futures, keep  # keep: the buffer must outlive the I/O

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        for f in self._futures:
            f.result()
        self._keep = None


def _byte_view(t: torch.Tensor) -> memoryview:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"AsyncIO: tensors must be contiguous CPU tensors, got {t.device} "
                         f"{'contiguous' if t.is_contiguous() else 'non-contiguous'}")
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _pwrite(path: str, buf: memoryview, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        while len(buf):
            n = os.pwrite(fd, buf, offset)
            buf, offset = buf[n:], offset + n
    finally:
        os.close(fd)


def _pread(path: str, buf: memoryview, offset: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        while len(buf):
            n = os.preadv(fd, [buf], offset)
            if n == 0:
                raise EOFError(f"AsyncIO: {path} ended at byte {offset}, before the buffer was full")
            buf, offset = buf[n:], offset + n
    finally:
        os.close(fd)


class AsyncIO:
    """A pool of I/O threads moving whole tensors to and from files, chunk by chunk (os.pwrite /
    os.preadv release the GIL, so the transfers overlap with compute and with each other)."""

    def __init__(self, threads: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.threads = _checks.integer("AsyncIO", "threads", threads, low=1)
        self.chunk_bytes = _checks.integer("AsyncIO", "chunk_bytes", chunk_bytes, low=1)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="labkit-io")
        self.bytes_read = self.bytes_written = 0

    def _spans(self, nbytes: int) -> list[tuple[int, int]]:
        return [(o, min(o + self.chunk_bytes, nbytes)) for o in range(0, nbytes, self.chunk_bytes)]

    def write(self, path: str | os.PathLike, tensor: torch.Tensor) -> IOHandle:
        """Write tensor's bytes to path (created or truncated to its size) asynchronously."""
        buf, path = _byte_view(tensor), os.fspath(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, len(buf))
        finally:
            os.close(fd)
        self.bytes_written += len(buf)
        return IOHandle([self._pool.submit(_pwrite, path, buf[a:b], a) for a, b in self._spans(len(buf))], tensor)

    def read(self, path: str | os.PathLike, out: torch.Tensor) -> IOHandle:
        """Fill out with the first out.nbytes bytes of path, asynchronously."""
        buf, path = _byte_view(out), os.fspath(path)
        self.bytes_read += len(buf)
        return IOHandle([self._pool.submit(_pread, path, buf[a:b], a) for a, b in self._spans(len(buf))], out)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def evict(path: str | os.PathLike) -> None:
    """fsync a file and ask the kernel to drop its cached pages, so the next read comes from the disk."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_bandwidth(directory: str | os.PathLike | None = None, nbytes: int = 64 << 20, *, threads: int = 4,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES, repeats: int = 3) -> dict[str, float]:
    """Measured bytes/s of this machine's tiers (medians): disk writes (to the page cache, then fsync'd),
    disk reads (cached pages dropped first), a host memcpy, and on a GPU pinned host -> device and
    device -> host copies."""
    owner = "measure_bandwidth"
    nbytes = _checks.integer(owner, "nbytes", nbytes, low=1)
    repeats = _checks.integer(owner, "repeats", repeats, low=1)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    io = AsyncIO(threads, chunk_bytes)
    out: dict[str, list[float]] = {"disk_write": [], "disk_read": [], "host_copy": []}
    with tempfile.TemporaryDirectory(dir=directory, prefix="labkit-bw-") as tmp:
        path = Path(tmp) / "probe.bin"
        for _ in range(repeats):
            t0 = time.perf_counter()
            io.write(path, src).wait()
            evict(path)  # fsync inside: the write reached the disk
            out["disk_write"].append(nbytes / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            io.read(path, dst).wait()
            out["disk_read"].append(nbytes / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            dst.copy_(src)
            out["host_copy"].append(nbytes / (time.perf_counter() - t0))
    io.close()
    if not torch.equal(src, dst):
        raise RuntimeError(f"{owner}: the data read back differs from the data written")
    if torch.cuda.is_available() and runtime.on_gpu():
        pinned, dev = src.pin_memory(), torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        for key, (a, b) in {"h2d": (dev, pinned), "d2h": (pinned, dev)}.items():
            times = []
            for _ in range(repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                a.copy_(b, non_blocking=True)
                torch.cuda.synchronize()
                times.append(nbytes / (time.perf_counter() - t0))
            out[key] = times[1:]
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}


# --------------------------------------------------------------------------- the offloaded model


class _Embed(nn.Module):
    """TinyGPT's first stage: token (+ learned position) embeddings. idx (B, T) -> (B, T, C)."""

    def __init__(self, tok_emb: nn.Embedding, pos_emb: nn.Embedding | None, drop: nn.Module):
        super().__init__()
        self.tok_emb, self.pos_emb, self.drop = tok_emb, pos_emb, drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        return self.drop(x)


class _Head(nn.Module):
    """TinyGPT's last stage: final norm and the output head. (B, T, C) -> logits (B, T, V)."""

    def __init__(self, norm_f: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.norm_f, self.lm_head = norm_f, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T) over the scored positions (targets
    IGNORE_INDEX are not), as TinyGPT computes it."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def tinygpt_layers(model: nn.Module) -> dict:
    """A TinyGPT (untied) as OffloadedModel's arguments: {"layers", "prefixes", "loss_fn"}. The layers
    (embeddings, each block, final norm + head) run one after the other and hold the model's own
    parameter tensors; the prefixes give back TinyGPT's parameter names. (labkit.parallel.fsdp cuts a
    TinyGPT into its units with it too.)"""
    if not isinstance(model, TinyGPT):
        raise TypeError(f"tinygpt_layers: model must be a TinyGPT, got {type(model).__name__}")
    if model.config.tie_embeddings:
        raise ValueError("tinygpt_layers: model must have tie_embeddings=False (a tied weight would belong to "
                         "the first and the last layer at once)")
    layers = [_Embed(model.tok_emb, model.pos_emb, model.drop), *model.blocks, _Head(model.norm_f, model.lm_head)]
    prefixes = ["", *(f"blocks.{i}." for i in range(len(model.blocks))), ""]
    return {"layers": layers, "prefixes": prefixes, "loss_fn": lm_loss}


class OffloadedModel:
    """Trains a stack of layers (h = layer(h), then loss_fn(h, y)) with its parameters on `param_tier` and
    its optimizer states on `optimizer_tier`, one layer on the compute device at a time.

    param_tier "gpu" keeps every parameter on the compute device (the in-memory baseline), "cpu" in host
    memory (pinned when there is a GPU), "nvme" in one file per layer under `directory`.
    optimizer_tier: where the states live and the step runs ("gpu": the compute device, "cpu"/"nvme": the
    CPU, states in memory or in files). prefetch: fetch layer l+1 while layer l computes. evict_files:
    after each step, drop the files from the page cache so the next step reads them from the disk (as
    ZeRO-Infinity's O_DIRECT reads do).
    Layers must be deterministic (no dropout): the backward pass recomputes them.
    """

    def __init__(self, layers: Sequence[nn.Module], loss_fn: Callable, optimizer_cls: type = torch.optim.AdamW, *,
                 prefixes: Sequence[str] | None = None, param_tier: str = "cpu", optimizer_tier: str = "cpu",
                 directory: str | os.PathLike | None = None, prefetch: bool = True, io_threads: int = 4,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, evict_files: bool = False,
                 device: torch.device | str | None = None, **optimizer_kw):
        owner = "OffloadedModel"
        self.layers = list(layers)
        if not self.layers or not all(isinstance(m, nn.Module) for m in self.layers):
            raise TypeError(f"{owner}: layers must be a non-empty sequence of nn.Module")
        if not callable(loss_fn):
            raise TypeError(f"{owner}: loss_fn must be callable, got {type(loss_fn).__name__}")
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"{owner}: optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
        self.param_tier = _checks.choice(owner, "param_tier", param_tier, TIERS)
        self.optimizer_tier = _checks.choice(owner, "optimizer_tier", optimizer_tier, TIERS)
        for name, flag in (("prefetch", prefetch), ("evict_files", evict_files)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {type(flag).__name__}")
        self.evict_files = evict_files
        prefixes = list(prefixes) if prefixes is not None else [f"{i}." for i in range(len(self.layers))]
        if len(prefixes) != len(self.layers):
            raise ValueError(f"{owner}: prefixes must have one entry per layer ({len(self.layers)}), "
                             f"got {len(prefixes)}")
        for i, m in enumerate(self.layers):
            for sub in m.modules():
                if isinstance(sub, nn.Dropout) and sub.p > 0:
                    raise ValueError(f"{owner}: layer {i} has dropout p={sub.p}; the backward pass recomputes each "
                                     f"layer, so layers must be deterministic")
        seen: dict[nn.Parameter, int] = {}
        per_layer = []
        for i, layer in enumerate(self.layers):  # check everything before touching any module
            params = [p for _, p in layer.named_parameters()]
            for p in params:
                if p in seen:
                    raise ValueError(f"{owner}: a parameter is shared by layers {seen[p]} and {i}; every parameter "
                                     f"must belong to one layer")
                seen[p] = i
            if not params:
                raise ValueError(f"{owner}: layer {i} has no parameters")
            if len({(p.dtype, p.device) for p in params}) > 1:
                raise ValueError(f"{owner}: the parameters of layer {i} must share one dtype and device")
            per_layer.append(params)
        # one optimizer per layer over a placeholder whose storage is swapped in at each step (bad
        # hyperparameters fail here, before any module is changed)
        holders = [nn.Parameter(torch.empty(0, dtype=ps[0].dtype), requires_grad=False) for ps in per_layer]
        self._optimizers = [optimizer_cls([h], **optimizer_kw) for h in holders]
        self.loss_fn, self.prefetch = loss_fn, prefetch
        self.device = torch.device(device) if device is not None else runtime.device()
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.io = AsyncIO(io_threads, chunk_bytes)
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="labkit-fetch")
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        needs_dir = "nvme" in (self.param_tier, self.optimizer_tier)
        self._tmp = tempfile.TemporaryDirectory(prefix="labkit-nvme-", dir=directory) if needs_dir else None
        self.directory = Path(self._tmp.name) if self._tmp else None
        self._lock = threading.Lock()
        self._pending_writes: dict[str, IOHandle] = {}

        # each layer's parameters flattened into one buffer, then moved to its tier
        self.buckets, self.names, self._slots, self._stored = [], [], [], []
        for i, (layer, params) in enumerate(zip(self.layers, per_layer)):
            bucket = FlatBucket(params, 1, 0)
            flat = bucket.flatten([p.detach() for p in params]).cpu()  # (numel,)
            self.buckets.append(bucket)
            self.names.append([prefixes[i] + n for n, _ in layer.named_parameters()])
            slots = []
            index = {p: j for j, p in enumerate(params)}
            for m in layer.modules():
                for aname, p in list(m._parameters.items()):
                    if p is not None:
                        slots.append((m, aname, index[p]))
                        del m._parameters[aname]
                        setattr(m, aname, None)  # a view of the fetched buffer while the layer runs
            self._slots.append(slots)
            self._stored.append(self._store_initial(i, flat))
        self._states_on_disk = [False] * len(self.layers)
        self._state_keys: dict[int, list[str]] = {}
        self.timeline: list[dict] = []
        self.schedule: list[str] = []
        self.resident_bytes = self.peak_resident_bytes = 0
        self._flush()  # the initial files are written (and, with evict_files, out of the page cache)

    # -- where things live --

    def _path(self, kind: str, i: int) -> str:
        return os.fspath(self.directory / f"{kind}{i}.bin")

    def _store_initial(self, i: int, flat: torch.Tensor):
        if self.param_tier == "gpu":
            return flat.to(self.device)
        if self.param_tier == "cpu":
            return flat.pin_memory() if self._cuda else flat
        self.io.write(self._path("param", i), flat).wait()
        return None

    def _read_file(self, path: str, out: torch.Tensor) -> IOHandle:
        with self._lock:
            pending = self._pending_writes.pop(path, None)
        if pending is not None:
            pending.wait()  # never read a file a write is still filling
        return self.io.read(path, out)

    def _write_file(self, path: str, t: torch.Tensor) -> None:
        with self._lock:
            pending = self._pending_writes.pop(path, None)
        if pending is not None:
            pending.wait()
        handle = self.io.write(path, t)
        with self._lock:
            self._pending_writes[path] = handle

    def _span(self, lane: str, label: str, kind: str, t0: float) -> None:
        self.timeline.append(dict(lane=lane, label=label, kind=kind, start=(t0 - self._t0) * 1e3,
                                  end=(time.perf_counter() - self._t0) * 1e3))

    # -- fetching a layer's parameters onto the compute device --

    def _load(self, i: int, label: str) -> tuple[torch.Tensor, object]:
        """Runs on the fetcher thread: layer i's flat parameters on the compute device (+ a CUDA event)."""
        t0 = time.perf_counter()
        numel = self.buckets[i].numel
        if self.param_tier == "gpu":
            flat, event = self._stored[i], None
        elif self.param_tier == "cpu" and not self._cuda:
            flat, event = self._stored[i].clone(), None  # host memory -> "device" memory (both the CPU here)
        else:
            if self.param_tier == "cpu":
                staging = self._stored[i]
            else:
                staging = torch.empty(numel, dtype=self.buckets[i].dtype, pin_memory=self._cuda)
                self._read_file(self._path("param", i), staging).wait()
            if self._cuda:
                with torch.cuda.stream(self._copy_stream):
                    flat = torch.empty(numel, dtype=staging.dtype, device=self.device)
                    flat.copy_(staging, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._copy_stream)
                event.synchronize()  # the staging buffer may be reused once the copy is done
            else:
                flat, event = staging, None
        if self.param_tier != "gpu":
            self._track(flat.numel() * flat.element_size())  # a new buffer on the device
        self._span("fetch (I/O threads)", label, "fetch", t0)
        return flat, event

    def _fetch(self, i: int, label: str) -> Future:
        self.schedule.append(f"fetch {label}")
        return self._fetcher.submit(self._load, i, label)

    def _wait(self, future: Future) -> torch.Tensor:
        flat, event = future.result()
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            flat.record_stream(torch.cuda.current_stream(self.device))
        return flat

    def _track(self, delta: int) -> None:
        with self._lock:
            self.resident_bytes += delta
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _run(self, i: int, flat: torch.Tensor, h):
        """Layer i on input h with its parameters as views of flat (numel,)."""
        views = self.buckets[i].views(flat)
        for m, aname, j in self._slots[i]:
            setattr(m, aname, views[j])
        try:
            return self.layers[i](h)
        finally:
            for m, aname, _ in self._slots[i]:
                setattr(m, aname, None)

    # -- the optimizer step, on the CPU next to the states --

    def _step_layer(self, i: int, grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        where = self.device if self.optimizer_tier == "gpu" else torch.device("cpu")
        opt = self._optimizers[i]
        holder = opt.param_groups[0]["params"][0]
        # the master weights (the parameters themselves: the course trains in their dtype)
        if self.param_tier == "nvme":
            master = torch.empty(self.buckets[i].numel, dtype=self.buckets[i].dtype)
            self._read_file(self._path("param", i), master).wait()
            master = master.to(where)
        else:
            master = self._stored[i] if self._stored[i].device == where else self._stored[i].to(where)
        state = opt.state.get(holder, {})
        if self._states_on_disk[i]:
            handles = []
            for key in self._state_keys[i]:
                state[key] = torch.empty(self.buckets[i].numel, dtype=self.buckets[i].dtype)
                handles.append(self._read_file(self._path(f"state_{key}_", i), state[key]))
            for h in handles:
                h.wait()
        holder.data = master
        holder.grad = grad.to(where)
        opt.step()
        holder.grad = None
        # write back: the parameters to their tier, the states to theirs
        if self.param_tier == "nvme":
            self._write_file(self._path("param", i), master if master.device.type == "cpu" else master.cpu())
        elif master is not self._stored[i]:
            self._stored[i].copy_(master)
        if self.optimizer_tier == "nvme":
            state = opt.state[holder]
            self._state_keys[i] = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 1]
            for key in self._state_keys[i]:
                self._write_file(self._path(f"state_{key}_", i), state.pop(key))
            self._states_on_disk[i] = True
        holder.data = torch.empty(0, dtype=master.dtype)
        self._span("optimizer (CPU)" if where.type == "cpu" else "optimizer", f"L{i}", "optimizer", t0)

    # -- one training step --

    def _get(self, i: int, fetches: dict) -> torch.Tensor:
        """Layer i's parameters on the device: the prefetched copy, or fetched now (and waited for)."""
        future = fetches.pop(i, None) or self._fetch(i, f"L{i}")
        return self._wait(future)

    def _release(self, resident: dict, i: int) -> None:
        flat = resident.pop(i)
        if self.param_tier != "gpu":
            self._track(-flat.numel() * flat.element_size())

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()  # honest compute spans on the timeline

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward, backward and optimizer step on one batch, layer by layer; returns the loss."""
        n = len(self.layers)
        self.timeline, self.schedule = [], []  # spans with times; the main thread's actions in order
        self._t0 = time.perf_counter()
        on_device = sum(b.numel * b.dtype.itemsize for b in self.buckets)
        self.resident_bytes = self.peak_resident_bytes = on_device if self.param_tier == "gpu" else 0
        h, y = x.to(self.device), y.to(self.device)
        fetches = {0: self._fetch(0, "L0")} if self.prefetch else {}
        checkpoints, resident, loss = [], {}, None
        for i in range(n):  # forward: keep only each layer's input (the activation checkpoints)
            if self.prefetch and i + 1 < n:
                fetches[i + 1] = self._fetch(i + 1, f"L{i + 1}")
            resident[i] = self._get(i, fetches)
            self.schedule.append(f"F{i}")
            t0 = time.perf_counter()
            checkpoints.append(h)
            with torch.no_grad():
                out = self._run(i, resident[i], h)
                if i == n - 1:
                    loss = self.loss_fn(out, y)
                else:
                    h = out
            self._sync()
            self._span("compute", f"F{i}", "forward", t0)
            if i < n - 1:  # the last layer stays for the backward pass
                self._release(resident, i)
        grad_h = None
        for i in reversed(range(n)):  # backward: fetch again, recompute, differentiate, step
            if i not in resident:
                resident[i] = self._get(i, fetches)
            if self.prefetch and i > 0:
                fetches[i - 1] = self._fetch(i - 1, f"L{i - 1}")
            self.schedule.append(f"B{i}")
            t0 = time.perf_counter()
            w = resident[i].detach().requires_grad_(True)  # (numel,): its gradient is the layer's flat gradient
            h_in = checkpoints[i]
            h_in = h_in.detach().requires_grad_(True) if h_in.is_floating_point() else h_in
            inputs = [w, h_in] if h_in.requires_grad else [w]
            with torch.enable_grad():
                out = self._run(i, w, h_in)
                if i == n - 1:
                    grads = torch.autograd.grad(self.loss_fn(out, y), inputs)
                else:
                    grads = torch.autograd.grad(out, inputs, grad_outputs=grad_h)
            grad_h = grads[1] if len(grads) > 1 else None
            self._sync()
            self._span("compute", f"B{i}", "backward", t0)
            self._release(resident, i)
            self._step_layer(i, grads[0])
        self._flush()
        return float(loss)

    def _flush(self) -> None:
        """Wait for every write; with evict_files, push the files out of the page cache too, so that the
        next step reads them from the disk."""
        with self._lock:
            pending, self._pending_writes = dict(self._pending_writes), {}
        for handle in pending.values():
            handle.wait()
        if self.evict_files and self.directory is not None:
            for f in self.directory.iterdir():
                evict(f)

    # -- reading the model back --

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """name (prefix + the layer's parameter name) -> a CPU copy of the current parameter."""
        out = {}
        for i, bucket in enumerate(self.buckets):
            if self.param_tier == "nvme":
                flat = torch.empty(bucket.numel, dtype=bucket.dtype)
                self._read_file(self._path("param", i), flat).wait()
            else:
                flat = self._stored[i].cpu()
            out.update({n: v.clone() for n, v in zip(self.names[i], bucket.views(flat))})
        return out

    def tier_usage(self) -> dict[str, int]:
        """Bytes the model states occupy now on each tier: parameters stored, optimizer states, files."""
        out = {t: 0 for t in TIERS}
        for i, bucket in enumerate(self.buckets):
            nbytes = bucket.numel * bucket.dtype.itemsize
            if self.param_tier != "nvme":
                out[self.param_tier] += nbytes
            opt = self._optimizers[i]
            held = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
            out["gpu" if self.optimizer_tier == "gpu" else "cpu"] += sum(v.numel() * v.element_size() for v in held)
        if self.directory is not None:
            out["nvme"] = sum(f.stat().st_size for f in self.directory.iterdir())
        return out

    def close(self) -> None:
        """Finish pending I/O, stop the threads and delete the files."""
        self._flush()
        self._fetcher.shutdown(wait=True)
        self.io.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = [
    "AsyncIO", "GPUS", "IOHandle", "NODE_TIERS", "NVLINK_BANDWIDTH", "OffloadedModel", "PARTS", "TIERS", "Tier",
    "ait_activations", "ait_optimizer_states", "ait_params_grads", "effective_bandwidth", "efficiency", "evict",
    "fits", "lm_loss", "measure_bandwidth", "required_bandwidth", "tier_bandwidth", "tier_breakdown", "tier_bytes",
    "tinygpt_layers",
]
