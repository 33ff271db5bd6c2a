"""Training-memory figures (chapter 06-galore-lisa): budgets as stacked bars, GaLore's subspace
over training, LISA's schedule, measured vs predicted optimizer state. (Loss curves:
labkit.viz.optim.loss_curves_figure.)

The numbers come from labkit.optim.memory / galore / lisa; this module only draws them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.optim import memory as mem

PART_COLORS = {"weights": "#4C78A8", "fp32 master": "#9ECAE9", "gradients": "#F58518",
               "optimizer states": "#E45756", "activations": "#54A24B"}
PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D"]
GPU_LINES = (("RTX 4090: 24 GB", 24e9), ("H100: 80 GB", 80e9))


def memory_methods(rank: int = 1024, lisa_layers: int = 2) -> dict[str, dict]:
    """The setups compared on paper: label -> keyword arguments of memory.training_memory."""
    return {
        "AdamW (bf16)": dict(),
        "AdamW mixed precision": dict(master_weights=True, state_dtype="fp32"),
        "8-bit AdamW": dict(state_dtype="8bit"),
        "Adafactor": dict(optimizer="adafactor"),
        f"GaLore r={rank}": dict(optimizer="galore_adamw", rank=rank),
        f"8-bit GaLore r={rank}, per-layer": dict(optimizer="galore_adamw", rank=rank, state_dtype="8bit",
                                                 layerwise_grads=True),
        f"LISA {lisa_layers} blocks": dict(lisa_layers=lisa_layers),
    }


def memory_breakdown(model: str = "7B", rank: int = 1024, lisa_layers: int = 2, *, seq_len: int = 256,
                     batch: int = 1) -> dict[str, mem.MemoryBreakdown]:
    """training_memory of every setup in memory_methods for a LLaMA-shaped model (batch x seq_len tokens)."""
    specs = mem.llama_params(model)
    cfg = mem.LLAMA_CONFIGS[model]
    acts = mem.activation_bytes(cfg["n_layer"], cfg["d_model"], cfg["n_head"], seq_len, batch)
    lisa_layers = min(lisa_layers, cfg["n_layer"])
    return {label: mem.training_memory(specs, activations=acts, **kw)
            for label, kw in memory_methods(rank, lisa_layers).items()}


def memory_breakdown_figure(model: str = "7B", rank: int = 1024, update_proj_gap: int = 200, lisa_layers: int = 2,
                            *, seq_len: int = 256, batch: int = 1, tokens_per_step: int = 131072) -> go.Figure:
    """Left: stacked GB of weights / gradients / states / activations per setup (closed forms).
    Right: GaLore's SVD FLOPs, amortized over the update gap, as a share of a step's 6 N D FLOPs."""
    breakdown = memory_breakdown(model, rank, lisa_layers, seq_len=seq_len, batch=batch)
    labels = list(breakdown)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.68, 0.32], horizontal_spacing=0.1,
                        subplot_titles=("memory per setup (GB)", "GaLore SVD cost vs update gap"))
    for part, color in PART_COLORS.items():
        ys = [breakdown[k].parts()[part] / 1e9 for k in labels]
        fig.add_trace(go.Bar(x=labels, y=ys, name=part, marker_color=color,
                             hovertemplate="%{x}<br>" + part + ": %{y:.2f} GB<extra></extra>"), row=1, col=1)
    totals = [breakdown[k].total / 1e9 for k in labels]
    fig.add_trace(go.Scatter(x=labels, y=totals, mode="text", text=[f"{t:.1f}" for t in totals],
                             textposition="top center", showlegend=False, hoverinfo="skip"), row=1, col=1)
    for name, limit in GPU_LINES:
        fig.add_hline(y=limit / 1e9, line_dash="dot", line_color="#888", annotation_text=name,
                      annotation_position="top left", row=1, col=1)

    specs = mem.llama_params(model)
    gaps = sorted({10, 20, 50, 100, 200, 500, 1000, 2000, update_proj_gap})
    overhead = [100 * mem.galore_svd_overhead(specs, g, tokens_per_step) for g in gaps]
    fig.add_trace(go.Scatter(x=gaps, y=overhead, mode="lines+markers", name="SVD FLOPs / step FLOPs",
                             line_color="#B279A2", showlegend=False,
                             hovertemplate="gap %{x}: %{y:.3g}% of the step's FLOPs<extra></extra>"), row=1, col=2)
    here = 100 * mem.galore_svd_overhead(specs, update_proj_gap, tokens_per_step)
    fig.add_trace(go.Scatter(x=[update_proj_gap], y=[here], mode="markers", marker=dict(size=12, color="#E45756"),
                             showlegend=False, hoverinfo="skip"), row=1, col=2)
    n = sum(s.numel for s in specs)
    adam, galore = breakdown["AdamW (bf16)"], breakdown[f"GaLore r={rank}"]
    saved = 1 - galore.optimizer / adam.optimizer
    verdict = (f"GaLore r={rank} cuts the optimizer states by {100 * saved:.1f}%" if saved >= 0 else
               f"GaLore r={rank} needs {-100 * saved:.1f}% MORE optimizer state than AdamW")
    fig.update_layout(
        barmode="stack", height=480, margin=dict(l=50, r=20, t=90, b=40),
        title=(f"LLaMA-{model} ({n / 1e9:.2f}B params), {batch}x{seq_len} tokens: {verdict}"
               f"<br><sup>SVD every {update_proj_gap} steps costs "
               f"{here:.3g}% of a {tokens_per_step // 1024}k-token step's FLOPs (SVDs run far below peak: "
               f"the wall-clock share is larger)</sup>"),
        legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(title_text="GB", row=1, col=1)
    fig.update_xaxes(type="log", title_text="update_proj_gap T (steps)", row=1, col=2)
    fig.update_yaxes(type="log", title_text="% of step FLOPs", row=1, col=2)
    return fig


def state_bytes_figure(rows: Sequence[Mapping], *, title: str = "optimizer state: formula vs measured") -> go.Figure:
    """Grouped bars of rows {'name', 'predicted', 'measured'} (bytes), shown in KB."""
    rows = list(rows)
    for i, r in enumerate(rows):
        missing = {"name", "predicted", "measured"} - set(r)
        if missing:
            raise ValueError(f"state_bytes_figure: row {i} lacks {sorted(missing)}")
    names = [r["name"] for r in rows]
    fig = go.Figure([
        go.Bar(x=names, y=[r["predicted"] / 1e3 for r in rows], name="formula (memory.predicted_state_bytes)",
               marker_color="#9ECAE9"),
        go.Bar(x=names, y=[r["measured"] / 1e3 for r in rows], name="measured (memory.state_bytes)",
               marker_color="#4C78A8"),
    ])
    fig.update_layout(barmode="group", title=title, yaxis_title="KB", height=380, margin=dict(l=50, r=20, t=60, b=40))
    return fig


def captured_fraction_figure(fractions: Mapping[str, Sequence[float]], update_proj_gap: int, *,
                             title: str | None = None) -> go.Figure:
    """||P^T G|| / ||G|| per step for some weights; dotted lines where GaLore refreshes its SVD."""
    fig = go.Figure()
    steps = max((len(v) for v in fractions.values()), default=0)
    for i, (name, ys) in enumerate(fractions.items()):
        fig.add_trace(go.Scatter(y=list(ys), mode="lines", name=name, line_color=PALETTE[i % len(PALETTE)]))
    for t in range(0, steps, update_proj_gap):
        fig.add_vline(x=t, line_dash="dot", line_color="#aaa")
    fig.update_layout(title=title or f"share of the gradient inside GaLore's subspace (SVD every {update_proj_gap} "
                                     f"steps, dotted)", xaxis_title="step", yaxis_title="||P^T G|| / ||G||",
                      yaxis_range=[0, 1.02], height=380, margin=dict(l=50, r=20, t=60, b=40))
    return fig


def cumulative_energy_figure(singular_values: Mapping[str, Sequence[float]], rank: int | None = None, *,
                             title: str = "how low-rank is a gradient?") -> go.Figure:
    """Cumulative share of ||G||_F^2 in the top-k singular directions, for each named gradient
    (what a rank-k projection keeps; labkit.viz.muon.relative_spectrum_figure shows the decay)."""
    fig = go.Figure()
    for i, (name, s) in enumerate(singular_values.items()):
        sq = [float(v) ** 2 for v in s]
        total = sum(sq) or 1.0
        cum, acc = [], 0.0
        for v in sq:
            acc += v
            cum.append(acc / total)
        fig.add_trace(go.Scatter(x=list(range(1, len(cum) + 1)), y=cum, mode="lines+markers", name=name,
                                 marker_size=4, line_color=PALETTE[i % len(PALETTE)]))
    if rank is not None:
        fig.add_vline(x=rank, line_dash="dash", line_color="#E45756", annotation_text=f"rank {rank}")
    fig.update_layout(title=title, xaxis_title="k (top singular directions kept)",
                      yaxis_title="share of ||G||²", yaxis_range=[0, 1.02], height=380,
                      margin=dict(l=50, r=20, t=60, b=40))
    return fig


def lisa_schedule_figure(history: Sequence[tuple[int, Sequence[int]]], n_layers: int, steps: int, *,
                         title: str = "LISA: which blocks train at each step") -> go.Figure:
    """Heat map, block (rows) x step (columns), filled where the block was trainable.

    history: (first step, active blocks) at every re-sampling, as `LISA.history` records it.
    """
    history = sorted((int(t), tuple(a)) for t, a in history)
    if not history:
        raise ValueError("lisa_schedule_figure: history must hold at least one (step, active) entry, got none")
    active_at, k = [], 0
    for t in range(steps):
        while k + 1 < len(history) and history[k + 1][0] <= t:
            k += 1
        active_at.append(set(history[k][1]))
    z = [[1 if layer in a else 0 for a in active_at] for layer in range(n_layers)]
    fig = go.Figure(go.Heatmap(z=z, colorscale=[[0, "#f0f0f0"], [1, "#4C78A8"]], showscale=False,
                               hovertemplate="step %{x}, block %{y}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="block", height=140 + 30 * n_layers,
                      margin=dict(l=50, r=20, t=60, b=40), yaxis=dict(dtick=1))
    return fig


__all__ = ["captured_fraction_figure", "cumulative_energy_figure", "lisa_schedule_figure", "memory_breakdown",
           "memory_breakdown_figure", "memory_methods", "state_bytes_figure"]
