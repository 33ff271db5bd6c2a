"""Exercises of chapter 14-pipeline (registered on import; graded by labkit.check).

    pipeline.one_f_one_b      fn(stages, microbatches, rank) -> [("F", i) | ("B", i), ...] in 1F1B order
    pipeline.bubble_fraction  fn(kind, stages, microbatches, virtual_stages) -> bubble time / ideal time
    pipeline.peak_inflight    fn(kind, stages, microbatches, rank, virtual_stages) -> most activations held
    pipeline.makespan         fn(actions, forward_cost, backward_cost) -> the step time of a schedule
"""

from __future__ import annotations

from labkit.exercises import Exercise, register
from labkit.parallel import pipeline as pl

# --- pipeline.one_f_one_b ----------------------------------------------------------------


def one_f_one_b(stages: int, microbatches: int, rank: int) -> list[tuple[str, int]]:
    """Reference: rank's 1F1B actions as (op, microbatch) pairs."""
    return [(a.op, a.microbatch) for a in pl.schedule("1f1b", stages, microbatches)[rank]]


def _order_cases(rng):
    yield dict(stages=1, microbatches=1, rank=0)  # no pipeline: F0 B0
    yield dict(stages=4, microbatches=8, rank=0)  # the first rank: the longest warm-up
    yield dict(stages=4, microbatches=8, rank=3)  # the last rank: F, B, F, B from the start
    yield dict(stages=4, microbatches=8, rank=1)
    yield dict(stages=4, microbatches=2, rank=0)  # fewer microbatches than stages: warm-up capped at m
    yield dict(stages=8, microbatches=8, rank=2)
    for _ in range(12):
        p = rng.randint(2, 8)
        yield dict(stages=p, microbatches=rng.randint(1, 16), rank=rng.randrange(p))


def _compare_order(got, expected, case) -> str | None:
    if not isinstance(got, (list, tuple)):
        return f"expected a list of (op, microbatch) pairs, got {type(got).__name__}"
    got = [tuple(x) if isinstance(x, (list, tuple)) else x for x in got]
    if got == expected:
        return None
    for k, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            return f"action {k} is {g!r}, expected {e!r} (the first {k} agree)"
    return f"{len(got)} actions, expected {len(expected)} (each microbatch: one F and one B)"


register(Exercise(
    name="pipeline.one_f_one_b",
    reference=one_f_one_b,
    cases=_order_cases,
    compare=_compare_order,
    hint="Warm-up: min(stages - 1 - rank, microbatches) forwards; then, while forwards remain, one forward "
         "followed by one backward (the oldest microbatch first); then the remaining backwards.",
))

# --- pipeline.bubble_fraction ------------------------------------------------------------


def bubble_fraction(kind: str, stages: int, microbatches: int, virtual_stages: int) -> float:
    """Reference: (p - 1) / (m v): bubble time over ideal (busy) time, equal forward and backward costs."""
    return pl.bubble_fraction(kind, stages, microbatches, virtual_stages)


def _bubble_cases(rng):
    yield dict(kind="gpipe", stages=1, microbatches=1, virtual_stages=1)  # no pipeline, no bubble
    yield dict(kind="gpipe", stages=4, microbatches=1, virtual_stages=1)  # one microbatch: 3 idle per 1 busy
    yield dict(kind="1f1b", stages=4, microbatches=8, virtual_stages=1)  # the same bubble as GPipe
    yield dict(kind="gpipe", stages=4, microbatches=8, virtual_stages=1)
    yield dict(kind="interleaved-1f1b", stages=4, microbatches=8, virtual_stages=2)
    yield dict(kind="interleaved-1f1b", stages=8, microbatches=64, virtual_stages=4)
    for _ in range(12):
        kind = rng.choice(pl.KINDS)
        p = rng.randint(1, 16)
        v = rng.randint(2, 6) if kind == "interleaved-1f1b" else 1
        m = p * rng.randint(1, 8) if v > 1 else rng.randint(1, 64)
        yield dict(kind=kind, stages=p, microbatches=m, virtual_stages=v)


register(Exercise(
    name="pipeline.bubble_fraction",
    reference=bubble_fraction,
    cases=_bubble_cases,
    rtol=1e-9, atol=1e-12,
    hint="Bubble time over ideal time, not over the whole step: a rank is busy m (t_f + t_b) and waits "
         "(p - 1)(t_f + t_b) for the fill and the drain; interleaving shortens each wait by v. "
         "1F1B reorders the work but its bubble equals GPipe's.",
))

# --- pipeline.peak_inflight --------------------------------------------------------------


def peak_inflight(kind: str, stages: int, microbatches: int, rank: int, virtual_stages: int) -> int:
    """Reference: the most (stage, microbatch) forwards `rank` holds before their backwards ran."""
    return pl.peak_inflight(kind, stages, microbatches, rank, virtual_stages)


def _peak_cases(rng):
    yield dict(kind="gpipe", stages=4, microbatches=8, rank=3, virtual_stages=1)  # every microbatch, every rank
    yield dict(kind="1f1b", stages=4, microbatches=8, rank=0, virtual_stages=1)  # p on the first rank
    yield dict(kind="1f1b", stages=4, microbatches=8, rank=3, virtual_stages=1)  # 1 on the last rank
    yield dict(kind="1f1b", stages=8, microbatches=3, rank=0, virtual_stages=1)  # capped by m
    yield dict(kind="interleaved-1f1b", stages=4, microbatches=8, rank=0, virtual_stages=2)
    yield dict(kind="interleaved-1f1b", stages=4, microbatches=8, rank=3, virtual_stages=2)
    yield dict(kind="interleaved-1f1b", stages=2, microbatches=2, rank=0, virtual_stages=4)  # capped by m v
    for _ in range(12):
        kind = rng.choice(pl.KINDS)
        p = rng.randint(1, 8)
        v = rng.randint(2, 4) if kind == "interleaved-1f1b" else 1
        m = p * rng.randint(1, 6) if v > 1 else rng.randint(1, 24)
        yield dict(kind=kind, stages=p, microbatches=m, rank=rng.randrange(p), virtual_stages=v)


register(Exercise(
    name="pipeline.peak_inflight",
    reference=peak_inflight,
    cases=_peak_cases,
    rtol=0.0, atol=0.0,
    hint="Walk the rank's action list: +1 at each F, -1 at each B, keep the maximum. GPipe: every microbatch. "
         "1F1B: the warm-up forwards plus the forward of the first (F, B) pair, never more than m. Interleaved "
         "(v chunks): the warm-up of (v - 1) p + 2 (p - 1 - rank) forwards plus one, never more than m v.",
))

# --- pipeline.makespan -------------------------------------------------------------------


def makespan(actions: list[list[tuple]], forward_cost: float, backward_cost: float) -> float:
    """Reference: the end of the last action when each rank runs its list in order on an ideal device."""
    return pl.simulate(actions, forward_cost, backward_cost).makespan


def _plain(actions) -> list[list[tuple]]:
    return [[tuple(a) for a in rank] for rank in actions]


def _makespan_cases(rng):
    yield dict(actions=_plain(pl.schedule("gpipe", 1, 1)), forward_cost=1.0, backward_cost=2.0)  # F then B
    yield dict(actions=_plain(pl.schedule("gpipe", 4, 8)), forward_cost=1.0, backward_cost=1.0)
    yield dict(actions=_plain(pl.schedule("1f1b", 4, 8)), forward_cost=1.0, backward_cost=2.0)
    yield dict(actions=_plain(pl.schedule("1f1b", 4, 2)), forward_cost=1.0, backward_cost=2.0)
    yield dict(actions=_plain(pl.schedule("interleaved-1f1b", 2, 4, 2)), forward_cost=1.0, backward_cost=1.0)
    yield dict(actions=_plain(pl.schedule("interleaved-1f1b", 4, 8, 3)), forward_cost=2.0, backward_cost=3.0)
    for _ in range(12):
        kind = rng.choice(pl.KINDS)
        p = rng.randint(1, 6)
        v = rng.randint(2, 3) if kind == "interleaved-1f1b" else 1
        m = p * rng.randint(1, 4) if v > 1 else rng.randint(1, 12)
        yield dict(actions=_plain(pl.schedule(kind, p, m, v)), forward_cost=float(rng.randint(1, 4)),
                   backward_cost=float(rng.randint(1, 8)))


register(Exercise(
    name="pipeline.makespan",
    reference=makespan,
    cases=_makespan_cases,
    rtol=1e-9, atol=1e-9,
    hint="Keep, per rank, the position in its list and the time it is free. Repeatedly start the next action "
         "of any rank whose dependencies have ended: F(s, i) needs F(s-1, i); B(s, i) needs F(s, i) and "
         "B(s+1, i) (the last stage only its own F). start = max(rank free, dependencies' ends); one action "
         "costs forward_cost / v or backward_cost / v, with v = number of stages / number of ranks.",
))

__all__ = ["bubble_fraction", "makespan", "one_f_one_b", "peak_inflight"]
