"""Exercises of chapter 15-tensor-parallel (registered on import; graded by labkit.check).

    tensor-parallel.column_shard     fn(weight, rank, world_size) -> rank's shard of a column-parallel nn.Linear weight
    tensor-parallel.row_shard        fn(weight, rank, world_size) -> rank's shard of a row-parallel nn.Linear weight
    tensor-parallel.mlp_partials     fn(x, w_up, w_down, world_size) -> [each rank's partial output, before the sum]
    tensor-parallel.allreduce_bytes  fn(hidden, tp, bytes_per_elem) -> bytes a rank sends per token per layer (ring)
    tensor-parallel.ring_time        fn(nbytes, world_size, bandwidth, latency) -> seconds for a ring all-reduce

The references are labkit.parallel.tensor's own functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.exercises import Exercise, default_compare, register
from labkit.parallel import tensor as tp


def _divisible_shapes(rng, n: int):
    """(out, in, world_size) with the split dimension divisible, edge cases first."""
    yield 4, 4, 2  # square: slicing the wrong dimension keeps the shape
    yield 6, 3, 1  # one rank holds everything
    yield 8, 16, 8  # one row per rank (column-parallel)
    yield 16, 8, 8  # one column per rank (row-parallel)
    yield 12, 12, 4
    for _ in range(n):
        p = rng.choice([1, 2, 4, 8])
        yield p * rng.randint(1, 6), p * rng.randint(1, 6), p


def _weight_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for out, inp, p in _divisible_shapes(rng, 12):
        w = torch.randn(out, inp, generator=gen)
        for r in sorted({0, p // 2, p - 1}):  # the first, a middle and the last rank
            yield dict(weight=w, rank=r, world_size=p)


def _compare_shard(other_name: str, other):
    def compare(got, expected, case) -> str | None:
        msg = default_compare(got, expected, 0.0, 0.0)
        if msg is None:
            return None
        try:
            wrong = other(case["weight"], case["rank"], case["world_size"])
        except ValueError:
            wrong = None
        if isinstance(got, torch.Tensor) and wrong is not None and got.shape == wrong.shape and torch.equal(got, wrong):
            return f"{msg}: that is the {other_name} shard (nn.Linear's weight is (out_features, in_features))"
        return msg

    return compare


# --- tensor-parallel.column_shard ----------------------------------------------------------


def column_shard(weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Reference: rows rank*out/p .. (rank+1)*out/p of the (out, in) weight."""
    return tp.column_shard(weight, rank, world_size)


register(Exercise(
    name="tensor-parallel.column_shard",
    reference=column_shard,
    cases=_weight_cases,
    compare=_compare_shard("row-parallel", tp.row_shard),
    hint="A column-parallel layer splits the OUTPUT features (the columns of A = W^T in Y = X A). "
         "nn.Linear stores W as (out_features, in_features), so rank r takes a contiguous block of rows: "
         "weight[r * out // p : (r + 1) * out // p].",
))

# --- tensor-parallel.row_shard -------------------------------------------------------------


def row_shard(weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Reference: columns rank*in/p .. (rank+1)*in/p of the (out, in) weight."""
    return tp.row_shard(weight, rank, world_size)


register(Exercise(
    name="tensor-parallel.row_shard",
    reference=row_shard,
    cases=_weight_cases,
    compare=_compare_shard("column-parallel", tp.column_shard),
    hint="A row-parallel layer splits the INPUT features (the rows of A = W^T). In nn.Linear's "
         "(out_features, in_features) layout those are columns: weight[:, r * in // p : (r + 1) * in // p].",
))

# --- tensor-parallel.mlp_partials ----------------------------------------------------------


def mlp_partials(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Reference: rank r's gelu(x W_up,r^T) W_down,r^T with W_up,r a column shard and W_down,r a row shard."""
    return [F.linear(F.gelu(F.linear(x, tp.column_shard(w_up, r, world_size))), tp.row_shard(w_down, r, world_size))
            for r in range(world_size)]


def _mlp_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def case(tokens, d, hidden, p):
        return dict(x=torch.randn(tokens, d, generator=gen, dtype=torch.float64),
                    w_up=torch.randn(hidden, d, generator=gen, dtype=torch.float64) / d**0.5,
                    w_down=torch.randn(d, hidden, generator=gen, dtype=torch.float64) / hidden**0.5, world_size=p)

    yield case(1, 4, 8, 1)  # one rank: the dense MLP
    yield case(1, 4, 8, 2)  # a decode step: one token
    yield case(3, 4, 4, 4)  # square up-projection, one hidden unit per rank
    yield case(2, 6, 24, 8)
    for _ in range(10):
        p = rng.choice([1, 2, 4])
        yield case(rng.randint(1, 5), rng.randint(1, 8), p * rng.randint(1, 6), p)


def _compare_partials(got, expected, case) -> str | None:
    if not isinstance(got, (list, tuple)) or len(got) != len(expected):
        return f"expected a list of {len(expected)} tensors (one per rank), got {type(got).__name__}"
    msg = default_compare(list(got), expected, 1e-9, 1e-9)
    if msg is None:
        return None
    dense = F.linear(F.gelu(F.linear(case["x"], case["w_up"])), case["w_down"])
    if all(isinstance(g, torch.Tensor) for g in got) and torch.allclose(sum(got), dense, rtol=1e-9, atol=1e-9):
        return f"{msg}; your partials sum to the dense output, but not the way the ranks compute them"
    return msg + "; the partials must sum to the dense MLP's output"


register(Exercise(
    name="tensor-parallel.mlp_partials",
    reference=mlp_partials,
    cases=_mlp_cases,
    compare=_compare_partials,
    hint="Rank r: h_r = gelu(x @ W_up[r-th block of ROWS].T) is rank r's slice of the hidden units, and it is "
         "exactly the input slice W_down[:, r-th block of COLUMNS] needs: return h_r @ that_block.T for every r. "
         "Splitting the up-projection the other way would put gelu on a partial sum: gelu(a) + gelu(b) != gelu(a + b).",
))

# --- tensor-parallel.allreduce_bytes -------------------------------------------------------


def allreduce_bytes(hidden: int, tp_degree: int, bytes_per_elem: float) -> float:
    """Reference: 2 all-reduces x 2 (p-1)/p x hidden x bytes_per_elem."""
    return tp.allreduce_bytes_per_token(hidden, tp_degree, bytes_per_elem)


def _bytes_cases(rng):
    yield dict(hidden=4096, tp_degree=1, bytes_per_elem=2)  # no tensor parallelism: nothing to send
    yield dict(hidden=4096, tp_degree=2, bytes_per_elem=2)
    yield dict(hidden=8192, tp_degree=8, bytes_per_elem=2)  # Llama-70B-like, TP=8, bf16
    yield dict(hidden=5120, tp_degree=4, bytes_per_elem=1)  # fp8 all-reduce
    for _ in range(10):
        yield dict(hidden=rng.choice([1024, 2048, 4096, 5120, 8192, 12288, 16384]),
                   tp_degree=rng.choice([1, 2, 4, 8, 16, 32]), bytes_per_elem=rng.choice([1, 2, 4]))


register(Exercise(
    name="tensor-parallel.allreduce_bytes",
    reference=allreduce_bytes,
    cases=_bytes_cases,
    rtol=1e-12, atol=0.0,
    hint="Per token a layer all-reduces `hidden` elements twice in forward (after attention, after the MLP). "
         "A ring all-reduce is a reduce-scatter plus an all-gather: each rank sends (p-1)/p of the message in "
         "each, 2 (p-1)/p of it in all.",
))

# --- tensor-parallel.ring_time -------------------------------------------------------------


def ring_time(nbytes: float, world_size: int, bandwidth: float, latency: float) -> float:
    """Reference: 2 (p-1) latency + 2 (p-1)/p nbytes / bandwidth."""
    return tp.ring_allreduce_time(nbytes, world_size, bandwidth, latency)


def _time_cases(rng):
    yield dict(nbytes=16384, world_size=1, bandwidth=450e9, latency=1e-6)  # one rank: no communication
    yield dict(nbytes=16384, world_size=8, bandwidth=450e9, latency=1e-6)  # decode: latency-bound
    yield dict(nbytes=2**30, world_size=8, bandwidth=450e9, latency=1e-6)  # 1 GiB: bandwidth-bound
    yield dict(nbytes=0, world_size=4, bandwidth=25e9, latency=5e-6)  # an empty message still pays the steps
    yield dict(nbytes=2**20, world_size=2, bandwidth=25e9, latency=0.0)  # no latency
    for _ in range(10):
        yield dict(nbytes=float(2 ** rng.randint(8, 32)), world_size=rng.choice([1, 2, 4, 8, 16, 64]),
                   bandwidth=rng.choice([25e9, 50e9, 200e9, 450e9, 900e9]), latency=rng.choice([0.5e-6, 1e-6, 5e-6]))


register(Exercise(
    name="tensor-parallel.ring_time",
    reference=ring_time,
    cases=_time_cases,
    rtol=1e-9, atol=0.0,
    hint="A ring all-reduce takes 2 (p-1) steps (p-1 for the reduce-scatter, p-1 for the all-gather); each step "
         "pays the latency once and moves nbytes / p bytes over the link.",
))

__all__ = ["allreduce_bytes", "column_shard", "mlp_partials", "ring_time", "row_shard"]
