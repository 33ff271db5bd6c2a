"""Figures of chapter 14-pipeline: schedules as Gantt charts, bubble and memory against microbatches.

The technique lives in labkit.parallel.pipeline; this module only draws it.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.parallel import pipeline as pl
from labkit.viz.timeline import timeline_figure

FORWARD_COLORS = ["#4C78A8", "#9ecae1", "#2f4b7c", "#72B7B2"]  # one per chunk (virtual stage)
BACKWARD_COLORS = ["#F58518", "#FFBF79", "#B5520B", "#E45756"]
KIND_COLORS = {"gpipe": "#4C78A8", "1f1b": "#F58518", "interleaved-1f1b": "#54A24B"}


def _kind_name(op: str, chunk: int, v: int) -> str:
    name = "forward" if op == "F" else "backward"
    return f"{name}, chunk {chunk}" if v > 1 else name


def gantt_figure(spans: list[dict], stages: int, virtual_stages: int = 1, *, title: str = "", unit: str = "time",
                 scale: float = 1.0) -> go.Figure:
    """One lane per rank, one bar per action labelled with its microbatch; forwards blue, backwards
    orange, a shade per chunk when v > 1. spans: dicts with rank, op, stage, microbatch, start, end
    (Simulation.spans or PipelineRun.spans); scale multiplies the times (e.g. 1e3 for s -> ms)."""
    p, v = stages, virtual_stages
    ordered = sorted(spans, key=lambda s: (s["op"] == "B", s["stage"] // p, s["rank"], s["start"]))
    bars = [dict(lane=f"rank {s['rank']}", start=s["start"] * scale, end=s["end"] * scale, label=str(s["microbatch"]),
                 kind=_kind_name(s["op"], s["stage"] // p, v)) for s in ordered]
    fig = timeline_figure(bars, title=title, unit=unit)
    for trace in fig.data:
        chunk = int(trace.name.rsplit(" ", 1)[1]) if "chunk" in trace.name else 0
        palette = FORWARD_COLORS if trace.name.startswith("forward") else BACKWARD_COLORS
        trace.marker.color = palette[chunk % len(palette)]
        trace.marker.line = dict(color="white", width=0.5)
    fig.update_layout(yaxis=dict(categoryorder="array", categoryarray=[f"rank {r}" for r in range(p)][::-1]),
                      bargap=0.15)
    return fig


def schedule_panel_figure(kind: str = "1f1b", stages: int = 4, microbatches: int = 8, virtual_stages: int = 2,
                          backward_ratio: float = 1.0) -> go.Figure:
    """The Play panel: the simulated schedule as a Gantt chart, its bubble against the formula and the
    activations rank 0 holds. virtual_stages applies to the interleaved schedule only; for it the
    microbatches are rounded up to a multiple of stages."""
    v = virtual_stages if kind == "interleaved-1f1b" else 1
    m, note = microbatches, ""
    if v > 1 and m % stages:
        m = -(-m // stages) * stages
        note = f" (m rounded up to {m}: interleaving needs a multiple of p)"
    sim = pl.simulate(pl.schedule(kind, stages, m, v), 1.0, backward_ratio)
    formula = pl.bubble_fraction(kind, stages, m, v)
    held = (f"{sim.peak_inflight[0]} microbatches" if v == 1 else
            f"{sim.peak_inflight[0]} chunk activations = {sim.peak_activations[0]:.3g} microbatches")
    title = (f"{kind}: p={stages}, m={m}, v={v}{note}<br><sup>bubble / ideal = {sim.bubble_fraction:.3f} "
             f"(formula (p-1)/(m v) = {formula:.3f}), idle share of the step {sim.idle_share:.1%}, "
             f"rank 0 holds up to {held}</sup>")
    fig = gantt_figure(sim.spans, stages, v, title=title, unit="time (one microbatch's forward through a rank = 1)")
    fig.update_layout(height=170 + 40 * stages, margin=dict(l=10, r=10, t=80, b=40))
    return fig


def bubble_memory_figure(stages: int = 4, virtual_stages: int = 2, max_microbatches: int = 32) -> go.Figure:
    """Left: bubble fraction against m (simulated markers, (p-1)/(m v) lines). Right: peak activations on
    rank 0 (in microbatches through its whole share of layers) against m."""
    p, v = stages, virtual_stages
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("bubble / ideal time", "activations held by rank 0 (microbatches)"))
    for kind in pl.KINDS:
        kv = v if kind == "interleaved-1f1b" else 1
        ms = [m for m in range(1, max_microbatches + 1) if kv == 1 or m % p == 0]
        sims = [pl.simulate(pl.schedule(kind, p, m, kv)) for m in ms]
        label = f"{kind} (v={kv})" if kind == "interleaved-1f1b" else kind
        color = KIND_COLORS[kind]
        fig.add_trace(go.Scatter(x=ms, y=[s.bubble_fraction for s in sims], mode="markers", name=label,
                                 legendgroup=kind, marker=dict(color=color, size=7,
                                                               symbol="circle-open" if kind == "1f1b" else "circle")),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=ms, y=[pl.bubble_fraction(kind, p, m, kv) for m in ms], mode="lines",
                                 name=f"(p-1)/(m·{kv})", legendgroup=kind, showlegend=False,
                                 line=dict(color=color, dash="dot", width=1)), row=1, col=1)
        fig.add_trace(go.Scatter(x=ms, y=[s.peak_activations[0] for s in sims], mode="lines+markers", name=label,
                                 legendgroup=kind, showlegend=False, line=dict(color=color),
                                 marker=dict(size=5)), row=1, col=2)
    fig.update_xaxes(title_text="microbatches m", row=1, col=1)
    fig.update_xaxes(title_text="microbatches m", row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(height=380, margin=dict(l=50, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.25),
                      title=dict(text=f"p = {p} ranks: GPipe and 1F1B share the bubble, 1F1B caps the memory", x=0.01))
    return fig


def measured_figure(run: pl.PipelineRun, stages: int, *, title: str | None = None) -> go.Figure:
    """A measured run's wall-clock timeline per rank (milliseconds)."""
    job = run.job
    t0 = min(s["start"] for s in run.spans)
    spans = [dict(s, start=s["start"] - t0, end=s["end"] - t0) for s in run.spans]
    text = title or (f"measured: {job.kind}, p={stages}, m={job.microbatches}, v={job.virtual_stages}: "
                     f"{run.makespan * 1e3:.0f} ms, bubble {run.bubble_fraction():.3f}")
    fig = gantt_figure(spans, stages, job.virtual_stages, title=text, unit="ms", scale=1e3)
    fig.update_layout(height=150 + 40 * stages, margin=dict(l=10, r=10, t=60, b=40))
    return fig


def makespan_figure(measured: dict[str, float], simulated: dict[str, float], *, title: str = "") -> go.Figure:
    """Measured vs simulated step time per schedule (ms)."""
    names = list(measured)
    fig = go.Figure([
        go.Bar(x=names, y=[simulated[n] for n in names], name="simulated (free messages)", marker_color="#9ecae1"),
        go.Bar(x=names, y=[measured[n] for n in names], name="measured on ranks", marker_color="#4C78A8"),
    ])
    fig.update_layout(title=title or "one pipelined step", barmode="group", height=340, yaxis_title="ms",
                      margin=dict(l=50, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.2))
    return fig


__all__ = ["bubble_memory_figure", "gantt_figure", "makespan_figure", "measured_figure", "schedule_panel_figure"]
