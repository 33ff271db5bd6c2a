"""Cross-entropy whose forward kernel also writes the gradient (the Liger-Kernel recipe).

For one row of logits z (V,) and its target y, with p = softmax(z),

    loss = logsumexp(z) - z_y                 dloss/dz = p - onehot(y)

so the gradient needs nothing the forward did not already compute. The kernel streams each row
twice in blocks of the vocabulary: pass 1 keeps a running max m and a running sum
d = sum exp(z - m) (the online softmax of Milakov & Gimelshein 2018) and reads z_y; pass 2 writes
(exp(z - m) / d - onehot(y)) * scale. A row whose target is `ignore_index` gets loss 0 and
gradient 0. The scale folds the reduction into the gradient:

    "mean": 1 / (number of non-ignored targets)    (PyTorch's mean, over scored tokens only)
    "sum":  1
    "none": the backward's per-row upstream gradient (so the forward stores the unscaled one)

Liger writes this gradient over the logits in place to save a (tokens, vocab) buffer; here the
standalone function writes it to a new buffer (the caller may still need its logits) and
labkit.kernels.fused_linear_ce, which owns its logits chunk, writes in place.

Statistics run in float32 (float64 for float64 logits); the loss has the logits' dtype, as
torch.nn.functional.cross_entropy's does.

References:
    M. Milakov, N. Gimelshein, "Online normalizer calculation for softmax", 2018 (arXiv:1805.02867).
    P.-L. Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024
        (arXiv:2410.10989), github.com/linkedin/Liger-Kernel (ops/cross_entropy.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from labkit import _checks
from labkit.kernels._common import INTERPRET, acc_dtype, check_float_tensor, round_to

REDUCTIONS = ("mean", "sum", "none")
INTERPRETER_BLOCK = 65536  # elements per program under the CPU interpreter (~0.5 ms per program)
GPU_BLOCK_V = 32768  # vocabulary block per row on a GPU (Liger's MAX_FUSED_SIZE)


def check_targets(owner: str, target, n_rows: int, n_classes: int, ignore_index: int, device) -> torch.Tensor:
    """target as a (n_rows,) integer tensor whose entries are in [0, n_classes) or equal ignore_index."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{owner}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{owner}: target must be an int64 (or int32) tensor of class indices, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"{owner}: target must be on {device}, got {target.device}")
    if target.numel() != n_rows:
        raise ValueError(f"{owner}: target must hold one class index per row ({n_rows}), got shape "
                         f"{tuple(target.shape)}")
    target = target.reshape(-1)
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):  # one host sync per call; an out-of-range index would read outside the row
        first = target[bad][0].item()
        raise ValueError(f"{owner}: target values must be in [0, {n_classes}) or ignore_index={ignore_index}, "
                         f"got {first}")
    return target.contiguous()


def launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_V columns, num_warps) of the CE kernel: one row per program, a 32k-wide
    vocabulary block and 32 warps on a GPU (as Liger); a few big blocks under the interpreter."""
    if INTERPRET:
        block_v = min(triton.next_power_of_2(n_cols), INTERPRETER_BLOCK)
        return min(triton.next_power_of_2(max(n_rows, 1)), max(1, INTERPRETER_BLOCK // block_v)), block_v, 1
    block_v = min(triton.next_power_of_2(n_cols), GPU_BLOCK_V)
    return 1, block_v, max(4, min(32, block_v // 512))


# --- kernel -----------------------------------------------------------------------------


@triton.jit
def ce_fwd_kernel(z_ptr, stride_z, target_ptr, loss_ptr, grad_ptr, stride_grad, row_scale_ptr, scale,
                  n_rows, n_cols, ignore_index,
                  HAS_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per-row loss, and (HAS_GRAD) the scaled gradient; grad_ptr may be z_ptr (in place)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < n_rows
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    scored = row_ok & (y != ignore_index)
    rows64 = rows.to(tl.int64)
    z_row = z_ptr + rows64 * stride_z  # (BLOCK_M,) pointers to each row

    # pass 1: running max m and normalizer d = sum exp(z - m), in blocks of the vocabulary
    if UPCAST:
        m = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
        d = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        m = tl.full([BLOCK_M], -1e30, dtype=tl.float64)
        d = tl.zeros([BLOCK_M], dtype=tl.float64)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        z = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=float("-inf"))  # (BLOCK_M, BLOCK_V)
        if UPCAST:
            z = z.to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    d = tl.where(row_ok, d, 1.0)  # padding rows of the block: keep log and division finite
    z_y = tl.load(z_row + tl.where(scored, y, 0), mask=scored, other=0.0)
    if UPCAST:
        z_y = z_y.to(tl.float32)
    lse = m + tl.log(d)
    loss = tl.where(scored, lse - z_y, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)

    # pass 2: gradient (softmax - onehot) * scale; zero for ignored rows
    if HAS_GRAD:
        s = tl.where(scored, scale, 0.0)
        if HAS_ROW_SCALE:
            s = s * tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        g_row = grad_ptr + rows64 * stride_grad
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            z = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=float("-inf"))
            if UPCAST:
                z = z.to(tl.float32)
            p = tl.exp(z - m[:, None]) / d[:, None]
            p = tl.where(cols[None, :] == y[:, None], p - 1.0, p)
            tl.store(g_row[:, None] + cols[None, :], round_to(p * s[:, None], grad_ptr.dtype.element_ty), mask=mask)


def ce_rows(z: torch.Tensor, target: torch.Tensor, ignore_index: int, *, grad: torch.Tensor | None = None,
            scale: float = 1.0, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel on z (N, V) (unit stride along V): returns the per-row losses (N,) in float32
    (float64 for float64 z) and, if `grad` is given (may be z itself), writes the scaled gradient there."""
    n_rows, n_cols = z.shape
    loss = torch.empty(n_rows, dtype=acc_dtype(z.dtype), device=z.device)
    if n_rows == 0:
        return loss
    block_m, block_v, warps = launch_config(n_rows, n_cols)
    ce_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        z, z.stride(0), target, loss, z if grad is None else grad, z.stride(0) if grad is None else grad.stride(0),
        loss if row_scale is None else row_scale, scale, n_rows, n_cols, ignore_index,
        HAS_GRAD=grad is not None, HAS_ROW_SCALE=row_scale is not None, UPCAST=z.dtype != torch.float64,
        BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps)
    return loss


# --- autograd ---------------------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    """Loss and gradient in one forward kernel; the backward only scales the saved gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
                grad_enabled: bool):
        n_valid = int((target != ignore_index).sum())
        need_grad = logits.requires_grad and grad_enabled  # no gradient buffer under torch.no_grad()
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if need_grad else None
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        loss = ce_rows(logits, target, ignore_index, grad=grad, scale=scale)  # (N,)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        if reduction == "none":
            return loss.to(logits.dtype)
        total = loss.sum()
        if reduction == "mean":
            total = total / n_valid  # 0 / 0 = nan when every target is ignored, as in PyTorch
        return total.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            return grad * grad_loss.reshape(-1, 1).to(grad.dtype), None, None, None, None  # (N, V) * (N, 1)
        return grad * grad_loss.to(grad.dtype), None, None, None, None  # out of place: safe to call twice


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (N, V) against class indices target (N,), like F.cross_entropy."""
    owner = "cross_entropy"
    check_float_tensor(owner, "logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{owner}: logits must have shape (N, V) with V >= 1, got {tuple(logits.shape)}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"{owner}: logits must be contiguous along V, got strides {logits.stride()}; "
                         "call .contiguous()")
    ignore_index = _checks.integer(owner, "ignore_index", ignore_index, low=-(2**62))
    _checks.choice(owner, "reduction", reduction, REDUCTIONS)
    target = check_targets(owner, target, logits.shape[0], logits.shape[1], ignore_index, logits.device)
    return CrossEntropyFunction.apply(logits, target, ignore_index, reduction, torch.is_grad_enabled())


class CrossEntropyLoss(nn.Module):
    """nn.CrossEntropyLoss(ignore_index=..., reduction=...) computed by the fused kernel."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.ignore_index = _checks.integer("CrossEntropyLoss", "ignore_index", ignore_index, low=-(2**62))
        self.reduction = _checks.choice("CrossEntropyLoss", "reduction", reduction, REDUCTIONS)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, self.ignore_index, self.reduction)


__all__ = ["CrossEntropyFunction", "CrossEntropyLoss", "REDUCTIONS", "ce_fwd_kernel", "ce_rows", "check_targets",
           "cross_entropy", "launch_config"]
