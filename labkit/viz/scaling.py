"""Figures of chapter 10-scaling-laws: iso-FLOP curves and the over-training panel, the fit on
measured runs, the iso-loss map with its compute-optimal frontier, and where real models sit.

The technique lives in labkit.train.scaling; this module only draws it.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.train import scaling as sc

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]
# Public (N, D) of well-known runs: parameters, training tokens.
REFERENCE_MODELS = {
    "GPT-3 175B": (175e9, 300e9),
    "Gopher 280B": (280e9, 300e9),
    "Chinchilla 70B": (70e9, 1.4e12),
    "LLaMA 7B": (6.7e9, 1.0e12),
    "Llama 2 7B": (6.7e9, 2.0e12),
    "Llama 3 8B": (8.0e9, 15e12),
    "TinyLlama 1.1B": (sc.TINYLLAMA_PARAMS, sc.TINYLLAMA_TOKENS),
}
_LABEL_POSITION = {"GPT-3 175B": "middle left", "LLaMA 7B": "top left", "Llama 2 7B": "bottom right",
                   "Chinchilla 70B": "bottom right"}  # keep neighbouring labels apart (default: top center)


def _human(x: float) -> str:
    """1.1e9 -> '1.1B', 3e12 -> '3T'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _short(x: float) -> str:
    """2727.3 -> '2,727', 35.06 -> '35', 0.0123 -> '0.012'."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _law(name_or_law) -> sc.ScalingLaw:
    if isinstance(name_or_law, sc.ScalingLaw):
        return name_or_law
    if name_or_law not in sc.PUBLISHED:
        raise ValueError(f"scaling figures: law must be a ScalingLaw or one of {tuple(sc.PUBLISHED)}, "
                         f"got {name_or_law!r}")
    return sc.PUBLISHED[name_or_law]


# --------------------------------------------------------------------------- the Play panel


def overtraining_figure(log10_flops: float = 22.3, log10_params: float = 9.04, law="chinchilla") -> go.Figure:
    """Left: predicted loss along the iso-FLOP curve of the budget C = 10^log10_flops (and C/10, 10C
    faintly), its optimum, and a model of N = 10^log10_params trained on C/(6N) tokens.
    Right: lifetime FLOPs (training + 2N per served token) of that model and of the compute-optimal
    model that reaches the same loss; they cross at the break-even number of served tokens."""
    law = _law(law)
    C = 10.0 ** float(log10_flops)
    N = 10.0 ** float(log10_params)
    D = C / (sc.FLOPS_PER_PARAM_TOKEN * N)
    o = sc.overtraining(N, D, law)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("loss along the iso-FLOP curve", "lifetime FLOPs vs tokens served"))
    n_opt = o.opt_N
    Ns = np.geomspace(n_opt / 3e3, n_opt * 3e2, 241)
    lowest = law.E
    for scale, width, color, label in ((0.1, 1, "#bbb", "C / 10"), (10.0, 1, "#888", "10 C"), (1.0, 3, _PALETTE[0], "C")):
        curve = sc.iso_flop(C * scale, Ns, law)
        lowest = curve.min() if scale == 10.0 else lowest
        fig.add_trace(go.Scatter(x=Ns, y=curve, mode="lines", name=f"iso-FLOP {label}",
                                 line=dict(color=color, width=width)), row=1, col=1)
    fig.add_trace(go.Scatter(x=[o.opt_N], y=[o.opt_loss], mode="markers", name="compute-optimal",
                             marker=dict(symbol="star", size=14, color=_PALETTE[2])), row=1, col=1)
    fig.add_trace(go.Scatter(x=[N, N], y=[o.opt_loss, o.loss], mode="lines+markers", name="your model",
                             marker=dict(size=[0, 11], color=_PALETTE[1]), line=dict(color=_PALETTE[1], dash="dot")),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=[o.same_loss_N], y=[o.loss], mode="markers", name="same loss, compute-optimal",
                             marker=dict(symbol="diamond", size=10, color=_PALETTE[3])), row=1, col=1)

    T = np.geomspace(1e7, 1e15, 97)  # served tokens
    ours = sc.lifetime_flops(N, D, T)
    theirs = sc.lifetime_flops(o.same_loss_N, o.same_loss_D, T)
    fig.add_trace(go.Scatter(x=T, y=ours, mode="lines", name=f"lifetime: your model ({_human(N)})",
                             line=dict(color=_PALETTE[1], width=3)), row=1, col=2)
    fig.add_trace(go.Scatter(x=T, y=theirs, mode="lines", name=f"lifetime: same loss, compute-optimal "
                             f"({_human(o.same_loss_N)})", line=dict(color=_PALETTE[3], width=3)), row=1, col=2)
    if 0 < o.break_even_tokens < math.inf:
        fig.add_vline(x=o.break_even_tokens, line=dict(color="#555", dash="dash"), row=1, col=2)
    fig.update_xaxes(type="log", title_text="parameters N", row=1, col=1)
    fig.update_yaxes(title_text="predicted loss (nats/token)", range=[lowest - 0.15, max(o.loss, o.opt_loss + 0.6) + 0.3],
                     row=1, col=1)
    fig.update_xaxes(type="log", title_text="tokens served (inference)", row=1, col=2)
    fig.update_yaxes(type="log", title_text="training + inference FLOPs", row=1, col=2)
    if o.break_even_tokens == math.inf:
        verdict = "bigger than optimal: costs more to train and to serve"
    elif o.break_even_tokens == 0:
        verdict = "compute-optimal"
    else:
        verdict = f"repays its extra training after {_human(o.break_even_tokens)} served tokens"
    title = (f"C = {C:.3g} FLOPs · optimum N = {_human(o.opt_N)}, D = {_human(o.opt_D)} "
             f"({_short(o.opt_D / o.opt_N)} tok/param), L = {o.opt_loss:.3f}"
             f"<br><sup>N = {_human(N)} on D = {_human(D)} ({_short(o.tokens_per_param)} tok/param): L = {o.loss:.3f} "
             f"(+{o.loss_gap:.3f}); the same loss compute-optimally: N = {_human(o.same_loss_N)} with "
             f"{_short(100 / o.compute_overhead)}% of the compute; {verdict}</sup>")
    fig.update_layout(title=title, height=460, margin=dict(l=60, r=20, t=90, b=40),
                      legend=dict(orientation="h", y=-0.2), hovermode="closest")
    return fig


# --------------------------------------------------------------------------- measured runs and the fit


def fit_figure(runs, law: sc.ScalingLaw | None = None, *, min_tokens: int = 0, title: str | None = None,
               extrapolate: float = 4.0) -> go.Figure:
    """Validation loss vs tokens (log x), one colour per width: measured points (hollow where
    excluded from the fit by min_tokens) and, with a law, its prediction L(N, D) for each run's N
    (extended `extrapolate` times past the last checkpoint)."""
    if not isinstance(runs, (list, tuple)) or not runs:
        raise TypeError("fit_figure: runs must be a non-empty list of ScalingRun")
    fig = go.Figure()
    for i, r in enumerate(runs):
        color = _PALETTE[i % len(_PALETTE)]
        t = np.asarray(r.tokens, dtype=float)
        used = t >= min_tokens
        label = f"d={r.width} (N={_human(r.params)})"
        fig.add_trace(go.Scatter(x=t[used], y=np.asarray(r.val_loss)[used], mode="markers", name=label,
                                 legendgroup=label, marker=dict(color=color, size=8)))
        if (~used).any():
            fig.add_trace(go.Scatter(x=t[~used], y=np.asarray(r.val_loss)[~used], mode="markers", showlegend=False,
                                     legendgroup=label, marker=dict(color=color, size=8, symbol="circle-open")))
        if law is not None:
            Ds = np.geomspace(max(t.min(), min_tokens or t.min()), t.max() * extrapolate, 60)
            fig.add_trace(go.Scatter(x=Ds, y=law.loss(r.params, Ds), mode="lines", showlegend=False,
                                     legendgroup=label, line=dict(color=color)))
    if law is not None:
        head = (f"fit: E={law.E:.3f}, A={law.A:.4g}, B={law.B:.4g}, α={law.alpha:.3f}, β={law.beta:.3f}")
    else:
        head = "measured runs"
    fig.update_layout(title=title or head, xaxis_title="training tokens D", yaxis_title="validation loss (nats/token)",
                      xaxis_type="log", height=420, margin=dict(l=60, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def iso_loss_figure(law: sc.ScalingLaw, *, runs=None, n_range: tuple[float, float] | None = None,
                    d_range: tuple[float, float] | None = None, flops: list[float] | None = None,
                    title: str | None = None) -> go.Figure:
    """Contours of L(N, D) over log N (x) and log D (y), iso-FLOP lines D = C/(6N) (dashed), the
    compute-optimal frontier (N_opt(C), D_opt(C)) and, if given, the measured runs' points."""
    if not isinstance(law, sc.ScalingLaw):
        raise TypeError(f"iso_loss_figure: law must be a ScalingLaw, got {type(law).__name__}")
    if runs:
        Nr = np.array([r.params for r in runs for _ in r.tokens], dtype=float)
        Dr = np.array([t for r in runs for t in r.tokens], dtype=float)
        n_range = n_range or (Nr.min() / 4, Nr.max() * 8)
        d_range = d_range or (Dr.min() / 4, Dr.max() * 8)
    if n_range is None or d_range is None:
        raise ValueError("iso_loss_figure: give runs or both n_range and d_range")
    ln = np.linspace(math.log10(n_range[0]), math.log10(n_range[1]), 80)
    ld = np.linspace(math.log10(d_range[0]), math.log10(d_range[1]), 80)
    Z = law.loss(10.0 ** ln[None, :], 10.0 ** ld[:, None])  # (len(ld), len(ln))
    lo = float(Z.min())
    hi = min(float(Z.max()), lo + 2.0)  # 0.1-nat levels over the interesting range; higher losses saturate
    fig = go.Figure(go.Contour(x=ln, y=ld, z=Z, colorscale="Viridis_r", name="L(N, D)", zmin=lo, zmax=hi,
                               contours=dict(start=math.ceil(lo * 10) / 10, end=hi, size=0.1, showlabels=True,
                                             labelfont=dict(size=9, color="white")),
                               colorbar=dict(title="loss")))
    lo_c = sc.FLOPS_PER_PARAM_TOKEN * n_range[0] * d_range[0]
    hi_c = sc.FLOPS_PER_PARAM_TOKEN * n_range[1] * d_range[1]
    flops = flops or list(10.0 ** np.arange(math.ceil(math.log10(lo_c)), math.floor(math.log10(hi_c)) + 1))
    for C in flops:
        Ns = 10.0 ** ln
        fig.add_trace(go.Scatter(x=ln, y=np.log10(C / (sc.FLOPS_PER_PARAM_TOKEN * Ns)), mode="lines",
                                 line=dict(color="white", dash="dash", width=1), showlegend=False,
                                 hovertext=f"C = {C:.0e}", hoverinfo="text"))
    Cs = np.geomspace(lo_c, hi_c, 100)
    No, Do = sc.compute_optimal(Cs, law)
    fig.add_trace(go.Scatter(x=np.log10(No), y=np.log10(Do), mode="lines", name="compute-optimal frontier",
                             line=dict(color="#d62728", width=3)))
    if runs:
        fig.add_trace(go.Scatter(x=np.log10(Nr), y=np.log10(Dr), mode="markers", name="measured runs",
                                 marker=dict(color="white", size=7, line=dict(color="black", width=1))))
    fig.update_layout(title=title or f"L(N, D) of {law.name or 'the law'}: iso-loss contours, iso-FLOP lines (dashed)",
                      xaxis_title="log10 parameters N", yaxis_title="log10 tokens D", height=480,
                      xaxis_range=[ln[0], ln[-1]], yaxis_range=[ld[0], ld[-1]],
                      margin=dict(l=60, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.15))
    return fig


def frontier_figure(laws=("chinchilla", "besiroglu"), models: dict | None = None, *,
                    flops_range: tuple[float, float] = (1e19, 1e26), title: str | None = None) -> go.Figure:
    """Parameters vs training compute: each law's compute-optimal N_opt(C) (solid) and 20 tokens per
    parameter (dotted), with real models placed at (6ND, N) and labelled with their tokens per parameter."""
    models = REFERENCE_MODELS if models is None else models
    Cs = np.geomspace(*flops_range, 120)
    fig = go.Figure()
    for i, name in enumerate(laws):
        law = _law(name)
        No, _ = sc.compute_optimal(Cs, law)
        fig.add_trace(go.Scatter(x=Cs, y=No, mode="lines", name=f"N_opt: {law.name}", line=dict(color=_PALETTE[i])))
    fig.add_trace(go.Scatter(x=Cs, y=np.sqrt(Cs / (sc.FLOPS_PER_PARAM_TOKEN * 20)), mode="lines",
                             name="20 tokens / parameter", line=dict(color="#777", dash="dot")))
    for j, (label, (N, D)) in enumerate(models.items()):
        fig.add_trace(go.Scatter(x=[sc.training_flops(N, D)], y=[N], mode="markers+text", name=label,
                                 text=[f"{label}<br>{D / N:.0f} tok/param"],
                                 textposition=_LABEL_POSITION.get(label, "top center"),
                                 textfont=dict(size=9), showlegend=False,
                                 marker=dict(size=10, color=_PALETTE[(j + 3) % len(_PALETTE)])))
    fig.update_layout(title=title or "Compute-optimal model size vs where real models sit",
                      xaxis_title="training FLOPs C = 6ND", yaxis_title="parameters N", xaxis_type="log",
                      yaxis_type="log", height=460, margin=dict(l=60, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def inference_optimal_figure(loss: float, law="chinchilla", *, tokens_range=(1e9, 1e15)) -> go.Figure:
    """Sardana & Frankle's view: the model size (left axis) and tokens per parameter (right axis) that
    reach `loss` with the fewest lifetime FLOPs, as the number of served tokens grows."""
    law = _law(law)
    Ts = np.geomspace(*tokens_range, 25)
    pairs = [sc.inference_optimal(loss, float(T), law) for T in Ts]
    Ns = np.array([p[0] for p in pairs])
    ratio = np.array([p[1] / p[0] for p in pairs])
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=Ts, y=Ns, mode="lines+markers", name="parameters N"), secondary_y=False)
    fig.add_trace(go.Scatter(x=Ts, y=ratio, mode="lines+markers", name="tokens per parameter",
                             line=dict(dash="dot")), secondary_y=True)
    fig.update_xaxes(type="log", title_text="tokens served over the model's life")
    fig.update_yaxes(type="log", title_text="parameters N", secondary_y=False)
    fig.update_yaxes(type="log", title_text="training tokens / parameter", secondary_y=True, dtick=1,
                     tickformat=",.0f", showgrid=False)
    fig.update_layout(title=f"The model that reaches L = {loss:.3f} with the fewest lifetime FLOPs, under {law.name}",
                      height=400,
                      margin=dict(l=60, r=60, t=60, b=40), legend=dict(orientation="h", y=-0.2))
    return fig
