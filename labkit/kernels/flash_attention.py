"""FlashAttention: exact attention without writing the N x N scores to memory, forward and backward.

Attention O = softmax(Q K^T * scale) V over Q, K, V of shape (B, H, N, D). Written naively it
stores the scores S = Q K^T * scale and the probabilities P = softmax(S), (B, H, N, N) each, in
the GPU's main memory (HBM) and reads them back: at long N that traffic, not the arithmetic,
sets the run time (the memory wall of chapter 01), and the N^2 memory sets the longest N.

FlashAttention computes the same O tile by tile in on-chip memory (registers / shared memory):

1. **Tiling.** A program owns BLOCK_M query rows and walks over the keys BLOCK_N at a time.
2. **Online softmax.** It keeps, per row, the running max m, the running sum l of exp(s - m)
   and the unnormalized output acc = sum_j exp(s_j - m) v_j. A new block of scores s with
   maximum m' = max(m, max s) rescales what was there by alpha = exp(m - m'):

       l <- alpha * l + sum exp(s - m'),   acc <- alpha * acc + exp(s - m') V_block

   At the end O = acc / l, exactly softmax(S) V: no approximation, only a different order.
3. **Log-sum-exp.** The forward saves LSE = m + log(l) per row (N numbers, not N^2): the
   backward recomputes P = exp(S - LSE) block by block instead of storing it.
4. **Backward.** With dO given, dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ = dS K * scale,
   dK = dS^T Q * scale, where delta = rowsum(dP * P) = rowsum(dO * O) is computed first (a
   cheap preprocessing pass over O and dO). FLOPs go up (S is computed twice), bytes go down.
5. **Causal block skipping.** With a causal mask, a query block needs only the key blocks at
   or below its diagonal: about half the work.

This module has the algorithm twice:

- `tiled_attention_forward` / `tiled_attention_backward` (and `flash_attention_tiled`, their
  autograd function): plain PyTorch, one tile at a time, to read and to check in float64;
- `flash_attention` (and `flash_attention_forward` / `flash_attention_backward`): Triton kernels
  for fp16 / bf16 / fp32 and head dims 16, 32, 64, 128, any N (masked tails), causal or not.
  On a GPU they are autotuned over tile sizes, pipeline stages and warps; without one they run
  in Triton's interpreter (labkit switches it on before the kernels are defined).

References:
    T. Dao, D. Y. Fu, S. Ermon, A. Rudra, C. Re, "FlashAttention: Fast and Memory-Efficient
        Exact Attention with IO-Awareness", NeurIPS 2022 (arXiv:2205.14135).
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
        2023 (arXiv:2307.08691): the loop order, the delta preprocessing, the rescale-at-the-end.
    J. Shah et al., "FlashAttention-3: Fast and Accurate Attention with Asynchrony and
        Low-precision", 2024 (arXiv:2407.08608): Hopper's TMA and warp specialization.
    M. Milakov, N. Gimelshein, "Online normalizer calculation for softmax", 2018 (arXiv:1805.02867).
    M. N. Rabe, C. Staats, "Self-attention Does Not Need O(n^2) Memory", 2021 (arXiv:2112.05682).
    Triton's tutorial 06 "Fused Attention" (triton-lang.org), which this kernel follows in spirit.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

import triton  # labkit's __init__ has already switched Triton to its interpreter if there is no GPU
import triton.language as tl

from labkit import _checks
from labkit.kernels._common import (FLOAT_DTYPES, INTERPRET, acc_dtype, check_kernel_device, check_tensor,
                                    kernel_device, round_to)
from labkit.models.gpt import CausalSelfAttention
from labkit.perf import roofline

# --- constants ----------------------------------------------------------------------------

HEAD_DIMS = (16, 32, 64, 128)  # head dims the Triton kernels are built for
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # log2(e): the kernels use exp2, so scores are scaled by scale * log2(e)


# --- input checks -------------------------------------------------------------------------


def check_inputs(owner: str, q, k, v, causal, sm_scale, *, dtypes=FLOAT_DTYPES, head_dims=None) -> float:
    """Validate q, k, v (B, H, N, D) and the options; returns the softmax scale (default 1/sqrt(D))."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(owner, name, t, dtypes)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{owner}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"{owner}: q must have shape (B, H, N, D), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{owner}: {name} must have q's shape (B, H, N, D) = {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{owner}: {name} must be on q's device {q.device}, got {t.device}")
    if min(q.shape) < 1:
        raise ValueError(f"{owner}: q must have no empty dimension, got shape {tuple(q.shape)}")
    D = q.shape[-1]
    if head_dims is not None and D not in head_dims:
        raise ValueError(f"{owner}: q's head dim D = q.shape[-1] must be one of {head_dims}, got {D}")
    if not isinstance(causal, bool):
        raise TypeError(f"{owner}: causal must be a bool, got {type(causal).__name__} {causal!r}")
    if sm_scale is None:
        return 1.0 / math.sqrt(D)
    return _checks.number(owner, "sm_scale", sm_scale, low=0.0, low_open=True, high=math.inf, high_open=True)


# --- the definition -----------------------------------------------------------------------


def attention_reference(q, k, v, causal: bool = False, sm_scale: float | None = None, *,
                        return_lse: bool = False):
    """Naive attention in q's dtype: materializes S and P (B, H, N, N). Returns O (and LSE (B, H, N))."""
    scale = check_inputs("attention_reference", q, k, v, causal, sm_scale)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N)
    if causal:
        N = q.shape[-2]
        future = torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1)  # key j > query i
        s = s.masked_fill(future, float("-inf"))
    p = torch.softmax(s, dim=-1)  # (B, H, N, N)
    o = p @ v  # (B, H, N, D)
    if return_lse:
        return o, torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)
    return o


# --- online softmax: the state of one block of rows ------------------------------------------


def online_softmax_update(m, l, acc, s, v):
    """Fold one block of scores s (..., M, Nb) and values v (..., Nb, D) into the state (m, l, acc).

    m (..., M) running max, l (..., M) running sum of exp(s - m), acc (..., M, D) running
    sum of exp(s - m) v. Start from m = -inf, l = 0, acc = 0.
    """
    m_new = torch.maximum(m, s.amax(dim=-1))  # (..., M)
    alpha = torch.exp(m - m_new)  # (..., M) in (0, 1]: rescales what was summed against the old max
    p = torch.exp(s - m_new.unsqueeze(-1))  # (..., M, Nb)
    l_new = alpha * l + p.sum(dim=-1)  # (..., M)
    acc_new = alpha.unsqueeze(-1) * acc + p @ v  # (..., M, D)
    return m_new, l_new, acc_new


def merge_states(a, b):
    """Combine two states (m, l, acc) computed over disjoint sets of keys (split-K / flash-decoding)."""
    (m1, l1, acc1), (m2, l2, acc2) = a, b
    m = torch.maximum(m1, m2)
    w1, w2 = torch.exp(m1 - m), torch.exp(m2 - m)  # each state's rescale factor to the common max
    return m, w1 * l1 + w2 * l2, w1.unsqueeze(-1) * acc1 + w2.unsqueeze(-1) * acc2


def finalize(m, l, acc):
    """O = acc / l and LSE = m + log(l) from a state (m, l, acc)."""
    return acc / l.unsqueeze(-1), m + torch.log(l)


def key_blocks(query_block: int, block_m: int, block_n: int, seq_len: int, causal: bool) -> range:
    """Indices of the key blocks a query block reads: all of them, or with a causal mask only those
    holding a key j <= the block's last query row."""
    last_row = min((query_block + 1) * block_m, seq_len) - 1
    last_key = last_row if causal else seq_len - 1
    return range(last_key // block_n + 1)


# --- FlashAttention in plain PyTorch, tile by tile ----------------------------------------------


def _causal_block_mask(i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor:
    """(i1 - i0, j1 - j0) bool: True where key j is in query i's future (to be masked)."""
    rows = torch.arange(i0, i1, device=device).unsqueeze(1)
    cols = torch.arange(j0, j1, device=device).unsqueeze(0)
    return cols > rows


def tiled_attention_forward(q, k, v, causal: bool = False, sm_scale: float | None = None, *,
                            block_m: int = 16, block_n: int = 16):
    """FlashAttention's forward with torch ops, one (block_m x block_n) tile at a time.

    Returns O (q's dtype) and LSE (B, H, N) in float32 (float64 for float64 inputs). Nothing of
    size N x N exists at any time: the largest temporary is one tile of scores (B, H, block_m, block_n).
    """
    owner = "tiled_attention_forward"
    scale = check_inputs(owner, q, k, v, causal, sm_scale)
    block_m = _checks.integer(owner, "block_m", block_m, low=1)
    block_n = _checks.integer(owner, "block_n", block_n, low=1)
    B, H, N, D = q.shape
    acc_t = acc_dtype(q.dtype)
    o = torch.empty_like(q)  # (B, H, N, D)
    lse = torch.empty(B, H, N, dtype=acc_t, device=q.device)  # (B, H, N)
    for qb in range(math.ceil(N / block_m)):
        i0, i1 = qb * block_m, min((qb + 1) * block_m, N)
        qi = q[:, :, i0:i1].to(acc_t)  # (B, H, M, D), one query tile "in SRAM"
        m = torch.full((B, H, i1 - i0), float("-inf"), dtype=acc_t, device=q.device)  # (B, H, M)
        l = torch.zeros(B, H, i1 - i0, dtype=acc_t, device=q.device)  # (B, H, M)
        acc = torch.zeros(B, H, i1 - i0, D, dtype=acc_t, device=q.device)  # (B, H, M, D)
        for kb in key_blocks(qb, block_m, block_n, N, causal):
            j0, j1 = kb * block_n, min((kb + 1) * block_n, N)
            kj, vj = k[:, :, j0:j1].to(acc_t), v[:, :, j0:j1].to(acc_t)  # (B, H, Nb, D)
            s = (qi @ kj.transpose(-2, -1)) * scale  # (B, H, M, Nb): one tile of scores
            if causal:
                s = s.masked_fill(_causal_block_mask(i0, i1, j0, j1, q.device), float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, s, vj)
        oi, lse_i = finalize(m, l, acc)
        o[:, :, i0:i1] = oi.to(q.dtype)
        lse[:, :, i0:i1] = lse_i
    return o, lse


def tiled_attention_backward(q, k, v, o, lse, do, causal: bool = False, sm_scale: float | None = None, *,
                             block_m: int = 16, block_n: int = 16):
    """FlashAttention's backward with torch ops: recompute P from LSE tile by tile; returns dq, dk, dv."""
    owner = "tiled_attention_backward"
    scale = check_inputs(owner, q, k, v, causal, sm_scale)
    block_m = _checks.integer(owner, "block_m", block_m, low=1)
    block_n = _checks.integer(owner, "block_n", block_n, low=1)
    if do.shape != q.shape or o.shape != q.shape or lse.shape != q.shape[:-1]:
        raise ValueError(f"{owner}: o and do must have q's shape {tuple(q.shape)} and lse {tuple(q.shape[:-1])}, "
                         f"got {tuple(o.shape)}, {tuple(do.shape)}, {tuple(lse.shape)}")
    B, H, N, D = q.shape
    acc_t = acc_dtype(q.dtype)
    delta = (do.to(acc_t) * o.to(acc_t)).sum(dim=-1)  # (B, H, N): rowsum(dO * O), the preprocessing pass
    dq = torch.zeros(B, H, N, D, dtype=acc_t, device=q.device)
    dk, dv = torch.zeros_like(dq), torch.zeros_like(dq)
    for qb in range(math.ceil(N / block_m)):
        i0, i1 = qb * block_m, min((qb + 1) * block_m, N)
        qi, doi = q[:, :, i0:i1].to(acc_t), do[:, :, i0:i1].to(acc_t)  # (B, H, M, D)
        lse_i, delta_i = lse[:, :, i0:i1].to(acc_t).unsqueeze(-1), delta[:, :, i0:i1].unsqueeze(-1)  # (B, H, M, 1)
        for kb in key_blocks(qb, block_m, block_n, N, causal):
            j0, j1 = kb * block_n, min((kb + 1) * block_n, N)
            kj, vj = k[:, :, j0:j1].to(acc_t), v[:, :, j0:j1].to(acc_t)  # (B, H, Nb, D)
            s = (qi @ kj.transpose(-2, -1)) * scale  # (B, H, M, Nb), recomputed
            if causal:
                s = s.masked_fill(_causal_block_mask(i0, i1, j0, j1, q.device), float("-inf"))
            p = torch.exp(s - lse_i)  # (B, H, M, Nb): the forward's probabilities, exactly
            dv[:, :, j0:j1] += p.transpose(-2, -1) @ doi  # dV = P^T dO
            dp = doi @ vj.transpose(-2, -1)  # (B, H, M, Nb): dP = dO V^T
            ds = p * (dp - delta_i)  # (B, H, M, Nb): softmax backward, row sums via delta
            dq[:, :, i0:i1] += (ds @ kj) * scale  # dQ = dS K * scale
            dk[:, :, j0:j1] += (ds.transpose(-2, -1) @ qi) * scale  # dK = dS^T Q * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, block_m, block_n):
        o, lse = tiled_attention_forward(q, k, v, causal, sm_scale, block_m=block_m, block_n=block_n)
        ctx.save_for_backward(q, k, v, o, lse)  # O(N D) numbers: no P
        ctx.args = (causal, sm_scale, block_m, block_n)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        causal, sm_scale, block_m, block_n = ctx.args
        dq, dk, dv = tiled_attention_backward(q, k, v, o, lse, do, causal, sm_scale, block_m=block_m,
                                              block_n=block_n)
        return dq, dk, dv, None, None, None, None


def flash_attention_tiled(q, k, v, causal: bool = False, sm_scale: float | None = None, *,
                          block_m: int = 16, block_n: int = 16) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v by the tiled algorithm in PyTorch, with its own tiled backward."""
    return _TiledAttention.apply(q, k, v, causal, sm_scale, block_m, block_n)


# --- the Triton kernels ------------------------------------------------------------------------


TUNE = True  # on a GPU: autotune over the configs below; False: always the first (small, safe) one

# (BLOCK_M, BLOCK_N, num_stages, num_warps) for the GPU. The first entry of each list fits every dtype and
# head dim; the others trade registers and shared memory (bigger tiles, deeper software pipelines)
# for fewer loads. On an H100 the bf16, D=128 forward picks 128-row query tiles.
GPU_FWD_TILES = [(64, 32, 2, 4), (128, 64, 3, 4), (128, 64, 3, 8), (128, 64, 4, 8), (128, 128, 2, 8),
                 (128, 128, 3, 8), (128, 32, 4, 4), (64, 64, 3, 4), (64, 64, 4, 4)]
GPU_BWD_TILES = [(32, 32, 2, 4), (32, 64, 2, 4), (32, 128, 2, 4), (32, 128, 3, 8), (64, 64, 2, 4),
                 (64, 64, 3, 8), (64, 128, 2, 8), (128, 32, 3, 4), (128, 64, 2, 8)]
INTERPRETER_TILES = (64, 64, 1, 4)  # big tiles, few programs: the interpreter pays ~5-10 ms per program


def _configs(gpu_tiles):
    """triton.Configs: the GPU's list, or under the interpreter its one tile (@triton.autotune cannot
    choose among several configs there, and timing it would mean nothing)."""
    rows = [INTERPRETER_TILES] if INTERPRET else gpu_tiles
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in rows]


def _prune(configs, named_args, **kwargs):
    """Autotuning's early prune: every config when TUNE is on, else the first (read at call time)."""
    return configs if TUNE else configs[:1]


_TUNE = dict(key=["N", "HEAD_DIM", "CAUSAL"], prune_configs_by={"early_config_prune": _prune})


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, lo, hi, N, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """Key blocks [lo, hi) for one query tile: the online-softmax loop. MASK: the block may hold keys
    past N or (causal) in the future of some query rows."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        if MASK:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[:, None] < N, other=0.0)  # (BLOCK_N, D)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            keep = cols[None, :] < N
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        alpha = tl.exp2(m_i - m_new)  # rescales the old sum and output
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < N, other=0.0)  # (BLOCK_N, D)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn)
        p_in = round_to(p, v.dtype)  # P in the input precision, as the tensor cores read it
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p_in, v, acc * alpha[:, None], input_precision=PRECISION)  # (BLOCK_M, D)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(GPU_FWD_TILES), **_TUNE)
@triton.jit(do_not_specialize=["N"])
def _fwd_kernel(Q, K, V, O, LSE, qk_scale,
                stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, H, N,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). O and LSE are contiguous (B, H, N, D), (B, H, N)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key columns within a block
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)  # (BLOCK_M, D): stays on chip throughout
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:  # full blocks strictly below the diagonal, then the diagonal band (masked)
        lo = (start_m * BLOCK_M) // BLOCK_N * BLOCK_N
        hi = tl.minimum((start_m + 1) * BLOCK_M, N)
    else:  # full blocks, then the tail past the last multiple of BLOCK_N (masked)
        lo = N // BLOCK_N * BLOCK_N
        hi = N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, 0, lo, N,
                               qk_scale, BLOCK_N, False, CAUSAL, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, lo, hi, N,
                               qk_scale, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)
    o = acc / l_i[:, None]  # the one normalization, at the end (FlashAttention-2)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log LSE of the scaled scores
    row = bh * N + offs_m  # (BLOCK_M,) row index into the contiguous (B*H*N) layout
    tl.store(LSE + row, lse, mask=offs_m < N)
    tl.store(O + row[:, None] * HEAD_DIM + offs_d[None, :], round_to(o, O.dtype.element_ty),
             mask=offs_m[:, None] < N)


@triton.jit(do_not_specialize=["N"])
def _bwd_delta_kernel(O, DO, DELTA, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) for BLOCK_M rows of one (batch, head); O and dO contiguous."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = bh * N + offs_m
    ptrs = row[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=offs_m[:, None] < N, other=0.0).to(tl.float32)
    tl.store(DELTA + row, tl.sum(o * do, 1), mask=offs_m < N)


@triton.autotune(configs=_configs(GPU_BWD_TILES), **_TUNE)
@triton.jit(do_not_specialize=["N"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale,
                     stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd, H, N,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dK, dV for BLOCK_N keys of one (batch, head), looping over the query blocks that see them.
    dO, LSE, delta, dK, dV are contiguous."""
    start_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) this program's keys
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < N
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=key_ok, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=key_ok, other=0.0)
    in_dtype = k.dtype
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
    lo = 0
    if CAUSAL:  # query blocks that end before this key block cannot see it
        lo = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for start_m in range(lo, N, BLOCK_M):
        rows = start_m + offs_m  # (BLOCK_M,)
        row_ok = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        do = tl.load(DO + (bh * N + rows)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0) * 1.4426950408889634  # log2 units
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T
        p_t = tl.exp2(s_t - lse[None, :])  # P^T, recomputed from the saved LSE
        keep = row_ok[None, :]
        if CAUSAL:
            keep = keep & (rows[None, :] >= offs_n[:, None])
        p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(round_to(p_t, in_dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T
        dk = tl.dot(round_to(ds_t, in_dtype), q, dk, input_precision=PRECISION)  # dK += dS^T Q
    out = (bh * N + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, round_to(dk * sm_scale, in_dtype), mask=key_ok)
    tl.store(DV + out, round_to(dv, in_dtype), mask=key_ok)


@triton.autotune(configs=_configs(GPU_BWD_TILES), **_TUNE)
@triton.jit(do_not_specialize=["N"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale,
                   stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, H, N,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dQ for BLOCK_M query rows of one (batch, head), looping over the key blocks they see."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    do = tl.load(DO + (bh * N + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    in_dtype = q.dtype
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
    hi = N
    if CAUSAL:  # keys past this block's last row are in every row's future
        hi = tl.minimum((start_m + 1) * BLOCK_M, N)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=col_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= cols[None, :])
        p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(round_to(ds, in_dtype), k, dq, input_precision=PRECISION)  # dQ += dS K
    tl.store(DQ + (bh * N + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], round_to(dq * sm_scale, in_dtype),
             mask=row_ok[:, None])


# --- launching them ----------------------------------------------------------------------------


def _check_kernel_inputs(owner, q, k, v, causal, sm_scale) -> float:
    scale = check_inputs(owner, q, k, v, causal, sm_scale, dtypes=KERNEL_DTYPES, head_dims=HEAD_DIMS)
    check_kernel_device(owner, "q", q)  # k and v are on q's device
    return scale


def _kernel_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION): the interpreter cannot tl.dot bf16 (loads go to float32, `round_to` keeps
    bf16-rounded values in float32 there), and fp32 must not round to TF32."""
    return INTERPRET and dtype == torch.bfloat16, "ieee" if dtype == torch.float32 else "tf32"


def _strides(*tensors) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def flash_attention_forward(q, k, v, causal: bool = False, sm_scale: float | None = None):
    """The Triton forward: returns O (q's dtype, contiguous) and LSE (B, H, N) float32."""
    scale = _check_kernel_inputs("flash_attention_forward", q, k, v, causal, sm_scale)
    B, H, N, D = q.shape
    o = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    upcast, precision = _kernel_flags(q.dtype)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _fwd_kernel[grid](q, k, v, o, lse, scale * LOG2E, *_strides(q, k, v), H, N,
                      HEAD_DIM=D, CAUSAL=causal, UPCAST=upcast, PRECISION=precision)
    return o, lse


def flash_attention_backward(q, k, v, o, lse, do, causal: bool = False, sm_scale: float | None = None):
    """The Triton backward: delta = rowsum(dO * O), then dK, dV (one program per key block) and dQ
    (one per query block), both recomputing P from LSE. Returns dq, dk, dv (contiguous)."""
    owner = "flash_attention_backward"
    scale = _check_kernel_inputs(owner, q, k, v, causal, sm_scale)
    B, H, N, D = q.shape
    if do.shape != q.shape or o.shape != q.shape or lse.shape != (B, H, N):
        raise ValueError(f"{owner}: o and do must have q's shape {tuple(q.shape)} and lse {(B, H, N)}, "
                         f"got {tuple(o.shape)}, {tuple(do.shape)}, {tuple(lse.shape)}")
    o, do, lse = o.contiguous(), do.contiguous().to(q.dtype), lse.contiguous()
    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    block = 64
    _bwd_delta_kernel[(triton.cdiv(N, block), B * H)](o, do, delta, N, HEAD_DIM=D, BLOCK_M=block)
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    upcast, precision = _kernel_flags(q.dtype)
    args = (scale, scale * LOG2E, *_strides(q, k, v), H, N)
    flags = dict(HEAD_DIM=D, CAUSAL=causal, UPCAST=upcast, PRECISION=precision)
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *args, **flags)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *args, **flags)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        o, lse = flash_attention_forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)  # Q, K, V, O and N log-sum-exps per head: no N x N
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, o, lse, do, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal: bool = False, sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale [+ causal mask]) v with the Triton kernels; differentiable.

    q, k, v: (B, H, N, D), float16 / bfloat16 / float32, D in (16, 32, 64, 128), any N and strides;
    sm_scale defaults to 1/sqrt(D). Returns O (B, H, N, D) in q's dtype.
    """
    _check_kernel_inputs("flash_attention", q, k, v, causal, sm_scale)
    return _FlashAttention.apply(q, k, v, causal, sm_scale)


# --- checking it ---------------------------------------------------------------------------------


def _output_and_grads(attn, q, k, v, do) -> list[torch.Tensor]:
    """attn(q, k, v) and the gradients of sum(out * do) with respect to q, k, v (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, do)]


def accuracy_report(q, k, v, do, causal: bool = False, sm_scale: float | None = None) -> dict:
    """FlashAttention's accuracy rule (the test of Dao et al.'s kernels) for `flash_attention` at these inputs.

    For O, dQ, dK, dV: the kernel's max error against float64 attention must be at most twice the error of
    the same attention computed by PyTorch in the input dtype (`attention_reference`, which materializes
    S and P), plus a rounding floor eps * sqrt(D) * max(1, |exact|): rounding the exact result into the
    dtype costs eps/2 of its scale, and dS = P (dP - delta) subtracts two length-D dot products whose
    rounding, ~eps sqrt(D), is all that is left where an exact gradient is 0 (dQ and dK when N = 1).
    Returns {name: (kernel error, PyTorch error, bound)}.
    """
    def ours(a, b, c):
        return flash_attention(a, b, c, causal, sm_scale)

    def naive(a, b, c):
        return attention_reference(a, b, c, causal, sm_scale)

    mine = _output_and_grads(ours, q, k, v, do)
    exact = _output_and_grads(naive, *(t.detach().cpu().double() for t in (q, k, v, do)))
    theirs = _output_and_grads(naive, q, k, v, do)
    eps, root_d = torch.finfo(q.dtype).eps, math.sqrt(q.shape[-1])
    report = {}
    for name, m, e, t in zip(("out", "dq", "dk", "dv"), mine, exact, theirs):
        err = (m.cpu().double() - e).abs().max().item()
        err_pt = (t.cpu().double() - e).abs().max().item()
        report[name] = (err, err_pt, 2 * err_pt + eps * root_d * max(1.0, e.abs().max().item()))
    return report


# --- what it costs -------------------------------------------------------------------------------


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, *, causal: bool = False,
                    backward: bool = False) -> float:
    """Matmul FLOPs of attention, the convention benchmarks report TFLOP/s in: forward 4 B H N^2 D
    (Q K^T and P V), halved by a causal mask; the backward does 2.5x the forward (five matmuls,
    one of them the recomputed Q K^T)."""
    for name, value in (("batch", batch), ("heads", heads), ("seq_len", seq_len), ("head_dim", head_dim)):
        _checks.integer("attention_flops", name, value, low=1)
    fwd = 4 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
    return fwd * 2.5 if backward else fwd


def flash_forward_hbm_bytes(batch: int, heads: int, seq_len: int, head_dim: int, *, block_m: int = 128,
                            dtype=torch.bfloat16) -> float:
    """HBM bytes of the FlashAttention forward if nothing is reused across programs (no L2 hits):
    Q read and O written once, K and V read once per query block, LSE (float32) written once."""
    owner = "flash_forward_hbm_bytes"
    for name, value in (("batch", batch), ("heads", heads), ("seq_len", seq_len), ("head_dim", head_dim),
                        ("block_m", block_m)):
        _checks.integer(owner, name, value, low=1)
    s = roofline.bytes_per_element(dtype, where=owner)
    bh, N, D = batch * heads, seq_len, head_dim
    query_blocks = math.ceil(N / block_m)
    return bh * (2 * N * D * s + query_blocks * 2 * N * D * s + 4 * N)


def naive_hbm_bytes(batch: int, heads: int, seq_len: int, head_dim: int, *, dtype=torch.bfloat16) -> float:
    """HBM bytes of unfused attention: Q, K, V read and O written, plus S and P each written and read."""
    return roofline.attention(batch, heads, seq_len, head_dim, fused=False, dtype=dtype).bytes


# --- using it in a model --------------------------------------------------------------------------


class FlashCausalSelfAttention(CausalSelfAttention):
    """labkit.models' CausalSelfAttention with `flash_attention` in place of scaled_dot_product_attention."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            raise ValueError("FlashCausalSelfAttention: attention dropout is not implemented; set dropout=0")
        return flash_attention(q, k, v, causal=True)  # (B, H, T, D); strided q/k/v are read as they are


def use_flash_attention(model: nn.Module) -> nn.Module:
    """Switch every CausalSelfAttention in `model` to flash_attention, in place (weights unchanged)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"use_flash_attention: model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if type(module) is CausalSelfAttention:
            module.__class__ = FlashCausalSelfAttention
    return model


__all__ = [
    "GPU_BWD_TILES", "GPU_FWD_TILES", "HEAD_DIMS", "KERNEL_DTYPES", "TUNE", "FlashCausalSelfAttention",
    "accuracy_report", "attention_flops", "attention_reference", "check_inputs", "finalize", "flash_attention",
    "flash_attention_backward", "flash_attention_forward", "flash_attention_tiled", "flash_forward_hbm_bytes",
    "kernel_device", "key_blocks", "merge_states", "naive_hbm_bytes", "online_softmax_update",
    "tiled_attention_backward", "tiled_attention_forward", "use_flash_attention",
]
