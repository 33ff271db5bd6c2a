"""AdamW with optimizer states in low precision, and the epsilon trap.

Adam: D. P. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
AdamW: I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.

The update, per element, with t counting this parameter's steps from 1 (torch.optim.AdamW's
order of operations):

    θ ← θ · (1 − lr·λ)                       decoupled weight decay (λ = weight_decay)
    m ← β1·m + (1 − β1)·g                    first moment   (state "exp_avg")
    v ← β2·v + (1 − β2)·g²                   second moment  (state "exp_avg_sq")
    m̂ = m / (1 − β1^t),   v̂ = v / (1 − β2^t)  bias correction
    θ ← θ − lr · m̂ / (√v̂ + ε)               eps_mode="outside" (Adam, torch)
    θ ← θ − lr · m̂ / √(v̂ + ε)               eps_mode="inside"  (ε is then a floor on v̂, not on √v̂)

The epsilon trap. The direction d = m̂ / (√v̂ + ε) has |d| ≈ 1 only while √v̂ ≫ ε. For a constant
gradient g the exact values are m̂ = g and v̂ = g², so |d| = |g| / (|g| + ε): an element whose
gradients are ≲ ε moves by lr·|g|/ε instead of lr, a silent per-element change of learning rate.
Low-precision states make it worse: stored in float16, (1 − β2)·g² rounds to zero for every
|g| < √(2⁻²⁵ / (1 − β2)) ≈ 5.5e-3 (β2 = 0.999), so v̂ = 0 and the step becomes lr·m̂/ε, about
1e5·lr for |g| = 1e-3 with ε = 1e-8: training diverges. Stored in bfloat16 (8 significant
bits), v·β2 rounds back to v when 1 − β2 < 2⁻⁹, so v can grow but never decay. The chapter
measures both and the fixes: float32 states, a larger ε, ε inside the square root, and scaling
the gradients (Adam is invariant to the gradient's scale except through ε).

`state_dtype` chooses how the two moments are stored; the arithmetic of a step runs in the
wider of the gradient's and the state's dtypes, and the moments are rounded to `state_dtype`
when stored: the next step, and this step's update, read the rounded values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from labkit import _checks

NAME = "AdamW"
EPS_MODES = ("outside", "inside")
STATE_DTYPES = {  # names accepted for state_dtype
    "fp64": torch.float64, "float64": torch.float64,
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_state_dtype(state_dtype) -> torch.dtype | None:
    """None, a floating torch.dtype, or one of STATE_DTYPES' names -> None or the dtype."""
    if state_dtype is None:
        return None
    if isinstance(state_dtype, str):
        state_dtype = STATE_DTYPES.get(state_dtype.lower().replace("torch.", ""), state_dtype)
    allowed = (None, torch.float64, torch.float32, torch.bfloat16, torch.float16)
    return _checks.choice(NAME, "state_dtype", state_dtype, allowed)


# --- the update of one tensor -------------------------------------------------------------


def _moments_(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float, *,
              beta1: float, beta2: float, eps: float, eps_mode: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Update the moments in place; return (m, denom, 1 − β1^t) in the compute dtype.

    The direction is d = m / (1 − β1^t) / denom; adamw_step_ folds the division into one addcdiv.
    """
    cdt = torch.promote_types(grad.dtype, exp_avg.dtype)  # compute dtype
    in_place = exp_avg.dtype == cdt and exp_avg_sq.dtype == cdt
    g = grad.to(cdt)
    m = exp_avg if in_place else exp_avg.to(cdt)
    v = exp_avg_sq if in_place else exp_avg_sq.to(cdt)
    m.lerp_(g, 1 - beta1)                                # m ← β1 m + (1 − β1) g
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)        # v ← β2 v + (1 − β2) g²
    if not in_place:                                     # store, then read back what storage holds
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        m, v = exp_avg.to(cdt), exp_avg_sq.to(cdt)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    if eps_mode == "outside":
        denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)      # √v̂ + ε
    else:
        denom = (v / bias_correction2).add_(eps).sqrt_()            # √(v̂ + ε)
    return m, denom, bias_correction1


def adamw_direction_(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float, *,
                     beta1: float, beta2: float, eps: float, eps_mode: str = "outside") -> torch.Tensor:
    """Update the moments in place and return the direction d = m̂ / (√v̂ + ε) (or m̂ / √(v̂ + ε)).

    grad, exp_avg, exp_avg_sq: same shape; the moments keep their own dtype (rounded on store).
    step: this tensor's step count including the current one (1 on the first step).
    The arithmetic runs in the wider of grad's and the states' dtypes; d is returned in it.
    """
    m, denom, bias_correction1 = _moments_(grad, exp_avg, exp_avg_sq, step, beta1=beta1, beta2=beta2, eps=eps,
                                           eps_mode=eps_mode)
    return (m / bias_correction1).div_(denom)                       # m̂ / denom


def adamw_step_(p: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float],
                eps: float, weight_decay: float, eps_mode: str = "outside", state_dtype=None) -> None:
    """One AdamW update of the tensor p in place, its state {"step", "exp_avg", "exp_avg_sq"} created if empty.

    state_dtype: None (p's dtype) or a torch.dtype for the moments. When p, grad and the moments
    share one dtype this is torch.optim.AdamW's single-tensor update, operation for operation
    (θ·(1 − lr·λ), then θ − (lr / (1 − β1^t)) · m / denom as one addcdiv), so it matches it bit for bit.
    """
    if not state:
        dtype = state_dtype or p.dtype
        state["step"] = torch.tensor(0.0)  # a float32 CPU tensor, as torch.optim.AdamW keeps it
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    state["step"] += 1
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)                                     # decoupled weight decay
    beta1, beta2 = betas
    m, denom, bias_correction1 = _moments_(grad, state["exp_avg"], state["exp_avg_sq"], state["step"].item(),
                                           beta1=beta1, beta2=beta2, eps=eps, eps_mode=eps_mode)
    if m.dtype == p.dtype:
        p.addcdiv_(m, denom, value=-(lr / bias_correction1))              # θ ← θ − lr · m̂ / denom
    else:
        p.add_(((m / bias_correction1).div_(denom) * -lr).to(p.dtype))   # in the compute dtype, then rounded


def check_adam_hparams(owner: str, group: dict, prefix: str = "") -> None:
    """Check (and normalise, in place) lr, betas, eps and weight_decay of an Adam-style param group.

    prefix names the arguments in messages (MuonWithAdamW's "adamw_lr", ...).
    """
    group["lr"] = _checks.number(owner, prefix + "lr", group["lr"], low=0.0)
    group["betas"] = _checks.betas(owner, group["betas"])
    group["eps"] = _checks.number(owner, prefix + "eps", group["eps"], low=0.0)
    group["weight_decay"] = _checks.number(owner, prefix + "weight_decay", group["weight_decay"], low=0.0)


# --- the optimizer --------------------------------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) with a choice of state precision and of where ε goes.

    With state_dtype=None and eps_mode="outside" it computes what torch.optim.AdamW computes, bit for
    bit against its single-tensor path (foreach=False, the default for CPU tensors).
    state_dtype: None (the parameter's dtype) or torch.float32 / bfloat16 / float16 (or "fp32",
    "bf16", "fp16") for exp_avg and exp_avg_sq. eps_mode: "outside" m̂/(√v̂+ε), "inside" m̂/√(v̂+ε).
    The state of a parameter is {"step", "exp_avg", "exp_avg_sq"}, as in torch.optim.AdamW.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_dtype=None, eps_mode: str = "outside",
                 maximize: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                        eps_mode=eps_mode, maximize=maximize)
        self._validate(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict) -> None:
        """Check (and normalise, in place) the hyperparameters of one param group."""
        check_adam_hparams(NAME, group)
        group["state_dtype"] = resolve_state_dtype(group["state_dtype"])
        _checks.choice(NAME, "eps_mode", group["eps_mode"], EPS_MODES)
        if not isinstance(group["maximize"], bool):
            raise TypeError(f"{NAME}: maximize must be a bool, got {type(group['maximize']).__name__} "
                            f"{group['maximize']!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])  # a group may override the defaults: check its values too

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One update of every parameter that has a gradient; returns closure()'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{NAME}: sparse gradients are not supported (parameter of shape "
                                     f"{tuple(p.shape)})")
                if p.is_complex():
                    raise TypeError(f"{NAME}: complex parameters are not supported, got {p.dtype}")
                adamw_step_(p, -p.grad if group["maximize"] else p.grad, self.state[p], lr=group["lr"],
                            betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                            eps_mode=group["eps_mode"], state_dtype=group["state_dtype"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keep the moments in each group's state_dtype (torch casts them to the param's)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    dtype = group["state_dtype"] or p.dtype
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = state[key].to(dtype)


# --- measuring the trap ---------------------------------------------------------------------


def ideal_step_ratio(grad: torch.Tensor | float, *, eps: float = 1e-8, eps_mode: str = "outside"):
    """|update| / lr in exact arithmetic for a gradient that is the same every step.

    Bias correction makes m̂ = g and v̂ = g² exactly, at every step: |g| / (|g| + ε) outside,
    |g| / √(g² + ε) inside.
    """
    _checks.choice("ideal_step_ratio", "eps_mode", eps_mode, EPS_MODES)
    g = grad.abs() if isinstance(grad, torch.Tensor) else abs(float(grad))
    if eps_mode == "outside":
        return g / (g + eps)
    return g / (g * g + eps) ** 0.5


def effective_step_ratio(grad: torch.Tensor, *, steps: int = 1, betas: tuple[float, float] = (0.9, 0.999),
                         eps: float = 1e-8, eps_mode: str = "outside", state_dtype=torch.float32,
                         grad_scale: float = 1.0) -> torch.Tensor:
    """|update| / lr per element at the last of `steps` AdamW steps that all see the same `grad`.

    The gradients reaching the optimizer are grad * grad_scale (a scaled loss, never unscaled:
    Adam's direction does not depend on the scale except through ε). Arithmetic in grad's dtype,
    moments stored in state_dtype (None: grad's dtype). No weight decay. The exact-arithmetic
    answer is ideal_step_ratio(grad * grad_scale).
    """
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
        raise TypeError(f"effective_step_ratio: grad must be a floating tensor, got {type(grad).__name__}")
    steps = _checks.integer("effective_step_ratio", "steps", steps, low=1)
    beta1, beta2 = _checks.betas("effective_step_ratio", betas)
    eps = _checks.number("effective_step_ratio", "eps", eps, low=0.0)
    _checks.choice("effective_step_ratio", "eps_mode", eps_mode, EPS_MODES)
    grad_scale = _checks.number("effective_step_ratio", "grad_scale", grad_scale, low=0.0, low_open=True)
    dtype = resolve_state_dtype(state_dtype) or grad.dtype
    g = grad * grad_scale
    m = torch.zeros_like(g, dtype=dtype)
    v = torch.zeros_like(g, dtype=dtype)
    for t in range(1, steps + 1):
        d = adamw_direction_(g, m, v, float(t), beta1=beta1, beta2=beta2, eps=eps, eps_mode=eps_mode)
    return d.abs()


def underflow_threshold(state_dtype, beta2: float = 0.999) -> float:
    """The largest |g| whose first second-moment increment (1 − β2)·g² rounds to 0 in state_dtype.

    Round to nearest: a value below half the smallest subnormal is stored as 0.
    """
    dtype = resolve_state_dtype(state_dtype)
    if dtype is None:
        raise ValueError("underflow_threshold: state_dtype must be a dtype, got None")
    beta2 = _checks.number("underflow_threshold", "beta2", beta2, low=0.0, high=1.0, high_open=True)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # smallest subnormal
    return math.sqrt(tiny / 2 / (1 - beta2))


def step_ratios(optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Run optimizer.step() and return |Δθ| / lr of every element that had a gradient (1-D, float32).

    Decoupled weight decay (θ·(1 − lr·λ)) is taken out first, so the values are |d| of the update
    θ ← θ·(1 − lr·λ) − lr·d. Elements of param groups with lr = 0 are left out.
    """
    before = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and group["lr"] > 0:
                before.append((p, group["lr"], group.get("weight_decay", 0.0), p.detach().clone()))
    optimizer.step(closure)
    out = [((old * (1 - lr * wd) - p.detach()).abs().float() / lr).flatten() for p, lr, wd, old in before]
    return torch.cat(out) if out else torch.zeros(0)


__all__ = ["AdamW", "EPS_MODES", "STATE_DTYPES", "adamw_direction_", "adamw_step_", "check_adam_hparams",
           "effective_step_ratio", "ideal_step_ratio", "resolve_state_dtype", "step_ratios", "underflow_threshold"]
