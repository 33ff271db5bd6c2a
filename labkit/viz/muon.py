"""Figures of chapter 05-muon: the Newton-Schulz singular-value map, spectra, and its cost.

The technique lives in labkit.optim.muon; this module only draws it. Loss curves use the
generic labkit.viz.optim.loss_curves_figure.
"""

from __future__ import annotations


import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit.optim import muon as mu

NS_PRESETS = {
    "Jordan quintic": mu.JORDAN_COEFFICIENTS,
    "classic cubic": mu.CUBIC_COEFFICIENTS,
    "custom": None,
}
STEP_COLORS = ["#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b", "#041f4a"]
_X_LIN = np.linspace(0.0, 1.3, 261)  # for p(x)
_X_LOG = np.geomspace(1e-4, 1.0, 241)  # for p^k(x)


def _coefficients(preset: str, a: float, b: float, c: float) -> tuple[float, float, float]:
    if preset not in NS_PRESETS:
        raise ValueError(f"ns_map_figure: preset must be one of {tuple(NS_PRESETS)}, got {preset!r}")
    return NS_PRESETS[preset] or (float(a), float(b), float(c))


def ns_band(coefficients, steps: int, low: float = 1e-3) -> tuple[float, float]:
    """(min, max) of p^steps(x) over normalized singular values x in [low, 1]."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = mu.ns_singular_value_map(np.geomspace(low, 1.0, 2001), steps, coefficients)
    if not np.all(np.isfinite(y)):
        return -math.inf, math.inf
    return float(np.min(y)), float(np.max(y))


def _finite(y: np.ndarray, bound: float = 1e3) -> np.ndarray:
    """Clip a diverging iteration so the figure stays drawable."""
    return np.clip(np.nan_to_num(y, nan=bound, posinf=bound, neginf=-bound), -bound, bound)


def ns_map_figure(steps: int = 5, preset: str = "Jordan quintic", a: float = 3.4445, b: float = -4.775,
                  c: float = 2.0315) -> go.Figure:
    """Left: one step's polynomial p(x) = a x + b x^3 + c x^5 on [0, 1.3] against y = x and y = 1.
    Right: where 1..steps iterations send a normalized singular value x (log x axis); the exact
    polar factor sends every x > 0 to 1. `preset` other than "custom" overrides a, b, c."""
    if not isinstance(steps, int) or not 1 <= steps <= 50:
        raise ValueError(f"ns_map_figure: steps must be an int in [1, 50], got {steps!r}")
    coef = _coefficients(preset, a, b, c)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("one step: p(x)", f"after k steps: p<sup>k</sup>(x), k = 1..{steps}"))
    p = _finite(mu.ns_polynomial(_X_LIN, coef))
    fig.add_trace(go.Scatter(x=_X_LIN, y=_X_LIN, mode="lines", name="y = x", line=dict(color="#999", dash="dot"),
                             showlegend=False), row=1, col=1)
    fig.add_trace(go.Scatter(x=_X_LIN, y=p, mode="lines", name="p(x)", line=dict(color="#E45756", width=3),
                             showlegend=False, hovertemplate="x=%{x:.3f}<br>p(x)=%{y:.3f}<extra></extra>"),
                  row=1, col=1)
    y = _X_LOG
    for k in range(1, steps + 1):
        with np.errstate(over="ignore", invalid="ignore"):
            y = _finite(mu.ns_polynomial(y, coef))
        last = k == steps
        fig.add_trace(go.Scatter(
            x=_X_LOG, y=y, mode="lines", name=f"k = {k}", showlegend=last or k == 1,
            line=dict(color=STEP_COLORS[min(k - 1, len(STEP_COLORS) - 1)] if not last else "#08306b",
                      width=3 if last else 1.2),
            hovertemplate=f"k={k}<br>x=%{{x:.2e}}<br>p^k(x)=%{{y:.3f}}<extra></extra>"), row=1, col=2)
    for col in (1, 2):
        fig.add_hline(y=1.0, line=dict(color="#54A24B", dash="dash"), row=1, col=col)
    lo, hi = ns_band(coef, steps)
    if math.isfinite(lo):
        fig.add_hrect(y0=lo, y1=hi, fillcolor="#4C78A8", opacity=0.12, line_width=0, row=1, col=2)
    fig.update_xaxes(title_text="x (singular value / ||G||<sub>F</sub>)", row=1, col=1)
    fig.update_xaxes(title_text="x (log scale)", type="log", row=1, col=2)
    ymax = float(np.clip(max(1.4, np.nanmax(np.abs(p))), 1.4, 3.0))
    fig.update_yaxes(range=[-0.2, ymax], row=1, col=1)
    fig.update_yaxes(range=[-0.2, max(1.4, min(hi + 0.1, 3.0))], row=1, col=2)
    landing = (f"lands in [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "diverges for some x")
    fig.update_layout(
        height=380, margin=dict(l=50, r=20, t=80, b=50), legend=dict(orientation="h", y=-0.2),
        title=dict(text=f"(a, b, c) = ({coef[0]:.4g}, {coef[1]:.4g}, {coef[2]:.4g}), p'(0) = {coef[0]:.3g}, "
                        f"p(1) = {sum(coef):.3g}<br><sup>after {steps} steps, x in [1e-3, 1] {landing} "
                        f"(the exact polar factor: 1)</sup>", x=0.01))
    return fig


def _as_numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().double().cpu().numpy()
    return np.asarray(v, dtype=float)


def singular_values_figure(history, *, exact=None, title: str = "Singular values per Newton-Schulz step") -> go.Figure:
    """Every singular value (log y) at each iteration: history[k] holds those of X_k; `exact`
    (optional) those of the SVD's polar factor, drawn as the last column."""
    if not history:
        raise ValueError("singular_values_figure: history must hold at least X_0's singular values")
    fig = go.Figure()
    columns = [(f"X<sub>{k}</sub>", _as_numpy(s)) for k, s in enumerate(history)]
    if exact is not None:
        columns.append(("SVD U V<sup>T</sup>", _as_numpy(exact)))
    for i, (name, s) in enumerate(columns):
        color = "#54A24B" if exact is not None and i == len(columns) - 1 else "#4C78A8"
        fig.add_trace(go.Box(y=np.maximum(s, 1e-8), x=[i] * len(s), name=name, showlegend=False, boxpoints="all",
                             jitter=0.6, pointpos=0, marker=dict(size=3, color=color, opacity=0.6),
                             line=dict(color=color, width=1), fillcolor="rgba(0,0,0,0)",
                             hovertemplate=f"{name}<br>σ=%{{y:.4g}}<extra></extra>"))
    fig.add_hrect(y0=0.68, y1=1.2, fillcolor="#4C78A8", opacity=0.1, line_width=0)
    fig.add_hline(y=1.0, line=dict(color="#54A24B", dash="dash"))
    fig.update_layout(
        title=title, height=380, margin=dict(l=60, r=20, t=60, b=40),
        xaxis=dict(tickmode="array", tickvals=list(range(len(columns))), ticktext=[n for n, _ in columns]),
        yaxis=dict(type="log", title="singular value"))
    return fig


def relative_spectrum_figure(spectra: dict, *, title: str = "Singular value spectra (each scaled to its largest)"
                             ) -> go.Figure:
    """Sorted singular values, each divided by its largest, for several matrices (log y): how flat a
    spectrum is (see labkit.viz.memory.cumulative_energy_figure for the energy in the top k)."""
    if not spectra:
        raise ValueError("relative_spectrum_figure: spectra must map a name to singular values, got nothing")
    fig = go.Figure()
    palette = ["#E45756", "#F58518", "#4C78A8", "#54A24B", "#B279A2"]
    for i, (name, s) in enumerate(spectra.items()):
        s = np.sort(_as_numpy(s))[::-1]
        s = s / s[0] if s.size and s[0] > 0 else s
        fig.add_trace(go.Scatter(x=np.arange(1, len(s) + 1), y=np.maximum(s, 1e-8), mode="lines+markers", name=name,
                                 marker=dict(size=3), line=dict(color=palette[i % len(palette)])))
    fig.update_layout(title=title, height=360, margin=dict(l=60, r=20, t=60, b=40),
                      xaxis_title="index i (largest first)",
                      yaxis=dict(type="log", title="σ<sub>i</sub> / σ<sub>1</sub>"),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def ns_cost_figure(results: list[dict], *, title: str | None = None) -> go.Figure:
    """Newton-Schulz vs SVD time per matrix size (rows of labkit.benchmarks.muon with kind "ns_vs_svd")."""
    rows = [r for r in results if r.get("kind") == "ns_vs_svd"]
    if not rows:
        raise ValueError("ns_cost_figure: no rows with kind 'ns_vs_svd' in results")
    names = [f"{r['m']}×{r['n']}" for r in rows]
    fig = go.Figure([
        go.Bar(x=names, y=[r["median_ms"] for r in rows], name=f"newton_schulz ({rows[0].get('dtype', '')})",
               marker_color="#4C78A8"),
        go.Bar(x=names, y=[r["baseline_ms"] for r in rows], name="torch.linalg.svd → U V^T (fp32)",
               marker_color="#E45756"),
    ])
    device = rows[0].get("device", "")
    fig.update_layout(title=title or f"Orthogonalizing one matrix: Newton-Schulz vs SVD ({device})",
                      barmode="group", height=360, yaxis=dict(type="log", title="median ms"),
                      margin=dict(l=60, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.2))
    return fig


__all__ = ["NS_PRESETS", "ns_band", "ns_cost_figure", "ns_map_figure",
           "relative_spectrum_figure", "singular_values_figure"]
