"""Exercises of chapter 09-data-order (registered on import; graded by labkit.check).

    data-order.buffer_shuffle       fn(items, buffer_size, seed) -> the items in shuffle-buffer order (a list)
    data-order.batch_concentration  fn(labels, order, batch_size) -> (mean majority share, mean entropy ratio)
    data-order.pacing               fn(kind, step, ramp_steps, c0, p, n_stages) -> competence c(step)
    data-order.seqlen_at            fn(step, start, end, ramp_steps, multiple) -> sequence length (linear warm-up)

The references are labkit.train.shuffling and labkit.train.curriculum.
"""

from __future__ import annotations

import torch

from labkit.exercises import Exercise, register
from labkit.train import curriculum as cu
from labkit.train import shuffling as sh

# --- data-order.buffer_shuffle ------------------------------------------------------------


def buffer_shuffle(items: list[int], buffer_size: int, seed: int) -> list[int]:
    """Reference: tf.data's shuffle buffer over `items` (rng = random.Random(seed))."""
    return list(sh.buffer_shuffle(list(items), buffer_size, seed=seed))


def _buffer_cases(rng):
    yield dict(items=[3, 1, 4, 1, 5], buffer_size=1, seed=0)  # k = 1: the identity (repeats allowed)
    yield dict(items=list(range(6)), buffer_size=6, seed=1)  # k = n: fill, then drain in random order
    yield dict(items=list(range(5)), buffer_size=50, seed=2)  # k > n: never full
    yield dict(items=[], buffer_size=4, seed=3)
    yield dict(items=list(range(10)), buffer_size=2, seed=4)
    for _ in range(12):
        n = rng.randint(1, 300)
        yield dict(items=[rng.randint(0, 999) for _ in range(n)], buffer_size=rng.randint(1, 64),
                   seed=rng.randint(0, 10**6))


register(Exercise(
    name="data-order.buffer_shuffle",
    reference=buffer_shuffle,
    cases=_buffer_cases,
    rtol=0.0, atol=0.0,
    hint="rng = random.Random(seed). Append items until the buffer holds buffer_size; after that, for each new "
         "item: j = rng.randrange(buffer_size), emit buffer[j], buffer[j] = item. At the end rng.shuffle(buffer) "
         "and emit all of it. Return a list.",
))


# --- data-order.batch_concentration -------------------------------------------------------


def batch_concentration(labels: list[int], order: list[int], batch_size: int) -> tuple[float, float]:
    """Reference: mean majority share and mean entropy ratio H(q_b)/H(p) over the full batches of `order`."""
    m = sh.batch_correlation(torch.tensor(labels), torch.tensor(order), batch_size)
    return m["majority_share"], m["entropy_ratio"]


def _concentration_cases(rng):
    sorted_labels = [s for s in range(4) for _ in range(8)]  # 4 sources stored contiguously, 8 each
    yield dict(labels=sorted_labels, order=list(range(32)), batch_size=8)  # no shuffle: max concentration
    mixed = [i // 4 + 8 * (i % 4) for i in range(32)]  # round robin: every batch of 4 has one of each
    yield dict(labels=sorted_labels, order=mixed, batch_size=4)  # perfectly mixed: (0.25, 1.0)
    yield dict(labels=[0, 0, 0, 1], order=[0, 3, 1, 2, 0], batch_size=2)  # trailing partial batch, repeats
    yield dict(labels=[0, 2, 2, 0, 2, 0], order=[5, 4, 3, 2, 1, 0], batch_size=3)  # label 1 never occurs
    for _ in range(12):
        n, k = rng.randint(8, 200), rng.randint(2, 6)
        labels = sorted(rng.randrange(k) for _ in range(n))
        labels[0], labels[-1] = 0, k - 1  # at least two labels present: H(p) > 0
        order = list(range(n))
        if rng.random() < 0.7:
            rng.shuffle(order)
        yield dict(labels=labels, order=order, batch_size=rng.randint(1, 16))


register(Exercise(
    name="data-order.batch_concentration",
    reference=batch_concentration,
    cases=_concentration_cases,
    rtol=1e-9, atol=1e-12,
    hint="Cut order into len(order) // batch_size full batches. Per batch: q_k = count of label k / batch_size; "
         "majority share = max_k q_k; entropy H(q) = -sum q_k log q_k (0 log 0 = 0). p = the label proportions of "
         "the whole dataset (`labels`). Return (mean of the majority shares, mean of H(q_b) / H(p)).",
))


# --- data-order.pacing ---------------------------------------------------------------------


def pacing(kind: str, step: float, ramp_steps: int, c0: float, p: float, n_stages: int) -> float:
    """Reference: competence c(step) (labkit.train.curriculum.pacing)."""
    return cu.pacing(kind, step, ramp_steps, c0, p=p, n_stages=n_stages)


def _pacing_cases(rng):
    for kind in cu.PACINGS:
        yield dict(kind=kind, step=0, ramp_steps=100, c0=0.1, p=2.0, n_stages=4)  # c(0) = c0
        yield dict(kind=kind, step=100, ramp_steps=100, c0=0.1, p=2.0, n_stages=4)  # c(T) = 1
        yield dict(kind=kind, step=250, ramp_steps=100, c0=0.2, p=3.0, n_stages=5)  # after the ramp: 1
        yield dict(kind=kind, step=50, ramp_steps=100, c0=1.0, p=2.0, n_stages=4)  # c0 = 1: no curriculum
    yield dict(kind="step", step=24, ramp_steps=100, c0=0.1, p=2.0, n_stages=4)  # just before a stage
    yield dict(kind="step", step=25, ramp_steps=100, c0=0.1, p=2.0, n_stages=4)  # on a stage boundary
    for _ in range(20):
        yield dict(kind=rng.choice(cu.PACINGS), step=rng.randint(0, 1200), ramp_steps=rng.randint(1, 1000),
                   c0=rng.choice([0.01, 0.05, 0.1, 0.25, 0.5]), p=rng.choice([1.0, 2.0, 3.0, 0.5]),
                   n_stages=rng.randint(1, 8))


register(Exercise(
    name="data-order.pacing",
    reference=pacing,
    cases=_pacing_cases,
    rtol=1e-9, atol=1e-12,
    hint="r = min(1, step / ramp_steps). linear: c0 + (1-c0) r; root: (c0**p + (1 - c0**p) r) ** (1/p); "
         "step: c0 + (1-c0) floor(n_stages r) / n_stages; exponential: c0 ** (1 - r). Exactly 1 once r = 1.",
))


# --- data-order.seqlen_at ------------------------------------------------------------------


def seqlen_at(step: int, start: int, end: int, ramp_steps: int, multiple: int) -> int:
    """Reference: linear sequence-length warm-up (labkit.train.curriculum.seqlen_at)."""
    return cu.seqlen_at(step, start=start, end=end, ramp_steps=ramp_steps, multiple=multiple, pacing="linear")


def _seqlen_cases(rng):
    yield dict(step=0, start=8, end=1024, ramp_steps=1000, multiple=8)
    yield dict(step=1000, start=8, end=1024, ramp_steps=1000, multiple=8)
    yield dict(step=5000, start=8, end=1000, ramp_steps=1000, multiple=64)  # end is not a multiple: still end
    yield dict(step=10, start=64, end=2048, ramp_steps=100, multiple=8)
    yield dict(step=1, start=5, end=12, ramp_steps=10, multiple=8)  # rounding down would go below start
    yield dict(step=7, start=8, end=32, ramp_steps=21, multiple=8)  # exactly a multiple (16)
    for _ in range(20):
        end = rng.randint(8, 4096)
        yield dict(step=rng.randint(0, 3000), start=rng.randint(1, end), end=end, ramp_steps=rng.randint(1, 2000),
                   multiple=rng.choice([1, 8, 16, 64]))


register(Exercise(
    name="data-order.seqlen_at",
    reference=seqlen_at,
    cases=_seqlen_cases,
    rtol=0.0, atol=0.0,
    hint="end once step >= ramp_steps; otherwise L = start + (end - start) * step / ramp_steps, rounded DOWN to a "
         "multiple of `multiple`, then clamped to [start, end]. Return an int.",
))
