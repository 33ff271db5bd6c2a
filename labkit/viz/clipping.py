"""Figures of chapter 07-clipping-spikes: per-tensor gradient norms before and after clipping (the Play
panel), the anatomy of a loss spike (loss, gradient and update norms, per-layer heatmap), Adam's
response to one bad batch, and spike detectors side by side.

    clip_bars_figure(names, grads, max_norm=1.0, mode="local")     # cheap: a slider callback
    spike_anatomy_figure(run)                                       # a labkit.train.spikes.SpikeRun
    response_figure({"beta2 = 0.999": [...], "beta2 = 0.95": [...]})
    detector_figure(losses, {"MAD": flagged, "z-score": flagged2})
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit.train import clipping

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _positive_or_none(values) -> list[float | None]:
    """Values for a log axis: 0, negative and non-finite values become gaps."""
    return [v if (v is not None and math.isfinite(v) and v > 0) else None for v in values]


def clip_bars_figure(names: Sequence[str], grads: Sequence[torch.Tensor], max_norm: float = 1.0, mode: str = "global",
                     *, norm_type: float = 2.0, log_y: bool = True, title: str | None = None) -> go.Figure:
    """Bars of every tensor's gradient norm before and after clipping (clipping.clipped), the
    threshold drawn (local: a line at max_norm; global: the total norm and the common factor in
    the title), and how many tensors changed and the cosine between clipped and raw gradients."""
    names, grads = list(names), list(grads)
    if len(names) != len(grads) or not grads:
        raise ValueError(f"clip_bars_figure: names and grads must be non-empty and of equal length, got "
                         f"{len(names)} names and {len(grads)} grads")
    after = clipping.clipped(grads, max_norm, norm_type, mode=mode)
    before_n = clipping.tensor_norms(grads, norm_type).double().tolist()
    after_n = clipping.tensor_norms(after, norm_type).double().tolist()
    changed = sum(1 for a, b in zip(after, grads) if not torch.equal(a, b))
    cos = clipping.cosine(after, grads)
    total = clipping.global_norm(grads, norm_type).item()
    if mode == "global":
        coef = clipping.clip_coefficient(total, max_norm).item()
        what = f"total norm {total:.3g}, factor {coef:.3g} for every tensor"
    else:
        what = f"each tensor capped at {max_norm:.3g}"
    head = title or f"{mode} clipping, max_norm {max_norm:.3g}: {what}; " \
                    f"{changed}/{len(grads)} tensors clipped, cosine {cos:.3f} to the raw gradient"
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=_positive_or_none(before_n) if log_y else before_n, name="before",
                         marker_color="#9fb7d9"))
    fig.add_trace(go.Bar(x=names, y=_positive_or_none(after_n) if log_y else after_n, name="after",
                         marker_color=_PALETTE[1]))
    if mode == "local":
        fig.add_trace(go.Scatter(x=names, y=[max_norm] * len(names), mode="lines", name="max_norm",
                                 line=dict(color="black", dash="dash", width=1)))
    fig.update_layout(barmode="group", title=dict(text=head, font=dict(size=13)), yaxis_title="gradient norm",
                      height=420, margin=dict(l=60, r=20, t=60, b=90), legend=dict(orientation="h", y=1.02, x=1,
                                                                                   xanchor="right"))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def spike_anatomy_figure(run, *, title: str = "anatomy of a loss spike", start: int = 0, end: int | None = None,
                         grad_flags: Sequence[int] = ()) -> go.Figure:
    """Three stacked panels over steps [start, end): the loss (log) with detector flags (x) and bad
    batches (dotted lines); the total gradient norm and the update norm (log) with `grad_flags`;
    a heatmap of log10 of every layer's gradient norm (rows: run.groups)."""
    end = run.steps if end is None else min(end, run.steps)
    if not 0 <= start < end:
        raise ValueError(f"spike_anatomy_figure: need 0 <= start < end <= {run.steps}, got start={start}, end={end}")
    xs = list(range(start, end))
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.38, 0.30, 0.32],
                        subplot_titles=("training loss", "gradient norm (before clipping) and update norm",
                                        "log10 gradient norm per layer"))
    fig.add_trace(go.Scatter(x=xs, y=_positive_or_none(run.losses[start:end]), mode="lines", name="loss",
                             line=dict(color=_PALETTE[0])), row=1, col=1)
    flags = [t for t in run.flagged if start <= t < end]
    fig.add_trace(go.Scatter(x=flags, y=_positive_or_none([run.losses[t] for t in flags]), mode="markers",
                             name=f"flagged by the detector ({len(flags)})",
                             marker=dict(symbol="x", size=8, color=_PALETTE[1])), row=1, col=1)
    fig.add_trace(go.Scatter(x=xs, y=_positive_or_none(run.total_norms[start:end]), mode="lines",
                             name="||g|| (total)", line=dict(color=_PALETTE[3])), row=2, col=1)
    fig.add_trace(go.Scatter(x=xs, y=_positive_or_none(run.update_norms[start:end]), mode="lines",
                             name="||Δθ|| (update)", line=dict(color=_PALETTE[2])), row=2, col=1)
    gflags = [t for t in grad_flags if start <= t < end]
    if gflags:
        fig.add_trace(go.Scatter(x=gflags, y=_positive_or_none([run.total_norms[t] for t in gflags]), mode="markers",
                                 name=f"gradient-norm flags ({len(gflags)})",
                                 marker=dict(symbol="triangle-up", size=8, color=_PALETTE[4])), row=2, col=1)
    z = run.grad_norms[start:end].double().clamp_min(1e-30).log10().T.tolist()  # (groups, steps)
    fig.add_trace(go.Heatmap(x=xs, y=list(run.groups), z=z, colorscale="Viridis", showscale=True,
                             colorbar=dict(len=0.3, y=0.14, title="log10")), row=3, col=1)
    for t in run.bad_steps:
        if start <= t < end:
            fig.add_vline(x=t, line=dict(color="gray", dash="dot", width=1))
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_xaxes(title_text="step", row=3, col=1)
    fig.update_layout(title=title, height=720, margin=dict(l=60, r=20, t=70, b=40),
                      legend=dict(orientation="h", y=-0.08))
    return fig


def response_figure(curves: dict[str, Sequence[float]], *, title: str = "Adam's update after one bad batch",
                    yaxis_title: str = "|update| / lr") -> go.Figure:
    """One line per curve (name -> values per step after the bad batch), log y."""
    if not isinstance(curves, dict) or not curves:
        raise TypeError("response_figure: curves must be a non-empty dict of name -> values")
    fig = go.Figure()
    for i, (name, ys) in enumerate(curves.items()):
        ys = [float(v) for v in ys]
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=_positive_or_none(ys), mode="lines+markers",
                                 marker=dict(size=4), name=name, line=dict(color=_PALETTE[i % len(_PALETTE)])))
    fig.update_layout(title=title, xaxis_title="steps after the bad batch", yaxis_title=yaxis_title, height=380,
                      margin=dict(l=60, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(type="log")
    return fig


def detector_figure(losses: Sequence[float], flagged: dict[str, Sequence[int]], *, title: str = "spike detectors",
                    log_y: bool = False) -> go.Figure:
    """The loss sequence with one marker row per detector (name -> flagged steps)."""
    ys = [float(v) for v in losses]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines", name="loss", line=dict(color="#555")))
    for i, (name, steps) in enumerate(flagged.items()):
        steps = list(steps)
        symbol = ["x", "circle-open", "triangle-up", "square-open"][i % 4]
        fig.add_trace(go.Scatter(x=steps, y=[ys[t] for t in steps], mode="markers", name=f"{name} ({len(steps)})",
                                 marker=dict(symbol=symbol, size=10 + 3 * i, color=_PALETTE[(i + 1) % len(_PALETTE)])))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", height=360,
                      margin=dict(l=60, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


__all__ = ["clip_bars_figure", "detector_figure", "response_figure", "spike_anatomy_figure"]
