"""Crash testing checkpoint savers: kill a saving process after each of its I/O steps, then ask the
loader what survived.

A *scenario* saves `SAVES` small training-like states, state j as step 10·(j+1) with keep_last=2,
alternating `checkpoint.save` and `checkpoint.async_save(...).result()`. `sweep_all(savers, root)`
(`sweep(saver, root)` for one):

  1. launches `python -m labkit.train.crashtest --saver S1,S2 --root R` (subprocess, one interpreter
     start); for each saver, that process makes a dry run in a forked child, recording the label of
     every I/O step (`IOTrace(record=True)`), then forks one child per crash point k = 1 .. total + 1;
     child k runs the scenario with `IOTrace(crash_at=k)` and is killed with SIGKILL right after its
     k-th I/O step (k = total + 1 runs to the end);
  2. back in the caller, loads each crash directory with the saver's loader and classifies what
     came back: 'old' (the last state saved before the interrupted save, bit for bit; nothing at
     all if there was none), 'new' (the state being saved), 'none', 'wrong' (other contents), or
     'error: <exception>' (the loader raised).

The protocol of `labkit.train.checkpoint` must give 'old' for a crash before the manifest's
rename and 'new' from the rename on. `naive_save` is what the chapter compares it with: it moves
a `latest` pointer first, writes the file in place, then deletes the previous one, with no
fsync, no temporary name and no checksum.

Forking after `import torch` is safe here because the parent never starts a thread (the async
writer thread only exists in the children) and the states are too small for intra-op threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from labkit import _checks
from labkit.train import checkpoint as ck

SAVES = 4
KEEP_LAST = 2
SAVERS = ("protocol", "naive")
WRITE_CHUNK = 1024  # bytes between write points: shards of ~3 KB get a few, so torn files occur


# --- the naive saver (what not to do) ------------------------------------------------------------


def naive_save(state: dict, directory, step: int, *, io: ck.IOTrace | None = None) -> Path:
    """Point `latest` at the new step, torch.save in place, delete the previous file. Unsafe."""
    directory = Path(directory)
    io_trace = io or ck.default_trace()
    directory.mkdir(parents=True, exist_ok=True)
    pointer = directory / "latest"
    previous = pointer.read_text().strip() if pointer.exists() else None
    pointer.write_text(str(step))                      # moved before the data exists
    io_trace("write latest pointer")
    path = directory / f"ckpt-{step}.pt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        torch.save(state, ck._HashingFile(fd, "checkpoint file", io_trace))
    finally:
        os.close(fd)
    if previous is not None and previous != str(step):
        os.unlink(directory / f"ckpt-{previous}.pt")
        io_trace("unlink previous checkpoint")
    return path


def naive_load(directory) -> tuple[int, dict] | None:
    """Follow `latest` (None when there is no pointer); raises whatever torch.load raises."""
    pointer = Path(directory) / "latest"
    if not pointer.exists():
        return None
    step = int(pointer.read_text().strip())
    return step, torch.load(Path(directory) / f"ckpt-{step}.pt", weights_only=True)


LOADERS = {"protocol": ck.load_latest, "naive": naive_load}


# --- the scenario -------------------------------------------------------------------------------------


def scenario_step(j: int) -> int:
    return 10 * (j + 1)


def scenario_state(j: int) -> dict:
    """State j: a small model, an optimizer-like state and plain values, all distinct per j."""
    gen = torch.Generator().manual_seed(1000 + j)
    w = torch.randn(16, 16, generator=gen)                    # (16, 16)
    return {
        "model": {"w": w, "b": torch.arange(16, dtype=torch.float32) + j, "w_tied": w},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(16, 16, generator=gen), "step": torch.tensor(float(j))}},
                      "param_groups": [{"lr": 0.1 / (j + 1), "betas": (0.9, 0.999), "params": [0]}]},
        "meta": {"step": scenario_step(j), "note": f"state {j}", "rng": torch.randint(0, 255, (64,), generator=gen,
                                                                                      dtype=torch.uint8)},
    }


def run_scenario(saver: str, directory, io: ck.IOTrace | None = None, *, marks: list | None = None,
                 saves: int = SAVES) -> None:
    """Save states 0 .. saves-1 into `directory`; marks (if given) gets io.count before each save and at the end."""
    _checks.choice("run_scenario", "saver", saver, SAVERS)
    _checks.integer("run_scenario", "saves", saves, low=1)
    io_trace = io or ck.default_trace()
    for j in range(saves):
        if marks is not None:
            marks.append(io_trace.count)
        state, step = scenario_state(j), scenario_step(j)
        if saver == "naive":
            naive_save(state, directory, step, io=io_trace)
        elif j % 2 == 0:
            ck.save(state, directory, step, keep_last=KEEP_LAST, io=io_trace)
        else:
            ck.async_save(state, directory, step, keep_last=KEEP_LAST, io=io_trace).result()
    if marks is not None:
        marks.append(io_trace.count)


def same(a, b) -> bool:
    """Bitwise equality of nested dicts / lists / tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# --- the sweep: child processes, then classification ---------------------------------------------------


def _fork(fn) -> int:
    """Start fn() in a forked child; returns its pid. The child never returns."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    return pid


def _ending(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def _driver(savers: list[str], root: Path, write_chunk: int, points: list[int] | None, jobs: int,
            saves: int) -> None:
    """The subprocess, per saver: a dry run, then one forked, crashing child per point (`jobs` at a
    time: they mostly wait on fsync); writes root/<saver>/report.json."""
    torch.set_num_threads(1)
    for saver in savers:
        base = root / saver
        base.mkdir(parents=True, exist_ok=True)

        def dry_run():
            trace, marks = ck.IOTrace(record=True, write_chunk=write_chunk), []
            run_scenario(saver, base / "dry-run", trace, marks=marks, saves=saves)
            (base / "dry-run.json").write_text(json.dumps({"events": trace.events, "marks": marks}))

        status = os.waitpid(_fork(dry_run), 0)[1]
        if _ending(status) != "exit 0":
            raise RuntimeError(f"crashtest: the dry run of {saver!r} failed ({_ending(status)})")
        events = json.loads((base / "dry-run.json").read_text())["events"]
        todo = list(points or range(1, len(events) + 2))
        running: dict[int, int] = {}  # pid -> crash point
        report: dict[int, str] = {}
        while todo or running:
            while todo and len(running) < jobs:
                k = todo.pop(0)
                running[_fork(lambda: run_scenario(saver, base / f"crash-{k:03d}", ck.IOTrace(
                    crash_at=k, write_chunk=write_chunk), saves=saves))] = k
            pid, status = os.waitpid(-1, 0)
            report[running.pop(pid)] = _ending(status)
        (base / "report.json").write_text(json.dumps(report))


@dataclasses.dataclass
class CrashPoint:
    k: int             # the process was killed right after its k-th I/O step
    label: str         # what that step was ("" for k = total + 1: no crash)
    save: int          # index of the save in progress (= the number of saves when the scenario had finished)
    process: str       # 'killed' or how the child ended otherwise
    outcome: str       # 'old' | 'new' | 'none' | 'wrong' | 'error: ...'
    expected: str      # the protocol's promise: 'old' before the commit rename, 'new' from it on
                       # ('old or new' for a saver without a commit point)

    @property
    def ok(self) -> bool:
        return self.outcome in self.expected.split(" or ")


@dataclasses.dataclass
class SweepResult:
    saver: str
    root: Path           # crash-<k>/ holds what crash point k left behind
    events: list[str]    # the labels of the I/O steps of an uninterrupted run
    points: list[CrashPoint]

    @property
    def failures(self) -> list[CrashPoint]:
        return [p for p in self.points if not p.ok]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.points:
            key = p.outcome.split(":")[0]
            out[key] = out.get(key, 0) + 1
        return out


def classify(saver: str, directory, save: int, saves: int = SAVES) -> str:
    """What the saver's loader returns from `directory`, crashed during save index `save` of `saves`."""
    try:
        got = LOADERS[saver](directory)
    except Exception as e:
        return f"error: {type(e).__name__}"
    candidates = {"new": min(save, saves - 1), "old": save - 1 if save < saves else saves - 1}
    if got is None:
        return "old" if candidates["old"] < 0 else "none"
    step, state = got
    for name in ("new", "old"):
        j = candidates[name]
        if j >= 0 and step == scenario_step(j) and same(state, scenario_state(j)):
            return name
    return "wrong"


def sweep_all(savers, root, *, points: list[int] | None = None, saves: int = SAVES,
              write_chunk: int = WRITE_CHUNK, jobs: int = 4, timeout: float = 300.0) -> dict[str, SweepResult]:
    """Crash a scenario of `saves` saves at every I/O step (or at `points`), once per saver, in one
    driver process; classify what each loader finds. Returns saver -> SweepResult (files in root/<saver>)."""
    savers = list(savers) if isinstance(savers, (list, tuple)) else savers
    if not isinstance(savers, list) or not savers:
        raise TypeError(f"sweep: savers must be a non-empty list of {SAVERS}, got {savers!r}")
    for saver in savers:
        _checks.choice("sweep", "saver", saver, SAVERS)
    _checks.integer("sweep", "saves", saves, low=1)
    _checks.integer("sweep", "write_chunk", write_chunk, low=1)
    _checks.integer("sweep", "jobs", jobs, low=1)
    root = Path(root)
    cmd = [sys.executable, "-m", "labkit.train.crashtest", "--saver", ",".join(savers), "--root", str(root),
           "--write-chunk", str(write_chunk), "--jobs", str(jobs), "--saves", str(saves)]
    if points:
        cmd += ["--points", ",".join(str(_checks.integer("sweep", "points[i]", k, low=1)) for k in points)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}   # the scenario is CPU-only
    env.pop(ck.CRASH_ENV, None)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"crashtest driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {saver: _collect(saver, root / saver, saves) for saver in savers}


def sweep(saver: str, root, **kwargs) -> SweepResult:
    """sweep_all for one saver (its files go to root/<saver>)."""
    return sweep_all([saver], root, **kwargs)[saver]


def _collect(saver: str, base: Path, saves: int) -> SweepResult:
    dry = json.loads((base / "dry-run.json").read_text())
    events, marks = dry["events"], dry["marks"]
    commits = [next((i + 1 for i in range(marks[j], marks[j + 1]) if events[i].endswith("(commit)")), None)
               for j in range(saves)]
    report = json.loads((base / "report.json").read_text())
    out = []
    for key, process in sorted(report.items(), key=lambda kv: int(kv[0])):
        k = int(key)
        save = next((j for j in range(saves) if marks[j] < k <= marks[j + 1]), saves)
        if save == saves:
            expected = "new"
        elif commits[save] is None:   # a saver without a commit point: either state would do
            expected = "old or new"
        else:
            expected = "new" if k >= commits[save] else "old"
        outcome = classify(saver, base / f"crash-{k:03d}", save, saves)
        out.append(CrashPoint(k, events[k - 1] if k <= len(events) else "", save, process, outcome, expected))
    return SweepResult(saver, base, events, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saver", required=True, help=f"comma-separated, of {SAVERS}")
    parser.add_argument("--root", required=True)
    parser.add_argument("--write-chunk", type=int, default=WRITE_CHUNK)
    parser.add_argument("--points", default="", help="comma-separated crash points (default: all)")
    parser.add_argument("--jobs", type=int, default=4, help="children running at once")
    parser.add_argument("--saves", type=int, default=SAVES, help="saves in the scenario")
    args = parser.parse_args(argv)
    points = [int(p) for p in args.points.split(",") if p]
    savers = args.saver.split(",")
    if not set(savers) <= set(SAVERS):
        parser.error(f"--saver must name some of {SAVERS}, got {args.saver!r}")
    _driver(savers, Path(args.root), args.write_chunk, points or None, max(1, args.jobs), args.saves)


if __name__ == "__main__":
    main()


__all__ = ["CrashPoint", "SweepResult", "classify", "naive_load", "naive_save", "run_scenario", "same",
           "scenario_state", "scenario_step", "sweep", "sweep_all"]
