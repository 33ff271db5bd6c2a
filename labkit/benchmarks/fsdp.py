"""Benchmarks of chapter 13-fsdp: labkit's FSDP schedules side by side on real ranks, and FSDP2.

One launch of `world` ranks trains the same TinyGPT on the same batches with every configuration
(prefetch depth 0, 1, 2; CPU offload off and on; a quick run leaves out two offload ones), the
configurations taking turns step by step, then (not in a quick run) with PyTorch's FSDP2
(`fully_shard` per block and on the root). Rows describe rank 0, as medians over
the steps after the first:

- kind "schedule": one per configuration. median_ms is the step's wall time, baseline_ms the one of
  depth 0 without offload from the same launch, ratio = baseline / median (above 1: faster). From
  the recorded timeline: compute_ms, comm_ms (collectives in flight), hidden_ms (in flight while
  compute ran), exposed_ms (the compute thread blocked by communication), the same for the
  all-gathers alone (gather_ms, hidden_gather_ms, exposed_gather_ms); these are None under NCCL,
  where the recorder cannot see GPU completion times. peak_param_bytes is the engine's own count of
  parameter bytes on the device, predicted_bytes the closed form `peak_param_bytes`.
- kind "fsdp2" (full run only): FSDP2's step time against the same baseline.
"""

from __future__ import annotations

import statistics

from labkit import bench
from labkit.parallel import fsdp as fs
from labkit.parallel.launch import default_backend, launch

CONFIGS = [dict(depth=d, offload=o) for o in (False, True) for d in (0, 1, 2)]
QUICK_CONFIGS = [dict(depth=0), dict(depth=1), dict(depth=2), dict(depth=1, offload=True)]


def settings(quick: bool = False, backend: str | None = None) -> dict:
    """World size, backend (None: NCCL when every rank gets a GPU, else gloo), the model/data setup
    sized for it, the configurations, and whether to time FSDP2 too (not in a quick run: importing
    it costs the ranks seconds)."""
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    world = 2
    backend = backend or default_backend(world)
    return dict(world=world, backend=backend, setup=fs.sized_setup(world, 5 if quick else 12, backend),
                configs=QUICK_CONFIGS if quick else CONFIGS, fsdp2=not quick)


def config_name(depth: int, offload: bool) -> str:
    return f"depth {depth}" + (", offload" if offload else "")


def summarize(run: dict, skip: int = 1) -> dict:
    """Medians over the steps after the first `skip` of one fsdp_runs result (one rank)."""
    steps = run["steps"][skip:] or run["steps"]
    stats = [fs.timeline_stats(s["spans"])[run["rank"]] for s in steps if s["spans"]]
    out = dict(median_ms=statistics.median(run["times"][skip:] or run["times"]),
               peak_param_bytes=max(s["memory"]["param_peak"] for s in steps))
    for key in ("compute_ms", "comm_ms", "hidden_ms", "exposed_ms", "gather_ms", "hidden_gather_ms",
                "exposed_gather_ms", "copy_ms", "optimizer_ms"):
        out[key] = statistics.median(s[key] for s in stats) if stats else None
    return out


def measure(quick: bool = False, *, backend: str | None = None, deadline: float = 600.0) -> tuple[list[dict], list]:
    """All configurations and FSDP2 in one launch: (rows as described in the module docstring, every
    rank's raw result from `rank_runs`, with each step's recorded timeline under gloo)."""
    s = settings(quick, backend)
    world, setup, backend = s["world"], s["setup"], s["backend"]
    raw = launch(fs.rank_runs, world, args=(setup, s["configs"]),
                 kwargs=dict(fsdp2=s["fsdp2"], record=backend == "gloo", params=False),
                 backend=backend, deadline=deadline)
    out = raw[0]
    device = f"{bench.device_name('cuda' if backend == 'nccl' else 'cpu')} · {world} ranks ({backend})"
    model = f"TinyGPT L{setup.n_layer} d{setup.n_embd} T{setup.block_size} B{setup.batch}/rank"
    summaries = [summarize(r) for r in out["runs"]]
    base = summaries[0]["median_ms"]  # depth 0, no offload
    rows = []
    for r, m in zip(out["runs"], summaries):
        rows.append(dict(name=config_name(r["depth"], r["offload"]), kind="schedule", device=device, model=model,
                         depth=r["depth"], offload=r["offload"], **m, baseline_ms=base, ratio=base / m["median_ms"],
                         predicted_bytes=fs.peak_param_bytes(r["unit_numels"], world, r["depth"], r["offload"])))
    if out["fsdp2"] is not None:
        fsdp2_ms = statistics.median(out["fsdp2"]["times"][1:])
        rows.append(dict(name="FSDP2 (fully_shard)", kind="fsdp2", device=device, model=model, median_ms=fsdp2_ms,
                         baseline_ms=base, ratio=base / fsdp2_ms))
    return rows, raw


def run(quick: bool = False) -> list[dict]:
    """The chapter's benchmark rows (`labkit bench 13-fsdp`)."""
    return measure(quick)[0]


__all__ = ["CONFIGS", "QUICK_CONFIGS", "config_name", "measure", "run", "settings", "summarize"]
