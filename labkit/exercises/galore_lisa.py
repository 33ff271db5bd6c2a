"""Exercises of chapter 06-galore-lisa (registered on import; graded by labkit.check).

    galore-lisa.project_gradient  fn(grad, old_grad, rank) -> (back-projected grad (m, n), captured fraction)
    galore-lisa.state_bytes       fn(m, n, rank, bytes_per_value) -> (AdamW bytes, GaLore bytes)
    galore-lisa.lisa_memory       fn(n_layer, layer_params, other_params, n_active, grad_bytes, state_bytes)
                                  -> (full AdamW bytes, LISA bytes) of gradients + Adam moments
    galore-lisa.training_bytes    fn(n_params, weight_bytes, grad_bytes, state_bytes, n_states, master_weights)
                                  -> {"weights", "master", "grads", "optimizer"} in bytes
"""

from __future__ import annotations

import torch

from labkit.exercises import Exercise, register
from labkit.optim import galore, memory

# --- galore-lisa.project_gradient -------------------------------------------------------------


def project_gradient(grad: torch.Tensor, old_grad: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Reference: project grad (m, n) on the rank-r GaLore subspace of old_grad ("std" rule) and back.

    Returns (the back-projection P P^T G or G Q^T Q, ||back|| / ||grad||).
    """
    side = galore.projection_side(grad.shape, "std")
    P, Q = galore.low_rank_basis(old_grad.double(), rank, side)
    back = galore.project_back(galore.project(grad.double(), P, Q), P, Q).to(grad.dtype)  # (m, n)
    return back, (back.double().norm() / grad.double().norm()).item()


def _low_rank_like(m: int, n: int, r: int, g: torch.Generator) -> torch.Tensor:
    """A random (m, n) float64 matrix that is nearly rank r, as gradients are: singular values from 1 down
    to 0.5 for the first r, then 0.1, 0.05, ... (a clear gap, so the top-r subspace is well defined)."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))  # (m, k)
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))  # (n, k)
    i = torch.arange(k, dtype=torch.float64)
    s = torch.where(i < r, 1 - 0.5 * i / max(r, 1), 0.1 * 0.5 ** (i - r))  # (k,)
    return (U * s) @ V.T  # (m, n)


def _project_cases(rng):
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))

    def case(m, n, rank, drift):
        old = _low_rank_like(m, n, rank, g)
        new = old + drift * torch.randn(m, n, generator=g, dtype=torch.float64) / (m * n) ** 0.5
        return dict(grad=new, old_grad=old, rank=rank)

    yield case(6, 4, 2, 0.0)  # tall: the projector acts on the right
    yield case(4, 6, 2, 0.0)  # wide: on the left
    yield case(5, 5, 3, 0.1)  # square
    yield case(3, 8, 5, 0.1)  # rank >= min(m, n): nothing is lost
    yield case(1, 7, 1, 0.2)  # a single row
    for _ in range(10):
        m, n = rng.randint(2, 24), rng.randint(2, 24)
        yield case(m, n, rng.randint(1, min(m, n)), rng.choice([0.0, 0.05, 0.3]))


register(Exercise(
    name="galore-lisa.project_gradient",
    reference=project_gradient,
    cases=_project_cases,
    rtol=1e-4, atol=1e-5,
    hint="m >= n: Q = the first r rows of V^T from svd(old_grad), back = grad @ Q.T @ Q; m < n: P = the first r "
         "columns of U, back = P @ P.T @ grad. The fraction is back.norm() / grad.norm().",
))

# --- galore-lisa.state_bytes --------------------------------------------------------------------


def state_bytes(m: int, n: int, rank: int, bytes_per_value: float) -> tuple[float, float]:
    """Reference: optimizer-state bytes of AdamW and of GaLoreAdamW ("std") for one (m, n) weight."""
    adamw = memory.param_state_bytes((m, n), "adamw", state_dtype=bytes_per_value)
    galore_ = memory.param_state_bytes((m, n), "galore_adamw", state_dtype=bytes_per_value, rank=rank)
    return adamw, galore_


def _state_cases(rng):
    yield dict(m=4096, n=4096, rank=1024, bytes_per_value=2)  # a 7B attention matrix
    yield dict(m=11008, n=4096, rank=1024, bytes_per_value=2)  # a 7B MLP matrix (tall)
    yield dict(m=4096, n=11008, rank=1024, bytes_per_value=4)  # wide
    yield dict(m=64, n=256, rank=512, bytes_per_value=4)  # rank above min(m, n): r = 64
    yield dict(m=1, n=1, rank=1, bytes_per_value=1)
    for _ in range(15):
        yield dict(m=rng.randint(1, 8192), n=rng.randint(1, 8192), rank=rng.choice([4, 64, 128, 256, 1024]),
                   bytes_per_value=rng.choice([1, 2, 4]))


register(Exercise(
    name="galore-lisa.state_bytes",
    reference=state_bytes,
    cases=_state_cases,
    rtol=1e-12, atol=0.0,
    hint="AdamW: two moments of m*n values. GaLore: r = min(rank, m, n); a projector of r*min(m, n) values and two "
         "moments of r*max(m, n) values. Multiply by bytes_per_value.",
))

# --- galore-lisa.lisa_memory --------------------------------------------------------------------


def lisa_memory(n_layer: int, layer_params: int, other_params: int, n_active: int, grad_bytes: float,
                state_bytes: float) -> tuple[float, float]:
    """Reference: bytes of gradients + two Adam moments, training everything vs LISA (n_active blocks
    plus the always-trainable embedding / head / norms, `other_params` in all)."""
    per_param = grad_bytes + 2 * state_bytes
    return (n_layer * layer_params + other_params) * per_param, (n_active * layer_params + other_params) * per_param


def _lisa_cases(rng):
    layer7b, other7b = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096, 2 * 32000 * 4096 + 4096
    yield dict(n_layer=32, layer_params=layer7b, other_params=other7b, n_active=2, grad_bytes=2, state_bytes=2)
    yield dict(n_layer=32, layer_params=layer7b, other_params=other7b, n_active=32, grad_bytes=2, state_bytes=4)
    yield dict(n_layer=4, layer_params=100, other_params=0, n_active=0, grad_bytes=4, state_bytes=4)
    for _ in range(12):
        L = rng.randint(1, 96)
        yield dict(n_layer=L, layer_params=rng.randint(1, 10**9), other_params=rng.randint(0, 10**9),
                   n_active=rng.randint(0, L), grad_bytes=rng.choice([2, 4]), state_bytes=rng.choice([1, 2, 4]))


register(Exercise(
    name="galore-lisa.lisa_memory",
    reference=lisa_memory,
    cases=_lisa_cases,
    rtol=1e-12, atol=0.0,
    hint="Every trainable parameter holds a gradient and two moments: grad_bytes + 2 * state_bytes. Full: all "
         "n_layer blocks plus the rest; LISA: n_active blocks plus the rest.",
))

# --- galore-lisa.training_bytes -----------------------------------------------------------------


def training_bytes(n_params: int, weight_bytes: float, grad_bytes: float, state_bytes: float, n_states: int,
                   master_weights: bool) -> dict[str, float]:
    """Reference: weights, fp32 master copy, gradients and optimizer states of training n_params."""
    return {"weights": n_params * weight_bytes, "master": n_params * 4 if master_weights else 0,
            "grads": n_params * grad_bytes, "optimizer": n_params * n_states * state_bytes}


def _training_cases(rng):
    n7b = 6_738_415_616
    yield dict(n_params=n7b, weight_bytes=2, grad_bytes=2, state_bytes=2, n_states=2, master_weights=False)  # GaLore's
    yield dict(n_params=n7b, weight_bytes=2, grad_bytes=2, state_bytes=4, n_states=2, master_weights=True)  # ZeRO's 16
    yield dict(n_params=n7b, weight_bytes=2, grad_bytes=2, state_bytes=2, n_states=1, master_weights=False)  # Lion
    yield dict(n_params=0, weight_bytes=4, grad_bytes=4, state_bytes=4, n_states=0, master_weights=True)
    for _ in range(12):
        yield dict(n_params=rng.randint(1, 10**11), weight_bytes=rng.choice([1, 2, 4]), grad_bytes=rng.choice([2, 4]),
                   state_bytes=rng.choice([1, 2, 4]), n_states=rng.randint(0, 3), master_weights=rng.random() < 0.5)


register(Exercise(
    name="galore-lisa.training_bytes",
    reference=training_bytes,
    cases=_training_cases,
    rtol=1e-12, atol=0.0,
    hint="Four terms, each n_params times a byte count: the weights, an fp32 copy (4 bytes) only with "
         "master_weights, one gradient, and n_states optimizer states.",
))

__all__ = ["lisa_memory", "project_gradient", "state_bytes", "training_bytes"]
