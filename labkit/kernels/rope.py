"""Rotary position embeddings applied to q and k by a Triton kernel (forward and backward).

RoPE rotates each pair of channels (i, i + D/2) of a query or key head at position t by the
angle t * theta_i, theta_i = base^(-2i/D) (the "rotate half" layout of GPT-NeoX and Llama,
which labkit.models uses):

    y1 = x1 cos - x2 sin,    y2 = x2 cos + x1 sin        x1 = x[..., :D/2], x2 = x[..., D/2:]

A rotation's inverse is its transpose, so the backward is the same kernel with sin negated:
dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin. Nothing but cos/sin (shared by every
sequence) is saved for the backward.

Eager PyTorch spends about ten kernels on this per tensor (chunk, four multiplies, a subtract,
an add, a cat, dtype casts of cos/sin) and writes several (B, H, T, D/2) intermediates. The
kernel reads x and the (T, D/2) tables and writes y once. It reads q and k through their
strides, so the (B, T, H, D) -> (B, H, T, D) transpose that follows a q/k projection costs
nothing; only the head dimension must be contiguous.

References:
    J. Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021
        (arXiv:2104.09864).
    P.-L. Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024
        (arXiv:2410.10989), github.com/linkedin/Liger-Kernel (ops/rope.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from labkit import _checks
from labkit.kernels._common import INTERPRET, check_float_tensor, round_to, unit_last_stride
from labkit.models.gpt import rope_cache

INTERPRETER_BLOCK = 16384  # elements of (rows, D/2) per program under the CPU interpreter
GPU_BLOCK = 2048  # on a GPU: e.g. 32 rows x 64 channel pairs, over 8 warps


# --- kernel -----------------------------------------------------------------------------


@triton.jit
def _rotate_rows(x_ptr, y_ptr, cos_ptr, sin_ptr, block, n_heads, seq_len, n_rows, half,
                 sx_b, sx_h, sx_t, sy_b, sy_h, sy_t, stride_cs,
                 BACKWARD: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate BLOCK_R rows of x (B, H, T, D), row r = (b, h, t) flattened, into y."""
    r = block * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # (BLOCK_R,)
    b, h, t = r // (n_heads * seq_len), (r // seq_len) % n_heads, r % seq_len
    d = tl.arange(0, BLOCK_D)  # channel pair index (BLOCK_D,)
    mask = (r < n_rows)[:, None] & (d < half)[None, :]  # (BLOCK_R, BLOCK_D)
    x_row = x_ptr + b * sx_b + h * sx_h + t * sx_t  # (BLOCK_R,) pointers: any layout of (B, H, T)
    y_row = y_ptr + b * sy_b + h * sy_h + t * sy_t
    x1 = tl.load(x_row[:, None] + d[None, :], mask=mask, other=0.0)
    x2 = tl.load(x_row[:, None] + half + d[None, :], mask=mask, other=0.0)
    c = tl.load(cos_ptr + t[:, None] * stride_cs + d[None, :], mask=mask, other=0.0)
    s = tl.load(sin_ptr + t[:, None] * stride_cs + d[None, :], mask=mask, other=0.0)
    if UPCAST:
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        c = c.to(tl.float32)
        s = s.to(tl.float32)
    if BACKWARD:
        s = -s  # rotate back by the same angle
    tl.store(y_row[:, None] + d[None, :], round_to(x1 * c - x2 * s, y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row[:, None] + half + d[None, :], round_to(x2 * c + x1 * s, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, n_q_heads, n_k_heads, seq_len, n_q_rows, n_k_rows,
                 half, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, stride_cs,
                 BACKWARD: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One launch for both tensors: the first programs take q's row blocks, the rest k's."""
    pid = tl.program_id(0)
    q_blocks = tl.cdiv(n_q_rows, BLOCK_R)
    if pid < q_blocks:
        _rotate_rows(q_ptr, qo_ptr, cos_ptr, sin_ptr, pid, n_q_heads, seq_len, n_q_rows, half,
                     sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t, stride_cs, BACKWARD, UPCAST, BLOCK_R, BLOCK_D)
    else:
        _rotate_rows(k_ptr, ko_ptr, cos_ptr, sin_ptr, pid - q_blocks, n_k_heads, seq_len, n_k_rows, half,
                     sk_b, sk_h, sk_t, sko_b, sko_h, sko_t, stride_cs, BACKWARD, UPCAST, BLOCK_R, BLOCK_D)


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on q (B, H, T, D) and k (B, Hkv, T, D); returns new tensors with their layouts."""
    q, k = unit_last_stride(q), unit_last_stride(k)  # incoming gradients may have any layout
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # keep q's strides when dense (a transposed projection)
    B, H, T, D = q.shape
    half = D // 2
    block_d = triton.next_power_of_2(half)
    block_r = max(1, (INTERPRETER_BLOCK if INTERPRET else GPU_BLOCK) // block_d)
    n_q, n_k = B * H * T, B * k.shape[1] * T
    block_r = min(block_r, triton.next_power_of_2(max(n_q, n_k, 1)))
    grid = (triton.cdiv(n_q, block_r) + triton.cdiv(n_k, block_r),)
    if n_q + n_k > 0:
        _rope_kernel[grid](q, k, qo, ko, cos, sin, H, k.shape[1], T, n_q, n_k, half,
                           *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3], cos.stride(0),
                           BACKWARD=backward, UPCAST=q.dtype != torch.float64, BLOCK_R=block_r, BLOCK_D=block_d,
                           num_warps=8)
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    """(q, k) -> (rotated q, rotated k); cos and sin get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq, dk, cos, sin, True)
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by the angles in cos, sin (T, D/2), as
    labkit.models.gpt.rope_cache builds them. Returns new tensors; q and k are not modified."""
    owner = "apply_rope"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float_tensor(owner, name, t)
    if q.dim() != 4:
        raise ValueError(f"{owner}: q must have shape (B, H, T, D), got {tuple(q.shape)}")
    B, _, T, D = q.shape
    if D % 2:
        raise ValueError(f"{owner}: q's head dimension D must be even (channel pairs i, i + D/2), got {D}")
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"{owner}: k must have shape (B, Hkv, T, D) = ({B}, Hkv, {T}, {D}) like q, "
                         f"got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"{owner}: k must have q's dtype {q.dtype}, got {k.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, D // 2):
            raise ValueError(f"{owner}: {name} must have shape (T, D/2) = ({T}, {D // 2}), got {tuple(t.shape)}")
        if t.stride(1) != 1 and D > 2:
            raise ValueError(f"{owner}: {name} must be contiguous in its last dimension, got strides {t.stride()}")
    if sin.stride() != cos.stride() or sin.dtype != cos.dtype:
        raise ValueError(f"{owner}: sin must have cos's layout and dtype (strides {cos.stride()}, {cos.dtype}), "
                         f"got {sin.stride()}, {sin.dtype}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{owner}: {name} must be on q's device {q.device}, got {t.device}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(3) != 1 and D > 1:
            raise ValueError(f"{owner}: {name} must be contiguous in its head dimension D, got strides "
                             f"{t.stride()}; call .contiguous()")
    return RoPEFunction.apply(q, k, cos, sin)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for up to `max_seq_len` positions, applied to (q, k) by the kernel."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0, *, device=None):
        super().__init__()
        head_dim = _checks.integer("RotaryEmbedding", "head_dim", head_dim, low=2)
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        max_seq_len = _checks.integer("RotaryEmbedding", "max_seq_len", max_seq_len, low=1)
        base = _checks.number("RotaryEmbedding", "base", base, low=1.0, low_open=True)
        cos, sin = rope_cache(max_seq_len, head_dim, base)  # (T, D/2) each, as TinyGPT builds them
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[-2]
        if T > self.cos.shape[0]:
            raise ValueError(f"RotaryEmbedding: sequence length {T} exceeds max_seq_len={self.cos.shape[0]}")
        return apply_rope(q, k, self.cos[:T], self.sin[:T])


def rope_bytes(n_q: int, n_k: int, seq_len: int, head_dim: int, element_bytes: int, table_bytes: int = 4) -> int:
    """Bytes the kernel moves at the least for q and k of n_q and n_k elements: each read and written
    once, plus the two (T, D/2) tables (read once per tensor)."""
    return 2 * (n_q + n_k) * element_bytes + 2 * 2 * seq_len * (head_dim // 2) * table_bytes


__all__ = ["RoPEFunction", "RotaryEmbedding", "apply_rope", "rope_bytes"]
