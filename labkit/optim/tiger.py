"""Tiger: a tight-fisted optimizer (Lion with β1 = β2, accumulation in the momentum, a NaN guard).

J. Su. *Tiger: an extremely frugal optimizer* (kexue.fm/archives/9512, 2023; code:
github.com/bojone/tiger). Lion: X. Chen et al., *Symbolic Discovery of Optimization
Algorithms*, arXiv:2302.06675. Gradient accumulation hidden in momentum: J. Su,
kexue.fm/archives/8634. Embedding anomaly and the lazy remedy: J. Su, kexue.fm/archives/9736.

The update, for a parameter θ with gradient g and one state tensor m:

    m_t = β·m_{t-1} + (1 − β)·g_t
    θ_t = θ_{t-1} − η_t·[sign(m_t) + λ·θ_{t-1}]

It is Lion with β1 = β2 = β: the interpolation c_t IS the new momentum, so the update depends on
the gradients only through m. Conventions match `pytorch_optimizer.Tiger` (defaults lr=1e-3,
β=0.965, λ=0.01, decay multiplied by lr and applied to θ_{t-1}, state key "exp_avg").

Options from the article (and its reference code):

- `lr_scale="rms"`: η_t = lr·RMS(θ_{t-1}) for tensors with >= 2 dims, so that every matrix moves
  by the same *relative* amount (as in LAMB/Amos); lr is then a relative rate (the article used
  ~1.76e-3). Tensors with < 2 dims (biases, norm gains, whose RMS is no scale: 0 or 1 at init)
  get η = 0.5·lr, as in the reference code, which also gives them no weight decay: put them in
  a param group with weight_decay=0. A matrix initialised to exactly 0 never moves under "rms".
- `skip_nonfinite=True`: if any gradient in any group holds a NaN or an inf, the whole step is
  skipped (no parameter or momentum changes) and counted in `optimizer.skipped_steps`. The
  reference code additionally shrinks the parameters by 0.99 on such a step; we only skip.
  The check costs one device-to-host sync per step. Without it the failure is silent: torch.sign(nan)
  is 0, so θ stays finite while every coordinate whose momentum became NaN stops moving for good.
- `accumulation_steps=k`: call step() after EVERY micro-batch's backward (and zero the grads);
  the gradient is folded into the momentum at once, with no accumulation buffer:
      micro-step 1 of k:   m ← β·m + (1 − β)/k·g
      micro-steps 2..k:    m ← m + (1 − β)/k·g
      after micro-step k:  θ ← θ − η·[sign(m) + λθ]
  Since θ does not change inside a cycle, after k micro-steps m = β·m_old + (1 − β)·mean(g):
  the same as plain accumulation of the averaged gradient, without holding any .grad between
  micro-steps (AdamW's update is not linear in g, so it needs the summed gradient first).
- `lazy=True` (per group, for embedding tables; not with accumulation): update only the rows
  (slices along dim 0) whose gradient is not all zero (see labkit.optim.lion).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from labkit import _checks
from labkit.optim.lion import _flag, _foreach_flag, _group_by_device_dtype, touched_rows

_NAME = "Tiger"
LR_SCALES = ("none", "rms")
SMALL_TENSOR_LR_FACTOR = 0.5  # the reference code's rate for biases and norm gains under "rms"


def effective_lr(param: torch.Tensor, lr: float, lr_scale: str) -> float | torch.Tensor:
    """η for this tensor: lr ("none"), lr·RMS(θ) for >= 2-D tensors or 0.5·lr otherwise ("rms")."""
    if lr_scale == "none":
        return lr
    if param.dim() < 2:
        return lr * SMALL_TENSOR_LR_FACTOR
    x = param.detach()
    x = x.float() if x.element_size() < 4 else x  # accumulate bf16/fp16 squares in fp32
    return lr * x.pow(2).mean().sqrt().to(param.dtype)  # a 0-dim tensor: no device-to-host sync


def tiger_update_(param: torch.Tensor, exp_avg: torch.Tensor, *, lr: float | torch.Tensor,
                  weight_decay: float) -> None:
    """θ ← θ − η·[sign(m) + λθ] on one tensor, in place (m already updated)."""
    param.mul_(1.0 - weight_decay * lr)  # decoupled weight decay on θ_{t-1}
    if isinstance(lr, torch.Tensor):
        param.addcmul_(torch.sign(exp_avg), lr, value=-1.0)
    else:
        param.add_(torch.sign(exp_avg), alpha=-lr)


def _refuse_sparse(grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise ValueError(f"{_NAME}: sparse gradients are not supported (use lazy=True with a dense "
                         f"nn.Embedding gradient), got a sparse grad of shape {tuple(grad.shape)}")


class Tiger(torch.optim.Optimizer):
    """Tiger (Su 2023): sign of the momentum, one state tensor, accumulation without a buffer.

    lr: η (or the relative rate under lr_scale="rms"); beta: β; weight_decay: λ (decoupled,
    times η). lr_scale: "none" | "rms". skip_nonfinite: skip and count steps with a NaN/inf
    gradient. accumulation_steps: k micro-steps per parameter update (call step() after each).
    lazy: update only rows with a nonzero gradient. foreach: fused kernels (None: on CUDA; only
    for lr_scale="none" groups that are not lazy).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, beta: float = 0.965, weight_decay: float = 0.01, *,
                 lr_scale: str = "none", skip_nonfinite: bool = True, accumulation_steps: int = 1,
                 lazy: bool = False, foreach: bool | None = None):
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay, lr_scale=lr_scale,
                        accumulation_steps=accumulation_steps, lazy=lazy, micro_step=0, skipped_steps=0)
        self._check_group(defaults)
        self.skip_nonfinite = _flag(_NAME, "skip_nonfinite", skip_nonfinite)
        self.foreach = _foreach_flag(_NAME, foreach)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict) -> None:
        group["lr"] = _checks.number(_NAME, "lr", group["lr"], low=0.0, low_open=True)
        group["beta"] = _checks.number(_NAME, "beta", group["beta"], low=0.0, high=1.0, high_open=True)
        group["weight_decay"] = _checks.number(_NAME, "weight_decay", group["weight_decay"], low=0.0)
        _checks.choice(_NAME, "lr_scale", group["lr_scale"], LR_SCALES)
        group["accumulation_steps"] = _checks.integer(_NAME, "accumulation_steps", group["accumulation_steps"], low=1)
        _flag(_NAME, "lazy", group["lazy"])
        if group["lazy"] and group["accumulation_steps"] > 1:
            raise ValueError(f"{_NAME}: lazy=True needs accumulation_steps=1 (a row may be touched in one "
                             f"micro-batch and not the next), got accumulation_steps={group['accumulation_steps']}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @property
    def skipped_steps(self) -> int:
        """How many step() calls were skipped for a non-finite gradient."""
        return max((g["skipped_steps"] for g in self.param_groups), default=0)

    def _all_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        for g in grads:
            _refuse_sparse(g)
        flags = [torch.isfinite(g).all() for g in grads]
        return bool(torch.stack(flags).all()) if flags else True  # one sync for the whole model

    def _use_foreach(self, group: dict, params: list[torch.Tensor]) -> bool:
        if group["lazy"] or group["lr_scale"] != "none":
            return False
        return self.foreach if self.foreach is not None else all(p.is_cuda for p in params)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One micro-step: fold the gradients into the momentum; update θ at the end of a cycle."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_nonfinite and not self._all_finite():
            for group in self.param_groups:
                group["skipped_steps"] += 1  # nothing else changes, not even the micro-step count
            return loss
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                _refuse_sparse(p.grad)
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)  # m_0 = 0
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            k, i = group["accumulation_steps"], group["micro_step"]
            group["micro_step"] = (i + 1) % k
            if not params:
                continue
            beta, lr, wd = group["beta"], group["lr"], group["weight_decay"]
            b1 = beta if i == 0 else 1.0  # decay the momentum once per cycle, at its first micro-step
            b2 = (1.0 - beta) / k  # each micro-batch brings 1/k of the averaged gradient
            last = i == k - 1
            if self._use_foreach(group, params):
                for ps, gs, ms in _group_by_device_dtype(params, grads, exp_avgs):
                    if k == 1:
                        torch._foreach_lerp_(ms, gs, 1.0 - beta)  # m ← m + (1 − β)(g − m)
                    else:
                        torch._foreach_mul_(ms, b1)
                        torch._foreach_add_(ms, gs, alpha=b2)
                    if last:
                        torch._foreach_mul_(ps, 1.0 - wd * lr)
                        torch._foreach_add_(ps, torch._foreach_sign(ms), alpha=-lr)
                continue
            for p, g, m in zip(params, grads, exp_avgs):
                if group["lazy"] and p.dim() > 0:
                    rows = touched_rows(g)  # (R_touched,)
                    p_rows, m_rows = p[rows], m[rows]  # gathered copies
                    m_rows.lerp_(g[rows], 1.0 - beta)
                    tiger_update_(p_rows, m_rows, lr=effective_lr(p, lr, group["lr_scale"]), weight_decay=wd)
                    p.index_copy_(0, rows, p_rows)
                    m.index_copy_(0, rows, m_rows)
                    continue
                if k == 1:
                    m.lerp_(g, 1.0 - beta)  # m_t = β m_{t-1} + (1 − β) g_t
                else:
                    m.mul_(b1).add_(g, alpha=b2)
                if last:
                    tiger_update_(p, m, lr=effective_lr(p, lr, group["lr_scale"]), weight_decay=wd)
        return loss


__all__ = ["LR_SCALES", "Tiger", "effective_lr", "tiger_update_"]
