"""RMSNorm as one Triton kernel forward and one backward (the Liger-Kernel recipe).

    y = x / sqrt(mean(x^2) + eps) * weight          over the last dimension C of x (..., C)

Eager PyTorch runs this as about eight kernels (upcast, square, mean, add eps, rsqrt,
multiply, downcast, multiply by weight), each reading its input from HBM and writing its
output back. Fused, the forward reads x and weight once and writes y once, plus one float per
row, rstd = 1 / sqrt(mean(x^2) + eps), which the backward reuses instead of recomputing the
statistics. With x_hat = x * rstd and g = dy * weight, the backward is

    dx = rstd * (g - x_hat * mean(g * x_hat))           (per row, over C)
    dweight = sum over rows of dy * x_hat

dweight is a reduction over all rows: each program accumulates the rows it owns in float32
and writes one partial row; a final `sum(0)` adds the partials (deterministic, no atomics).

Statistics and arithmetic run in float32 for fp16/bf16/fp32 inputs (float64 for float64, so
`gradcheck` works) and the result is rounded once to x's dtype. (HF Llama's RMSNorm rounds
the normalized x to the input dtype before multiplying by the weight; in float32 the two agree.)

References:
    B. Zhang, R. Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
    P.-L. Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024
        (arXiv:2410.10989), github.com/linkedin/Liger-Kernel (ops/rms_norm.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from labkit import _checks
from labkit.kernels._common import INTERPRET, acc_dtype, check_float_tensor, round_to, rows_view, unit_last_stride

# Under Triton's CPU interpreter every program instance costs ~0.5 ms: give each one a big
# block (up to this many elements) so a CPU grid stays a handful of programs.
INTERPRETER_BLOCK = 8192


def _launch(n_rows: int, block_c: int) -> tuple[int, int]:
    """(rows per block, num_warps): one long row per program on a GPU, big blocks in the interpreter."""
    if INTERPRET:
        return min(triton.next_power_of_2(n_rows), max(1, INTERPRETER_BLOCK // block_c)), 1
    warps = 4 if block_c < 2048 else 8 if block_c < 8192 else 16
    return max(1, min(16, 2048 // block_c)), warps


def _n_programs(device: torch.device, n_blocks: int) -> int:
    """How many programs share the row blocks in the backward (each writes one partial dweight row)."""
    if INTERPRET:
        return min(2, n_blocks)
    return min(2 * torch.cuda.get_device_properties(device).multi_processor_count, n_blocks)  # two per SM


# --- kernels ---------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, stride_x, stride_y, eps,
                         UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_C)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_M,): padding adds 0, divide by C
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], round_to(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols,
                         stride_dy, stride_x, stride_dx, rows_per_program,
                         UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    first = pid * rows_per_program
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    else:
        dw = tl.zeros([BLOCK_C], dtype=tl.float64)
    for start in range(0, rows_per_program, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = (rows < n_rows) & (rows < first + rows_per_program)
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / n_cols  # (BLOCK_M,): mean(g * x_hat)
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :], round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(dw_ptr + pid * n_cols + cols, dw, mask=col_ok)  # one partial row per program


# --- autograd ---------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """rms_norm with a fused forward and a fused backward; saves x, weight and rstd (one float per row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = rows_view("rms_norm", "x", x)  # (N, C)
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=acc_dtype(x.dtype), device=x.device)
        block_c = triton.next_power_of_2(n_cols)
        block_m, warps = _launch(n_rows, block_c)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
                x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), eps,
                UPCAST=x.dtype != torch.float64, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = unit_last_stride(dy.reshape(n_rows, n_cols))
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        block_c = triton.next_power_of_2(n_cols)
        block_m, warps = _launch(n_rows, block_c)
        n_blocks = triton.cdiv(n_rows, block_m)
        programs = _n_programs(x2.device, n_blocks) if n_rows > 0 else 0
        dw_partial = torch.zeros((max(programs, 1), n_cols), dtype=acc_dtype(x2.dtype), device=x2.device)
        if programs:
            rows_per_program = triton.cdiv(n_blocks, programs) * block_m
            _rms_norm_bwd_kernel[(programs,)](
                dy2, x2, weight, rstd, dx, dw_partial, n_rows, n_cols,
                dy2.stride(0), x2.stride(0), dx.stride(0), rows_per_program,
                UPCAST=x2.dtype != torch.float64, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
        dw = dw_partial.sum(0).to(weight.dtype)  # (C,)
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of x (..., C) with gain weight (C,) over the last dimension; returns x's shape and dtype."""
    owner = "rms_norm"
    check_float_tensor(owner, "x", x)
    check_float_tensor(owner, "weight", weight)
    eps = _checks.number(owner, "eps", eps, low=0.0, low_open=True)
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{owner}: weight must have shape (C,) = ({x.shape[-1] if x.dim() else '?'},) to match "
                         f"x's last dimension, got {tuple(weight.shape)} for x {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{owner}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{owner}: weight must be on x's device {x.device}, got {weight.device}")
    if weight.stride(0) != 1:
        raise ValueError(f"{owner}: weight must be contiguous, got stride {weight.stride()}")
    rows_view(owner, "x", x)
    return RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """Drop-in for labkit.models.RMSNorm (same `weight`, same `eps`), computed by the fused kernels."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        dim = _checks.integer("RMSNorm", "dim", dim, low=1)
        self.eps = _checks.number("RMSNorm", "eps", eps, low=0.0, low_open=True)
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm_bytes(n_rows: int, n_cols: int, element_bytes: int, *, backward: bool = False) -> int:
    """Bytes the fused kernels move at the least: forward reads x and weight, writes y and rstd (4 B per row);
    backward reads dy, x, weight and rstd, writes dx and the partial dweight rows (counted once)."""
    if backward:
        return (3 * n_rows * n_cols + n_cols) * element_bytes + 4 * n_rows + 4 * n_cols
    return (2 * n_rows * n_cols + n_cols) * element_bytes + 4 * n_rows


__all__ = ["RMSNorm", "RMSNormFunction", "rms_norm", "rms_norm_bytes"]
