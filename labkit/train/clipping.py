"""Gradient-norm clipping: one norm for the whole model (global) or one per tensor (local).

R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training recurrent neural networks",
ICML 2013 (norm clipping against exploding gradients: rescale g when ||g|| exceeds a threshold).
J. Zhang, T. He, S. Sra, A. Jadbabaie, "Why gradient clipping accelerates training: a theoretical
justification for adaptivity", ICLR 2020 (under (L0, L1)-smoothness, ||∇²f|| ≤ L0 + L1·||∇f||,
clipped gradient descent converges faster than any fixed step size: the step must shrink where the
gradient, and with it the curvature, is large).
Production implementation matched here: `torch.nn.utils.clip_grad_norm_`.

The gradients g_1, ..., g_n of a model's n parameter tensors, and a threshold c = max_norm:

    global:  N = ||(||g_1||_p, ..., ||g_n||_p)||_p        one norm, as if all g_i were one vector
             g_i ← g_i · min(1, c / (N + 1e-6))          the same factor for every tensor
    local:   N_i = ||g_i||_p                              one norm per tensor
             g_i ← g_i · min(1, c / (N_i + 1e-6))        each tensor on its own

(p = 2 by default; p = inf takes the largest |entry|.) The 1e-6 is torch's guard against a zero
norm. Global clipping multiplies the whole update by one positive number: the direction of
gradient descent is kept and only its length is capped, so the cosine between the clipped and the
raw gradient is exactly 1. Local clipping caps each tensor separately: a layer with a large
gradient is shrunk while its neighbours are not, which changes the direction (cosine < 1 as soon
as some, but not all, tensors are clipped by different factors) and bounds every layer's step,
so one exploding layer can neither dominate the update nor, through the global factor, starve
the others of theirs.

Non-finite gradients are handled as torch handles them: the norm is nan or inf, the factor
c / (inf + 1e-6) = 0 (or nan), and the gradients become 0, nan (from inf · 0) or nan; with
error_if_nonfinite=True a RuntimeError is raised before anything is modified.

`foreach` picks torch's multi-tensor kernels (`torch._foreach_norm`, `torch._foreach_mul_`, one
launch per device and dtype) or a Python loop over tensors; None uses them where they exist
(plain tensors on cpu / cuda / xpu). The numbers are the same either way.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable

import torch

from labkit import _checks

NAME = "clip_grad_norm_"
MODES = ("global", "local")
CLIP_EPS = 1e-6  # torch's guard: c / (N + 1e-6)
_FOREACH_DEVICES = ("cpu", "cuda", "xpu")


# --- helpers ----------------------------------------------------------------------------------


def _as_tensors(owner: str, name: str, tensors) -> list[torch.Tensor]:
    """A tensor or an iterable of tensors -> a list (an empty generator warns, as torch does)."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"{owner}: {name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    is_generator = isinstance(tensors, types.GeneratorType)
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}: {name} must hold tensors, got {type(t).__name__} at index {i}")
    if is_generator and not out:
        warnings.warn(f"{owner}: `{name}` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return out


def check_norm_type(owner: str, norm_type) -> float:
    """p >= 1 (a norm), inf included; the string 'inf' is accepted as torch accepts it."""
    if isinstance(norm_type, str) and norm_type.strip().lower() == "inf":
        return math.inf
    return _checks.number(owner, "norm_type", norm_type, low=1.0)


def _check_foreach(owner: str, foreach) -> None:
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"{owner}: foreach must be None or a bool, got {type(foreach).__name__} {foreach!r}")


def _groups(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the tensors per (device, dtype), groups in order of first appearance."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _use_foreach(foreach: bool | None, device: torch.device, tensors: list[torch.Tensor]) -> bool:
    """torch's rule: None -> multi-tensor kernels where supported; True -> required; False -> a loop."""
    supported = device.type in _FOREACH_DEVICES and not torch.jit.is_scripting()
    if foreach is None:
        return supported and all(type(t) is torch.Tensor for t in tensors)  # subclasses: the loop
    if foreach and not supported:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return foreach


# --- norms ------------------------------------------------------------------------------------


def _grouped_norms(tensors: list[torch.Tensor], p: float, foreach) -> tuple[list[int], list[torch.Tensor]]:
    """Per-tensor p-norms, in grouped order (torch's order); returns (input indices, norms)."""
    order: list[int] = []
    norms: list[torch.Tensor] = []
    for (device, _), idx in _groups(tensors).items():
        ts = [tensors[i] for i in idx]
        if _use_foreach(foreach, device, ts):
            norms.extend(torch._foreach_norm(ts, p))
        else:
            norms.extend(torch.linalg.vector_norm(t, p) for t in ts)
        order.extend(idx)
    return order, norms


def _norm_args(owner: str, tensors, norm_type, foreach) -> tuple[list[torch.Tensor], float]:
    """The checked arguments shared by tensor_norms and global_norm: (tensors, p)."""
    tensors = _as_tensors(owner, "tensors", tensors)
    p = check_norm_type(owner, norm_type)
    _check_foreach(owner, foreach)
    return tensors, p


@torch.no_grad()
def tensor_norms(tensors, norm_type: float = 2.0, foreach: bool | None = None) -> torch.Tensor:
    """||t_i||_p of every tensor, in input order: a (n,) tensor on the first tensor's device.

    Empty input: a (0,) float32 tensor. Norms of mixed dtypes are promoted by torch.stack."""
    tensors, p = _norm_args("tensor_norms", tensors, norm_type, foreach)
    if not tensors:
        return torch.zeros(0)
    order, norms = _grouped_norms(tensors, p, foreach)
    by_index = dict(zip(order, norms))
    first = tensors[0].device
    return torch.stack([by_index[i].to(first) for i in range(len(tensors))])  # (n,)


@torch.no_grad()
def global_norm(tensors, norm_type: float = 2.0, foreach: bool | None = None) -> torch.Tensor:
    """||(||t_1||_p, ..., ||t_n||_p)||_p = the p-norm of all entries as one vector (0-d tensor).

    Computed as torch computes it (per-tensor norms, then the norm of their stack), so the value
    matches `torch.nn.utils.get_total_norm` bit for bit. Empty input: tensor(0.)."""
    tensors, p = _norm_args("global_norm", tensors, norm_type, foreach)
    if not tensors:
        return torch.tensor(0.0)
    _, norms = _grouped_norms(tensors, p, foreach)
    first = tensors[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), p)  # ()


def clip_coefficient(norm: torch.Tensor | float, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)): the factor a gradient of this norm is multiplied by.

    Works elementwise on a tensor of norms (local clipping) as on one total norm (global)."""
    max_norm = _checks.number("clip_coefficient", "max_norm", max_norm, low=0.0)
    norm = torch.as_tensor(norm)
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


# --- clipping ---------------------------------------------------------------------------------


def _scale_(grads: list[torch.Tensor], coefs: list[torch.Tensor], foreach) -> None:
    """grads[i] *= coefs[i] in place (0-d coefficients), grouped by device and dtype."""
    for (device, _), idx in _groups(grads).items():
        gs = [grads[i] for i in idx]
        cs = [coefs[i].to(device) for i in idx]
        if _use_foreach(foreach, device, gs):
            if all(c is cs[0] for c in cs):          # global: one coefficient for the group
                torch._foreach_mul_(gs, cs[0])
            else:
                torch._foreach_mul_(gs, cs)
        else:
            for g, c in zip(gs, cs):
                g.mul_(c)


def _nonfinite_error(p: float, which: str) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {p} for gradients from `parameters` is non-finite{which}, so it cannot be "
        "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
        "`error_if_nonfinite=False`")


@torch.no_grad()
def clip_tensors_(tensors: list[torch.Tensor], max_norm: float, p: float = 2.0, mode: str = "global",
                  error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """Clip a list of gradient tensors in place (the arguments already checked); see clip_grad_norm_."""
    if mode == "global":
        total = global_norm(tensors, p, foreach)                         # ()
        if error_if_nonfinite and not torch.isfinite(total):
            raise _nonfinite_error(p, "")
        if tensors:
            coef = clip_coefficient(total, max_norm)                     # (), on the first tensor's device
            _scale_(tensors, [coef] * len(tensors), foreach)
        return total
    norms = tensor_norms(tensors, p, foreach)                            # (k,)
    if error_if_nonfinite and norms.numel() and not torch.isfinite(norms).all():
        bad = int((~torch.isfinite(norms)).nonzero()[0])
        raise _nonfinite_error(p, f" (the gradient of parameter {bad} of those with a gradient)")
    if tensors:
        coefs = clip_coefficient(norms, max_norm)                        # (k,)
        _scale_(tensors, list(coefs.unbind(0)), foreach)
    return norms


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, mode: str = "global",
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """Clip the gradients of `parameters` in place; return the norm(s) measured before clipping.

    mode="global": one factor min(1, max_norm / (N + 1e-6)) for all gradients, N their total
    p-norm; returns N, a 0-d tensor (torch.nn.utils.clip_grad_norm_'s behaviour and value).
    mode="local": each gradient g_i clipped to its own norm N_i; returns (N_1, ..., N_k), a (k,)
    tensor over the k parameters that have a gradient, in order.
    Parameters whose .grad is None are skipped. error_if_nonfinite: raise RuntimeError (and modify
    nothing) if a norm is nan or inf; otherwise the gradients are scaled by the non-finite factor.
    """
    params = _as_tensors(NAME, "parameters", parameters)
    max_norm = _checks.number(NAME, "max_norm", max_norm, low=0.0)
    p = check_norm_type(NAME, norm_type)
    _checks.choice(NAME, "mode", mode, MODES)
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError(f"{NAME}: error_if_nonfinite must be a bool, got {type(error_if_nonfinite).__name__} "
                        f"{error_if_nonfinite!r}")
    _check_foreach(NAME, foreach)
    grads = [q.grad for q in params if q.grad is not None]
    return clip_tensors_(grads, max_norm, p, mode, error_if_nonfinite, foreach)


def clipped(tensors, max_norm: float, norm_type: float = 2.0, mode: str = "global") -> list[torch.Tensor]:
    """Clipped copies of `tensors` (treated as gradients); the inputs are not modified."""
    tensors = [t.detach().clone() for t in _as_tensors("clipped", "tensors", tensors)]
    max_norm = _checks.number("clipped", "max_norm", max_norm, low=0.0)
    p = check_norm_type("clipped", norm_type)
    _checks.choice("clipped", "mode", mode, MODES)
    clip_tensors_(tensors, max_norm, p, mode)
    return tensors


@torch.no_grad()
def cosine(xs, ys) -> float:
    """Cosine between two lists of tensors, each list flattened into one vector (nan if one is 0)."""
    xs = _as_tensors("cosine", "xs", xs)
    ys = _as_tensors("cosine", "ys", ys)
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        raise ValueError(f"cosine: xs and ys must be lists of tensors of the same shapes, got "
                         f"{[tuple(x.shape) for x in xs]} and {[tuple(y.shape) for y in ys]}")
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(xs, ys))
    nx = math.sqrt(sum(float(x.double().pow(2).sum()) for x in xs))
    ny = math.sqrt(sum(float(y.double().pow(2).sum()) for y in ys))
    return dot / (nx * ny) if nx > 0 and ny > 0 else math.nan


__all__ = ["CLIP_EPS", "MODES", "check_norm_type", "clip_coefficient", "clip_grad_norm_", "clip_tensors_", "clipped",
           "cosine", "global_norm", "tensor_norms"]
