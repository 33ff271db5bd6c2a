"""Run a function on N local ranks of a real torch.distributed process group.

`launch(fn, world_size)` starts one Python process per rank (subprocesses, not
`torch.multiprocessing.spawn`: spawn breaks in a process where Triton's interpreter ran), joins
them into one process group (gloo on CPU, NCCL when every rank gets its own GPU), calls
`fn(*args, **kwargs)` on every rank and returns the per-rank results, rank 0 first.

Failures never hang the caller:
- every collective has the process group's `timeout` (a rank that skips a collective makes the
  others raise after `timeout` seconds);
- the whole launch has a `deadline`; ranks still running then are killed;
- as soon as one rank fails the others get `grace` seconds to report, then are killed;
- the error names the rank that failed first (the cause) with its traceback, and what the other
  ranks did.

`fn` must be importable by name (a function defined at module level, not in a notebook cell):
the ranks are fresh interpreters that import it.

Several machines: the same functions run under torchrun, e.g.
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 \
        -m labkit.parallel.launch labkit.parallel.zero:some_function
where the process group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
"""

from __future__ import annotations

import datetime
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from labkit import _checks

BACKENDS = ("gloo", "nccl")


class RankError(RuntimeError):
    """A rank raised, crashed or timed out. `.rank` is the rank that failed first; `.failures` maps
    each failed rank to its message."""

    def __init__(self, message: str, rank: int, failures: dict[int, str]):
        super().__init__(message)
        self.rank = rank
        self.failures = failures


# --- inside a rank -----------------------------------------------------------------------


def rank() -> int:
    """This process's rank in the default group (0 when no group exists)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The default group's size (1 when no group exists)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_device() -> torch.device:
    """The device this rank computes on: its own GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout: float = 60.0) -> None:
    """Join the process group described by the environment (set by `launch` or by torchrun)."""
    if dist.is_initialized():
        return
    backend = backend or default_backend(int(os.environ["WORLD_SIZE"]))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


def default_backend(world_size: int) -> str:
    """NCCL when CUDA is wanted and there is a GPU per rank, else gloo."""
    from labkit.runtime import on_gpu

    return "nccl" if on_gpu() and torch.cuda.device_count() >= world_size else "gloo"


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _rank_main(workdir: str | Path) -> None:
    """Entry point of one rank started by `launch`: run the payload, write ("ok", value) or ("error", ...)."""
    r = int(os.environ["RANK"])
    workdir = Path(workdir)
    spec = pickle.loads((workdir / "payload.pkl").read_bytes())
    out = workdir / f"rank{r}.pkl"
    try:
        init_from_env(spec["backend"], spec["timeout"])
        value = _resolve(spec["target"])(*spec["args"], **spec["kwargs"])
        record = ("ok", value, time.time())
    except BaseException as exc:  # noqa: BLE001 - everything a rank does wrong is reported
        record = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", time.time())
    try:
        blob = pickle.dumps(record)
    except Exception as exc:  # an unpicklable result is the function's error, not the launcher's
        blob = pickle.dumps(("error", f"result of rank {r} cannot be pickled: {exc}", time.time()))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out)
    if record[0] == "ok" and dist.is_initialized():
        dist.destroy_process_group()
    # A failed rank exits at once: destroying a group whose peers are stuck would block.
    sys.stdout.flush()
    os._exit(0 if record[0] == "ok" else 1)


# --- the caller's side -------------------------------------------------------------------


def _target_name(fn) -> str:
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"launch: fn as a string must be 'module:function', got {fn!r}")
        return fn
    if not callable(fn):
        raise TypeError(f"launch: fn must be a function or 'module:function', got {type(fn).__name__}")
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"launch: fn must be importable by the ranks (defined at module level in a module), "
            f"got {module}.{qualname}; move it into a .py file or a labkit module")
    return f"{module}:{qualname}"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])


def launch(fn: Callable | str, world_size: int = 2, *, args: tuple = (), kwargs: dict | None = None,
           backend: str | None = None, timeout: float = 60.0, deadline: float = 300.0, grace: float = 5.0,
           env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` local ranks; returns [result of rank 0, rank 1, ...].

    timeout   seconds a collective may wait before raising on its rank (the process group's timeout)
    deadline  seconds the whole launch may take, start-up included
    grace     seconds the other ranks get to report after the first one failed
    env       extra environment variables for the ranks (OMP_NUM_THREADS defaults to 1)
    Raises RankError naming the rank that failed first.
    """
    target = _target_name(fn)
    world_size = _checks.integer("launch", "world_size", world_size, low=1)
    timeout = _checks.number("launch", "timeout", timeout, low=0.0, low_open=True)
    deadline = _checks.number("launch", "deadline", deadline, low=0.0, low_open=True)
    grace = _checks.number("launch", "grace", grace, low=0.0)
    backend = _checks.choice("launch", "backend", backend or default_backend(world_size), BACKENDS)
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"launch: backend 'nccl' needs one GPU per rank: world_size={world_size}, "
                         f"GPUs={torch.cuda.device_count()}")

    with tempfile.TemporaryDirectory(prefix="labkit-launch-") as tmp:
        workdir = Path(tmp)
        spec = dict(target=target, args=tuple(args), kwargs=dict(kwargs or {}), backend=backend, timeout=timeout)
        (workdir / "payload.pkl").write_bytes(pickle.dumps(spec))
        base = dict(os.environ)
        base.setdefault("OMP_NUM_THREADS", "1")
        # The ranks import what the caller can import (a test module, a chapter's helper file).
        base["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [base.get("PYTHONPATH", "")])
        base.update(env or {})
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world_size),
                    LOCAL_WORLD_SIZE=str(world_size), TORCH_SHOW_CPP_STACKTRACES="0")
        procs = []
        for r in range(world_size):
            rank_env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
            log = open(workdir / f"rank{r}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-c", f"from labkit.parallel.launch import _rank_main; _rank_main({str(workdir)!r})"],
                env=rank_env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        return _collect(procs, workdir, deadline, grace)


def _collect(procs: list[subprocess.Popen], workdir: Path, deadline: float, grace: float) -> list[Any]:
    start = time.monotonic()
    first_failure = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        now = time.monotonic()
        if first_failure is None and any(c not in (None, 0) for c in codes):
            first_failure = now
        if now - start > deadline or (first_failure is not None and now - first_failure > grace):
            break
        time.sleep(0.02)
    killed = []
    for r, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            p.wait()
            killed.append(r)

    results, failures, when = [], {}, {}
    for r, p in enumerate(procs):
        path = workdir / f"rank{r}.pkl"
        if path.exists():
            status, value, t = pickle.loads(path.read_bytes())
            if status == "ok":
                results.append(value)
                continue
            failures[r], when[r] = value.strip(), t
        elif r in killed:
            why = "past the deadline" if first_failure is None else "after another rank failed"
            failures[r], when[r] = f"killed {why} (still running)", float("inf")
        else:
            failures[r], when[r] = f"exited with code {p.returncode} without a result\n{_tail(workdir / f'rank{r}.log')}", 0.0
        results.append(None)
    if not failures:
        return results
    cause = min(failures, key=lambda r: (when[r], r))
    if first_failure is None and killed:
        headline = f"launch: deadline of {deadline:g} s passed; ranks {killed} were still running"
    else:
        headline = f"launch: rank {cause} failed first"
    lines = [headline, f"--- rank {cause} ---", failures[cause]]
    for r in sorted(failures):
        if r != cause:
            lines.append(f"--- rank {r}: {failures[r].splitlines()[0]}")
    finished = [r for r in range(len(procs)) if r not in failures]
    if finished:
        lines.append(f"ranks {finished} finished without error")
    raise RankError("\n".join(lines), cause, failures)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    """`python -m labkit.parallel.launch module:function` under torchrun: join the group, call it."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: torchrun ... -m labkit.parallel.launch module:function")
    init_from_env()
    result = _resolve(_target_name(argv[0]))()
    if rank() == 0 and result is not None:
        print(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
