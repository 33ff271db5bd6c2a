"""Figures of chapter 15-tensor-parallel: who owns which weights, compute vs all-reduce per layer,
overlap timelines and CUDA-graph decode measurements.

The technique and its cost model live in labkit.parallel.tensor, the timed experiments in
labkit.benchmarks.tensor_parallel; this module only draws them.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.parallel import tensor as tp
from labkit.viz.timeline import PALETTE, timeline_figure

COMPUTE_COLOR, COMM_COLOR, LAUNCH_COLOR, TOTAL_COLOR = "#4C78A8", "#E45756", "#9D755D", "#222222"
_TOKENS = [2**i for i in range(14)]  # 1 .. 8192


def _us(t: float) -> str:
    return f"{t * 1e6:.3g} µs" if t < 1e-3 else f"{t * 1e3:.3g} ms"


def shard_layout_figure(out_features: int = 8, in_features: int = 8, world_size: int = 4) -> go.Figure:
    """An nn.Linear weight (out, in) coloured by the rank that holds each entry: column-parallel
    (left: rows of the PyTorch weight, the output features) and row-parallel (right: its columns)."""
    owner = np.zeros((2, out_features, in_features), dtype=int)
    for r in range(world_size):
        lo, hi = tp.shard_bounds(out_features, r, world_size, owner="shard_layout_figure", name="out_features")
        owner[0, lo:hi, :] = r
        lo, hi = tp.shard_bounds(in_features, r, world_size, owner="shard_layout_figure", name="in_features")
        owner[1, :, lo:hi] = r
    colors = [PALETTE[r % len(PALETTE)] for r in range(world_size)]
    scale = [[i / max(world_size - 1, 1), c] for i, c in enumerate(colors)]  # one colour per rank
    if world_size == 1:
        scale = [[0, colors[0]], [1, colors[0]]]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        "column-parallel: rank r holds W[r·out/p : (r+1)·out/p, :]",
        "row-parallel: rank r holds W[:, r·in/p : (r+1)·in/p]"))
    for k in range(2):
        fig.add_trace(go.Heatmap(z=owner[k], colorscale=scale, zmin=0, zmax=max(world_size - 1, 1), showscale=False,
                                 xgap=2, ygap=2, text=[[f"rank {v}" for v in row] for row in owner[k]],
                                 hovertemplate="W[%{y}, %{x}]: %{text}<extra></extra>"), row=1, col=k + 1)
        fig.update_xaxes(title_text="in_features (dim 1)", row=1, col=k + 1)
        fig.update_yaxes(title_text="out_features (dim 0)", autorange="reversed", row=1, col=k + 1)
    fig.update_layout(height=340, margin=dict(l=60, r=20, t=60, b=50),
                      title=f"nn.Linear weight ({out_features}, {in_features}) over {world_size} ranks")
    return fig


def tp_layer_figure(tp_degree: int = 4, hidden: int = 8192, tokens: int = 16, bandwidth_gbs: float = 450.0,
                    latency_us: float = 1.0, chunks: int = 1, cuda_graph: bool = False,
                    launch_us: float = 5.0) -> go.Figure:
    """The cost model of one decoder layer (labkit.parallel.tensor.tp_layer_time, H100 bf16 roofs).

    Left: a timeline of the layer (CPU launches, GPU compute, all-reduce on the link) with
    `chunks` chunks. Right: compute and all-reduce time per layer against the batch's token
    count (the dotted line marks `tokens`). Built for slider_panel.
    """
    link = tp.Link("custom", bandwidth_gbs * 1e9, latency_us * 1e-6)
    chunks = min(int(chunks), int(tokens))
    kw = dict(link=link, launch_overhead=launch_us * 1e-6, cuda_graph=bool(cuda_graph))
    est = tp.tp_layer_time(hidden, tokens, tp_degree, chunks=chunks, **kw)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.1,
                        subplot_titles=(f"one layer, {chunks} chunk{'s' if chunks > 1 else ''}"
                                        f"{', CUDA graph' if cuda_graph else ''} (µs)", "per layer vs tokens"))
    lanes = {"compute": "GPU compute", "all-reduce": "all-reduce (link)"}
    bars = [(lanes[s.lane], s.start, s.end, s.label, s.kind) for s in est.spans]
    if est.launch_s > 0:
        bars.append(("CPU launches", 0.0, est.launch_s, f"{est.launch_s * 1e6:.3g} µs", "CPU launch"))
    for kind, color in (("compute", COMPUTE_COLOR), ("all-reduce", COMM_COLOR), ("CPU launch", LAUNCH_COLOR)):
        mine = [b for b in bars if b[4] == kind]
        if mine:
            fig.add_trace(go.Bar(orientation="h", y=[b[0] for b in mine], x=[(b[2] - b[1]) * 1e6 for b in mine],
                                 base=[b[1] * 1e6 for b in mine], name=kind, marker_color=color,
                                 marker_line=dict(color="white", width=1), text=[b[3] for b in mine],
                                 textposition="inside", insidetextanchor="middle",
                                 hovertemplate="%{y}: %{base:.3g} → +%{x:.3g} µs<extra></extra>"), row=1, col=1)
    fig.update_yaxes(categoryorder="array", categoryarray=["all-reduce (link)", "GPU compute", "CPU launches"],
                     row=1, col=1)
    fig.update_xaxes(title_text="µs", row=1, col=1)

    xs = _TOKENS
    curves = [tp.tp_layer_time(hidden, t, tp_degree, **kw) for t in xs]
    for name, ys, color, dash in (
            ("compute (GEMMs)", [c.compute_s for c in curves], COMPUTE_COLOR, "solid"),
            ("all-reduce ×2", [c.comm_s for c in curves], COMM_COLOR, "solid"),
            ("layer, no overlap", [c.sequential_s for c in curves], TOTAL_COLOR, "dash")):
        fig.add_trace(go.Scatter(x=xs, y=[y * 1e6 for y in ys], mode="lines", name=name, line=dict(color=color,
                                 dash=dash, width=2.5), hovertemplate="%{x} tokens: %{y:.3g} µs<extra></extra>"),
                      row=1, col=2)
    fig.add_vline(x=tokens, line=dict(color="#777", dash="dot"), row=1, col=2)
    fig.update_xaxes(type="log", title_text="tokens in the batch", row=1, col=2)
    fig.update_yaxes(type="log", title_text="µs per layer", row=1, col=2)
    base = tp.tp_layer_time(hidden, tokens, tp_degree, link=link, launch_overhead=launch_us * 1e-6)  # 1 chunk, eager
    bound = "launch-bound" if est.launch_s > est.gpu_s else "GPU-bound"
    fig.update_layout(
        barmode="overlay", height=420, margin=dict(l=10, r=10, t=90, b=40), legend=dict(orientation="h", y=-0.18),
        title=dict(x=0.01, text=(
            f"TP={tp_degree}, hidden {hidden}, {tokens} token{'s' if tokens > 1 else ''}, {bandwidth_gbs:g} GB/s, "
            f"α={latency_us:g} µs: compute {_us(est.compute_s)}, all-reduce {_us(est.comm_s)} "
            f"({100 * est.comm_fraction:.0f}% of GPU time)<br><sup>as set: GPU {_us(est.gpu_s)}, CPU launches "
            f"{_us(est.launch_s)} → layer {_us(est.total_s)} ({bound}); 1 chunk, eager: {_us(base.total_s)} "
            f"({base.total_s / est.total_s:.2f}x)</sup>")))
    return fig


def comm_vs_compute_figure(rows: list[dict], *, title: str | None = None) -> go.Figure:
    """Measured per-rank time of a TP MLP shard's matmuls and of its all-reduce against tokens (rows with
    compute_ms and allreduce_ms, as labkit.benchmarks.tensor_parallel.comm_vs_compute returns them, or
    benchmark rows of kind "comm_vs_compute")."""
    rows = [r for r in rows if "tokens" in r]
    if not rows:
        raise ValueError("comm_vs_compute_figure: rows must hold 'tokens' with compute and all-reduce times")
    rows = sorted(rows, key=lambda r: r["tokens"])
    xs = [r["tokens"] for r in rows]

    def col(r, *keys):
        return next(r[k] for k in keys if k in r)

    comp = [col(r, "compute_ms", "baseline_ms") for r in rows]
    comm = [col(r, "allreduce_ms", "median_ms") for r in rows]
    fig = go.Figure([
        go.Scatter(x=xs, y=comp, mode="lines+markers", name="MLP shard: matmuls", line=dict(color=COMPUTE_COLOR)),
        go.Scatter(x=xs, y=comm, mode="lines+markers", name="all-reduce of its output", line=dict(color=COMM_COLOR)),
    ])
    fig.update_layout(title=title or "Compute vs all-reduce per MLP block", height=360,
                      margin=dict(l=60, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.2),
                      xaxis=dict(type="log", title="tokens in the batch"), yaxis=dict(type="log", title="ms per call"))
    return fig


def overlap_trace_figure(trace: list[dict], *, title: str = "One overlapped forward (host clock)") -> go.Figure:
    """The Spans an overlapped_forward recorded, in milliseconds, one lane per rank and activity."""
    if not trace:
        raise ValueError("overlap_trace_figure: trace is empty (pass trace=[] to overlapped_forward)")
    spans = [dict(s, start=s["start"] * 1e3, end=s["end"] * 1e3) for s in trace]
    return timeline_figure(spans, title=title, unit="ms")


def decode_graph_figure(rows: list[dict], *, title: str | None = None) -> go.Figure:
    """Eager vs CUDA-graph decode step per batch size (benchmark rows of kind "cuda_graph")."""
    rows = [r for r in rows if r.get("kind") == "cuda_graph"]
    if not rows:
        raise ValueError("decode_graph_figure: no rows with kind 'cuda_graph'")
    names = [f"batch {r['batch']}" for r in rows]
    fig = go.Figure([
        go.Bar(x=names, y=[r["baseline_ms"] for r in rows], name="eager (one launch per kernel)",
               marker_color=LAUNCH_COLOR),
        go.Bar(x=names, y=[r["median_ms"] for r in rows], name="CUDA graph replay (NCCL captured)",
               marker_color=COMPUTE_COLOR),
    ])
    r0 = rows[0]
    fig.update_layout(title=title or f"Decode step, {r0['n_layer']} TP layers, hidden {r0['n_embd']}, "
                      f"TP={r0['world']} ({r0['device']})", barmode="group", height=360,
                      yaxis=dict(title="median ms per step"), margin=dict(l=60, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.2))
    return fig


__all__ = ["comm_vs_compute_figure", "decode_graph_figure", "overlap_trace_figure",
           "shard_layout_figure", "tp_layer_figure"]

