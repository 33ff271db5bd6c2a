"""Exercises of chapter 04-lion-tiger (registered on import; graded by labkit.check).

    lion-tiger.lion_step    fn(param, grad, exp_avg, lr, beta1, beta2, weight_decay) -> (param, exp_avg)
    lion-tiger.tiger_step   fn(param, grad, exp_avg, lr, beta, weight_decay) -> (param, exp_avg); η = lr·RMS(param)
    lion-tiger.state_bytes  fn(param_shapes, bytes_per_elem, optimizer, accumulation_steps) -> bytes held between steps
    lion-tiger.accumulate   fn(exp_avg, micro_grads, beta) -> Tiger's momentum after k micro-steps

The references run labkit's own optimizers (labkit.optim.lion.Lion, labkit.optim.tiger.Tiger) and
state formulas (labkit.optim.memory.state_numel).
"""

from __future__ import annotations

import math

import torch

from labkit.exercises import Exercise, register
from labkit.optim import memory
from labkit.optim.lion import Lion
from labkit.optim.tiger import Tiger

OPTIMIZERS = ("sgd", "adamw", "lion", "tiger")


def _one_step(opt_cls, param, grad, exp_avg, **hp):
    """Run one step of opt_cls on a copy of param with the given gradient and momentum."""
    p = param.detach().clone()
    opt = opt_cls([p], **hp)
    p.grad = grad.detach().clone()
    opt.state[p]["exp_avg"] = exp_avg.detach().clone()
    opt.step()
    return p, opt.state[p]["exp_avg"]


def _tensor_cases(rng, shape_max=6):
    """(param, grad, exp_avg) in float64 with edge cases first."""
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    yield torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    # c = 0 exactly in the middle coordinate: sign(0) = 0, only weight decay moves it
    yield (torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.0, -3.0], dtype=torch.float64),
           torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64))
    # c = 0.9*m + 0.1*g is barely positive, while 0.9*(0.99*m + 0.01*g) + 0.1*g is negative: the order matters
    yield (torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64), torch.tensor([-8.9, 8.9, 0.2], dtype=torch.float64),
           torch.tensor([1.0, -1.0, -0.5], dtype=torch.float64))
    for _ in range(13):
        shape = (rng.randint(1, shape_max), rng.randint(1, shape_max))
        yield (torch.randn(shape, generator=g, dtype=torch.float64),
               torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** rng.uniform(-6, 2),
               torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** rng.uniform(-6, 1))


# --- lion-tiger.lion_step --------------------------------------------------------------------


def lion_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, lr: float, beta1: float,
              beta2: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one Lion step (Chen et al. 2023) as labkit.optim.lion.Lion does it."""
    return _one_step(Lion, param, grad, exp_avg, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)


def _lion_cases(rng):
    for i, (p, g, m) in enumerate(_tensor_cases(rng)):
        if i < 3:
            yield dict(param=p, grad=g, exp_avg=m, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.5)
        else:
            yield dict(param=p, grad=g, exp_avg=m, lr=10 ** rng.uniform(-5, -1), beta1=rng.choice([0.0, 0.9, 0.95]),
                       beta2=rng.choice([0.98, 0.99, 0.999]), weight_decay=rng.choice([0.0, 0.1, 1.0]))


register(Exercise(
    name="lion-tiger.lion_step",
    reference=lion_step,
    cases=_lion_cases,
    rtol=1e-12, atol=1e-12,
    hint="c = beta1*m + (1-beta1)*g; param*(1 - lr*weight_decay) - lr*sign(c); THEN m = beta2*m + (1-beta2)*g. "
         "Return new tensors (param, exp_avg); torch.sign(0) is 0.",
))


# --- lion-tiger.tiger_step -------------------------------------------------------------------


def tiger_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, lr: float, beta: float,
               weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one Tiger step with lr scaled by RMS(param) (param is a matrix)."""
    return _one_step(Tiger, param, grad, exp_avg, lr=lr, beta=beta, weight_decay=weight_decay, lr_scale="rms")


def _tiger_cases(rng):
    for i, (p, g, m) in enumerate(_tensor_cases(rng)):
        p = p.reshape(1, -1) if p.dim() == 1 else p  # a matrix: the RMS rule applies
        g, m = g.reshape(p.shape), m.reshape(p.shape)
        if i < 3:
            yield dict(param=p, grad=g, exp_avg=m, lr=0.1, beta=0.965, weight_decay=0.01)
        else:
            yield dict(param=p * 10 ** rng.uniform(-2, 1), grad=g, exp_avg=m, lr=10 ** rng.uniform(-4, -1),
                       beta=rng.choice([0.9, 0.965, 0.99]), weight_decay=rng.choice([0.0, 0.01, 0.1]))


register(Exercise(
    name="lion-tiger.tiger_step",
    reference=tiger_step,
    cases=_tiger_cases,
    rtol=1e-12, atol=1e-12,
    hint="m = beta*m + (1-beta)*g FIRST (Tiger takes the sign of the new momentum); eta = lr * sqrt(mean(param**2)) "
         "of the parameter BEFORE the step; param - eta*(sign(m) + weight_decay*param).",
))


# --- lion-tiger.state_bytes ------------------------------------------------------------------


def state_bytes(param_shapes: list[tuple[int, ...]], bytes_per_elem: int, optimizer: str,
                accumulation_steps: int = 1) -> int:
    """Reference: bytes an optimizer holds between (micro-)steps besides the weights.

    sgd: nothing; adamw: m and v; lion: m; tiger: m. With accumulation_steps > 1, every optimizer
    but tiger also keeps the summed gradient (.grad) between micro-steps; tiger folds each
    micro-batch's gradient into m at once.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"state_bytes: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    states = sum(memory.state_numel(s, optimizer, momentum=False) for s in param_shapes)  # sgd: no momentum
    grads = sum(math.prod(s) for s in param_shapes) if accumulation_steps > 1 and optimizer != "tiger" else 0
    return (states + grads) * bytes_per_elem


def _bytes_cases(rng):
    gpt = [(256, 128), (128, 384), (128, 128), (128, 512), (512, 128), (128,), (128,)]
    for opt in OPTIMIZERS:
        yield dict(param_shapes=gpt, bytes_per_elem=4, optimizer=opt, accumulation_steps=1)
        yield dict(param_shapes=gpt, bytes_per_elem=2, optimizer=opt, accumulation_steps=8)
    yield dict(param_shapes=[(0, 7), (3,)], bytes_per_elem=4, optimizer="adamw", accumulation_steps=2)
    yield dict(param_shapes=[()], bytes_per_elem=4, optimizer="lion", accumulation_steps=1)  # a scalar parameter
    for _ in range(12):
        shapes = [tuple(rng.randint(1, 4096) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 6))]
        yield dict(param_shapes=shapes, bytes_per_elem=rng.choice([2, 4]), optimizer=rng.choice(OPTIMIZERS),
                   accumulation_steps=rng.choice([1, 1, 2, 4, 16]))


register(Exercise(
    name="lion-tiger.state_bytes",
    reference=state_bytes,
    cases=_bytes_cases,
    rtol=0.0, atol=0.0,
    hint="Count elements (math.prod of each shape; a () shape has 1). States per element: sgd 0, adamw 2, lion 1, "
         "tiger 1; plus one gradient buffer when accumulating (accumulation_steps > 1), except for tiger.",
))


# --- lion-tiger.accumulate -------------------------------------------------------------------


def accumulate(exp_avg: torch.Tensor, micro_grads: list[torch.Tensor], beta: float) -> torch.Tensor:
    """Reference: Tiger's momentum after one accumulation cycle of len(micro_grads) micro-steps."""
    k = len(micro_grads)
    p = torch.zeros_like(exp_avg)
    opt = Tiger([p], lr=1e-3, beta=beta, weight_decay=0.0, accumulation_steps=k)
    opt.state[p]["exp_avg"] = exp_avg.detach().clone()
    for g in micro_grads:
        p.grad = g.detach().clone()
        opt.step()
    return opt.state[p]["exp_avg"]


def _accumulate_cases(rng):
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    yield dict(exp_avg=torch.zeros(4, dtype=torch.float64), micro_grads=[torch.ones(4, dtype=torch.float64)], beta=0.9)
    yield dict(exp_avg=torch.ones(2, 3, dtype=torch.float64),
               micro_grads=[torch.zeros(2, 3, dtype=torch.float64)] * 4, beta=0.965)
    for _ in range(14):
        shape = (rng.randint(1, 5), rng.randint(1, 5))
        k = rng.randint(1, 8)
        yield dict(exp_avg=torch.randn(shape, generator=gen, dtype=torch.float64),
                   micro_grads=[torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(k)],
                   beta=rng.choice([0.9, 0.965, 0.99]))


register(Exercise(
    name="lion-tiger.accumulate",
    reference=accumulate,
    cases=_accumulate_cases,
    rtol=1e-9, atol=1e-12,
    hint="First micro-step: m = beta*m + (1-beta)/k*g; the other k-1: m = m + (1-beta)/k*g. "
         "Check: the result equals beta*m + (1-beta)*mean(g).",
))
