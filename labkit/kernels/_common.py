"""What Part V's Triton kernels share: chapter 16's FlashAttention and chapter 17's RMSNorm, SwiGLU, RoPE,
cross-entropy and fused linear cross-entropy.

- where the kernels run (`INTERPRET`, `kernel_device`): compiled for CUDA, or on CPU tensors in Triton's
  interpreter, which `import labkit` switches on when there is no GPU;
- argument checks (`check_float_tensor` and its two halves) and layout helpers (`rows_view`, `unit_last_stride`);
- `round_to`, the one @triton.jit helper: float32 rounded to a kernel's input or output dtype. Compiled,
  it is a cast. The interpreter truncates float32 -> bfloat16 instead of rounding to nearest (one ulp
  off) and cannot `tl.dot` bfloat16 operands, so there bfloat16 is rounded by hand and kept in float32,
  which holds every bfloat16 value exactly.

labkit.kernels' __init__ imports labkit first, so TRITON_INTERPRET is settled before this module (and
any kernel) is defined.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: Triton reads it as each kernel is defined


def kernel_device() -> torch.device:
    """Where the kernels run in this process: 'cuda' when compiled, 'cpu' under the interpreter."""
    return torch.device("cpu" if INTERPRET else "cuda")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 inputs (so gradcheck works), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- argument checks ---------------------------------------------------------------------------


def _dtype_names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(owner: str, name: str, t, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """t, if it is a torch.Tensor of one of `dtypes`; else TypeError naming owner and argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{owner}: {name} must be {_dtype_names(dtypes)}, got {t.dtype}")
    return t


def check_kernel_device(owner: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """t, if it is on the device the kernels run on (`kernel_device`); else ValueError."""
    want = kernel_device().type
    if t.device.type != want:
        how = ("Triton runs in its interpreter in this process: pass CPU tensors" if INTERPRET else
               "set TRITON_INTERPRET=1 before importing labkit to run Triton on the CPU")
        raise ValueError(f"{owner}: {name} must be on {want} here, got {t.device} ({how})")
    return t


def check_float_tensor(owner: str, name: str, t, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """t, if it is a floating-point tensor a Triton kernel can read here (dtype and device)."""
    return check_kernel_device(owner, name, check_tensor(owner, name, t, dtypes))


# --- layouts -----------------------------------------------------------------------------------


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


# --- rounding inside a kernel ----------------------------------------------------------------------

if INTERPRET:
    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """x rounded to `dtype`; bfloat16 to nearest even by hand, returned as float32 (see the module
        docstring). A tl.store into a bfloat16 pointer then casts it exactly."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
        else:
            x = x.to(dtype)
        return x
else:
    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """x rounded to `dtype` (compiled: a cast, round to nearest even)."""
        return x.to(dtype)


__all__ = ["FLOAT_DTYPES", "INTERPRET", "acc_dtype", "check_float_tensor", "check_kernel_device", "check_tensor",
           "kernel_device", "round_to", "rows_view", "unit_last_stride"]
