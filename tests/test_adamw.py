"""Chapter 03-adamw: labkit.optim.adamw (parity with torch.optim.AdamW, low-precision states, the
epsilon trap), its exercises, figures and benchmark."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import labkit
from labkit.exercises import exercises_for, lookup
from labkit.optim import adamw as aw
from labkit.optim import memory as mem
from labkit.optim.adamw import AdamW


def make_params(dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (4,), (0, 3), (2, 3, 2)]  # (0, 3): a zero-size parameter
    return [torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_() for s in shapes]


def grad_sequence(params, steps, seed=1, scale=1.0):
    """Per step, a gradient per parameter; None for params 1 and 3 at step 3 (no gradient that step)."""
    gen = torch.Generator().manual_seed(seed)
    seq = []
    for k in range(steps):
        seq.append([None if (k == 3 and i in (1, 3)) else
                    (torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale).to(p.device)
                    for i, p in enumerate(params)])
    return seq


def run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


# --- parity with torch.optim.AdamW ------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, None, True])
def test_parity_float64_with_none_grads_and_empty_param(foreach):
    base = make_params()
    grads = grad_sequence(base, 9)
    ours, ref = clone(base), clone(base)
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    got = run(AdamW(ours, **kw), ours, grads)
    want = run(torch.optim.AdamW(ref, foreach=foreach, **kw), ref, grads)
    for g, w in zip(got, want):
        if foreach:  # torch's multi-tensor path rounds differently
            torch.testing.assert_close(g, w)
        else:  # its single-tensor path (the CPU default), operation for operation: bit for bit
            assert torch.equal(g, w)
    # the parameters skipped at step 3 took 8 steps, the others 9: the step counters say so
    opt = AdamW(clone(base), **kw)
    run(opt, opt.param_groups[0]["params"], grads)
    steps = [opt.state[p]["step"].item() for p in opt.param_groups[0]["params"]]
    assert steps == [9.0, 8.0, 9.0, 8.0]


def test_parity_defaults_param_groups_and_maximize():
    base = make_params()
    grads = grad_sequence(base, 8)
    ours, ref = clone(base), clone(base)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.1, "weight_decay": 0.0, "maximize": True}]
    got = run(AdamW(groups(ours)), ours, grads)
    want = run(torch.optim.AdamW(groups(ref), foreach=False), ref, grads)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_parity_float32_params_default_state_dtype():
    base = make_params(torch.float32)
    grads = grad_sequence(base, 7)
    ours, ref = clone(base), clone(base)
    got = run(AdamW(ours, lr=1e-2), ours, grads)
    want = run(torch.optim.AdamW(ref, lr=1e-2), ref, grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_eps_inside_matches_the_formula():
    p = torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = AdamW([p], lr=0.05, betas=(0.9, 0.99), eps=1e-4, weight_decay=0.0, eps_mode="inside")
    q = p.detach().clone()
    m = torch.zeros_like(q)
    v = torch.zeros_like(q)
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 8):
        g = torch.randn(6, generator=gen, dtype=torch.float64) * 1e-2
        p.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        q = q - 0.05 * (m / (1 - 0.9 ** t)) / (v / (1 - 0.99 ** t) + 1e-4).sqrt()
        torch.testing.assert_close(p.detach(), q)


def test_closure_returns_loss():
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(5.0)
    assert p.grad is not None


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=3), lr=st.floats(1e-5, 0.5),
       b1=st.floats(0.0, 0.99), b2=st.floats(0.0, 0.9999), eps=st.floats(1e-12, 1e-1),
       wd=st.floats(0.0, 1.0), maximize=st.booleans(), seed=st.integers(0, 1000))
def test_parity_property(shape, lr, b1, b2, eps, wd, maximize, seed):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, maximize=maximize)
    oa, ob = AdamW([a], **kw), torch.optim.AdamW([b], foreach=False, **kw)
    for _ in range(7):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


# --- low-precision states ---------------------------------------------------------------------


def reference_low_precision(p, grads, dtype, lr, betas, eps, wd):
    """float32 arithmetic; the moments rounded to `dtype` after each update and read back rounded."""
    p = p.clone()
    m = torch.zeros_like(p, dtype=dtype)
    v = torch.zeros_like(p, dtype=dtype)
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * wd)
        m = (betas[0] * m.float() + (1 - betas[0]) * g).to(dtype)
        v = (betas[1] * v.float() + (1 - betas[1]) * g * g).to(dtype)
        d = (m.float() / (1 - betas[0] ** t)) / (v.float().sqrt() / math.sqrt(1 - betas[1] ** t) + eps)
        p = p - lr * d
    return p, m, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_states_match_a_plain_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen) * 10 ** torch.empty(64).uniform_(-6, 0, generator=gen) for _ in range(8)]
    p = p0.clone().requires_grad_()
    opt = AdamW([p], lr=1e-3, eps=1e-8, weight_decay=0.01, state_dtype=dtype)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want_p, want_m, want_v = reference_low_precision(p0, grads, dtype, 1e-3, (0.9, 0.999), 1e-8, 0.01)
    st_ = opt.state[p]
    assert st_["exp_avg"].dtype == st_["exp_avg_sq"].dtype == dtype
    torch.testing.assert_close(st_["exp_avg"], want_m, rtol=0, atol=0)
    torch.testing.assert_close(st_["exp_avg_sq"], want_v, rtol=0, atol=0)
    torch.testing.assert_close(p.detach(), want_p, rtol=1e-5, atol=1e-3)


def test_state_dtype_names_and_bytes():
    params = make_params(torch.float32)
    for name, dtype, per in [("fp32", torch.float32, 8), ("bf16", torch.bfloat16, 4), ("float16", torch.float16, 4)]:
        opt = AdamW(clone(params), state_dtype=name)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
        n = sum(p.numel() for p in params)
        assert mem.state_bytes(opt) == per * n == mem.predicted_state_bytes(opt)  # step counters left out
        assert all(s["exp_avg"].dtype == dtype for s in opt.state.values())


def test_bf16_second_moment_cannot_decay():
    """β2 = 0.999: v·β2 rounds back to v in bfloat16, so v never forgets a large gradient."""
    g = torch.tensor([1.0])
    m, v = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)
    aw.adamw_direction_(g, m, v, 1.0, beta1=0.9, beta2=0.999, eps=1e-8)
    stored = v.clone()
    for t in range(2, 200):
        aw.adamw_direction_(torch.zeros(1), m, v, float(t), beta1=0.9, beta2=0.999, eps=1e-8)
    assert v.item() == stored.item() > 0                         # stuck
    v32 = torch.tensor([stored.item()])
    aw.adamw_direction_(torch.zeros(1), torch.zeros(1), v32, 2.0, beta1=0.9, beta2=0.999, eps=1e-8)
    assert v32.item() < stored.item()                            # float32 decays


# --- the epsilon trap -------------------------------------------------------------------------


def test_underflow_threshold_is_where_fp16_stores_zero():
    thr = aw.underflow_threshold(torch.float16)
    assert thr == pytest.approx(math.sqrt(2 ** -25 / 1e-3))
    assert 5.4e-3 < thr < 5.5e-3
    below, above = torch.tensor([thr * 0.99]), torch.tensor([thr * 1.01])
    assert (1e-3 * below ** 2).half().item() == 0.0
    assert (1e-3 * above ** 2).half().item() > 0.0
    assert aw.underflow_threshold("bf16") < 1e-18                # bfloat16 has float32's range
    with pytest.raises(ValueError, match="state_dtype"):
        aw.underflow_threshold(None)


def test_effective_ratio_matches_exact_arithmetic_in_float64():
    g = torch.logspace(-12, 0, 25, dtype=torch.float64)
    for mode in aw.EPS_MODES:
        got = aw.effective_step_ratio(g, steps=50, eps=1e-8, eps_mode=mode, state_dtype=torch.float64)
        torch.testing.assert_close(got, aw.ideal_step_ratio(g, eps=1e-8, eps_mode=mode))
    assert aw.ideal_step_ratio(1e-8, eps=1e-8) == pytest.approx(0.5)     # |g| = ε: half the step
    assert aw.ideal_step_ratio(1e-8, eps=1e-16, eps_mode="inside") == pytest.approx(2 ** -0.5)


@settings(max_examples=25, deadline=None)
@given(log_g=st.floats(-5.0, -2.4), log_eps=st.floats(-10.0, -7.0))
def test_fp16_states_turn_the_step_into_g_over_eps(log_g, log_eps):
    """Below the underflow threshold the stored v is 0 and the step is about |g|/ε."""
    g, eps = torch.tensor([10 ** log_g]), 10 ** log_eps
    r = aw.effective_step_ratio(g, steps=1, eps=eps, state_dtype="fp16").item()
    m_stored = (0.1 * g).half().float().item()                 # m keeps fp16's (subnormal) precision
    assert r == pytest.approx(m_stored / 0.1 / eps, rel=1e-5)
    assert r == pytest.approx(g.item() / eps, rel=0.04) and r > 1e2


@settings(max_examples=25, deadline=None)
@given(log_g=st.floats(-8.0, 0.0), log2_scale=st.integers(0, 20), steps=st.integers(1, 30))
def test_scaling_the_gradient_is_scaling_eps_down(log_g, log2_scale, steps):
    g, s = torch.tensor([10 ** log_g], dtype=torch.float64), 2.0 ** log2_scale
    scaled = aw.effective_step_ratio(g, steps=steps, eps=1e-8, grad_scale=s, state_dtype=torch.float64)
    smaller_eps = aw.effective_step_ratio(g, steps=steps, eps=1e-8 / s, state_dtype=torch.float64)
    torch.testing.assert_close(scaled, smaller_eps)


def test_fixes_bring_fp16_back_to_one():
    g = torch.tensor([1e-3])
    trap = aw.effective_step_ratio(g, steps=10, eps=1e-8, state_dtype="fp16").item()
    fp32 = aw.effective_step_ratio(g, steps=10, eps=1e-8, state_dtype="fp32").item()
    big_eps = aw.effective_step_ratio(g, steps=10, eps=5e-3, state_dtype="fp16").item()
    inside = aw.effective_step_ratio(g, steps=10, eps=2.5e-5, eps_mode="inside", state_dtype="fp16").item()
    scaled = aw.effective_step_ratio(g, steps=10, eps=1e-8, grad_scale=2.0 ** 12, state_dtype="fp16").item()
    assert trap > 1e4
    assert fp32 == pytest.approx(1.0, rel=1e-4) and scaled == pytest.approx(1.0, rel=2e-2)
    assert 0.1 < big_eps < 0.3 and 0.1 < inside < 0.3             # bounded, but a smaller step: ε costs lr


def test_step_ratios_removes_weight_decay():
    p = torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    opt = AdamW([p], lr=0.01, weight_decay=0.5)
    p.grad = torch.linspace(-1, 1, 10, dtype=torch.float64)  # |g| >= 1/9 >> eps (an unseeded randn could pick ~eps)
    r = aw.step_ratios(opt)
    torch.testing.assert_close(r, torch.ones(10, dtype=torch.float32), rtol=1e-5, atol=1e-5)  # first step: |d| = 1


# --- state_dict, validation, devices ---------------------------------------------------------


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_state_dict_round_trip_is_bitwise(state_dtype):
    base = make_params(torch.float32)
    grads = grad_sequence(base, 20)
    straight = clone(base)
    run(AdamW(straight, lr=1e-2, state_dtype=state_dtype), straight, grads)

    first = clone(base)
    opt = AdamW(first, lr=1e-2, state_dtype=state_dtype)
    run(opt, first, grads[:10])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    fresh = AdamW(resumed, lr=1e-2, state_dtype=state_dtype)
    fresh.load_state_dict(saved["opt"])
    assert all(s["exp_avg"].dtype == (state_dtype or torch.float32) for s in fresh.state.values())
    run(fresh, resumed, grads[10:])
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_state_dict_loads_into_torch_adamw():
    base = make_params()
    grads = grad_sequence(base, 12)
    ours = clone(base)
    opt = AdamW(ours, lr=1e-2)
    run(opt, ours, grads[:6])
    ref = [p.detach().clone().requires_grad_() for p in ours]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    got, want = run(opt, ours, grads[6:]), run(torch_opt, ref, grads[6:])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=-1.0), ValueError, r"AdamW: lr must be in \[0, inf\), got -1.0"),
    (dict(lr="0.1"), TypeError, "AdamW: lr must be a real number"),
    (dict(betas=(1.0, 0.999)), ValueError, r"AdamW: betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"AdamW: betas\[1\] must be in \[0, 1\)"),
    (dict(betas=0.9), ValueError, "AdamW: betas must be a tuple of 2"),
    (dict(eps=-1e-8), ValueError, r"AdamW: eps must be in \[0, inf\)"),
    (dict(weight_decay=-0.1), ValueError, r"AdamW: weight_decay must be in \[0, inf\)"),
    (dict(state_dtype=torch.int8), ValueError, "AdamW: state_dtype must be one of"),
    (dict(state_dtype="fp8"), ValueError, "AdamW: state_dtype must be one of"),
    (dict(eps_mode="between"), ValueError, r"AdamW: eps_mode must be one of \('outside', 'inside'\)"),
    (dict(maximize=1), TypeError, "AdamW: maximize must be a bool"),
])
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdamW([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_param_group_and_sparse_grad():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="AdamW: lr must be in"):
        AdamW([{"params": [p]}, {"params": [q], "lr": -1.0}])
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        AdamW(emb.parameters()).step()
    with pytest.raises(TypeError, match="grad must be a floating tensor"):
        aw.effective_step_ratio([1e-3])
    with pytest.raises(ValueError, match="grad_scale must be in"):
        aw.effective_step_ratio(torch.ones(1), grad_scale=0.0)


def test_bf16_params_with_fp32_states():
    p = torch.randn(16).bfloat16().requires_grad_()
    opt = AdamW([p], lr=1e-2, state_dtype=torch.float32)
    p.grad = torch.randn(16).bfloat16()
    before = p.detach().clone()
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
    assert not torch.equal(p.detach(), before)


@pytest.mark.gpu
def test_parity_on_cuda():
    base = make_params(torch.float32, device="cuda")
    grads = grad_sequence([p.cpu() for p in base], 8)
    grads = [[None if g is None else g.cuda() for g in gs] for gs in grads]
    ours, ref = clone(base), clone(base)
    got = run(AdamW(ours, lr=1e-2), ours, grads)
    want = run(torch.optim.AdamW(ref, lr=1e-2), ref, grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    low = clone(base)
    run(AdamW(low, lr=1e-2, state_dtype=torch.bfloat16), low, grads)
    assert all(p.is_cuda and torch.isfinite(p).all() for p in low)


# --- exercises --------------------------------------------------------------------------------

NAMES = ["adamw.amos_hparams", "adamw.eps_for_change", "adamw.first_step_ratio", "adamw.step_by_hand",
         "adamw.warmup_cosine"]


def test_exercises_registered_and_references_pass():
    assert exercises_for("03-adamw") == NAMES
    for name in NAMES:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def student_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
    return p - lr * weight_decay * p - lr * update, m, v


def student_ratio(g, eps, state_dtype):
    m = ((1 - 0.9) * g).to(state_dtype).float()
    v = ((1 - 0.999) * g * g).to(state_dtype).float()
    return (m / 0.1).abs() / ((v / 1e-3).sqrt() + eps)


def student_eps(v_hat, x, eps_mode):
    return math.sqrt(v_hat) * x / (1 - x) if eps_mode == "outside" else v_hat / (1 - x) ** 2 - v_hat


def student_cosine(step, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    p = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("name,fn", [
    ("adamw.step_by_hand", student_step),
    ("adamw.first_step_ratio", student_ratio),
    ("adamw.eps_for_change", student_eps),
    ("adamw.warmup_cosine", student_cosine),
    ("adamw.amos_hparams", lambda eta, xi: (xi * eta, xi / (2 * eta))),
])
def test_plain_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn", [
    # no bias correction
    ("adamw.step_by_hand", lambda p, g, m, v, t, lr, beta1, beta2, eps, weight_decay:
        student_step(p, g, m, v, 10 ** 9, lr, beta1, beta2, eps, weight_decay)),
    # L2 in the gradient instead of decoupled decay (Adam, not AdamW)
    ("adamw.step_by_hand", lambda p, g, m, v, t, lr, beta1, beta2, eps, weight_decay:
        student_step(p, g + weight_decay * p, m, v, t, lr, beta1, beta2, eps, 0.0)),
    # forgets that the stored moments are rounded
    ("adamw.first_step_ratio", lambda g, eps, state_dtype: student_ratio(g, eps, torch.float32)),
    ("adamw.eps_for_change", lambda v_hat, x, eps_mode: math.sqrt(v_hat) * x / (1 - x)),
    ("adamw.warmup_cosine", lambda step, max_lr, min_lr, warmup_steps, total_steps:
        student_cosine(step, max_lr, 0.0, warmup_steps, total_steps)),
    # ρ = ξ²/2 given as torch's weight_decay (forgets that torch multiplies it by lr)
    ("adamw.amos_hparams", lambda eta, xi: (xi * eta, xi * xi / 2)),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


# --- figures and the benchmark ----------------------------------------------------------------


def test_figures():
    from labkit.viz import optim as vo

    fig = vo.step_ratio_figure(-8, "fp16", 0, "outside", 10)
    assert "update lost (0)" in fig.layout.title.text and len(fig.data) == 2
    assert "0/121 sizes off" in vo.step_ratio_figure(-8, "fp32", 0, "outside", 10).layout.title.text
    curves = vo.loss_curves_figure({"ok": [3.0, 2.0, 1.0], "diverged": [3.0, float("nan"), float("inf")]}, smooth=2)
    assert "non-finite from step 1" in curves.data[1].name
    hist = vo.update_histogram_figure({"a": torch.tensor([0.0, 1.0, 10.0, 100.0]), "b": [1e-3, 1e-2]})
    assert "25% exactly 0" in hist.data[0].name
    assert sum(hist.data[1].y) == pytest.approx(1.0)
    assert len(vo.lr_schedule_figure({"x": [0.0, 1.0]}).data) == 1
    bars = vo.bench_bars_figure([{"name": "a", "m": "1", "median_ms": 1.0}, {"name": "b", "m": "1", "median_ms": 2.0}],
                                group="m")
    assert [t.name for t in bars.data] == ["a", "b"]
    with pytest.raises(TypeError, match="runs must be"):
        vo.loss_curves_figure([1.0])
    with pytest.raises(ValueError, match="every row needs"):
        vo.bench_bars_figure([{"name": "a"}])


def test_benchmark_quick_run(monkeypatch):
    from labkit.benchmarks import adamw as bench

    monkeypatch.setattr(bench, "_configs", lambda quick: [dict(n_layer=1, n_embd=32, n_head=2)])
    monkeypatch.setattr(bench, "_train_steps", lambda quick: 8)
    rows = bench.run(quick=True)
    names = [r["name"] for r in rows]
    assert names == list(bench.optimizers())
    by = {r["name"]: r for r in rows}
    assert all(r["median_ms"] > 0 and r["baseline_ms"] == rows[0]["median_ms"] for r in rows)
    assert by["labkit AdamW (bf16 states)"]["state_bytes"] < 0.51 * by["labkit AdamW (fp32 states)"]["state_bytes"]
    assert by["labkit AdamW (fp32 states)"]["state_bytes"] == by["torch AdamW (default)"]["state_bytes"]
    assert by["labkit AdamW (fp32 states)"]["final_loss"] == pytest.approx(by["torch AdamW (default)"]["final_loss"],
                                                                          rel=1e-4)
    fp16 = by["labkit AdamW (fp16 states)"]["final_loss"]
    assert math.isnan(fp16) or fp16 > 10 * by["torch AdamW (default)"]["final_loss"]   # the trap, in the benchmark
    with pytest.raises(TypeError, match="quick"):
        bench.run(quick="yes")
