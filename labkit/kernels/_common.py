"""Argument checks and layout helpers shared by chapter 17's Triton kernels (rmsnorm, swiglu, rope,
cross_entropy, fused_linear_ce). No kernels here: this module only inspects tensors and the
environment, so importing it never defines a @triton.jit function."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set by `import labkit`
    when there is no GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 inputs (so gradcheck works), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float_tensor(owner: str, name: str, t) -> torch.Tensor:
    """t, if it is a floating-point tensor a Triton kernel can read here; else TypeError/ValueError."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{owner}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{owner}: {name} is on {t.device}, but Triton runs CPU tensors only under its "
                         "interpreter (TRITON_INTERPRET=1, set by `import labkit` when there is no GPU)")
    return t


def rows_view(owner: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """t (..., C) as a (rows, C) view with unit stride along C, without copying: strided rows (a slice or
    a chunk of a wider tensor) are fine, a transposed last dimension is an error (a copy would hide it)."""
    if t.dim() == 0 or t.shape[-1] == 0:
        raise ValueError(f"{owner}: {name} must have a last dimension of size >= 1, got shape {tuple(t.shape)}")
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:
        rows = None
    if rows is None or (rows.shape[1] > 1 and rows.stride(1) != 1):
        raise ValueError(f"{owner}: {name} must be contiguous in its last dimension and its leading dimensions "
                         f"must flatten to one (shape {tuple(t.shape)}, strides {t.stride()}); call .contiguous()")
    return rows


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dimension has unit stride, else a contiguous copy: for incoming gradients,
    which autograd may hand over in any layout (e.g. expanded from a sum)."""
    return t.contiguous() if t.shape[-1] > 1 and t.stride(-1) != 1 else t


__all__ = ["FLOAT_DTYPES", "acc_dtype", "check_float_tensor", "interpreting", "rows_view", "unit_last_stride"]
