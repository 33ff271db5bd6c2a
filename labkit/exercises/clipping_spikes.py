"""Exercises of chapter 07-clipping-spikes (registered on import; graded by labkit.check).

    clipping_spikes.global_coefficient  fn(norms, max_norm) -> the factor global clipping multiplies every gradient by
    clipping_spikes.clip_local          fn(grads, max_norm) -> new tensors, each clipped to its own 2-norm
    clipping_spikes.mad_score           fn(history, loss) -> the robust z-score of loss against the window
    clipping_spikes.bad_batch_response  fn(beta1, beta2, r, steps) -> Adam's |update|/lr for k steps after one bad batch
"""

from __future__ import annotations

import torch

from labkit.exercises import Exercise, register
from labkit.train import clipping
from labkit.train import spikes

# --- clipping_spikes.global_coefficient ------------------------------------------------------------


def global_coefficient(norms: list[float], max_norm: float) -> float:
    """Reference: min(1, max_norm / (||(n_1, ..., n_k)||_2 + 1e-6)) for the per-tensor 2-norms n_i."""
    total = clipping.global_norm([torch.tensor(norms, dtype=torch.float64)])
    return clipping.clip_coefficient(total, max_norm).item()


def _coefficient_cases(rng):
    yield dict(norms=[3.0, 4.0], max_norm=1.0)          # total 5: factor ~0.2
    yield dict(norms=[0.3, 0.4], max_norm=1.0)          # total 0.5 < 1: factor exactly 1 (never amplify)
    yield dict(norms=[], max_norm=1.0)                  # no gradients: total 0, factor 1
    yield dict(norms=[0.0, 0.0], max_norm=0.5)
    yield dict(norms=[2.0], max_norm=0.0)               # max_norm 0 zeroes everything
    yield dict(norms=[1e6, 1e-3, 2.0], max_norm=1.0)    # one exploding layer sets the factor for all
    for _ in range(14):
        k = rng.randint(1, 30)
        scale = 10 ** rng.uniform(-4, 3)
        yield dict(norms=[scale * rng.expovariate(1.0) for _ in range(k)], max_norm=10 ** rng.uniform(-2, 1))


register(Exercise(
    name="clipping_spikes.global_coefficient",
    reference=global_coefficient,
    cases=_coefficient_cases,
    rtol=1e-9, atol=0.0,
    hint="The total norm is sqrt(n_1^2 + ... + n_k^2), the norm of all gradients as one vector (not the sum "
         "of the norms); the factor is max_norm / (total + 1e-6), capped at 1 so small gradients are never scaled up.",
))

# --- clipping_spikes.clip_local -------------------------------------------------------------------


def clip_local(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Reference: each g_i * min(1, max_norm / (||g_i||_2 + 1e-6)), as new tensors."""
    return clipping.clipped(grads, max_norm, 2.0, mode="local")


def _tensor(rng, shape, scale):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _local_cases(rng):
    yield dict(grads=[torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([0.3, 0.4], dtype=torch.float64)],
               max_norm=1.0)                                            # one clipped, one untouched
    yield dict(grads=[torch.zeros(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)], max_norm=1.0)
    yield dict(grads=[torch.zeros(0, dtype=torch.float64), torch.full((4,), 10.0, dtype=torch.float64)],
               max_norm=2.0)                                            # a zero-size tensor
    yield dict(grads=[], max_norm=1.0)
    for _ in range(12):
        k = rng.randint(1, 6)
        shapes = [rng.choice([(5,), (3, 4), (2, 3, 2), (1,)]) for _ in range(k)]
        yield dict(grads=[_tensor(rng, s, 10 ** rng.uniform(-3, 2)) for s in shapes], max_norm=10 ** rng.uniform(-2, 1))


register(Exercise(
    name="clipping_spikes.clip_local",
    reference=clip_local,
    cases=_local_cases,
    rtol=1e-9, atol=1e-15,
    hint="For each tensor on its own: n = its 2-norm (g.norm()), factor = min(1, max_norm / (n + 1e-6)), return "
         "g * factor (a new tensor; leave the input alone). Return a list in the same order, [] for [].",
))

# --- clipping_spikes.mad_score --------------------------------------------------------------------


def mad_score(history: list[float], loss: float) -> float:
    """Reference: (loss − median(h)) / (1.4826 · median(|h − median(h)|)); an even-length median averages the
    two middle values."""
    return spikes.mad_score(history, loss)


def _mad_cases(rng):
    yield dict(history=[1.0, 2.0, 3.0], loss=10.0)                    # odd length: median 2, MAD 1
    yield dict(history=[1.0, 2.0, 3.0, 4.0], loss=2.5)                # even length: median 2.5 -> 0
    yield dict(history=[2.0, 2.1, 1.9, 2.05, 50.0, 1.95], loss=2.5)   # an old spike in the window barely matters
    yield dict(history=[3.0, 2.9, 3.1, 3.05], loss=2.0)               # below the median: a negative score
    for _ in range(14):
        n = rng.randint(3, 60)
        level, noise = rng.uniform(0.5, 5.0), 10 ** rng.uniform(-3, -0.5)
        history = [level + noise * rng.gauss(0, 1) for _ in range(n)]
        if rng.random() < 0.5:
            history[rng.randrange(n)] += 20 * noise                      # a spike inside the window
        yield dict(history=history, loss=level + noise * rng.uniform(-3, 30))


register(Exercise(
    name="clipping_spikes.mad_score",
    reference=mad_score,
    cases=_mad_cases,
    rtol=1e-9, atol=1e-12,
    hint="m = median(history) (even length: the mean of the two middle values, as statistics.median does); "
         "MAD = median(|h - m| for h in history); score = (loss - m) / (1.4826 * MAD).",
))

# --- clipping_spikes.bad_batch_response -----------------------------------------------------------


def bad_batch_response(beta1: float, beta2: float, r: float, steps: int) -> list[float]:
    """Reference: u_k = (1−β1)β1^k·r / √(1 + (1−β2)β2^k(r² − 1)), k = 0..steps−1."""
    return spikes.adam_bad_batch_response(beta1, beta2, r, steps)


def _response_cases(rng):
    yield dict(beta1=0.9, beta2=0.999, r=1.0, steps=5)      # no jump: just the momentum's decay
    yield dict(beta1=0.9, beta2=0.999, r=1000.0, steps=30)  # u_0 -> 0.1 / sqrt(0.001) = 3.16
    yield dict(beta1=0.9, beta2=0.95, r=1000.0, steps=30)   # u_0 -> 0.45
    yield dict(beta1=0.0, beta2=0.99, r=10.0, steps=3)      # no momentum: only step 0 moves
    for _ in range(10):
        yield dict(beta1=rng.choice([0.0, 0.5, 0.9, 0.95]), beta2=rng.choice([0.9, 0.95, 0.98, 0.99, 0.999]),
                   r=10 ** rng.uniform(0, 4), steps=rng.randint(1, 60))


register(Exercise(
    name="clipping_spikes.bad_batch_response",
    reference=bad_batch_response,
    cases=_response_cases,
    rtol=1e-9, atol=1e-15,
    hint="m_k = (1-b1) * b1**k * r (in units of sigma); v_k = 1 + (1-b2) * b2**k * (r*r - 1) (in units of sigma^2): "
         "the bad gradient enters both moments once and decays at their own rates. u_k = m_k / sqrt(v_k).",
))

__all__ = ["bad_batch_response", "clip_local", "global_coefficient", "mad_score"]
