"""Tests of labkit.perf.roofline (chapter 01-roofline), its figures and its benchmarks."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from labkit.perf import roofline as rl

H100, A100 = rl.H100_SXM, rl.A100_SXM_80GB
dims = st.integers(min_value=1, max_value=4096)
sizes = st.sampled_from([1, 2, 4])


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


# --- formulas against hand-computed values ------------------------------------------------


def test_dtype_sizes_and_names():
    assert rl.bytes_per_element(torch.bfloat16) == 2
    assert rl.bytes_per_element(torch.float32) == 4
    assert rl.bytes_per_element("tf32") == 4
    assert rl.bytes_per_element(torch.float8_e4m3fn) == 1
    assert rl.bytes_per_element(0.5) == 0.5  # 4-bit weights
    assert rl.dtype_name("bfloat16") == rl.dtype_name(torch.bfloat16) == "bf16"
    assert rl.dtype_name("torch.float16") == "fp16"


def test_gemm_by_hand():
    op = rl.gemm(2, 3, 4, dtype=torch.float32)  # A (2, 4) @ B (4, 3)
    assert op.flops == 2 * 2 * 3 * 4 == 48
    assert op.bytes == (2 * 4 + 4 * 3 + 2 * 3) * 4 == 104
    assert op.intensity == pytest.approx(48 / 104)
    batched = rl.gemm(2, 3, 4, batch=5, dtype=torch.float32)
    assert (batched.flops, batched.bytes) == (5 * 48, 5 * 104)
    # square n^3 GEMM in bf16: 2n^3 / (3 n^2 * 2) = n / 3 FLOP/byte
    assert rl.gemm(4096, 4096, 4096).intensity == pytest.approx(4096 / 3)


def test_gemv_is_about_one_flop_per_byte_in_bf16():
    op = rl.gemv(4096, 4096, batch=1, dtype=torch.bfloat16)
    assert op.flops == 2 * 4096 * 4096
    assert op.bytes == (4096 * 4096 + 4096 + 4096) * 2
    assert 0.99 < op.intensity < 1.0
    # batching the decode reuses the weight: intensity ~ batch in bf16
    assert rl.gemv(4096, 4096, batch=64).intensity == pytest.approx(64, rel=0.04)


def test_elementwise_softmax_norm_by_hand():
    add = rl.elementwise(10, dtype=torch.float32)  # c = a + b: read 2, write 1
    assert (add.flops, add.bytes) == (10, 3 * 10 * 4)
    assert add.intensity * 4 == pytest.approx(1 / 3)  # 1 FLOP per 3 elements moved
    sm = rl.softmax(4, 8, dtype=torch.bfloat16)
    assert (sm.flops, sm.bytes) == (5 * 32, 2 * 32 * 2)
    rms = rl.norm(4, 8, kind="rms", dtype=torch.float32)
    assert (rms.flops, rms.bytes) == (4 * 32, (2 * 32 + 8) * 4)
    ln = rl.norm(4, 8, kind="layer", dtype=torch.float32)
    assert (ln.flops, ln.bytes) == (7 * 32, (2 * 32 + 2 * 8) * 4)


def test_attention_naive_vs_fused_by_hand():
    B, H, T, D = 1, 2, 4, 8
    naive = rl.attention(B, H, T, D, fused=False, dtype=torch.float16)
    fused = rl.attention(B, H, T, D, fused=True, dtype=torch.float16)
    flops = 4 * B * H * T * T * D + 5 * B * H * T * T
    assert naive.flops == fused.flops == flops
    assert fused.bytes == 4 * B * H * T * D * 2  # Q, K, V read, O written
    assert naive.bytes == fused.bytes + 4 * B * H * T * T * 2  # S and P written and read back
    big_naive = rl.attention(8, 32, 4096, 128, fused=False)
    big_fused = rl.attention(8, 32, 4096, 128, fused=True)
    assert big_naive.intensity < H100.ridge("bf16") < big_fused.intensity


def test_decode_attention_by_hand():
    op = rl.decode_attention(2, 4, 16, 8, kv_heads=2, dtype=torch.bfloat16)
    assert op.flops == 4 * 2 * 4 * 16 * 8 + 5 * 2 * 4 * 16
    assert op.bytes == (2 * 2 * 4 * 8 + 2 * 2 * 2 * 16 * 8) * 2
    # MHA in bf16: ~1 FLOP/byte whatever the batch (every sequence reads its own cache)
    a, b = rl.decode_attention(1, 32, 4096, 128), rl.decode_attention(256, 32, 4096, 128)
    assert a.intensity == pytest.approx(b.intensity)
    assert 0.9 < a.intensity < 1.1


def test_device_presets_and_roofline_by_hand():
    assert H100.peak(torch.bfloat16) == 989e12 and H100.bandwidth == 3.35e12
    assert H100.peak("fp32") == 67e12 and H100.peak("tf32") == 494e12
    assert A100.peak("bf16") == 312e12 and A100.bandwidth == 2.039e12
    assert rl.ridge_point(H100, "bf16") == pytest.approx(295.2, abs=0.1)
    assert rl.ridge_point(A100, "bf16") == pytest.approx(153.0, abs=0.1)
    assert rl.attainable(H100, 1.0, "bf16") == 3.35e12
    assert rl.attainable(H100, 1000.0, "bf16") == 989e12
    assert rl.attainable(H100, 0.0) == 0.0
    op = rl.gemm(8192, 8192, 8192)
    assert not rl.is_memory_bound(H100, op) and rl.is_memory_bound(H100, rl.gemv(8192, 8192))
    assert rl.roofline_time(H100, op) == pytest.approx(op.flops / 989e12)


def test_decode_critical_batch_by_hand():
    R, s = H100.ridge("bf16"), 2
    crit = rl.decode_critical_batch(H100, 4096)
    assert crit == rl.gemm_critical_batch(4096, 4096, R)  # the out projection is the smallest matrix
    # closed form M* = R s N K / (2 N K - R s (N + K))
    m_star = R * s * 4096**2 / (2 * 4096**2 - R * s * 2 * 4096)
    assert crit == math.ceil(m_star) == 345
    assert rl.gemm(crit, 4096, 4096).intensity >= R > rl.gemm(crit - 1, 4096, 4096).intensity
    assert rl.gemm_critical_batch(1, 1, R) == math.inf  # a 1x1 "weight" can never reach the ridge


def test_training_vs_decode_by_hand():
    assert rl.training_flops(7e9, 2e12) == 6 * 7e9 * 2e12
    train = rl.training_step_op(7e9, 4 * 2**20)
    assert train.intensity == pytest.approx(2 * 4 * 2**20 / 2)  # 6 N D / (3 N s)
    assert rl.kv_cache_bytes_per_token(32, 4096) == 2 * 32 * 4096 * 2
    dec = rl.decode_step_op(7e9, batch=1, kv_len=1, n_layers=32, d_model=4096)
    assert dec.flops == 2 * 7e9 + 4 * 32 * 4096
    assert dec.bytes == 7e9 * 2 + 2 * 32 * 4096 * 2
    assert dec.intensity < 1.01 < H100.ridge("bf16") < train.intensity


def test_decoder_layer_ops_sides_of_the_ridge():
    decode = rl.decoder_layer_ops(1, 4096, 4096, phase="decode")
    assert all(rl.is_memory_bound(H100, op) for op in decode)
    prefill = {op.name: op for op in rl.decoder_layer_ops(8, 2048, 4096, phase="prefill")}
    for name in ("QKV proj", "out proj", "MLP up", "MLP down", "attention"):
        assert not rl.is_memory_bound(H100, prefill[name]), name
    for name in ("rmsnorm", "residual add", "GELU"):
        assert rl.is_memory_bound(H100, prefill[name]), name
    gqa = {op.name: op for op in rl.decoder_layer_ops(1, 4096, 4096, kv_heads=8, phase="decode")}
    mha = {op.name: op for op in decode}
    assert gqa["attention (KV cache)"].bytes < mha["attention (KV cache)"].bytes
    assert gqa["QKV proj"].flops < mha["QKV proj"].flops


def test_decoder_weight_shapes_by_hand():
    assert rl.decoder_weight_shapes(64) == {"QKV proj": (64, 192), "out proj": (64, 64), "MLP up": (64, 256),
                                            "MLP down": (256, 64)}
    gqa = rl.decoder_weight_shapes(64, ffn_hidden=96, kv_dim=16)
    assert gqa == {"QKV proj": (64, 96), "out proj": (64, 64), "MLP up": (64, 96), "MLP down": (96, 64)}
    # decoder_layer_ops runs each weight as a (tokens, K) @ (K, N) GEMM
    ops = {op.name: op for op in rl.decoder_layer_ops(2, 8, 256, heads=4, kv_heads=2, ffn_hidden=512, dtype=4)}
    for name, (K, N) in rl.decoder_weight_shapes(256, ffn_hidden=512, kv_dim=2 * 64).items():
        assert ops[name] == rl.gemm(2 * 8, N, K, dtype=4, name=name)
    with pytest.raises(ValueError, match="decoder_weight_shapes: kv_dim must be an int >= 1, got 0"):
        rl.decoder_weight_shapes(64, kv_dim=0)


def test_op_addition():
    a, b = rl.gemm(4, 4, 4, dtype=4), rl.elementwise(16, dtype=4)
    c = a + b
    assert (c.flops, c.bytes) == (a.flops + b.flops, a.bytes + b.bytes)
    assert b.intensity < c.intensity < a.intensity


# --- FLOP counts against torch.utils.flop_counter ----------------------------------------


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 5, 7), (16, 1, 64), (33, 17, 9)])
def test_gemm_flops_match_flop_counter(M, N, K):
    a, b, c = torch.randn(M, K), torch.randn(K, N), torch.randn(M, N)  # (M,K) (K,N) (M,N)
    expected = rl.gemm(M, N, K).flops
    assert counted(lambda: a @ b) == expected
    assert counted(lambda: torch.addmm(c, a, b)) == expected
    assert counted(lambda: F.linear(a, b.T)) == expected
    assert counted(lambda: torch.bmm(a.expand(3, M, K), b.expand(3, K, N))) == rl.gemm(M, N, K, batch=3).flops
    assert counted(lambda: a[:1] @ b) == rl.gemv(N, K).flops


@pytest.mark.parametrize("B,H,T,D", [(1, 1, 4, 8), (2, 3, 16, 8), (1, 4, 33, 16)])
def test_attention_matmul_flops_match_flop_counter(B, H, T, D):
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))  # (B, H, T, D)
    op = rl.attention(B, H, T, D, fused=False)
    matmul_flops = op.flops - rl.softmax(B * H * T, T).flops  # the counter skips the softmax

    def naive():
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1) @ v

    assert counted(naive) == matmul_flops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        assert counted(lambda: F.scaled_dot_product_attention(q, k, v)) == matmul_flops
    # the fused kernel's own FLOP formula (meta tensors: nothing runs)
    qm, km, vm = (t.to("meta") for t in (q, k, v))
    assert counted(lambda: torch.ops.aten._scaled_dot_product_efficient_attention(qm, km, vm, None, False)) \
        == matmul_flops


def test_decode_attention_flops_match_flop_counter():
    B, H, L, D = 3, 4, 20, 8
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    op = rl.decode_attention(B, H, L, D)
    got = counted(lambda: torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)
    assert got == op.flops - rl.softmax(B * H, L).flops


# --- properties ------------------------------------------------------------------------


@given(M=dims, N=dims, K=dims, s=sizes)
def test_gemm_intensity_grows_with_every_dimension(M, N, K, s):
    base = rl.gemm(M, N, K, dtype=s).intensity
    assert rl.gemm(M + 1, N, K, dtype=s).intensity > base
    assert rl.gemm(M, N + 1, K, dtype=s).intensity > base
    assert rl.gemm(M, N, K + 1, dtype=s).intensity > base
    assert base < 2 / (s * (1 / N + 1 / K))  # bounded by the M -> infinity limit


@given(n=st.integers(1, 2048), m=st.integers(1, 2048))
def test_square_gemm_intensity_monotone_in_size(n, m):
    lo, hi = sorted((n, m))
    assert rl.gemm(lo, lo, lo).intensity <= rl.gemm(hi, hi, hi).intensity


devices = st.builds(
    lambda p, w: rl.Device("chip", {"bf16": p}, w),
    st.floats(1e9, 1e16), st.floats(1e9, 1e14),
)
intensities = st.floats(min_value=0, max_value=1e7, allow_nan=False)


@given(dev=devices, i=intensities, j=intensities)
def test_attainable_is_under_both_roofs_and_monotone(dev, i, j):
    a = rl.attainable(dev, i, "bf16")
    assert a <= dev.peak("bf16") and a <= dev.bandwidth * i
    assert a in (dev.peak("bf16"), dev.bandwidth * i)
    lo, hi = sorted((i, j))
    assert rl.attainable(dev, lo, "bf16") <= rl.attainable(dev, hi, "bf16")


@given(dev=devices, f=st.floats(0.01, 100))
def test_ridge_point_consistency(dev, f):
    r = rl.ridge_point(dev, "bf16")
    assert dev.bandwidth * r == pytest.approx(dev.peak("bf16"))
    assert rl.attainable(dev, r, "bf16") == pytest.approx(dev.peak("bf16"))
    i = r * f
    if f < 1:  # left of the ridge: the memory roof binds
        assert rl.attainable(dev, i, "bf16") == pytest.approx(dev.bandwidth * i)
    else:  # on or right of it: the compute roof (exactly, once past rounding at the ridge itself)
        assert rl.attainable(dev, i, "bf16") == pytest.approx(dev.peak("bf16"))
        assert rl.attainable(dev, i * 1.001, "bf16") == dev.peak("bf16")


@given(N=st.integers(1, 4096), K=st.integers(1, 4096), ridge=st.floats(0.01, 2000), s=sizes)
def test_gemm_critical_batch_is_the_smallest(N, K, ridge, s):
    m = rl.gemm_critical_batch(N, K, ridge, dtype=s)
    R = Fraction(ridge)

    def reached(M):  # exact: 2MNK / (s (MK + KN + MN)) >= R
        return 2 * M * N * K >= R * s * (M * K + K * N + M * N)

    if m == math.inf:
        assert 2 * N * K <= R * s * (N + K)
        assert not reached(10**9)
    else:
        assert reached(m) and (m == 1 or not reached(m - 1))


@given(B=st.integers(1, 8), H=st.integers(1, 16), T=st.integers(1, 2048), D=st.sampled_from([16, 64, 128]))
def test_fused_attention_never_moves_more_bytes(B, H, T, D):
    naive, fused = rl.attention(B, H, T, D, fused=False), rl.attention(B, H, T, D)
    assert fused.flops == naive.flops and fused.bytes < naive.bytes
    assert fused.intensity / naive.intensity == pytest.approx((4 * D + 4 * T) / (4 * D))


# --- bad inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("call,exc,match", [
    (lambda: rl.gemm(-3, 4, 4), ValueError, "gemm: M must be an int >= 1, got -3"),
    (lambda: rl.gemm(4, 0, 4), ValueError, "N must be"),
    (lambda: rl.gemm(4, 4, 2.5), TypeError, "K must be an int"),
    (lambda: rl.gemm(4, 4, True), TypeError, "K must be an int"),
    (lambda: rl.gemm(4, 4, 4, dtype=torch.int64), ValueError, "dtype"),
    (lambda: rl.gemm(4, 4, 4, dtype="fp12"), ValueError, "dtype must be one of"),
    (lambda: rl.gemm(4, 4, 4, dtype=-2), ValueError, "dtype"),
    (lambda: rl.gemm(4, 4, 4, dtype=[2]), TypeError, "dtype"),
    (lambda: rl.gemv(4, 4, batch=0), ValueError, "batch"),
    (lambda: rl.elementwise(0), ValueError, "n must be"),
    (lambda: rl.softmax(4, -1), ValueError, "cols"),
    (lambda: rl.norm(4, 4, kind="batch"), ValueError, "kind"),
    (lambda: rl.attention(1, 1, 4, 4, fused="yes"), TypeError, "fused"),
    (lambda: rl.decode_attention(1, 6, 4, 4, kv_heads=4), ValueError, "kv_heads"),
    (lambda: rl.decoder_layer_ops(1, 1, 100, heads=3), ValueError, "hidden must be a multiple of heads"),
    (lambda: rl.decoder_layer_ops(1, 1, 128, phase="train"), ValueError, "phase"),
    (lambda: rl.attainable(H100, -1.0), ValueError, "intensity"),
    (lambda: rl.attainable(H100, float("nan")), ValueError, "intensity"),
    (lambda: rl.attainable("H100", 1.0), TypeError, "device"),
    (lambda: rl.attainable(A100, 1.0, "fp8"), ValueError, "no peak for dtype 'fp8'"),
    (lambda: rl.Device("x", {"bf16": -1.0}, 1.0), ValueError, "peak_flops"),
    (lambda: rl.Device("x", {"bf16": 1.0}, 0.0), ValueError, "bandwidth"),
    (lambda: rl.Device("x", {}, 1.0), ValueError, "peak_flops"),
    (lambda: rl.Op("x", 1.0, 0.0), ValueError, "bytes"),
    (lambda: rl.gemm_critical_batch(4, 4, 0.0), ValueError, "ridge"),
    (lambda: rl.decode_critical_batch(H100, 0), ValueError, "hidden"),
    (lambda: rl.training_flops(-1, 10), ValueError, "n_params"),
    (lambda: rl.decode_step_op(1e9, batch=1, kv_len=0, n_layers=1, d_model=8), ValueError, "kv_len"),
    (lambda: rl.measure_op("conv", n=4), ValueError, "kind must be one of"),
    (lambda: rl.measure_op("gemm", M=4, N=4), ValueError, r"shape arguments \('M', 'N', 'K'\)"),
    (lambda: rl.measure_op("gemm", M=4, N=4, K=-1), ValueError, "K must be"),
    (lambda: rl.measure_op("elementwise", n=4, repeats=0), ValueError, "repeats"),
    (lambda: rl.measure_op("elementwise", n=4, stat="mean"), ValueError, "stat"),
    (lambda: rl.measure_op("gemm", M=4, N=4, K=4, fused=True), TypeError, r"'gemm' does not take \['fused'\]"),
    (lambda: rl.measure_op("softmax", rows=4, cols=4, kv_heads=2), TypeError, r"does not take \['kv_heads'\]"),
    (lambda: rl.measure_op("attention", batch=1, heads=2, seq_len=4, head_dim=4, kv_heads=1), TypeError,
     r"'attention' does not take \['kv_heads'\]"),
    (lambda: rl.measure_op("decode_attention", batch=1, heads=2, kv_len=4, head_dim=4, fused=False), TypeError,
     r"does not take \['fused'\]"),
    (lambda: rl.measure_op("attention", batch=1, heads=2, seq_len=4, head_dim=4, fused=1), TypeError, "fused"),
    (lambda: rl.measure_op("decode_attention", batch=1, heads=2, kv_len=4, head_dim=4, kv_heads=0), ValueError,
     "kv_heads must be an int >= 1, got 0"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- measuring on this machine ----------------------------------------------------------

TINY = {
    "gemm": dict(M=16, N=8, K=12),
    "gemv": dict(N=32, K=16, batch=2),
    "elementwise": dict(n=256),
    "softmax": dict(rows=8, cols=16),
    "rmsnorm": dict(tokens=8, hidden=16),
    "layernorm": dict(tokens=8, hidden=16),
    "attention": dict(batch=1, heads=2, seq_len=8, head_dim=4, fused=False),
    "decode_attention": dict(batch=2, heads=4, kv_len=8, head_dim=4, kv_heads=2),
}


def test_every_measurable_kind_has_a_tiny_case():
    assert set(TINY) == set(rl.MEASURABLE)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_measure_op_positive_finite_on_cpu(kind):
    m = rl.measure_op(kind, device="cpu", dtype=torch.float32, warmup=1, repeats=2, **TINY[kind])
    for v in (m.seconds, m.flops_per_s, m.bytes_per_s, m.intensity):
        assert math.isfinite(v) and v > 0
    assert m.dtype == "fp32" and m.device.startswith("cpu")
    row = m.as_dict()
    assert row["kind"] == kind and row["median_ms"] > 0 and row["intensity"] == m.op.intensity


def test_measure_op_counts_match_the_model():
    m = rl.measure_op("attention", device="cpu", dtype="fp32", warmup=0, repeats=3, stat="min",
                      batch=1, heads=2, seq_len=8, head_dim=4, fused=True)
    assert m.op == rl.attention(1, 2, 8, 4, fused=True, dtype=torch.float32)
    assert m.extra["stat"] == "min" and m.seconds > 0


class _NewTensorsOf(TorchDispatchMode):
    """Counts ATen results with `numel` elements that are new memory (not a view of an input)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.count += sum(isinstance(t, torch.Tensor) and t.numel() == self.numel
                          and t.untyped_storage().data_ptr() not in inputs for t in tree_leaves(out))
        return out


def test_naive_attention_writes_the_scores_twice():
    """The model counts S and P, each written once and read once: exactly two (B, H, T, T) results."""
    B, H, T, D = 1, 2, 8, 4
    op, fn = rl._setup_op("attention", dict(batch=B, heads=H, seq_len=T, head_dim=D, fused=False),
                          torch.float32, torch.device("cpu"))
    with _NewTensorsOf(B * H * T * T) as mode:
        fn()
    assert mode.count == 2
    assert op.bytes - rl.attention(B, H, T, D, dtype=4).bytes == 2 * mode.count * B * H * T * T * 4


def test_tf32_switch_restores_the_precision():
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with rl._allow_tf32(True):
            assert torch.get_float32_matmul_precision() == "high"
        assert torch.get_float32_matmul_precision() == "medium"
        with rl._allow_tf32(False):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="per-backend fp32_precision API needs torch >= 2.9")
def test_tf32_switch_after_the_per_backend_api():
    """Once a user sets the CUDA backend's fp32_precision, the global getter (and the legacy
    allow_tf32 switch) raise on torch >= 2.9; measuring must still work and restore it."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with rl._allow_tf32(False):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        m = rl.measure_op("gemm", device="cpu", dtype="tf32", warmup=0, repeats=1, M=8, N=8, K=8)
        assert m.dtype == "tf32" and m.seconds > 0 and matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = saved


def test_probe_device_small():
    dev = rl.probe_device(("fp32", torch.bfloat16), device="cpu", matmul_size=64, copy_bytes=2**20)
    assert set(dev.peak_flops) == {"fp32", "bf16"}
    assert all(math.isfinite(v) and v > 0 for v in dev.peak_flops.values())
    assert math.isfinite(dev.bandwidth) and dev.bandwidth > 0
    assert dev.ridge("fp32") > 0 and "measured" in dev.name


# --- figures and benchmarks -------------------------------------------------------------


def test_roofline_figure():
    from labkit.viz.roofline import intensity_vs_batch_figure, layer_roofline_figure, roofline_figure

    ops = [rl.gemm(4096, 4096, 4096), rl.gemv(4096, 4096), rl.elementwise(2**20)]
    measured = [rl.Measurement(rl.gemm(8, 8, 8, dtype=4), 1e-6, "cpu", "fp32"),
                {"name": "x", "intensity": 2.0, "tflops": 0.1}]
    fig = roofline_figure([H100, A100], ops, measured=measured, dtype="bf16")
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    names = [t.name for t in fig.data]
    assert any("H100" in (n or "") for n in names) and any("A100" in (n or "") for n in names)
    ridge = [t for t in fig.data if t.text and str(t.text[0]).startswith("ridge")]
    assert ridge[0].x[0] == pytest.approx(H100.ridge("bf16"))
    mem = next(t for t in fig.data if (t.name or "").startswith("memory-bound"))
    comp = next(t for t in fig.data if (t.name or "").startswith("compute-bound"))
    assert len(mem.x) == 2 and len(comp.x) == 1 and comp.y[0] == H100.peak("bf16")
    assert len(next(t for t in fig.data if t.name == "measured").x) == 2
    with pytest.raises(TypeError, match="devices"):
        roofline_figure([], ops)
    with pytest.raises(TypeError, match="measured"):
        roofline_figure(H100, ops, measured=[3.0])
    small = layer_roofline_figure(1, 1024, 1024, "bf16", "decode")
    big = layer_roofline_figure(1024, 1024, 1024, "bf16", "decode")
    assert len(small.data) == len(big.data)  # the slider panel can update traces in place
    assert "10/10 ops memory-bound" in small.layout.title.text
    assert len(intensity_vs_batch_figure().data) == 4


def test_sweep_figure():
    from labkit.viz.roofline import sweep_figure

    ms = [rl.Measurement(rl.gemv(64, 64, batch=b, dtype=4), 1e-5, "cpu", "fp32") for b in (1, 2, 4)]
    dev = rl.Device("chip", {"fp32": 1e11}, 1e10)
    fig = sweep_figure([1, 2, 4], ms, dev, "fp32")
    bound, got = fig.data
    assert list(bound.y) == [rl.attainable(dev, m.intensity, "fp32") for m in ms]
    assert list(got.y) == [m.flops_per_s for m in ms]
    with pytest.raises(ValueError, match="equal length"):
        sweep_figure([1, 2], ms, dev, "fp32")


def test_benchmark_cases_and_quick_run():
    from labkit.benchmarks import roofline as bench

    kinds = {k for k, _ in bench.cases(quick=True)}
    assert {"gemm", "elementwise", "softmax", "rmsnorm", "gemv"} <= kinds
    rows = bench.run(quick=True)
    assert all(r["device"] for r in rows)
    measured = [r for r in rows if r["kind"] != "probe"]
    assert len(measured) == len(bench.cases(quick=True))
    for r in measured:
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["intensity"] > 0 and r["roof_fraction"] > 0
    with pytest.raises(TypeError, match="quick"):
        bench.cases(quick="yes")
    dev = bench.device_from_record({"meta": {}, "results": rows})
    assert dev.peak(rows[0]["dtype"]) == pytest.approx(rows[0]["tflops"] * 1e12)
    with pytest.raises(ValueError, match="probe"):
        bench.device_from_record(measured)
