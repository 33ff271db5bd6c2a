"""Timing and benchmark records.

`timeit` measures a callable the way GPU benchmarks must be measured: warm-up runs first
(compilation, autotuning, caches), then repeats timed with CUDA events on a GPU (the
kernel time, not the Python launch time) or `perf_counter` on a CPU, reporting the median.

`record(chapter, results)` writes `data/bench/<chapter>.json` with the device, library
versions and date, so a chapter opened on a laptop can show what an H100 measured
(`load(chapter)`), next to whatever the laptop measures live. Every result compares a
technique with its baseline measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from labkit import book, runtime


@dataclass
class Timing:
    """Seconds per call over `len(times)` timed repeats."""

    median_s: float
    min_s: float
    times: list[float]
    device: str

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


def _positive_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"timeit: {name} must be an int >= {minimum}, got {value!r}")
    return value


def timeit(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10,
           device: torch.device | str | None = None) -> Timing:
    """Median time of `fn()` after `warmup` untimed calls.

    On CUDA each repeat is bracketed by CUDA events and the device is synchronized, so the
    number is the GPU time of the work `fn` enqueued.
    """
    if not callable(fn):
        raise TypeError(f"timeit: fn must be callable, got {type(fn).__name__}")
    _positive_int("warmup", warmup, 0)
    _positive_int("repeats", repeats, 1)
    dev = torch.device(device) if device is not None else runtime.device()
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), times, device_name(dev))


def device_name(dev: torch.device | str | None = None) -> str:
    """A human name for the device: the GPU's model, or 'cpu: <processor>'."""
    dev = torch.device(dev) if dev is not None else runtime.device()
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} threads)"


def environment() -> dict:
    """Device, versions and date: the header of every benchmark record."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(),
        "profile": runtime.profile(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def bench_dir() -> Path:
    return runtime.data_dir() / "bench"


def _chapter_file(chapter: str, directory: Path | None) -> Path:
    if not isinstance(chapter, str) or not chapter or "/" in chapter:
        raise ValueError(f"bench: chapter must be a chapter id like '01-roofline', got {chapter!r}")
    return (directory or bench_dir()) / f"{chapter}.json"


def record(chapter: str, results: list[dict], *, directory: Path | None = None) -> Path:
    """Write `results` with the environment header to data/bench/<chapter>.json.

    A CPU run and a GPU run of the same chapter are kept side by side, keyed by profile,
    so recording on a laptop never erases what the GPU runner measured.
    """
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise TypeError("record: results must be a list of dicts")
    path = _chapter_file(chapter, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else {}
    meta = environment()
    existing[meta["profile"]] = {"meta": meta, "results": results}
    path.write_text(json.dumps(existing, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    if isinstance(x, Timing):
        return asdict(x)
    raise TypeError(f"record: cannot store a {type(x).__name__} in a benchmark record")


def load(chapter: str, profile: str = "gpu", *, directory: Path | None = None) -> dict | None:
    """The recorded run of `chapter` for `profile` ('gpu' or 'cpu'): {'meta':..., 'results':[...]}, or None."""
    if profile not in ("gpu", "cpu"):
        raise ValueError(f"load: profile must be 'gpu' or 'cpu', got {profile!r}")
    path = _chapter_file(chapter, directory)
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(profile)


def has_benchmarks(chapter: str) -> bool:
    """Whether `labkit/benchmarks/<module>.py` exists for the chapter."""
    return importlib.util.find_spec("labkit.benchmarks." + book.module_name(chapter)) is not None


def run_chapter(chapter: str, *, quick: bool = False, save: bool = True) -> list[dict]:
    """Run a chapter's benchmarks (`labkit.benchmarks.<slug>.run`) and record them."""
    module = importlib.import_module("labkit.benchmarks." + book.module_name(chapter))
    results = module.run(quick=quick)
    if save:
        record(chapter, results)
    return results


def summary(chapter: str, rec: dict | None) -> str:
    """One readable block per recorded run, for notebooks and the CLI."""
    if rec is None:
        return f"{chapter}: no record yet"
    meta = rec["meta"]
    lines = [f"{chapter} on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, {meta['date']})"]
    for r in rec["results"]:
        lines.append("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return "\n".join(lines)
