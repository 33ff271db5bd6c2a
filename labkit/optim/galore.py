"""GaLore: AdamW on gradients projected to a low-rank subspace, refreshed by an SVD every T steps.

J. Zhao, Z. Zhang, B. Chen, Z. Wang, A. Anandkumar, Y. Tian. "GaLore: Memory-Efficient LLM
Training by Gradient Low-Rank Projection." ICML 2024, arXiv:2403.03507. Reference code:
`galore_torch` (github.com/jiaweizzhao/GaLore); `GaLoreAdamW` below matches
`galore_torch.GaLoreAdamW` step for step (same SVD, same projection, same update order).

The idea. The gradient G (m, n) of a weight matrix is close to low rank during training. Keep
AdamW's moments not for G but for its coordinates R in an r-dimensional subspace, and map the
normalized update back to (m, n). With m <= n and the "std" rule the subspace is spanned by the
top-r left singular vectors of a recent gradient:

    every T steps (t % T == 0):  U, S, V^T = svd(G_t)          (in float32)
                                 P = U[:, :r]                                  # (m, r)
    R_t = P^T G_t                                                              # (r, n)  project
    M_t = b1 M_{t-1} + (1 - b1) R_t                                            # (r, n)
    V_t = b2 V_{t-1} + (1 - b2) R_t * R_t                                      # (r, n)
    N_t = M_t / (sqrt(V_t) + eps)                                              # (r, n)
    W  <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * alpha * P N_t                 # (m, n)  project back
    W  <- W - lr * wd * W        (decoupled weight decay, applied after the update as in galore_torch)

With m > n the projection acts on the right: Q = V^T[:r] (r, n), R_t = G_t Q^T (m, r) and the
update is alpha * N_t Q. Either way the projector spans the *smaller* side, and the state per
matrix is r * min(m, n) (projector) + 2 r * max(m, n) (moments) instead of AdamW's 2 m n.
The moments are kept as they are when the subspace switches (as in the paper and its code).

Projection rules (`proj_type`, galore_torch's names), for G (m, n):
    "std"          projector on the smaller side: right if m >= n, else left
    "reverse_std"  projector on the larger side: left if m >= n, else right
    "left"         always P (m, r):  R = P^T G (r, n)
    "right"        always Q (r, n):  R = G Q^T (m, r)
    "full"         both:             R = P^T G Q^T (r, r)

GaLore applies to 2-D parameters in groups whose "rank" is an int; other parameters (biases,
norms, rank None) get plain AdamW with the same formula (galore_torch fails on non-2-D
parameters in a GaLore group; here they simply fall back). Where galore_torch's
"reverse_std" crashes (m < n with rank >= m: it re-derives the side from the low-rank shape),
this module keeps the side it chose when projecting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from labkit import _checks
from labkit.optim.adamw import check_adam_hparams

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
_NAME = "GaLoreAdamW"


# --------------------------------------------------------------------------- the projection


def projection_side(shape: tuple[int, ...] | torch.Size, proj_type: str = "std") -> str:
    """Where the projector acts on a gradient of `shape` (m, n): "left", "right" or "full"."""
    if len(shape) != 2:
        raise ValueError(f"projection_side: shape must be 2-D (m, n), got {tuple(shape)}")
    _checks.choice("projection_side", "proj_type", proj_type, PROJ_TYPES)
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def low_rank_basis(grad: torch.Tensor, rank: int, side: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Orthonormal bases from the SVD of grad (m, n): (P (m, r) or None, Q (r, n) or None).

    The SVD runs in float32 (as in galore_torch, also for float64 and bf16 gradients); the
    bases come back in the gradient's dtype. r = min(rank, m, n).
    """
    if side not in ("left", "right", "full"):
        raise ValueError(f"low_rank_basis: side must be 'left', 'right' or 'full', got {side!r}")
    matrix = grad if grad.dtype == torch.float32 else grad.float()  # (m, n)
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, k), (k,), (k, n); k = min(m, n)
    P = _own(U[:, :rank].to(grad.dtype)) if side in ("left", "full") else None  # (m, r)
    Q = _own(Vh[:rank, :].to(grad.dtype)) if side in ("right", "full") else None  # (r, n)
    return P, Q


def _own(basis: torch.Tensor) -> torch.Tensor:
    """A compact copy of a slice of U or V^T, so the state holds r columns, not the whole factor.

    LAPACK returns the factors column-major; the copy keeps that layout (a row-major copy
    changes the matmuls' rounding in float32 and breaks bitwise parity with galore_torch).
    """
    if basis.dim() == 2 and basis.stride(0) == 1:  # column-major (a single row (1, n) too: strides (1, 1))
        out = torch.empty_strided(basis.shape, (1, basis.size(0)), dtype=basis.dtype, device=basis.device)
    else:
        out = torch.empty_like(basis, memory_format=torch.contiguous_format)
    return out.copy_(basis)


def project(grad: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None) -> torch.Tensor:
    """Low-rank coordinates of grad (m, n): P^T G (r, n), G Q^T (m, r) or P^T G Q^T (r, r)."""
    if P is not None and Q is not None:
        return torch.matmul(P.t(), grad) @ Q.t()  # (r, m) (m, n) (n, r) -> (r, r)
    if P is not None:
        return torch.matmul(P.t(), grad)  # (r, m) (m, n) -> (r, n)
    if Q is not None:
        return torch.matmul(grad, Q.t())  # (m, n) (n, r) -> (m, r)
    raise ValueError("project: at least one of P (left basis) and Q (right basis) must be given")


def project_back(low: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None,
                 scale: float = 1.0) -> torch.Tensor:
    """Map low-rank coordinates back to (m, n): scale * (P N, N Q or P N Q)."""
    if P is not None and Q is not None:
        full = torch.matmul(P, low) @ Q  # (m, r) (r, r) (r, n) -> (m, n)
    elif P is not None:
        full = torch.matmul(P, low)  # (m, r) (r, n) -> (m, n)
    elif Q is not None:
        full = torch.matmul(low, Q)  # (m, r) (r, n) -> (m, n)
    else:
        raise ValueError("project_back: at least one of P (left basis) and Q (right basis) must be given")
    return full * scale


def captured_fraction(grad: torch.Tensor, P: torch.Tensor | None, Q: torch.Tensor | None) -> float:
    """||project(G)|| / ||G||: the share of a gradient's norm the subspace keeps (1.0 for G = 0)."""
    total = grad.float().norm()
    if total == 0:
        return 1.0
    return (project(grad.float(), None if P is None else P.float(), None if Q is None else Q.float()).norm()
            / total).item()


# --------------------------------------------------------------------------- the optimizer


def _uses_galore(group: dict, p: torch.Tensor) -> bool:
    """GaLore for 2-D, non-empty parameters of a group with an int rank; plain AdamW otherwise."""
    return group["rank"] is not None and p.dim() == 2 and p.numel() > 0


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in a rank-r projection of each matrix gradient (see module docstring).

    Param groups may override any hyperparameter, galore_torch style:
        GaLoreAdamW([{"params": others, "rank": None},
                     {"params": matrices, "rank": 128, "update_proj_gap": 200, "scale": 0.25}], ...)
    rank: int >= 1, or None for plain AdamW; update_proj_gap: SVD refresh period T (steps);
    scale: alpha, multiplies the projected-back update; proj_type: one of PROJ_TYPES.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, rank: int | None, update_proj_gap: int, scale: float,
                 proj_type: str = "std"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        self._validate(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict) -> None:
        check_adam_hparams(_NAME, group)
        if group["rank"] is not None:
            _checks.integer(_NAME, "rank", group["rank"], low=1)
        _checks.integer(_NAME, "update_proj_gap", group["update_proj_gap"], low=1)
        _checks.number(_NAME, "scale", group["scale"], low=0.0)
        _checks.choice(_NAME, "proj_type", group["proj_type"], PROJ_TYPES)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults
        self._validate(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad  # (m, n) for a matrix
                if grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0  # a Python int, as in galore_torch

                galore = _uses_galore(group, p)
                if galore:  # 1. project: new basis every update_proj_gap steps (and at the first)
                    side = projection_side(p.shape, group["proj_type"])
                    if ("P" not in state and "Q" not in state) or state["step"] % group["update_proj_gap"] == 0:
                        P, Q = low_rank_basis(grad, group["rank"], side)  # (m, r) | None, (r, n) | None
                        for key, basis in (("P", P), ("Q", Q)):
                            if basis is not None:
                                state[key] = basis
                    P, Q = state.get("P"), state.get("Q")
                    grad = project(grad, P, Q)  # (r, n), (m, r) or (r, r)

                if "exp_avg" not in state:  # 2. moments, shaped like the (projected) gradient
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]

                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # M_t
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # V_t
                denom = exp_avg_sq.sqrt().add_(eps)  # sqrt(V_t) + eps (eps outside the bias correction)
                step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                update = exp_avg / denom  # N_t, low-rank for a GaLore matrix

                if galore:  # 3. back to the weight's shape, times alpha
                    update = project_back(update, P, Q, group["scale"])  # (m, n)
                p.add_(update, alpha=-step_size)
                if wd > 0.0:  # 4. decoupled weight decay, after the update (galore_torch's order)
                    p.add_(p, alpha=-lr * wd)
        return loss


def galore_param_groups(model: nn.Module, *, rank: int, update_proj_gap: int = 200, scale: float = 0.25,
                        proj_type: str = "std", **others) -> list[dict]:
    """Two param groups: the 2-D weights of nn.Linear layers (GaLore) and everything else (AdamW).

    A Linear weight tied to an nn.Embedding (a tied output head) stays with the others, as do
    biases and norms; this is the paper's choice of attention and MLP matrices. `others` are
    extra keys for the AdamW group (e.g. lr=...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"galore_param_groups: model must be an nn.Module, got {type(model).__name__}")
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = {id(m.weight): m.weight for m in model.modules()
                if isinstance(m, nn.Linear) and id(m.weight) not in embedded and m.weight.requires_grad}
    rest = [p for p in model.parameters() if id(p) not in matrices]  # parameters() yields a tied weight once
    galore = dict(params=list(matrices.values()), rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                  proj_type=proj_type)
    return [g for g in (dict(params=rest, rank=None, **others), galore) if g["params"]]


__all__ = ["GaLoreAdamW", "PROJ_TYPES", "captured_fraction", "galore_param_groups", "low_rank_basis",
           "project", "project_back", "projection_side"]
