"""Lion: EvoLved Sign Momentum, an optimizer found by program search.

X. Chen, C. Liang, D. Huang, E. Real, K. Wang, Y. Liu, H. Pham, X. Dong, T. Luong, C.-J. Hsieh,
Y. Lu, Q. V. Le. *Symbolic Discovery of Optimization Algorithms.* NeurIPS 2023, arXiv:2302.06675.
J. Su. *Lion/Tiger optimizer: Embedding anomalies and countermeasures* (kexue.fm/archives/9736, 2023)
for the `lazy` option.

For a parameter θ with gradient g, Lion keeps ONE state tensor m (AdamW keeps two) and does

    c_t = β1·m_{t-1} + (1 − β1)·g_t           mostly the momentum, a little of the new gradient
    θ_t = θ_{t-1}·(1 − η·λ) − η·sign(c_t)     decoupled weight decay, then exactly ±η per coordinate
    m_t = β2·m_{t-1} + (1 − β2)·g_t           the momentum remembers longer (β2 > β1)

Every coordinate with c ≠ 0 moves by exactly η: the update has RMS 1 per element whatever the
gradient's scale, while AdamW's m̂/√v̂ is usually well below 1. Hence the paper's advice: an
η 3-10x smaller than AdamW's and a λ 3-10x larger (so that η·λ, the decay per step, stays alike).
sign(0) = 0: a coordinate whose c is exactly zero gets only the weight decay.

Conventions match `lion_pytorch.Lion` (lucidrains, 0.2.x): defaults lr=1e-4, betas=(0.9, 0.99),
weight decay multiplied by lr, applied to θ_{t-1} before the sign step; state key "exp_avg".

`lazy=True` (per param group, meant for embedding tables) updates only the rows (slices along
dim 0) whose gradient is not all zero: momentum, sign step and weight decay all skip a row that
saw no gradient this step. Without it, a rare token's row keeps receiving sign(m) = ±1 steps for
thousands of steps after each appearance, since the momentum decays but its sign does not.

Also here: `interpolation_trace` (Lion's two recurrences on a 1-D gradient sequence, for the
chapter's sign-pattern panel) and `flip_rate`. The memory an optimizer holds is measured by
labkit.optim.memory (`state_bytes`, `grad_bytes`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch

from labkit import _checks

_NAME = "Lion"


# --- helpers --------------------------------------------------------------------------------


def _flag(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _foreach_flag(owner: str, value) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{owner}: foreach must be None or a bool, got {type(value).__name__} {value!r}")
    return value


def touched_rows(grad: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (slices along dim 0) of `grad` that are not all zero: (R_touched,) long."""
    flat = grad.reshape(grad.shape[0], -1)  # (R, rest)
    return flat.ne(0).any(dim=1).nonzero().squeeze(1)  # (R_touched,)


def _group_by_device_dtype(*lists: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], ...]]:
    """Split parallel tensor lists by (device, dtype): foreach kernels want uniform lists."""
    buckets: dict = defaultdict(lambda: tuple([] for _ in lists))
    for items in zip(*lists):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for out, t in zip(bucket, items):
            out.append(t)
    return list(buckets.values())


# --- the update -----------------------------------------------------------------------------


def lion_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, *, lr: float,
                 beta1: float, beta2: float, weight_decay: float) -> None:
    """One Lion step on one tensor, in place (param and exp_avg have grad's shape)."""
    param.mul_(1.0 - lr * weight_decay)  # decoupled weight decay on θ_{t-1}
    c = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1)  # c_t, a temporary
    param.add_(c.sign_(), alpha=-lr)  # ±lr per coordinate (0 where c_t == 0)
    exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)  # m_t


def _lion_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], *,
                         lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """`lion_update_` on lists of same-device, same-dtype tensors with a few fused kernels."""
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(c)
    torch._foreach_add_(params, c, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, one state tensor per parameter.

    lr: step size η (each coordinate moves by exactly η); betas: (β1 of the interpolation, β2 of
    the momentum); weight_decay: λ, decoupled and multiplied by lr. lazy: update only the rows
    with a nonzero gradient (for embedding tables; set it on their param group). foreach: use
    fused multi-tensor kernels (None: on CUDA); lazy groups always take the per-tensor path.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, lazy: bool = False, foreach: bool | None = None):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, lazy=lazy)
        self._check_group(defaults)
        self.foreach = _foreach_flag(_NAME, foreach)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict) -> None:
        group["lr"] = _checks.number(_NAME, "lr", group["lr"], low=0.0, low_open=True)
        group["betas"] = _checks.betas(_NAME, group["betas"])
        group["weight_decay"] = _checks.number(_NAME, "weight_decay", group["weight_decay"], low=0.0)
        _flag(_NAME, "lazy", group["lazy"])

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])  # a group's own values are checked too

    def _use_foreach(self, params: list[torch.Tensor]) -> bool:
        if self.foreach is not None:
            return self.foreach
        return all(p.is_cuda for p in params)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One Lion step for every parameter that has a gradient; returns closure()'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{_NAME}: sparse gradients are not supported (use lazy=True with a "
                                     f"dense nn.Embedding gradient), got a sparse grad of shape {tuple(p.shape)}")
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)  # m_0 = 0, same shape/dtype/device as θ
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            hp = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            if not group["lazy"] and self._use_foreach(params):
                for ps, gs, ms in _group_by_device_dtype(params, grads, exp_avgs):
                    _lion_update_foreach(ps, gs, ms, **hp)
                continue
            for p, g, m in zip(params, grads, exp_avgs):
                if group["lazy"] and p.dim() > 0:
                    rows = touched_rows(g)  # (R_touched,)
                    p_rows, m_rows = p[rows], m[rows]  # gathered copies
                    lion_update_(p_rows, g[rows], m_rows, **hp)
                    p.index_copy_(0, rows, p_rows)
                    m.index_copy_(0, rows, m_rows)
                else:
                    lion_update_(p, g, m, **hp)
        return loss


# --- looking inside: the sign pattern and the memory ------------------------------------------


def interpolation_trace(grads, beta1: float = 0.9, beta2: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """Lion's recurrences on a gradient sequence g_1..g_T (T,): returns (c, m), both (T,).

    c[t] = β1·m[t-1] + (1 − β1)·g[t] is what Lion takes the sign of at step t; m[t] is the
    momentum after step t (m[-1] = 0). float64, no parameter involved.
    """
    b1 = _checks.number("interpolation_trace", "beta1", beta1, low=0.0, high=1.0, high_open=True)
    b2 = _checks.number("interpolation_trace", "beta2", beta2, low=0.0, high=1.0, high_open=True)
    g = torch.as_tensor(grads, dtype=torch.float64)
    if g.dim() != 1:
        raise ValueError(f"interpolation_trace: grads must be 1-D (T,), got shape {tuple(g.shape)}")
    c, m = torch.empty_like(g), torch.empty_like(g)
    prev = 0.0
    for t, gt in enumerate(g.tolist()):  # T is small (a few hundred): plain floats are fastest
        c[t] = b1 * prev + (1 - b1) * gt
        prev = b2 * prev + (1 - b2) * gt
        m[t] = prev
    return c, m


def flip_rate(x: torch.Tensor) -> float:
    """Fraction of consecutive steps at which sign(x) changes (x: (T,) with T >= 2)."""
    s = torch.sign(torch.as_tensor(x))
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"flip_rate: x must be 1-D with at least 2 entries, got shape {tuple(s.shape)}")
    return (s[1:] != s[:-1]).double().mean().item()


__all__ = ["Lion", "flip_rate", "interpolation_trace", "lion_update_", "touched_rows"]
