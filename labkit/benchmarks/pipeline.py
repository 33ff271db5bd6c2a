"""Benchmarks of chapter 14-pipeline: labkit's executor against torch.distributed.pipelining, on real ranks.

All rows come from one launch of `world_size` ranks (2 with quick=True, 4 otherwise):

1. kind "step": one pipelined training step (forward, backward, gradients of every stage) of the same
   stages and microbatches, per schedule, by labkit's `run_schedule` (median_ms) and by torch's
   ScheduleGPipe / Schedule1F1B / ScheduleInterleaved1F1B (baseline_ms); ratio = baseline / median
   (above 1: labkit's is faster). A step's time is its slowest rank's; the median runs over repeats.
   unsplit_ms is the whole model's forward + backward in one process on the CPU, for scale. peak_saved_mb is
   what autograd kept for backward on rank 0 at the peak (labkit's executor measures it).
2. kind "bubble": the same schedules with emulated device time (every forward padded to device_ms[0],
   every backward to device_ms[1], per microbatch through a rank's share of layers), so the ranks do
   not fight over CPU cores: the measured bubble fraction next to the simulator's.
"""

from __future__ import annotations

import statistics

from labkit import bench, runtime
from labkit.parallel import pipeline as pl
from labkit.parallel.launch import default_backend


def settings(quick: bool = False) -> dict:
    """Ranks, model, microbatches and emulated device time for the current size profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    world_size = 2 if quick else 4
    spec = runtime.pick(cpu=pl.ModelSpec(n_layers=8, width=32, n_head=2, seq_len=16, batch=16),
                        gpu=pl.ModelSpec(n_layers=8, width=256, n_head=4, seq_len=128, batch=32))
    return dict(world_size=world_size, spec=spec, microbatches=2 * world_size, virtual_stages=2,
                device_ms=(10.0, 20.0) if quick else (20.0, 40.0), repeats=3 if quick else 10)


def _jobs(s: dict) -> list[pl.Job]:
    jobs = []
    for kind in pl.KINDS:
        v = s["virtual_stages"] if kind == "interleaved-1f1b" else 1
        for engine in ("labkit", "torch"):  # one extra step each: torch infers shapes on its first
            jobs.append(pl.Job(kind, s["microbatches"], v, engine=engine, repeats=s["repeats"] + 1))
        jobs.append(pl.Job(kind, s["microbatches"], v, device_ms=s["device_ms"]))
    return jobs


def _step_ms(run: pl.PipelineRun) -> float:
    """Median over repeats (the first dropped) of the slowest rank's step time."""
    per_repeat = [max(times) for times in zip(*run.step_s)][1:]
    return 1e3 * statistics.median(per_repeat)


def run(quick: bool = False) -> list[dict]:
    """All of the chapter's benchmarks on the current device."""
    s = settings(quick)
    spec, p, m = s["spec"], s["world_size"], s["microbatches"]
    jobs = _jobs(s)
    runs = pl.run_jobs(jobs, p, spec, deadline=600.0)
    unsplit = bench.timeit(lambda: pl.reference_step(spec), warmup=1, repeats=s["repeats"], device="cpu")
    # the ranks compute on GPUs only when each rank has its own (NCCL); else on the CPU, GPU or not
    device = bench.device_name() if default_backend(p) == "nccl" else bench.device_name("cpu")
    rows = []
    for k in range(0, len(jobs), 3):
        mine, theirs, emulated = runs[k:k + 3]
        kind, v = mine.job.kind, mine.job.virtual_stages
        ms, base = _step_ms(mine), _step_ms(theirs)
        rows.append({"name": f"{kind} step", "kind": "step", "schedule": kind, "device": device, "world_size": p,
                     "microbatches": m, "virtual_stages": v, "median_ms": ms, "baseline_ms": base,
                     "ratio": base / ms, "unsplit_ms": unsplit.median_ms,
                     "peak_saved_mb": mine.peak_saved_bytes[0] / 2**20, "peak_inflight": mine.peak_inflight[0]})
        sim = pl.simulate(pl.schedule(kind, p, m, v), *s["device_ms"])
        rows.append({"name": f"{kind} bubble", "kind": "bubble", "schedule": kind, "device": device, "world_size": p,
                     "microbatches": m, "virtual_stages": v, "device_ms": list(s["device_ms"]),
                     "median_ms": emulated.makespan * 1e3, "baseline_ms": sim.makespan,
                     "ratio": sim.makespan / (emulated.makespan * 1e3),
                     "measured_bubble": emulated.bubble_fraction(), "predicted_bubble": sim.bubble_fraction})
    return rows


__all__ = ["run", "settings"]
