"""Figures of chapter 12-zero: model-state memory per stage, the offload planner, measured stages, and
ZeRO-Infinity's bandwidth-centric efficiency curves.

The techniques live in labkit.parallel.zero and labkit.parallel.offload; this module only draws them.
Offload timelines use the generic labkit.viz.timeline.timeline_figure.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit.parallel import offload as off
from labkit.parallel import zero as z

PART_COLORS = {"parameters": "#4C78A8", "gradients": "#F58518", "optimizer states": "#54A24B",
               "working set": "#72B7B2", "activations": "#B279A2"}
TIER_LABELS = {"gpu": "GPU", "cpu": "CPU", "nvme": "NVMe"}
_BW = np.geomspace(1e8, 1e15, 201)  # bytes/s


def _efficiency_curve(ait: float, peak_flops: float) -> np.ndarray:
    """off.efficiency over the bandwidths _BW: ait bw / (ait bw + peak)."""
    return ait * _BW / (ait * _BW + peak_flops)


def memory_per_stage_figure(num_params: int, world_size: int, *, optimizer: str = "adam",
                            dtype: torch.dtype = torch.bfloat16, title: str | None = None) -> go.Figure:
    """Stacked bars: parameters, gradients and optimizer states per rank (GB) at stages 0-3."""
    mems = [z.memory_per_rank(num_params, s, world_size, optimizer, dtype) for s in z.STAGES]
    names = ["0: DP", "1: P<sub>os</sub>", "2: P<sub>os+g</sub>", "3: P<sub>os+g+p</sub>"]
    fig = go.Figure()
    for part in ("parameters", "gradients", "optimizer states"):
        fig.add_trace(go.Bar(x=names, y=[m.parts()[part] / 1e9 for m in mems], name=part,
                             marker_color=PART_COLORS[part]))
    fig.add_trace(go.Scatter(x=names, y=[m.total / 1e9 for m in mems], mode="text", showlegend=False,
                             text=[f"{m.total / 1e9:.3g} GB" for m in mems], textposition="top center"))
    fig.update_layout(barmode="stack", height=360, margin=dict(l=60, r=20, t=60, b=40),
                      title=title or f"Model states per rank: {num_params / 1e9:.3g}B parameters on {world_size} ranks",
                      yaxis_title="GB per rank", xaxis_title="ZeRO stage", legend=dict(orientation="h", y=-0.2))
    return fig


def planner_figure(params_b: float = 7.5, world_size: int = 64, stage: int = 3, param_tier: str = "gpu",
                   optimizer_tier: str = "gpu", gpu: str = "H100 80GB", tokens_per_gpu: int = 2048,
                   activations_gb: float = 0.0) -> go.Figure:
    """The Play panel: left, bytes per rank on each tier against its capacity (one GPU's share of a DGX
    H100-class node, the GPU's memory from `gpu`); right, ZeRO-Infinity's efficiency against bandwidth
    for parameters and optimizer states at `tokens_per_gpu` = seq x bsz, with the chosen tiers'
    bandwidth-centric effective bandwidths marked."""
    if gpu not in off.GPUS:
        raise ValueError(f"planner_figure: gpu must be one of {tuple(off.GPUS)}, got {gpu!r}")
    num_params = int(round(params_b * 1e9))
    gpu_bytes, peak = off.GPUS[gpu]
    capacity = {"gpu": gpu_bytes, "cpu": off.NODE_TIERS["cpu"].capacity, "nvme": off.NODE_TIERS["nvme"].capacity}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.12,
                        subplot_titles=("bytes per rank on each tier", "efficiency vs bandwidth"))
    try:
        parts = off.tier_breakdown(num_params, world_size, stage, param_tier=param_tier,
                                   optimizer_tier=optimizer_tier, activations=activations_gb * 1e9)
    except ValueError as e:
        fig.update_layout(title=dict(text=f"<b>not a valid setup</b>: {str(e).split(': ', 1)[1]}", x=0.01),
                          height=400)
        return fig
    tiers = list(off.TIERS)
    x = [TIER_LABELS[t] for t in tiers]
    for part in off.PARTS:
        y = [parts[t][part] / 1e9 for t in tiers]
        if any(y):
            fig.add_trace(go.Bar(x=x, y=y, name=part, marker_color=PART_COLORS[part], legendgroup=part,
                                 hovertemplate=f"{part}: %{{y:.3g}} GB<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=[capacity[t] / 1e9 for t in tiers], mode="markers", name="capacity",
                             marker=dict(symbol="line-ew-open", size=44, color="#E45756", line=dict(width=3)),
                             hovertemplate="capacity %{y:.4g} GB<extra></extra>"), row=1, col=1)
    usage = {t: sum(parts[t].values()) for t in tiers}
    ok = off.fits(usage, capacity)
    short = [TIER_LABELS[t] for t in tiers if usage[t] > capacity[t]]

    ait_p = off.ait_params_grads(tokens_per_gpu, 1)
    ait_o = off.ait_optimizer_states(tokens_per_gpu, 1)
    for label, ait, color in (("parameters + gradients (ait = seq·bsz)", ait_p, "#4C78A8"),
                              ("optimizer states (ait = seq·bsz / 4)", ait_o, "#54A24B")):
        fig.add_trace(go.Scatter(x=_BW / 1e9, y=_efficiency_curve(ait, peak), mode="lines", name=label,
                                 line=dict(color=color)), row=1, col=2)
    bw_p = off.tier_bandwidth(param_tier, world_size, stage, for_params=True)
    bw_o = off.tier_bandwidth(optimizer_tier, world_size, stage, for_params=False)
    eff_p, eff_o = off.efficiency(ait_p, bw_p, peak), off.efficiency(ait_o, bw_o, peak)
    fig.add_trace(go.Scatter(x=[bw_p / 1e9, bw_o / 1e9], y=[eff_p, eff_o], mode="markers+text", showlegend=False,
                             text=[f"params from {TIER_LABELS[param_tier]}",
                                   f"states on {TIER_LABELS[optimizer_tier]}"],
                             textposition=["top left", "bottom left"],
                             marker=dict(size=11, color=["#4C78A8", "#54A24B"], line=dict(width=1, color="black"))),
                  row=1, col=2)
    fig.update_yaxes(type="log", title_text="GB per rank", row=1, col=1)
    fig.update_xaxes(type="log", title_text="effective bandwidth per GPU (GB/s)", row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], title_text="compute / (compute + transfer)", row=1, col=2)
    verdict = "fits" if ok else f"does not fit ({', '.join(short)} over capacity)"
    fig.update_layout(
        barmode="stack", height=430, margin=dict(l=60, r=20, t=90, b=40), legend=dict(orientation="h", y=-0.22),
        title=dict(x=0.01, text=f"{params_b:.4g}B parameters, {world_size} ranks, stage {stage}, {gpu}: "
                                f"<b>{verdict}</b> (GPU {usage['gpu'] / 1e9:.3g} GB of {gpu_bytes / 1e9:.0f})"
                                f"<br><sup>efficiency at seq·bsz = {tokens_per_gpu}: parameters {eff_p:.0%}, "
                                f"optimizer states {eff_o:.0%} (nominal DGX H100 bandwidths, no overlap)</sup>"))
    return fig


def stage_memory_figure(results: dict, world_size: int, *, title: str | None = None) -> go.Figure:
    """Measured model-state bytes per rank (stacked) and elements communicated per step, per ZeRO stage,
    against memory_per_rank (fp32 Adam) and comm_volume: `results` is what train_stages returned on a rank."""
    stages = [s for s in z.STAGES if s in results and "bytes" in results[s]]
    if not stages:
        raise ValueError("stage_memory_figure: results hold no ZeRO stage with measured bytes")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("model states per rank (measured, KB)", "communication per step (elements)"))
    x = [f"stage {s}" for s in stages]
    for part, key in (("parameters", "params"), ("gradients", "grads"), ("optimizer states", "optimizer")):
        fig.add_trace(go.Bar(x=x, y=[getattr(results[s]["bytes"], key) / 1e3 for s in stages], name=part,
                             marker_color=PART_COLORS[part]), row=1, col=1)
    pred = [z.memory_per_rank(results[s]["padded_params"], s, world_size, "adam", torch.float32).total / 1e3
            for s in stages]
    fig.add_trace(go.Scatter(x=x, y=pred, mode="markers", name="predicted", marker=dict(
        symbol="line-ew-open", size=40, color="#E45756", line=dict(width=3))), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=[results[s]["comm"] for s in stages], name="measured", marker_color="#9D755D",
                         showlegend=False), row=1, col=2)
    fig.add_trace(go.Scatter(x=x, y=[z.comm_volume(results[s]["padded_params"], s) for s in stages],
                             mode="markers", showlegend=False, marker=dict(symbol="line-ew-open", size=40,
                                                                          color="#E45756", line=dict(width=3))),
                  row=1, col=2)
    fig.update_layout(barmode="stack", height=380, margin=dict(l=60, r=20, t=70, b=40),
                      legend=dict(orientation="h", y=-0.2),
                      title=title or f"ZeRO stages measured on {world_size} ranks (fp32 Adam)")
    return fig


def efficiency_figure(peak_flops: float = 989e12, *, tokens=(1024, 4096, 16384), hidden: int = 8192,
                      tiers: dict | None = None, measured: dict[str, float] | None = None,
                      title: str | None = None) -> go.Figure:
    """The paper's Fig. 3 style: efficiency vs bandwidth for parameters + gradients and optimizer states at
    several seq x bsz, and for activation checkpoints at hidden size `hidden` (ci = 1); vertical lines at
    the tiers' nominal bandwidths and at `measured` ones (name -> bytes/s)."""
    tiers = off.NODE_TIERS if tiers is None else tiers
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot"]
    for i, t in enumerate(tokens):
        for label, ait, color in (("params+grads", off.ait_params_grads(t, 1), "#4C78A8"),
                                  ("optimizer states", off.ait_optimizer_states(t, 1), "#54A24B")):
            fig.add_trace(go.Scatter(x=_BW / 1e9, y=_efficiency_curve(ait, peak_flops), mode="lines",
                                     name=f"{label}, seq·bsz={t}", line=dict(color=color, dash=dashes[i % 4])))
    ait_a = off.ait_activations(hidden, 1)
    fig.add_trace(go.Scatter(x=_BW / 1e9, y=_efficiency_curve(ait_a, peak_flops), mode="lines",
                             name=f"activation checkpoints, hd={hidden}", line=dict(color="#B279A2")))
    marks = [(tier.name, tier.bandwidth, "#999", 1.0) for tier in tiers.values()]
    marks += [(name, bw, "#E45756", 0.9) for name, bw in (measured or {}).items()]
    for name, bw, color, top in marks:  # vertical lines as traces: shapes on a log axis want log10 coordinates
        fig.add_trace(go.Scatter(x=[bw / 1e9, bw / 1e9], y=[0, top], mode="lines+text", text=["", name],
                                 textposition="top center", showlegend=False, hoverinfo="skip",
                                 line=dict(color=color, dash="dot", width=1.5)))
    fig.update_layout(title=title or f"Efficiency vs bandwidth at {peak_flops / 1e12:.0f} TFLOP/s",
                      xaxis=dict(type="log", title="bandwidth (GB/s)", range=[-1, 4]),
                      yaxis=dict(range=[0, 1.1], title="compute / (compute + transfer)"),
                      height=420, margin=dict(l=60, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.25))
    return fig


__all__ = ["PART_COLORS", "efficiency_figure", "memory_per_stage_figure", "planner_figure", "stage_memory_figure"]
