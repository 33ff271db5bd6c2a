"""SwiGLU's gating, silu(gate) * up, as one Triton kernel forward and one backward.

The SwiGLU feed-forward block is down(silu(x W_gate) * (x W_up)), silu(a) = a * sigmoid(a).
The two matmuls stay cuBLAS's; this module fuses the elementwise part between them:

    h = silu(g) * u
    dg = dh * u * s * (1 + g * (1 - s)),   s = sigmoid(g)     (d silu(g)/dg = s + g s (1 - s))
    du = dh * silu(g)

Eager PyTorch launches silu and mul separately, and autograd keeps three (tokens, hidden)
tensors for the backward: g (for silu), silu(g) and u (for mul). The fused function keeps g
and u and recomputes sigmoid(g) in the backward, which is free next to the memory traffic:
a bandwidth-bound op's cost is bytes, not FLOPs (chapter 01). The forward moves 3 tensors'
worth of bytes (read g, u; write h) instead of 5 (silu reads g, writes silu(g); mul reads
both, writes h).

Arithmetic runs in float32 (float64 for float64 inputs); results are rounded once.

References:
    N. Shazeer, "GLU Variants Improve Transformer", 2020 (arXiv:2002.05202).
    P.-L. Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024
        (arXiv:2410.10989), github.com/linkedin/Liger-Kernel (ops/swiglu.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from labkit import _checks
from labkit.kernels._common import INTERPRET, check_float_tensor, round_to, rows_view, unit_last_stride

INTERPRETER_BLOCK = 16384  # elements per program under the CPU interpreter (~0.5 ms per program)
GPU_BLOCK = 4096  # elements per program on a GPU, over 8 warps: 16 per thread


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): a 2-D tile of about INTERPRETER_BLOCK or GPU_BLOCK elements."""
    budget = INTERPRETER_BLOCK if INTERPRET else GPU_BLOCK
    block_n = min(triton.next_power_of_2(n_cols), budget)
    block_m = min(triton.next_power_of_2(n_rows), max(1, budget // block_n))
    return block_m, block_n


# --- kernels ---------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_rows, n_cols, stride_g, stride_u, stride_h,
                       UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
    if UPCAST:
        g = g.to(tl.float32)
        u = u.to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u  # silu(g) * u
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], round_to(h, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_rows, n_cols, stride_dh, stride_g, stride_u,
                       stride_dg, stride_du, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
    if UPCAST:
        dh = dh.to(tl.float32)
        g = g.to(tl.float32)
        u = u.to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))  # sigmoid(g), recomputed instead of stored
    silu = g * s
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    du = dh * silu
    tl.store(dg_ptr + rows[:, None] * stride_dg + cols[None, :], round_to(dg, dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows[:, None] * stride_du + cols[None, :], round_to(du, du_ptr.dtype.element_ty), mask=mask)


# --- autograd ---------------------------------------------------------------------------


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, fused; saves gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g2, u2 = rows_view("swiglu", "gate", gate), rows_view("swiglu", "up", up)  # (N, I) each
        n_rows, n_cols = g2.shape
        h = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        block_m, block_n = _blocks(n_rows, n_cols)
        if n_rows > 0:
            grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
            _swiglu_fwd_kernel[grid](g2, u2, h, n_rows, n_cols, g2.stride(0), u2.stride(0), h.stride(0),
                                     UPCAST=gate.dtype != torch.float64, BLOCK_M=block_m, BLOCK_N=block_n,
                                     num_warps=8)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        n_rows, n_cols = g2.shape
        dh2 = unit_last_stride(dh.reshape(n_rows, n_cols))
        dg = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
        du = torch.empty_like(dg)
        block_m, block_n = _blocks(n_rows, n_cols)
        if n_rows > 0:
            grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
            _swiglu_bwd_kernel[grid](dh2, g2, u2, dg, du, n_rows, n_cols, dh2.stride(0), g2.stride(0), u2.stride(0),
                                     dg.stride(0), du.stride(0), UPCAST=g2.dtype != torch.float64,
                                     BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of the same shape and dtype, e.g. (B, T, hidden)."""
    owner = "swiglu"
    check_float_tensor(owner, "gate", gate)
    check_float_tensor(owner, "up", up)
    if up.shape != gate.shape:
        raise ValueError(f"{owner}: up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"{owner}: up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"{owner}: up must be on gate's device {gate.device}, got {up.device}")
    rows_view(owner, "gate", gate)  # e.g. the halves of a fused gate_up projection: strided rows are fine
    rows_view(owner, "up", up)
    return SwiGLUFunction.apply(gate, up)


class SwiGLUMLP(nn.Module):
    """down(swiglu(gate(x), up(x))): the parameters are named as in labkit.models.MLP(mlp="swiglu"),
    so its state_dict loads into this module and back."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = False, device=None, dtype=None):
        super().__init__()
        dim = _checks.integer("SwiGLUMLP", "dim", dim, low=1)
        hidden = _checks.integer("SwiGLUMLP", "hidden", hidden, low=1)
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate = nn.Linear(dim, hidden, **kw)
        self.up = nn.Linear(dim, hidden, **kw)
        self.down = nn.Linear(hidden, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.down(swiglu(self.gate(x), self.up(x)))  # (B, T, hidden) in between


def swiglu_bytes(n_elements: int, element_bytes: int, *, backward: bool = False) -> int:
    """Bytes the fused kernels move at the least: forward reads gate and up, writes h;
    backward reads dh, gate and up, writes dgate and dup."""
    return (5 if backward else 3) * n_elements * element_bytes


__all__ = ["SwiGLUFunction", "SwiGLUMLP", "swiglu", "swiglu_bytes"]
