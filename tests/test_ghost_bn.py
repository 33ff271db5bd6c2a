"""Tests of labkit.train.ghost_bn (chapter 08-ghost-bn): parity with nn.BatchNorm when one ghost batch
covers the batch, parity with a per-ghost-batch F.batch_norm reference otherwise (outputs, gradients,
running statistics), the split, eval mode, the statistics-noise formulas, argument checks, exercises,
figures and benchmarks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.benchmarks import ghost_bn as gbn_bench
from labkit.datasets import image_task
from labkit.train import ghost_bn as gbn
from labkit.train.ghost_bn import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d
from labkit.viz import ghost_bn as gbn_viz

BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
GBN = {2: GhostBatchNorm1d, 3: GhostBatchNorm1d, 4: GhostBatchNorm2d, 5: GhostBatchNorm}


def pair(shape, ghost_batch_size, dtype=torch.float64, seed=0, **kw):
    """A GhostBatchNorm and the nn.BatchNorm of the same kind with identical (random) parameters."""
    C = shape[1]
    ghost = GBN[len(shape)](C, ghost_batch_size, dtype=dtype, **kw)
    ref = BN[len(shape)](C, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed)
    if ghost.affine:
        with torch.no_grad():
            ghost.weight.copy_(0.5 + torch.rand(C, generator=g, dtype=dtype))
            ghost.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
    ref.load_state_dict(ghost.state_dict())
    return ghost, ref


def reference(bn: nn.Module, x: torch.Tensor, ghost_batch_size: int) -> torch.Tensor:
    """The definition: nn.BatchNorm on each ghost batch in turn (torch.split, one-value remainder merged)."""
    S = max(math.prod(x.shape[2:]), 1)
    return torch.cat([bn(chunk) for chunk in x.split(gbn.ghost_batch_sizes(x.shape[0], ghost_batch_size, S))])


def assert_same_state(a: nn.Module, b: nn.Module, **tol):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")


def run_both(ghost, ref, x, G, steps=3, seed=1):
    """`steps` training forward+backward passes of both on x-like inputs; returns the last outputs and input grads."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xi = (x + torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)).requires_grad_()
        xr = xi.detach().clone().requires_grad_()
        up = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        y_g, y_r = ghost(xi), reference(ref, xr, G) if G is not None else ref(xr)
        y_g.backward(up)
        y_r.backward(up)
    return y_g, y_r, xi.grad, xr.grad


# --- parity with nn.BatchNorm: one ghost batch -------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 5), (16, 5, 7), (16, 3, 4, 5), (6, 2, 3, 2, 2)])
@pytest.mark.parametrize("G", [16, 1000])
@pytest.mark.parametrize("kw", [dict(), dict(momentum=None, affine=False), dict(momentum=0.3, eps=1e-3)])
def test_one_ghost_batch_is_batchnorm_bitwise(shape, G, kw):
    """ghost_batch_size >= N: outputs, input/parameter gradients, running stats and num_batches_tracked equal
    nn.BatchNorm's exactly, over several training steps and then in eval mode."""
    x = torch.randn(*shape, dtype=torch.float32)
    ghost, ref = pair(shape, G, dtype=torch.float32, **kw)
    y_g, y_r, gx, rx = run_both(ghost, ref, x, None)
    assert torch.equal(y_g, y_r) and torch.equal(gx, rx)
    for p, q in zip(ghost.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    for a, b in zip(ghost.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    ghost.eval(), ref.eval()
    assert torch.equal(ghost(x), ref(x))


def test_untracked_running_stats_match_batchnorm_in_train_and_eval():
    x = torch.randn(12, 4, dtype=torch.float64)
    ghost, ref = pair((12, 4), 64, track_running_stats=False)
    assert ghost.running_mean is None and ghost.num_batches_tracked is None
    torch.testing.assert_close(ghost(x), ref(x), rtol=0, atol=0)
    ghost.eval(), ref.eval()  # no buffers: batch statistics in eval too
    torch.testing.assert_close(ghost(x), ref(x), rtol=0, atol=0)
    ghost.ghost_batch_size = 4  # ... and ghost-batch statistics when there are several
    torch.testing.assert_close(ghost(x), reference(ref, x, 4), rtol=1e-12, atol=1e-12)


def test_empty_batch_behaves_like_batchnorm():
    ghost, ref = pair((0, 3), 4, dtype=torch.float32)
    x = torch.randn(0, 3)
    assert ghost(x).shape == ref(x).shape == (0, 3)
    assert_same_state(ghost, ref, rtol=0, atol=0)


# --- parity with the per-ghost-batch reference ---------------------------------------------------


@pytest.mark.parametrize("shape,G", [((32, 5), 8), ((37, 5), 8), ((37, 5), 6), ((20, 3, 7), 4), ((21, 3, 4, 4), 4),
                                     ((21, 3, 2, 2), 1), ((9, 2, 5), 2), ((10, 2, 2, 2, 2), 3)])
@pytest.mark.parametrize("kw", [dict(), dict(momentum=None), dict(affine=False, momentum=0.5)])
def test_matches_batchnorm_per_ghost_batch(shape, G, kw):
    """Several ghost batches (divisible, remainder, merged one-value remainder, G = 1 on images): outputs,
    gradients of input, gamma and beta, running stats and num_batches_tracked match the definition."""
    x = 3.0 + 2.0 * torch.randn(*shape, dtype=torch.float64)
    ghost, ref = pair(shape, G, **kw)
    y_g, y_r, gx, rx = run_both(ghost, ref, x, G, steps=2)
    torch.testing.assert_close(y_g, y_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)
    for p, q in zip(ghost.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert_same_state(ghost, ref, rtol=1e-12, atol=1e-12)
    assert ghost.num_batches_tracked.item() == 2 * len(gbn.ghost_batch_sizes(shape[0], G, math.prod(shape[2:])))


@given(n=st.integers(2, 30), c=st.integers(1, 4), spatial=st.sampled_from([(), (3,), (2, 2), (1, 1)]),
       G=st.integers(1, 48), momentum=st.sampled_from([0.0, 0.1, 0.9, 1.0, None]), seed=st.integers(0, 2**16))
def test_property_matches_reference(n, c, spatial, G, momentum, seed):
    shape = (n, c, *spatial)
    S = math.prod(spatial)
    if S == 1 and (G == 1 or n == 1):
        return  # one value per channel in every ghost batch: rejected (tested below)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 4 - 1
    ghost = GhostBatchNorm(c, G, momentum=momentum, dtype=torch.float64)
    ref = BN[4](c, momentum=momentum, dtype=torch.float64)  # _BatchNorm's maths does not depend on the rank
    ref._check_input_dim = lambda _: None
    y_g, y_r, gx, rx = run_both(ghost, ref, x, G, steps=1, seed=seed)
    torch.testing.assert_close(y_g, y_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, rx, rtol=1e-8, atol=1e-10)
    assert_same_state(ghost, ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_fp64():
    """Plain PyTorch ops, but check the composite anyway: input, gamma and beta, with a remainder ghost batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: gbn.ghost_batch_norm(x, 2, weight=w, bias=b), (x, w, b))


# --- what ghost batches do ---------------------------------------------------------------------


@given(n_ghosts=st.integers(2, 5), G=st.integers(2, 9), c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_ghost_batches_are_independent_and_standardized(n_ghosts, G, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_ghosts * G, c, generator=g, dtype=torch.float64) * 3 + 1
    eps = 1e-12
    y = gbn.ghost_batch_norm(x, G, eps=eps)
    for chunk, xk in zip(y.split(G), x.split(G)):  # every ghost batch: mean 0, biased variance ~1 per channel
        v = xk.var(0, correction=0)
        torch.testing.assert_close(chunk.mean(0), torch.zeros(c, dtype=torch.float64), rtol=0, atol=1e-8)
        torch.testing.assert_close(chunk.var(0, correction=0), v / (v + eps), rtol=1e-8, atol=0)
    x2 = x.clone()
    x2[G:] = torch.randn(x2[G:].shape, generator=g, dtype=torch.float64) * 10  # change every other ghost batch
    torch.testing.assert_close(gbn.ghost_batch_norm(x2, G, eps=1e-12)[:G], y[:G], rtol=0, atol=0)


def test_ghost_size_one_on_images_is_instance_norm():
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(gbn.ghost_batch_norm(x, 1), F.instance_norm(x), rtol=1e-12, atol=1e-12)


def test_running_stats_closed_form_and_cumulative_average():
    """One forward of K ghost batches: r = (1 - m)^K r0 + sum_k m (1 - m)^(K - k) s_k; momentum=None averages."""
    x = torch.randn(24, 3, dtype=torch.float64) * 2 + 1
    layer = GhostBatchNorm1d(3, 6, momentum=0.2, dtype=torch.float64)
    layer(x)
    chunks = x.split(6)
    m, K = 0.2, len(chunks)
    expected = sum(m * (1 - m) ** (K - 1 - k) * c.mean(0) for k, c in enumerate(chunks))  # r0 = 0
    torch.testing.assert_close(layer.running_mean, expected, rtol=1e-12, atol=1e-12)
    expected_var = (1 - m) ** K + sum(m * (1 - m) ** (K - 1 - k) * c.var(0) for k, c in enumerate(chunks))
    torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-12, atol=1e-12)

    cum = GhostBatchNorm1d(3, 4, momentum=None, dtype=torch.float64)
    xs = [torch.randn(12, 3, dtype=torch.float64) for _ in range(3)]
    for xi in xs:
        cum(xi)
    all_chunks = [c for xi in xs for c in xi.split(4)]
    torch.testing.assert_close(cum.running_mean, torch.stack([c.mean(0) for c in all_chunks]).mean(0))
    torch.testing.assert_close(cum.running_var, torch.stack([c.var(0) for c in all_chunks]).mean(0))
    assert cum.num_batches_tracked.item() == 9


@given(k=st.integers(0, 40), momentum=st.one_of(st.none(), st.floats(0.0, 1.0)), t0=st.integers(0, 50))
def test_momentum_weights_sum_to_one_and_match_the_recursion(k, momentum, t0):
    keep, w = gbn.momentum_weights(k, momentum, t0)
    assert len(w) == k and all(v >= 0 for v in w)
    if momentum is None and t0 == 0 and k > 0:
        assert keep == 0.0 and w == pytest.approx([1 / k] * k)
    assert keep + sum(w) == pytest.approx(1.0)
    r, vals = 0.37, [0.1 * j - 1 for j in range(k)]  # the recursion, step by step
    for j, v in enumerate(vals, start=1):
        f = momentum if momentum is not None else 1 / (t0 + j)
        r = (1 - f) * r + f * v
    assert keep * 0.37 + sum(wj * v for wj, v in zip(w, vals)) == pytest.approx(r, abs=1e-12)


def test_eval_uses_running_stats_and_does_not_update_them():
    layer = GhostBatchNorm2d(3, 2)
    layer(torch.randn(8, 3, 4, 4) * 2 + 5)
    layer.eval()
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(8, 3, 4, 4)
    rm, rv = layer.running_mean.view(1, 3, 1, 1), layer.running_var.view(1, 3, 1, 1)
    expected = (x - rm) / torch.sqrt(rv + layer.eps) * layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    # eval output of one sample does not depend on the rest of the batch
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1])


def test_reduced_precision_input_keeps_dtype_and_float32_stats():
    x = torch.randn(32, 4, 3, 3) * 3 + 2
    exact = GhostBatchNorm2d(4, 8)
    half = copy.deepcopy(exact)
    y32 = exact(x)
    y16 = half(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and half.running_mean.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=0.02, atol=0.05)
    torch.testing.assert_close(half.running_mean, exact.running_mean, rtol=0.02, atol=0.02)


# --- the split -----------------------------------------------------------------------------------


@given(n=st.integers(0, 300), G=st.integers(1, 64), S=st.integers(1, 4))
def test_split_sizes(n, G, S):
    sizes = gbn.ghost_batch_sizes(n, G, S)
    assert sum(sizes) == n
    if n <= G:
        assert sizes == [n]
        return
    assert all(s == G for s in sizes[:-1])
    assert 1 <= sizes[-1] <= G + 1
    plain = [len(c) for c in torch.arange(n).split(G)]
    if sizes != plain:  # only the one-value remainder is merged
        assert S == 1 and plain[-1] == 1 and sizes == plain[:-2] + [G + 1]
    if S == 1 and G > 1:
        assert all(s >= 2 for s in sizes)


def test_split_examples():
    assert gbn.ghost_batch_sizes(37, 8) == [8, 8, 8, 8, 5]
    assert gbn.ghost_batch_sizes(37, 6) == [6, 6, 6, 6, 6, 7]  # the single sample left joins the last ghost batch
    assert gbn.ghost_batch_sizes(37, 6, values_per_sample=4) == [6, 6, 6, 6, 6, 6, 1]  # 4 values: kept
    assert gbn.ghost_batch_sizes(65, 64) == [65]


# --- modules: state_dict, conversion, the knob ---------------------------------------------------


def test_state_dict_is_batchnorm_compatible_and_conversion_keeps_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Unflatten(1, (2, 2, 2)),
                          nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(32, 6)
    model(x)  # non-trivial running stats
    converted = gbn.convert_to_ghost_batchnorm(copy.deepcopy(model), 8)
    assert isinstance(converted[1], GhostBatchNorm1d) and isinstance(converted[4], GhostBatchNorm2d)
    assert converted[1].ghost_batch_size == 8 and "ghost_batch_size=8" in repr(converted[1])
    assert_same_state(converted, model, rtol=0, atol=0)
    converted.eval(), model.eval()
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)  # eval: running stats, the same model
    converted.train(), model.train()
    for m in converted.modules():
        if isinstance(m, GhostBatchNorm):
            m.ghost_batch_size = 32  # one ghost batch: training mode is batch norm again
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    lone = gbn.convert_to_ghost_batchnorm(nn.BatchNorm2d(3).eval(), 4)
    assert isinstance(lone, GhostBatchNorm2d) and not lone.training
    bn = nn.BatchNorm1d(8)
    bn.load_state_dict(converted[1].state_dict())  # and back


@pytest.mark.parametrize("kind", [GhostBatchNorm1d, GhostBatchNorm2d])
def test_to_device_and_dtype_like_batchnorm(kind):
    layer = kind(3, 4).double()
    assert layer.running_mean.dtype == torch.float64 and layer.weight.dtype == torch.float64
    assert layer.ghost_batch_size == 4


# --- argument checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_features=0, ghost_batch_size=4), ValueError,
     r"GhostBatchNorm1d: num_features must be an int >= 1, got 0"),
    (dict(num_features=2.0, ghost_batch_size=4), TypeError, r"num_features must be an int, got float"),
    (dict(num_features=3, ghost_batch_size=0), ValueError, r"ghost_batch_size must be an int >= 1, got 0"),
    (dict(num_features=3, ghost_batch_size="8"), TypeError, r"ghost_batch_size must be an int, got str"),
    (dict(num_features=3, ghost_batch_size=4, eps=-1e-5), ValueError, r"eps must be in \(0, inf\), got -1e-05"),
    (dict(num_features=3, ghost_batch_size=4, momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    (dict(num_features=3, ghost_batch_size=4, momentum="0.1"), TypeError, r"momentum must be a real number"),
    (dict(num_features=3, ghost_batch_size=4, affine=1), TypeError, r"affine must be a bool, got int"),
    (dict(num_features=3, ghost_batch_size=4, track_running_stats=None), TypeError,
     r"track_running_stats must be a bool, got NoneType"),
])
def test_constructor_checks(kwargs, error, match):
    with pytest.raises(error, match=match):
        GhostBatchNorm1d(**kwargs)


def test_ghost_batch_size_setter_checks():
    layer = GhostBatchNorm1d(3, 4)
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d: ghost_batch_size must be an int >= 1, got -2"):
        layer.ghost_batch_size = -2
    assert layer.ghost_batch_size == 4


@pytest.mark.parametrize("layer,x,error,match", [
    (GhostBatchNorm1d(3, 4), torch.randn(4, 3, 2, 2), ValueError,
     r"GhostBatchNorm1d: input must be 2-D \(N, C\) or 3-D \(N, C, L\), got shape \(4, 3, 2, 2\)"),
    (GhostBatchNorm2d(3, 4), torch.randn(4, 3), ValueError,
     r"GhostBatchNorm2d: input must be 4-D \(N, C, H, W\), got shape \(4, 3\)"),
    (GhostBatchNorm(3, 4), torch.randn(4), ValueError,
     r"GhostBatchNorm: input must have shape \(N, C, \*\), got shape \(4,\)"),
    (GhostBatchNorm1d(3, 4), torch.randn(8, 5), ValueError,
     r"input must have 3 channels \(dim 1\), got shape \(8, 5\)"),
    (GhostBatchNorm1d(3, 4), [[1.0, 2.0, 3.0]], TypeError, r"GhostBatchNorm1d: input must be a torch.Tensor, got list"),
    (GhostBatchNorm1d(3, 1), torch.randn(8, 3), ValueError,
     r"ghost_batch_size=1 leaves one value per channel .* shape \(8, 3\); use ghost_batch_size >= 2"),
])
def test_input_checks(layer, x, error, match):
    with pytest.raises(error, match=match):
        layer(x)


@pytest.mark.parametrize("call,error,match", [
    (lambda: gbn.ghost_batch_norm("x", 4), TypeError, r"ghost_batch_norm: x must be a torch.Tensor, got str"),
    (lambda: gbn.ghost_batch_norm(torch.randn(5), 4), ValueError, r"x must have shape \(N, C, \*\), got shape \(5,\)"),
    (lambda: gbn.ghost_batch_norm(torch.randn(8, 2), 0), ValueError, r"ghost_batch_size must be an int >= 1, got 0"),
    (lambda: gbn.ghost_batch_norm(torch.randn(8, 2), 4, eps=0.0), ValueError, r"eps must be in \(0, inf\), got 0.0"),
    (lambda: gbn.ghost_batch_norm(torch.randn(8, 2), 4, momentum=-0.1), ValueError, r"momentum must be in \[0, 1\]"),
    (lambda: gbn.ghost_batch_norm(torch.randn(8, 2), 4, torch.zeros(2)), ValueError,
     r"running_mean and running_var must be given together"),
    (lambda: gbn.ghost_batch_norm(torch.randn(8, 2), 4, torch.zeros(2), torch.ones(2), momentum=None), ValueError,
     r"momentum=None \(a cumulative average\) needs num_batches_tracked"),
    (lambda: gbn.ghost_batch_sizes(-1, 4), ValueError, r"ghost_batch_sizes: n must be an int >= 0, got -1"),
    (lambda: gbn.ghost_batch_sizes(8, 0), ValueError,
     r"ghost_batch_sizes: ghost_batch_size must be an int >= 1, got 0"),
    (lambda: gbn.ghost_batch_sizes(8, 2, 0), ValueError, r"values_per_sample must be an int >= 1, got 0"),
    (lambda: gbn.momentum_weights(-1, 0.1), ValueError, r"momentum_weights: k must be an int >= 0, got -1"),
    (lambda: gbn.momentum_weights(2, 2.0), ValueError, r"momentum_weights: momentum must be in \[0, 1\], got 2.0"),
    (lambda: gbn.momentum_weights(2, 0.1, -3), ValueError, r"num_batches_tracked must be an int >= 0, got -3"),
    (lambda: gbn.convert_to_ghost_batchnorm("net", 4), TypeError, r"module must be an nn.Module, got str"),
    (lambda: gbn.convert_to_ghost_batchnorm(nn.BatchNorm1d(2), 0), ValueError, r"ghost_batch_size must be an int >= 1"),
    (lambda: gbn.mean_std(0), ValueError, r"mean_std: batch_size must be an int >= 1, got 0"),
    (lambda: gbn.mean_std(4, -1.0), ValueError, r"mean_std: sigma must be in \[0, inf\), got -1.0"),
    (lambda: gbn.mean_std(8, 1.0, population=4), ValueError, r"batch_size must be <= population, got 8 > 4"),
    (lambda: gbn.mean_std(8, 1.0, population=0), ValueError, r"population must be an int >= 1, got 0"),
    (lambda: gbn.var_std(1), ValueError, r"var_std: batch_size must be an int >= 2, got 1"),
    (lambda: gbn.var_std(4, -2.0), ValueError, r"var_std: sigma must be in \[0, inf\)"),
    (lambda: gbn.var_std(4, 1.0, -3.0), ValueError, r"var_std: excess_kurtosis must be in \[-2, inf\), got -3.0"),
    (lambda: gbn.batch_statistics(torch.randn(10), 2), ValueError, r"batch_statistics: x must be a \(P, C\) tensor"),
    (lambda: gbn.batch_statistics(torch.randn(10, 1), 11), ValueError, r"batch_size must be <= the number of rows"),
    (lambda: gbn.batch_statistics(torch.randn(10, 1), 0), ValueError, r"batch_size must be an int >= 1, got 0"),
    (lambda: gbn.batch_statistics(torch.randn(10, 1), 2, epochs=0), ValueError, r"epochs must be an int >= 1, got 0"),
    (lambda: gbn.excess_kurtosis([1.0, 2.0]), ValueError, r"excess_kurtosis: x must be a \(P, C\) tensor, got list"),
])
def test_function_checks(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- the noise of batch statistics ---------------------------------------------------------------


def test_closed_forms():
    assert gbn.mean_std(16, 2.0) == pytest.approx(0.5)
    assert gbn.mean_std(10, 1.0, population=10) == 0.0  # the whole population: no spread
    assert gbn.mean_std(1, 1.0, population=1) == 0.0
    assert gbn.var_std(32) == pytest.approx(math.sqrt(2 * 31) / 32)  # Gaussian: sigma^2 sqrt(2 (B - 1)) / B
    assert gbn.var_std(32, 3.0) == pytest.approx(9 * math.sqrt(2 * 31) / 32)
    # +-1 with probability 1/2 (excess kurtosis -2), B = 2: v = 0 or 1, each with probability 1/2: std 1/2
    assert gbn.var_std(2, 1.0, -2.0) == pytest.approx(0.5)


@pytest.mark.parametrize("dist,kurt", [("gaussian", 0.0), ("laplace", 3.0), ("uniform", -1.2)])
def test_sampled_spread_matches_closed_forms(dist, kurt):
    """Batches drawn like a data loader from a large fixed population: std of the batch mean ~ sigma / sqrt(B)
    (finite-population corrected) and std of the batch variance ~ var_std, within sampling error."""
    g = torch.Generator().manual_seed(0)
    P = 2**15
    x = {"gaussian": lambda: torch.randn(P, 2, generator=g, dtype=torch.float64),
         "laplace": lambda: -torch.log(torch.rand(P, 2, generator=g, dtype=torch.float64))
         * (torch.randint(0, 2, (P, 2), generator=g) * 2 - 1),
         "uniform": lambda: torch.rand(P, 2, generator=g, dtype=torch.float64)}[dist]()
    assert gbn.excess_kurtosis(x).numpy() == pytest.approx([kurt, kurt], abs=0.75 if dist == "laplace" else 0.06)
    sigma = x.std(0, correction=0)
    k_hat = gbn.excess_kurtosis(x)
    for B in (4, 32, 256):
        m, v = gbn.batch_statistics(x, B, epochs=max(1, 2048 * B // P), generator=g)
        assert m.shape == v.shape == (max(1, 2048 * B // P) * (P // B), 2)
        for c in range(2):
            assert m[:, c].std().item() == pytest.approx(gbn.mean_std(B, sigma[c].item(), population=P), rel=0.1)
            assert v[:, c].std().item() == pytest.approx(gbn.var_std(B, sigma[c].item(), k_hat[c].item()), rel=0.15)


def test_excess_kurtosis_exact_values():
    two_point = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 4.0]])  # col 1: one outlier in four
    k = gbn.excess_kurtosis(two_point)
    assert k[0].item() == pytest.approx(-2.0)
    assert k[1].item() == pytest.approx((3**4 + 3 * 1) / 4 / ((3**2 + 3 * 1) / 4) ** 2 - 3)  # (84/4) / 3^2 - 3


def test_batch_statistics_is_a_partition_of_each_epoch():
    x = torch.arange(12.0).reshape(12, 1)
    m, v = gbn.batch_statistics(x, 4, epochs=2, generator=torch.Generator().manual_seed(0))
    assert m.shape == (6, 1)
    torch.testing.assert_close(m[:3].mean(), x.mean())  # three batches of four cover the 12 rows once
    torch.testing.assert_close(m[3:].mean(), x.mean())
    assert (v >= 0).all()


# --- exercises ------------------------------------------------------------------------------------


def _normalize_by_hand(x, ghost_batch_size, eps):
    dims = [0] + list(range(2, x.dim()))
    out = []
    for c in x.split(ghost_batch_size):
        out.append((c - c.mean(dims, keepdim=True)) / torch.sqrt(c.var(dims, correction=0, keepdim=True) + eps))
    return torch.cat(out)


def _running_by_hand(running_mean, running_var, x, ghost_batch_size, momentum, bessel=True):
    dims = [0] + list(range(2, x.dim()))
    rm, rv = running_mean.clone(), running_var.clone()
    for c in x.split(ghost_batch_size):
        rm = (1 - momentum) * rm + momentum * c.mean(dims)
        rv = (1 - momentum) * rv + momentum * c.var(dims, correction=1 if bessel else 0)
    return rm, rv


def _std_by_hand(sigma, batch_size, excess_kurtosis):
    B = batch_size
    return sigma / math.sqrt(B), (B - 1) / B * sigma**2 * math.sqrt(excess_kurtosis / B + 2 / (B - 1))


def test_exercises_pass_with_correct_answers():
    assert labkit.check("ghost_bn.ghost_normalize", _normalize_by_hand, quiet=True)
    assert labkit.check("ghost_bn.running_stats", _running_by_hand, quiet=True)
    assert labkit.check("ghost_bn.stat_std", _std_by_hand, quiet=True)
    assert sorted(labkit.exercises.exercises_for("08-ghost-bn")) == [
        "ghost_bn.ghost_normalize", "ghost_bn.running_stats", "ghost_bn.stat_std"]


@pytest.mark.parametrize("name,wrong", [
    ("ghost_bn.ghost_normalize",  # the whole batch at once
     lambda x, ghost_batch_size, eps: _normalize_by_hand(x, x.shape[0], eps)),
    ("ghost_bn.ghost_normalize", lambda x, ghost_batch_size, eps: torch.cat([  # unbiased variance
        (c - c.mean(0)) / torch.sqrt(c.var(0) + eps) for c in x.split(ghost_batch_size)])),
    ("ghost_bn.running_stats", lambda **kw: _running_by_hand(**kw, bessel=False)),
    ("ghost_bn.running_stats", lambda running_mean, running_var, x, ghost_batch_size, momentum:  # one update per call
     _running_by_hand(running_mean, running_var, x, x.shape[0], momentum)),
    ("ghost_bn.stat_std", lambda sigma, batch_size, excess_kurtosis: (sigma / batch_size, 0.0)),
    ("ghost_bn.stat_std", lambda sigma, batch_size, excess_kurtosis:  # the unbiased variance's std
     (sigma / math.sqrt(batch_size), sigma**2 * math.sqrt(excess_kurtosis / batch_size + 2 / (batch_size - 1)))),
])
def test_exercises_catch_wrong_answers(name, wrong, capsys):
    with pytest.raises(labkit.exercises.ExerciseFailed):
        labkit.check(name, wrong)
    assert "failed" in capsys.readouterr().out


def test_not_attempted_is_reported():
    def todo(**kw):
        raise NotImplementedError
    assert labkit.check("ghost_bn.stat_std", todo, quiet=True).status == "not attempted"


# --- the experiment harness, figures and benchmarks (tiny sizes) ----------------------------------


def test_train_run_learns_and_ghost_model_is_converted():
    task = image_task(256, 256, n_val=128, noise=0.5)
    r = gbn_bench.train_run(task, 64, 0.1, epochs=4, width=32, ghost_batch_size=16)
    assert r["steps"] == 16 and len(r["test_acc_curve"]) == 4
    assert r["test_acc"] > 0.5 > 1 / task.classes  # far above chance after 16 steps on an easy version
    assert r["val_acc"] > 0.5 and r["test_acc_curve"][-1] == r["test_acc"]
    assert sum(isinstance(m, GhostBatchNorm1d) for m in r["model"].modules()) == 2
    assert r["model"][2].ghost_batch_size == 16 and r["model"][2].num_batches_tracked.item() == 16 * 4
    with pytest.raises(ValueError, match=r"train_run: batch_size must be <= the training set size 256, got 512"):
        gbn_bench.train_run(task, 512, 0.1)


def test_plan_and_lr_choices():
    s = gbn_bench.settings(quick=True)
    assert s["sqrt_lr"] == pytest.approx(s["small_lr"] * math.sqrt(s["large_batch"] / s["small_batch"]))
    runs = gbn_bench.plan(s)
    assert [r[1] for r in runs[:3]] == [s["small_batch"], s["large_batch"], s["large_batch"]]
    assert [r[2] for r in runs[:3]] == [s["small_lr"], s["sqrt_lr"], s["large_lr"]]
    assert [r[3] for r in runs[3:]] == list(s["ghost_sizes"]) and all(r[2] == s["large_lr"] for r in runs[3:])
    assert gbn_bench.sweep_plan(s) == []
    full = gbn_bench.sweep_plan(gbn_bench.settings(quick=False))
    assert {r[2] for r in full if r[1] == s["large_batch"]} >= {s["sqrt_lr"], s["large_lr"]}
    with pytest.raises(TypeError, match=r"settings: quick must be a bool, got int"):
        gbn_bench.settings(1)


def test_generalization_rows_train_each_configuration_once(monkeypatch):
    base, real_run, calls = gbn_bench.settings, gbn_bench.train_run, []

    def tiny(quick=False):
        s = base(quick)
        s.update(n_train=64, n_test=32, n_val=32, epochs=1, width=8, small_batch=8, large_batch=32, small_lr=0.1,
                 large_lr=0.4, sqrt_lr=0.2, ghost_sizes=(8,), seeds=(0, 1),
                 lr_sweep={"small": (0.1,), "large": (0.2, 0.8), "ghost": (0.4,)}, sweep_ghost_size=8)
        return s

    def counting(task, b, lr, **kw):
        calls.append((b, lr, kw["ghost_batch_size"]))
        return real_run(task, b, lr, **kw)

    monkeypatch.setattr(gbn_bench, "settings", tiny)
    monkeypatch.setattr(gbn_bench, "train_run", counting)
    rows = gbn_bench.generalization_rows(quick=False, progress=False)
    assert [r["kind"] for r in rows] == ["generalization"] * 4 + ["lr_sweep"] * 4
    assert [(r["batch_size"], r["lr"], r["ghost_batch_size"]) for r in rows[:4]] == [
        (8, 0.1, 8), (32, 0.2, 32), (32, 0.4, 32), (32, 0.4, 8)]
    assert set(calls) == {(8, 0.1, None), (32, 0.2, None), (32, 0.4, None), (32, 0.4, 8), (32, 0.8, None)}
    assert len(calls) == 5 * 2  # five distinct configurations, two seeds each: no configuration twice
    assert all(r["seeds"] == 2 and 0 <= r["test_acc"] <= 1 and r["test_acc_std"] >= 0 for r in rows)


def test_timing_rows(monkeypatch):
    base = gbn_bench.settings

    def tiny(quick=False):
        s = base(quick)
        s["timing"] = dict(linear=(16, 4), conv=(8, 2, 3, 3), ghost_sizes=(4, 2))
        return s

    monkeypatch.setattr(gbn_bench, "settings", tiny)
    rows = gbn_bench.timing_rows(quick=True)
    assert [(r["layout"], r["ghost_batch_size"], r["ghost_batches"]) for r in rows] == [
        ("linear", 16, 1), ("linear", 4, 4), ("linear", 2, 8), ("conv", 8, 1), ("conv", 4, 2), ("conv", 2, 4)]
    assert all(r["median_ms"] > 0 and r["baseline_ms"] > 0 and r["loop_ms"] > 0 for r in rows)
    fig = gbn_viz.timing_figure(rows)
    assert len(fig.data) == 6


def test_naive_reference_matches_the_module():
    x = torch.randn(20, 3, dtype=torch.float64)
    ghost, ref = pair((20, 3), 6)
    torch.testing.assert_close(gbn_bench.naive_ghost_batch_norm(x, ref, 6), ghost(x))
    assert_same_state(ghost, ref)


def test_stat_spread_figure_title_and_checks():
    fig = gbn_viz.stat_spread_figure(32, "gaussian")
    assert "G = 32" in fig.layout.title.text and "σ/√G = 0.177" in fig.layout.title.text
    curve = gbn_viz.spread_curve("gaussian")
    for got, want in zip(curve["mean_std"], curve["mean_theory"]):
        assert got == pytest.approx(want, rel=0.1)
    with pytest.raises(ValueError, match=r"stat_spread_figure: ghost_batch_size must be one of"):
        gbn_viz.stat_spread_figure(3)
    with pytest.raises(ValueError, match=r"population: distribution must be one of"):
        gbn_viz.stat_spread_figure(32, "cauchy")


def test_generalization_and_noise_figures():
    rows = [dict(name="small", test_acc=0.86, test_acc_std=0.01, test_loss=0.5, batch_size=32, ghost_batch_size=32),
            dict(name="large", test_acc=0.81, test_loss=0.7, batch_size=512, ghost_batch_size=512),
            dict(name="ghost", test_acc=0.83, test_loss=0.6, batch_size=512, ghost_batch_size=32)]
    fig = gbn_viz.generalization_figure(rows)
    assert list(fig.data[0].y) == [0.86, 0.81, 0.83]
    with pytest.raises(ValueError, match=r"every row needs the key\(s\) \['test_loss'\]"):
        gbn_viz.generalization_figure([dict(name="a", test_acc=0.5)])
    fig = gbn_viz.noise_vs_batch_figure([2, 4], {"mean": [0.7, 0.5]}, {"1/sqrt(B)": [0.71, 0.5]})
    assert len(fig.data) == 2
    with pytest.raises(ValueError, match=r"measured\['mean'\] has 1 values for 2 batch sizes"):
        gbn_viz.noise_vs_batch_figure([2, 4], {"mean": [0.7]})


@pytest.mark.gpu
def test_cuda_matches_reference_and_batchnorm():
    dev = torch.device("cuda")
    for shape, G in (((512, 64), 32), ((64, 16, 8, 8), 8), ((100, 8), 128)):
        x = torch.randn(*shape, device=dev) * 2 + 1
        ghost, ref = pair(shape, G, dtype=torch.float32)
        ghost, ref = ghost.to(dev), ref.to(dev)
        y_g, y_r, gx, rx = run_both(ghost, ref, x, G if G < shape[0] else None)
        torch.testing.assert_close(y_g, y_r, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gx, rx, rtol=1e-3, atol=1e-4)
        assert_same_state(ghost, ref, rtol=1e-4, atol=1e-5)
    y = GhostBatchNorm2d(16, 8).to(dev)(torch.randn(64, 16, 8, 8, device=dev, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
