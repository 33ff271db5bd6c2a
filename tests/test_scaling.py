"""Tests of labkit.train.scaling (chapter 10-scaling-laws): the law, compute-optimal allocation, the
over-training accounting, the Chinchilla-style fit (recovery of known constants, gradient, starts),
the measured-run helpers and the recorded sweep, argument checks, exercises, figures, benchmarks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import labkit
from labkit.train import scaling as sc

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models and 5-parameter fits: one thread is fastest

# laws whose two power terms are both visible: exponents 0.1-0.8, constants over four decades
laws = st.builds(
    lambda E, a, b, alpha, beta: sc.ScalingLaw(E=E, A=10**a, B=10**b, alpha=alpha, beta=beta),
    st.floats(0.0, 3.0), st.floats(0.5, 4.0), st.floats(0.5, 4.0), st.floats(0.1, 0.8), st.floats(0.1, 0.8))
budgets = st.floats(1e8, 1e27)


def rel(a, b):
    return abs(a - b) / abs(b)


# --- the law ------------------------------------------------------------------------------------


def test_loss_is_the_formula_and_broadcasts():
    law = sc.ScalingLaw(E=1.5, A=300.0, B=500.0, alpha=0.3, beta=0.4)
    assert law.loss(1e9, 1e11) == pytest.approx(1.5 + 300 / 1e9**0.3 + 500 / 1e11**0.4, rel=1e-15)
    N = np.array([1e8, 1e9, 1e10])
    got = law.loss(N[:, None], np.array([1e10, 1e12])[None, :])  # (3, 2)
    assert got.shape == (3, 2) and isinstance(law.loss(1e9, 1e9), float)
    assert np.all(np.diff(got, axis=0) < 0) and np.all(np.diff(got, axis=1) < 0)  # falls with N and with D
    assert sc.predict_loss(law, 1e9, 1e11) == law.loss(1e9, 1e11)
    assert law.loss(torch.tensor([1e9]), 1e11)[0] == pytest.approx(law.loss(1e9, 1e11))


def test_training_flops_and_tokens_per_param():
    assert sc.training_flops(70e9, 1.4e12) == pytest.approx(5.88e23)
    assert sc.tokens_per_param(70e9, 1.4e12) == pytest.approx(20.0)
    assert sc.tokens_per_param(sc.TINYLLAMA_PARAMS, sc.TINYLLAMA_TOKENS) == pytest.approx(2727.27, rel=1e-5)


# --- compute-optimal allocation -----------------------------------------------------------------


@given(law=laws, C=budgets)
def test_compute_optimal_spends_the_budget_and_is_the_argmin_on_the_iso_flop_curve(law, C):
    N, D = sc.compute_optimal(C, law)
    assert rel(6 * N * D, C) < 1e-12
    best = law.loss(N, D)
    Ns = N * np.geomspace(1e-2, 1e2, 4001)  # the iso-FLOP curve around the optimum
    curve = sc.iso_flop(C, Ns, law)
    assert curve.min() >= best - 1e-12 * best
    assert abs(math.log(Ns[np.argmin(curve)] / N)) <= math.log(1e4) / 4000 + 1e-12  # within one grid step
    for f in (0.999, 1.001):  # strictly worse a hair away on either side
        assert sc.iso_flop(C, N * f, law) > best - 1e-15
    assert sc.optimal_loss(C, law) == pytest.approx(best, rel=1e-12)


@given(law=laws, C=budgets, k=st.floats(1.1, 1e3))
def test_optimal_loss_falls_with_compute_and_compute_to_reach_inverts_it(law, C, k):
    L1, L2 = sc.optimal_loss(C, law), sc.optimal_loss(C * k, law)
    assert law.E < L2 < L1
    cond = L1 / (L1 - law.E) / law.gamma  # how much the inversion amplifies rounding in L1
    assert rel(sc.compute_to_reach(L1, law), C) < 1e-9 + 1e-13 * cond
    # N_opt grows like C^a and D_opt like C^b, a + b = 1
    (N1, D1), (N2, D2) = sc.compute_optimal(C, law), sc.compute_optimal(C * k, law)
    assert rel(N2 / N1, k**law.a) < 1e-9 and rel(D2 / D1, k**law.b) < 1e-9
    assert law.a + law.b == pytest.approx(1.0)


def test_published_constants_at_gophers_budget():
    """What the constants give at C = 5.76e23 (Gopher's budget, where Chinchilla 70B/1.4T was trained)."""
    C = 5.76e23
    N, D = sc.compute_optimal(C, sc.CHINCHILLA)  # Hoffmann's eq. (10), rounded exponents
    assert 31e9 < N < 33e9 and 2.9e12 < D < 3.1e12 and 90 < D / N < 95  # ~93 tokens/param, not ~20
    N, D = sc.compute_optimal(C, sc.BESIROGLU)  # the replication's refit
    assert 70e9 < N < 75e9 and 1.3e12 < D < 1.4e12 and 17 < D / N < 20  # ~18 tokens/param: Chinchilla's rule
    unrounded = sc.ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.3392, beta=0.2849)  # the paper's LaTeX source
    N, _ = sc.compute_optimal(C, unrounded)
    assert 39e9 < N < 42e9  # Hoffmann's Approach-3 ~40B: rounding alpha, beta moved N_opt by 20%


@given(law=laws, N=st.floats(1e3, 1e12), D=st.floats(1e4, 1e14))
def test_tokens_to_reach_inverts_the_law(law, N, D):
    loss = law.loss(N, D)
    cond = loss / (law.B * D**-law.beta) / law.beta  # rounding in `loss`, amplified by the inversion
    assert rel(sc.tokens_to_reach(loss, N, law), D) < 1e-9 + 1e-13 * cond
    floor = law.E + law.A * N**-law.alpha  # infinite data
    assert sc.tokens_to_reach(floor * 0.999, N, law) == math.inf


def test_array_inputs():
    law = sc.CHINCHILLA
    Cs = np.array([1e20, 1e22, 1e24])
    N, D = sc.compute_optimal(Cs, law)
    assert N.shape == D.shape == (3,) and np.allclose(6 * N * D, Cs)
    assert sc.compute_to_reach(sc.optimal_loss(Cs, law), law) == pytest.approx(Cs, rel=1e-9)
    D2 = sc.tokens_to_reach(np.array([2.1, 1.0]), 1e9, law)
    assert math.isfinite(D2[0]) and D2[1] == math.inf
    assert sc.lifetime_flops(1e9, 1e12, np.array([0.0, 1e12])) == pytest.approx([6e21, 8e21])


# --- over-training ------------------------------------------------------------------------------


def test_tinyllama_against_chinchilla():
    """TinyLlama (1.1B on 3T tokens) under Hoffmann's published constants: the numbers the chapter states."""
    o = sc.overtraining(sc.TINYLLAMA_PARAMS, sc.TINYLLAMA_TOKENS, sc.CHINCHILLA)
    assert o.flops == pytest.approx(1.98e22)
    assert 6.5e9 < o.opt_N < 7.5e9 and 4.4e11 < o.opt_D < 5e11  # same FLOPs: ~7B on ~470B tokens
    assert 0.06 < o.loss_gap < 0.08  # ~0.07 nats worse
    assert 2.7 < o.compute_overhead < 3.0  # ~2.9x the compute of the compute-optimal model of equal loss ...
    assert 3.8 < o.inference_saving < 4.2  # ... which is ~4x larger, so each served token costs ~4x more
    assert 1.8e12 < o.break_even_tokens < 2.1e12  # repaid after ~2T served tokens
    # at break-even the two models' lifetime FLOPs are equal
    T = o.break_even_tokens
    assert rel(sc.lifetime_flops(o.N, o.D, T), sc.lifetime_flops(o.same_loss_N, o.same_loss_D, T)) < 1e-9


@given(law=laws, C=budgets, f=st.floats(-3.0, 3.0))
def test_overtraining_invariants(law, C, f):
    n_opt, _ = sc.compute_optimal(C, law)
    N = n_opt * 10**f
    o = sc.overtraining(N, C / (6 * N), law)
    assert rel(o.flops, C) < 1e-12
    cond = o.loss / (o.loss - law.E) / law.gamma  # rounding in the loss, amplified by inverting L_opt(C)
    assert o.loss_gap >= -1e-12 and o.compute_overhead >= 1 - 1e-9 - 1e-13 * cond
    assert rel(o.opt_N, n_opt) < 1e-9
    assert abs(law.loss(o.same_loss_N, o.same_loss_D) - o.loss) < 1e-9 * o.loss
    if f < -0.01:  # smaller than optimal: cheaper to serve, repaid after a finite number of tokens
        assert o.inference_saving > 1 and 0 < o.break_even_tokens < math.inf
    if f > 0.01:  # larger than optimal: never repaid
        assert o.inference_saving < 1 and o.break_even_tokens == math.inf


def test_compute_optimal_run_has_nothing_to_repay():
    N, D = sc.compute_optimal(1e22, sc.CHINCHILLA)
    o = sc.overtraining(N, D, sc.CHINCHILLA)
    assert o.loss_gap == pytest.approx(0, abs=1e-12) and o.compute_overhead == pytest.approx(1, rel=1e-9)
    assert o.break_even_tokens == 0.0


@pytest.mark.parametrize("law", [sc.CHINCHILLA, sc.BESIROGLU])
def test_inference_optimal(law):
    loss = 2.2
    n0, d0 = sc.inference_optimal(loss, 0.0, law)
    nc, dc = sc.compute_optimal(sc.compute_to_reach(loss, law), law)
    assert rel(n0, nc) < 1e-5 and rel(d0, dc) < 1e-5  # no inference: the compute-optimal model
    sizes = [sc.inference_optimal(loss, T, law)[0] for T in (1e10, 1e12, 1e13, 1e14)]
    assert all(b < a for a, b in zip([n0] + sizes, sizes))  # more inference -> smaller model, more tokens
    for T in (1e12, 1e14):
        N, D = sc.inference_optimal(loss, T, law)
        assert law.loss(N, D) == pytest.approx(loss, rel=1e-9)
        here = sc.lifetime_flops(N, D, T)
        for g in (0.98, 1.02):  # a local minimum of the lifetime FLOPs along the iso-loss curve
            assert sc.lifetime_flops(N * g, sc.tokens_to_reach(loss, N * g, law), T) > here


# --- the fit ------------------------------------------------------------------------------------


def test_huber():
    r = np.array([-0.1, -1e-3, 0.0, 5e-4, 1e-3, 0.2])
    expected = np.where(np.abs(r) <= 1e-3, r**2 / 2, 1e-3 * (np.abs(r) - 5e-4))
    assert np.allclose(sc.huber(r), expected, rtol=0, atol=1e-18)
    t = sc.huber(torch.tensor(r), 1e-3)
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.tensor(expected), atol=1e-18)
    eps = 1e-12  # continuous at |r| = delta
    assert sc.huber(1e-3 + eps) == pytest.approx(sc.huber(1e-3 - eps), abs=1e-14)


def test_log_prediction_is_the_log_of_the_law():
    law = sc.ScalingLaw(E=1.3, A=200.0, B=900.0, alpha=0.4, beta=0.35)
    theta = np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])
    N, D = np.logspace(3, 11, 9), np.logspace(4, 13, 9)
    assert np.allclose(np.exp(sc.log_predicted(theta, np.log(N), np.log(D))), law.loss(N, D), rtol=1e-13)
    thetas = np.stack([theta, theta + 0.1])  # (2, 5): several starts at once
    assert sc.objective(thetas, np.log(N), np.log(D), np.log(law.loss(N, D))).shape == (2,)


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=20)
def test_analytic_gradient_matches_autograd(seed):
    """The hand-written gradient against torch autograd of the same objective written in torch (fp64)."""
    rng = np.random.default_rng(seed)
    logN, logD = rng.uniform(5, 25, 12), rng.uniform(8, 30, 12)
    logL = rng.uniform(0.1, 1.5, 12)
    theta = rng.uniform([0, 0, -1, 0, 0], [25, 25, 1, 2, 2])
    delta = float(rng.choice([1e-3, 1e-1, 10.0]))  # tiny, mixed, all-quadratic Huber regimes
    value, grad = sc._objective_and_grad(theta, logN, logD, logL, delta)
    th = torch.tensor(theta, requires_grad=True)
    a, b, e, al, be = th
    lN, lD, lL = (torch.tensor(x) for x in (logN, logD, logL))
    pred = torch.logsumexp(torch.stack([a - al * lN, b - be * lD, e.expand(12)]), dim=0)
    ref = sc.huber(pred - lL, delta).sum()
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-12, abs=1e-300)
    np.testing.assert_allclose(grad, th.grad.numpy(), rtol=1e-9, atol=1e-14)


def _synthetic(law, rng, noise):
    Ns, Ds = np.logspace(6, 9, 6), np.logspace(8, 11, 6)
    N, D = np.repeat(Ns, 6), np.tile(Ds, 6)
    return N, D, law.loss(N, D) * np.exp(rng.normal(0.0, noise, N.size))


identifiable = st.builds(  # both power terms 0.5-3 nats at the smallest N and D of _synthetic's grid
    lambda E, u, v, alpha, beta: sc.ScalingLaw(E=E, A=u * 1e6**alpha, B=v * 1e8**beta, alpha=alpha, beta=beta),
    st.floats(0.5, 3.0), st.floats(0.5, 3.0), st.floats(0.5, 3.0), st.floats(0.2, 0.6), st.floats(0.2, 0.6))


@given(law=identifiable, seed=st.integers(0, 2**31 - 1))
@settings(max_examples=12)
def test_fit_recovers_known_constants_from_noisy_data(law, seed):
    """36 runs over three decades of N and D, 0.3% multiplicative noise on the loss."""
    N, D, L = _synthetic(law, np.random.default_rng(seed), 0.003)
    f = sc.fit(N, D, L, top_k=6)
    assert abs(f.law.alpha - law.alpha) < 0.05 and abs(f.law.beta - law.beta) < 0.05
    grid = [(n, d) for n in (3e6, 3e8, 3e9) for d in (3e8, 3e10, 3e11)]  # inside and 3x past the data
    assert max(rel(f.law.loss(n, d), law.loss(n, d)) for n, d in grid) < 0.015
    assert f.rms_log_residual < 0.006 and f.n_points == 36


def test_fit_is_exact_on_noise_free_data_and_reports_its_starts():
    N, D, L = _synthetic(sc.CHINCHILLA, np.random.default_rng(0), 0.0)
    f = sc.fit(N, D, L, top_k=4)
    for k in ("E", "A", "B", "alpha", "beta"):
        assert rel(getattr(f.law, k), getattr(sc.CHINCHILLA, k)) < 1e-3, k
    assert f.objective < 1e-10 and f.n_starts == 4 and 1 <= len(f.candidates) <= 4
    assert [v for v, _ in f.candidates] == sorted(v for v, _ in f.candidates)
    assert f.candidates[0][0] == f.objective


def test_fit_ignores_an_outlier_thanks_to_huber():
    N, D, L = _synthetic(sc.CHINCHILLA, np.random.default_rng(1), 0.0)
    L = L.copy()
    L[7] *= 1.5  # one diverged run
    f = sc.fit(N, D, L, top_k=4)
    assert abs(f.law.alpha - 0.34) < 0.01 and abs(f.law.beta - 0.28) < 0.01
    assert abs(f.residuals[7]) > 0.3 and np.median(np.abs(f.residuals)) < 1e-3


def test_fit_grid_option_and_single_start():
    N, D, L = _synthetic(sc.CHINCHILLA, np.random.default_rng(2), 0.0)
    grid = dict(alpha=(0.5,), beta=(0.5,), e=(0.5,), a=(5.0, 10.0), b=(5.0,))
    f = sc.fit(N, D, L, grid=grid, top_k=None)
    assert f.n_starts == 2 and f.law.alpha == pytest.approx(0.34, abs=0.01)


# --- measured runs ------------------------------------------------------------------------------

TINY = dict(n_layer=1, batch_size=4, block_size=8, lr=1e-2, warmup=2, head_dim=4, eval_batches=2, progress=False,
            device="cpu")


def test_train_family_runs_and_checkpoints_do_not_perturb_training():
    runs = sc.train_family([4, 8], [2, 4], **TINY)
    assert [r.width for r in runs] == [4, 8] and all(r.tokens == [2 * 32, 4 * 32] for r in runs)
    assert all(math.isfinite(v) and 0 < v < 6 for r in runs for v in r.val_loss)
    assert runs[0].params < runs[1].params < runs[1].total_params
    assert all(r.seconds > 0 and r.tokens_per_s > 0 for r in runs)
    again = sc.train_family([8], [4], **TINY)[0]  # no evaluation at step 2: same weights at step 4
    assert again.val_loss[0] == pytest.approx(runs[1].val_loss[1], rel=1e-6)
    N, D, L = sc.runs_to_points(runs)
    assert list(N) == [runs[0].params] * 2 + [runs[1].params] * 2 and list(D) == [64, 128] * 2
    assert len(sc.runs_to_points(runs, min_tokens=100)[0]) == 2


def test_save_and_load_round_trip(tmp_path):
    runs = [sc.ScalingRun(width=8, n_layer=2, params=100, total_params=200, tokens=[10, 20], val_loss=[3.0, 2.5],
                          seconds=1.5)]
    path = sc.save_runs(runs, tmp_path / "x" / "runs.json", {"note": "test"})
    back, meta = sc.load_runs(path)
    assert back == runs and meta == {"note": "test"}


def test_the_recorded_sweep():
    """data/scaling/ holds the chapter's CPU sweep: its settings, sane losses, and a fit with positive exponents."""
    from labkit import runtime

    path = runtime.data_dir() / sc.RECORDED_FILE
    runs, meta = sc.load_runs(path)
    s = sc.RECORDED_SETTINGS
    assert meta["settings"] == s and [r.width for r in runs] == s["widths"]
    per_step = s["batch_size"] * s["block_size"]
    assert all(r.tokens == [c * per_step for c in s["checkpoints"]] for r in runs)
    assert all(r.val_loss[-1] < r.val_loss[0] - 1.0 for r in runs)  # every run learned
    final = [r.val_loss[-1] for r in runs]
    assert final[-1] < final[0] - 0.3  # the widest model ends well below the narrowest
    f = sc.fit(*sc.runs_to_points(runs, min_tokens=64 * per_step), top_k=4)
    assert f.law.alpha > 0.1 and f.law.beta > 0.1 and f.rms_log_residual < 0.05


# --- argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda: sc.ScalingLaw(E=-1, A=1, B=1, alpha=0.3, beta=0.3), ValueError, r"ScalingLaw: E must be in \[0"),
    (lambda: sc.ScalingLaw(E=1, A=0, B=1, alpha=0.3, beta=0.3), ValueError, r"ScalingLaw: A must be in \(0"),
    (lambda: sc.ScalingLaw(E=1, A=1, B=-2, alpha=0.3, beta=0.3), ValueError, "ScalingLaw: B must be"),
    (lambda: sc.ScalingLaw(E=1, A=1, B=1, alpha=0, beta=0.3), ValueError, "ScalingLaw: alpha must be"),
    (lambda: sc.ScalingLaw(E=1, A=1, B=1, alpha=0.3, beta=math.inf), ValueError, "ScalingLaw: beta must be"),
    (lambda: sc.ScalingLaw(E="1", A=1, B=1, alpha=0.3, beta=0.3), TypeError, "ScalingLaw: E must be a real number"),
    (lambda: sc.ScalingLaw(E=1, A=1, B=1, alpha=0.3, beta=0.3, name=3), TypeError, "name must be a str"),
    (lambda: sc.CHINCHILLA.loss(0, 1e9), ValueError, r"ScalingLaw.loss: N must be in \(0"),
    (lambda: sc.CHINCHILLA.loss(1e9, [1e9, -1]), ValueError, r"ScalingLaw.loss: D must be > 0.*at index 1"),
    (lambda: sc.CHINCHILLA.loss(1e9, ["a"]), TypeError, "ScalingLaw.loss: D must be a positive number"),
    (lambda: sc.training_flops(-1, 1), ValueError, "training_flops: N must be"),
    (lambda: sc.training_flops(1, math.nan), ValueError, "training_flops: D must be"),
    (lambda: sc.tokens_per_param(1, 0), ValueError, "tokens_per_param: D must be"),
    (lambda: sc.compute_optimal(0, sc.CHINCHILLA), ValueError, "compute_optimal: flops must be"),
    (lambda: sc.compute_optimal(1e20, {"E": 1}), TypeError, "compute_optimal: law must be a ScalingLaw"),
    (lambda: sc.iso_flop(1e20, [], sc.CHINCHILLA), ValueError, "iso_flop: N must not be empty"),
    (lambda: sc.compute_to_reach(1.5, sc.CHINCHILLA), ValueError, "compute_to_reach: loss must be > E = 1.69"),
    (lambda: sc.tokens_to_reach(2.0, -5, sc.CHINCHILLA), ValueError, "tokens_to_reach: N must be"),
    (lambda: sc.lifetime_flops(1e9, 1e12, -1), ValueError, r"lifetime_flops: inference_tokens must be in \[0"),
    (lambda: sc.overtraining([1e9, 2e9], 1e12, sc.CHINCHILLA), ValueError, "overtraining: N and D must be single"),
    (lambda: sc.inference_optimal(1.6, 1e12, sc.CHINCHILLA), ValueError, "inference_optimal: loss must be > E"),
    (lambda: sc.inference_optimal(2.0, -1.0, sc.CHINCHILLA), ValueError, "inference_optimal: inference_tokens"),
    (lambda: sc.inference_optimal(2.0, 0.0, sc.CHINCHILLA, grid=2), ValueError, "inference_optimal: grid must be"),
    (lambda: sc.huber(0.1, delta=0), ValueError, r"huber: delta must be in \(0"),
    (lambda: sc.fit([1e6] * 6, [1e8] * 6, [2.0] * 5), ValueError, "fit: N, D and L must be 1-D and of the same"),
    (lambda: sc.fit([1e6] * 4, [1e8] * 4, [2.0] * 4), ValueError, "fit: need at least 5 points"),
    (lambda: sc.fit([1e6] * 6, [1e8] * 6, [2.0] * 5 + [0.0]), ValueError, r"fit: L must be > 0.*at index 5"),
    (lambda: sc.fit([1e6] * 6, [1e8] * 6, [2.0] * 6, top_k=0), ValueError, "fit: top_k must be an int >= 1"),
    (lambda: sc.fit([1e6] * 6, [1e8] * 6, [2.0] * 6, delta=-1.0), ValueError, "fit: delta must be"),
    (lambda: sc.fit([1e6] * 6, [1e8] * 6, [2.0] * 6, grid={"a": (1,)}), ValueError, "fit: grid must be a dict"),
    (lambda: sc.fit([1e6] * 6, [1e8] * 6, [2.0] * 6, max_iter=0), ValueError, "fit: max_iter must be"),
    (lambda: sc.train_family([], [1]), ValueError, "train_family: widths must be a non-empty list"),
    (lambda: sc.train_family([8], [4, 2]), ValueError, r"train_family: checkpoints must increase, got \[4, 2\]"),
    (lambda: sc.train_family([8], [2], lr=0), ValueError, r"train_family: lr must be in \(0"),
    (lambda: sc.train_family([8], [2], tokenizer="word"), ValueError, "train_family: tokenizer must be one of"),
    (lambda: sc.train_family([8.5], [2]), TypeError, r"train_family: widths\[i\] must be an int"),
    (lambda: sc.family_config(28, n_layer=1, block_size=8, vocab_size=10, head_dim=8), ValueError,
     "family_config: width must be divisible by its number of heads width // head_dim = 3"),
    (lambda: sc.runs_to_points([1, 2]), TypeError, "runs_to_points: runs must be a list of ScalingRun"),
    (lambda: sc.save_runs("runs", "/tmp/x.json"), TypeError, "save_runs: runs must be a list of ScalingRun"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_fit_raises_when_no_start_has_positive_exponents():
    N, D = np.repeat(np.logspace(6, 9, 3), 3), np.tile(np.logspace(8, 11, 3), 3)
    L = 1 + 0.1 * (N / 1e6) ** 0.3 + 0.1 * (D / 1e8) ** 0.3  # loss *rising* with N and D
    negative = dict(alpha=(-1.0,), beta=(-1.0,), e=(0.0,), a=(0.0,), b=(0.0,))  # starts that stay negative
    with pytest.raises(RuntimeError, match="no start converged to a law with positive exponents"):
        sc.fit(N, D, L, grid=negative, top_k=None, max_iter=1)


# --- exercises, figures, benchmarks -------------------------------------------------------------

EXERCISES = ["chinchilla_loss", "training_budget", "compute_optimal", "tokens_to_reach"]


def test_exercises_registered_and_references_pass():
    from labkit.exercises import exercises_for, lookup

    names = exercises_for("10-scaling-laws")
    assert names == sorted(f"scaling-laws.{n}" for n in EXERCISES)
    for name in names:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def _reach(loss, N, E, A, B, alpha, beta):
    room = loss - E - A / N**alpha
    return (B / room) ** (1 / beta) if room > 0 else math.inf


def _optimal(flops, A, B, alpha, beta):
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    N = G * (flops / 6) ** (beta / (alpha + beta))
    return N, flops / (6 * N)


@pytest.mark.parametrize("name,fn", [
    ("scaling-laws.chinchilla_loss", lambda N, D, E, A, B, alpha, beta: E + A / N**alpha + B / D**beta),
    ("scaling-laws.training_budget", lambda N, D: (6 * N * D, D / N)),
    ("scaling-laws.compute_optimal", _optimal),
    ("scaling-laws.tokens_to_reach", _reach),
])
def test_student_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn", [
    ("scaling-laws.chinchilla_loss", lambda N, D, E, A, B, alpha, beta: E + A / N**beta + B / D**alpha),
    ("scaling-laws.chinchilla_loss", lambda N, D, E, A, B, alpha, beta: A / N**alpha + B / D**beta),
    ("scaling-laws.training_budget", lambda N, D: (2 * N * D, D / N)),  # forward only
    ("scaling-laws.training_budget", lambda N, D: (6 * N * D, N / D)),
    ("scaling-laws.compute_optimal", lambda flops, A, B, alpha, beta: _optimal(6 * flops, A, B, alpha, beta)),
    ("scaling-laws.compute_optimal", lambda flops, A, B, alpha, beta: (  # exponents of C/6 swapped
        (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * (flops / 6) ** (alpha / (alpha + beta)),
        (flops / 6) / ((alpha * A / (beta * B)) ** (1 / (alpha + beta)) * (flops / 6) ** (alpha / (alpha + beta))))),
    ("scaling-laws.tokens_to_reach", lambda loss, N, E, A, B, alpha, beta: _reach(loss + E, N, E, A, B, alpha, beta)),
    ("scaling-laws.tokens_to_reach",  # forgets that a small model may never get there
     lambda loss, N, E, A, B, alpha, beta: (B / abs(loss - E - A / N**alpha)) ** (1 / beta)),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_figures_build_and_the_panel_handles_its_whole_range():
    from labkit.viz import scaling as vs

    title = vs.overtraining_figure(22.3, 9.04, "chinchilla").layout.title.text
    assert "optimum N = 7.05B" in title and "+0.071" in title and "35% of the compute" in title
    for log10_flops in (18.0, 26.0):
        for log10_params in (6.0, 13.0):
            for law in ("chinchilla", "besiroglu"):
                fig = vs.overtraining_figure(log10_flops, log10_params, law)
                assert len(fig.data) == 8
    assert "bigger than optimal" in vs.overtraining_figure(20.0, 12.0).layout.title.text
    with pytest.raises(ValueError, match="law must be a ScalingLaw or one of"):
        vs.overtraining_figure(law="kaplan")
    runs = [sc.ScalingRun(width=w, n_layer=2, params=100 * w, total_params=200 * w, tokens=[1000, 2000, 4000],
                          val_loss=[3.0 - w / 100, 2.6 - w / 100, 2.4 - w / 100]) for w in (8, 16)]
    law = sc.ScalingLaw(E=1.5, A=30.0, B=60.0, alpha=0.5, beta=0.4)
    assert len(vs.fit_figure(runs, law, min_tokens=1500).data) == 6  # used, excluded, fitted curve per run
    assert len(vs.iso_loss_figure(law, runs=runs).data) >= 3
    with pytest.raises(ValueError, match="give runs or both"):
        vs.iso_loss_figure(law)
    assert len(vs.frontier_figure().data) == 3 + len(vs.REFERENCE_MODELS)
    assert len(vs.inference_optimal_figure(2.2, "besiroglu", tokens_range=(1e10, 1e13)).data) == 2


def _law_runs(law, widths=(4, 8, 16), steps=(1, 2, 4, 8, 16)):
    """ScalingRuns whose losses follow `law` exactly (N = 100 * width**2, 32 tokens per step)."""
    return [sc.ScalingRun(width=w, n_layer=1, params=100 * w * w, total_params=150 * w * w,
                          tokens=[32 * s for s in steps], val_loss=[law.loss(100 * w * w, 32 * s) for s in steps])
            for w in widths]


def test_benchmark_rows(monkeypatch):
    from labkit.benchmarks import scaling_laws as bm

    tiny = dict(widths=[4, 8, 16], n_layer=1, block_size=8, batch_size=4, lr=1e-2, warmup=2, head_dim=4,
                checkpoints=[1, 2, 3, 4], min_tokens=64, repeats=2)
    law = sc.ScalingLaw(E=1.5, A=40.0, B=30.0, alpha=0.5, beta=0.4)
    monkeypatch.setattr(bm, "settings", lambda quick=False: dict(tiny))
    trained = []
    monkeypatch.setattr(sc, "train_family", lambda widths, checkpoints, **kw: trained.append(widths) or
                        _law_runs(law, widths, checkpoints))
    rows = bm.run(quick=True)
    assert trained == [[4, 8, 16]]
    thr = [r for r in rows if r["kind"] == "throughput"]
    assert [r["width"] for r in thr] == [4, 8, 16] and thr[0]["ratio"] == 1.0
    assert all(0 < r["min_ms"] <= r["median_ms"] and r["step_ms"] == r["min_ms"] for r in thr)  # CPU: the fastest
    assert all(r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_ms"] * 1e3) for r in thr)
    assert all(r["baseline_ms"] == thr[0]["step_ms"] for r in thr)
    assert thr[1]["params_ratio"] == thr[1]["params"] / thr[0]["params"] > 1
    (fitrow,) = [r for r in rows if r["kind"] == "fit"]
    assert fitrow["n_runs"] == 3 and fitrow["n_points"] == 9 and fitrow["min_tokens"] == 64  # the first ones dropped
    assert fitrow["alpha"] == pytest.approx(0.5, abs=0.02) and fitrow["beta"] == pytest.approx(0.4, abs=0.02)
    assert fitrow["opt_tokens"] * fitrow["opt_params"] * 6 == pytest.approx(fitrow["max_flops"])
    rows = bm.run(quick=True, runs=_law_runs(law, (4, 16, 8), (1, 2)))  # the notebook's runs: no training
    assert trained == [[4, 8, 16]] and [r["width"] for r in rows if r["kind"] == "throughput"] == [4, 16, 8]
    (fitrow,) = [r for r in rows if r["kind"] == "fit"]
    assert fitrow["n_points"] == 6 and fitrow["min_tokens"] == 0  # too few late checkpoints: every point used
