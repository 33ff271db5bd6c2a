"""Exercises of chapter 01-roofline (registered on import; graded by labkit.check).

    roofline.gemm_flops            fn(M, N, K, bytes_per_elem) -> (flops, bytes)
    roofline.attainable            fn(device, intensity, dtype) -> attainable FLOP/s
    roofline.decode_critical_batch fn(weights, peak_flops, bandwidth, bytes_per_elem) -> smallest batch
"""

from __future__ import annotations

import math

from labkit.exercises import Exercise, register
from labkit.perf import roofline as rl

# --- roofline.gemm_flops ----------------------------------------------------------------


def gemm_flops(M: int, N: int, K: int, bytes_per_elem: float) -> tuple[float, float]:
    """Reference: FLOPs and minimum bytes of C (M, N) = A (M, K) @ B (K, N)."""
    op = rl.gemm(M, N, K, dtype=bytes_per_elem)
    return op.flops, op.bytes


def _gemm_cases(rng):
    yield dict(M=1, N=1, K=1, bytes_per_elem=4)
    yield dict(M=1, N=4096, K=4096, bytes_per_elem=2)  # a decode GEMV
    yield dict(M=64, N=1, K=7, bytes_per_elem=2)  # non-square, N = 1
    yield dict(M=3, N=5, K=1, bytes_per_elem=1)  # an outer product (K = 1)
    yield dict(M=8192, N=8192, K=8192, bytes_per_elem=2)
    for _ in range(20):
        yield dict(M=rng.randint(1, 8192), N=rng.randint(1, 8192), K=rng.randint(1, 8192),
                   bytes_per_elem=rng.choice([1, 2, 4]))


register(Exercise(
    name="roofline.gemm_flops",
    reference=gemm_flops,
    cases=_gemm_cases,
    rtol=1e-9, atol=0.0,
    hint="A multiply and an add per (m, n, k) triple; the bytes read A and B once and write C once.",
))

# --- roofline.attainable ----------------------------------------------------------------


def attainable(device: rl.Device, intensity: float, dtype: str) -> float:
    """Reference: min(peak FLOP/s for dtype, bandwidth * intensity)."""
    return rl.attainable(device, intensity, dtype)


def _attainable_cases(rng):
    h100, a100 = rl.H100_SXM, rl.A100_SXM_80GB
    yield dict(device=h100, intensity=0.0, dtype="bf16")
    yield dict(device=h100, intensity=1.0, dtype="bf16")  # a bf16 decode GEMV
    yield dict(device=h100, intensity=h100.ridge("bf16"), dtype="bf16")  # exactly on the ridge
    yield dict(device=h100, intensity=1e6, dtype="bf16")
    yield dict(device=h100, intensity=50.0, dtype="fp32")  # fp32 ridge is only ~20
    yield dict(device=a100, intensity=200.0, dtype="bf16")  # past the A100's ridge (~153), not the H100's
    for i in range(16):
        name, peak = rng.choice([("bf16", 1e12 * rng.uniform(10, 2000)), ("fp32", 1e12 * rng.uniform(1, 100))])
        dev = rl.Device(f"random chip {i}", {name: peak}, 1e12 * rng.uniform(0.1, 8))
        yield dict(device=dev, intensity=10 ** rng.uniform(-2, 4), dtype=name)


register(Exercise(
    name="roofline.attainable",
    reference=attainable,
    cases=_attainable_cases,
    rtol=1e-9, atol=0.0,
    hint="Two ceilings: the compute roof device.peak(dtype), and the memory roof device.bandwidth * intensity.",
))

# --- roofline.decode_critical_batch -----------------------------------------------------


def decode_critical_batch(weights: list[tuple[int, int]], peak_flops: float, bandwidth: float,
                          bytes_per_elem: float) -> float:
    """Reference: the smallest decode batch B at which every weight GEMM (B, K) @ (K, N) in
    `weights` (a list of (K, N)) reaches the ridge peak_flops / bandwidth; math.inf if some never does."""
    ridge = peak_flops / bandwidth
    return max(rl.gemm_critical_batch(N, K, ridge, dtype=bytes_per_elem) for K, N in weights)


def _layer(h: int, f: int | None = None) -> list[tuple[int, int]]:
    """QKV, out, MLP up, MLP down of a multi-head layer as (K, N)."""
    return list(rl.decoder_weight_shapes(h, ffn_hidden=f).values())


def _critical_cases(rng):
    h100 = rl.H100_SXM
    yield dict(weights=_layer(4096), peak_flops=h100.peak("bf16"), bandwidth=h100.bandwidth, bytes_per_elem=2)
    yield dict(weights=_layer(8192), peak_flops=h100.peak("fp8"), bandwidth=h100.bandwidth, bytes_per_elem=1)
    yield dict(weights=[(4096, 4096)], peak_flops=h100.peak("fp32"), bandwidth=h100.bandwidth, bytes_per_elem=4)
    yield dict(weights=[(1, 1)], peak_flops=1e12, bandwidth=1e12, bytes_per_elem=2)  # never compute-bound
    yield dict(weights=_layer(256), peak_flops=h100.peak("bf16"), bandwidth=h100.bandwidth, bytes_per_elem=2)
    yield dict(weights=[(64, 64)], peak_flops=1e12, bandwidth=1e12, bytes_per_elem=1)  # ridge 1: batch 1
    for _ in range(16):
        h = rng.choice([512, 1024, 2048, 4096, 5120, 8192])
        w = _layer(h, rng.choice([None, 3 * h, int(8 / 3 * h) // 64 * 64]))
        yield dict(weights=rng.sample(w, rng.randint(1, 4)), peak_flops=1e12 * rng.uniform(20, 2000),
                   bandwidth=1e12 * rng.uniform(0.5, 8), bytes_per_elem=rng.choice([1, 2, 4]))


def _compare_batch(got, expected, case) -> str | None:
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"expected a number (an int batch, or math.inf), got {type(got).__name__}"
    if math.isinf(expected):
        return None if got == math.inf else f"{got} != expected math.inf (this layer never becomes compute-bound)"
    return None if got == expected else f"{got} != expected {expected}"


register(Exercise(
    name="roofline.decode_critical_batch",
    reference=decode_critical_batch,
    cases=_critical_cases,
    compare=_compare_batch,
    hint="For each (K, N): intensity(B) = 2BNK / (s(BK + KN + BN)); solve intensity(B) >= ridge for the "
         "smallest integer B (math.inf when 2NK <= ridge*s*(N+K)), then take the largest over the weights.",
))

__all__ = ["attainable", "decode_critical_batch", "gemm_flops"]
