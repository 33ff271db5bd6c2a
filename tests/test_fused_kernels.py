"""Tests of labkit.kernels' RMSNorm, SwiGLU, RoPE, cross-entropy and fused linear cross-entropy (chapter
17-fused-kernels): parity with eager PyTorch and (cross-entropy, under the interpreter) Liger-Kernel, bf16,
ignore_index / reduction gradients, gradcheck, bad input, memory, a short training run, exercises, figures,
benchmarks; and, marked gpu, parity with Liger-Kernel's compiled kernels.

Tolerances. fp32 and fp64: torch.testing.assert_close defaults. bf16: each kernel is compared with an fp64
reference computed from the same bf16 inputs, with rtol=1.6e-2 (torch's bf16 default, two bf16 ulps: Liger's
kernels, compared on a GPU, round some intermediates to bf16) and atol=1e-2 * max|reference|. Liger's own
bf16 tests use atol=0.2, rtol=0.02 (RMSNorm), atol=1e4, rtol=1e-2 (SwiGLU), atol=0.1, rtol=1e-5 (RoPE),
atol=1e-8, rtol=5e-2 (cross-entropy; against eager bf16) and atol=5e-3, rtol=5e-2 (mean) or atol=5, rtol=50
(sum, none) for fused linear cross-entropy: ours are no looser where it matters, the relative error of each
element, and bounded by the tensor's scale instead of a fixed atol.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import labkit  # before triton defines a kernel: on a CPU, labkit switches on Triton's interpreter
import triton  # noqa: I001
import triton.language as tl
from labkit.benchmarks import fused_kernels as fkb
from labkit.kernels import fused_linear_ce as flce_mod
from labkit.kernels import rmsnorm as rms_mod
from labkit.kernels._common import kernel_device, round_to
from labkit.kernels.cross_entropy import CrossEntropyLoss, cross_entropy
from labkit.kernels.fused_linear_ce import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy, loss_layer_bytes
from labkit.kernels.rmsnorm import RMSNorm, rms_norm
from labkit.kernels.rope import RotaryEmbedding, apply_rope
from labkit.kernels.swiglu import SwiGLUMLP, swiglu
from labkit.models import MLP, GPTConfig, TinyGPT
from labkit.models import RMSNorm as EagerRMSNorm
from labkit.models.gpt import apply_rope as eager_rope
from labkit.models.gpt import rope_cache

# labkit.kernels re-exports the function cross_entropy under its module's name: fetch the module itself
ce_mod = importlib.import_module("labkit.kernels.cross_entropy")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _interpreter_tests_need_the_interpreter(request):
    """The unmarked tests build CPU tensors for Triton's interpreter; where the kernels are compiled for a GPU,
    the gpu-marked tests below cover them instead (so `make test` on a GPU machine skips, not fails)."""
    if request.node.get_closest_marker("gpu") is None and kernel_device().type == "cuda":
        pytest.skip("CPU tensors under Triton's interpreter; compiled kernels are covered by the gpu-marked tests")
logging.getLogger("liger_kernel").setLevel(logging.ERROR)  # its optional backends announce themselves


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0, grad=True):
    t = (torch.randn(shape, generator=gen(seed)) * scale).to(dtype)
    return t.requires_grad_() if grad else t


def gradcheck(fn, inputs):
    """fp64 gradcheck; fast mode (a random projection of the Jacobian) keeps interpreted kernels cheap."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def leaf64(t):
    """An fp64 leaf with t's values: the reference's input."""
    return t.detach().double().requires_grad_()


def close_bf16(got, ref):
    """bf16 result against an fp64 reference (see the module docstring)."""
    ref = ref.double()
    torch.testing.assert_close(got.double(), ref, rtol=1.6e-2, atol=1e-2 * ref.abs().max().item() + 1e-12)


def eager_rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def targets(n, v, seed=0, ignore_every=3, ignore_index=-100):
    t = torch.randint(0, v, (n,), generator=gen(seed))
    if ignore_every:
        t[::ignore_every] = ignore_index
    return t


# --- the shared rounding helper --------------------------------------------------------------------


@triton.jit
def _store_rounded(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, round_to(tl.load(x_ptr + i, mask=i < n), y_ptr.dtype.element_ty), mask=i < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_to_rounds_like_torch(dtype):
    """round_to (labkit.kernels._common, used by every kernel's stores): float32 -> dtype bit for bit as
    torch rounds, to nearest even; under the interpreter a plain bf16 cast would truncate instead."""
    ties = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 3 * 2**-8), float("inf"), -float("inf"), 0.0]  # halfway cases first
    x = torch.cat([randn(500, scale=10.0, grad=False), torch.tensor(ties)]).to(kernel_device())
    y = torch.empty(len(x), dtype=dtype, device=x.device)
    _store_rounded[(1,)](x, y, len(x), BLOCK=triton.next_power_of_2(len(x)))
    assert torch.equal(y, x.to(dtype))


# --- RMSNorm ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 37, 100), (64, 256), (5, 4097)])
def test_rms_norm_matches_eager_fp32(shape):
    x, w = randn(*shape), randn(shape[-1], seed=1).add(1.0).detach().requires_grad_()
    y = rms_norm(x, w)
    dy = randn(*shape, seed=2, grad=False)
    y.backward(dy)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = eager_rms(xr, wr)
    yr.backward(dy)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def test_rms_norm_many_programs_and_row_loops(monkeypatch):
    """Small blocks force several programs in the forward and a loop over row blocks per program in the
    backward, with a ragged last block and partial dweight rows summed afterwards."""
    monkeypatch.setattr(rms_mod, "INTERPRETER_BLOCK", 64)  # 64 // next_pow2(50) = 1 row per block
    x, w = randn(13, 50), randn(50, seed=1)
    y = rms_norm(x, w)
    y.backward(torch.ones_like(y))
    xr, wr = leaf64(x), leaf64(w)
    eager_rms(xr, wr).backward(torch.ones_like(xr))
    torch.testing.assert_close(y.double(), eager_rms(xr, wr).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_half_precision(dtype):
    x, w = randn(6, 33, 96, dtype=dtype, scale=3.0), randn(96, seed=1, dtype=dtype).add(1).detach().requires_grad_()
    dy = randn(6, 33, 96, seed=2, dtype=dtype, grad=False)
    y = rms_norm(x, w)
    y.backward(dy)
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype
    xr, wr = leaf64(x), leaf64(w)
    yr = eager_rms(xr, wr)
    yr.backward(dy.double())
    close_bf16(y, yr)
    close_bf16(x.grad, xr.grad)
    close_bf16(w.grad, wr.grad)


def test_rms_norm_gradcheck_fp64():
    x, w = randn(5, 7, dtype=torch.float64), randn(7, seed=1, dtype=torch.float64)
    assert gradcheck(lambda a, b: rms_norm(a, b, 1e-3), (x, w))


def test_rms_norm_strided_rows_and_module_matches_labkit_rmsnorm():
    big = randn(8, 200)
    x = big[:, :100]  # rows with stride 200: supported without a copy
    w = randn(100, seed=1)
    torch.testing.assert_close(rms_norm(x, w), eager_rms(x, w))
    ours, eager = RMSNorm(100, eps=1e-5), EagerRMSNorm(100, eps=1e-5)
    ours.load_state_dict(eager.state_dict())
    x3 = randn(2, 3, 100, seed=3)
    torch.testing.assert_close(ours(x3), eager(x3))


@given(n=st.integers(1, 24), c=st.integers(1, 300), eps=st.floats(1e-8, 1e-1), scale=st.floats(1e-2, 1e2))
def test_rms_norm_property(n, c, eps, scale):
    x, w = randn(n, c, scale=scale, seed=n * 1000 + c), randn(c, seed=c)
    y = rms_norm(x, w, eps)
    y.sum().backward()
    xr, wr = leaf64(x), leaf64(w)
    yr = eager_rms(xr, wr, eps)
    yr.sum().backward()
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5 / scale)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-4)


def test_rms_norm_bad_input():
    x, w = randn(4, 8), randn(8)
    with pytest.raises(TypeError, match="rms_norm: x must be float16"):
        rms_norm(torch.ones(4, 8, dtype=torch.int64), w)
    with pytest.raises(TypeError, match="rms_norm: x must be a torch.Tensor"):
        rms_norm([[1.0]], w)
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \(C,\) = \(8,\)"):
        rms_norm(x, randn(7))
    with pytest.raises(TypeError, match="rms_norm: weight must have x's dtype"):
        rms_norm(x, randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="rms_norm: eps must be in"):
        rms_norm(x, w, eps=0.0)
    with pytest.raises(ValueError, match="rms_norm: x must be contiguous in its last dimension"):
        rms_norm(randn(8, 4).t(), randn(8))
    with pytest.raises(ValueError, match="RMSNorm: dim must be an int >= 1"):
        RMSNorm(0)


# --- SwiGLU -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (2, 7, 50), (16, 1000)])
def test_swiglu_matches_eager_fp32(shape):
    g, u = randn(*shape, scale=3.0), randn(*shape, seed=1)
    h = swiglu(g, u)
    dh = randn(*shape, seed=2, grad=False)
    h.backward(dh)
    gr, ur = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    hr = F.silu(gr) * ur
    hr.backward(dh)
    torch.testing.assert_close(h, hr)
    torch.testing.assert_close(g.grad, gr.grad)
    torch.testing.assert_close(u.grad, ur.grad)


def test_swiglu_bf16_and_gradcheck():
    g, u = randn(4, 9, 70, dtype=torch.bfloat16, scale=4.0), randn(4, 9, 70, seed=1, dtype=torch.bfloat16)
    dh = randn(4, 9, 70, seed=2, dtype=torch.bfloat16, grad=False)
    h = swiglu(g, u)
    h.backward(dh)
    gr, ur = leaf64(g), leaf64(u)
    hr = F.silu(gr) * ur
    hr.backward(dh.double())
    close_bf16(h, hr)
    close_bf16(g.grad, gr.grad)
    close_bf16(u.grad, ur.grad)
    a, b = randn(3, 5, dtype=torch.float64, scale=3.0), randn(3, 5, seed=1, dtype=torch.float64)
    assert gradcheck(swiglu, (a, b))


def test_swiglu_reads_halves_of_a_fused_projection_and_mlp_matches_labkit():
    gu = randn(2, 5, 2 * 24)
    g, u = gu.chunk(2, dim=-1)  # strided views: rows of 48, halves of 24
    torch.testing.assert_close(swiglu(g, u), F.silu(g) * u)
    cfg = GPTConfig(n_embd=16, n_head=2, mlp="swiglu", mlp_ratio=2.5)
    eager = MLP(cfg)
    ours = SwiGLUMLP(16, cfg.hidden_dim)
    ours.load_state_dict(eager.state_dict())
    x = randn(2, 3, 16, seed=4)
    torch.testing.assert_close(ours(x), eager(x))


def test_swiglu_bad_input():
    g = randn(3, 4)
    with pytest.raises(ValueError, match=r"swiglu: up must have gate's shape \(3, 4\)"):
        swiglu(g, randn(4, 3))
    with pytest.raises(TypeError, match="swiglu: up must have gate's dtype"):
        swiglu(g, randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="swiglu: gate must be float16"):
        swiglu(torch.ones(3, 4, dtype=torch.int32), g)
    with pytest.raises(ValueError, match="swiglu: gate must be contiguous in its last dimension"):
        swiglu(randn(4, 3).t(), randn(4, 3).t())


# --- RoPE -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,T,H,Hkv,D,transposed", [(1, 1, 1, 1, 2, False), (2, 13, 4, 2, 10, True),
                                                     (2, 33, 3, 1, 64, True), (1, 17, 2, 2, 6, False)])
def test_rope_matches_eager(B, T, H, Hkv, D, transposed):
    if transposed:  # the layout a q/k projection leaves: (B, T, H, D) memory seen as (B, H, T, D)
        q = randn(B, T, H, D, grad=False).transpose(1, 2).requires_grad_()
        k = randn(B, T, Hkv, D, seed=1, grad=False).transpose(1, 2).requires_grad_()
    else:
        q, k = randn(B, H, T, D), randn(B, Hkv, T, D, seed=1)
    q0, k0 = q.detach().clone(), k.detach().clone()
    cos, sin = rope_cache(T, D)
    qo, ko = apply_rope(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()  # the layout is kept
    dq, dk = randn(*qo.shape, seed=2, grad=False), randn(*ko.shape, seed=3, grad=False)
    torch.autograd.backward((qo, ko), (dq, dk))
    qr, kr = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qe, ke = eager_rope(qr, cos, sin), eager_rope(kr, cos, sin)
    torch.autograd.backward((qe, ke), (dq, dk))
    torch.testing.assert_close(qo, qe)
    torch.testing.assert_close(ko, ke)
    torch.testing.assert_close(q.grad, qr.grad)
    torch.testing.assert_close(k.grad, kr.grad)
    assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)  # inputs untouched


def test_rope_bf16_gradcheck_and_module():
    q, k = randn(2, 4, 9, 16, dtype=torch.bfloat16), randn(2, 2, 9, 16, seed=1, dtype=torch.bfloat16)
    cos, sin = rope_cache(9, 16)
    qo, ko = apply_rope(q, k, cos, sin)
    (qo.float().square().sum() + ko.float().sum()).backward()
    qr, kr = leaf64(q), leaf64(k)
    qe, ke = eager_rope(qr, cos.double(), sin.double()), eager_rope(kr, cos.double(), sin.double())
    (qe.square().sum() + ke.sum()).backward()
    close_bf16(qo, qe)
    close_bf16(ko, ke)
    close_bf16(q.grad, qr.grad)
    close_bf16(k.grad, kr.grad)
    q64, k64 = randn(1, 2, 5, 6, dtype=torch.float64), randn(1, 1, 5, 6, seed=1, dtype=torch.float64)
    c64, s64 = (t.double() for t in rope_cache(5, 6))
    assert gradcheck(lambda a, b: apply_rope(a, b, c64, s64), (q64, k64))
    rot = RotaryEmbedding(6, max_seq_len=8, base=500.0)
    c, s = rope_cache(8, 6, 500.0)
    torch.testing.assert_close(rot(q64.float(), k64.float())[0], eager_rope(q64.float(), c[:5], s[:5]))


def test_rope_bad_input():
    q, k = randn(1, 2, 4, 8), randn(1, 1, 4, 8)
    cos, sin = rope_cache(4, 8)
    with pytest.raises(ValueError, match="apply_rope: q's head dimension D must be even"):
        apply_rope(randn(1, 2, 4, 7), randn(1, 1, 4, 7), *rope_cache(4, 6))
    with pytest.raises(ValueError, match=r"apply_rope: k must have shape \(B, Hkv, T, D\)"):
        apply_rope(q, randn(1, 1, 5, 8), cos, sin)
    with pytest.raises(ValueError, match=r"apply_rope: cos must have shape \(T, D/2\) = \(4, 4\)"):
        apply_rope(q, k, cos[:, :3], sin)
    with pytest.raises(TypeError, match="apply_rope: k must have q's dtype"):
        apply_rope(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="apply_rope: q must be contiguous in its head dimension"):
        apply_rope(randn(1, 2, 8, 4).transpose(2, 3), k, cos, sin)
    with pytest.raises(ValueError, match=r"apply_rope: q must have shape \(B, H, T, D\)"):
        apply_rope(randn(2, 4, 8), k, cos, sin)
    with pytest.raises(ValueError, match="RotaryEmbedding: head_dim must be even"):
        RotaryEmbedding(7, 4)


# --- cross-entropy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_cross_entropy_matches_pytorch(reduction, ignore_index):
    z = randn(37, 301, scale=3.0)
    t = targets(37, 301, ignore_index=ignore_index)
    loss = cross_entropy(z, t, ignore_index, reduction)
    g = randn(*loss.shape, seed=5, grad=False)  # a non-trivial upstream gradient (per token for "none")
    loss.backward(g)
    zr = z.detach().clone().requires_grad_()
    ref = F.cross_entropy(zr, t, ignore_index=ignore_index, reduction=reduction)
    ref.backward(g)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z.grad, zr.grad)
    assert torch.all(z.grad[t == ignore_index] == 0)


def test_cross_entropy_online_softmax_over_vocab_blocks(monkeypatch):
    """V larger than the block: the running max and normalizer are carried across 5 vocabulary blocks."""
    monkeypatch.setattr(ce_mod, "INTERPRETER_BLOCK", 64)
    z = randn(6, 300, scale=10.0)
    t = targets(6, 300, ignore_every=4)
    loss = cross_entropy(z, t)
    loss.backward()
    zr = z.detach().clone().requires_grad_()
    F.cross_entropy(zr, t).backward()
    torch.testing.assert_close(loss, F.cross_entropy(z.detach(), t))
    torch.testing.assert_close(z.grad, zr.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_bf16(reduction):
    z = randn(19, 1000, scale=4.0, dtype=torch.bfloat16)
    t = targets(19, 1000)
    loss = cross_entropy(z, t, reduction=reduction)
    g = randn(*loss.shape, seed=3, dtype=torch.bfloat16, grad=False)
    loss.backward(g)
    zr = leaf64(z)
    ref = F.cross_entropy(zr, t, reduction=reduction)
    ref.backward(g.double())
    assert loss.dtype == z.grad.dtype == torch.bfloat16
    close_bf16(loss, ref)
    close_bf16(z.grad, zr.grad)


def test_cross_entropy_edge_cases_and_gradcheck():
    z = randn(3, 5)
    t = torch.full((3,), -100)
    loss = cross_entropy(z, t)  # every target ignored: nan loss, zero gradient, as PyTorch
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(z.detach(), t))
    assert torch.equal(z.grad, torch.zeros(3, 5))
    z1 = randn(4, 1)
    cross_entropy(z1, torch.zeros(4, dtype=torch.long)).backward()  # one class: loss 0, gradient 0
    assert torch.equal(z1.grad, torch.zeros(4, 1))
    z2 = randn(4, 6)
    loss = cross_entropy(z2, targets(4, 6, ignore_every=0))
    loss.backward(retain_graph=True)
    first = z2.grad.clone()
    loss.backward()  # a second backward through the same graph sees the same gradient
    torch.testing.assert_close(z2.grad, 2 * first)
    z64 = randn(5, 7, dtype=torch.float64)
    t64 = torch.tensor([1, -100, 6, 0, 3])
    for reduction in ("mean", "sum", "none"):
        assert gradcheck(lambda a: cross_entropy(a, t64, reduction=reduction), (z64,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_liger_under_the_interpreter(reduction):
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

    z = randn(23, 517, scale=2.0)
    t = targets(23, 517, ignore_every=4)
    ours = cross_entropy(z, t, reduction=reduction)
    g = randn(*ours.shape, seed=7, grad=False)
    ours.backward(g)
    zl = z.detach().clone().requires_grad_()
    theirs = LigerCrossEntropyLoss(reduction=reduction)(zl, t)
    theirs.backward(g)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(z.grad, zl.grad)


@given(n=st.integers(1, 20), v=st.integers(1, 400), frac=st.floats(0, 1), scale=st.floats(0.1, 20),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_property(n, v, frac, scale, reduction):
    z = randn(n, v, scale=scale, seed=n * 7 + v)
    t = torch.randint(0, v, (n,), generator=gen(v))
    t[torch.rand(n, generator=gen(n)) < frac] = -100
    loss = cross_entropy(z, t, reduction=reduction)
    loss.sum().backward()
    zr = leaf64(z)
    ref = F.cross_entropy(zr, t, reduction=reduction)
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(z.grad.double(), zr.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_bad_input():
    z = randn(4, 6)
    with pytest.raises(ValueError, match=r"cross_entropy: target values must be in \[0, 6\) or ignore_index=-100, "
                                         "got 6"):
        cross_entropy(z, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(ValueError, match="cross_entropy: target values must be in"):
        cross_entropy(z, torch.tensor([0, -1, 3, 2]))  # -1 is not the ignore_index
    with pytest.raises(TypeError, match="cross_entropy: target must be an int64"):
        cross_entropy(z, torch.zeros(4))
    with pytest.raises(ValueError, match=r"cross_entropy: target must hold one class index per row \(4\)"):
        cross_entropy(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cross_entropy: logits must have shape \(N, V\)"):
        cross_entropy(randn(2, 2, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cross_entropy: reduction must be one of"):
        cross_entropy(z, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="cross_entropy: logits must be contiguous along V"):
        cross_entropy(randn(6, 4).t(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="CrossEntropyLoss: reduction must be one of"):
        CrossEntropyLoss(reduction="max")


# --- fused linear cross-entropy -----------------------------------------------------------------------


def flce_case(n=37, h=24, v=301, dtype=torch.float32, bias=False, seed=0, ignore_every=4):
    x = randn(n, h, seed=seed, dtype=dtype)
    w = randn(v, h, seed=seed + 1, dtype=dtype, scale=0.3)
    b = randn(v, seed=seed + 2, dtype=dtype, scale=0.1) if bias else None
    return x, w, b, targets(n, v, seed=seed + 3, ignore_every=ignore_every)


def eager_flce(x, w, t, b=None, reduction="mean", ignore_index=-100):
    return F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, ignore_index=ignore_index)


def grads_of(loss, g, *leaves):
    loss.backward(g)
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_flce_matches_eager(reduction, bias, chunk_size):
    x, w, b, t = flce_case(bias=bias)
    loss = fused_linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=chunk_size)
    g = randn(*loss.shape, seed=9, grad=False)  # per-token upstream gradients for "none": Liger's old bug
    got = grads_of(loss, g, x, w, b)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    br = None if b is None else b.detach().clone().requires_grad_()
    ref = eager_flce(xr, wr, t, br, reduction)
    want = grads_of(ref, g, xr, wr, br)
    torch.testing.assert_close(loss, ref)
    for a, e in zip(got, want):
        if e is not None:
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flce_bf16(reduction):
    x, w, b, t = flce_case(n=40, h=32, v=500, dtype=torch.bfloat16, bias=True)
    loss = fused_linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=16)
    g = randn(*loss.shape, seed=9, dtype=torch.bfloat16, grad=False)
    got = grads_of(loss, g, x, w, b)
    xr, wr, br = leaf64(x), leaf64(w), leaf64(b)
    ref = eager_flce(xr, wr, t, br, reduction)
    want = grads_of(ref, g.double(), xr, wr, br)
    close_bf16(loss, ref)
    for a, e in zip(got, want):
        close_bf16(a, e)


def test_flce_scaled_loss_only_x_or_w_and_retained_graph():
    x, w, b, t = flce_case()
    loss = fused_linear_cross_entropy(x, w, t, chunk_size=8)
    (3.0 * loss).backward(retain_graph=True)  # an upstream gradient of 3, e.g. gradient accumulation
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3.0 * eager_flce(xr, wr, t)).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    loss.backward()  # the saved gradients were not modified by the first backward
    torch.testing.assert_close(x.grad, xr.grad * 4 / 3)
    x2 = x.detach()  # no gradient wanted for x: only dW is produced
    fused_linear_cross_entropy(x2, w, t).backward()
    assert x2.grad is None
    torch.testing.assert_close(w.grad, wr.grad * 4 / 3 + wr.grad / 3)


def test_flce_all_ignored_and_gradcheck():
    x, w, _, _ = flce_case(n=5, v=7)
    t = torch.full((5,), -100)
    loss = fused_linear_cross_entropy(x, w, t)
    loss.backward()
    assert torch.isnan(loss) and torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    x, w, b = randn(6, 3, dtype=torch.float64), randn(5, 3, seed=1, dtype=torch.float64), randn(5, seed=2,
                                                                                               dtype=torch.float64)
    t = torch.tensor([1, -100, 4, 0, 3, 2])
    for reduction in ("mean", "sum", "none"):
        assert gradcheck(
            lambda a, c, d: fused_linear_cross_entropy(a, c, t, d, reduction=reduction, chunk_size=4), (x, w, b))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flce_matches_liger_under_the_interpreter(reduction):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    x, w, _, t = flce_case(n=32, h=16, v=200)
    ours = fused_linear_cross_entropy(x, w, t, reduction=reduction)
    g = randn(*ours.shape, seed=11, grad=False)
    got = grads_of(ours, g, x, w)
    xl, wl = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    theirs = LigerFusedLinearCrossEntropyLoss(reduction=reduction)(wl, xl, t)
    want = grads_of(theirs, g, xl, wl)
    torch.testing.assert_close(ours, theirs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@given(n=st.integers(1, 40), h=st.integers(1, 20), v=st.integers(1, 120), chunk=st.integers(1, 48),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_flce_property(n, h, v, chunk, reduction):
    x, w, _, _ = flce_case(n=n, h=h, v=v, seed=n + h + v)
    t = targets(n, v, seed=chunk, ignore_every=3)
    loss = fused_linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=chunk)
    loss.sum().backward()
    xr, wr = leaf64(x), leaf64(w)
    ref = eager_flce(xr, wr, t, reduction=reduction)
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-5)


def test_flce_memory_never_holds_the_logits():
    """Measured peak (PeakMemory): eager keeps three (N, V) tensors at once, the fused version one (C, V) chunk
    next to dx and dW, as loss_layer_bytes predicts; at these sizes that is under a quarter of eager's."""
    n, h, v, c = 256, 32, 4096, 32
    x, w, _, t = flce_case(n=n, h=h, v=v)
    with fkb.PeakMemory() as eager:
        eager_flce(x, w, t).backward()
    x.grad = w.grad = None
    with fkb.PeakMemory() as fused:
        fused_linear_cross_entropy(x, w, t, chunk_size=c).backward()
    model = loss_layer_bytes(n, v, h, 4, c)
    assert eager.largest == n * v * 4 and fused.largest == max(c * v, v * h) * 4
    assert model["eager"] <= eager.peak <= 1.01 * model["eager"]
    assert model["fused"] <= fused.peak <= 1.01 * model["fused"]
    assert fused.peak < 0.25 * eager.peak
    assert flce_mod.default_chunk_size(8192, 4096, 128256) == 256  # Liger's rule at Llama-3 scale
    m = loss_layer_bytes(8192, 128256, 4096, 2)
    assert m["fused"] / m["eager"] < 0.2


def test_no_gradient_work_under_no_grad():
    """Evaluation: no dx, dW or logits-gradient buffers are allocated, only one chunk of logits at a time."""
    x, w, _, t = flce_case(n=64, h=16, v=500)
    with torch.no_grad(), fkb.PeakMemory() as pm:
        loss = fused_linear_cross_entropy(x, w, t, chunk_size=16)
    assert pm.peak < 16 * 500 * 4 + 1024  # dW alone would be another 16 * 500 * 4 bytes
    torch.testing.assert_close(loss, eager_flce(x.detach(), w.detach(), t))
    z = randn(8, 300)
    with torch.no_grad(), fkb.PeakMemory() as pm:
        cross_entropy(z, targets(8, 300))
    assert pm.peak < 8 * 300 * 4  # no (N, V) gradient buffer


def test_flce_bad_input():
    x, w, b, t = flce_case(n=4, h=3, v=5, bias=True)
    f = fused_linear_cross_entropy
    with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: weight must have shape \(V, H\) = \(V, 3\)"):
        f(x, randn(5, 4), t)
    with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: x must have shape \(N, H\)"):
        f(randn(2, 2, 3), w, t)
    with pytest.raises(TypeError, match="fused_linear_cross_entropy: weight must have x's dtype"):
        f(x, w.double(), t)
    with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: bias must have shape \(V,\) = \(5,\)"):
        f(x, w, t, randn(4))
    with pytest.raises(ValueError, match="fused_linear_cross_entropy: chunk_size must be an int >= 1"):
        f(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="fused_linear_cross_entropy: target values must be in"):
        f(x, w, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="FusedLinearCrossEntropyLoss: reduction must be one of"):
        FusedLinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="loss_layer_bytes: vocab must be an int >= 1, got 0"):
        loss_layer_bytes(8, 0, 4, 2)
    with pytest.raises(TypeError, match="loss_layer_bytes: chunk_size must be an int"):
        loss_layer_bytes(8, 16, 4, 2, chunk_size=2.5)
    with pytest.raises(ValueError, match="default_chunk_size: hidden must be an int >= 1"):
        flce_mod.default_chunk_size(8, 0, 16)


# --- a tiny model trained with the kernels -------------------------------------------------------------


def test_tinygpt_trained_with_kernels_matches_eager():
    """30 AdamW steps of a Llama-style TinyGPT: eager vs every op through labkit.kernels, same init and batches."""
    import itertools

    from labkit import datasets

    cfg = GPTConfig(vocab_size=76, block_size=8, n_layer=1, n_embd=32, n_head=4, n_kv_head=2, norm="rmsnorm",
                    mlp="swiglu", rope=True)
    data = datasets.token_dataset("char")
    batches = list(itertools.islice(datasets.batches(data, 4, 8, seed=0), 30))
    losses = {}
    for name in ("eager", "kernels"):
        torch.manual_seed(0)
        model = TinyGPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for x, y in batches:
            loss = model(x, y)[1] if name == "eager" else fkb.kernel_loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["eager"][-1] < losses["eager"][0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(losses["kernels"]), torch.tensor(losses["eager"]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="kernel_loss: model must be Llama-style"):
        fkb.kernel_loss(TinyGPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_embd=8, n_head=2)),
                        torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


# --- exercises ------------------------------------------------------------------------------------------


# A student's Triton RMSNorm: one program per row.
@triton.jit
def _student_rms_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(y_ptr + row * n_cols + cols, x * rstd * w, mask=mask)


@triton.jit
def _block_mean_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / BLOCK_C + eps)  # the classic slip: the padded block's size
    tl.store(y_ptr + row * n_cols + cols, x * rstd * w, mask=mask)


def _launch(kernel):
    def fn(x, weight, eps):
        x = x.contiguous()
        y = torch.empty_like(x)
        kernel[(x.shape[0],)](x, weight, y, x.shape[1], eps, BLOCK_C=triton.next_power_of_2(x.shape[1]))
        return y
    return fn


def _ce_grad_torch(logits, target, ignore_index, reduction, *, divide_by_all=False, keep_ignored=False):
    p = torch.softmax(logits.double(), dim=-1)
    scored = target != ignore_index
    rows = torch.arange(len(target))[scored]
    p[rows, target[scored]] -= 1
    if not keep_ignored:
        p[~scored] = 0
    if reduction == "mean":
        p = p / (len(target) if divide_by_all else scored.sum())
    return p.to(logits.dtype)


def _bytes(tokens, vocab, hidden, dtype_bytes, chunk_size, *, eager_factor=3, use_min=True):
    grads = (tokens + vocab) * hidden * dtype_bytes
    logits = tokens * vocab * dtype_bytes
    c = min(chunk_size, tokens) if use_min else chunk_size
    return max(eager_factor * logits, logits + grads), c * vocab * dtype_bytes + grads


def test_exercises_are_registered():
    assert labkit.exercises.exercises_for("17-fused-kernels") == [
        "fused-kernels.ce_grad", "fused-kernels.loss_layer_bytes", "fused-kernels.rmsnorm_kernel"]


@pytest.mark.parametrize("name,fn", [
    ("fused-kernels.rmsnorm_kernel", _launch(_student_rms_kernel)),
    ("fused-kernels.ce_grad", _ce_grad_torch),
    ("fused-kernels.loss_layer_bytes", _bytes),
])
def test_student_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn,message", [
    ("fused-kernels.rmsnorm_kernel", _launch(_block_mean_kernel), "values differ"),
    ("fused-kernels.rmsnorm_kernel", lambda x, weight, eps: eager_rms(x, weight, eps), "no Triton kernel was launched"),
    ("fused-kernels.ce_grad", lambda **kw: _ce_grad_torch(**kw, divide_by_all=True), "values differ"),
    ("fused-kernels.ce_grad", lambda **kw: _ce_grad_torch(**kw, keep_ignored=True), "values differ"),
    ("fused-kernels.loss_layer_bytes", lambda *a, **kw: _bytes(*a, **kw, eager_factor=1), "!= expected"),
    ("fused-kernels.loss_layer_bytes", lambda *a, **kw: _bytes(*a, **kw, use_min=False), "!= expected"),
])
def test_typical_mistakes_fail(name, fn, message):
    with pytest.raises(labkit.ExerciseFailed, match=message):
        labkit.check(name, fn, quiet=True)


# --- figures and benchmarks -------------------------------------------------------------------------------


def test_figures_build():
    from labkit.viz import fused_kernels as vf

    fig = vf.loss_memory_figure(8192, 128256, 4096, "bf16", 0)
    assert "eager 6.30 GB, fused 1.18 GB = 0.19x" in fig.layout.title.text
    fig = vf.loss_memory_figure(64, 300, 256, "fp32", 16)  # small vocab: dx and dW dominate eager's peak too
    assert fig.data[1].y[0] > 0
    with pytest.raises(ValueError, match="loss_memory_figure: dtype must be one of"):
        vf.loss_memory_figure(dtype="fp4")
    with pytest.raises(ValueError, match="loss_memory_figure: vocab must be an int >= 1, got 0"):
        vf.loss_memory_figure(vocab=0)
    rows = [{"name": "rmsnorm", "eager_bytes": 10, "fused_bytes": 2}]
    assert vf.traffic_figure(rows).data[0].text[0] == "5.0x"
    assert len(vf.chunk_sweep_figure([1, 2], [3, 4], 10, model=[3, 4]).data) == 3


def test_benchmark_rows(monkeypatch):
    from labkit.viz import fused_kernels as vf

    tiny = dict(dtype=torch.float32, tokens=64, hidden=16, vocab=512, chunk_size=16, intermediate=32, n_head=2,
                n_kv_head=1, head_dim=8, repeats=1, warmup=0)
    monkeypatch.setattr(fkb, "settings", lambda quick=False: dict(tiny))
    rows = fkb.run(quick=True)
    flce = {r["impl"]: r for r in rows if r["kind"] == "flce"}
    assert set(flce) == {"eager", "labkit", "liger"}  # Liger's FLCE runs under the interpreter
    assert flce["labkit"]["memory_vs_eager"] < 0.5 and flce["eager"]["memory_vs_eager"] == 1.0
    assert flce["eager"]["peak_bytes"] == pytest.approx(3 * 64 * 512 * 4, rel=1e-3)  # three (N, V) tensors
    assert flce["labkit"]["time_vs_liger"] > 0 and "PeakMemory" in flce["labkit"]["memory_measured_by"]
    assert flce["labkit"]["roof_fraction"] == pytest.approx(flce["labkit"]["tflops"] / flce["labkit"]["roof_tflops"])
    ops = {r["kind"]: r for r in rows if r["kind"] != "flce"}
    assert set(ops) == {"rmsnorm", "swiglu", "rope"}
    for r in ops.values():
        assert r["baseline"] == "eager" and r["median_ms"] > 0 and r["eager_bytes"] > r["fused_bytes"] > 0
        assert r["gb_per_s"] == pytest.approx(r["fused_bytes"] / r["median_ms"] / 1e6)
        assert r["roof_fraction"] == pytest.approx(r["gb_per_s"] / r["roof_gb_per_s"])
    for r in rows:  # the conventions both Part V benchmarks follow
        assert r["device"].startswith("cpu") and r["ratio"] == pytest.approx(r["baseline_ms"] / r["median_ms"])
    assert len(vf.bench_figure(rows).data) >= 5


# --- GPU: compiled kernels against Liger-Kernel ----------------------------------------------------------


def _cuda(*shape, seed=0, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to("cuda", dtype).requires_grad_()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_rms_norm_swiglu_rope_match_liger(dtype):
    lf = pytest.importorskip("liger_kernel.transformers.functional")
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def close(a, b):  # fp32: Liger's own fp32 RMSNorm tolerance (sums over rows in another order)
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        else:
            close_bf16(a, b)

    def both(ours, theirs, *inputs):
        outs = []
        for fn in (ours, theirs):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            y = fn(*leaves)
            y = y if isinstance(y, tuple) else (y,)
            torch.autograd.backward(y, [torch.ones_like(t) * 0.5 for t in y])
            outs.append([t.detach().float() for t in y] + [t.grad.float() for t in leaves])
        for a, b in zip(*outs):
            close(a, b)

    x, w = _cuda(4, 333, 4096, dtype=dtype), _cuda(4096, seed=1, dtype=dtype)
    both(rms_norm, lambda a, b: lf.liger_rms_norm(a, b, 1e-6, in_place=False), x, w)
    g, u = _cuda(1000, 1433, dtype=dtype, scale=3.0), _cuda(1000, 1433, seed=1, dtype=dtype)
    both(swiglu, lf.liger_swiglu, g, u)
    q = _cuda(2, 257, 32, 128, dtype=dtype).detach().transpose(1, 2)
    k = _cuda(2, 257, 8, 128, seed=1, dtype=dtype).detach().transpose(1, 2)
    cos, sin = (t.cuda() for t in rope_cache(257, 128))
    full = [torch.cat([t, t], -1)[None] for t in (cos, sin)]
    both(lambda a, b: apply_rope(a, b, cos, sin), lambda a, b: liger_rotary_pos_emb(a, b, *full), q, k)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_cross_entropy_and_flce_match_liger(reduction):
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    z = _cuda(1000, 32003, dtype=torch.float32, scale=3.0)
    t = targets(1000, 32003).cuda()
    zl = z.detach().clone().requires_grad_()
    ours, theirs = cross_entropy(z, t, reduction=reduction), LigerCrossEntropyLoss(reduction=reduction)(zl, t)
    g = torch.rand_like(ours)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(z.grad, zl.grad)
    x, w = _cuda(2048, 512), _cuda(32003, 512, seed=1, scale=512 ** -0.5)
    xl, wl = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    t = targets(2048, 32003).cuda()
    ours = fused_linear_cross_entropy(x, w, t, reduction=reduction)
    theirs = LigerFusedLinearCrossEntropyLoss(reduction=reduction)(wl, xl, t)
    ref = eager_flce(xr, wr, t, reduction=reduction)
    g = torch.rand(ref.shape, device="cuda", dtype=torch.float64)
    for loss, leaves in ((ours, (x, w)), (theirs, (xl, wl)), (ref, (xr, wr))):
        loss.backward(g.to(loss.dtype))
    for a, b, r in ((ours, theirs, ref), (x.grad, xl.grad, xr.grad)):
        close_bf16(a, r)  # ours against fp64 ...
        close_bf16(b, r)  # ... and Liger's against the same reference
    for a in (w.grad, wl.grad):  # dW accumulates over 32 chunks in bf16 (both): Liger's mean rtol
        torch.testing.assert_close(a.double(), wr.grad, rtol=5e-2, atol=1e-2 * wr.grad.abs().max().item())


@pytest.mark.gpu
def test_gpu_flce_memory_and_kernel_loss():
    n, h, v = 4096, 1024, 65536
    x, w = _cuda(n, h), _cuda(v, h, seed=1, scale=h ** -0.5)
    t = targets(n, v).cuda()

    def peak(fn):
        def step():
            x.grad = w.grad = None
            fn().backward()
        step()  # warm-up: Triton compiles, cuBLAS allocates its workspaces (they stay, and would count once)
        x.grad = w.grad = None  # the measured call starts without gradients, like the model
        return fkb.peak_bytes(step)[0]

    eager, fused = peak(lambda: eager_flce(x, w, t)), peak(lambda: fused_linear_cross_entropy(x, w, t))
    model = loss_layer_bytes(n, v, h, 2)
    assert fused < 0.25 * eager
    assert fused <= 1.1 * model["fused"] and eager >= 0.9 * model["eager"]
    cfg = GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_embd=128, n_head=4, n_kv_head=2, norm="rmsnorm",
                    mlp="swiglu", rope=True)
    torch.manual_seed(0)
    model_ = TinyGPT(cfg).cuda()
    idx = torch.randint(0, 1000, (4, 64), device="cuda")
    torch.testing.assert_close(fkb.kernel_loss(model_, idx, idx), model_(idx, idx)[1], rtol=1e-4, atol=1e-4)
