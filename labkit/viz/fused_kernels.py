"""Figures of chapter 17-fused-kernels: the loss layer's memory against vocabulary and chunk size,
bytes moved by eager vs fused ops, and the kernels' benchmarks.

The techniques live in labkit.kernels; this module only draws them.
"""

from __future__ import annotations

import plotly.graph_objects as go
import triton
from plotly.subplots import make_subplots

from labkit import _checks
from labkit.kernels.fused_linear_ce import loss_layer_bytes
from labkit.perf import roofline

EAGER, FUSED, GRADS, LIGER = "#E45756", "#4C78A8", "#BAB0AC", "#54A24B"
H100_GB = 80


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{n / 1e3:.3g} kB"


def loss_memory_figure(tokens: int = 8192, vocab: int = 128256, hidden: int = 4096, dtype: str = "bf16",
                       chunk_size: int = 0) -> go.Figure:
    """Left: peak memory of the loss layer beyond its inputs, eager vs fused (labkit.kernels.fused_linear_ce.
    loss_layer_bytes), split into logits-sized buffers and the gradients dx, dW.
    Right: fused memory against the chunk size (log x), eager as a flat line. chunk_size 0 = Liger's rule."""
    owner = "loss_memory_figure"
    for name, v in (("tokens", tokens), ("vocab", vocab), ("hidden", hidden)):
        _checks.integer(owner, name, v, low=1)
    b = roofline.bytes_per_element(dtype, where=owner)
    m = loss_layer_bytes(tokens, vocab, hidden, b, chunk_size or None)
    c = m["chunk_size"]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6], horizontal_spacing=0.12,
                        subplot_titles=("eager vs fused", "fused memory against chunk size"))
    grads, logits = m["gradients"], m["logits"]
    eager_grads = grads if m["eager"] == logits + grads else 0  # at eager's peak, are dx and dW allocated yet?
    labels = ["eager", f"fused (C={c})"]
    fig.add_trace(go.Bar(x=labels, y=[m["eager"] - eager_grads, m["fused"] - grads], name="logits-sized buffers",
                         marker_color=[EAGER, FUSED], hovertemplate="%{y:.3s}B<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=[eager_grads, grads], name="gradients dx, dW", marker_color=GRADS,
                         hovertemplate="%{y:.3s}B<extra></extra>"), row=1, col=1)
    chunks = sorted({min(2 ** k, tokens) for k in range(0, max(1, tokens.bit_length()))} | {c})
    fused = [loss_layer_bytes(tokens, vocab, hidden, b, k)["fused"] for k in chunks]
    fig.add_trace(go.Scatter(x=chunks, y=fused, mode="lines+markers", name="fused", line=dict(color=FUSED),
                             customdata=[triton.cdiv(tokens, k) for k in chunks],
                             hovertemplate="C=%{x}: %{y:.3s}B, %{customdata} chunks<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=[chunks[0], chunks[-1]], y=[m["eager"]] * 2, mode="lines", name="eager",
                             line=dict(color=EAGER, dash="dash")), row=1, col=2)
    fig.add_trace(go.Scatter(x=[c], y=[m["fused"]], mode="markers", marker=dict(size=12, color=FUSED,
                             symbol="diamond"), showlegend=False, hoverinfo="skip"), row=1, col=2)
    fig.update_layout(
        barmode="stack", height=400, margin=dict(l=60, r=20, t=90, b=40), legend=dict(orientation="h", y=-0.15),
        title=dict(x=0.01, text=(f"{tokens:,} tokens x {vocab:,} vocab ({dtype}): eager {_gb(m['eager'])}, fused "
                                 f"{_gb(m['fused'])} = {m['fused'] / m['eager']:.2f}x<br><sup>logits alone "
                                 f"{_gb(logits)} ({logits / (H100_GB * 1e9):.1%} of an "
                                 f"80 GB H100); fused holds {triton.cdiv(tokens, c)} chunk(s) of {c} rows, "
                                 "one at a time</sup>")))
    fig.update_yaxes(title_text="bytes", row=1, col=1)
    fig.update_xaxes(type="log", title_text="chunk size C (tokens)", row=1, col=2)
    fig.update_yaxes(type="log", title_text="bytes", row=1, col=2)
    return fig


def traffic_figure(rows: list[dict], *, title: str = "Bytes to and from memory, forward + backward") -> go.Figure:
    """Eager PyTorch's counted bytes (ByteCounter) vs the fused kernels' minimum, one pair of bars per op;
    rows: dicts with name, eager_bytes, fused_bytes."""
    if not rows:
        raise ValueError("traffic_figure: rows must hold dicts with name, eager_bytes and fused_bytes")
    names = [r["name"] for r in rows]
    fig = go.Figure([
        go.Bar(x=names, y=[r["eager_bytes"] for r in rows], name="eager (aten ops, counted)", marker_color=EAGER,
               text=[f"{r['eager_bytes'] / r['fused_bytes']:.1f}x" for r in rows], textposition="outside"),
        go.Bar(x=names, y=[r["fused_bytes"] for r in rows], name="fused kernel (minimum)", marker_color=FUSED),
    ])
    fig.update_layout(title=title, barmode="group", height=360, yaxis_title="bytes",
                      margin=dict(l=60, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.2))
    return fig


def chunk_sweep_figure(chunks: list[int], peaks: list[int], eager_peak: int, *, model: list[int] | None = None,
                       title: str = "Measured peak memory of the loss layer against chunk size") -> go.Figure:
    """Measured fused peaks per chunk size against the eager peak (and the model's prediction, if given)."""
    if len(chunks) != len(peaks) or not chunks:
        raise ValueError("chunk_sweep_figure: chunks and peaks must be non-empty lists of the same length")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=chunks, y=peaks, mode="lines+markers", name="fused, measured",
                             line=dict(color=FUSED)))
    if model is not None:
        fig.add_trace(go.Scatter(x=chunks, y=model, mode="lines", name="fused, model",
                                 line=dict(color=FUSED, dash="dot")))
    fig.add_trace(go.Scatter(x=[chunks[0], chunks[-1]], y=[eager_peak] * 2, mode="lines", name="eager, measured",
                             line=dict(color=EAGER, dash="dash")))
    fig.update_layout(title=title, height=360, xaxis=dict(type="log", title="chunk size (tokens)"),
                      yaxis=dict(type="log", title="peak bytes"), margin=dict(l=60, r=20, t=50, b=40),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def bench_figure(rows: list[dict], *, title: str | None = None) -> go.Figure:
    """Left: median ms of each op's forward + backward (labkit, eager, Liger where measured).
    Right: the loss layer's peak memory (eager, labkit, Liger). Rows of labkit.benchmarks.fused_kernels."""
    ops = [r for r in rows if r.get("kind") in ("rmsnorm", "swiglu", "rope")]
    flce = [r for r in rows if r.get("kind") == "flce"]
    if not ops and not flce:
        raise ValueError("bench_figure: rows must hold benchmark rows of kind flce, rmsnorm, swiglu or rope")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("time, forward + backward (ms)", "loss layer: peak memory"))
    names = [r["kind"] for r in ops] + ["linear+CE" for _ in flce[:1]]
    by_impl = {"labkit": [r["median_ms"] for r in ops], "eager": [r["eager_ms"] for r in ops],
               "Liger": [r.get("liger_ms") for r in ops]}
    if flce:
        impl = {r["impl"]: r for r in flce}
        by_impl["labkit"].append(impl["labkit"]["median_ms"])
        by_impl["eager"].append(impl["eager"]["median_ms"])
        by_impl["Liger"].append(impl["liger"]["median_ms"] if "liger" in impl else None)
    for name, color in (("labkit", FUSED), ("eager", EAGER), ("Liger", LIGER)):
        if any(v is not None for v in by_impl[name]):
            fig.add_trace(go.Bar(x=names, y=by_impl[name], name=name, marker_color=color, legendgroup=name),
                          row=1, col=1)
    for r in flce:
        color = {"labkit": FUSED, "eager": EAGER, "liger": LIGER}[r["impl"]]
        fig.add_trace(go.Bar(x=[r["impl"]], y=[r["peak_bytes"]], marker_color=color, showlegend=False,
                             text=[f"{r['memory_vs_eager']:.2f}x"], textposition="outside",
                             hovertemplate="%{y:.3s}B<extra></extra>"), row=1, col=2)
    device = (rows[0].get("device") or "") if rows else ""
    fig.update_layout(barmode="group", title=title or f"labkit kernels beside eager PyTorch and Liger ({device})",
                      height=400, margin=dict(l=60, r=20, t=70, b=40), legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(type="log", title_text="ms", row=1, col=1)
    fig.update_yaxes(title_text="bytes", row=1, col=2)
    return fig


__all__ = ["bench_figure", "chunk_sweep_figure", "loss_memory_figure", "traffic_figure"]
