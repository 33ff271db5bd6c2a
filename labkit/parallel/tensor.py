"""Tensor parallelism (Megatron-LM): column- and row-parallel linears, one all-reduce per block,
the all-reduce overlapped with independent work, and a decode step captured in a CUDA graph.

M. Shoeybi, M. Patwary, R. Puri, P. LeGresley, J. Casper, B. Catanzaro. "Megatron-LM: Training
Multi-Billion Parameter Language Models Using Model Parallelism", arXiv:1909.08053, 2019 (the
column/row split and the f/g operators). D. Narayanan et al. "Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM", SC 2021. R. Pope et al. "Efficiently Scaling
Transformer Inference", MLSys 2023 (communication vs compute at decode). S. Wang et al.
"Overlap Communication with Dependent Computation via Decomposition in Large Deep Learning
Models", ASPLOS 2023. P. Patarasuk, X. Yuan. "Bandwidth optimal all-reduce algorithms for
clusters of workstations", JPDC 2009 (the ring all-reduce and its cost).

Notation: p = tensor-parallel degree (the group's size), r = this rank, nn.Linear stores its
weight as (out, in) and computes y = x W^T + b.

Column-parallel linear: split the OUTPUT features. W = [W_0; W_1; ...; W_{p-1}] stacked on dim 0
(rows of the PyTorch weight, i.e. columns of the maths' A = W^T), bias split the same way. Rank
r computes y_r = x W_r^T + b_r, which is the slice r of y's last dimension: the full y is the
concatenation (an all-gather), never a sum.

Row-parallel linear: split the INPUT features. W = [W_0, W_1, ..., W_{p-1}] along dim 1. Rank r
holds x_r (slice r of x's last dimension) and computes the partial product z_r = x_r W_r^T of
the full output's shape; y = sum_r z_r + b is an all-reduce, with the bias added once.

Column, then an elementwise activation, then row: the activation acts on each slice alone, and
the slice y_r that the column-parallel layer leaves on rank r is exactly the input slice the
row-parallel layer needs there. So an MLP  down(act(up x))  costs ONE all-reduce in forward, at
its end, and attention (heads split across ranks: q, k, v column-parallel by whole heads, the
output projection row-parallel) costs one more. Megatron writes the two places as operators:

    f  (entering the parallel region):  forward identity,    backward all-reduce
    g  (leaving it):                    forward all-reduce,  backward identity

f's backward sums the input gradients of the p partial branches; g's backward is the identity
because every rank holds the same (replicated) output and loss. Per transformer layer: 2
all-reduces in forward, 2 in backward, each of tokens x hidden elements.

(The source lecture says a column split is followed by an all-reduce: it is an all-gather.
Only the row split sums, and the point of pairing them is that no gather is needed at all.)

Cost. A ring all-reduce of n bytes over p ranks moves 2 (p-1)/p n bytes through every rank's
link in 2 (p-1) steps: t = 2 (p-1) alpha + 2 (p-1)/p n / beta (latency alpha per step, link
bandwidth beta). In decode the message is batch x hidden x 2 bytes (kilobytes), so alpha and
the launch overheads dominate while the matmuls, which read every weight once per step, also
take microseconds: communication is a large share of a decode step. Two remedies live here:

- overlap: split the batch into chunks and issue each chunk's all-reduce asynchronously
  (async_op=True) while the next chunk computes (`overlapped_forward`); it pays when both sides
  are large, and at decode sizes each chunk still reads all the weights and pays alpha again;
- CUDA graphs: capture the whole decode step, NCCL all-reduces included, once, and replay it
  with one launch (`DecodeGraph`, GPU only). This removes the CPU's per-kernel launch time,
  which at batch 1 exceeds most kernels' GPU time; it does not make the all-reduce's own
  latency on the link disappear.

The process group: the all-reduces here are issued whenever torch.distributed is initialized
(a group of one included, so a one-GPU decode graph still holds a real NCCL call); with no
process group every operator is the identity, and `comm_log` still records what would be sent.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from labkit import _checks
from labkit.perf import roofline as rl

# --------------------------------------------------------------------------- the process group


def group_rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when no process group exists."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


_COMM_LOG: list | None = None


@contextmanager
def comm_log():
    """Record every collective the operators of this module issue inside the block.

    Yields a list that fills with (op, bytes) pairs, e.g. ("all_reduce", 4096).
    """
    global _COMM_LOG
    outer, _COMM_LOG = _COMM_LOG, []
    try:
        yield _COMM_LOG
    finally:
        _COMM_LOG = outer


def _log(op: str, t: torch.Tensor) -> None:
    if _COMM_LOG is not None:
        _COMM_LOG.append((op, t.numel() * t.element_size()))


def all_reduce(t: torch.Tensor, group=None, *, async_op: bool = False):
    """Sum `t` in place over the group (logged); returns the Work handle when async_op."""
    _log("all_reduce", t)
    if dist.is_available() and dist.is_initialized():
        return dist.all_reduce(t, group=group, async_op=async_op)
    return None


def _all_gather_last(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's t along the last dimension (logged)."""
    _log("all_gather", t)
    _, world = group_rank_world(group)
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _my_slice_last(t: torch.Tensor, group) -> torch.Tensor:
    """This rank's equal slice of t's last dimension."""
    rank, world = group_rank_world(group)
    lo, hi = shard_bounds(t.shape[-1], rank, world, owner="scatter_to_parallel", name="the last dimension")
    return t[..., lo:hi].contiguous()


# --------------------------------------------------------------------------- f and g (and gather)


class _CopyToParallel(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        all_reduce(out, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromParallel(torch.autograd.Function):
    """All-gather along the last dimension forward; keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _my_slice_last(grad, ctx.group), None


class _ScatterToParallel(torch.autograd.Function):
    """Keep this rank's slice of the last dimension forward; all-gather the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _my_slice_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad.contiguous(), ctx.group), None


def copy_to_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron's f: enter the parallel region (identity; the backward all-reduces the gradient)."""
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron's g: leave the parallel region by summing the partial results (backward: identity)."""
    return _ReduceFromParallel.apply(x, group)


def gather_from_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate the ranks' slices of the last dimension (backward: keep this rank's slice)."""
    return _GatherFromParallel.apply(x, group)


def scatter_to_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """Keep this rank's slice of the last dimension (backward: all-gather the gradient)."""
    return _ScatterToParallel.apply(x, group)


# --------------------------------------------------------------------------- shard maths


def shard_bounds(size: int, rank: int, world_size: int, *, owner: str = "shard_bounds",
                 name: str = "size") -> tuple[int, int]:
    """[start, stop) of rank's equal share of `size` items; size must divide evenly."""
    size = _checks.integer(owner, name, size, low=1)
    world_size = _checks.integer(owner, "world_size", world_size, low=1)
    rank = _checks.integer(owner, "rank", rank, low=0)
    if rank >= world_size:
        raise ValueError(f"{owner}: rank must be in [0, world_size={world_size}), got {rank}")
    if size % world_size:
        raise ValueError(f"{owner}: {name} ({size}) must be divisible by world_size ({world_size})")
    n = size // world_size
    return rank * n, (rank + 1) * n


def _matrix(owner: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
        raise ValueError(f"{owner}: {name} must be a 1-D or 2-D tensor, got "
                         f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    return t


def column_shard(weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's shard of a column-parallel nn.Linear weight (out, in) -> (out/p, in), or bias (out,) -> (out/p,).

    "Column" is the maths' A = W^T: its columns are the rows of PyTorch's weight.
    """
    weight = _matrix("column_shard", "weight", weight)
    lo, hi = shard_bounds(weight.shape[0], rank, world_size, owner="column_shard", name="out_features")
    return weight[lo:hi]


def row_shard(weight: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank's shard of a row-parallel nn.Linear weight (out, in) -> (out, in/p). Its bias is not split."""
    weight = _matrix("row_shard", "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"row_shard: weight must be 2-D (out, in), got shape {tuple(weight.shape)}; "
                         "a row-parallel layer's bias is replicated, not split")
    lo, hi = shard_bounds(weight.shape[1], rank, world_size, owner="row_shard", name="in_features")
    return weight[:, lo:hi]


# --------------------------------------------------------------------------- the layers


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().clone())


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r with W_r = column_shard(W): this rank's slice of the output features.

    forward(x) enters the parallel region (f) first; `local(x)` is the bare matmul for callers
    that already did (several projections of one input share one f). gather_output=True
    concatenates the slices (an all-gather) so every rank gets the full y.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, gather_output: bool = False,
                 group=None, device=None, dtype=None):
        super().__init__()
        owner = "ColumnParallelLinear"
        self.in_features = _checks.integer(owner, "in_features", in_features, low=1)
        self.out_features = _checks.integer(owner, "out_features", out_features, low=1)
        self.gather_output, self.group = bool(gather_output), group
        rank, world = group_rank_world(group)
        shard_bounds(out_features, rank, world, owner=owner, name="out_features")
        full = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)  # nn.Linear's init
        self.weight = _param(column_shard(full.weight, rank, world))  # (out/p, in)
        self.bias = _param(None if full.bias is None else column_shard(full.bias, rank, world))  # (out/p,)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, gather_output: bool = False, group=None) -> "ColumnParallelLinear":
        """This rank's shard of an existing (full, replicated) nn.Linear."""
        if not isinstance(linear, nn.Linear):
            raise TypeError("ColumnParallelLinear.from_linear: linear must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output=gather_output,
                    group=group, device=linear.weight.device, dtype=linear.weight.dtype)
        rank, world = group_rank_world(group)
        with torch.no_grad():  # replace the fresh init by the shard of the given weights
            layer.weight.copy_(column_shard(linear.weight, rank, world))
            if linear.bias is not None:
                layer.bias.copy_(column_shard(linear.bias, rank, world))
        return layer

    def local(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out/p)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(copy_to_parallel(x, self.group))  # (..., out/p)
        return gather_from_parallel(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b with W_r = row_shard(W): partial products summed by one all-reduce (g).

    input_is_parallel=True (the default, after a column-parallel layer): x is already this
    rank's slice (..., in/p). Otherwise x is the full (..., in) and is sliced first.
    `partial(x)` is the pre-all-reduce partial sum, `finish(y)` adds the (replicated) bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, input_is_parallel: bool = True,
                 group=None, device=None, dtype=None):
        super().__init__()
        owner = "RowParallelLinear"
        self.in_features = _checks.integer(owner, "in_features", in_features, low=1)
        self.out_features = _checks.integer(owner, "out_features", out_features, low=1)
        self.input_is_parallel, self.group = bool(input_is_parallel), group
        rank, world = group_rank_world(group)
        shard_bounds(in_features, rank, world, owner=owner, name="in_features")
        full = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = _param(row_shard(full.weight, rank, world))  # (out, in/p)
        self.bias = _param(full.bias)  # (out,), replicated: added once, after the sum

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, input_is_parallel: bool = True, group=None) -> "RowParallelLinear":
        """This rank's shard of an existing (full, replicated) nn.Linear."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"RowParallelLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    input_is_parallel=input_is_parallel, group=group, device=linear.weight.device,
                    dtype=linear.weight.dtype)
        rank, world = group_rank_world(group)
        with torch.no_grad():  # replace the fresh init by the shard of the given weights
            layer.weight.copy_(row_shard(linear.weight, rank, world))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def partial(self, x: torch.Tensor) -> torch.Tensor:  # (..., in/p) -> (..., out), a partial sum
        if not self.input_is_parallel:
            x = scatter_to_parallel(x, self.group)
        return F.linear(x, self.weight)

    def finish(self, y: torch.Tensor) -> torch.Tensor:  # the summed (..., out) -> + bias
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(reduce_from_parallel(self.partial(x), self.group))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")


# --------------------------------------------------------------------------- Megatron blocks


def _no_dropout(owner: str, p: float) -> None:
    if p:
        raise ValueError(f"{owner}: dropout must be 0 for tensor parallelism here (a dropout mask on the "
                         f"replicated stream would differ across ranks), got {p}")


class TensorParallelMLP(nn.Module):
    """A TinyGPT MLP split Megatron-style: up (and gate) column-parallel, down row-parallel.

    forward: f -> up_r (gate_r) -> activation -> partial down -> g -> + bias: one all-reduce.
    """

    def __init__(self, mlp: nn.Module, group=None):
        super().__init__()
        from labkit.models.gpt import MLP

        if not isinstance(mlp, MLP):
            raise TypeError(f"TensorParallelMLP: mlp must be a labkit.models.gpt.MLP, got {type(mlp).__name__}")
        _no_dropout("TensorParallelMLP", mlp.drop.p)
        rank, world = group_rank_world(group)
        shard_bounds(mlp.up.out_features, rank, world, owner="TensorParallelMLP", name="the hidden width")
        self.group, self.kind = group, mlp.kind
        self.up = ColumnParallelLinear.from_linear(mlp.up, group=group)
        self.gate = ColumnParallelLinear.from_linear(mlp.gate, group=group) if mlp.kind == "swiglu" else None
        self.down = RowParallelLinear.from_linear(mlp.down, group=group)

    def local(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) replicated -> (B, T, C) partial sum
        x = copy_to_parallel(x, self.group)  # f: one per block, however many projections read x
        if self.kind == "swiglu":
            h = F.silu(self.gate.local(x)) * self.up.local(x)  # (B, T, hidden/p)
        else:
            h = F.gelu(self.up.local(x))  # (B, T, hidden/p)
        return self.down.partial(h)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return self.down.finish(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(reduce_from_parallel(self.local(x), self.group))  # g


class TensorParallelAttention(nn.Module):
    """TinyGPT causal attention with its heads split over the ranks: rank r runs n_head/p query heads
    and n_kv_head/p key/value heads (q, k, v column-parallel by whole heads), then the output
    projection row-parallel. One all-reduce in forward."""

    def __init__(self, attn: nn.Module, group=None):
        super().__init__()
        from labkit.models.gpt import CausalSelfAttention

        owner = "TensorParallelAttention"
        if not isinstance(attn, CausalSelfAttention):
            raise TypeError(f"{owner}: attn must be a labkit.models.gpt.CausalSelfAttention, got {type(attn).__name__}")
        _no_dropout(owner, attn.dropout)
        _no_dropout(owner, attn.resid_drop.p)
        rank, world = group_rank_world(group)
        shard_bounds(attn.n_head, rank, world, owner=owner, name="n_head")  # whole heads per rank
        shard_bounds(attn.n_kv_head, rank, world, owner=owner, name="n_kv_head")
        self.group = group
        self.local_heads, self.local_kv_heads = attn.n_head // world, attn.n_kv_head // world
        self.head_dim = attn.head_dim
        self.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, group=group)  # heads [r H/p, (r+1) H/p)
        self.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, group=group)
        self.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, group=group)
        self.o_proj = RowParallelLinear.from_linear(attn.o_proj, group=group)
        self.rope = attn.rope
        if attn.rope:
            self.register_buffer("cos", attn.cos.clone(), persistent=False)
            self.register_buffer("sin", attn.sin.clone(), persistent=False)

    def local(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) replicated -> (B, T, C) partial sum
        from labkit.models.gpt import apply_rope

        B, T, _ = x.shape
        H, Hkv, D = self.local_heads, self.local_kv_heads, self.head_dim
        x = copy_to_parallel(x, self.group)
        q = self.q_proj.local(x).view(B, T, H, D).transpose(1, 2)  # (B, H/p, T, D)
        k = self.k_proj.local(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv/p, T, D)
        v = self.v_proj.local(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv/p, T, D)
        if self.rope:
            q = apply_rope(q, self.cos[:T], self.sin[:T])
            k = apply_rope(k, self.cos[:T], self.sin[:T])
        if Hkv != H:  # GQA: the query groups of a kv head live on the same rank as it
            k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H/p, T, D)
            v = v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H/p, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C/p): this rank's slice of the heads
        return self.o_proj.partial(y)  # (B, T, C) partial sum

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        return self.o_proj.finish(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(reduce_from_parallel(self.local(x), self.group))


class TensorParallelBlock(nn.Module):
    """A TinyGPT pre-norm Block with tensor-parallel attention and MLP; the norms are replicated.

    Two all-reduces per block in forward (attention, MLP), two in backward (the two f's).
    """

    def __init__(self, block: nn.Module, group=None):
        super().__init__()
        from labkit.models.gpt import Block

        if not isinstance(block, Block):
            raise TypeError(f"TensorParallelBlock: block must be a labkit.models.gpt.Block, got {type(block).__name__}")
        self.norm1, self.norm2 = copy.deepcopy(block.norm1), copy.deepcopy(block.norm2)
        self.attn = TensorParallelAttention(block.attn, group)
        self.mlp = TensorParallelMLP(block.mlp, group)

    def stages(self) -> list[tuple[Callable, Callable]]:
        """[(local, finish), ...]: residual stream h -> partial sum, and (h, summed) -> next h."""
        return [(lambda h: self.attn.local(self.norm1(h)), lambda h, s: h + self.attn.finish(s)),
                (lambda h: self.mlp.local(self.norm2(h)), lambda h, s: h + self.mlp.finish(s))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C), replicated
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def parallelize_tinygpt(model: nn.Module, group=None) -> nn.Module:
    """A copy of a TinyGPT whose blocks are tensor-parallel on `group` (embeddings, final norm and
    head replicated). Every rank must call it on the same weights."""
    from labkit.models.gpt import TinyGPT

    if not isinstance(model, TinyGPT):
        raise TypeError(f"parallelize_tinygpt: model must be a TinyGPT, got {type(model).__name__}")
    _no_dropout("parallelize_tinygpt", model.config.dropout)
    tp = copy.deepcopy(model)
    tp.blocks = nn.ModuleList(TensorParallelBlock(b, group) for b in model.blocks)
    return tp


# --------------------------------------------------------------------------- overlapping the all-reduce


@dataclass
class Span:
    """One bar of a timeline: what ran on which lane from start to end (seconds)."""

    lane: str
    start: float
    end: float
    label: str = ""
    kind: str = ""


@torch.no_grad()
def overlapped_forward(stages: Sequence[tuple[Callable, Callable]], x: torch.Tensor, chunks: int = 2, *,
                       overlap: bool = True, group=None, trace: list | None = None) -> torch.Tensor:
    """Run a sequence of tensor-parallel stages on x (B, ...) split into `chunks` along the batch.

    Each stage is (local, finish) as TensorParallelBlock.stages() gives them. The stages run
    stage by stage, chunk by chunk; a chunk's partial sum is all-reduced with async_op=True and
    only waited for when that chunk enters the next stage, so the all-reduce of chunk c flies
    while chunk c+1 (or the next stage's chunk 0) computes. overlap=False waits at once (the
    same work and messages, no overlap). Inference only (no autograd through async collectives).
    `trace`, if a list, receives host-side Spans ("compute" and "all-reduce in flight").
    """
    chunks = _checks.integer("overlapped_forward", "chunks", chunks, low=1)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < chunks:
        raise ValueError(f"overlapped_forward: x must have a batch dimension of at least chunks={chunks}, "
                         f"got shape {tuple(getattr(x, 'shape', ()))}")
    rank, _ = group_rank_world(group)
    sync = x.is_cuda
    t0 = time.perf_counter()

    def now() -> float:
        if sync and trace is not None:
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - t0

    hs = list(x.tensor_split(chunks, dim=0))  # `chunks` pieces of about B/chunks rows
    pending: list = [None] * len(hs)  # (work, partial, finish, issued_at, label) per chunk

    def complete(c: int) -> None:
        work, part, finish, issued, label = pending[c]
        if work is not None:
            work.wait()
        if trace is not None:
            trace.append(Span(f"rank {rank} all-reduce", issued, now(), label, "all-reduce in flight"))
        hs[c] = finish(hs[c], part)
        pending[c] = None

    for s, (local, finish) in enumerate(stages):
        for c in range(len(hs)):
            if pending[c] is not None:
                complete(c)
            start = now()
            part = local(hs[c]).contiguous()  # (B/k, ..., C) partial sum
            label = f"s{s} c{c}"
            if trace is not None:
                trace.append(Span(f"rank {rank} compute", start, now(), label, "compute"))
            work = all_reduce(part, group, async_op=True)
            pending[c] = (work, part, finish, now(), label)
            if not overlap:
                complete(c)
    for c in range(len(hs)):
        if pending[c] is not None:
            complete(c)
    return torch.cat(hs, dim=0)


# --------------------------------------------------------------------------- CUDA graphs (GPU only)


def cuda_graphs_available() -> bool:
    """Whether CUDA graphs can be captured here (a CUDA device, not forced off by LABKIT_DEVICE)."""
    from labkit import runtime

    return runtime.on_gpu() and torch.cuda.is_available()


_NO_KERNEL = frozenset({"view", "view_as", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                        "chunk", "split", "narrow", "contiguous", "numel", "element_size", "size", "dim", "__get__",
                        "__getitem__", "is_floating_point", "type_as", "to", "_set_grad_enabled"})


class _CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.counts[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> Counter:
    """The operations fn() runs that do arithmetic or copies, plus the collectives it issues.

    Views and metadata queries are left out (a `to` or `contiguous` that copies is missed). On
    a GPU each counted op is at least one kernel launch: an estimate of what eager mode pays
    the CPU's launch overhead for, and what a CUDA graph replays from one launch.
    """
    with torch.no_grad(), _CountCalls() as mode, comm_log() as log:
        fn()
    counts = Counter({k: v for k, v in mode.counts.items() if k not in _NO_KERNEL})
    counts.update(op for op, _ in log)
    return counts


class DecodeGraph:
    """A decode step `step(x) -> y` captured once in a CUDA graph and replayed with one launch.

    The step's collectives (NCCL all-reduces) are captured with it: after warm-up runs on a side
    stream (which also create the NCCL communicator; that cannot happen inside a capture), the
    graph records every kernel with its arguments, and `replay` re-issues them all from one
    CPU call. Inputs are copied into the captured (static) input; the output is the captured
    (static) buffer, overwritten by the next call: clone it to keep it. GPU only.
    """

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, *, warmup: int = 3):
        if not callable(step):
            raise TypeError(f"DecodeGraph: step must be callable, got {type(step).__name__}")
        if not (isinstance(example, torch.Tensor) and example.is_cuda and torch.cuda.is_available()):
            raise RuntimeError("DecodeGraph: CUDA graphs need a CUDA device and a CUDA example tensor, got "
                               f"{getattr(example, 'device', type(example).__name__)}; on a CPU there is nothing "
                               "to capture (the chapter shows the recorded GPU measurement instead)")
        warmup = _checks.integer("DecodeGraph", "warmup", warmup, low=1)
        self.static_input = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                step(self.static_input)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_output = step(self.static_input)

    def replay(self) -> torch.Tensor:
        """Re-run the captured kernels on whatever static_input holds now."""
        self.graph.replay()
        return self.static_output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_input.copy_(x)
        return self.replay()


# --------------------------------------------------------------------------- the cost model


def allreduce_bytes_per_token(hidden: int, tp: int, bytes_per_elem: float = 2, *, allreduces: int = 2) -> float:
    """Bytes each rank sends per token per layer in forward with ring all-reduces.

    A layer does `allreduces` (2: attention, MLP) all-reduces of `hidden` elements per token; a
    ring all-reduce sends 2 (p-1)/p of the message from every rank (reduce-scatter + all-gather).
    """
    hidden = _checks.integer("allreduce_bytes_per_token", "hidden", hidden, low=1)
    tp = _checks.integer("allreduce_bytes_per_token", "tp", tp, low=1)
    s = _checks.number("allreduce_bytes_per_token", "bytes_per_elem", bytes_per_elem, low=0.0, low_open=True)
    allreduces = _checks.integer("allreduce_bytes_per_token", "allreduces", allreduces, low=0)
    return allreduces * 2 * (tp - 1) / tp * hidden * s


def ring_allreduce_time(nbytes: float, world_size: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce of nbytes: 2 (p-1) latency + 2 (p-1)/p nbytes / bandwidth (0 for p = 1).

    bandwidth: bytes/s of one rank's link in one direction; latency: seconds per ring step.
    """
    owner = "ring_allreduce_time"
    nbytes = _checks.number(owner, "nbytes", nbytes, low=0.0)
    p = _checks.integer(owner, "world_size", world_size, low=1)
    bandwidth = _checks.number(owner, "bandwidth", bandwidth, low=0.0, low_open=True)
    latency = _checks.number(owner, "latency", latency, low=0.0)
    return 2 * (p - 1) * latency + 2 * (p - 1) / p * nbytes / bandwidth


@dataclass(frozen=True)
class Link:
    """A GPU-to-GPU link as the ring model sees it (illustrative values, not measurements)."""

    name: str
    bandwidth: float  # bytes/s, one direction, per GPU
    latency: float  # seconds per ring step


NVLINK4 = Link("NVLink 4 (H100 SXM, 450 GB/s per direction)", 450e9, 1e-6)


def overlap_schedule(compute: Sequence[float], comm: Sequence[float], chunks: int) -> tuple[float, list[Span]]:
    """Makespan and spans of `overlapped_forward`'s order with one compute engine and one link.

    compute[s], comm[s]: one chunk's compute and all-reduce time in stage s. Chunk c of stage s
    starts when the engine is free and chunk c's all-reduce of stage s-1 is done; its all-reduce
    starts when its compute is done and the link is free. chunks=1 is the sequential schedule.
    """
    chunks = _checks.integer("overlap_schedule", "chunks", chunks, low=1)
    if len(compute) != len(comm):
        raise ValueError(f"overlap_schedule: compute and comm must have one entry per stage, got "
                         f"{len(compute)} and {len(comm)}")
    engine = link = 0.0
    ready = [0.0] * chunks  # when chunk c's previous all-reduce finished
    spans: list[Span] = []
    for s, (c_s, m_s) in enumerate(zip(compute, comm)):
        for c in range(chunks):
            start = max(engine, ready[c])
            engine = start + c_s
            spans.append(Span("compute", start, engine, f"s{s} c{c}", "compute"))
            a = max(engine, link)
            link = a + m_s
            ready[c] = link
            if m_s > 0:
                spans.append(Span("all-reduce", a, link, f"s{s} c{c}", "all-reduce"))
    return max([engine, link, *ready]), spans


@dataclass(frozen=True)
class LayerTime:
    """Seconds for one transformer layer on one rank (the model of `tp_layer_time`)."""

    compute_s: float  # GEMMs, unchunked (roofline: max of FLOP time and weight-read time)
    comm_s: float  # the two all-reduces, unchunked
    gpu_s: float  # GPU makespan with `chunks` chunks (overlapped when chunks > 1)
    launch_s: float  # CPU time to launch the layer's kernels (0 under a CUDA graph)
    total_s: float  # max(gpu_s, launch_s): a GPU waits for a CPU that launches slower than it runs
    sequential_s: float  # the same layer without chunking/overlap
    spans: list = field(default_factory=list, compare=False)

    @property
    def comm_fraction(self) -> float:
        """Share of the unoverlapped GPU time spent in all-reduce."""
        return self.comm_s / (self.compute_s + self.comm_s) if self.compute_s + self.comm_s > 0 else 0.0


def tp_layer_time(hidden: int, tokens: int, tp: int, *, link: Link = NVLINK4, device: rl.Device = rl.H100_SXM,
                  dtype: str = "bf16", ffn_mult: float = 4.0, chunks: int = 1, launch_overhead: float = 5e-6,
                  kernels_per_layer: int = 16, cuda_graph: bool = False) -> LayerTime:
    """Model one decoder layer (attention 4 h^2 + MLP 2 ffn_mult h^2 weights) split over `tp` ranks.

    Per stage and chunk: compute = max(2 tokens W / p / peak, W s / p / HBM bandwidth) (every
    chunk re-reads the weights), all-reduce = ring_allreduce_time(tokens h s). Attention-score
    FLOPs and KV-cache reads are left out. The CPU launches kernels_per_layer kernels per chunk
    (16: what a TensorParallelBlock dispatches, see dispatched_ops) at launch_overhead each,
    unless the layer is replayed from a CUDA graph.
    """
    owner = "tp_layer_time"
    hidden = _checks.integer(owner, "hidden", hidden, low=1)
    tokens = _checks.integer(owner, "tokens", tokens, low=1)
    tp = _checks.integer(owner, "tp", tp, low=1)
    chunks = _checks.integer(owner, "chunks", chunks, low=1)
    if chunks > tokens:
        raise ValueError(f"{owner}: chunks must be <= tokens={tokens}, got {chunks}")
    ffn_mult = _checks.number(owner, "ffn_mult", ffn_mult, low=0.0, low_open=True)
    launch_overhead = _checks.number(owner, "launch_overhead", launch_overhead, low=0.0)
    kernels_per_layer = _checks.integer(owner, "kernels_per_layer", kernels_per_layer, low=0)
    if not isinstance(link, Link):
        raise TypeError(f"{owner}: link must be a Link, got {type(link).__name__}")
    s = rl.bytes_per_element(dtype, where=owner)
    peak, hbm = device.peak(dtype), device.bandwidth
    weights = (4.0 * hidden**2, 2.0 * ffn_mult * hidden**2)  # attention, MLP

    def per_chunk(k: int) -> tuple[list[float], list[float]]:
        t = tokens / k
        comp = [max(2 * t * w / tp / peak, w * s / tp / hbm) for w in weights]
        comm = [ring_allreduce_time(t * hidden * s, tp, link.bandwidth, link.latency)] * len(weights)
        return comp, comm

    comp1, comm1 = per_chunk(1)
    seq_gpu, _ = overlap_schedule(comp1, comm1, 1)
    comp, comm = per_chunk(chunks)
    gpu, spans = overlap_schedule(comp, comm, chunks)
    launch = 0.0 if cuda_graph else kernels_per_layer * chunks * launch_overhead
    seq_launch = 0.0 if cuda_graph else kernels_per_layer * launch_overhead
    return LayerTime(compute_s=sum(comp1), comm_s=sum(comm1), gpu_s=gpu, launch_s=launch, total_s=max(gpu, launch),
                     sequential_s=max(seq_gpu, seq_launch), spans=spans)


# --------------------------------------------------------------------------- correctness on ranks
#
# Module-level functions for labkit.parallel.launch: every rank runs one and returns plain data.
# (The timed experiments live in labkit.benchmarks.tensor_parallel.)


def _tinygpt(seed: int, **cfg):
    from labkit.models.gpt import GPTConfig, TinyGPT

    torch.manual_seed(seed)  # the same weights on every rank
    base = dict(vocab_size=32, block_size=16, n_layer=2, n_embd=32, n_head=4)
    base.update(cfg)
    return TinyGPT(GPTConfig(**base))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def compare_with_dense(seed: int = 0, batch: int = 2, seq: int = 8, dtype: str = "float32", **cfg) -> dict:
    """On every rank: a TinyGPT and its tensor-parallel copy, one forward + backward on the same batch.

    Returns the largest differences of the loss, the logits and every gradient (a sharded one
    against the same shard of the dense gradient), and the collectives the TP model issued per
    block in forward and in backward.
    """
    rank, world = group_rank_world()
    dt = getattr(torch, dtype)
    dense = _tinygpt(seed, **cfg).to(dt)
    tp = parallelize_tinygpt(dense)
    g = torch.Generator().manual_seed(seed + 1)
    V = dense.config.vocab_size
    idx, tgt = torch.randint(0, V, (batch, seq), generator=g), torch.randint(0, V, (batch, seq), generator=g)
    logits_d, loss_d = dense(idx, tgt)
    loss_d.backward()
    with comm_log() as fwd:
        logits_t, loss_t = tp(idx, tgt)
    with comm_log() as bwd:
        loss_t.backward()
    dense_grads = dict(dense.named_parameters())
    grad_diff = {}
    for name, p in tp.named_parameters():
        ref = dense_grads[name].grad
        if p.shape != ref.shape:  # a shard: column-parallel (dim 0) or row-parallel (dim 1)
            dim = 0 if p.shape[1:] == ref.shape[1:] else 1
            n = p.shape[dim]
            ref = ref.narrow(dim, rank * n, n)
        grad_diff[name] = _max_diff(p.grad, ref)
    n_layer = dense.config.n_layer
    return dict(rank=rank, world=world, loss=loss_t.item(), loss_diff=abs(loss_t.item() - loss_d.item()),
                logits_diff=_max_diff(logits_t, logits_d), grad_diff=grad_diff,
                max_grad_diff=max(grad_diff.values()),
                forward_allreduces_per_block=sum(op == "all_reduce" for op, _ in fwd) / n_layer,
                backward_allreduces_per_block=sum(op == "all_reduce" for op, _ in bwd) / n_layer,
                forward_bytes_per_block=sum(b for _, b in fwd) / n_layer,
                local_params=sum(p.numel() for b in tp.blocks for p in b.parameters()),
                dense_params=sum(p.numel() for b in dense.blocks for p in b.parameters()))


def compare_with_dtensor(seed: int = 0, d_model: int = 16, d_hidden: int = 64, tokens: int = 6) -> dict:
    """On every rank: our column->row MLP against torch.distributed.tensor.parallel's
    ColwiseParallel/RowwiseParallel (parallelize_module on a CPU DeviceMesh), same weights.

    Returns the largest differences of the outputs, the input gradients and the local weight
    and bias gradients.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from labkit.parallel.launch import rank_device

    rank, world = group_rank_world()
    dev = rank_device()
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model)).to(dev)
    ref = copy.deepcopy(dense)
    mesh = init_device_mesh(dev.type, (world,))
    theirs = parallelize_module(copy.deepcopy(dense), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    up = ColumnParallelLinear.from_linear(dense[0])
    down = RowParallelLinear.from_linear(dense[2])

    def ours(x):
        return down(F.gelu(up(x)))

    x = torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    outs = {}
    for name, fn, x_in in (("ours", ours, x.clone().requires_grad_()), ("torch", theirs, x.clone().requires_grad_())):
        y = fn(x_in)
        if isinstance(y, DTensor):
            y = y.full_tensor()
        (y.pow(2).sum()).backward()
        outs[name] = (y.detach().cpu(), x_in.grad.cpu())
    ref(x).pow(2).sum().backward()

    def local(t):
        t = t.grad
        return (t.to_local() if isinstance(t, DTensor) else t).cpu()

    pairs = {"up.weight": (up.weight, theirs[0].weight), "up.bias": (up.bias, theirs[0].bias),
             "down.weight": (down.weight, theirs[2].weight), "down.bias": (down.bias, theirs[2].bias)}
    return dict(rank=rank, world=world,
                out_diff=_max_diff(outs["ours"][0], outs["torch"][0]),
                input_grad_diff=_max_diff(outs["ours"][1], outs["torch"][1]),
                grad_diff={k: _max_diff(a.grad, local(b)) for k, (a, b) in pairs.items()},
                out_vs_dense=_max_diff(outs["ours"][0], ref(x)),
                torch_placements={k: str(b.placements) for k, (_, b) in pairs.items()})


def gradcheck_on_ranks(seed: int = 0) -> dict:
    """On every rank: torch.autograd.gradcheck (float64) of the TP layers as functions of their
    replicated input, which every rank perturbs identically, so the numerical Jacobian is the one
    of the whole distributed function. Exercises f, g, gather and scatter. Returns name -> bool."""
    from labkit.models.gpt import MLP, CausalSelfAttention, GPTConfig

    _, world = group_rank_world()
    torch.manual_seed(seed)
    cfg = GPTConfig(n_embd=2 * world, n_head=world, block_size=4, mlp_ratio=2.0, bias=True)
    layers = {
        "column(gather_output)": ColumnParallelLinear(3, 2 * world, gather_output=True),
        "row(input_is_parallel=False)": RowParallelLinear(2 * world, 3, input_is_parallel=False),
        "mlp": TensorParallelMLP(MLP(cfg)),
        "attention": TensorParallelAttention(CausalSelfAttention(cfg)),
    }
    x = torch.randn(2, 3, cfg.n_embd, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ok = {}
    for name, layer in layers.items():
        layer = layer.double()
        x_in = x[..., :3] if name.startswith("column") else x
        ok[name] = torch.autograd.gradcheck(layer, (x_in.clone().requires_grad_(),), raise_exception=False)
    return ok


def check_on_ranks(seed: int = 0, *, dtensor: bool = True, gradcheck: bool = True) -> dict:
    """Everything the tests and the chapter verify on real ranks, in one launch.

    dense:     compare_with_dense for a GPT-2-style TinyGPT (float32) and a Llama-style one (RMSNorm,
               SwiGLU, RoPE, GQA, biases, untied head; float64)
    dtensor:   compare_with_dtensor (torch's ColwiseParallel / RowwiseParallel)
    gradcheck: gradcheck_on_ranks
    overlap:   largest difference of overlapped_forward (chunks 1..3, with and without overlap)
               from the plain forward of two TP blocks
    bad_heads: the error a head count that does not divide over the ranks raises
    """
    _, world = group_rank_world()
    out = {"dense": {
        "gpt2": compare_with_dense(seed),
        "llama": compare_with_dense(seed, dtype="float64", n_head=2 * world, n_kv_head=world, n_embd=16 * world,
                                    norm="rmsnorm", mlp="swiglu", rope=True, bias=True, tie_embeddings=False),
    }}
    if dtensor:
        out["dtensor"] = compare_with_dtensor(seed)
    if gradcheck:
        out["gradcheck"] = gradcheck_on_ranks(seed)
    dense = _tinygpt(seed, n_embd=8 * world, n_head=2 * world)
    blocks = [TensorParallelBlock(b) for b in dense.blocks]
    stages = [st for b in blocks for st in b.stages()]
    x = torch.randn(5, 3, dense.config.n_embd, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        ref = blocks[1](blocks[0](x))
    out["overlap"] = {(k, ov): _max_diff(overlapped_forward(stages, x, k, overlap=ov), ref)
                      for k in (1, 2, 3) for ov in (False, True)}
    try:
        TensorParallelAttention(_tinygpt(seed, n_head=world + 1, n_embd=4 * (world + 1)).blocks[0].attn)
        out["bad_heads"] = None
    except ValueError as e:
        out["bad_heads"] = str(e)
    return out


__all__ = [
    "ColumnParallelLinear", "DecodeGraph", "LayerTime", "Link", "NVLINK4", "RowParallelLinear", "Span",
    "TensorParallelAttention", "TensorParallelBlock", "TensorParallelMLP", "all_reduce", "allreduce_bytes_per_token",
    "check_on_ranks", "column_shard", "comm_log", "compare_with_dense", "compare_with_dtensor", "copy_to_parallel",
    "cuda_graphs_available", "dispatched_ops", "gather_from_parallel", "gradcheck_on_ranks", "group_rank_world",
    "overlap_schedule", "overlapped_forward", "parallelize_tinygpt", "reduce_from_parallel", "ring_allreduce_time",
    "row_shard", "scatter_to_parallel", "shard_bounds", "tp_layer_time",
]
