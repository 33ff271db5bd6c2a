"""Chapters 01-roofline and 02-compile on CUDA: the code paths a CPU never takes.

Every test is marked `gpu`: tests/conftest.py skips them without CUDA; on the GPU runner
`make gpu` (tools/gpu-suite.sh) runs them with `pytest -m gpu`. Sizes are small: these check
that each path runs and returns sane numbers, not how fast it is.
"""

from __future__ import annotations

import math

import pytest
import torch

from labkit import bench
from labkit.perf import compile as pc
from labkit.perf import roofline as rl

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")

# Small bf16 shapes for every measurable kind (head_dim 64: the fused SDPA kernels take it).
SMALL = {
    "gemm": dict(M=256, N=128, K=192),
    "gemv": dict(N=512, K=256, batch=4),
    "elementwise": dict(n=2**16),
    "softmax": dict(rows=64, cols=256),
    "rmsnorm": dict(tokens=64, hidden=256),
    "layernorm": dict(tokens=64, hidden=256),
    "attention": dict(batch=1, heads=2, seq_len=128, head_dim=64),
    "decode_attention": dict(batch=2, heads=4, kv_len=128, head_dim=64, kv_heads=2),
}


def _finite_positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


# --- labkit.bench -----------------------------------------------------------------------


def test_timeit_cuda_events():
    a = torch.randn(512, 512, device=CUDA)
    t = bench.timeit(lambda: a @ a, warmup=1, repeats=4, device=CUDA)
    assert len(t.times) == 4 and _finite_positive(t.median_s, t.min_s, *t.times)
    assert t.min_s <= t.median_s
    assert t.device == torch.cuda.get_device_name(CUDA)


# --- 01-roofline ------------------------------------------------------------------------


def test_probe_device_cuda_small():
    precision = torch.get_float32_matmul_precision()
    dev = rl.probe_device(("bf16", "fp32", "tf32"), device=CUDA, matmul_size=512, copy_bytes=2**24)
    assert set(dev.peak_flops) == {"bf16", "fp32", "tf32"}
    assert _finite_positive(*dev.peak_flops.values(), dev.bandwidth)
    assert torch.cuda.get_device_name(CUDA) in dev.name
    assert torch.get_float32_matmul_precision() == precision  # the TF32 switch was put back


def test_every_kind_has_a_small_case():
    assert set(SMALL) == set(rl.MEASURABLE)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_measure_op_bf16_cuda(kind):
    m = rl.measure_op(kind, dtype=torch.bfloat16, device=CUDA, warmup=1, repeats=3, **SMALL[kind])
    assert _finite_positive(m.seconds, m.flops_per_s, m.bytes_per_s, m.intensity)
    assert m.dtype == "bf16" and m.device == torch.cuda.get_device_name(CUDA)
    row = m.as_dict()
    assert row["kind"] == kind and row["median_ms"] > 0


def test_measure_naive_attention_bf16_cuda():
    m = rl.measure_op("attention", dtype="bf16", device=CUDA, warmup=1, repeats=3,
                      batch=1, heads=2, seq_len=256, head_dim=64, fused=False)
    assert m.op == rl.attention(1, 2, 256, 64, fused=False, dtype=torch.bfloat16)
    assert _finite_positive(m.seconds, m.flops_per_s)


# --- 02-compile -------------------------------------------------------------------------


def test_inductor_writes_triton_on_cuda():
    x = torch.randn(4096, device=CUDA)
    code = pc.inductor_code(lambda x: torch.relu(torch.sin(x) * 2.0 + 1.0), x)
    assert code.n_kernels >= 1 and code.languages == {"triton": code.n_kernels}
    assert pc.count_fused_kernels(code.sources) == code.n_kernels
    assert sum(s.count("@triton.jit") for s in code.sources) == code.n_kernels  # one decorator per definition
    for name in code.kernels:
        assert name.startswith("triton_")
        assert f"def {name}(" in code.kernel_source(name)
    torch.testing.assert_close(code.output, torch.relu(torch.sin(x) * 2.0 + 1.0))


def test_compiled_block_on_cuda_fuses_and_calls_cublas():
    """What chapter 02's notebook asserts about the block, at its GPU size but fewer tokens."""
    from labkit.models import Block, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(n_embd=768, n_head=12, block_size=256, norm="rmsnorm", mlp="swiglu", rope=True)
    block = Block(config).to(CUDA).eval()
    x = torch.randn(2, 128, 768, device=CUDA)  # (B, T, C)
    hist = pc.capture_graphs(block, x).op_histogram()
    code = pc.inductor_code(block, x)
    assert code.languages == {"triton": code.n_kernels}
    assert 1 <= code.n_kernels < sum(hist.values()) / 3
    assert sum(n for k, n in code.library_calls.items() if k.startswith("extern_kernels.")) >= 7
    assert pc.count_fused_kernels(code.sources) == code.n_kernels
    with torch.no_grad():
        ref = block(x)
    torch.testing.assert_close(code.output, ref, rtol=1e-3, atol=1e-4)
    assert pc.max_rel_diff(code.compiled(x), ref) < 1e-4


def test_compile_benchmark_quick_cuda_bf16():
    from labkit import runtime
    from labkit.benchmarks import compile as bc

    if not runtime.on_gpu():
        pytest.skip("LABKIT_DEVICE=cpu: the benchmark runs on the CPU")
    rows = bc.run(quick=True)
    (B, T, C, _), = bc.configs(quick=True)
    assert [r["name"] for r in rows] == ["eager", "compiled (default)"]
    for r in rows:
        assert r["dtype"] == "bfloat16" and r["shape"] == f"{B}x{T}x{C}"
        assert r["median_ms"] > 0 and r["device"] == torch.cuda.get_device_name()
        assert r["rel_err"] < bc.REL_TOL["bfloat16"]
