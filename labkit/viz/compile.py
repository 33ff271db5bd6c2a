"""Figures for chapter 02-compile: recompilations under growing shapes, FX op histograms."""

from __future__ import annotations

import collections

import plotly.graph_objects as go

from labkit.perf import compile as pc

_COLORS = {"static": "#d62728", "auto": "#1f77b4", "dynamic": "#2ca02c"}
_LABELS = {"static": "dynamic=False", "auto": "dynamic=None (automatic)", "dynamic": "dynamic=True"}


def recompile_figure(prompt_len: int = 8, new_tokens: int = 16, *, limit: int | None = None) -> go.Figure:
    """Cumulative graphs compiled per generation step, for dynamic=False / None / True.

    Pure Python (labkit.perf.compile.simulate_compiles): cheap enough for a slider callback.
    limit defaults to Dynamo's current recompile_limit (8 unless configured).
    """
    limit = pc.recompile_limit() if limit is None else limit
    sizes = pc.generation_sizes(prompt_len, new_tokens)
    steps = list(range(1, len(sizes) + 1))
    fig = go.Figure()
    totals = {}
    for mode in pc.MODES:
        flags = pc.simulate_compiles(sizes, mode, limit=limit)
        cum, total = [], 0
        for f in flags:
            total += f
            cum.append(total)
        totals[mode] = total
        fig.add_trace(go.Scatter(
            x=steps, y=cum, mode="lines+markers", name=_LABELS[mode], line=dict(color=_COLORS[mode], shape="hv"),
            customdata=sizes, hovertemplate="step %{x}, T=%{customdata}: %{y} graphs<extra>" + mode + "</extra>",
        ))
    fig.add_trace(go.Scatter(x=[steps[0], steps[-1]], y=[limit, limit], mode="lines", name=f"recompile_limit = {limit}",
                             line=dict(color="gray", dash="dash")))
    fig.update_layout(
        title=(f"T = {sizes[0]}..{sizes[-1]}: graphs compiled: static {totals['static']}, "
               f"auto {totals['auto']}, dynamic {totals['dynamic']}"),
        xaxis_title="generation step (one call each)", yaxis_title="graphs compiled so far",
        yaxis=dict(range=[0, limit + 1.5]), height=380, margin=dict(l=50, r=20, t=50, b=40),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def op_histogram_figure(hist: collections.Counter | dict, *, title: str = "ops in the captured FX graph",
                        top: int = 20) -> go.Figure:
    """Horizontal bars: how often each op appears in a captured graph (most frequent on top)."""
    if not isinstance(hist, (dict, collections.Counter)):
        raise TypeError(f"op_histogram_figure: hist must be a dict/Counter of op -> count, got {type(hist).__name__}")
    items = sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))[:top][::-1]
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h"))
    fig.update_layout(title=title, xaxis_title="count", height=max(200, 60 + 22 * len(items)),
                      margin=dict(l=180, r=20, t=50, b=40))
    return fig


def timing_figure(rows: list[dict], *, title: str = "eager vs torch.compile") -> go.Figure:
    """Grouped bars of median_ms per row name, one group per shape (rows from labkit.benchmarks.compile.run)."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError("timing_figure: rows must be a list of dicts with 'name', 'shape', 'median_ms'")
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig = go.Figure()
    for name in names:
        sel = [r for r in rows if r["name"] == name]
        fig.add_trace(go.Bar(name=name, x=[r["shape"] for r in sel], y=[r["median_ms"] for r in sel]))
    fig.update_layout(barmode="group", title=title, xaxis_title="input shape (B, T, C)", yaxis_title="median ms",
                      height=360, margin=dict(l=50, r=20, t=50, b=40))
    return fig


__all__ = ["op_histogram_figure", "recompile_figure", "timing_figure"]
