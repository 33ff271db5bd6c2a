"""Learning-rate schedules, and the Amos-style rules for learning rate and weight decay.

Schedules. Each is a frozen dataclass with `lr_at(step)` (the learning rate at a step; any
real step >= 0, so continuity can be checked) and `factor(step)` = lr_at(step) / max_lr, the
multiplier torch.optim.lr_scheduler.LambdaLR expects: `LambdaLR(opt, sched.factor)` with the
optimizer's lr set to max_lr makes the optimizer's lr equal sched.lr_at(k) during step k.
Warm-up is linear from 0 (lr_at(0) = 0, the Hugging Face convention), reaching max_lr at
step warmup_steps.

    ConstantWithWarmup   η(t) = η_max · min(1, t / W)
    WarmupCosine         η(t) = η_min + (η_max − η_min) · ½(1 + cos(π·p)),  p = (t − W) / (T − W)
    WarmupStableDecay    η_max until the last D = decay_fraction·T steps, then down to η_min
                         (linear, cosine, or 1 − √ shape; Hägele et al. 2024, MiniCPM 2024)
    InverseTime          η(t) = η_max / (1 + c·(t − W)) after warm-up

Amos-style tuning. J. Su, "基于Amos优化器思想推导出来的一些'炼丹策略'" (kexue.fm/archives/9344,
2022), reading R. Tian, A. P. Parikh, "Amos: An Adam-style Optimizer with Adaptive Weight Decay
towards Model-Oriented Scale", arXiv:2210.11693 (2022) and its reference implementation
(google-research/jestimator, amos.py). Write one step of a tensor with k entries as

    θ_{t+1} = θ_t − α_t·u_t − ρ_t·θ_t,    u_t Adam's normalised direction, RMS(u_t) ≈ 1,

with α_t the learning rate and ρ_t the per-step weight decay (torch's AdamW: ρ = lr·λ).

1. Learning rate from the parameter's scale. Adam moves every entry by about α per step, whatever
   the gradient's size, so what matters is α relative to η, the expected RMS of the trained
   entries (the "model-oriented scale": ~1/√fan_in for a matrix, 1 for a norm gain):

       α = ξ·η                                  ξ: one global, dimensionless learning rate

2. Weight decay from the same scale. Expand ‖θ_{t+1}‖² = (1 − ρ)²‖θ_t‖² − 2α(1 − ρ)·u_t·θ_t + α²‖u_t‖².
   In high dimension a noise-dominated u_t is nearly orthogonal to θ_t (u_t·θ_t ≈ 0) and
   ‖u_t‖² ≈ k, so ‖θ‖² settles where (2ρ − ρ²)·‖θ‖² = α²·k, i.e. RMS(θ) = α/√(2ρ − ρ²).
   Asking for RMS(θ) = η gives

       ρ = α² / (2η²) = ξ² / 2          (to first order),   λ_torch = ρ / α = α / (2η²)

   Amos makes it adaptive: ρ_t = ½·ξ²·mean(g²/v̂) uses the measured size of the normalised
   update in place of 1.

3. Decay. The same expansion around the optimum θ* has the term +α²‖u‖²: with a constant α the
   error cannot fall below a floor ∝ α, so α must shrink as training proceeds. Amos (reference
   implementation, taking mean(g²/v̂) = 1) runs a clock b_t:

       b_0 = 0,   γ_t = c_t·ξ²,   b_{t+1} = b_t + γ_t·(1 + b_t)
       c_t = (1 + ζ·√ξ·b_t)^(−1/2),   d_t = 1 / (1 + ζ·√(ξη)·b_t)
       α_t = d_t·ξ·η,   ρ_t = ½·d_t·γ_t                                 (ζ = 0.25)

   so ρ_0 = ξ²/2 = α_0²/(2η²) as in rule 2, and the learning rate is an inverse-time decay
   1/(1 + c·b) in the clock b, which advances with the accumulated weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from labkit import _checks

# --- schedules ----------------------------------------------------------------------------------


def _step(owner: str, step) -> float:
    return _checks.number(owner, "step", step, low=0.0)


def _warmup(t: float, warmup_steps: int) -> float:
    """Linear warm-up factor in [0, 1]: t / W, 1 when W = 0 or t >= W."""
    return 1.0 if warmup_steps == 0 or t >= warmup_steps else t / warmup_steps


class _Schedule:
    max_lr: float

    def lr_at(self, step: float) -> float:  # pragma: no cover - every schedule overrides it
        raise NotImplementedError

    def factor(self, step: float) -> float:
        """lr_at(step) / max_lr: the multiplier for torch.optim.lr_scheduler.LambdaLR."""
        return self.lr_at(step) / self.max_lr

    __call__ = factor

    def lrs(self, steps: int) -> list[float]:
        """[lr_at(0), ..., lr_at(steps - 1)]."""
        steps = _checks.integer(type(self).__name__, "steps", steps, low=0)
        return [self.lr_at(k) for k in range(steps)]


def _check_common(owner: str, obj, with_min: bool = True) -> None:
    object.__setattr__(obj, "max_lr", _checks.number(owner, "max_lr", obj.max_lr, low=0.0, low_open=True))
    object.__setattr__(obj, "warmup_steps", _checks.integer(owner, "warmup_steps", obj.warmup_steps, low=0))
    if with_min:
        object.__setattr__(obj, "min_lr", _checks.number(owner, "min_lr", obj.min_lr, low=0.0, high=obj.max_lr))


@dataclass(frozen=True)
class ConstantWithWarmup(_Schedule):
    """η(t) = max_lr · min(1, t / warmup_steps)."""

    max_lr: float
    warmup_steps: int = 0

    def __post_init__(self):
        _check_common("ConstantWithWarmup", self, with_min=False)

    def lr_at(self, step: float) -> float:
        return self.max_lr * _warmup(_step("ConstantWithWarmup", step), self.warmup_steps)


@dataclass(frozen=True)
class WarmupCosine(_Schedule):
    """Linear warm-up to max_lr over warmup_steps, then half a cosine down to min_lr at total_steps
    (min_lr after that)."""

    max_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
        _check_common("WarmupCosine", self)
        total = _checks.integer("WarmupCosine", "total_steps", self.total_steps, low=1)
        if self.warmup_steps >= total:
            raise ValueError(f"WarmupCosine: warmup_steps must be < total_steps={total}, got {self.warmup_steps}")

    def lr_at(self, step: float) -> float:
        t = _step("WarmupCosine", step)
        if t < self.warmup_steps:
            return self.max_lr * t / self.warmup_steps
        p = min(1.0, (t - self.warmup_steps) / (self.total_steps - self.warmup_steps))  # progress in [0, 1]
        return self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


DECAY_SHAPES = ("linear", "cosine", "sqrt")


@dataclass(frozen=True)
class WarmupStableDecay(_Schedule):
    """Warm-up, a long stable phase at max_lr, and a decay to min_lr over the last
    decay_fraction · total_steps steps (WSD; Hägele et al. 2024, MiniCPM 2024).

    Decay shapes over the decay progress q in [0, 1]: "linear" 1 − q, "cosine" ½(1 + cos πq),
    "sqrt" 1 − √q. Nothing decays before step total_steps · (1 − decay_fraction).
    """

    max_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    min_lr: float = 0.0
    shape: str = "linear"

    def __post_init__(self):
        _check_common("WarmupStableDecay", self)
        _checks.integer("WarmupStableDecay", "total_steps", self.total_steps, low=1)
        frac = _checks.number("WarmupStableDecay", "decay_fraction", self.decay_fraction, low=0.0, high=1.0,
                              low_open=True)
        object.__setattr__(self, "decay_fraction", frac)
        _checks.choice("WarmupStableDecay", "shape", self.shape, DECAY_SHAPES)
        if self.warmup_steps > self.decay_start:
            raise ValueError(f"WarmupStableDecay: warmup_steps must be <= the decay's start "
                             f"total_steps * (1 - decay_fraction) = {self.decay_start:g}, got {self.warmup_steps}")

    @property
    def decay_start(self) -> float:
        return self.total_steps * (1.0 - self.decay_fraction)

    def lr_at(self, step: float) -> float:
        t = _step("WarmupStableDecay", step)
        if t < self.warmup_steps:
            return self.max_lr * t / self.warmup_steps
        if t <= self.decay_start:
            return self.max_lr
        q = min(1.0, (t - self.decay_start) / (self.total_steps - self.decay_start))  # decay progress
        if self.shape == "linear":
            f = 1.0 - q
        elif self.shape == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * q))
        else:
            f = 1.0 - math.sqrt(q)
        return self.min_lr + (self.max_lr - self.min_lr) * f


@dataclass(frozen=True)
class InverseTime(_Schedule):
    """Warm-up, then η(t) = max_lr / (1 + decay · (t − warmup_steps)): the 1/(1 + c·t) family
    that Amos's learning-rate factor d = 1/(1 + ζ√(ξη)·b) belongs to (in its clock b)."""

    max_lr: float
    decay: float
    warmup_steps: int = 0

    def __post_init__(self):
        _check_common("InverseTime", self, with_min=False)
        object.__setattr__(self, "decay", _checks.number("InverseTime", "decay", self.decay, low=0.0))

    def lr_at(self, step: float) -> float:
        t = _step("InverseTime", step)
        if t < self.warmup_steps:
            return self.max_lr * t / self.warmup_steps
        return self.max_lr / (1.0 + self.decay * (t - self.warmup_steps))


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: _Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR driving `optimizer` along `schedule` (sets every group's lr to schedule.max_lr first)."""
    if not isinstance(schedule, _Schedule):
        raise TypeError(f"lambda_lr: schedule must be one of labkit.optim.schedules' schedules, "
                        f"got {type(schedule).__name__}")
    for group in optimizer.param_groups:
        group["lr"] = schedule.max_lr
        group.pop("initial_lr", None)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)


# --- Amos-style rules -------------------------------------------------------------------------


def amos_lr(eta: float, xi: float) -> float:
    """α = ξ·η: the learning rate of a tensor whose entries should have RMS η (rule 1)."""
    eta = _checks.number("amos_lr", "eta", eta, low=0.0, low_open=True)
    xi = _checks.number("amos_lr", "xi", xi, low=0.0, low_open=True)
    return xi * eta


def amos_weight_decay(lr: float, eta: float) -> float:
    """ρ = α² / (2η²): the per-step decay that holds RMS(θ) at η under RMS-1 updates (rule 2)."""
    lr = _checks.number("amos_weight_decay", "lr", lr, low=0.0)
    eta = _checks.number("amos_weight_decay", "eta", eta, low=0.0, low_open=True)
    return lr * lr / (2.0 * eta * eta)


def adamw_weight_decay(lr: float, eta: float) -> float:
    """λ = α / (2η²): rule 2 in torch.optim.AdamW's convention (θ ← θ·(1 − lr·λ) each step)."""
    lr = _checks.number("adamw_weight_decay", "lr", lr, low=0.0, low_open=True)
    return amos_weight_decay(lr, eta) / lr


def equilibrium_rms(lr: float, rho: float, update_rms: float = 1.0) -> float:
    """RMS(θ) where (1 − ρ)²·RMS² + α²·RMS(u)² = RMS²: α·RMS(u) / √(2ρ − ρ²)."""
    lr = _checks.number("equilibrium_rms", "lr", lr, low=0.0)
    rho = _checks.number("equilibrium_rms", "rho", rho, low=0.0, high=1.0, low_open=True)
    update_rms = _checks.number("equilibrium_rms", "update_rms", update_rms, low=0.0)
    return lr * update_rms / math.sqrt(2.0 * rho - rho * rho)


@dataclass
class AmosSchedule:
    """Per-step values of Amos's schedule for one tensor (index t = step t + 1's values)."""

    lr: list[float]            # α_t = d_t·ξ·η
    weight_decay: list[float]  # ρ_t = ½·d_t·γ_t (per step, multiplicative: θ ← θ − ρ_t·θ)
    b: list[float]             # the clock b_t before step t


def amos_schedule(steps: int, *, xi: float, eta: float, zeta: float = 0.25, norm_sq: float = 1.0) -> AmosSchedule:
    """Amos's learning rate and weight decay over `steps` steps (rule 3), taking mean(g²/v̂) = norm_sq.

    γ_t = (1 + ζ√ξ·b_t)^(−1/2)·ξ²·norm_sq,  d_t = 1/(1 + ζ√(ξη)·b_t),  b_{t+1} = b_t + γ_t(1 + b_t),
    α_t = d_t·ξ·η,  ρ_t = ½·d_t·γ_t,  b_0 = 0.
    """
    steps = _checks.integer("amos_schedule", "steps", steps, low=0)
    xi = _checks.number("amos_schedule", "xi", xi, low=0.0, low_open=True)
    eta = _checks.number("amos_schedule", "eta", eta, low=0.0, low_open=True)
    zeta = _checks.number("amos_schedule", "zeta", zeta, low=0.0)
    norm_sq = _checks.number("amos_schedule", "norm_sq", norm_sq, low=0.0)
    out = AmosSchedule([], [], [])
    b = 0.0
    for _ in range(steps):
        gamma = xi * xi * norm_sq / math.sqrt(1.0 + zeta * math.sqrt(xi) * b)
        d = 1.0 / (1.0 + zeta * math.sqrt(xi * eta) * b)
        out.lr.append(d * xi * eta)
        out.weight_decay.append(0.5 * d * gamma)
        out.b.append(b)
        b = b + gamma * (1.0 + b)
    return out


def default_eta(name: str, p: torch.Tensor) -> float:
    """A tensor's expected RMS scale η when none is given: its RMS if it is not constant (the init
    sets the scale: 0.02 in GPT-2-style models), else 1 for a gain of ones and 0.5 otherwise (biases)."""
    with torch.no_grad():
        x = p.detach().float()
        if x.numel() > 1 and x.std() > 0:
            return x.pow(2).mean().sqrt().item()
        if x.numel() and bool((x == 1).all()):
            return 1.0
    return 0.5


def amos_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], *, xi: float,
                      eta: dict[str, float] | None = None) -> list[dict]:
    """One AdamW param group per tensor: lr = ξ·η (rule 1) and weight_decay = lr/(2η²) (rule 2).

    named_params: model.named_parameters(). eta: name -> η; missing names use default_eta.
    Shared (tied) tensors appear once.
    """
    xi = _checks.number("amos_param_groups", "xi", xi, low=0.0, low_open=True)
    eta = dict(eta or {})
    groups, seen = [], set()
    for name, p in named_params:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        e = eta.get(name)
        e = default_eta(name, p) if e is None else _checks.number("amos_param_groups", f"eta[{name!r}]", e,
                                                                  low=0.0, low_open=True)
        lr = amos_lr(e, xi)
        groups.append({"params": [p], "lr": lr, "weight_decay": adamw_weight_decay(lr, e), "name": name, "eta": e})
    return groups


__all__ = ["AmosSchedule", "ConstantWithWarmup", "DECAY_SHAPES", "InverseTime", "WarmupCosine", "WarmupStableDecay",
           "adamw_weight_decay", "amos_lr", "amos_param_groups", "amos_schedule", "amos_weight_decay", "default_eta",
           "equilibrium_rms", "lambda_lr"]
