"""Figures of chapter 13-fsdp: per-rank timelines (recorded or simulated), the parameter memory of each
compute step, and exposed vs hidden communication per configuration.

The technique (and the schedule model the widget draws) lives in labkit.parallel.fsdp.
"""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.parallel import fsdp as fs
from labkit.parallel.zero import padded_numel

# The Play widget's default: ONE recording, per-unit medians of depth-0 steps (and depth-0 offload
# steps for the copies), 2 gloo ranks on the course's 2-core CPU while other jobs shared it,
# RECORDED_SETUP, labkit.benchmarks.fsdp with quick=False, calibrated by
# labkit.parallel.fsdp.calibrate. Kept as measured, load noise included: the four identical blocks
# (units 1-4) differ by up to 3x in gather and scatter times, and the 8k-parameter head's gather
# (2.95 ms) is no cheaper than a block's; a later quick run on the same machine measured ~5 ms
# per block backward (here ~9) and ~0.3 ms for the head's gather. Read it as one sample of a busy
# CPU, not as constants of the engine; the chapter's Experiments calibrate live and print both.
RECORDED_SETUP = fs.Setup(n_layer=4, n_embd=128, n_head=4, vocab_size=65, block_size=64, batch=8)
RECORDED_CALIBRATION = fs.Calibration(
    forward_ms=(0.45, 3.31, 3.22, 5.7, 3.3, 0.4), backward_ms=(0.2, 8.8, 8.8, 9.2, 9.18, 0.38),
    gather_ms=(1.13, 1.08, 3.61, 2.59, 1.62, 2.95), scatter_ms=(1.09, 3.95, 1.48, 4.02, 2.3, 0.93),
    gather_issue_ms=(0.11, 0.22, 0.18, 0.19, 0.24, 0.17), scatter_issue_ms=(0.14, 0.52, 1.39, 0.41, 1.13, 0.44),
    h2d_ms=(0.02, 0.07, 0.07, 0.07, 0.08, 0.02), d2h_ms=(0.02, 0.07, 0.08, 0.08, 0.06, 0.02),
    optimizer_ms=2.18, offload_optimizer_ms=2.13, overhead_ms=1.09)

KIND_COLOURS = {
    "forward": "#4C78A8", "backward": "#54A24B", "all-gather": "#F58518", "reduce-scatter": "#E45756",
    "wait": "#FF9DA6", "issue": "#9D755D", "copy H2D": "#B279A2", "copy D2H": "#B279A2", "optimizer": "#72B7B2",
    "other": "#D9D9D9",
}
KIND_NAMES = {"wait": "wait (exposed comm)", "issue": "collective call (exposed)", "other": "host overhead"}
GATHERED_COLOURS = ("#FDBF6F", "#F58518")  # gathered units, alternating (labelled U0, U1, ...)


def _lane(span: dict) -> str:
    return f"rank {span.get('rank', 0)} · {span.get('lane', 'compute')}"


def _add_spans(fig: go.Figure, spans: Sequence[dict], row: int | None = None) -> list[str]:
    """One horizontal bar trace per kind (fixed colours); returns the lanes top to bottom."""
    lanes = sorted({_lane(s) for s in spans}, key=lambda l: (int(l.split()[1]), l.endswith("comm")))
    for kind, colour in KIND_COLOURS.items():
        mine = [s for s in spans if s["kind"] == kind]
        if not mine:
            continue
        trace = go.Bar(
            name=KIND_NAMES.get(kind, kind), orientation="h", y=[_lane(s) for s in mine],
            x=[s["end"] - s["start"] for s in mine], base=[s["start"] for s in mine],
            text=[s.get("label", "") if kind != "issue" else "" for s in mine], textposition="inside",
            insidetextanchor="middle", marker=dict(color=colour, line=dict(width=0.5, color="white")),
            opacity=0.85 if kind in fs.COMM_KINDS else 1.0, legendgroup=kind,
            customdata=[[s.get("label", ""), s["end"] - s["start"]] for s in mine],
            hovertemplate="%{customdata[0]}: %{base:.2f} → +%{customdata[1]:.2f} ms<extra>%{y}</extra>")
        fig.add_trace(trace, row=row, col=1 if row else None)
    return lanes


def fsdp_timeline_figure(spans: Sequence[dict], *, title: str = "", height: int | None = None) -> go.Figure:
    """Recorded (or simulated) spans of one step: per rank a compute lane and a communication lane."""
    spans = list(spans)
    if not spans:
        raise ValueError("fsdp_timeline_figure: spans must hold at least one span, got none")
    fig = go.Figure()
    lanes = _add_spans(fig, spans)
    fig.update_layout(title=dict(text=title, font_size=13), barmode="overlay", height=height or 140 + 48 * len(lanes),
                      yaxis=dict(categoryorder="array", categoryarray=lanes[::-1]), xaxis_title="ms",
                      margin=dict(l=10, r=10, t=60, b=40), legend=dict(orientation="h", y=-0.25))
    return fig


def timeline_title(spans: Sequence[dict], label: str) -> str:
    """'label · step X ms · compute · comm in flight · hidden · exposed' from the spans of rank 0."""
    st = fs.timeline_stats(spans)
    r = min(st)
    s = st[r]
    return (f"{label} · rank {r}: step {s['step_ms']:.1f} ms, compute {s['compute_ms']:.1f} ms, "
            f"comm in flight {s['comm_ms']:.1f} ms (hidden {s['hidden_ms']:.1f}), exposed {s['exposed_ms']:.1f} ms")


def param_memory_figure(unit_numels: Sequence[int], world_size: int, depth: int, offload: bool = False,
                        bytes_per_param: int = 4, *, row_of: go.Figure | None = None) -> go.Figure:
    """Parameter bytes on one rank's device during each of the 2n compute steps: its shards (unless
    offloaded) and the gathered units (stacked), with the peak of `peak_param_bytes`."""
    n = len(unit_numels)
    padded = [padded_numel(k, world_size) for k in unit_numels]
    steps = list(range(2 * n))
    labels = [f"{'F' if k < n else 'B'}{fs.unit_at(k, n)}" for k in steps]
    fig = row_of or go.Figure()
    kw = dict(row=2, col=1) if row_of is not None else {}
    mib = 2**20
    base = [0.0] * len(steps)  # stacked by hand, so the figure can share a subplot with a timeline

    def stack(ys, name, colour, text, legend):
        fig.add_trace(go.Bar(x=labels, y=ys, base=list(base), name=name, marker_color=colour, legendgroup=name,
                             text=[text if y else "" for y in ys], textposition="inside", insidetextanchor="middle",
                             showlegend=legend and row_of is None,
                             hovertemplate=f"{text or name}: %{{y:.3g}} MiB<extra>%{{x}}</extra>"), **kw)
        for k, y in enumerate(ys):
            base[k] += y

    if not offload:
        stack([sum(padded) // world_size * bytes_per_param / mib] * len(steps), "shards (all units)", "#BAB0AC", "",
              True)
    for u in range(n):
        stack([padded[u] * bytes_per_param / mib if u in fs.resident_units(n, depth, k) else 0 for k in steps],
              "gathered units", GATHERED_COLOURS[u % 2], f"U{u}", u == 0)
    peak = fs.peak_param_bytes(unit_numels, world_size, depth, offload, bytes_per_param) / mib
    fig.add_hline(y=peak, line=dict(color="#E45756", dash="dash"), **kw)
    if row_of is None:
        fig.update_layout(barmode="overlay", height=320,
                          title=f"parameter memory per compute step · peak {peak:.3g} MiB",
                          yaxis_title="MiB on the device", margin=dict(l=50, r=10, t=50, b=40),
                          legend=dict(orientation="h", y=-0.25))
    return fig


def schedule_figure(cal: fs.Calibration, depth: int = 1, offload: bool = False, comm_scale: float = 1.0,
                    copy_scale: float = 1.0, *, unit_numels: Sequence[int] | None = None,
                    world_size: int = 2) -> go.Figure:
    """The widget's figure: the schedule model's step (calibrated times; collectives `comm_scale`,
    host-device copies `copy_scale` times slower) above, the parameter memory of each compute step
    below (when unit_numels is given)."""
    sim = fs.simulate_step(cal.scaled(comm_scale, copy_scale), depth, offload)
    rows = 2 if unit_numels is not None else 1
    fig = make_subplots(rows=rows, cols=1, row_heights=[0.62, 0.38][:rows], vertical_spacing=0.2,
                        subplot_titles=["simulated step (one rank)", "parameter memory per compute step"][:rows])
    lanes = _add_spans(fig, sim["spans"], row=1)
    fig.update_yaxes(categoryorder="array", categoryarray=lanes[::-1], row=1, col=1)
    fig.update_xaxes(title_text="ms", row=1, col=1)
    peak = ""
    if unit_numels is not None:
        param_memory_figure(unit_numels, world_size, depth, offload, row_of=fig)
        fig.update_yaxes(title_text="MiB", row=2, col=1)
        mib = fs.peak_param_bytes(unit_numels, world_size, depth, offload) / 2**20
        peak = f", peak parameters {mib:.3g} MiB"
    fig.update_layout(
        barmode="overlay", height=560 if rows == 2 else 300, margin=dict(l=10, r=10, t=90, b=40),
        legend=dict(orientation="h", y=-0.12),
        title=dict(font_size=13, text=(
            f"depth {depth}, offload {'on' if offload else 'off'}, links x{comm_scale:.2g}, copies x{copy_scale:.2g}: "
            f"step {sim['step_ms']:.1f} ms "
            f"(compute {sim['compute_ms']:.1f}), exposed comm {sim['exposed_ms']:.1f} ms, "
            f"hidden {sim['hidden_ms']:.1f} ms{peak}")))
    return fig


def exposure_figure(rows: Sequence[dict], *, title: str = "") -> go.Figure:
    """Per configuration (rows with name, compute_ms, exposed_ms, hidden_ms [, sim_exposed_ms]): compute,
    exposed and hidden communication side by side (medians over steps)."""
    rows = list(rows)
    if not rows:
        raise ValueError("exposure_figure: rows must hold at least one configuration, got none")
    names = [r["name"] for r in rows]
    fig = go.Figure([
        go.Bar(x=names, y=[r["compute_ms"] for r in rows], name="compute", marker_color=KIND_COLOURS["forward"]),
        go.Bar(x=names, y=[r["exposed_ms"] for r in rows], name="exposed comm", marker_color=KIND_COLOURS["wait"]),
        go.Bar(x=names, y=[r["hidden_ms"] for r in rows], name="hidden comm", marker_color=KIND_COLOURS["all-gather"]),
    ])
    if all("sim_exposed_ms" in r for r in rows):
        fig.add_trace(go.Scatter(x=names, y=[r["sim_exposed_ms"] for r in rows], mode="markers",
                                 name="exposed (schedule model)", marker=dict(symbol="diamond", size=11, color="#333")))
    fig.update_layout(title=title or "where a training step's time goes (medians over steps, rank 0)", barmode="group",
                      yaxis_title="ms per step", height=360, margin=dict(l=50, r=10, t=50, b=40),
                      legend=dict(orientation="h", y=-0.2))
    return fig


__all__ = ["KIND_COLOURS", "RECORDED_CALIBRATION", "RECORDED_SETUP", "exposure_figure", "fsdp_timeline_figure",
           "param_memory_figure", "schedule_figure", "timeline_title"]
