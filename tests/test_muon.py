"""Tests of labkit.optim.muon (chapter 05-muon): parity with torch.optim.Muon and AdamW, Newton-Schulz
properties, the parameter split, hyperparameter checks, exercises, figures and benchmarks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import labkit
from labkit.models import GPTConfig, TinyGPT
from labkit.optim import memory as mem
from labkit.optim import muon as mu

TorchMuon = getattr(torch.optim, "Muon", None)
needs_torch_muon = pytest.mark.skipif(TorchMuon is None, reason=f"torch {torch.__version__} has no torch.optim.Muon "
                                      "(the parity tests need it; older builds lack it)")
J, C = mu.JORDAN_COEFFICIENTS, mu.CUBIC_COEFFICIENTS


def params_like(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g, dtype=dtype)) for s in shapes]


def run_steps(opt, params, steps, seed=1, none_for=()):
    """`steps` optimizer steps on seeded random gradients (the same sequence for every call)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(p.dtype)  # the same numbers whatever the dtype
            p.grad = None if i in none_for else grad
        opt.step()


def reference_ns(G, steps, coefficients, eps):
    """Newton-Schulz written out plainly (Jordan et al. 2024), in G's dtype."""
    a, b, c = coefficients
    X = G / torch.linalg.matrix_norm(G).clamp(min=eps)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


SHAPES = [(32, 16), (16, 40), (8, 8), (1, 7), (9, 1)]


# --- parity ------------------------------------------------------------------------------


@needs_torch_muon
@pytest.mark.parametrize("adjust_lr", mu.ADJUST_LR)
@pytest.mark.parametrize("nesterov,momentum,wd", [(True, 0.95, 0.0), (False, 0.9, 0.1), (True, 0.5, 0.01)])
def test_matches_torch_muon_exactly_in_bf16(adjust_lr, nesterov, momentum, wd):
    """With ns_dtype=bfloat16 (torch.optim.Muon's iteration dtype) the two agree bit for bit."""
    ours, theirs = params_like(SHAPES), params_like(SHAPES)
    kw = dict(lr=0.02, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    run_steps(mu.Muon(ours, adjust_lr=adjust_lr, ns_dtype=torch.bfloat16, **kw), ours, 8)
    run_steps(TorchMuon(theirs, adjust_lr_fn=adjust_lr, **kw), theirs, 8)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q), (p - q).abs().max()


@needs_torch_muon
def test_matches_torch_muon_in_float32_within_bf16_rounding():
    """The default CPU iteration (float32) follows torch's bf16 one to within its rounding: after 8 steps the
    difference is a few percent of how far the weights moved, and the float32 one sits closer to float64."""
    start = params_like(SHAPES)
    ours, theirs, exact = copy.deepcopy(start), copy.deepcopy(start), [nn.Parameter(p.double()) for p in start]
    run_steps(mu.Muon(ours, lr=0.02), ours, 8)
    run_steps(TorchMuon(theirs, lr=0.02, weight_decay=0.0), theirs, 8)
    run_steps(mu.Muon(exact, lr=0.02), exact, 8)
    for p0, p, q, e in zip(start, ours, theirs, exact):
        moved = (e.float() - p0).abs().max()
        assert (p - q).abs().max() < 0.05 * moved
        assert (p.double() - e).abs().max() < 1e-4 * moved
        assert (p.double() - e).abs().max() < (q.double() - e).abs().max()


def test_float64_matches_a_plain_reference():
    """Muon written out with the plain NS above, in float64, over 10 steps (momentum, Nesterov, decay, scale)."""
    shapes = [(12, 5), (5, 12), (6, 6)]
    ours = params_like(shapes, dtype=torch.float64)
    ref = [p.detach().clone() for p in ours]
    bufs = [torch.zeros_like(p) for p in ref]
    lr, mom, wd = 0.03, 0.9, 0.05
    opt = mu.Muon(ours, lr=lr, momentum=mom, weight_decay=wd, adjust_lr="match_rms_adamw")
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        for p, r, buf in zip(ours, ref, bufs):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad = grad
            buf.mul_(mom).add_(grad, alpha=1 - mom)
            direction = (1 - mom) * grad + mom * buf
            O = reference_ns(direction, 5, J, 1e-7)
            r.mul_(1 - lr * wd).sub_(lr * 0.2 * math.sqrt(max(r.shape)) * O)
        opt.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)


@needs_torch_muon
def test_muon_with_adamw_matches_torch_muon_plus_adamw_on_tinygpt():
    """MuonWithAdamW on a TinyGPT == torch.optim.Muon (hidden matrices) + torch.optim.AdamW (the rest)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_embd=16, n_head=2, bias=True)
    a = TinyGPT(cfg)
    b = copy.deepcopy(a)
    ours = mu.MuonWithAdamW.from_model(a, lr=0.02, weight_decay=0.01, ns_dtype=torch.bfloat16, adamw_lr=3e-3,
                                       adamw_betas=(0.9, 0.95), adamw_eps=1e-8, adamw_weight_decay=0.1)
    muon_p, adamw_p = mu.split_muon_params(b)
    t_muon = TorchMuon(muon_p, lr=0.02, weight_decay=0.01)
    t_adamw = torch.optim.AdamW(adamw_p, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        x = torch.randint(0, 13, (4, 8), generator=g)
        for model in (a, b):
            model.zero_grad(set_to_none=True)
            model(x, x)[1].backward()
        ours.step()
        t_muon.step()
        t_adamw.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# --- optimizer mechanics -----------------------------------------------------------------


def test_none_grads_are_skipped():
    params = params_like([(6, 4), (4, 6)])
    before = params[1].detach().clone()
    opt = mu.Muon(params)
    run_steps(opt, params, 3, none_for=(1,))
    assert torch.equal(params[1], before)
    assert params[1] not in opt.state and params[0] in opt.state


@needs_torch_muon
def test_zero_size_parameter():
    ours, theirs = params_like([(0, 5), (3, 4)]), params_like([(0, 5), (3, 4)])
    run_steps(mu.Muon(ours, ns_dtype=torch.bfloat16), ours, 3)
    run_steps(TorchMuon(theirs, lr=0.02, weight_decay=0.0), theirs, 3)
    assert ours[0].shape == (0, 5)
    assert torch.equal(ours[1], theirs[1])
    # torch.optim.Muon divides by zero on a (5, 0) weight ("original" scale max(1, A/B)); ours uses scale 1
    wide_zero = params_like([(5, 0)])
    run_steps(mu.Muon(wide_zero), wide_zero, 2)
    assert wide_zero[0].shape == (5, 0)


@pytest.mark.parametrize("make", [
    lambda ps: mu.Muon(ps, lr=0.02, weight_decay=0.1, adjust_lr="match_rms_adamw"),
    lambda ps: mu.MuonWithAdamW(ps[:2], ps[2:], weight_decay=0.1, adamw_weight_decay=0.1),
])
def test_state_dict_round_trip_is_bitwise(make):
    """10 steps, save, load into a fresh optimizer over copied weights, 10 more == 20 uninterrupted steps."""
    shapes = [(8, 5), (5, 8), (7, 7), (4, 3)]
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(20)]

    def steps(opt, params, stream):
        for gs in stream:
            for p, grad in zip(params, gs):
                p.grad = grad.clone()
            opt.step()

    straight = params_like(shapes)
    steps(make(straight), straight, grads)
    first = params_like(shapes)
    opt = make(first)
    steps(opt, first, grads[:10])
    saved = copy.deepcopy(opt.state_dict())
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    steps(opt2, resumed, grads[10:])
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def test_closure_returns_loss_and_step_moves_by_the_scaled_polar_factor():
    W = nn.Parameter(torch.randn(6, 3, dtype=torch.float64))
    W0 = W.detach().clone()
    target = torch.randn(6, 3, dtype=torch.float64)
    opt = mu.Muon([W], lr=0.1, momentum=0.0, nesterov=False, ns_steps=30, ns_coefficients=C)

    def closure():
        opt.zero_grad()
        loss = ((W - target) ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(((W0 - target) ** 2).sum().item())
    # momentum 0: one step = lr * sqrt(6/3) * polar(G); the cubic with 30 steps converges to U V^T
    expected = W0 - 0.1 * math.sqrt(2.0) * mu.polar_factor(2 * (W0 - target))
    torch.testing.assert_close(W.detach(), expected, rtol=1e-9, atol=1e-9)


def test_rejects_non_matrix_parameters_naming_the_shape():
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 has shape \(4,\)"):
        mu.Muon([nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match=r"has shape \(2, 3, 4\)"):
        mu.Muon([nn.Parameter(torch.zeros(2, 3, 4))])
    opt = mu.Muon([nn.Parameter(torch.zeros(3, 4))])
    with pytest.raises(ValueError, match=r"param group 1 has shape \(\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(()))]})
    with pytest.raises(ValueError, match=r"MuonWithAdamW: .*shape \(5,\)"):
        mu.MuonWithAdamW([nn.Parameter(torch.zeros(5))], [])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=-0.1), ValueError, r"Muon: lr must be in \[0, inf\), got -0.1"),
    (dict(lr="0.1"), TypeError, r"Muon: lr must be a real number"),
    (dict(momentum=1.0), ValueError, r"Muon: momentum must be in \[0, 1\), got 1.0"),
    (dict(momentum=-0.5), ValueError, r"Muon: momentum must be in \[0, 1\)"),
    (dict(nesterov=1), TypeError, r"Muon: nesterov must be a bool, got int 1"),
    (dict(ns_steps=0), ValueError, r"Muon: ns_steps must be an int >= 1, got 0"),
    (dict(ns_steps=2.5), TypeError, r"Muon: ns_steps must be an int"),
    (dict(weight_decay=-1e-3), ValueError, r"Muon: weight_decay must be in \[0, inf\)"),
    (dict(adjust_lr="spectral"), ValueError, r"Muon: adjust_lr must be one of \('original', 'match_rms_adamw'\)"),
    (dict(ns_coefficients=(1.5, -0.5)), ValueError, r"Muon: ns_coefficients must be a tuple \(a, b, c\) of 3"),
    (dict(ns_coefficients=(1.5, "b", 0.0)), TypeError, r"Muon: ns_coefficients\[1\] must be a real number"),
    (dict(eps=0.0), ValueError, r"Muon: eps must be in \(0, inf\), got 0.0"),
    (dict(ns_dtype=torch.int32), TypeError, r"Muon: ns_dtype must be None or a floating torch.dtype"),
])
def test_hyperparameter_checks(kwargs, error, match):
    with pytest.raises(error, match=match):
        mu.Muon(params_like([(3, 4)]), **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(adamw_lr=-1.0), ValueError, r"MuonWithAdamW: adamw_lr must be in \[0, inf\)"),
    (dict(adamw_betas=(0.9, 1.0)), ValueError, r"MuonWithAdamW: betas\[1\] must be in \[0, 1\), got 1.0"),
    (dict(adamw_eps=-1.0), ValueError, r"MuonWithAdamW: adamw_eps must be in \[0, inf\)"),
    (dict(adamw_weight_decay=-0.1), ValueError, r"MuonWithAdamW: adamw_weight_decay must be in \[0, inf\)"),
    (dict(momentum=1.5), ValueError, r"MuonWithAdamW: momentum must be in \[0, 1\)"),
])
def test_muon_with_adamw_checks(kwargs, error, match):
    with pytest.raises(error, match=match):
        mu.MuonWithAdamW(params_like([(3, 4)]), params_like([(4,)]), **kwargs)
    with pytest.raises(ValueError, match="got no parameters"):
        mu.MuonWithAdamW([], [])


def test_muon_with_adamw_add_param_group_fills_defaults_and_checks():
    opt = mu.MuonWithAdamW(params_like([(3, 4)]), params_like([(4,)]), lr=0.03, adamw_lr=1e-3)
    opt.add_param_group({"params": params_like([(5, 2)]), "use_muon": True, "lr": 0.01})
    opt.add_param_group({"params": params_like([(2,)]), "use_muon": False})
    assert opt.param_groups[2]["lr"] == 0.01 and opt.param_groups[2]["momentum"] == 0.95
    assert opt.param_groups[3]["lr"] == 1e-3 and opt.param_groups[3]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="every param group needs use_muon=True or False, got None"):
        opt.add_param_group({"params": params_like([(2, 2)])})
    with pytest.raises(ValueError, match=r"MuonWithAdamW: betas\[0\] must be in \[0, 1\), got 1.5"):
        opt.add_param_group({"params": params_like([(2,)]), "use_muon": False, "betas": (1.5, 0.9)})
    run_steps(opt, [p for g in opt.param_groups for p in g["params"]], 2)


def test_state_dict_survives_torch_save_and_load(tmp_path):
    params = params_like([(4, 6)])
    opt = mu.Muon(params, ns_dtype=torch.bfloat16)
    run_steps(opt, params, 2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = mu.Muon(params_like([(4, 6)]))
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["ns_dtype"] == torch.bfloat16
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["momentum_buffer"],
                       opt.state[params[0]]["momentum_buffer"])


def test_lr_scheduler_scales_both_groups():
    opt = mu.MuonWithAdamW(params_like([(3, 4)]), params_like([(4,)]), lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 5e-4]
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    del sched


# --- Newton-Schulz ----------------------------------------------------------------------


dims = st.integers(min_value=1, max_value=24)
coefs = st.sampled_from([J, C, (2.0, -1.5, 0.5)])


@given(m=dims, n=dims, steps=st.integers(0, 6), coefficients=coefs, seed=st.integers(0, 2**16))
def test_ns_maps_every_singular_value_through_the_polynomial(m, n, steps, coefficients, seed):
    """X_k = U p^k(S / ||G||_F) V^T: the singular values follow the scalar map, the vectors stay put."""
    G = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X = mu.newton_schulz(G, steps, coefficients)
    assert X.shape == G.shape and X.dtype == torch.float64
    s = torch.linalg.svdvals(G)
    expected = np.sort(np.abs(mu.ns_singular_value_map((s / G.norm()).numpy(), steps, coefficients)))
    got = np.sort(torch.linalg.svdvals(X).numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(X, reference_ns(G, steps, coefficients, 1e-7), rtol=1e-10, atol=1e-12)


@given(m=dims, n=dims, seed=st.integers(0, 2**16), scale=st.floats(1e-4, 1e4))
def test_ns_symmetries(m, n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = mu.newton_schulz(G)
    torch.testing.assert_close(mu.newton_schulz(G.T), X.T)  # transposition
    torch.testing.assert_close(mu.newton_schulz(scale * G), X)  # scale invariance (while ||G|| > eps)
    Q1 = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    torch.testing.assert_close(mu.newton_schulz(Q1 @ G @ Q2), Q1 @ X @ Q2)  # orthogonal equivariance


@given(m=st.integers(2, 20), n=st.integers(2, 20), seed=st.integers(0, 2**16))
def test_quintic_lands_in_a_band_and_cubic_converges(m, n, seed):
    """Well-conditioned input: 5 quintic steps put every singular value in [0.68, 1.21]; 40 cubic steps
    give the exact polar factor."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    r = min(m, n)
    S = torch.zeros(m, n, dtype=torch.float64)
    S[range(r), range(r)] = torch.logspace(0, -1.5, r, dtype=torch.float64)  # condition number ~30
    G = U @ S @ V.T
    sv = torch.linalg.svdvals(mu.newton_schulz(G))
    assert 0.68 <= sv.min() and sv.max() <= 1.21
    torch.testing.assert_close(mu.newton_schulz(G, 40, C), mu.polar_factor(G), rtol=1e-9, atol=1e-9)


def test_ns_batched_equals_per_matrix_and_keeps_dtype():
    G = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    X = mu.newton_schulz(G)
    assert X.shape == G.shape
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(X[i, j], mu.newton_schulz(G[i, j]), rtol=1e-12, atol=1e-14)
    assert mu.newton_schulz(G.float()).dtype == torch.float32
    assert mu.newton_schulz(G.bfloat16()).dtype == torch.bfloat16
    assert mu.default_ns_dtype(G.bfloat16()) == torch.float32  # a CPU tensor
    iterates = mu.newton_schulz_iterates(G[0, 0], steps=3)
    assert len(iterates) == 4 and torch.equal(iterates[-1], mu.newton_schulz(G[0, 0], steps=3))
    assert torch.equal(mu.newton_schulz(torch.zeros(3, 4)), torch.zeros(3, 4))  # zero in, zero out


@pytest.mark.parametrize("shape", [(7, 7), (5, 12), (12, 5)])
def test_ns_flops_match_the_flop_counter(shape):
    with FlopCounterMode(display=False) as fc:
        mu.newton_schulz(torch.randn(*shape), steps=4)
    assert fc.get_total_flops() == mu.newton_schulz_flops(*shape, steps=4)
    # square d x d weight: overhead = steps * d / tokens (Jordan et al.: T m / B)
    assert mu.ns_flop_overhead([(4096, 4096)], 2**20) == pytest.approx(5 * 4096 / 2**20)


def test_polar_factor_is_orthogonal_and_handles_rank_deficiency():
    G = torch.randn(9, 4, dtype=torch.float64)
    P = mu.polar_factor(G)
    torch.testing.assert_close(P.T @ P, torch.eye(4, dtype=torch.float64))
    low = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 5, dtype=torch.float64)  # rank 2
    sv = torch.linalg.svdvals(mu.polar_factor(low))
    torch.testing.assert_close(sv[:2], torch.ones(2, dtype=torch.float64))
    assert sv[2:].abs().max() < 1e-10


def test_newton_schulz_input_checks():
    with pytest.raises(ValueError, match=r"newton_schulz: G must be a tensor of shape \(\.\.\., m, n\), got Tensor \(5"):
        mu.newton_schulz(torch.zeros(5))
    with pytest.raises(TypeError, match="floating-point"):
        mu.newton_schulz(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="newton_schulz: steps must be an int >= 0, got -1"):
        mu.newton_schulz(torch.zeros(2, 2), steps=-1)
    with pytest.raises(ValueError, match=r"newton_schulz: coefficients must be a tuple"):
        mu.newton_schulz(torch.zeros(2, 2), coefficients=(1.0,))
    with pytest.raises(TypeError, match="dtype must be None or a floating torch.dtype"):
        mu.newton_schulz(torch.zeros(2, 2), dtype=torch.int8)


# --- lr adjustment ------------------------------------------------------------------------


@given(A=st.integers(1, 4096), B=st.integers(1, 4096))
def test_adjust_lr_factor(A, B):
    assert mu.adjust_lr_factor((A, B), "original") == pytest.approx(math.sqrt(max(1.0, A / B)))
    assert mu.adjust_lr_factor((A, B), "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(max(A, B)))


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_match_rms_adamw_gives_update_rms_0_2(shape):
    """An exact polar factor of a full-rank (A, B) matrix has RMS 1/sqrt(max(A, B)); Moonshot's scale makes it 0.2."""
    P = mu.polar_factor(torch.randn(*shape, dtype=torch.float64))
    rms = P.pow(2).mean().sqrt().item()
    assert rms == pytest.approx(1 / math.sqrt(max(shape)))
    assert mu.adjust_lr_factor(shape, "match_rms_adamw") * rms == pytest.approx(0.2)
    # "original": RMS 1/sqrt(B) (B = fan-in) whatever the aspect ratio
    assert mu.adjust_lr_factor(shape, "original") * rms == pytest.approx(1 / math.sqrt(shape[1]))
    with pytest.raises(ValueError, match="adjust_lr_factor: adjust_lr must be one of"):
        mu.adjust_lr_factor(shape, "none")


# --- which parameters get Muon ------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(tie_embeddings=False),
    dict(bias=True, norm="rmsnorm", mlp="swiglu"),
    dict(rope=True, n_kv_head=1),
])
def test_split_on_tinygpt(cfg):
    model = TinyGPT(GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_embd=16, n_head=2, **cfg))
    muon, adamw = mu.split_muon_named_params(model)
    muon_names, adamw_names = [n for n, _ in muon], [n for n, _ in adamw]
    ids = [id(p) for _, p in muon + adamw]
    assert len(ids) == len(set(ids))  # every tensor once, a tied weight included
    assert sum(p.numel() for _, p in muon + adamw) == model.num_params()
    assert all(p.dim() == 2 for _, p in muon)
    assert all(n.startswith("blocks.") and n.endswith(".weight") and ("attn" in n or "mlp" in n) for n in muon_names)
    per_block = 4 + (3 if cfg.get("mlp") == "swiglu" else 2)
    assert len(muon_names) == 2 * per_block
    assert "tok_emb.weight" in adamw_names
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight and "lm_head.weight" not in adamw_names
    else:
        assert "lm_head.weight" in adamw_names
    assert ("pos_emb.weight" in adamw_names) == (not model.config.rope)
    assert all(p.dim() == 1 for n, p in adamw if "norm" in n or n.endswith(".bias"))
    mp, ap = mu.split_muon_params(model)
    assert [id(p) for p in mp] == [id(p) for _, p in muon] and [id(p) for p in ap] == [id(p) for _, p in adamw]


def test_split_respects_head_names_and_frozen_parameters():
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "out": nn.Linear(4, 3, bias=False)})
    model["body"].bias.requires_grad_(False)
    muon, adamw = mu.split_muon_named_params(model, head_names=("out",))
    assert [n for n, _ in muon] == ["body.weight"] and [n for n, _ in adamw] == ["out.weight"]
    with pytest.raises(TypeError, match="split_muon_params: model must be an nn.Module"):
        mu.split_muon_params([nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(TypeError, match="head_names must be a tuple of str"):
        mu.split_muon_params(model, head_names="out")


def test_state_bytes_muon_keeps_one_buffer_adamw_two():
    model = TinyGPT(GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_embd=16, n_head=2))
    opt = mu.MuonWithAdamW.from_model(model)
    x = torch.randint(0, 17, (2, 8))
    model(x, x)[1].backward()
    opt.step()
    muon_p, adamw_p = mu.split_muon_params(model)
    n_muon, n_adamw = sum(p.numel() for p in muon_p), sum(p.numel() for p in adamw_p)
    assert mem.state_bytes(opt) == 4 * n_muon + 8 * n_adamw == mem.predicted_state_bytes(opt)


# --- exercises, figures, benchmarks -------------------------------------------------------


EXERCISES = ["muon.lr_scale", "muon.newton_schulz", "muon.ns_flops", "muon.split_params"]


def test_exercises_registered_and_references_pass():
    from labkit.exercises import exercises_for, lookup

    assert exercises_for("05-muon") == EXERCISES
    for name in EXERCISES:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def _ns_spectral(G, steps, coefficients, eps):  # normalizes by the spectral norm instead
    a, b, c = coefficients
    X = G / (torch.linalg.matrix_norm(G, 2) + eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X


def _ns_plus_eps(G, steps, coefficients, eps):  # Jordan's normalization: the same to float32 tolerance
    return reference_ns(G * torch.linalg.matrix_norm(G) / (torch.linalg.matrix_norm(G) + eps), steps, coefficients,
                        eps)


def _ns_no_transpose_back(G, steps, coefficients, eps):
    X = reference_ns(G, steps, coefficients, eps)
    return X.T.reshape(X.shape) if X.shape[0] > X.shape[1] else X


def _plain_ns(G, steps, coefficients, eps):
    return reference_ns(G, steps, coefficients, eps)


@pytest.mark.parametrize("name,fn", [
    ("muon.newton_schulz", _plain_ns),
    ("muon.newton_schulz", _ns_plus_eps),
    ("muon.lr_scale", lambda shape, adjust_lr: (max(1, shape[0] / shape[1]) ** 0.5 if adjust_lr == "original"
                                                 else 0.2 * max(shape) ** 0.5)),
    ("muon.ns_flops", lambda m, n, steps: steps * (4 * min(m, n) ** 2 * max(m, n) + 2 * min(m, n) ** 3)),
    ("muon.split_params", lambda model: tuple(
        [n for n, p in model.named_parameters() if p.dim() == 2 and not ("emb" in n or "lm_head" in n)] if k == 0 else
        [n for n, p in model.named_parameters() if not (p.dim() == 2 and not ("emb" in n or "lm_head" in n))]
        for k in (0, 1))),
])
def test_student_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn", [
    ("muon.newton_schulz", _ns_spectral),
    ("muon.newton_schulz", _ns_no_transpose_back),
    ("muon.newton_schulz", lambda G, steps, coefficients, eps: reference_ns(G, steps, coefficients[::-1], eps)),
    ("muon.lr_scale", lambda shape, adjust_lr: max(1, shape[1] / shape[0]) ** 0.5 if adjust_lr == "original"
     else 0.2 * max(shape) ** 0.5),  # (in, out) mixed up
    ("muon.lr_scale", lambda shape, adjust_lr: max(1, shape[0] / shape[1]) ** 0.5 if adjust_lr == "original"
     else 0.2 * min(shape) ** 0.5),
    ("muon.ns_flops", lambda m, n, steps: steps * (4 * m * m * n + 2 * m**3)),  # forgets to transpose a tall one
    ("muon.ns_flops", lambda m, n, steps: steps * 4 * min(m, n) ** 2 * max(m, n)),  # forgets A @ A
    ("muon.split_params", lambda model: ([n for n, p in model.named_parameters() if p.dim() == 2],
                                         [n for n, p in model.named_parameters() if p.dim() != 2])),
    ("muon.split_params", lambda model: (  # iterates with duplicates: the tied head appears twice
        [n for n, p in model.named_parameters(remove_duplicate=False) if p.dim() == 2 and "blocks" in n],
        [n for n, p in model.named_parameters(remove_duplicate=False) if not (p.dim() == 2 and "blocks" in n)])),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_figures_build_and_the_panel_callback_handles_any_coefficients():
    from labkit.viz import muon as vm

    for preset in vm.NS_PRESETS:
        fig = vm.ns_map_figure(5, preset, 6.0, -1.0, 3.0)  # custom: a diverging polynomial
        assert len(fig.data) == 2 + 5
    assert "[0.471, 1.202]" in vm.ns_map_figure(5).layout.title.text  # from x >= 1e-3
    assert vm.ns_band(C, 60) == pytest.approx((1.0, 1.0), abs=1e-6)
    with pytest.raises(ValueError, match="preset must be one of"):
        vm.ns_map_figure(5, "bogus")
    hist = [torch.linalg.svdvals(X) for X in mu.newton_schulz_iterates(torch.randn(8, 12), 5)]
    assert len(vm.singular_values_figure(hist, exact=torch.ones(8)).data) == 7
    assert len(vm.relative_spectrum_figure({"g": hist[0], "O": hist[-1]}).data) == 2


def test_benchmark_rows(monkeypatch):
    from labkit.benchmarks import muon as bm

    tiny = dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4, steps=3, adamw_lrs=(3e-3,),
                muon_lrs=(0.02,), sizes=[(16, 16), (8, 24)], adamw_aux_lr=3e-3)
    monkeypatch.setattr(bm, "settings", lambda quick=False: dict(tiny))
    rows = bm.run(quick=True)
    opt = {r["optimizer"]: r for r in rows if r["kind"] == "optimizer"}
    assert set(opt) == {"AdamW", "Muon"}
    assert opt["AdamW"]["ratio"] == 1.0 and opt["Muon"]["baseline_ms"] == opt["AdamW"]["median_ms"]
    assert opt["Muon"]["state_bytes"] < opt["AdamW"]["state_bytes"] == opt["Muon"]["baseline_state_bytes"]
    assert opt["Muon"]["tokens"] == opt["AdamW"]["tokens"] == 3 * 4 * 16
    ns = [r for r in rows if r["kind"] == "ns_vs_svd"]
    assert [(r["m"], r["n"]) for r in ns] == [(16, 16), (8, 24)]
    assert all(r["median_ms"] > 0 and r["baseline_ms"] > 0 and 0 < r["polar_rel_err"] < 1 for r in ns)
