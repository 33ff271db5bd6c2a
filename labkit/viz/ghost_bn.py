"""Figures of chapter 08-ghost-bn: the noise of batch statistics, the generalization gap, timings.

The technique lives in labkit.train.ghost_bn; this module only draws it.
"""

from __future__ import annotations

import functools
import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit.train import ghost_bn as gbn

POPULATION = 32768  # values in each fixed population the Play panel samples batches from
BATCH_SIZES = tuple(2**i for i in range(1, 11))  # 2 .. 1024
MIN_DRAWS = 1024  # batches drawn per batch size (several shuffled epochs when B is large)
DISTRIBUTIONS = ("gaussian", "relu(gaussian)", "laplace")
_COLORS = {"ghost": "#d62728", "large": "#1f77b4", "theory": "#555"}


@functools.lru_cache(maxsize=None)
def population(distribution: str = "gaussian") -> torch.Tensor:
    """A fixed (POPULATION, 1) tensor of activations scaled to unit std: Gaussian, ReLU of a Gaussian, or Laplace."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"population: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(POPULATION, 1, generator=g, dtype=torch.float64)
    if distribution == "relu(gaussian)":
        z = z.clamp_min(0)
    elif distribution == "laplace":
        u = torch.rand(POPULATION, 1, generator=g, dtype=torch.float64) - 0.5
        z = -torch.sign(u) * torch.log1p(-2 * u.abs())
    return z / z.std(correction=0)


def sampled_spread(distribution: str, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and biased variances (1-D) of >= MIN_DRAWS batches of `batch_size` drawn like a data loader."""
    x = population(distribution)
    per_epoch = POPULATION // batch_size
    epochs = max(1, math.ceil(MIN_DRAWS / per_epoch))
    m, v = gbn.batch_statistics(x, batch_size, epochs=epochs, generator=torch.Generator().manual_seed(seed))
    return m[:, 0], v[:, 0]


@functools.lru_cache(maxsize=None)
def spread_curve(distribution: str) -> dict:
    """Measured and closed-form std of the batch mean and variance for every B in BATCH_SIZES."""
    x = population(distribution)
    sigma = x.std(correction=0).item()
    kurt = gbn.excess_kurtosis(x).item()
    out = dict(batch_sizes=list(BATCH_SIZES), sigma=sigma, excess_kurtosis=kurt,
               mean_std=[], var_std=[], mean_theory=[], var_theory=[])
    for b in BATCH_SIZES:
        m, v = sampled_spread(distribution, b)
        out["mean_std"].append(m.std().item())
        out["var_std"].append(v.std().item())
        out["mean_theory"].append(gbn.mean_std(b, sigma, population=POPULATION))
        out["var_theory"].append(gbn.var_std(b, sigma, kurt))
    return out


def stat_spread_figure(ghost_batch_size: int = 32, distribution: str = "gaussian", large_batch: int = 512) -> go.Figure:
    """The Play panel. Left and middle: histograms of the mean and of the (biased) variance of
    batches of `ghost_batch_size` and of `large_batch` samples, drawn without replacement from
    one fixed population. Right: their standard deviations against the batch size (log-log),
    measured and in closed form (sigma / sqrt(B); the variance's from the excess kurtosis)."""
    if ghost_batch_size not in BATCH_SIZES:
        raise ValueError(f"stat_spread_figure: ghost_batch_size must be one of {BATCH_SIZES}, got {ghost_batch_size!r}")
    if large_batch not in BATCH_SIZES:
        raise ValueError(f"stat_spread_figure: large_batch must be one of {BATCH_SIZES}, got {large_batch!r}")
    curve = spread_curve(distribution)
    sigma, kurt = curve["sigma"], curve["excess_kurtosis"]
    mu = population(distribution).mean().item()
    m_g, v_g = sampled_spread(distribution, ghost_batch_size)
    m_l, v_l = sampled_spread(distribution, large_batch, seed=1)
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, column_widths=[0.3, 0.3, 0.4],
                        subplot_titles=("batch mean", "batch variance (biased)", "std of the estimate vs B"))
    for col, (g_vals, l_vals, center) in enumerate(((m_g, m_l, mu), (v_g, v_l, sigma**2)), start=1):
        for vals, name, color in ((g_vals, f"G = {ghost_batch_size}", _COLORS["ghost"]),
                                  (l_vals, f"B = {large_batch}", _COLORS["large"])):
            fig.add_trace(go.Histogram(x=vals.numpy(), name=name, marker_color=color, opacity=0.6,
                                       histnorm="probability density", nbinsx=60, legendgroup=name,
                                       showlegend=col == 1), row=1, col=col)
        fig.add_vline(x=center, line=dict(color="#333", dash="dot"), row=1, col=col)
    bs = curve["batch_sizes"]
    for key, theory, name, dash in (("mean_std", "mean_theory", "mean", "solid"),
                                    ("var_std", "var_theory", "variance", "dash")):
        fig.add_trace(go.Scatter(x=bs, y=curve[theory], mode="lines", name=f"{name}: closed form",
                                 line=dict(color=_COLORS["theory"], dash=dash)), row=1, col=3)
        fig.add_trace(go.Scatter(x=bs, y=curve[key], mode="markers", name=f"{name}: measured",
                                 marker=dict(color=_COLORS["large"], symbol="circle" if name == "mean" else "square")),
                      row=1, col=3)
    i = bs.index(ghost_batch_size)
    fig.add_trace(go.Scatter(x=[ghost_batch_size] * 2, y=[curve["mean_std"][i], curve["var_std"][i]], mode="markers",
                             name=f"G = {ghost_batch_size}", marker=dict(color=_COLORS["ghost"], size=12),
                             showlegend=False), row=1, col=3)
    fig.update_xaxes(type="log", title_text="batch size B", row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=3)
    ratio = m_g.std().item() / m_l.std().item()
    title = (f"{distribution}, G = {ghost_batch_size}: std of the batch mean {m_g.std().item():.3f} "
             f"(σ/√G = {sigma / math.sqrt(ghost_batch_size):.3f}), of the batch variance {v_g.std().item():.3f} "
             f"(closed form {gbn.var_std(ghost_batch_size, sigma, kurt):.3f})"
             f"<br><sup>{ratio:.1f}x the spread of B = {large_batch} (√(B/G) = "
             f"{math.sqrt(large_batch / ghost_batch_size):.1f}); excess kurtosis {kurt:.2f}</sup>")
    fig.update_layout(title=title, barmode="overlay", height=420, margin=dict(l=50, r=20, t=80, b=40),
                      legend=dict(orientation="h", y=-0.18))
    return fig


def noise_vs_batch_figure(batch_sizes, measured: dict[str, list[float]], theory: dict[str, list[float]] | None = None,
                          *, title: str = "Noise of batch statistics vs batch size",
                          yaxis_title: str = "std across batches / population std") -> go.Figure:
    """Log-log: one marker series per entry of `measured` (name -> values per batch size), a
    line per entry of `theory`."""
    bs = [int(b) for b in batch_sizes]
    if not isinstance(measured, dict) or not measured:
        raise TypeError("noise_vs_batch_figure: measured must be a non-empty dict of name -> values")
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (name, ys) in enumerate(measured.items()):
        if len(ys) != len(bs):
            raise ValueError(f"noise_vs_batch_figure: measured[{name!r}] has {len(ys)} values "
                             f"for {len(bs)} batch sizes")
        fig.add_trace(go.Scatter(x=bs, y=list(ys), mode="markers+lines", name=name,
                                 line=dict(color=palette[i % 4], width=1), marker=dict(size=8)))
    for name, ys in (theory or {}).items():
        fig.add_trace(go.Scatter(x=bs, y=list(ys), mode="lines", name=name, line=dict(color="#555", dash="dash")))
    fig.update_layout(title=title, height=380, xaxis_title="batch size B", yaxis_title=yaxis_title,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def generalization_figure(rows: list[dict], *, title: str = "Test accuracy and loss after the same number of epochs"
                          ) -> go.Figure:
    """Bars of test accuracy (error bars: std over seeds) and test loss per configuration (row "name").
    Colours: ghost batch norm (ghost_batch_size < batch_size) red, plain batch norm blue, and the
    first row green when it is plain batch norm (the small-batch reference)."""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise TypeError("generalization_figure: rows must be a non-empty list of dicts")
    missing = [k for k in ("name", "test_acc", "test_loss") if any(k not in r for r in rows)]
    if missing:
        raise ValueError(f"generalization_figure: every row needs the key(s) {missing}")
    names = [r["name"] for r in rows]
    def color(i: int, r: dict) -> str:
        if r.get("ghost_batch_size", 0) < r.get("batch_size", 0):
            return "#d62728"
        return "#2ca02c" if i == 0 else "#1f77b4"

    colors = [color(i, r) for i, r in enumerate(rows)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("test accuracy", "test loss (cross-entropy)"),
                        horizontal_spacing=0.12)
    fig.add_trace(go.Bar(x=names, y=[r["test_acc"] for r in rows], marker_color=colors, showlegend=False,
                         error_y=dict(type="data", array=[r.get("test_acc_std", 0.0) for r in rows])), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[r["test_loss"] for r in rows], marker_color=colors, showlegend=False),
                  row=1, col=2)
    lo = min(r["test_acc"] for r in rows)
    fig.update_yaxes(range=[max(0.0, lo - 0.05), min(1.0, max(r["test_acc"] for r in rows) + 0.03)], row=1, col=1)
    fig.update_layout(title=title, height=420, margin=dict(l=50, r=20, t=60, b=120))
    return fig


def timing_figure(rows: list[dict], *, title: str | None = None) -> go.Figure:
    """Forward+backward ms against the ghost batch size, one panel per layout: GhostBatchNorm
    (folded), the per-ghost-batch loop, and nn.BatchNorm as a flat line."""
    rows = [r for r in rows if r.get("kind") == "timing"]
    if not rows:
        raise ValueError("timing_figure: no rows of kind 'timing'")
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig = make_subplots(rows=1, cols=len(layouts), horizontal_spacing=0.1,
                        subplot_titles=[f"{lay} {tuple(next(r for r in rows if r['layout'] == lay)['shape'])}"
                                        for lay in layouts])
    for c, lay in enumerate(layouts, start=1):
        sel = sorted((r for r in rows if r["layout"] == lay), key=lambda r: -r["ghost_batch_size"])
        gs = [r["ghost_batch_size"] for r in sel]
        for key, name, color in (("median_ms", "GhostBatchNorm (folded)", "#d62728"),
                                 ("loop_ms", "one F.batch_norm per ghost batch", "#ff9896"),
                                 ("baseline_ms", "nn.BatchNorm (whole batch)", "#1f77b4")):
            fig.add_trace(go.Scatter(x=gs, y=[r[key] for r in sel], name=name, mode="lines+markers",
                                     line=dict(color=color, dash="dash" if key == "baseline_ms" else "solid"),
                                     legendgroup=name, showlegend=c == 1), row=1, col=c)
        fig.update_xaxes(type="log", title_text="ghost batch size G", autorange="reversed", row=1, col=c)
        fig.update_yaxes(type="log", title_text="ms (forward + backward)" if c == 1 else None, row=1, col=c)
    device = rows[0].get("device", "")
    fig.update_layout(title=title or f"Ghost batch norm vs batch norm on {device}", height=400,
                      margin=dict(l=60, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.2))
    return fig



__all__ = ["BATCH_SIZES", "DISTRIBUTIONS", "generalization_figure", "noise_vs_batch_figure", "population",
           "sampled_spread", "spread_curve", "stat_spread_figure", "timing_figure"]
