"""Exercises of chapter 13-fsdp (registered on import; graded by labkit.check).

    fsdp.shard              fn(flat, world_size, rank) -> rank's shard of a flat parameter, zero-padded
    fsdp.gathers_before     fn(n_units, depth, step) -> units whose all-gather is issued just before a compute step
    fsdp.peak_param_bytes   fn(unit_numels, world_size, depth, offload, bytes_per_param) -> peak parameter bytes
    fsdp.forward_time       fn(compute_ms, gather_ms, depth) -> when the forward pass ends, in ms
"""

from __future__ import annotations

import torch

from labkit.exercises import Exercise, register
from labkit.parallel import fsdp as fs

# --- fsdp.shard -----------------------------------------------------------------------------


def shard(flat: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Reference: S = ceil(numel / world_size) elements per rank; rank r holds flat[r S:(r+1) S],
    completed with zeros to S elements (the padding sits at the end of the flat vector)."""
    return fs.shard_flat(flat, world_size, rank)


def _shard_cases(rng):
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    v = lambda n: torch.randn(n, generator=g)  # noqa: E731
    yield dict(flat=v(12), world_size=4, rank=1)  # divides evenly: no padding
    yield dict(flat=v(10), world_size=4, rank=3)  # S = 3: the last rank holds 1 element + 2 zeros
    yield dict(flat=v(10), world_size=4, rank=0)
    yield dict(flat=v(3), world_size=8, rank=5)  # fewer elements than ranks: rank 5 holds only padding
    yield dict(flat=v(9), world_size=1, rank=0)  # one rank: the whole vector
    yield dict(flat=v(7), world_size=7, rank=6)
    for _ in range(12):
        W = rng.choice([2, 3, 4, 8, 16])
        yield dict(flat=v(rng.randint(1, 200)), world_size=W, rank=rng.randrange(W))


register(Exercise(
    name="fsdp.shard",
    reference=shard,
    cases=_shard_cases,
    rtol=0.0, atol=0.0,
    hint="S = ceil(numel / world_size) (e.g. -(-numel // world_size)); every rank gets exactly S elements. "
         "Take flat[rank * S:(rank + 1) * S] (it may be short, or empty) and append zeros up to S. "
         "torch.chunk does not do this: it can return fewer than world_size pieces.",
))

# --- fsdp.gathers_before --------------------------------------------------------------------


def gathers_before(n_units: int, depth: int, step: int) -> list[int]:
    """Reference: compute steps 0 .. n-1 run units 0 .. n-1 forward, steps n .. 2n-1 run units
    n-1 .. 0 backward. Before a step, every unit among the next depth + 1 of its pass (the step's own
    unit included) that was not gathered yet in this pass gets its all-gather issued, nearest first."""
    return fs.prefetch_plan(n_units, depth)[step]


def _plan_cases(rng):
    yield dict(n_units=6, depth=0, step=0)  # just in time: only unit 0
    yield dict(n_units=6, depth=1, step=0)  # the first step issues two
    yield dict(n_units=6, depth=1, step=3)  # steady state: unit 4 is prefetched
    yield dict(n_units=6, depth=1, step=5)  # the last forward step: nothing left to prefetch
    yield dict(n_units=6, depth=1, step=6)  # backward starts with the last unit again (it was freed)
    yield dict(n_units=6, depth=2, step=8)  # backward prefetches downwards: unit 1
    yield dict(n_units=6, depth=2, step=11)  # the last backward step
    yield dict(n_units=3, depth=5, step=0)  # depth beyond the model: everything at once
    yield dict(n_units=3, depth=5, step=1)
    yield dict(n_units=1, depth=0, step=1)  # one unit: forward step 0, backward step 1
    for _ in range(12):
        n = rng.randint(1, 12)
        yield dict(n_units=n, depth=rng.randint(0, 4), step=rng.randrange(2 * n))


register(Exercise(
    name="fsdp.gathers_before",
    reference=gathers_before,
    cases=_plan_cases,
    rtol=0.0, atol=0.0,
    hint="Replay the pass up to `step`, keeping a set of units already issued in this pass (the set starts "
         "empty again at step n: backward gathers every unit again). Forward step k wants units k .. "
         "min(k + depth, n - 1); the backward step for unit u wants u, u - 1, .., max(u - depth, 0).",
))

# --- fsdp.peak_param_bytes ------------------------------------------------------------------


def peak_param_bytes(unit_numels: list[int], world_size: int, depth: int, offload: bool,
                     bytes_per_param: int) -> int:
    """Reference: (its shards unless offloaded + the largest sum of depth + 1 consecutive gathered
    units) x bytes per parameter, every unit padded to a multiple of world_size."""
    return fs.peak_param_bytes(unit_numels, world_size, depth, offload, bytes_per_param)


def _peak_cases(rng):
    gpt = [1_605_632] + [7_085_568] * 12 + [1_606_400]  # a GPT-2-small-like model: embed, 12 blocks, head
    yield dict(unit_numels=gpt, world_size=8, depth=1, offload=False, bytes_per_param=2)
    yield dict(unit_numels=gpt, world_size=8, depth=1, offload=True, bytes_per_param=2)
    yield dict(unit_numels=[10, 10, 10], world_size=4, depth=0, offload=False, bytes_per_param=4)  # padding
    yield dict(unit_numels=[100, 5, 5, 100], world_size=2, depth=1, offload=False, bytes_per_param=4)
    yield dict(unit_numels=[5, 100, 100, 5], world_size=3, depth=1, offload=True, bytes_per_param=4)
    yield dict(unit_numels=[7, 9, 11], world_size=4, depth=10, offload=False, bytes_per_param=4)  # all at once
    yield dict(unit_numels=[7], world_size=16, depth=2, offload=False, bytes_per_param=4)  # one tiny unit
    for _ in range(12):
        n = rng.randint(1, 10)
        yield dict(unit_numels=[rng.randint(1, 10_000) for _ in range(n)], world_size=rng.choice([1, 2, 3, 4, 8, 64]),
                   depth=rng.randint(0, 4), offload=rng.random() < 0.4, bytes_per_param=rng.choice([2, 4]))


register(Exercise(
    name="fsdp.peak_param_bytes",
    reference=peak_param_bytes,
    cases=_peak_cases,
    rtol=0.0, atol=0.0,
    hint="Pad each unit: P = ceil(numel / W) * W. The rank always holds sum(P) / W shard elements (on the host "
         "instead with offload). While a unit computes, it and the next `depth` units of the pass are "
         "gathered (P elements each): take the largest sum over windows of depth + 1 consecutive units.",
))

# --- fsdp.forward_time ----------------------------------------------------------------------


def forward_time(compute_ms: list[float], gather_ms: list[float], depth: int) -> float:
    """Reference: the forward pass under labkit.parallel.fsdp.simulate_step's model, collective calls
    free: one compute lane; one link running the all-gathers one at a time, in issue order."""
    zeros = (0.0,) * len(compute_ms)
    cal = fs.Calibration(forward_ms=tuple(compute_ms), backward_ms=zeros, gather_ms=tuple(gather_ms), scatter_ms=zeros,
                         gather_issue_ms=zeros, scatter_issue_ms=zeros, h2d_ms=zeros, d2h_ms=zeros)
    return max(s["end"] for s in fs.simulate_step(cal, depth)["spans"] if s["kind"] == "forward")


def _forward_cases(rng):
    yield dict(compute_ms=[2.0, 2.0, 2.0, 2.0], gather_ms=[1.0, 1.0, 1.0, 1.0], depth=0)  # all serial: 12
    yield dict(compute_ms=[2.0, 2.0, 2.0, 2.0], gather_ms=[1.0, 1.0, 1.0, 1.0], depth=1)  # hidden but the first: 9
    yield dict(compute_ms=[1.0, 1.0, 1.0, 1.0], gather_ms=[3.0, 3.0, 3.0, 3.0], depth=1)  # link-bound: 13
    yield dict(compute_ms=[1.0, 1.0, 1.0, 1.0], gather_ms=[3.0, 3.0, 3.0, 3.0], depth=3)  # depth cannot help: 13
    yield dict(compute_ms=[1.0, 6.0, 1.0, 1.0], gather_ms=[1.0, 1.0, 4.0, 4.0], depth=1)  # uneven units
    yield dict(compute_ms=[1.0, 6.0, 1.0, 1.0], gather_ms=[1.0, 1.0, 4.0, 4.0], depth=2)  # deeper absorbs it
    yield dict(compute_ms=[5.0], gather_ms=[2.0], depth=3)
    yield dict(compute_ms=[1.0, 2.0, 3.0], gather_ms=[0.0, 0.0, 0.0], depth=1)
    for _ in range(12):
        n = rng.randint(1, 8)
        yield dict(compute_ms=[round(rng.uniform(0.1, 5.0), 3) for _ in range(n)],
                   gather_ms=[round(rng.uniform(0.0, 5.0), 3) for _ in range(n)], depth=rng.randint(0, 4))


register(Exercise(
    name="fsdp.forward_time",
    reference=forward_time,
    cases=_forward_cases,
    rtol=1e-9, atol=1e-9,
    hint="Keep two clocks: t (compute) and link_free. Before unit k, issue the gathers gathers_before(n, depth, k) "
         "would issue: each starts at max(t, link_free) and ends link_free = start + gather_ms[unit]. Then unit k "
         "starts at max(t, end of its gather) and t grows by compute_ms[k]. Return t after the last unit.",
))

__all__ = ["forward_time", "gathers_before", "peak_param_bytes", "shard"]
