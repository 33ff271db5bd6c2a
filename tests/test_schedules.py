"""Chapter 03-adamw: labkit.optim.schedules (warm-up + cosine, WSD, constant, inverse time, LambdaLR)
and the Amos-style rules (learning rate and weight decay from a parameter's scale, Amos's decay)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.optim import schedules as sch
from labkit.optim.adamw import AdamW

# --- hand-computed values ---------------------------------------------------------------------


def test_warmup_cosine_by_hand():
    s = sch.WarmupCosine(max_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(5) == pytest.approx(0.5)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)          # half-way: cos(π/2) = 0
    assert s.lr_at(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(10_000) == pytest.approx(0.1)
    assert s.factor(60) == pytest.approx(0.55) and s(60) == s.factor(60)
    assert s.lrs(3) == [0.0, 0.1, 0.2]


def test_wsd_constant_inverse_time_by_hand():
    w = sch.WarmupStableDecay(max_lr=2.0, total_steps=100, warmup_steps=10, decay_fraction=0.2, min_lr=0.0)
    assert w.decay_start == 80
    assert [w.lr_at(t) for t in (0, 5, 10, 50, 80)] == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert w.lr_at(90) == pytest.approx(1.0) and w.lr_at(100) == 0.0 and w.lr_at(150) == 0.0
    cos = sch.WarmupStableDecay(max_lr=2.0, total_steps=100, decay_fraction=0.2, shape="cosine")
    sqrt = sch.WarmupStableDecay(max_lr=2.0, total_steps=100, decay_fraction=0.2, shape="sqrt")
    assert cos.lr_at(90) == pytest.approx(1.0) and sqrt.lr_at(85) == pytest.approx(2.0 * (1 - 0.5))
    assert cos.lr_at(0) == 2.0                                     # no warm-up: starts at max_lr
    c = sch.ConstantWithWarmup(max_lr=0.3, warmup_steps=4)
    assert [c.lr_at(t) for t in range(6)] == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3, 0.3])
    inv = sch.InverseTime(max_lr=1.0, decay=0.5, warmup_steps=2)
    assert inv.lr_at(1) == 0.5 and inv.lr_at(2) == 1.0 and inv.lr_at(4) == pytest.approx(0.5)


# --- properties -------------------------------------------------------------------------------

schedules = st.one_of(
    st.builds(lambda total, wf, lo: sch.WarmupCosine(max_lr=1e-3, total_steps=total, warmup_steps=int(wf * (total - 1)),
                                                     min_lr=lo * 1e-3),
              st.integers(2, 5000), st.floats(0, 0.5), st.floats(0, 1)),
    st.builds(lambda total, wf, df, lo, shape: sch.WarmupStableDecay(
        max_lr=1e-3, total_steps=total, warmup_steps=int(wf * total * (1 - df)), decay_fraction=df,
        min_lr=lo * 1e-3, shape=shape),
        st.integers(1, 5000), st.floats(0, 0.5), st.floats(0.01, 1.0), st.floats(0, 1),
        st.sampled_from(sch.DECAY_SHAPES)),
    st.builds(lambda w: sch.ConstantWithWarmup(max_lr=1e-3, warmup_steps=w), st.integers(0, 500)),
    st.builds(lambda c, w: sch.InverseTime(max_lr=1e-3, decay=c, warmup_steps=w), st.floats(0, 1), st.integers(0, 500)),
)


def boundaries(s) -> list[float]:
    b = [float(s.warmup_steps)]
    if hasattr(s, "total_steps"):
        b.append(float(s.total_steps))
    if isinstance(s, sch.WarmupStableDecay):
        b.append(s.decay_start)
    return [x for x in b if x > 0]


@settings(max_examples=60, deadline=None)
@given(s=schedules, t=st.floats(0, 6000))
def test_bounds_and_factor(s, t):
    lr = s.lr_at(t)
    assert 0.0 <= lr <= s.max_lr * (1 + 1e-12)
    if t >= s.warmup_steps and hasattr(s, "min_lr"):
        assert lr >= s.min_lr * (1 - 1e-12)
    assert s.factor(t) == pytest.approx(lr / s.max_lr)


@settings(max_examples=60, deadline=None)
@given(s=schedules)
def test_monotone_warmup_and_continuity_at_boundaries(s):
    if s.warmup_steps:
        ramp = [s.lr_at(s.warmup_steps * k / 20) for k in range(21)]
        assert all(a < b for a, b in zip(ramp, ramp[1:]))          # strictly increasing warm-up
        assert ramp[-1] == pytest.approx(s.max_lr)
    for b in boundaries(s):
        h = 1e-9 * max(b, 1.0)
        # tolerance: the "sqrt" decay shape is continuous but has an infinite slope where it starts
        assert s.lr_at(max(b - h, 0.0)) == pytest.approx(s.lr_at(b + h), abs=1e-3 * s.max_lr), b


@settings(max_examples=60, deadline=None)
@given(s=schedules)
def test_non_increasing_after_warmup(s):
    end = getattr(s, "total_steps", 3000) * 1.1
    ts = [s.warmup_steps + (end - s.warmup_steps) * k / 200 for k in range(201)]
    lrs = [s.lr_at(t) for t in ts]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(lrs, lrs[1:]))


@settings(max_examples=40, deadline=None)
@given(total=st.integers(10, 5000), df=st.floats(0.01, 0.9), t=st.floats(0, 1))
def test_wsd_decays_only_in_the_last_fraction(total, df, t):
    s = sch.WarmupStableDecay(max_lr=1.0, total_steps=total, warmup_steps=0, decay_fraction=df)
    step = t * total
    if step <= total * (1 - df):
        assert s.lr_at(step) == 1.0
    else:
        assert s.lr_at(step) < 1.0


def test_lambda_lr_drives_the_optimizer():
    p = torch.zeros(2, requires_grad=True)
    opt = AdamW([p], lr=123.0)
    s = sch.WarmupCosine(max_lr=3e-3, total_steps=30, warmup_steps=5, min_lr=3e-4)
    sched = sch.lambda_lr(opt, s)
    seen = []
    for _ in range(35):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert seen == pytest.approx([s.lr_at(k) for k in range(35)], rel=1e-12, abs=1e-15)
    plain = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([p], lr=3e-3), s.factor)  # the factor directly
    assert plain.get_last_lr()[0] == pytest.approx(s.lr_at(0))
    with pytest.raises(TypeError, match="schedule must be"):
        sch.lambda_lr(opt, lambda k: 1.0)


@pytest.mark.parametrize("make,match", [
    (lambda: sch.WarmupCosine(max_lr=0.0, total_steps=10), r"WarmupCosine: max_lr must be in \(0, inf\)"),
    (lambda: sch.WarmupCosine(max_lr=1.0, total_steps=0), r"WarmupCosine: total_steps must be an int >= 1"),
    (lambda: sch.WarmupCosine(max_lr=1.0, total_steps=10, warmup_steps=10), "warmup_steps must be < total_steps"),
    (lambda: sch.WarmupCosine(max_lr=1.0, total_steps=10, min_lr=2.0), r"min_lr must be in \[0, 1\]"),
    (lambda: sch.WarmupCosine(max_lr=1.0, total_steps=10, warmup_steps=-1), "warmup_steps must be an int >= 0"),
    (lambda: sch.WarmupStableDecay(max_lr=1.0, total_steps=10, decay_fraction=0.0),
     r"decay_fraction must be in \(0, 1\]"),
    (lambda: sch.WarmupStableDecay(max_lr=1.0, total_steps=10, warmup_steps=9, decay_fraction=0.5),
     "warmup_steps must be <= the decay's start"),
    (lambda: sch.WarmupStableDecay(max_lr=1.0, total_steps=10, shape="step"), "shape must be one of"),
    (lambda: sch.InverseTime(max_lr=1.0, decay=-1.0), r"InverseTime: decay must be in \[0, inf\)"),
    (lambda: sch.ConstantWithWarmup(max_lr=1.0).lr_at(-1), r"ConstantWithWarmup: step must be in \[0, inf\)"),
    (lambda: sch.amos_lr(0.0, 0.1), r"amos_lr: eta must be in \(0, inf\)"),
    (lambda: sch.amos_weight_decay(1e-3, -1.0), "amos_weight_decay: eta must be in"),
    (lambda: sch.equilibrium_rms(1e-3, 0.0), r"equilibrium_rms: rho must be in \(0, 1\]"),
    (lambda: sch.amos_schedule(10, xi=0.0, eta=1.0), "amos_schedule: xi must be in"),
    (lambda: sch.amos_schedule(-1, xi=0.1, eta=1.0), "amos_schedule: steps must be an int >= 0"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# --- Amos-style rules -------------------------------------------------------------------------


def test_amos_rules_by_hand():
    assert sch.amos_lr(0.02, 0.1) == pytest.approx(2e-3)
    assert sch.amos_weight_decay(2e-3, 0.02) == pytest.approx(2e-3 ** 2 / (2 * 0.02 ** 2)) == pytest.approx(5e-3)
    assert sch.adamw_weight_decay(2e-3, 0.02) == pytest.approx(2.5)     # lr·λ = ρ
    assert sch.equilibrium_rms(0.1, 0.005) == pytest.approx(0.1 / math.sqrt(0.01 - 0.005 ** 2))
    # rules 1 and 2 together: the equilibrium is η, up to the ρ² term
    lr = sch.amos_lr(0.5, 0.05)
    assert sch.equilibrium_rms(lr, sch.amos_weight_decay(lr, 0.5)) == pytest.approx(0.5, rel=1e-3)


@settings(max_examples=10, deadline=None)
@given(rho=st.floats(0.002, 0.05), lr=st.floats(1e-3, 1.0), seed=st.integers(0, 100))
def test_equilibrium_rms_of_random_sign_updates(rho, lr, seed):
    """θ ← (1 − ρ)θ − α·u with independent ±1 entries: RMS(θ) settles at α/√(2ρ − ρ²)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(4096, dtype=torch.float64)
    rms = []
    for t in range(int(12 / rho)):
        u = torch.randint(0, 2, (4096,), generator=gen).double() * 2 - 1
        theta = (1 - rho) * theta - lr * u
        if t > 6 / rho:
            rms.append(theta.pow(2).mean().sqrt().item())
    assert sum(rms) / len(rms) == pytest.approx(sch.equilibrium_rms(lr, rho), rel=0.05)


@pytest.mark.parametrize("eta", [0.02, 0.5])
def test_adamw_with_amos_weight_decay_holds_the_scale(eta):
    """AdamW on pure-noise gradients with lr = ξη and weight_decay = lr/(2η²): RMS(θ) → η."""
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(32, 32, requires_grad=True)
    lr = sch.amos_lr(eta, xi=0.1)                    # relaxation time 1/ρ = 2/ξ² = 200 steps
    opt = AdamW([p], lr=lr, betas=(0.9, 0.99), weight_decay=sch.adamw_weight_decay(lr, eta))
    rms = []
    for t in range(1000):
        p.grad = torch.randn(32, 32, generator=gen)
        opt.step()
        if t >= 400:
            rms.append(p.detach().pow(2).mean().sqrt())
    assert torch.stack(rms).mean().item() == pytest.approx(eta, rel=0.1)


def test_amos_schedule_matches_pytorch_optimizer_amos():
    """pytorch_optimizer.Amos with a constant gradient: mean(g²/v̂) = 1 exactly, so its trajectory is
    θ ← θ − α_t·g/RMS(g) − ρ_t·θ with labkit's α_t, ρ_t (η = √(2/fan_in), its rule for matrices)."""
    from pytorch_optimizer import Amos

    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 8, generator=gen, dtype=torch.float64) * 0.3
    g = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    q = p0.clone().requires_grad_()
    opt = Amos([q], lr=0.1, foreach=False)
    steps = 60
    for _ in range(steps):
        q.grad = g.clone()
        opt.step()
    s = sch.amos_schedule(steps, xi=0.1, eta=math.sqrt(2 / 8))
    theta, u = p0.clone(), g / g.pow(2).mean().sqrt()
    for a, r in zip(s.lr, s.weight_decay):
        theta = theta - a * u - r * theta
    torch.testing.assert_close(theta, q.detach(), rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(xi=st.floats(1e-3, 0.5), eta=st.floats(1e-3, 2.0), zeta=st.floats(0.0, 1.0))
def test_amos_schedule_properties(xi, eta, zeta):
    s = sch.amos_schedule(400, xi=xi, eta=eta, zeta=zeta)
    assert s.b[0] == 0.0 and all(a <= b for a, b in zip(s.b, s.b[1:]))
    assert s.lr[0] == pytest.approx(xi * eta) and s.weight_decay[0] == pytest.approx(xi * xi / 2)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(s.lr, s.lr[1:]))          # the lr only decays
    assert all(b <= a * (1 + 1e-12) for a, b in zip(s.weight_decay, s.weight_decay[1:]))
    if zeta == 0.0:
        assert s.lr == pytest.approx([xi * eta] * 400)                        # ζ = 0: no decay


def test_amos_param_groups():
    from labkit.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_embd=16, n_head=2))
    groups = sch.amos_param_groups(model.named_parameters(), xi=0.1, eta={"tok_emb.weight": 0.02})
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)) == len({id(p) for p in model.parameters()})   # tied weights once
    by = {g["name"]: g for g in groups}
    assert by["tok_emb.weight"]["lr"] == pytest.approx(2e-3)
    assert by["tok_emb.weight"]["weight_decay"] == pytest.approx(2e-3 / (2 * 0.02 ** 2))
    norm = next(n for n in names if n.endswith("norm1.weight"))
    assert by[norm]["eta"] == 1.0 and by[norm]["lr"] == pytest.approx(0.1)          # a gain of ones: η = 1
    opt = AdamW(groups)                                                               # torch accepts extra keys
    model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))[1].backward()
    opt.step()
    with pytest.raises(ValueError, match="amos_param_groups: eta"):
        sch.amos_param_groups(model.named_parameters(), xi=0.1, eta={"tok_emb.weight": -1.0})
