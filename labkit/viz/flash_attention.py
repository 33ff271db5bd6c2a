"""Figures of chapter 16-flash-attention: the online softmax step by step, the tile schedule,
HBM traffic against sequence length, and the kernel's benchmark against SDPA.

The technique lives in labkit.kernels.flash_attention; this module only draws it.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from labkit import _checks
from labkit.kernels import flash_attention as fa
from labkit.perf import roofline

SEEN, CURRENT, UNSEEN, EXACT = "#4C78A8", "#F58518", "#C9C9C9", "#54A24B"


def online_softmax_states(scores: torch.Tensor, values: torch.Tensor, block_n: int) -> list[tuple]:
    """The state (m, l, acc) of one query row after 0, 1, ..., K key blocks (float64)."""
    s, v = scores.double().reshape(1, -1), values.double()  # (1, n), (n, D)
    state = (torch.full((1,), -math.inf, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
             torch.zeros(1, v.shape[1], dtype=torch.float64))
    states = [state]
    for j0 in range(0, s.shape[1], block_n):
        state = fa.online_softmax_update(*state, s[:, j0:j0 + block_n], v[j0:j0 + block_n])
        states.append(state)
    return states


def online_softmax_figure(step: int = 1, block_n: int = 4, n_keys: int = 24, spread: float = 2.0,
                          seed: int = 0, head_dim: int = 4) -> go.Figure:
    """One query row against n_keys keys, folded in block_n at a time; `step` blocks seen so far.

    Top left: the scores (blue: folded in, orange: the block just folded, grey: not yet read), the
    running max m and the final max. Top right: the weights exp(s - m) / l as they stand now
    against the true softmax. Bottom left: m and l per step. Bottom right: the partial output
    acc / l against softmax(s) V: equal once every block is in. A step past the last block shows
    the final state (so one slider serves every block size).
    """
    owner = "online_softmax_figure"
    block_n = _checks.integer(owner, "block_n", block_n, low=1)
    n_keys = _checks.integer(owner, "n_keys", n_keys, low=1)
    head_dim = _checks.integer(owner, "head_dim", head_dim, low=1)
    n_blocks = math.ceil(n_keys / block_n)
    step = min(_checks.integer(owner, "step", step, low=0), n_blocks)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n_keys, generator=g, dtype=torch.float64) * spread  # (n,) one row of scaled scores
    v = torch.randn(n_keys, head_dim, generator=g, dtype=torch.float64)  # (n, D)
    states = online_softmax_states(s, v, block_n)
    p_true = torch.softmax(s, dim=0)  # (n,)
    o_true = p_true @ v  # (D,)
    m_k, l_k, acc_k = (t[0] for t in states[step])
    seen = min(step * block_n, n_keys)
    current = range((step - 1) * block_n, seen) if step else range(0)

    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.16, horizontal_spacing=0.08, subplot_titles=(
        "scores s<sub>j</sub> and the running max", "weights exp(s - m) / l now vs softmax",
        "running max m and sum l per block", "partial output acc / l vs softmax(s) V"))
    colors = [CURRENT if j in current else SEEN if j < seen else UNSEEN for j in range(n_keys)]
    fig.add_trace(go.Bar(x=list(range(n_keys)), y=s.tolist(), marker_color=colors, showlegend=False,
                         hovertemplate="key %{x}<br>s=%{y:.3f}<extra></extra>"), row=1, col=1)
    fig.add_hline(y=float(s.max()), line=dict(color="#999", dash="dot"), row=1, col=1)
    if step:
        fig.add_hline(y=float(m_k), line=dict(color=CURRENT, width=2), row=1, col=1)
    for b in range(1, n_blocks):
        fig.add_vline(x=b * block_n - 0.5, line=dict(color="#ddd", width=1), row=1, col=1)

    weights = np.zeros(n_keys)
    if step:
        weights[:seen] = (torch.exp(s[:seen] - m_k) / l_k).numpy()
    fig.add_trace(go.Bar(x=list(range(n_keys)), y=weights, marker_color=colors, name="now: exp(s - m) / l",
                         hovertemplate="key %{x}<br>weight now %{y:.4f}<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=list(range(n_keys)), y=p_true.tolist(), mode="markers", name="softmax(s)",
                             marker=dict(color=EXACT, size=7, symbol="diamond")), row=1, col=2)

    ms = [float(st[0][0]) for st in states[1:]]
    ls = [float(st[1][0]) for st in states[1:]]
    xs = list(range(1, n_blocks + 1))
    fig.add_trace(go.Scatter(x=xs, y=ms, mode="lines+markers", name="m (running max)",
                             line=dict(color=CURRENT), opacity=0.35), row=2, col=1)
    fig.add_trace(go.Scatter(x=xs, y=ls, mode="lines+markers", name="l (running sum)",
                             line=dict(color=SEEN), opacity=0.35), row=2, col=1)
    if step:
        fig.add_trace(go.Scatter(x=xs[:step], y=ms[:step], mode="lines+markers", showlegend=False,
                                 line=dict(color=CURRENT, width=3)), row=2, col=1)
        fig.add_trace(go.Scatter(x=xs[:step], y=ls[:step], mode="lines+markers", showlegend=False,
                                 line=dict(color=SEEN, width=3)), row=2, col=1)

    o_k = (acc_k / l_k).numpy() if step else np.zeros(head_dim)
    dims = [f"d{i}" for i in range(head_dim)]
    fig.add_trace(go.Bar(x=dims, y=o_k, marker_color=CURRENT, name="acc / l now"), row=2, col=2)
    fig.add_trace(go.Scatter(x=dims, y=o_true.tolist(), mode="markers", name="softmax(s) V",
                             marker=dict(color=EXACT, size=11, symbol="diamond")), row=2, col=2)
    err = float(np.abs(o_k - o_true.numpy()).max())
    head = (f"after {step} of {n_blocks} key blocks: m = {float(m_k):.3f}, l = {float(l_k):.3f}, "
            f"max |o - softmax(s)V| = {err:.2e}" if step else f"0 of {n_blocks} key blocks read: m = -inf, l = 0")
    fig.update_xaxes(title_text="key j", row=1, col=1)
    fig.update_xaxes(title_text="key j", row=1, col=2)
    fig.update_xaxes(title_text="key blocks read", dtick=1, row=2, col=1)
    fig.update_layout(title=dict(text=head, x=0.01), height=620, margin=dict(l=50, r=20, t=90, b=40),
                      legend=dict(orientation="h", y=-0.08), bargap=0.15)
    return fig


def tile_schedule_figure(seq_len: int = 1000, block_m: int = 128, block_n: int = 64,
                         causal: bool = True) -> go.Figure:
    """The (query block, key block) tiles a FlashAttention forward computes: skipped (above the
    diagonal), full (no mask), or masked (on the diagonal or the sequence's tail)."""
    owner = "tile_schedule_figure"
    for name, value in (("seq_len", seq_len), ("block_m", block_m), ("block_n", block_n)):
        _checks.integer(owner, name, value, low=1)
    nq, nk = math.ceil(seq_len / block_m), math.ceil(seq_len / block_n)
    grid = np.zeros((nq, nk))
    for qb in range(nq):
        rows = (qb * block_m, min((qb + 1) * block_m, seq_len) - 1)
        for kb in fa.key_blocks(qb, block_m, block_n, seq_len, causal):
            cols = (kb * block_n, min((kb + 1) * block_n, seq_len) - 1)
            tail = (kb + 1) * block_n > seq_len
            diagonal = causal and cols[1] > rows[0]  # some key is in some row's future
            grid[qb, kb] = 2 if (tail or diagonal) else 1
    done, full = int((grid > 0).sum()), int((grid == 1).sum())
    fig = go.Figure(go.Heatmap(
        z=grid, zmin=0, zmax=2, showscale=False, xgap=1, ygap=1,
        colorscale=[[0, "#f2f2f2"], [0.33, "#f2f2f2"], [0.34, SEEN], [0.66, SEEN], [0.67, CURRENT], [1, CURRENT]],
        customdata=np.vectorize(lambda c: ["skipped", "full tile", "masked tile"][int(c)])(grid),
        hovertemplate="query block %{y}, key block %{x}: %{customdata}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="query block (BLOCK_M rows)")
    fig.update_xaxes(title="key block (BLOCK_N keys)", side="top")
    fig.update_layout(
        title=dict(text=f"N={seq_len}, {block_m}x{block_n} tiles, causal={causal}: {done} of {nq * nk} tiles "
                        f"computed ({done / (nq * nk):.0%}), {full} without a mask", x=0.01),
        height=min(120 + 18 * nq, 520), margin=dict(l=60, r=20, t=90, b=20))
    return fig


def hbm_traffic_figure(seq_lens=(512, 1024, 2048, 4096, 8192, 16384, 32768), batch: int = 1, heads: int = 32,
                       head_dim: int = 128, block_m: int = 128, dtype=torch.bfloat16) -> go.Figure:
    """HBM bytes of one attention forward against N: naive (S and P through memory), FlashAttention
    with no cache reuse (K, V re-read per query block), and the floor (Q, K, V, O once)."""
    ns = list(seq_lens)
    naive = [fa.naive_hbm_bytes(batch, heads, n, head_dim, dtype=dtype) for n in ns]
    flash = [fa.flash_forward_hbm_bytes(batch, heads, n, head_dim, block_m=block_m, dtype=dtype) for n in ns]
    floor = [roofline.attention(batch, heads, n, head_dim, dtype=dtype).bytes for n in ns]
    fig = go.Figure()
    for name, ys, color in (("naive: S and P written and read", naive, "#E45756"),
                            (f"FlashAttention, K/V re-read per {block_m}-row block", flash, SEEN),
                            ("floor: Q, K, V read and O written once", floor, EXACT)):
        fig.add_trace(go.Scatter(x=ns, y=ys, mode="lines+markers", name=name, line=dict(color=color),
                                 hovertemplate="N=%{x}<br>%{y:.3s}B<extra></extra>"))
    fig.update_layout(title=f"HBM bytes of one forward (B={batch}, H={heads}, D={head_dim})", height=380,
                      xaxis=dict(type="log", title="sequence length N"), yaxis=dict(type="log", title="bytes"),
                      margin=dict(l=60, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.2))
    return fig


def bench_figure(rows: list[dict], *, title: str | None = None) -> go.Figure:
    """TFLOP/s of labkit's kernel and each SDPA baseline, one cluster per (N, causal, pass)."""
    rows = [r for r in rows if r.get("kind") == "attention"]
    if not rows:
        raise ValueError("bench_figure: rows must hold benchmark rows of kind 'attention'")

    def group(r):
        return f"N={r['seq_len']} D={r['head_dim']}{' causal' if r['causal'] else ''} {r['pass']}"

    groups = list(dict.fromkeys(group(r) for r in rows))
    fig = go.Figure()
    ours = {group(r): r["tflops"] for r in rows}
    fig.add_trace(go.Bar(name="labkit flash_attention (Triton)", x=groups, y=[ours[g] for g in groups],
                         marker_color=CURRENT))
    for i, base in enumerate(dict.fromkeys(r["baseline"] for r in rows)):
        got = {group(r): r["baseline_tflops"] for r in rows if r["baseline"] == base}
        fig.add_trace(go.Bar(name=base, x=groups, y=[got.get(g) for g in groups],
                             marker_color=[SEEN, EXACT, "#B279A2"][i % 3]))
    fig.update_layout(barmode="group", title=title or "attention TFLOP/s", yaxis_title="TFLOP/s", height=380,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.3))
    return fig


__all__ = ["bench_figure", "hbm_traffic_figure", "online_softmax_figure", "online_softmax_states",
           "tile_schedule_figure"]
