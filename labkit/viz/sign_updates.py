"""Figures of chapter 04-lion-tiger: sign patterns, stale embedding updates, memory, sweeps.

Loss curves: labkit.viz.optim.loss_curves_figure (shared by the optimizer chapters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit.optim.lion import flip_rate, interpolation_trace

COLORS = {"AdamW": "#636efa", "Lion": "#ef553b", "Tiger": "#00cc96"}
_PALETTE = ["#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#fecb52"]  # for runs with other names


def _colors(names) -> list[str]:
    """AdamW/Lion/Tiger keep their colours; other names take the palette in order."""
    out, k = [], 0
    for name in names:
        if name in COLORS:
            out.append(COLORS[name])
        else:
            out.append(_PALETTE[k % len(_PALETTE)])
            k += 1
    return out


def synthetic_gradients(steps: int = 400, noise: float = 1.0, period: int = 400, seed: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """A slowly turning true gradient s_t = sin(2πt/period) and noisy samples g_t = s_t + noise·ξ_t, both (T,)."""
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"synthetic_gradients: steps must be an int >= 2, got {steps!r}")
    if not noise >= 0:
        raise ValueError(f"synthetic_gradients: noise must be >= 0, got {noise!r}")
    t = torch.arange(steps, dtype=torch.float64)
    signal = torch.sin(2 * math.pi * t / period)  # (T,)
    xi = torch.randn(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return signal, signal + noise * xi


def sign_pattern_stats(beta1: float, beta2: float, noise: float, steps: int = 400, seed: int = 0) -> dict:
    """Flip rates of sign(g), sign(c), sign(m) and how often sign(c) agrees with the true gradient's sign."""
    signal, g = synthetic_gradients(steps, noise, seed=seed)
    c, m = interpolation_trace(g, beta1, beta2)
    return {
        "flip_g": flip_rate(g), "flip_c": flip_rate(c), "flip_m": flip_rate(m),
        "agree_g": (torch.sign(g) == torch.sign(signal)).double().mean().item(),
        "agree_c": (torch.sign(c) == torch.sign(signal)).double().mean().item(),
        "agree_m": (torch.sign(m) == torch.sign(signal)).double().mean().item(),
    }


def sign_pattern_figure(beta1: float = 0.9, beta2: float = 0.99, noise: float = 1.0, steps: int = 400,
                        seed: int = 0) -> go.Figure:
    """Top: noisy gradients, the true gradient, Lion's c_t and m_t. Bottom: the signs of g, c, m."""
    signal, g = synthetic_gradients(steps, noise, seed=seed)
    c, m = interpolation_trace(g, beta1, beta2)
    st = sign_pattern_stats(beta1, beta2, noise, steps, seed)
    t = list(range(1, steps + 1))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.06)
    fig.add_trace(go.Scatter(x=t, y=g.tolist(), mode="markers", name="g_t (noisy gradient)",
                             marker=dict(size=3, color="#bbbbbb")), row=1, col=1)
    fig.add_trace(go.Scatter(x=t, y=signal.tolist(), name="true gradient", line=dict(color="black", dash="dash")),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=t, y=m.tolist(), name=f"m_t (β2={beta2:g})", line=dict(color="#636efa")), row=1, col=1)
    fig.add_trace(go.Scatter(x=t, y=c.tolist(), name=f"c_t = β1·m + (1−β1)·g (β1={beta1:g})",
                             line=dict(color="#ef553b", width=1.5)), row=1, col=1)
    z = [torch.sign(v).tolist() for v in (m, c, g)]
    fig.add_trace(go.Heatmap(x=t, y=["sign(m)", "sign(c): Lion's step", "sign(g)"], z=z, zmin=-1, zmax=1,
                             colorscale=[[0, "#2166ac"], [0.5, "#f7f7f7"], [1, "#b2182b"]], showscale=False,
                             hovertemplate="step %{x}: %{z}<extra>%{y}</extra>"), row=2, col=1)
    fig.update_yaxes(title_text="value", row=1, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(
        height=560, margin=dict(l=60, r=20, t=120, b=40), legend=dict(orientation="h", y=1.02, yanchor="bottom"),
        title=dict(text=(f"sign flips per step: g {st['flip_g']:.2f}, c {st['flip_c']:.2f}, m {st['flip_m']:.2f}"
                         f"<br><sup>steps where the sign matches the true gradient: g {st['agree_g']:.0%}, "
                         f"Lion's c {st['agree_c']:.0%}, m {st['agree_m']:.0%}</sup>"), y=0.97, yanchor="top"))
    return fig


def lr_sweep_figure(rows: Sequence[Mapping], *, title: str = "final loss vs learning rate") -> go.Figure:
    """rows: dicts with optimizer, lr, final_loss (and update_rms, optional): one line per optimizer."""
    fig = go.Figure()
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    for name, color in zip(names, _colors(names)):
        pts = sorted((r["lr"], r["final_loss"]) for r in rows if r["optimizer"] == name)
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=name,
                                 line=dict(color=color)))
    fig.update_layout(title=title, xaxis=dict(type="log", title="learning rate"), yaxis_title="final train loss",
                      height=380, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def memory_figure(rows: Sequence[Mapping], *, title: str = "bytes held between steps") -> go.Figure:
    """Stacked bars: optimizer state and .grad bytes held after a (micro-)step, per setting."""
    names = [r["setting"] for r in rows]
    fig = go.Figure([
        go.Bar(x=names, y=[r["state_bytes"] / 2**10 for r in rows], name="optimizer state", marker_color="#636efa"),
        go.Bar(x=names, y=[r["grad_bytes"] / 2**10 for r in rows], name=".grad kept (accumulation buffer)",
               marker_color="#ffa15a"),
    ])
    fig.update_layout(barmode="stack", title=title, yaxis_title="KiB", height=360, margin=dict(l=60, r=20, t=50, b=50))
    return fig


def stale_update_figure(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], *, floor: float = 1e-4,
                        title: str = "update of a row whose token is absent") -> go.Figure:
    """For each run: mean per-step update RMS (in units of its lr) vs steps since the token last appeared.

    Zeros (a lazy optimizer leaves absent rows alone) are drawn at `floor` on the log axis.
    """
    fig = go.Figure()
    for (name, (ages, values)), color in zip(curves.items(), _colors(curves)):
        ys = [max(v, floor) for v in values]
        fig.add_trace(go.Scatter(x=list(ages), y=ys, mode="lines", name=name, line=dict(color=color)))
    fig.update_layout(title=title, xaxis_title="steps since the token last appeared in the batch",
                      yaxis=dict(type="log", title=f"update RMS / lr (zeros drawn at {floor:g})"), height=400,
                      margin=dict(l=70, r=20, t=50, b=50))
    return fig


def fixed_point_figure(trajectories: Mapping[str, Sequence[float]], weight_decay: float, *,
                       title: str | None = None) -> go.Figure:
    """max |θ| of one embedding row per step, after a single gradient, with the sign optimizers' limit 1/λ."""
    fig = go.Figure()
    colors = _colors(name.split(" ")[0] for name in trajectories)
    for (name, ys), color in zip(trajectories.items(), colors):
        fig.add_trace(go.Scatter(x=list(range(1, len(ys) + 1)), y=list(ys), name=name, line=dict(color=color)))
    fig.add_hline(y=1 / weight_decay, line=dict(dash="dash", color="gray"))
    fig.add_annotation(x=1, xref="paper", xanchor="right", y=math.log10(1 / weight_decay), yref="y",  # log axis
                       yshift=-10, showarrow=False, text=f"1/λ = {1 / weight_decay:g}")
    values = [v for ys in trajectories.values() for v in ys if v > 0 and math.isfinite(v)]
    lo = min(values, default=1e-3)
    hi = max(values + [1 / weight_decay])
    fig.update_layout(title=title or "one row, one gradient, then silence",
                      xaxis_title="step", yaxis=dict(type="log", title="max |θ| of the row",
                                                     range=[math.log10(lo) - 0.2, math.log10(hi) + 0.3]),
                      height=380, margin=dict(l=60, r=20, t=50, b=50))
    return fig


__all__ = ["fixed_point_figure", "lr_sweep_figure", "memory_figure", "sign_pattern_figure",
           "sign_pattern_stats", "stale_update_figure", "synthetic_gradients"]
