"""Exercises of chapter 12-zero (registered on import; graded by labkit.check).

    zero.bytes_per_rank   fn(num_params, stage, world_size, optimizer) -> model-state bytes on one rank
                          (16-bit weights and gradients; K = 12 for Adam, 8 for SGD with momentum, 4 for SGD)
    zero.shard_range      fn(numel, world_size, rank) -> (start, end) of the real elements rank owns in a
                          flat buffer padded to a multiple of world_size
    zero.comm_volume      fn(num_params, stage, world_size) -> elements one rank sends per step with ring
                          collectives
    zero.offload_efficiency  fn(seq, bsz, bandwidth, peak_flops, kind) -> ZeRO-Infinity's efficiency when
                          the parameters ("params") or the optimizer states ("optimizer") stream at bandwidth
"""

from __future__ import annotations

import torch

from labkit.exercises import Exercise, register
from labkit.parallel import offload as off
from labkit.parallel import zero as z

OPTIMIZERS = ("adam", "sgd_momentum", "sgd")

# --- zero.bytes_per_rank ----------------------------------------------------------------


def bytes_per_rank(num_params: int, stage: int, world_size: int, optimizer: str) -> float:
    """Reference: memory_per_rank(...) in 16-bit precision, total bytes."""
    return z.memory_per_rank(num_params, stage, world_size, optimizer, torch.bfloat16).total


def _bytes_cases(rng):
    yield dict(num_params=7_500_000_000, stage=0, world_size=64, optimizer="adam")  # the paper: 120 GB
    yield dict(num_params=7_500_000_000, stage=1, world_size=64, optimizer="adam")  # 31.4 GB
    yield dict(num_params=7_500_000_000, stage=2, world_size=64, optimizer="adam")  # 16.6 GB
    yield dict(num_params=7_500_000_000, stage=3, world_size=64, optimizer="adam")  # 1.9 GB
    yield dict(num_params=1000, stage=3, world_size=1, optimizer="adam")  # one rank: nothing to share
    yield dict(num_params=0, stage=2, world_size=8, optimizer="sgd")
    yield dict(num_params=10**9, stage=1, world_size=8, optimizer="sgd_momentum")
    yield dict(num_params=10**9, stage=2, world_size=8, optimizer="sgd")
    for _ in range(12):
        yield dict(num_params=rng.randint(1, 10**12), stage=rng.randint(0, 3),
                   world_size=rng.choice([1, 2, 7, 64, 1024]), optimizer=rng.choice(OPTIMIZERS))


register(Exercise(
    name="zero.bytes_per_rank",
    reference=bytes_per_rank,
    cases=_bytes_cases,
    rtol=1e-9, atol=1e-6,
    hint="Per parameter: 2 bytes of weights, 2 of gradients, K of optimizer states (K = 12 for Adam: fp32 master "
         "copy + momentum + variance; 8 for SGD with momentum; 4 for plain SGD, the master copy alone). Stage 1 "
         "divides the K part by world_size, stage 2 also the gradients, stage 3 also the weights.",
))

# --- zero.shard_range -------------------------------------------------------------------


def shard_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """Reference: labkit.parallel.zero.shard_range."""
    return z.shard_range(numel, world_size, rank)


def _shard_cases(rng):
    yield dict(numel=12, world_size=4, rank=1)  # divides evenly: [3, 6)
    yield dict(numel=10, world_size=4, rank=3)  # padded to 12: slices of 3, the last holds 1 real element
    yield dict(numel=10, world_size=4, rank=0)
    yield dict(numel=5, world_size=8, rank=6)  # fewer elements than ranks: rank 6 owns nothing
    yield dict(numel=5, world_size=8, rank=4)
    yield dict(numel=0, world_size=3, rank=2)
    yield dict(numel=7, world_size=1, rank=0)  # one rank owns it all
    yield dict(numel=100, world_size=7, rank=6)  # 100 -> 105: slices of 15, the last [90, 100)
    for _ in range(12):
        n = rng.choice([2, 3, 4, 8, 16, 64, 1000])
        yield dict(numel=rng.randint(0, 10**6), world_size=n, rank=rng.randrange(n))


register(Exercise(
    name="zero.shard_range",
    reference=shard_range,
    cases=_shard_cases,
    rtol=0.0, atol=0.0,
    hint="Pad numel up to a multiple of world_size: S = ceil(numel / world_size) slots per rank; rank r's slice "
         "is [r S, (r+1) S), then cut both ends at numel (the padding is not real data). Return a tuple.",
))

# --- zero.comm_volume -------------------------------------------------------------------


def comm_volume(num_params: int, stage: int, world_size: int) -> float:
    """Reference: comm_volume with the ring's (N-1)/N."""
    return z.comm_volume(num_params, stage, world_size)


def _comm_cases(rng):
    for stage in range(4):
        yield dict(num_params=10**9, stage=stage, world_size=8)
    yield dict(num_params=10**9, stage=3, world_size=1)  # one rank sends nothing
    yield dict(num_params=10**9, stage=0, world_size=2)
    yield dict(num_params=0, stage=3, world_size=16)
    for _ in range(12):
        yield dict(num_params=rng.randint(1, 10**12), stage=rng.randint(0, 3), world_size=rng.randint(1, 4096))


register(Exercise(
    name="zero.comm_volume",
    reference=comm_volume,
    cases=_comm_cases,
    rtol=1e-9, atol=1e-6,
    hint="A ring reduce-scatter or all-gather of a Psi-element buffer sends (N-1)/N Psi from each rank; an "
         "all-reduce is the two in a row. Stages 0-2: one reduce-scatter (or all-reduce's half) of the gradients and "
         "one all-gather of the parameters. Stage 3: the parameters are gathered twice (forward and backward).",
))

# --- zero.offload_efficiency --------------------------------------------------------------


def offload_efficiency(seq: int, bsz: int, bandwidth: float, peak_flops: float, kind: str) -> float:
    """Reference: efficiency(ait, bandwidth, peak) with ait = seq bsz ("params") or seq bsz / 4 ("optimizer")."""
    ait = off.ait_params_grads(seq, bsz) if kind == "params" else off.ait_optimizer_states(seq, bsz)
    return off.efficiency(ait, bandwidth, peak_flops)


def _eff_cases(rng):
    yield dict(seq=1024, bsz=1, bandwidth=70e9, peak_flops=70e12, kind="params")  # the paper's V100: ~50%
    yield dict(seq=1024, bsz=1, bandwidth=70e9, peak_flops=70e12, kind="optimizer")  # 4x less intensity
    yield dict(seq=2048, bsz=8, bandwidth=7e9, peak_flops=989e12, kind="params")  # one NVMe drive, an H100
    yield dict(seq=1, bsz=1, bandwidth=0.0, peak_flops=1e12, kind="params")  # no bandwidth: no progress
    yield dict(seq=4096, bsz=64, bandwidth=3.35e12, peak_flops=989e12, kind="optimizer")  # HBM: ~1
    for _ in range(12):
        yield dict(seq=rng.choice([128, 512, 1024, 2048, 8192]), bsz=rng.randint(1, 64),
                   bandwidth=10 ** rng.uniform(8, 12.5), peak_flops=10 ** rng.uniform(13, 15.5),
                   kind=rng.choice(["params", "optimizer"]))


register(Exercise(
    name="zero.offload_efficiency",
    reference=offload_efficiency,
    cases=_eff_cases,
    rtol=1e-9, atol=1e-12,
    hint="efficiency = compute / (compute + transfer) = ait bw / (ait bw + peak). A step with activation "
         "checkpointing costs 2 x 4 x bsz x seq x params FLOPs; it moves 2 x 4 x params bytes of parameters and "
         "gradients (ait = seq bsz) or 2 x 16 x params bytes of optimizer states (ait = seq bsz / 4).",
))

__all__ = ["bytes_per_rank", "comm_volume", "offload_efficiency", "shard_range"]
