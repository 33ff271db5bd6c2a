"""Roofline plots (chapter 01-roofline): roofs per device, ops placed by arithmetic intensity.

The model lives in labkit.perf.roofline; this module only draws it.
"""

from __future__ import annotations

import math
from typing import Iterable

import plotly.graph_objects as go
import torch

from labkit.perf import roofline as rl

ROOF_COLORS = ["#222222", "#7F7F7F", "#B279A2", "#9D755D"]
ROOF_DASH = ["solid", "dash", "dot", "dashdot"]
MEMORY_COLOR, COMPUTE_COLOR, MEASURED_COLOR = "#E45756", "#4C78A8", "#54A24B"


def _as_devices(devices) -> list[rl.Device]:
    if isinstance(devices, rl.Device):
        devices = [devices]
    devices = list(devices)
    if not devices or not all(isinstance(d, rl.Device) for d in devices):
        raise TypeError("roofline_figure: devices must be a Device or a non-empty list of Devices")
    return devices


def _measured_points(measured) -> list[tuple[str, float, float]]:
    """(name, intensity, achieved FLOP/s) from Measurements or dicts with those keys (or 'tflops')."""
    points = []
    for i, m in enumerate(measured or ()):
        if isinstance(m, rl.Measurement):
            points.append((m.op.name, m.intensity, m.flops_per_s))
        elif isinstance(m, dict) and "intensity" in m and ("flops_per_s" in m or "tflops" in m):
            flops = m["flops_per_s"] if "flops_per_s" in m else m["tflops"] * 1e12
            points.append((str(m.get("name", f"point {i}")), float(m["intensity"]), float(flops)))
        else:
            raise TypeError(f"roofline_figure: measured[{i}] must be a Measurement or a dict with "
                            f"'intensity' and 'flops_per_s'/'tflops', got {type(m).__name__}")
    return points


def _fmt_seconds(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


def _cluster_labels(items: list[tuple[str, float, float]], tol: float = 0.2) -> tuple[list[str], list[str]]:
    """Text and text position for points (name, x, y) on log axes: a point within `tol` decades (in
    both x and y) of an earlier labelled one shares its label. Labels go below-right of their
    point (under the roof, where nothing else is drawn); a close neighbour is staggered a line
    lower, or put above-left when it sits higher up the memory roof."""
    labels, anchors = [""] * len(items), []  # anchors: [log10 x, log10 y, index, names]
    for i, (name, x, y) in enumerate(items):
        lx, ly = math.log10(max(x, 1e-30)), math.log10(max(y, 1e-30))
        for a in anchors:
            if abs(a[0] - lx) < tol and abs(a[1] - ly) < tol:
                a[3].append(name)
                break
        else:
            anchors.append([lx, ly, i, [name]])
    positions = ["bottom right"] * len(items)
    prev, drop = None, 0
    for lx, ly, i, names in sorted(anchors):
        text = ", ".join(names) if len(names) <= 3 else ", ".join(names[:2]) + f" +{len(names) - 2}"
        near = prev is not None and lx - prev[0] < 0.8 and abs(ly - prev[1]) < 0.6
        if near and ly > prev[1] + 0.1:  # up the memory roof from its neighbour: label above-left
            positions[i], drop = "top left", 0
        else:  # same height as a nearby label: push it one line lower (up to two)
            drop = (drop + 1) % 3 if near else 0
        labels[i] = "<br>" * drop + text
        prev = (lx, ly)
    return labels, positions


def roofline_figure(devices, ops: Iterable[rl.Op] = (), measured=None, dtype=torch.bfloat16, *,
                    title: str | None = None, x_range: tuple[float, float] | None = None,
                    height: int = 480) -> go.Figure:
    """Log-log roofline: one roof per device (ridge marked), `ops` on the first device's roof.

    Each op sits at (intensity, attainable FLOP/s on devices[0]), red if memory-bound there,
    blue if compute-bound. `measured` points (Measurement objects or dicts) sit at the FLOP/s
    they achieved. A device without a peak for `dtype` uses its first listed dtype (the legend
    says which).
    """
    devices = _as_devices(devices)
    ops = list(ops)
    if not all(isinstance(o, rl.Op) for o in ops):
        raise TypeError("roofline_figure: ops must be labkit.perf.roofline.Op objects")
    want = rl.dtype_name(dtype, where="roofline_figure")
    measured_pts = _measured_points(measured)

    def dtype_for(d: rl.Device) -> str:
        return want if want in d.peak_flops else next(iter(d.peak_flops))

    # x range: every intensity and ridge, with margin, in whole decades.
    xs = [o.intensity for o in ops if o.intensity > 0] + [p[1] for p in measured_pts if p[1] > 0]
    xs += [d.ridge(dtype_for(d)) for d in devices]
    if x_range is None:
        lo, hi = 10 ** math.floor(math.log10(min(xs) / 3)), 10 ** math.ceil(math.log10(max(xs) * 30))  # room for labels
    else:
        lo, hi = x_range
        if not (0 < lo < hi):
            raise ValueError(f"roofline_figure: x_range must be (lo, hi) with 0 < lo < hi, got {x_range}")

    fig = go.Figure()
    for k, d in enumerate(devices):
        dt = dtype_for(d)
        peak, ridge = d.peak(dt), d.ridge(dt)
        color, dash = ROOF_COLORS[k % len(ROOF_COLORS)], ROOF_DASH[k % len(ROOF_DASH)]
        rx = [lo, ridge, hi] if lo < ridge < hi else [lo, hi]
        fig.add_trace(go.Scatter(
            x=rx, y=[rl.attainable(d, x, dt) for x in rx], mode="lines", line=dict(color=color, dash=dash, width=2),
            name=f"{d.name} {dt}: {peak / 1e12:.3g} TFLOP/s, {d.bandwidth / 1e12:.3g} TB/s",
            hovertemplate="I=%{x:.3g} FLOP/B<br>%{y:.3s}FLOP/s<extra>" + d.name + "</extra>"))
        fig.add_trace(go.Scatter(
            x=[ridge], y=[peak], mode="markers+text", marker=dict(color=color, size=9, symbol="circle-open"),
            text=[f"ridge {ridge:.3g}"], textposition="top left", showlegend=False,
            hovertemplate=f"ridge point of {d.name}: {ridge:.3g} FLOP/byte<extra></extra>"))

    ref, ref_dt = devices[0], dtype_for(devices[0])
    ridge0 = ref.ridge(ref_dt)
    labels, positions = _cluster_labels([(o.name, o.intensity, rl.attainable(ref, o.intensity, ref_dt)) for o in ops])
    for bound, color in (("memory-bound", MEMORY_COLOR), ("compute-bound", COMPUTE_COLOR)):
        idx = [i for i, o in enumerate(ops) if (o.intensity < ridge0) == (bound == "memory-bound")]
        fig.add_trace(go.Scatter(
            x=[ops[i].intensity for i in idx], y=[rl.attainable(ref, ops[i].intensity, ref_dt) for i in idx],
            mode="markers+text", marker=dict(color=color, size=10), text=[labels[i] for i in idx],
            textposition=[positions[i] for i in idx], textfont=dict(size=11), name=f"{bound} on {ref.name}",
            customdata=[[ops[i].name, ops[i].flops, ops[i].bytes] for i in idx],
            hovertemplate="%{customdata[0]}<br>I=%{x:.3g} FLOP/B<br>%{customdata[1]:.3s}FLOP, "
                          "%{customdata[2]:.3s}B<br>roof: %{y:.3s}FLOP/s<extra></extra>"))
    if measured_pts:
        # labelled only when no model ops are drawn (else the hover says which is which)
        text, where = _cluster_labels(measured_pts)
        if ops:
            text = [""] * len(measured_pts)
        fig.add_trace(go.Scatter(
            x=[p[1] for p in measured_pts], y=[p[2] for p in measured_pts], mode="markers+text",
            marker=dict(color=MEASURED_COLOR, size=10, symbol="diamond"),
            text=text, textposition=where, textfont=dict(size=10, color=MEASURED_COLOR), name="measured",
            customdata=[[p[0]] for p in measured_pts],
            hovertemplate="%{customdata[0]}<br>I=%{x:.3g} FLOP/B<br>achieved %{y:.3s}FLOP/s<extra></extra>"))

    fig.update_layout(
        title=dict(text=title or f"Roofline ({want})", font=dict(size=15)), height=height,
        margin=dict(l=10, r=10, t=60, b=40),
        xaxis=dict(type="log", title="arithmetic intensity (FLOP / byte)", range=[math.log10(lo), math.log10(hi)]),
        yaxis=dict(type="log", title="FLOP/s", tickformat="~s"),
        legend=dict(orientation="h", yanchor="top", y=-0.15, font=dict(size=11)),
    )
    return fig


def layer_roofline_figure(batch: int = 1, seq_len: int = 2048, hidden: int = 4096, dtype="bf16",
                          phase: str = "decode", devices=(rl.H100_SXM, rl.A100_SXM_80GB)) -> go.Figure:
    """The ops of one decoder layer (labkit.perf.roofline.decoder_layer_ops) on the roofline.

    The title says how many ops are memory-bound on the first device and what share of the
    layer's roofline time they take. Built for slider_panel (a few ms per call).
    """
    devices = _as_devices(devices)
    ops = rl.decoder_layer_ops(batch, seq_len, hidden, phase=phase, dtype=dtype)
    ref = devices[0]
    dt = rl.dtype_name(dtype, where="layer_roofline_figure")
    if dt not in ref.peak_flops:
        raise ValueError(f"layer_roofline_figure: {ref.name} has no {dt!r} peak; it has {sorted(ref.peak_flops)}")
    times = [rl.roofline_time(ref, o, dt) for o in ops]
    mem = [rl.is_memory_bound(ref, o, dt) for o in ops]
    share = sum(t for t, m in zip(times, mem) if m) / sum(times)
    what = f"batch {batch} x {seq_len} tokens" if phase == "prefill" else f"batch {batch}, KV cache {seq_len}"
    title = (f"{phase}: {what}, hidden {hidden}, {dt}<br><sup>{sum(mem)}/{len(ops)} ops memory-bound on {ref.name}, "
             f"{100 * share:.0f}% of the layer's time (≥ {_fmt_seconds(sum(times))})</sup>")
    return roofline_figure(devices, ops, dtype=dt, title=title, x_range=(1e-2, 1e5))


def intensity_vs_batch_figure(device: rl.Device = rl.H100_SXM, hidden: int = 4096, kv_len: int = 4096,
                              dtype="bf16", max_batch: int = 4096) -> go.Figure:
    """Decode intensity against batch size: the weight GEMMs climb to the ridge, KV-cache attention stays flat."""
    dt = rl.dtype_name(dtype, where="intensity_vs_batch_figure")
    batches = sorted({int(round(2 ** (e / 4))) for e in range(0, 4 * int(math.log2(max_batch)) + 1)})
    heads = max(1, hidden // 128)
    gemm_i = [rl.gemv(hidden, hidden, batch=b, dtype=dt).intensity for b in batches]
    attn_i = [rl.decode_attention(b, heads, kv_len, hidden // heads, dtype=dt).intensity for b in batches]
    ridge = device.ridge(dt)
    crit = rl.decode_critical_batch(device, hidden, dtype=dt)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=batches, y=gemm_i, mode="lines", name=f"weight GEMM {hidden}x{hidden}",
                             line=dict(color=COMPUTE_COLOR, width=3)))
    fig.add_trace(go.Scatter(x=batches, y=attn_i, mode="lines", name=f"attention over KV cache (L={kv_len})",
                             line=dict(color=MEMORY_COLOR, width=3)))
    fig.add_trace(go.Scatter(x=[batches[0], batches[-1]], y=[ridge, ridge], mode="lines",
                             name=f"{device.name} {dt} ridge {ridge:.3g}", line=dict(color="#222", dash="dash")))
    if math.isfinite(crit) and crit <= batches[-1]:
        fig.add_trace(go.Scatter(x=[crit], y=[ridge], mode="markers+text", text=[f"batch {crit}"],
                                 textposition="top left", marker=dict(size=10, color="#222"), showlegend=False))
    fig.update_layout(title=f"Decode: intensity vs batch ({dt})", height=420, margin=dict(l=10, r=10, t=50, b=40),
                      xaxis=dict(type="log", title="decode batch (sequences)"),
                      yaxis=dict(type="log", title="arithmetic intensity (FLOP / byte)"),
                      legend=dict(orientation="h", yanchor="top", y=-0.2))
    return fig


def sweep_figure(xs, measured, device: rl.Device, dtype, *, x_title: str = "batch",
                 title: str | None = None) -> go.Figure:
    """Achieved FLOP/s of a sweep (e.g. decode batch sizes) beside what the roofline allows.

    measured: one Measurement per x. The dashed line is attainable(device, intensity) for each
    point: while it climbs with slope 1 the op is memory-bound and its time hardly changes.
    """
    xs, measured = list(xs), list(measured)
    if len(xs) != len(measured) or not xs:
        raise ValueError(f"sweep_figure: xs and measured must be non-empty and of equal length, "
                         f"got {len(xs)} and {len(measured)}")
    if not all(isinstance(m, rl.Measurement) for m in measured):
        raise TypeError("sweep_figure: measured must hold labkit.perf.roofline.Measurement objects")
    dt = rl.dtype_name(dtype, where="sweep_figure")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=[rl.attainable(device, m.intensity, dt) for m in measured],
                             mode="lines", line=dict(color="#222", dash="dash"),
                             name=f"roofline bound ({device.name})"))
    fig.add_trace(go.Scatter(x=xs, y=[m.flops_per_s for m in measured], mode="lines+markers",
                             marker=dict(color=MEASURED_COLOR, size=9, symbol="diamond"),
                             line=dict(color=MEASURED_COLOR), name="measured",
                             customdata=[[m.seconds * 1e3, m.intensity] for m in measured],
                             hovertemplate="%{x}: %{y:.3s}FLOP/s<br>%{customdata[0]:.3g} ms, "
                                           "I=%{customdata[1]:.3g} FLOP/B<extra></extra>"))
    fig.update_layout(title=title or f"Achieved FLOP/s vs {x_title} ({dt})", height=400,
                      margin=dict(l=10, r=10, t=50, b=40),
                      xaxis=dict(type="log", title=x_title), yaxis=dict(type="log", title="FLOP/s", tickformat="~s"),
                      legend=dict(orientation="h", yanchor="top", y=-0.2))
    return fig


__all__ = ["intensity_vs_batch_figure", "layer_roofline_figure", "roofline_figure", "sweep_figure"]
