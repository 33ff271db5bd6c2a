"""Scaling laws: fit L(N, D) = E + A/N^α + B/D^β to measured runs, spend a FLOP budget
compute-optimally, and price over-training a small model (TinyLlama's 1.1B on 3T tokens).

Sources. J. Kaplan et al., "Scaling Laws for Neural Language Models", arXiv:2001.08361 (2020):
loss falls as a power law in parameters N, tokens D and compute C ≈ 6ND. J. Hoffmann et al.,
"Training Compute-Optimal Large Language Models" (Chinchilla), arXiv:2203.15556 (2022), Approach 3:
the parametric law below, fitted with a Huber loss on log-loss by L-BFGS from a grid of starts;
published E=1.69, A=406.4, B=410.7, α=0.34, β=0.28. T. Besiroglu, E. Erdil, M. Barnett, J. You,
"Chinchilla Scaling: A replication attempt", arXiv:2404.10102 (2024): the same fit redone on data
read off the paper's figure gives E=1.8172, A=482.01, B=2085.43, α=0.3478, β=0.3658 (the original
optimizer stopped early). P. Zhang, G. Zeng, T. Wang, W. Lu, "TinyLlama: An Open-Source Small Language
Model", arXiv:2401.02385 (2024): a 1.1B model trained on 3T tokens. N. Sardana, J. Frankle,
"Beyond Chinchilla-Optimal: Accounting for Inference in Language Model Scaling Laws",
arXiv:2401.00448 (2023): add the inference FLOPs 2N per served token to the bill.

The law. With N parameters trained on D tokens,

    L(N, D) = E + A / N^α + B / D^β

E is the entropy of the text (no model beats it), A/N^α what a finite model cannot represent,
B/D^β what finite data and optimization leave on the table.

The fit (Chinchilla Approach 3). Write A = e^a, B = e^b, E = e^e so that

    log L̂_i = LSE(a − α log N_i, b − β log D_i, e)          (log-sum-exp of three terms)

and minimize Σ_i Huber_δ(log L̂_i − log L_i), δ = 1e-3, with L-BFGS from a grid of starts
(α, β ∈ {0, .5, 1, 1.5, 2}, e ∈ {−1, −.5, 0, .5, 1}, a, b ∈ {0, 5, .., 25}). Huber is quadratic
within δ and linear beyond, so a few bad runs cannot drag the fit. Besiroglu et al. traced the
original's odd constants to an optimizer stopped before convergence; we optimize the *sum* (not
the mean), scaled by 1/δ so the tolerances mean something, and keep the best end point. The
objective has local minima and flat regions, so the starts matter: evaluating it on all 4,500 grid
points is cheap, and L-BFGS runs from the best grid point of each of the `top_k` most promising
(α, β) pairs (or from every grid point, top_k=None: ~0.1 s each on a CPU).

Compute-optimal allocation. Minimize L subject to C = 6ND (Kaplan's 2ND forward + 4ND
backward). Setting dL/dN = 0 along D = C/(6N):

    G = (αA / (βB))^(1/(α+β)),   N_opt = G (C/6)^(β/(α+β)),   D_opt = G^(−1) (C/6)^(α/(α+β))

E does not move the optimum. At the optimum both power terms fall like (C/6)^(−γ) with
γ = αβ/(α+β), so L_opt(C) = E + K (C/6)^(−γ), K = A G^(−α) + B G^β, and the least compute that
reaches a loss L is C(L) = 6 (K / (L − E))^(1/γ).

Over-training. A model of N < N_opt parameters trained on D = C/(6N) > D_opt tokens ends at a
higher loss than the compute-optimal model for the same FLOPs; equivalently, reaching a given loss
with a smaller model costs more training compute. In exchange, every token it serves costs 2N
FLOPs instead of 2N'. Lifetime FLOPs 6ND + 2N·T_inf break even with those of the compute-optimal
model of equal loss (N', D', C' = 6N'D') after T_inf = (C − C') / (2 (N' − N)) served tokens;
`inference_optimal` finds the N that minimizes the lifetime FLOPs outright.

Measured runs. `train_family` trains a family of TinyGPT widths (labkit.models) on the course's
Shakespeare corpus at a constant learning rate after a short warm-up and records the validation
loss at several token counts per run, so one run gives several (N, D) points. N is Kaplan's
non-embedding parameter count. A decayed learning rate would end each point lower; the law
fitted to these points describes constant-LR training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from labkit import _checks, datasets, runtime
from labkit.models import GPTConfig, TinyGPT

FLOPS_PER_PARAM_TOKEN = 6  # training: 2 forward + 4 backward (Kaplan et al. 2020)
INFERENCE_FLOPS_PER_PARAM_TOKEN = 2  # serving: forward only
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022
# Hoffmann et al.'s grid of initial values: 5 * 5 * 5 * 6 * 6 = 4,500 starts.
CHINCHILLA_GRID = dict(
    alpha=(0.0, 0.5, 1.0, 1.5, 2.0),
    beta=(0.0, 0.5, 1.0, 1.5, 2.0),
    e=(-1.0, -0.5, 0.0, 0.5, 1.0),
    a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
)
TINYLLAMA_PARAMS = 1.1e9  # Zhang et al. 2024: 1.1B parameters (22 layers, d=2048, GQA)
TINYLLAMA_TOKENS = 3e12  # ~950B tokens seen for about 3 epochs


# --------------------------------------------------------------------------- checks


def _positive(owner: str, name: str, value):
    """A positive finite number (float) or array of them (float64 ndarray)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{owner}: {name} must be a positive number or an array of them, got {value!r}") from None
        if arr.size == 0:
            raise ValueError(f"{owner}: {name} must not be empty, got {value!r}")
        ok = (arr > 0) & np.isfinite(arr)
        if not ok.all():
            i = int(np.flatnonzero(~ok.ravel())[0])
            raise ValueError(f"{owner}: {name} must be > 0 and finite, got {arr.ravel()[i]!r} at index {i}")
        return arr
    return _checks.number(owner, name, value, low=0.0, high=math.inf, low_open=True, high_open=True)


def _law(owner: str, law) -> "ScalingLaw":
    if not isinstance(law, ScalingLaw):
        raise TypeError(f"{owner}: law must be a ScalingLaw, got {type(law).__name__}")
    return law


def _out(x):
    """A 0-d array back to a Python float; arrays stay arrays."""
    return float(x) if np.ndim(x) == 0 else x


# --------------------------------------------------------------------------- the law


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (losses in nats per token)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = ""

    def __post_init__(self):
        for k in ("E", "A", "B", "alpha", "beta"):
            low_open = k != "E"  # E = 0 is allowed (no irreducible loss)
            object.__setattr__(self, k, _checks.number("ScalingLaw", k, getattr(self, k), low=0.0,
                                                       high=math.inf, low_open=low_open, high_open=True))
        if not isinstance(self.name, str):
            raise TypeError(f"ScalingLaw: name must be a str, got {type(self.name).__name__}")

    def loss(self, N, D):
        """Predicted loss of N parameters trained on D tokens (numbers or arrays, broadcast)."""
        N, D = _positive("ScalingLaw.loss", "N", N), _positive("ScalingLaw.loss", "D", D)
        return _out(self.E + self.A * np.power(N, -self.alpha) + self.B * np.power(D, -self.beta))

    @property
    def a(self) -> float:
        """β / (α + β): N_opt grows like C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """α / (α + β): D_opt grows like C^b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """(αA / (βB))^(1/(α+β)): N_opt = G (C/6)^a."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def gamma(self) -> float:
        """αβ / (α + β): L_opt(C) − E falls like (C/6)^(−gamma)."""
        return self.alpha * self.beta / (self.alpha + self.beta)

    def as_dict(self) -> dict:
        return asdict(self)


CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="Chinchilla (Hoffmann et al. 2022)")
BESIROGLU = ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                       name="Chinchilla replication (Besiroglu et al. 2024)")
PUBLISHED = {"chinchilla": CHINCHILLA, "besiroglu": BESIROGLU}


def training_flops(N, D):
    """C = 6 N D: training FLOPs of N parameters on D tokens."""
    N, D = _positive("training_flops", "N", N), _positive("training_flops", "D", D)
    return _out(FLOPS_PER_PARAM_TOKEN * N * D)


def tokens_per_param(N, D):
    """D / N (Chinchilla-optimal is ~20 with Besiroglu's constants; TinyLlama ~2,700)."""
    N, D = _positive("tokens_per_param", "N", N), _positive("tokens_per_param", "D", D)
    return _out(D / N)


def predict_loss(law: "ScalingLaw", N, D):
    """law.loss(N, D)."""
    return _law("predict_loss", law).loss(N, D)


# --------------------------------------------------------------------------- compute-optimal allocation


def compute_optimal(flops, law: ScalingLaw):
    """(N_opt, D_opt) minimizing L(N, D) subject to 6 N D = flops (closed form)."""
    law = _law("compute_optimal", law)
    c = _positive("compute_optimal", "flops", flops) / FLOPS_PER_PARAM_TOKEN  # C / 6
    N = law.G * np.power(c, law.a)
    D = np.power(c, law.b) / law.G
    return _out(N), _out(D)


def optimal_loss(flops, law: ScalingLaw):
    """L(N_opt, D_opt) for a FLOP budget: E + K (C/6)^(−gamma)."""
    N, D = compute_optimal(flops, law)
    return law.loss(N, D)


def iso_flop(flops, N, law: ScalingLaw):
    """Losses along the iso-FLOP curve: each N trained on D = flops / (6 N) tokens."""
    law = _law("iso_flop", law)
    flops = _positive("iso_flop", "flops", flops)
    N = _positive("iso_flop", "N", N)
    return law.loss(N, flops / (FLOPS_PER_PARAM_TOKEN * N))


def compute_to_reach(loss, law: ScalingLaw):
    """The least training FLOPs (a compute-optimal model) that reach `loss`: 6 (K / (L − E))^(1/gamma)."""
    law = _law("compute_to_reach", law)
    loss = _positive("compute_to_reach", "loss", loss)
    if np.any(np.asarray(loss) <= law.E):
        raise ValueError(f"compute_to_reach: loss must be > E = {law.E:g} (no amount of compute goes below E), "
                         f"got {loss!r}")
    K = law.A * law.G ** (-law.alpha) + law.B * law.G ** law.beta
    return _out(FLOPS_PER_PARAM_TOKEN * np.power(K / (np.asarray(loss) - law.E), 1.0 / law.gamma))


def tokens_to_reach(loss, N, law: ScalingLaw):
    """Tokens D with L(N, D) = loss: (B / (loss − E − A N^(−α)))^(1/β); inf where N is too small."""
    law = _law("tokens_to_reach", law)
    loss = _positive("tokens_to_reach", "loss", loss)
    N = _positive("tokens_to_reach", "N", N)
    room = np.asarray(loss - law.E - law.A * np.power(N, -law.alpha), dtype=np.float64)  # left for B / D^beta
    with np.errstate(divide="ignore", invalid="ignore"):
        D = np.where(room > 0, np.power(law.B / np.where(room > 0, room, 1.0), 1.0 / law.beta), np.inf)
    return _out(D)


# --------------------------------------------------------------------------- over-training


def lifetime_flops(N, D, inference_tokens):
    """Training plus serving: 6 N D + 2 N · inference_tokens (Sardana & Frankle 2023)."""
    N, D = _positive("lifetime_flops", "N", N), _positive("lifetime_flops", "D", D)
    if np.isscalar(inference_tokens):
        T = _checks.number("lifetime_flops", "inference_tokens", inference_tokens, low=0.0, high=math.inf,
                           high_open=True)
    else:
        T = np.asarray(inference_tokens, dtype=np.float64)
        if not np.all((T >= 0) & np.isfinite(T)):
            raise ValueError(f"lifetime_flops: inference_tokens must be >= 0 and finite, got {inference_tokens!r}")
    return _out(FLOPS_PER_PARAM_TOKEN * N * D + INFERENCE_FLOPS_PER_PARAM_TOKEN * N * T)


@dataclass(frozen=True)
class Overtraining:
    """A run (N, D) set against the compute-optimal models for its FLOPs and for its loss."""

    N: float
    D: float
    flops: float  # 6 N D
    tokens_per_param: float  # D / N
    loss: float  # L(N, D)
    opt_N: float  # compute-optimal model for the same FLOPs ...
    opt_D: float
    opt_loss: float  # ... and the loss it reaches
    loss_gap: float  # loss − opt_loss (>= 0): what the same compute could have bought
    same_loss_N: float  # the compute-optimal model that reaches `loss` ...
    same_loss_D: float
    same_loss_flops: float  # ... with this much compute
    compute_overhead: float  # flops / same_loss_flops (>= 1): extra training compute paid
    inference_saving: float  # same_loss_N / N: how much more each served token costs the other model
    break_even_tokens: float  # served tokens after which the run's lifetime FLOPs are the smaller (inf: never)


def overtraining(N, D, law: ScalingLaw) -> Overtraining:
    """How far (N, D) sits from compute-optimal, and what that costs and saves."""
    law = _law("overtraining", law)
    N, D = _positive("overtraining", "N", N), _positive("overtraining", "D", D)
    if np.ndim(N) or np.ndim(D):
        raise ValueError("overtraining: N and D must be single numbers, not arrays")
    flops = training_flops(N, D)
    loss = law.loss(N, D)
    opt_N, opt_D = compute_optimal(flops, law)
    opt_loss = law.loss(opt_N, opt_D)
    same_flops = compute_to_reach(loss, law)
    same_N, same_D = compute_optimal(same_flops, law)
    if abs(same_N - N) <= 1e-9 * same_N:
        break_even = 0.0  # compute-optimal already: nothing to repay
    elif same_N > N:  # smaller than compute-optimal: extra training, cheaper serving
        break_even = (flops - same_flops) / (INFERENCE_FLOPS_PER_PARAM_TOKEN * (same_N - N))
    else:  # larger than compute-optimal: costs more to train *and* to serve
        break_even = math.inf
    return Overtraining(N=N, D=D, flops=flops, tokens_per_param=D / N, loss=loss, opt_N=opt_N, opt_D=opt_D,
                        opt_loss=opt_loss, loss_gap=loss - opt_loss, same_loss_N=same_N, same_loss_D=same_D,
                        same_loss_flops=same_flops, compute_overhead=flops / same_flops,
                        inference_saving=same_N / N, break_even_tokens=max(break_even, 0.0))


def inference_optimal(loss, inference_tokens, law: ScalingLaw, *, grid: int = 400) -> tuple[float, float]:
    """(N, D) reaching `loss` with the fewest lifetime FLOPs 6ND + 2N·inference_tokens.

    One-dimensional search over log N (a grid, then golden-section refinement) between the
    smallest model that can reach the loss at all and just above the compute-optimal one.
    With inference_tokens = 0 this is the compute-optimal model for that loss.
    """
    law = _law("inference_optimal", law)
    loss = _checks.number("inference_optimal", "loss", loss, low=0.0, high=math.inf, low_open=True, high_open=True)
    T = _checks.number("inference_optimal", "inference_tokens", inference_tokens, low=0.0, high=math.inf,
                       high_open=True)
    grid = _checks.integer("inference_optimal", "grid", grid, low=8)
    if loss <= law.E:
        raise ValueError(f"inference_optimal: loss must be > E = {law.E:g}, got {loss!r}")
    n_min = (law.A / (loss - law.E)) ** (1.0 / law.alpha)  # below this, no amount of data reaches the loss
    n_cmp, _ = compute_optimal(compute_to_reach(loss, law), law)

    def cost(u):  # lifetime FLOPs at N = exp(u), in log space for conditioning
        N = np.exp(u)
        D = tokens_to_reach(loss, N, law)
        return np.log(FLOPS_PER_PARAM_TOKEN * N * D + INFERENCE_FLOPS_PER_PARAM_TOKEN * N * T)

    lo, hi = math.log(n_min) + 1e-9, math.log(n_cmp) + 1.0
    us = np.linspace(lo, hi, grid)
    k = int(np.argmin(cost(us)))
    lo, hi = us[max(k - 1, 0)], us[min(k + 1, grid - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(80):  # golden section on a unimodal bracket
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if cost(m1) < cost(m2):
            hi = m2
        else:
            lo = m1
    N = math.exp((lo + hi) / 2)
    return N, float(tokens_to_reach(loss, N, law))


# --------------------------------------------------------------------------- the fit


def huber(r, delta: float = HUBER_DELTA):
    """Huber loss: r²/2 where |r| <= delta, delta (|r| − delta/2) beyond (tensor or array in, same out)."""
    delta = _checks.number("huber", "delta", delta, low=0.0, high=math.inf, low_open=True, high_open=True)
    if isinstance(r, torch.Tensor):
        a = r.abs()
        return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    r = np.asarray(r, dtype=np.float64)
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def log_predicted(theta, logN, logD) -> np.ndarray:
    """log L̂ = LSE(a − α log N, b − β log D, e) for theta (..., 5) = (a, b, e, alpha, beta) -> (..., n)."""
    theta = np.asarray(theta, dtype=np.float64)
    a, b, e, alpha, beta = (theta[..., k, None] for k in range(5))  # (..., 1) each
    t1, t2 = a - alpha * logN, b - beta * logD  # (..., n) each
    t3 = np.broadcast_to(e, t1.shape)  # (..., n)
    m = np.maximum(np.maximum(t1, t2), t3)  # (..., n): subtract the max for a stable LSE
    return m + np.log(np.exp(t1 - m) + np.exp(t2 - m) + np.exp(t3 - m))


def objective(theta, logN, logD, logL, delta: float = HUBER_DELTA) -> np.ndarray:
    """Σ_i Huber_δ(log L̂_i − log L_i) for theta (..., 5) -> (...,): every grid start at once."""
    return huber(log_predicted(theta, logN, logD) - logL, delta).sum(-1)


def _objective_and_grad(theta: np.ndarray, logN, logD, logL, delta: float) -> tuple[float, np.ndarray]:
    """The objective at one theta (5,) and its gradient.

    With p_k the softmax weights of the three LSE terms and h_i = clip(r_i, −δ, δ) (Huber's
    derivative at the residual r_i): ∂/∂a = Σ h p_1, ∂/∂b = Σ h p_2, ∂/∂e = Σ h p_3,
    ∂/∂α = −Σ h p_1 log N, ∂/∂β = −Σ h p_2 log D.
    """
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)], axis=-1)  # (n, 3)
    m = t.max(axis=-1, keepdims=True)  # (n, 1)
    w = np.exp(t - m)  # (n, 3)
    total = w.sum(axis=-1, keepdims=True)  # (n, 1)
    r = (m + np.log(total))[:, 0] - logL  # (n,) residuals in log-loss
    p = w / total  # (n, 3) softmax weights
    h = np.clip(r, -delta, delta)[:, None] * p  # (n, 3)
    grad = np.array([h[:, 0].sum(), h[:, 1].sum(), h[:, 2].sum(), -(h[:, 0] * logN).sum(), -(h[:, 1] * logD).sum()])
    return float(huber(r, delta).sum()), grad


def _grid_starts(grid: dict) -> np.ndarray:
    """All combinations of the grid as (S, 5) rows (a, b, e, alpha, beta)."""
    keys = ("a", "b", "e", "alpha", "beta")
    if not isinstance(grid, dict) or any(k not in grid for k in keys):
        raise ValueError(f"fit: grid must be a dict giving values for {keys}, got {grid!r}")
    return np.array(list(itertools.product(*(tuple(float(v) for v in grid[k]) for k in keys))), dtype=np.float64)


def _theta_to_law(theta, name: str) -> ScalingLaw | None:
    a, b, e, alpha, beta = (float(v) for v in theta)
    try:
        return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, name=name)
    except (ValueError, OverflowError):  # a start that ran off to a non-positive exponent or infinity
        return None


@dataclass(frozen=True)
class ScalingFit:
    """The best fit: its law, its objective (Σ Huber on log-loss), and what the other starts found."""

    law: ScalingLaw
    objective: float
    n_points: int
    n_starts: int  # L-BFGS runs
    residuals: np.ndarray = field(repr=False, compare=False)  # log L̂_i − log L_i at the best fit
    candidates: tuple = field(repr=False, compare=False, default=())  # (objective, ScalingLaw), best first

    @property
    def rms_log_residual(self) -> float:
        """Root-mean-square of log L̂ − log L (≈ relative error of the predicted loss)."""
        return float(np.sqrt(np.mean(self.residuals ** 2)))


def fit(N, D, L, *, delta: float = HUBER_DELTA, grid: dict | None = None, top_k: int | None = 8, max_iter: int = 200,
        name: str = "fit") -> ScalingFit:
    """Fit L(N, D) = E + A/N^α + B/D^β to measured (N_i, D_i, L_i) (Chinchilla Approach 3).

    Minimizes Σ Huber_delta(LSE(a − α log N, b − β log D, e) − log L) with torch.optim.LBFGS (strong
    Wolfe line search, float64, the analytic gradient) from several points of `grid` (default:
    Hoffmann et al.'s 4,500-point grid): for each pair of starting exponents (α, β) its best
    (a, b, e), and of those the `top_k` best (top_k=None: every grid point, ~0.1 s each on a CPU).
    Returns the best end point whose exponents came out positive.
    """
    N = _positive("fit", "N", N if not np.isscalar(N) else [N])
    D = _positive("fit", "D", D if not np.isscalar(D) else [D])
    L = _positive("fit", "L", L if not np.isscalar(L) else [L])
    if not (N.shape == D.shape == L.shape and N.ndim == 1):
        raise ValueError(f"fit: N, D and L must be 1-D and of the same length, got shapes "
                         f"{N.shape}, {D.shape}, {L.shape}")
    if N.size < 5:
        raise ValueError(f"fit: need at least 5 points for 5 parameters, got {N.size}")
    delta = _checks.number("fit", "delta", delta, low=0.0, high=math.inf, low_open=True, high_open=True)
    if top_k is not None:
        top_k = _checks.integer("fit", "top_k", top_k, low=1)
    max_iter = _checks.integer("fit", "max_iter", max_iter, low=1)
    starts = _grid_starts(CHINCHILLA_GRID if grid is None else grid)  # (S, 5)

    logN, logD, logL = np.log(N), np.log(D), np.log(L)  # (n,) each
    first = objective(starts, logN, logD, logL, delta)  # (S,): every grid point at once
    order = np.argsort(first, kind="stable")
    if top_k is None:
        chosen = starts[order]  # (S, 5): every grid point
    else:  # the best (a, b, e) for each pair of exponents, then the top_k best pairs: diverse starts
        seen, keep = set(), []
        for i in order:
            pair = (starts[i, 3], starts[i, 4])
            if pair not in seen:
                seen.add(pair)
                keep.append(i)
        chosen = starts[keep[:top_k]]  # (k, 5)

    candidates = []
    for theta0 in chosen:
        theta = torch.tensor(theta0, dtype=torch.float64)  # (5,) optimized in place by L-BFGS
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=10,
                                tolerance_grad=1e-9, tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure():
            value, grad = _objective_and_grad(theta.numpy(), logN, logD, logL, delta)
            theta.grad = torch.from_numpy(grad / delta)  # scaled by 1/δ: O(1), so the tolerances mean something
            return torch.tensor(value / delta, dtype=torch.float64)

        opt.step(closure)
        value = float(objective(theta.numpy(), logN, logD, logL, delta))
        law = _theta_to_law(theta.numpy(), name)
        if law is not None and math.isfinite(value):
            candidates.append((value, law, theta.numpy().copy()))
    if not candidates:
        raise RuntimeError("fit: no start converged to a law with positive exponents; "
                           "check the data (losses should fall with N and with D)")
    candidates.sort(key=lambda c: c[0])
    best_value, best_law, best_theta = candidates[0]
    residuals = log_predicted(best_theta, logN, logD) - logL  # (n,)
    return ScalingFit(law=best_law, objective=best_value, n_points=int(N.size), n_starts=len(chosen),
                      residuals=residuals, candidates=tuple((v, law) for v, law, _ in candidates))


# --------------------------------------------------------------------------- measured runs


@dataclass
class ScalingRun:
    """One TinyGPT width trained once; the validation loss read at several token counts."""

    width: int  # n_embd
    n_layer: int
    params: int  # non-embedding parameters (Kaplan's N)
    total_params: int
    tokens: list[int]  # tokens seen at each checkpoint
    val_loss: list[float]  # validation loss there (nats per token)
    seconds: float = 0.0  # training wall time (evaluations excluded)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens[-1] / self.seconds if self.seconds > 0 else float("nan")


def family_config(width: int, *, n_layer: int, block_size: int, vocab_size: int, head_dim: int = 8):
    """A TinyGPT config of the family: width n_embd, heads of head_dim channels (at least one)."""
    width = _checks.integer("family_config", "width", width, low=1)
    head_dim = _checks.integer("family_config", "head_dim", head_dim, low=1)
    n_head = max(1, width // head_dim)  # heads of head_dim channels, or one head if the model is narrower
    if width % n_head:
        raise ValueError(f"family_config: width must be divisible by its number of heads width // head_dim = "
                         f"{n_head} (head_dim={head_dim}), got {width}")
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_embd=width, n_head=n_head)


def train_family(widths, checkpoints, *, n_layer: int = 2, batch_size: int = 64, block_size: int = 32,
                 lr: float = 1e-2, warmup: int = 16, tokenizer: str = "char", head_dim: int = 8, seed: int = 0,
                 eval_batches: int = 8, device=None, progress: bool = True) -> list[ScalingRun]:
    """Train one TinyGPT per width with AdamW at a constant lr after a linear warm-up; at every step
    count in `checkpoints` read the mean validation loss over a fixed set of `eval_batches` batches.

    All runs see the same training batches in the same order (seeded) and are scored on the same
    validation windows, so they differ only in width. Returns one ScalingRun per width.
    """
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ValueError(f"train_family: widths must be a non-empty list of ints, got {widths!r}")
    widths = [_checks.integer("train_family", "widths[i]", w, low=1) for w in widths]
    if not isinstance(checkpoints, (list, tuple)) or not checkpoints:
        raise ValueError(f"train_family: checkpoints must be a non-empty list of step counts, got {checkpoints!r}")
    checkpoints = [_checks.integer("train_family", "checkpoints[i]", c, low=1) for c in checkpoints]
    if any(b <= a for a, b in zip(checkpoints, checkpoints[1:])):
        raise ValueError(f"train_family: checkpoints must increase, got {checkpoints}")
    n_layer = _checks.integer("train_family", "n_layer", n_layer, low=1)
    batch_size = _checks.integer("train_family", "batch_size", batch_size, low=1)
    block_size = _checks.integer("train_family", "block_size", block_size, low=1)
    warmup = _checks.integer("train_family", "warmup", warmup, low=0)
    eval_batches = _checks.integer("train_family", "eval_batches", eval_batches, low=1)
    lr = _checks.number("train_family", "lr", lr, low=0.0, high=math.inf, low_open=True, high_open=True)
    _checks.choice("train_family", "tokenizer", tokenizer, ("char", "bpe"))
    dev = torch.device(device) if device is not None else runtime.device()

    data = datasets.token_dataset(tokenizer, "train")  # (n_train,)
    val = datasets.token_dataset(tokenizer, "val")  # (n_val,)
    vocab = datasets.get_tokenizer(tokenizer).vocab_size
    val_windows = list(itertools.islice(datasets.batches(val, batch_size, block_size, seed=seed + 1234, device=dev),
                                        eval_batches))  # [(x, y) (B, T)] fixed for every run and checkpoint
    tokens_per_step = batch_size * block_size
    runs = []
    bar = tqdm(total=len(widths) * checkpoints[-1], desc="training the family", disable=not progress)
    for width in widths:
        runtime.seed_everything(seed)
        model = TinyGPT(family_config(width, n_layer=n_layer, block_size=block_size, vocab_size=vocab,
                                      head_dim=head_dim)).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        stream = datasets.batches(data, batch_size, block_size, seed=seed, device=dev)
        run = ScalingRun(width=width, n_layer=n_layer, params=model.num_params(non_embedding=True),
                         total_params=model.num_params(), tokens=[], val_loss=[])
        step, seconds = 0, 0.0
        for ck in checkpoints:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model.train()
            for _ in range(ck - step):
                x, y = next(stream)  # (B, T) each
                _, loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds += time.perf_counter() - t0
            bar.update(ck - step)
            step = ck
            model.eval()
            with torch.no_grad():
                v = torch.stack([model(x, y)[1] for x, y in val_windows]).mean().item()
            run.tokens.append(ck * tokens_per_step)
            run.val_loss.append(v)
        run.seconds = seconds
        runs.append(run)
    bar.close()
    return runs


def runs_to_points(runs, *, min_tokens: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten runs into arrays (N, D, L) of every checkpoint with at least min_tokens tokens."""
    if not isinstance(runs, (list, tuple)) or not all(isinstance(r, ScalingRun) for r in runs):
        raise TypeError("runs_to_points: runs must be a list of ScalingRun")
    min_tokens = _checks.integer("runs_to_points", "min_tokens", min_tokens, low=0)
    pts = [(r.params, t, v) for r in runs for t, v in zip(r.tokens, r.val_loss) if t >= min_tokens]
    if not pts:
        raise ValueError(f"runs_to_points: no checkpoint has >= {min_tokens} tokens")
    N, D, L = (np.array(col, dtype=np.float64) for col in zip(*pts))
    return N, D, L


def save_runs(runs, path, meta: dict | None = None) -> Path:
    """Write runs (and a meta dict: settings, device, versions) as JSON."""
    if not isinstance(runs, (list, tuple)) or not all(isinstance(r, ScalingRun) for r in runs):
        raise TypeError("save_runs: runs must be a list of ScalingRun")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta or {}, "runs": [asdict(r) for r in runs]}
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def load_runs(path) -> tuple[list[ScalingRun], dict]:
    """(runs, meta) from a file written by save_runs."""
    body = json.loads(Path(path).read_text())
    return [ScalingRun(**r) for r in body["runs"]], body.get("meta", {})


# --------------------------------------------------------------------------- recording a sweep

# The recorded sweep the chapter reads (data/scaling/): the same family and settings as the
# notebook's live CPU runs, trained 8x longer. Regenerate with `python -m labkit.train.scaling`.
RECORDED_FILE = "scaling/shakespeare-char-cpu.json"
RECORDED_SETTINGS = dict(widths=[8, 12, 16, 24, 32, 48], checkpoints=[2**k for k in range(4, 13)], n_layer=2,
                         batch_size=64, block_size=32, lr=1e-2, warmup=16, tokenizer="char", head_dim=8, seed=0,
                         eval_batches=8)


def main(argv=None) -> None:
    """Train the recorded sweep on the CPU and write it to data/scaling/ (~15 minutes on one core)."""
    from labkit import bench  # bench imports labkit.book; only the command line needs it

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", default=str(runtime.data_dir() / RECORDED_FILE))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = train_family(device="cpu", **RECORDED_SETTINGS)
    meta = dict(settings=RECORDED_SETTINGS, device=bench.device_name("cpu"), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), command="python -m labkit.train.scaling")
    print("wrote", save_runs(runs, args.out, meta))


if __name__ == "__main__":
    main()
