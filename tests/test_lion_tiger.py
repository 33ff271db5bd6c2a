"""Tests of chapter 04-lion-tiger: labkit.optim.lion.Lion, labkit.optim.tiger.Tiger, their exercises,
benchmarks and figures.

Parity: Lion against lion_pytorch.Lion, Tiger (lr_scale="none") against pytorch_optimizer.Tiger,
bitwise on the CPU in float32 and float64 over 10 steps.
"""

from __future__ import annotations

import copy
import math

import lion_pytorch
import pytest
import pytorch_optimizer
import torch
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.exercises import exercises_for, lookup
from labkit.optim.lion import Lion, flip_rate, interpolation_trace, touched_rows
from labkit.optim.memory import grad_bytes, state_bytes
from labkit.optim.tiger import Tiger, effective_lr

DTYPES = [torch.float32, torch.float64]


# --- helpers ------------------------------------------------------------------------------------


def make_params(dtype=torch.float64, seed=0):
    """A matrix, a vector, a scalar and a zero-size tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (3,), (), (0, 4)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def run(opt_cls, kwargs, *, steps=10, dtype=torch.float64, none_at=(3, 1), seed=1, groups=False):
    """`steps` steps with seeded random gradients; at step none_at[0] parameter none_at[1] has no grad."""
    ps = make_params(dtype)
    if groups:  # two groups: the second with its own lr and weight decay
        kw = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")}
        opt = opt_cls([dict(params=ps[:2]), dict(params=ps[2:], lr=kwargs["lr"] * 3, weight_decay=0.0)],
                      lr=kwargs["lr"], weight_decay=kwargs["weight_decay"], **kw)
    else:
        opt = opt_cls(ps, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        if t == none_at[0]:
            ps[none_at[1]].grad = None
        opt.step()
    return [p.detach().clone() for p in ps], opt


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


# --- Lion: parity, state, validation ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("groups", [False, True])
def test_lion_matches_lion_pytorch_bitwise(dtype, foreach, groups):
    hp = dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.5)
    ours, opt = run(Lion, dict(hp, foreach=foreach), dtype=dtype, groups=groups)
    ref, _ = run(lion_pytorch.Lion, hp, dtype=dtype, groups=groups)
    assert_same(ours, ref)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == dtype


def test_lion_defaults_match_lion_pytorch():
    ours = Lion([torch.zeros(1, requires_grad=True)]).defaults
    ref = lion_pytorch.Lion([torch.zeros(1, requires_grad=True)]).defaults
    assert (ours["lr"], tuple(ours["betas"]), ours["weight_decay"]) == (ref["lr"], tuple(ref["betas"]),
                                                                        ref["weight_decay"])


def test_lion_none_grad_leaves_param_and_state_alone():
    p, q = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = Lion([p, q], lr=0.1, weight_decay=0.5)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(q.detach(), torch.ones(2)) and len(opt.state[q]) == 0
    assert torch.allclose(p.detach(), torch.full((3,), 1 * (1 - 0.05) - 0.1))


def roundtrip(opt_cls, kwargs, *, accumulate_nan_at=None):
    """10 steps, save, load into a fresh optimizer and parameters, 10 more: vs 20 uninterrupted."""
    def steps(opt, ps, ts, gen):
        for t in ts:
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if t == accumulate_nan_at:
                ps[0].grad[0, 0] = float("nan")
            opt.step()

    ps = make_params(torch.float32)
    steps(opt_cls(ps, **kwargs), ps, range(20), torch.Generator().manual_seed(5))
    straight = [p.detach().clone() for p in ps]

    ps, gen = make_params(torch.float32), torch.Generator().manual_seed(5)
    opt = opt_cls(ps, **kwargs)
    steps(opt, ps, range(10), gen)
    saved_state, saved_params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
    fresh = [p.clone().requires_grad_() for p in saved_params]
    opt2 = opt_cls(fresh, **kwargs)
    opt2.load_state_dict(saved_state)
    steps(opt2, fresh, range(10, 20), gen)
    assert_same([p.detach() for p in fresh], straight)
    return opt, opt2


def test_lion_state_dict_roundtrip_is_bitwise():
    roundtrip(Lion, dict(lr=1e-2, weight_decay=0.1))


def test_lion_closure_returns_loss():
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = Lion([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    assert torch.allclose(p.detach(), torch.tensor([0.9, -1.9]))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=0.0), ValueError, r"Lion: lr must be in \(0, inf\), got 0.0"),
    (dict(lr="1e-3"), TypeError, "Lion: lr must be a real number"),
    (dict(betas=(1.0, 0.99)), ValueError, r"Lion: betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"Lion: betas\[1\] must be in \[0, 1\), got -0.1"),
    (dict(betas=(0.9,)), ValueError, "Lion: betas must be a tuple of 2"),
    (dict(weight_decay=-1.0), ValueError, r"Lion: weight_decay must be in \[0, inf\), got -1.0"),
    (dict(lazy=1), TypeError, "Lion: lazy must be a bool, got int 1"),
    (dict(foreach="yes"), TypeError, "Lion: foreach must be None or a bool"),
])
def test_lion_rejects_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        Lion([torch.zeros(2, requires_grad=True)], **kwargs)


def test_lion_checks_each_param_group():
    with pytest.raises(ValueError, match=r"Lion: lr must be in \(0, inf\), got -1.0"):
        Lion([dict(params=[torch.zeros(2, requires_grad=True)], lr=-1.0)])


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    for opt in (Lion(emb.parameters()), Tiger(emb.parameters())):
        with pytest.raises(ValueError, match="sparse gradients are not supported"):
            opt.step()


@given(rows=st.integers(1, 6), cols=st.integers(1, 6), lr=st.floats(1e-5, 1e-1),
       beta1=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_lion_moves_every_coordinate_by_exactly_lr(rows, cols, lr, beta1, seed):
    """Without weight decay |Δθ| = lr where c != 0 and 0 where c == 0: the update's RMS is 1 per element."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(rows, cols, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    grad[0, 0] = 0.0  # with m = 0 this coordinate has c = 0
    before = p.detach().clone()
    opt = Lion([p], lr=lr, betas=(beta1, 0.99))
    p.grad = grad
    opt.step()
    step = (p.detach() - before).abs()
    assert step[0, 0] == 0
    nonzero = grad != 0
    torch.testing.assert_close(step[nonzero], torch.full_like(step[nonzero], lr), rtol=1e-12, atol=1e-15)


# --- Tiger: parity, accumulation, NaN guard, lr scaling --------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("groups", [False, True])
def test_tiger_matches_pytorch_optimizer_bitwise(dtype, foreach, groups):
    hp = dict(lr=3e-2, beta=0.965, weight_decay=0.5)
    ours, _ = run(Tiger, dict(hp, foreach=foreach), dtype=dtype, groups=groups)
    ref, _ = run(pytorch_optimizer.Tiger, dict(hp, foreach=False), dtype=dtype, groups=groups)
    assert_same(ours, ref)


def test_tiger_defaults_match_pytorch_optimizer():
    ours = Tiger([torch.zeros(1, requires_grad=True)]).defaults
    ref = pytorch_optimizer.Tiger([torch.zeros(1, requires_grad=True)]).defaults
    assert (ours["lr"], ours["beta"], ours["weight_decay"]) == (ref["lr"], ref["beta"], ref["weight_decay"])


@given(beta=st.floats(0.0, 0.99), lr=st.floats(1e-4, 1e-1), wd=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_tiger_is_lion_with_equal_betas(beta, lr, wd, seed):
    a, _ = run(Tiger, dict(lr=lr, beta=beta, weight_decay=wd), steps=7, seed=seed)
    b, _ = run(Lion, dict(lr=lr, betas=(beta, beta), weight_decay=wd), steps=7, seed=seed)
    for x, y in zip(a, b):  # lerp vs mul-add rounding only (a sign flip would show as a 2*lr jump)
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_tiger_state_dict_roundtrip_is_bitwise_with_accumulation_and_skips():
    opt, opt2 = roundtrip(Tiger, dict(lr=1e-2, accumulation_steps=3), accumulate_nan_at=4)
    assert opt.skipped_steps == opt2.skipped_steps == 1
    assert opt2.param_groups[0]["micro_step"] == (20 - 1) % 3


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tiger_accumulation_equals_plain_accumulation(k):
    """k micro-steps folded into the momentum == one step on the mean of the k micro-batch gradients."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 6, generator=gen, dtype=torch.float64),
             torch.randn(5, 3, generator=gen, dtype=torch.float64)) for _ in range(6 * k)]
    folded, plain = tiny_model(), tiny_model()
    opt_f = Tiger(folded.parameters(), lr=1e-2, weight_decay=0.1, accumulation_steps=k)
    opt_p = Tiger(plain.parameters(), lr=1e-2, weight_decay=0.1)
    for i, (x, y) in enumerate(data):
        torch.nn.functional.mse_loss(folded(x), y).backward()
        before = [p.detach().clone() for p in folded.parameters()]
        opt_f.step()  # after EVERY micro-batch
        opt_f.zero_grad(set_to_none=True)  # the gradient is in the momentum now: free it
        if (i + 1) % k:  # inside a cycle the parameters do not move
            assert_same([p.detach() for p in folded.parameters()], before)
        # plain accumulation: sum the averaged gradients in .grad, step once per cycle
        (torch.nn.functional.mse_loss(plain(x), y) / k).backward()
        if (i + 1) % k == 0:
            opt_p.step()
            opt_p.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in folded.parameters())  # no gradient kept between micro-steps
    for a, b in zip(folded.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@given(k=st.integers(1, 6), beta=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_accumulated_momentum_is_beta_m_plus_mean_gradient(k, beta, seed):
    gen = torch.Generator().manual_seed(seed)
    m0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    gs = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(k)]
    p = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    opt = Tiger([p], beta=beta, accumulation_steps=k)
    opt.state[p]["exp_avg"] = m0.clone()
    for g in gs:
        p.grad = g
        opt.step()
    expected = beta * m0 + (1 - beta) * torch.stack(gs).mean(0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_tiger_skips_a_step_with_a_nonfinite_gradient(bad):
    ps = make_params(torch.float32)
    opt = Tiger(ps, lr=0.1, accumulation_steps=2)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # micro-step 1 of 2: momentum only
    params, moms = [p.detach().clone() for p in ps], [opt.state[p]["exp_avg"].clone() for p in ps]
    ps[1].grad = torch.tensor([1.0, bad, 1.0])  # one bad entry in ONE tensor skips the whole step
    opt.step()
    assert opt.skipped_steps == 1 and opt.param_groups[0]["micro_step"] == 1
    assert_same([p.detach() for p in ps], params)
    assert_same([opt.state[p]["exp_avg"] for p in ps], moms)
    ps[1].grad = torch.ones(3)
    opt.step()  # the cycle completes with the next finite gradient
    assert opt.param_groups[0]["micro_step"] == 0 and not torch.equal(ps[0].detach(), params[0])


def test_without_the_guard_a_nan_hides_in_the_momentum():
    """On the CPU torch.sign(nan) == 0: θ stays finite, but the coordinate's momentum is NaN for good and
    the coordinate only decays from then on (a silent failure)."""
    p = torch.ones(3, requires_grad=True)
    opt = Tiger([p], lr=0.1, weight_decay=0.1, skip_nonfinite=False)
    p.grad = torch.tensor([float("nan"), 1.0, 1.0])
    opt.step()
    for _ in range(5):
        p.grad = -torch.ones(3)  # gradients that should push every coordinate up
        opt.step()
    m = opt.state[p]["exp_avg"]
    assert opt.skipped_steps == 0 and torch.isnan(m[0]) and torch.isfinite(m[1:]).all()
    assert p[0].item() == pytest.approx((1 - 0.01) ** 6) and (p[1:] > 1.0).all()


def test_tiger_rms_learning_rate():
    W = torch.full((4, 4), 2.0, dtype=torch.float64, requires_grad=True)  # RMS 2
    b = torch.full((4,), 3.0, dtype=torch.float64, requires_grad=True)
    opt = Tiger([W, b], lr=0.1, weight_decay=0.0, lr_scale="rms")
    W.grad, b.grad = torch.ones(4, 4, dtype=torch.float64), -torch.ones(4, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(W.detach(), torch.full((4, 4), 2.0 - 0.1 * 2.0, dtype=torch.float64))
    torch.testing.assert_close(b.detach(), torch.full((4,), 3.0 + 0.5 * 0.1, dtype=torch.float64))
    assert effective_lr(torch.zeros(2, 2), 0.1, "rms").item() == 0.0  # a zero matrix cannot move under "rms"
    assert effective_lr(torch.ones(2, 2), 0.1, "none") == 0.1


@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_tiger_rms_updates_are_scale_equivariant(scale, seed):
    """With lr ∝ RMS(θ) (and no weight decay), training c·θ gives c times the trajectory of θ."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(3, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(7)]
    out = []
    for c in (1.0, scale):
        p = (theta * c).requires_grad_()
        opt = Tiger([p], lr=0.05, weight_decay=0.0, lr_scale="rms")
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        out.append(p.detach())
    torch.testing.assert_close(out[1], out[0] * scale, rtol=1e-10, atol=1e-12)


def test_tiger_rms_works_in_bfloat16():
    p = torch.randn(8, 8).bfloat16().requires_grad_()
    opt = Tiger([p], lr=1e-2, lr_scale="rms")
    p.grad = torch.randn(8, 8).bfloat16()
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.bfloat16 and torch.isfinite(p).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=-1e-3), ValueError, r"Tiger: lr must be in \(0, inf\), got -0.001"),
    (dict(beta=1.0), ValueError, r"Tiger: beta must be in \[0, 1\), got 1.0"),
    (dict(beta=None), TypeError, "Tiger: beta must be a real number"),
    (dict(weight_decay=-0.01), ValueError, r"Tiger: weight_decay must be in \[0, inf\), got -0.01"),
    (dict(lr_scale="layer"), ValueError, r"Tiger: lr_scale must be one of \('none', 'rms'\), got 'layer'"),
    (dict(skip_nonfinite="no"), TypeError, "Tiger: skip_nonfinite must be a bool, got str 'no'"),
    (dict(accumulation_steps=0), ValueError, "Tiger: accumulation_steps must be an int >= 1, got 0"),
    (dict(accumulation_steps=2.0), TypeError, "Tiger: accumulation_steps must be an int, got float 2.0"),
    (dict(lazy=None), TypeError, "Tiger: lazy must be a bool, got NoneType None"),
    (dict(lazy=True, accumulation_steps=2), ValueError, "Tiger: lazy=True needs accumulation_steps=1"),
    (dict(foreach=0), TypeError, "Tiger: foreach must be None or a bool, got int 0"),
])
def test_tiger_rejects_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        Tiger([torch.zeros(2, requires_grad=True)], **kwargs)


def test_tiger_checks_each_param_group():
    with pytest.raises(ValueError, match=r"Tiger: beta must be in \[0, 1\), got 1.5"):
        Tiger([dict(params=[torch.zeros(2, requires_grad=True)], beta=1.5)])


# --- lazy rows (the embedding remedy) --------------------------------------------------------------


@pytest.mark.parametrize("opt_cls,kw", [(Lion, dict(lr=0.1, weight_decay=0.5)),
                                        (Tiger, dict(lr=0.1, weight_decay=0.5)),
                                        (Tiger, dict(lr=0.1, weight_decay=0.5, lr_scale="rms"))])
@given(rows=st.integers(1, 8), cols=st.integers(1, 4), data=st.data())
def test_lazy_touches_only_rows_with_a_gradient(opt_cls, kw, rows, cols, data):
    present = data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    table = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    m0 = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    grad = torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.tensor(present).double()[:, None]
    out = {}
    for lazy in (False, True):
        p = table.clone().requires_grad_()
        opt = opt_cls([p], lazy=lazy, **kw)
        opt.state[p]["exp_avg"] = m0.clone()
        p.grad = grad.clone()
        opt.step()
        out[lazy] = (p.detach(), opt.state[p]["exp_avg"])
    rows_on = torch.tensor(present)
    for i in range(2):  # touched rows: as the dense update; other rows: untouched, momentum included
        assert torch.equal(out[True][i][rows_on], out[False][i][rows_on])
        assert torch.equal(out[True][i][~rows_on], (table, m0)[i][~rows_on])


def test_touched_rows():
    g = torch.zeros(4, 2, 3)
    g[1, 0, 2] = 1.0
    g[3] = -2.0
    assert touched_rows(g).tolist() == [1, 3]


def test_never_seen_rows_only_decay_but_a_seen_row_keeps_moving():
    """m = 0 gives sign 0 (only weight decay); one gradient leaves sign(m) = ±1 for the following steps."""
    E = torch.full((2, 3), 0.5, dtype=torch.float64, requires_grad=True)
    opt = Tiger([E], lr=0.01, weight_decay=0.1)
    for t in range(50):
        E.grad = torch.zeros(2, 3, dtype=torch.float64)
        if t == 0:
            E.grad[1] = 1.0  # row 1 seen once, row 0 never
        opt.step()
    torch.testing.assert_close(E.detach()[0], torch.full((3,), 0.5 * (1 - 0.001) ** 50, dtype=torch.float64))
    assert (E.detach()[1] < 0.5 - 50 * 0.01 * 0.9).all()  # ~lr per step for all 50 steps


# --- helpers: traces and bytes -------------------------------------------------------------------


def test_interpolation_trace_and_flip_rate():
    c, m = interpolation_trace([1.0, -1.0, 2.0], beta1=0.5, beta2=0.75)
    torch.testing.assert_close(m, torch.tensor([0.25, -0.0625, 0.453125], dtype=torch.float64))
    torch.testing.assert_close(c, torch.tensor([0.5, -0.375, 0.96875], dtype=torch.float64))
    assert flip_rate(torch.tensor([1.0, -1.0, -2.0, 3.0])) == pytest.approx(2 / 3)
    c0, _ = interpolation_trace(torch.linspace(-1, 1, 9), beta1=0.0)
    assert torch.equal(c0, torch.linspace(-1, 1, 9, dtype=torch.float64))  # β1 = 0: Lion steps on sign(g)
    with pytest.raises(ValueError, match=r"interpolation_trace: beta1 must be in \[0, 1\), got 1.0"):
        interpolation_trace([1.0], beta1=1.0)
    with pytest.raises(ValueError, match="flip_rate: x must be 1-D with at least 2 entries"):
        flip_rate(torch.ones(1))


def test_state_and_grad_bytes():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: one parameter
    n = 40
    x = torch.arange(6)[None]
    opts = {"adamw": torch.optim.AdamW(model.parameters()), "lion": Lion(model.parameters()),
            "tiger": Tiger(model.parameters())}
    for opt in opts.values():
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert state_bytes(opts["lion"]) == state_bytes(opts["tiger"]) == n * 4  # one momentum
    assert state_bytes(opts["adamw"]) == 2 * n * 4  # m and v (step counters are left out)
    assert grad_bytes(opts["lion"]) == n * 4  # the tied weight's gradient once
    with pytest.raises(TypeError, match="grad_bytes: optimizer must be a torch.optim.Optimizer"):
        grad_bytes(model)


# --- exercises ---------------------------------------------------------------------------------

NAMES = ["lion-tiger.accumulate", "lion-tiger.lion_step", "lion-tiger.state_bytes", "lion-tiger.tiger_step"]


def test_exercises_registered():
    assert exercises_for("04-lion-tiger") == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_exercise_reference_passes(name):
    assert labkit.check(name, lookup(name).reference, quiet=True)


def student_lion(param, grad, exp_avg, lr, beta1, beta2, weight_decay):
    c = beta1 * exp_avg + (1 - beta1) * grad
    return param * (1 - lr * weight_decay) - lr * torch.sign(c), beta2 * exp_avg + (1 - beta2) * grad


def student_tiger(param, grad, exp_avg, lr, beta, weight_decay):
    m = beta * exp_avg + (1 - beta) * grad
    eta = lr * param.pow(2).mean().sqrt()
    return param - eta * (torch.sign(m) + weight_decay * param), m


def student_bytes(param_shapes, bytes_per_elem, optimizer, accumulation_steps=1):
    n = sum(math.prod(s) for s in param_shapes)
    per = {"sgd": 0, "adamw": 2, "lion": 1, "tiger": 1}[optimizer]
    if accumulation_steps > 1 and optimizer != "tiger":
        per += 1
    return per * n * bytes_per_elem


def student_accumulate(exp_avg, micro_grads, beta):
    return beta * exp_avg + (1 - beta) * sum(micro_grads) / len(micro_grads)


@pytest.mark.parametrize("name,fn", [("lion-tiger.lion_step", student_lion), ("lion-tiger.tiger_step", student_tiger),
                                     ("lion-tiger.state_bytes", student_bytes),
                                     ("lion-tiger.accumulate", student_accumulate)])
def test_plain_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


def momentum_first(param, grad, exp_avg, lr, beta1, beta2, weight_decay):
    m = beta2 * exp_avg + (1 - beta2) * grad
    c = beta1 * m + (1 - beta1) * grad
    return param * (1 - lr * weight_decay) - lr * torch.sign(c), m


@pytest.mark.parametrize("name,fn", [
    ("lion-tiger.lion_step", momentum_first),  # updates m before taking the sign
    ("lion-tiger.lion_step", lambda param, grad, exp_avg, lr, beta1, beta2, weight_decay: (
        param - lr * torch.sign(beta1 * exp_avg + (1 - beta1) * grad), beta2 * exp_avg + (1 - beta2) * grad)),
    ("lion-tiger.tiger_step", lambda param, grad, exp_avg, lr, beta, weight_decay: (  # forgets the RMS scale
        param - lr * (torch.sign(beta * exp_avg + (1 - beta) * grad) + weight_decay * param),
        beta * exp_avg + (1 - beta) * grad)),
    ("lion-tiger.tiger_step", lambda param, grad, exp_avg, lr, beta, weight_decay: (  # sign of the OLD momentum
        param - lr * param.pow(2).mean().sqrt() * (torch.sign(exp_avg) + weight_decay * param),
        beta * exp_avg + (1 - beta) * grad)),
    ("lion-tiger.state_bytes", lambda param_shapes, bytes_per_elem, optimizer, accumulation_steps=1:
        student_bytes(param_shapes, bytes_per_elem, optimizer, 1)),  # forgets the accumulation buffer
    ("lion-tiger.accumulate", lambda exp_avg, micro_grads, beta:  # decays the momentum at every micro-step
        [exp_avg := beta * exp_avg + (1 - beta) / len(micro_grads) * g for g in micro_grads][-1]),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


# --- benchmarks and figures ---------------------------------------------------------------------


def test_benchmark_rows(monkeypatch):
    from labkit.benchmarks import lion_tiger as bench_mod

    small = dict(model=dict(n_layer=1, n_embd=16, n_head=2, block_size=16), batch=2, steps=4, lr=1e-3, wd=0.1,
                 sign_lr=1e-3, sign_wd=1.0, repeats=2)
    monkeypatch.setattr(bench_mod, "config", lambda quick=False: small)
    rows = bench_mod.run(quick=True)
    assert [r["name"] for r in rows] == ["AdamW", "Lion", "Tiger"]
    assert rows[0]["ratio"] == 1.0 and all(r["baseline"] == "AdamW" for r in rows)
    for r in rows:
        assert r["device"] and r["median_ms"] > 0 and r["baseline_ms"] > 0 and math.isfinite(r["final_loss"])
        assert "losses" not in r
    assert rows[1]["state_bytes"] == rows[2]["state_bytes"] == rows[1]["params"] * 4
    assert 0.49 < rows[1]["state_ratio"] <= 0.5


def test_benchmark_config_validates():
    from labkit.benchmarks import lion_tiger as bench_mod

    with pytest.raises(TypeError, match="config: quick must be a bool"):
        bench_mod.config(quick="yes")
    assert bench_mod.config(True)["steps"] < bench_mod.config(False)["steps"]


def test_figures_build():
    import plotly.graph_objects as go

    from labkit.viz import sign_updates as su

    assert isinstance(su.sign_pattern_figure(0.9, 0.99, 1.0), go.Figure)
    st0 = su.sign_pattern_stats(0.0, 0.99, 1.0)
    assert st0["flip_c"] == st0["flip_g"]  # β1 = 0: Lion follows sign(g)
    st1 = su.sign_pattern_stats(0.9, 0.99, 1.0)
    assert st1["flip_c"] < st1["flip_g"]
    rows = [dict(optimizer="AdamW", lr=1e-3, final_loss=2.0), dict(optimizer="Lion", lr=1e-3, final_loss=2.1)]
    assert len(su.lr_sweep_figure(rows).data) == 2
    assert len(su.memory_figure([dict(setting="a", state_bytes=8, grad_bytes=4)]).data) == 2
    assert len(su.stale_update_figure({"Tiger": ([1, 2], [1.0, 0.0])}).data) == 1
    assert len(su.fixed_point_figure({"Tiger": [1.0, 2.0]}, 0.01).data) == 1
    with pytest.raises(ValueError, match="synthetic_gradients: steps must be an int >= 2"):
        su.synthetic_gradients(steps=1)


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("opt_cls,kw", [(Lion, dict(lr=1e-2, weight_decay=0.1)),
                                        (Tiger, dict(lr=1e-2, weight_decay=0.1)),
                                        (Tiger, dict(lr=1e-2, weight_decay=0.1, lr_scale="rms"))])
def test_cuda_matches_cpu(opt_cls, kw):
    cpu = make_params(torch.float64)
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    opts = opt_cls(cpu, **kw), opt_cls(gpu, **kw)  # foreach=None: fused kernels on CUDA, loop on CPU
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for a, b in zip(cpu, gpu):
            a.grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            b.grad = a.grad.cuda()
        for o in opts:
            o.step()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-12, atol=1e-12)
