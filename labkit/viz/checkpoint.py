"""Figures for the checkpointing chapter: training vs save timelines (sync and async, from the cost
model in labkit.train.checkpoint), and what a loader finds after a crash at every I/O step."""

from __future__ import annotations

from collections.abc import Mapping

import plotly.graph_objects as go

from labkit.train import checkpoint as ck
from labkit.viz.timeline import timeline_figure

_OUTCOME_COLOURS = {"old": "#54A24B", "new": "#4C78A8", "none": "#B279A2", "wrong": "#E45756", "error": "#F58518"}


def save_costs(state_mb: float, snapshot_gbps: float, persist_gbps: float,
               persist_fixed_ms: float = 0.0) -> tuple[float, float]:
    """(snapshot_ms, persist_ms) of a state of `state_mb` MB at the given bandwidths (GB/s), plus a fixed
    per-save cost of the persist (fsyncs, directory operations)."""
    if not (snapshot_gbps > 0 and persist_gbps > 0):
        raise ValueError(f"save_costs: bandwidths must be > 0, got snapshot_gbps={snapshot_gbps!r}, "
                         f"persist_gbps={persist_gbps!r}")
    return state_mb / snapshot_gbps, persist_fixed_ms + state_mb / persist_gbps


def save_timeline_figure(interval: int = 4, state_mb: float = 100.0, step_ms: float = 200.0, *,
                         n_steps: int = 24, snapshot_gbps: float = 2.0, persist_gbps: float = 0.25,
                         persist_fixed_ms: float = 0.0) -> go.Figure:
    """Training steps and saves, synchronous above, asynchronous below, for one size and interval.

    The title gives each mode's blocked time (the trainer not computing) and the run's length.
    """
    snapshot_ms, persist_ms = save_costs(state_mb, snapshot_gbps, persist_gbps, persist_fixed_ms)
    runs = {mode: ck.save_schedule(n_steps, step_ms, interval, snapshot_ms, persist_ms, mode)
            for mode in ("sync", "async")}
    fig = timeline_figure(runs["sync"].spans + runs["async"].spans, unit="ms")
    compute = n_steps * step_ms
    s, a = runs["sync"], runs["async"]
    fig.update_layout(title=dict(text=(
        f"{s.saves} saves of {state_mb:.0f} MB (snapshot {snapshot_ms:.0f} ms, persist {persist_ms:.0f} ms) · "
        f"blocked: sync {s.blocked_ms:.0f} ms, async {a.blocked_ms:.0f} ms<br>"
        f"run: sync {s.wall_ms:.0f} ms, async {a.wall_ms:.0f} ms, no saves {compute:.0f} ms"), font_size=13),
        height=380, margin=dict(t=70), legend=dict(orientation="h", y=-0.3))
    return fig


def crash_outcomes_figure(results: Mapping[str, "object"], *, title: str = "") -> go.Figure:
    """One row per saver (name -> labkit.train.crashtest.SweepResult): a marker per crash point,
    coloured by what the loader returned; hover shows the I/O step the process was killed after."""
    if not isinstance(results, Mapping) or not results:
        raise TypeError("crash_outcomes_figure: results must be a non-empty dict of name -> SweepResult")
    fig = go.Figure()
    shown = set()
    for row, (name, result) in enumerate(results.items()):
        for outcome, colour in _OUTCOME_COLOURS.items():
            pts = [p for p in result.points if p.outcome.split(":")[0] == outcome]
            if not pts:
                continue
            fig.add_trace(go.Scatter(
                x=[p.k for p in pts], y=[name] * len(pts), mode="markers", name=outcome,
                legendgroup=outcome, showlegend=outcome not in shown,
                marker=dict(color=colour, size=10, symbol=["circle" if p.ok else "x" for p in pts]),
                text=[f"killed after: {p.label or '(no crash)'}<br>save {p.save} · loader: {p.outcome} · "
                      f"promised: {p.expected}" for p in pts],
                hovertemplate="crash point %{x}<br>%{text}<extra></extra>"))
            shown.add(outcome)
    bad = ", ".join(f"{name}: {len(r.failures)}/{len(r.points)} bad" for name, r in results.items())
    fig.update_layout(title=title or f"what the loader finds after a SIGKILL at each I/O step ({bad})",
                      xaxis_title="crash point (I/O step the process was killed after)", height=140 + 60 * len(results),
                      margin=dict(l=10, r=10, t=50, b=40), legend_orientation="h")
    return fig


__all__ = ["crash_outcomes_figure", "save_costs", "save_timeline_figure"]
