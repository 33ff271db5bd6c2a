"""Figures of chapter 09-data-order: where a shuffle sends each item, how concentrated its batches are,
loss traces with their spikes, validation loss per source, pacing functions and the difficulty
buckets they admit, sequence-length schedules, and held-out loss against tokens seen.

The technique modules compute (labkit.train.shuffling, labkit.train.curriculum); these only draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit.train import curriculum as cu
from labkit.train import shuffling as sh

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]
_LAYOUT = dict(margin=dict(l=55, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.18))


def _color(i: int) -> str:
    return _PALETTE[i % len(_PALETTE)]


# --------------------------------------------------------------------------- shuffling


def order_figure(strategy: str = "buffer", buffer_size: int = 256, shard_size: int = 64, batch_size: int = 16, *,
                 source: torch.Tensor, seed: int = 0, within: str = "shuffle") -> go.Figure:
    """Top: the storage index of the item emitted at each position, coloured by its source.
    Bottom: the majority-source share of every batch, against a perfectly mixed batch's.
    The title gives the chapter's concentration measures (labkit.train.shuffling.batch_correlation)."""
    source = torch.as_tensor(source).long()
    n = source.numel()
    kw = {"buffer": dict(buffer_size=buffer_size),
          "shard": dict(shard_size=shard_size, within=within)}.get(strategy, {})
    idx = sh.epoch_order(strategy, n, seed=seed, **kw)  # (n,)
    m = sh.batch_correlation(source, idx, batch_size)
    shares = sh.majority_share(sh.batch_counts(source, idx, batch_size))  # (nb,)
    fig = make_subplots(rows=2, cols=1, row_heights=[0.62, 0.38], vertical_spacing=0.2,
                        subplot_titles=("storage index of the item at each position (colour: source)",
                                        f"majority-source share per batch of {batch_size}"))
    pos = torch.arange(n)
    for s in range(int(source.max()) + 1):
        sel = source[idx] == s
        fig.add_trace(go.Scattergl(x=pos[sel].numpy(), y=idx[sel].numpy(), mode="markers", name=f"source {s}",
                                   marker=dict(size=3, color=_color(s))), row=1, col=1)
    fig.add_trace(go.Scatter(x=torch.arange(len(shares)).numpy(), y=shares.numpy(), mode="lines", name="majority share",
                             line=dict(color="black", width=1), showlegend=False), row=2, col=1)
    fig.add_hline(y=m["baseline_share"], line=dict(color="gray", dash="dash"), row=2, col=1,
                  annotation_text="perfectly mixed", annotation_position="bottom right")
    label = {"none": "no shuffle", "full": "full shuffle", "buffer": f"buffer of {buffer_size}",
             "shard": f"shards of {shard_size}, {within} within"}[strategy]
    fig.update_layout(title=f"{label}: majority share {m['majority_share']:.2f} (mixed {m['baseline_share']:.2f}), "
                            f"entropy ratio {m['entropy_ratio']:.2f}, χ²/(K−1) {m['chi2_ratio']:.1f}",
                      height=520, **_LAYOUT)
    fig.update_xaxes(title_text="position in the epoch", row=1, col=1)
    fig.update_yaxes(title_text="storage index", row=1, col=1)
    fig.update_xaxes(title_text="batch", row=2, col=1)
    fig.update_yaxes(range=[0, 1.05], row=2, col=1)
    return fig


def loss_traces_figure(runs: dict[str, dict], *, boundaries: Sequence[int] = (), title: str = "training loss",
                       smooth: int = 1) -> go.Figure:
    """One loss trace per run (runs[name]["losses"]), its spikes (runs[name]["spikes"], steps) marked with
    crosses, and the steps where the unshuffled stream changes source (`boundaries`) as dotted lines."""
    if not isinstance(runs, dict) or not runs:
        raise TypeError("loss_traces_figure: runs must be a non-empty dict of name -> {'losses', 'spikes'}")
    fig = go.Figure()
    for i, (name, r) in enumerate(runs.items()):
        ys = [float(v) for v in r["losses"]]
        if smooth > 1:
            ys = [sum(ys[max(0, t - smooth + 1):t + 1]) / len(ys[max(0, t - smooth + 1):t + 1]) for t in range(len(ys))]
        spikes = list(r.get("spikes", []))
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines", line=dict(color=_color(i), width=1.2),
                                 name=f"{name} ({len(spikes)} spikes)", legendgroup=name))
        if spikes:
            fig.add_trace(go.Scatter(x=spikes, y=[ys[t] for t in spikes], mode="markers", legendgroup=name,
                                     marker=dict(symbol="x", size=9, color=_color(i)), showlegend=False))
    for b in boundaries:
        fig.add_vline(x=b, line=dict(color="gray", dash="dot", width=1))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", height=400, **_LAYOUT)
    return fig


def per_source_figure(val: dict[str, Sequence[float]], *, title: str = "held-out loss per source after training"
                      ) -> go.Figure:
    """Grouped bars: for each run (name -> loss per source), the validation loss on every source."""
    if not isinstance(val, dict) or not val:
        raise TypeError("per_source_figure: val must be a non-empty dict of name -> losses per source")
    fig = go.Figure()
    for i, (name, losses) in enumerate(val.items()):
        fig.add_trace(go.Bar(name=name, x=[f"source {s}" for s in range(len(losses))], y=[float(v) for v in losses],
                             marker_color=_color(i)))
    fig.update_layout(barmode="group", title=title, yaxis_title="loss", height=360, **_LAYOUT)
    return fig


# --------------------------------------------------------------------------- curricula


def pacing_figure(kind: str = "root", c0: float = 0.1, ramp: float = 0.5, p: float = 2.0, n_stages: int = 4,
                  n_buckets: int = 10, at: float = 0.2, *, total_steps: int = 400) -> go.Figure:
    """Top: competence c(t) of every pacing function (the chosen `kind` in bold) with the ramp ending at
    ramp·total_steps and a marker at step at·total_steps. Bottom: the admitted fraction of each
    difficulty bucket (0 = easiest) over the steps, for `kind`. Cheap (a few ms)."""
    ramp_steps = max(1, round(ramp * total_steps))
    step = min(total_steps - 1, max(0, round(at * total_steps)))
    steps = list(range(total_steps))
    fig = make_subplots(rows=2, cols=1, row_heights=[0.5, 0.5], vertical_spacing=0.14,
                        subplot_titles=("competence c(t): the easiest fraction of the data a batch may come from",
                                        f"admitted share of each of {n_buckets} difficulty buckets ({kind})"))
    for i, k in enumerate(cu.PACINGS):
        curve = cu.pacing_curve(k, total_steps, ramp_steps, c0, p=p, n_stages=n_stages).numpy()
        chosen = k == kind
        fig.add_trace(go.Scatter(x=steps, y=curve, mode="lines", name=k,
                                 line=dict(color=_color(i), width=3 if chosen else 1, dash=None if chosen else "dot")),
                      row=1, col=1)
    c_now = cu.pacing(kind, step, ramp_steps, c0, p=p, n_stages=n_stages)
    fig.add_vline(x=step, line=dict(color="black", width=1), row=1, col=1)
    grid = torch.stack([cu.eligible_buckets(cu.pacing(kind, t, ramp_steps, c0, p=p, n_stages=n_stages), n_buckets)
                        for t in steps], dim=1)  # (buckets, steps)
    fig.add_trace(go.Heatmap(z=grid.numpy(), x=steps, y=list(range(n_buckets)), colorscale="Blues", zmin=0, zmax=1,
                             showscale=False, name="admitted"), row=2, col=1)
    fig.add_vline(x=step, line=dict(color="black", width=1), row=2, col=1)
    now = cu.eligible_buckets(c_now, n_buckets)
    full = [b for b in range(n_buckets) if now[b] >= 1.0]
    partial = [(b, now[b].item()) for b in range(n_buckets) if 0.0 < now[b] < 1.0]
    parts = [f"buckets 0–{full[-1]} in full" if len(full) > 1 else ("bucket 0 in full" if full else "no full bucket")]
    parts += [f"{100 * f:.0f}% of bucket {b}" for b, f in partial]
    fig.update_layout(title=f"step {step}: c = {c_now:.2f} → " + ", ".join(parts), height=560, **_LAYOUT)
    fig.update_yaxes(range=[0, 1.05], title_text="c(t)", row=1, col=1)
    fig.update_yaxes(title_text="bucket (0 = easiest)", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    return fig


def seqlen_figure(schedules: dict[str, Sequence[int]], *, title: str = "sequence length per step") -> go.Figure:
    """One step line per schedule (name -> sequence length at each step)."""
    if not isinstance(schedules, dict) or not schedules:
        raise TypeError("seqlen_figure: schedules must be a non-empty dict of name -> lengths per step")
    fig = go.Figure()
    for i, (name, ls) in enumerate(schedules.items()):
        fig.add_trace(go.Scatter(x=list(range(len(ls))), y=list(ls), mode="lines", name=name,
                                 line=dict(shape="hv", color=_color(i))))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="tokens per sequence", height=320, **_LAYOUT)
    return fig


def val_vs_tokens_figure(runs: dict[str, dict], *, title: str = "held-out loss against tokens seen") -> go.Figure:
    """One line per run: runs[name]["tokens"] against runs[name]["val"] (labkit.train.curriculum.train_and_evaluate)."""
    if not isinstance(runs, dict) or not runs:
        raise TypeError("val_vs_tokens_figure: runs must be a non-empty dict of name -> {'tokens', 'val'}")
    fig = go.Figure()
    for i, (name, r) in enumerate(runs.items()):
        fig.add_trace(go.Scatter(x=list(r["tokens"]), y=list(r["val"]), mode="lines+markers", name=name,
                                 marker=dict(size=5), line=dict(color=_color(i))))
    finals = [r["val"][-1] for r in runs.values()]
    lo, hi = min(finals), max(r["val"][1] if len(r["val"]) > 1 else r["val"][0] for r in runs.values())
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        fig.update_yaxes(range=[lo - 0.1 * (hi - lo), hi + 0.05 * (hi - lo)])
    fig.update_layout(title=title, xaxis_title="tokens seen", yaxis_title="held-out loss", height=380, **_LAYOUT)
    return fig


__all__ = ["loss_traces_figure", "order_figure", "pacing_figure", "per_source_figure", "seqlen_figure",
           "val_vs_tokens_figure"]
