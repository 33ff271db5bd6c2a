"""Figures for the optimizer chapters (Part II): loss curves of several runs, update-size
histograms, learning-rate schedules, benchmark bars, and the AdamW epsilon-trap panel.

The generic builders take plain dicts of name -> values, so every optimizer chapter can use them:

    loss_curves_figure({"AdamW": log.losses, "Lion": log2.losses})
    update_histogram_figure({"fp32 states": ratios32, "fp16 states": ratios16})
    lr_schedule_figure({"cosine": [...], "WSD": [...]})
    bench_bars_figure(rows, metric="median_ms")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
import torch

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]


def _values(name: str, who: str, values) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().double().cpu().tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"{who}: {name!r} must be a list of numbers or a tensor, got {type(values).__name__}")
    return [float(v) for v in values]


def _finite_or_none(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values; a non-finite value poisons its windows (shown as a gap)."""
    if window <= 1:
        return values
    out, run = [], []
    for v in values:
        run.append(v)
        if len(run) > window:
            run.pop(0)
        out.append(sum(run) / len(run) if all(math.isfinite(x) for x in run) else float("nan"))
    return out


def loss_curves_figure(runs: dict[str, Sequence[float]], *, title: str = "training loss", smooth: int = 1,
                       log_y: bool = False, y_range: tuple[float, float] | None = None,
                       xaxis_title: str = "step", yaxis_title: str = "loss") -> go.Figure:
    """One line per run (name -> per-step losses). smooth: trailing moving-average window.
    NaN/inf losses (a diverged run) are drawn as gaps and marked in the legend."""
    if not isinstance(runs, dict) or not runs:
        raise TypeError("loss_curves_figure: runs must be a non-empty dict of name -> list of losses")
    if not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"loss_curves_figure: smooth must be an int >= 1, got {smooth!r}")
    fig = go.Figure()
    for i, (name, losses) in enumerate(runs.items()):
        ys = _values(name, "loss_curves_figure", losses)
        bad = next((k for k, v in enumerate(ys) if not math.isfinite(v)), None)
        label = name if bad is None else f"{name} (non-finite from step {bad})"
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=_finite_or_none(_moving_average(ys, smooth)),
                                 mode="lines", name=label, line=dict(color=_PALETTE[i % len(_PALETTE)])))
    fig.update_layout(title=title, xaxis_title=xaxis_title, yaxis_title=yaxis_title, height=380,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.2))
    if log_y:
        fig.update_yaxes(type="log")
    if y_range is not None:
        fig.update_yaxes(range=[math.log10(y_range[0]), math.log10(y_range[1])] if log_y else list(y_range))
    return fig


def update_histogram_figure(samples: dict[str, torch.Tensor | Sequence[float]], *, title: str = "update sizes",
                            bins: int = 60, log_x: bool = True, xaxis_title: str = "|update| / lr") -> go.Figure:
    """Overlaid histograms (fraction of elements) of each sample, on log10 bins when log_x.

    Zeros cannot sit on a log axis: their fraction is given in the legend instead."""
    if not isinstance(samples, dict) or not samples:
        raise TypeError("update_histogram_figure: samples must be a non-empty dict of name -> values")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"update_histogram_figure: bins must be an int >= 1, got {bins!r}")
    data = {}
    for name, values in samples.items():
        x = (values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(values))
        x = x.to(torch.float64).flatten().abs()
        x = x[torch.isfinite(x)] if x.numel() else x
        data[name] = x
    positive = [x[x > 0] for x in data.values()]
    allpos = torch.cat(positive) if positive else torch.zeros(0)
    if log_x and allpos.numel():
        lo, hi = allpos.log10().min().item(), allpos.log10().max().item()
    elif allpos.numel():
        lo, hi = 0.0, allpos.max().item()
    else:
        lo, hi = 0.0, 1.0
    hi = hi if hi > lo else lo + 1.0
    width = (hi - lo) / bins
    fig = go.Figure()
    for i, (name, x) in enumerate(data.items()):
        n = max(x.numel(), 1)
        zeros = int((x == 0).sum())
        vals = x[x > 0].log10() if log_x else x[x > 0]
        counts = torch.histc(vals, bins=bins, min=lo, max=hi) if vals.numel() else torch.zeros(bins, dtype=x.dtype)
        centers = [lo + (k + 0.5) * width for k in range(bins)]
        label = name + (f" ({100 * zeros / n:.0f}% exactly 0)" if zeros else "")
        fig.add_trace(go.Bar(x=[10 ** c for c in centers] if log_x else centers, y=(counts / n).tolist(),
                             name=label, opacity=0.6, marker_color=_PALETTE[i % len(_PALETTE)],
                             width=[10 ** (c + width / 2) - 10 ** (c - width / 2) for c in centers]
                             if log_x else width))
    fig.update_layout(barmode="overlay", title=title, xaxis_title=xaxis_title, yaxis_title="fraction of elements",
                      height=360, margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def lr_schedule_figure(curves: dict[str, Sequence[float]], *, title: str = "learning rate", log_y: bool = False,
                       xaxis_title: str = "step", yaxis_title: str = "learning rate") -> go.Figure:
    """One line per schedule (name -> per-step values)."""
    if not isinstance(curves, dict) or not curves:
        raise TypeError("lr_schedule_figure: curves must be a non-empty dict of name -> list of values")
    fig = go.Figure()
    for i, (name, ys) in enumerate(curves.items()):
        ys = _values(name, "lr_schedule_figure", ys)
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines", name=name,
                                 line=dict(color=_PALETTE[i % len(_PALETTE)])))
    fig.update_layout(title=title, xaxis_title=xaxis_title, yaxis_title=yaxis_title, height=340,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def bench_bars_figure(rows: list[dict], *, metric: str = "median_ms", label: str = "name", group: str | None = None,
                      title: str | None = None, log_y: bool = False) -> go.Figure:
    """Bars of rows[i][metric] per rows[i][label]; with `group`, one cluster per value of rows[i][group]."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError("bench_bars_figure: rows must be a list of dicts")
    missing = [k for k in (metric, label) + ((group,) if group else ()) if any(k not in r for r in rows)]
    if missing:
        raise ValueError(f"bench_bars_figure: every row needs the key(s) {missing}")
    fig = go.Figure()
    names = list(dict.fromkeys(r[label] for r in rows))
    for i, name in enumerate(names):
        sel = [r for r in rows if r[label] == name]
        x = [str(r[group]) for r in sel] if group else [name]
        fig.add_trace(go.Bar(name=str(name), x=x, y=[r[metric] for r in sel],
                             marker_color=_PALETTE[i % len(_PALETTE)]))
    fig.update_layout(barmode="group", title=title or metric, yaxis_title=metric, height=360,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


# --- chapter 03-adamw: the epsilon trap ---------------------------------------------------------


def step_ratio_figure(log10_eps: float = -8.0, state_dtype: str = "fp32", log2_grad_scale: float = 0.0,
                      eps_mode: str = "outside", steps: int = 100, *, g_min: float = 1e-10, g_max: float = 1.0,
                      n: int = 121) -> go.Figure:
    """|update| / lr against the gradient's size |g| (held constant for `steps` steps).

    Two curves: exact arithmetic (labkit.optim.adamw.ideal_step_ratio), and AdamW with its moments
    stored in `state_dtype` and the loss scaled by 2**log2_grad_scale (effective_step_ratio).
    1 is the learning rate you asked for. Cheap enough for a slider callback (~50 ms at steps=1000).
    """
    from labkit.optim import adamw  # the technique module; viz only draws what it computes

    eps = 10.0 ** log10_eps
    scale = 2.0 ** log2_grad_scale
    g = torch.logspace(math.log10(g_min), math.log10(g_max), n, dtype=torch.float32)  # (n,)
    ideal = adamw.ideal_step_ratio(g.double(), eps=eps, eps_mode=eps_mode)
    got = adamw.effective_step_ratio(g, steps=steps, eps=eps, eps_mode=eps_mode, state_dtype=state_dtype,
                                     grad_scale=scale).double()
    ratio = got / ideal.clamp_min(1e-300)
    off = (ratio - 1).abs() > 0.1
    lost = got == 0
    broken = ~torch.isfinite(got)                                      # m and v both overflowed: inf/inf
    worst = got[~broken].max().item() if (~broken).any() else float("nan")
    parts = [f"max |update|/lr = {worst:.3g}"]
    if lost.any():
        kept = g[~lost]
        small = lost & (g < kept.min()) if kept.numel() else lost     # m rounded to 0: below the range
        big = lost & ~small                                            # v overflowed to inf: above it
        if small.any():
            parts.append(f"update lost (0) for |g| <= {g[small].max().item():.2g}")
        if big.any():
            parts.append(f"v overflows (update 0) for |g| >= {g[big].min().item():.2g}")
    if broken.any():
        parts.append(f"NaN for |g| >= {g[broken].min().item():.2g}")
    off = off | broken
    parts.append(f"{int(off.sum())}/{n} sizes off the exact value by >10%")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=g.tolist(), y=ideal.tolist(), mode="lines", name=f"exact arithmetic, eps={eps:.0e}",
                             line=dict(color="gray", dash="dash")))
    shown = [v if 0 < v < math.inf else None for v in got.tolist()]       # 0 and inf cannot sit on a log axis
    fig.add_trace(go.Scatter(x=g.tolist(), y=shown, mode="lines+markers",
                             marker=dict(size=4), name=f"{state_dtype} states, grad scale 2^{log2_grad_scale:g}",
                             line=dict(color=_PALETTE[1] if state_dtype != "fp32" else _PALETTE[0])))
    fig.add_hline(y=1.0, line=dict(color="black", width=1), annotation_text="the lr you set",
                  annotation_position="bottom right")
    fig.update_layout(title=f"eps {eps_mode} sqrt, {steps} steps: " + "; ".join(parts),
                      xaxis_title="|g| (same gradient every step, before scaling)",
                      yaxis_title="|update| / lr", height=420, margin=dict(l=60, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.22))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log", range=[-4, 6])
    return fig


__all__ = ["bench_bars_figure", "loss_curves_figure", "lr_schedule_figure", "step_ratio_figure",
           "update_histogram_figure"]
