"""Timelines (Gantt charts): pipeline schedules, overlapped communication, serving loops."""

from __future__ import annotations

from typing import Iterable, Mapping

import plotly.graph_objects as go

PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D"]


def timeline_figure(spans: Iterable[Mapping], *, title: str = "", unit: str = "step") -> go.Figure:
    """Bars on lanes. Each span: {'lane': str, 'start': float, 'end': float, 'label': str, 'kind': str}.

    Spans of the same `kind` share a colour (e.g. forward / backward / communication).
    """
    spans = list(spans)
    for i, s in enumerate(spans):
        missing = {"lane", "start", "end"} - set(s)
        if missing:
            raise ValueError(f"timeline_figure: span {i} lacks {sorted(missing)}, got keys {sorted(s)}")
        if s["end"] < s["start"]:
            raise ValueError(f"timeline_figure: span {i} ends ({s['end']}) before it starts ({s['start']})")
    kinds = list(dict.fromkeys(s.get("kind", "") for s in spans))
    lanes = list(dict.fromkeys(s["lane"] for s in spans))
    fig = go.Figure()
    for k, kind in enumerate(kinds):
        mine = [s for s in spans if s.get("kind", "") == kind]
        fig.add_trace(go.Bar(
            name=kind or "work", orientation="h",
            y=[s["lane"] for s in mine], x=[s["end"] - s["start"] for s in mine], base=[s["start"] for s in mine],
            text=[s.get("label", "") for s in mine], textposition="inside", insidetextanchor="middle",
            marker_color=PALETTE[k % len(PALETTE)], hovertemplate="%{y}: %{base} → %{x} " + unit + "<extra></extra>",
        ))
    fig.update_layout(title=title, barmode="overlay", height=120 + 36 * len(lanes),
                      yaxis=dict(categoryorder="array", categoryarray=lanes[::-1]),
                      xaxis_title=unit, margin=dict(l=10, r=10, t=50, b=40), legend_orientation="h")
    return fig
