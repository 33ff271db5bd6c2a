"""Exercises of chapter 03-adamw (registered on import; graded by labkit.check).

    adamw.step_by_hand      fn(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (p, m, v) after one step
    adamw.first_step_ratio  fn(g, eps, state_dtype) -> |update| / lr of the first step, moments stored in state_dtype
    adamw.eps_for_change    fn(v_hat, x, eps_mode) -> the ε that shrinks the update by the fraction x
    adamw.warmup_cosine     fn(step, max_lr, min_lr, warmup_steps, total_steps) -> learning rate
    adamw.amos_hparams      fn(eta, xi) -> (lr, weight_decay) for torch.optim.AdamW, Amos-style
"""

from __future__ import annotations

import math

import torch

from labkit.exercises import Exercise, register
from labkit.optim import adamw as aw
from labkit.optim import schedules as sch

# --- adamw.step_by_hand -----------------------------------------------------------------------


def step_by_hand(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float):
    """Reference: one AdamW step (torch.optim.AdamW's update); t is this step's number (1 = first).
    Returns new (p, m, v); the inputs are not modified."""
    m, v = m.clone(), v.clone()
    d = aw.adamw_direction_(g, m, v, float(t), beta1=beta1, beta2=beta2, eps=eps)
    return p * (1 - lr * weight_decay) - lr * d, m, v


def _tensor(rng, shape, scale=1.0, positive=False):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return x.abs() if positive else x


def _step_cases(rng):
    z = torch.zeros(3, dtype=torch.float64)
    g = torch.tensor([0.5, -2.0, 1e-3], dtype=torch.float64)
    p = torch.tensor([1.0, -1.0, 0.25], dtype=torch.float64)
    base = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    yield dict(p=p, g=g, m=z, v=z, t=1, **base)                              # the first step: m = v = 0
    yield dict(p=p, g=z, m=z, v=z, t=1, **base)                              # no gradient: decay only
    yield dict(p=p, g=g, m=0.1 * g, v=1e-3 * g * g, t=2, **base)             # the second step
    yield dict(p=p, g=g, m=z, v=z, t=1, **{**base, "eps": 1.0})              # ε dominates
    yield dict(p=p, g=g, m=z, v=z, t=1, **{**base, "weight_decay": 0.0})
    yield dict(p=torch.zeros(0, dtype=torch.float64), g=torch.zeros(0, dtype=torch.float64),
               m=torch.zeros(0, dtype=torch.float64), v=torch.zeros(0, dtype=torch.float64), t=5, **base)  # empty
    for _ in range(14):
        shape = rng.choice([(4,), (3, 5), (2, 3, 4)])
        scale = 10 ** rng.uniform(-4, 0)
        yield dict(p=_tensor(rng, shape), g=_tensor(rng, shape, scale), m=_tensor(rng, shape, scale),
                   v=_tensor(rng, shape, scale, positive=True) ** 2, t=rng.randint(1, 1000),
                   lr=10 ** rng.uniform(-5, -1), beta1=rng.choice([0.0, 0.9, 0.95]),
                   beta2=rng.choice([0.95, 0.99, 0.999]), eps=10 ** rng.uniform(-12, -4),
                   weight_decay=rng.choice([0.0, 0.01, 0.1]))


register(Exercise(
    name="adamw.step_by_hand",
    reference=step_by_hand,
    cases=_step_cases,
    rtol=1e-9, atol=1e-12,
    hint="Decay p by (1 - lr*weight_decay); m = beta1*m + (1-beta1)*g; v = beta2*v + (1-beta2)*g^2; "
         "m_hat = m/(1-beta1^t), v_hat = v/(1-beta2^t); p -= lr * m_hat / (sqrt(v_hat) + eps). Return new tensors.",
))

# --- adamw.first_step_ratio -------------------------------------------------------------------


def first_step_ratio(g: torch.Tensor, eps: float, state_dtype: torch.dtype) -> torch.Tensor:
    """Reference: |update| / lr of AdamW's first step (betas 0.9, 0.999), float32 arithmetic,
    the moments rounded to state_dtype when stored and read back rounded."""
    return aw.effective_step_ratio(g, steps=1, betas=(0.9, 0.999), eps=eps, state_dtype=state_dtype)


def _ratio_cases(rng):
    grid = torch.logspace(-9, 0, 28, dtype=torch.float32)  # |g| from 1e-9 to 1
    yield dict(g=grid, eps=1e-8, state_dtype=torch.float32)
    yield dict(g=grid, eps=1e-8, state_dtype=torch.float16)     # v underflows below ~5.5e-3
    yield dict(g=grid, eps=1e-8, state_dtype=torch.bfloat16)
    yield dict(g=-grid, eps=1e-3, state_dtype=torch.float16)    # negative gradients, larger ε
    yield dict(g=torch.zeros(4), eps=1e-8, state_dtype=torch.float16)
    for _ in range(10):
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        g = (10 ** (torch.rand(32, generator=gen) * 9 - 9)) * torch.randn(32, generator=gen).sign()
        yield dict(g=g.float(), eps=10 ** rng.uniform(-10, -2),
                   state_dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]))


register(Exercise(
    name="adamw.first_step_ratio",
    reference=first_step_ratio,
    cases=_ratio_cases,
    rtol=5e-3, atol=1e-12,
    hint="m1 = ((1-b1)*g).to(state_dtype).float(), v1 = ((1-b2)*g*g).to(state_dtype).float(); "
         "then |m1/(1-b1)| / (sqrt(v1/(1-b2)) + eps). A stored v1 of 0 leaves only eps in the denominator.",
))

# --- adamw.eps_for_change ---------------------------------------------------------------------


def eps_for_change(v_hat: float, x: float, eps_mode: str) -> float:
    """Reference: the ε for which |m̂/(√v̂ + ε)| (outside) or |m̂/√(v̂ + ε)| (inside) is (1 − x) times
    |m̂/√v̂|, the update without ε."""
    if eps_mode == "outside":
        return math.sqrt(v_hat) * x / (1 - x)       # √v̂ / (√v̂ + ε) = 1 − x
    return v_hat * (1 / (1 - x) ** 2 - 1)            # √v̂ / √(v̂ + ε) = 1 − x


def _eps_cases(rng):
    yield dict(v_hat=1.0, x=0.5, eps_mode="outside")       # ε = √v̂
    yield dict(v_hat=1e-16, x=0.01, eps_mode="outside")    # |g| ~ 1e-8: ε = 1e-8 already shrinks it by half
    yield dict(v_hat=1e-16, x=0.5, eps_mode="inside")
    yield dict(v_hat=4e-6, x=0.1, eps_mode="inside")
    for _ in range(16):
        yield dict(v_hat=10 ** rng.uniform(-20, 0), x=rng.uniform(0.001, 0.99),
                   eps_mode=rng.choice(["outside", "inside"]))


register(Exercise(
    name="adamw.eps_for_change",
    reference=eps_for_change,
    cases=_eps_cases,
    rtol=1e-9, atol=0.0,
    hint="The ratio of the update with ε to the update without is √v̂/(√v̂ + ε) outside the root and "
         "√(v̂/(v̂ + ε)) inside; set it to 1 − x and solve for ε.",
))

# --- adamw.warmup_cosine ----------------------------------------------------------------------


def warmup_cosine(step: float, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Reference: labkit.optim.schedules.WarmupCosine(...).lr_at(step)."""
    return sch.WarmupCosine(max_lr=max_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                            min_lr=min_lr).lr_at(step)


def _cosine_cases(rng):
    base = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=100, total_steps=1000)
    for step in (0, 1, 50, 99, 100, 101, 550, 999, 1000, 5000):   # boundaries and beyond the end
        yield dict(step=step, **base)
    yield dict(step=0, max_lr=3e-4, min_lr=0.0, warmup_steps=0, total_steps=10)   # no warm-up
    yield dict(step=5, max_lr=3e-4, min_lr=0.0, warmup_steps=0, total_steps=10)
    for _ in range(12):
        total = rng.randint(2, 100_000)
        warm = rng.randint(0, total - 1)
        max_lr = 10 ** rng.uniform(-5, -1)
        yield dict(step=rng.randint(0, int(total * 1.2)), max_lr=max_lr, min_lr=max_lr * rng.choice([0.0, 0.1]),
                   warmup_steps=warm, total_steps=total)


register(Exercise(
    name="adamw.warmup_cosine",
    reference=warmup_cosine,
    cases=_cosine_cases,
    rtol=1e-9, atol=1e-15,
    hint="step < warmup: max_lr * step / warmup_steps; then p = (step - warmup)/(total - warmup) capped at 1, "
         "lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2.",
))

# --- adamw.amos_hparams -----------------------------------------------------------------------


def amos_hparams(eta: float, xi: float) -> tuple[float, float]:
    """Reference: (lr, weight_decay) for torch.optim.AdamW so that lr = ξ·η and the per-step decay
    lr·weight_decay equals α²/(2η²)."""
    lr = sch.amos_lr(eta, xi)
    return lr, sch.adamw_weight_decay(lr, eta)


def _amos_cases(rng):
    yield dict(eta=1.0, xi=0.01)          # a norm gain
    yield dict(eta=0.02, xi=0.01)         # a GPT-2-style embedding
    yield dict(eta=1 / math.sqrt(4096), xi=1e-3)
    for _ in range(12):
        yield dict(eta=10 ** rng.uniform(-3, 0.5), xi=10 ** rng.uniform(-4, -1))


register(Exercise(
    name="adamw.amos_hparams",
    reference=amos_hparams,
    cases=_amos_cases,
    rtol=1e-9, atol=0.0,
    hint="lr = xi * eta. The per-step decay rho = lr^2 / (2 eta^2); torch applies p *= 1 - lr * weight_decay, "
         "so weight_decay = rho / lr.",
))

__all__ = ["amos_hparams", "eps_for_change", "first_step_ratio", "step_by_hand", "warmup_cosine"]
