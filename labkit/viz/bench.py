"""Showing benchmark records (labkit.bench) as tables."""

from __future__ import annotations

import plotly.graph_objects as go


def bench_table(record: dict | None, *, title: str | None = None) -> go.Figure:
    """A plotly table of a recorded run, its device and date in the title."""
    if record is None:
        return go.Figure(layout=dict(title=title or "no benchmark record yet", height=120))
    results = record["results"]
    columns = list(dict.fromkeys(k for r in results for k in r))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    meta = record["meta"]
    head = title or f"{meta['device']} · torch {meta['torch']} · {meta['date'][:10]}"
    fig = go.Figure(go.Table(header=dict(values=columns),
                             cells=dict(values=[[cell(r.get(c)) for r in results] for c in columns])))
    fig.update_layout(title=head, height=min(120 + 28 * len(results), 700), margin=dict(l=10, r=10, t=50, b=10))
    return fig
