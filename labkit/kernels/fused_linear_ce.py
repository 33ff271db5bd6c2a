"""Fused linear + cross-entropy: the language-model loss without the (tokens x vocab) logits.

A language model's last step is logits = x W^T (+ b), x (N, H) hidden states, W (V, H) the
output head, then cross-entropy against the next tokens. At N = 8192 tokens and Llama-3's
V = 128,256 the logits alone are 8192 * 128256 * 2 B = 2.1 GB in bf16, and eager autograd keeps
logits-sized tensors alive from the forward into the backward (the log-probabilities) and
allocates more there (their gradients): 6.3 GB at the peak, for a layer whose weight is 1 GB.

The fused version never holds more than one chunk of rows. For each chunk of C tokens:

    z = x_c W^T (+ b)                      (C, V)   cuBLAS
    loss_c, dz = CE kernel(z)              dz written over z in place: p - onehot, scaled
    dx_c = dz W                            (C, H)
    dW += dz^T x_c,  db += sum(dz)         accumulated across chunks

i.e. the gradient is computed *during the forward*, since cross-entropy is the last op and its
gradient needs nothing from later (Liger's insight, after mgmalek/efficient_cross_entropy). The
forward saves dx, dW, db; the backward only scales them by the incoming (scalar) gradient.
The default chunk holds about as many logits as x has elements (C = N / ceil(V / H), rounded
to a power of two, as in Liger), so the transient logits cost no more than the hidden states.

reduction="none" is different: the backward brings one upstream gradient per token, and
dW = sum_i g_i dz_i x_i^T can no longer be formed once the sum over tokens has been taken (Liger
scaled the summed dW by g_0 until linkedin/Liger-Kernel#1298, 2026). There the forward computes
only the losses and the backward
recomputes each chunk's logits with g folded into the kernel's scale: one matmul more, still
no full logits.

The weight and bias gradients accumulate in the weight's dtype (as Liger's default); the chunk
matmuls themselves accumulate in float32 inside cuBLAS.

References:
    P.-L. Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024
        (arXiv:2410.10989), github.com/linkedin/Liger-Kernel (ops/fused_linear_cross_entropy.py).
    M. Malek, "efficient_cross_entropy", github.com/mgmalek/efficient_cross_entropy, 2024.
    E. Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024
        (arXiv:2411.09009): the same idea taken further, blockwise inside one kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton

from labkit import _checks
from labkit.kernels._common import acc_dtype, check_float_tensor
from labkit.kernels.cross_entropy import REDUCTIONS, ce_rows, check_targets


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Liger's rule: a chunk of about N / ceil(V / H) tokens (power of two, at most N), so that the
    chunk's logits (C, V) have about as many elements as the hidden states (N, H)."""
    owner = "default_chunk_size"
    n_tokens = _checks.integer(owner, "n_tokens", n_tokens, low=0)
    hidden = _checks.integer(owner, "hidden", hidden, low=1)
    vocab = _checks.integer(owner, "vocab", vocab, low=1)
    factor = triton.cdiv(vocab, hidden)
    return max(1, min(triton.next_power_of_2(triton.cdiv(n_tokens, factor)), n_tokens))


def _chunked(x, weight, target, bias, ignore_index, *, scale=1.0, row_scale=None, chunk_size,
             grad_x=None, grad_w=None, grad_b=None):
    """One pass over the chunks: per-token losses (N,) (float32), and the gradients into grad_* if given."""
    n_tokens = x.shape[0]
    want_grad = grad_x is not None or grad_w is not None or grad_b is not None
    losses = torch.empty(n_tokens, dtype=acc_dtype(x.dtype), device=x.device)
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        x_c = x[start:end]  # (C, H)
        z = x_c @ weight.T  # (C, V): the only logits that ever exist
        if bias is not None:
            z += bias
        rs = None if row_scale is None else row_scale[start:end]
        losses[start:end] = ce_rows(z, target[start:end], ignore_index, grad=z if want_grad else None,
                                    scale=scale, row_scale=rs)  # z now holds dloss/dz
        if grad_x is not None:
            torch.mm(z, weight, out=grad_x[start:end])  # (C, V) @ (V, H)
        if grad_w is not None:
            grad_w.addmm_(z.T, x_c)  # (V, C) @ (C, H)
        if grad_b is not None:
            grad_b += z.sum(0)
        del z
    return losses


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """loss(x W^T + b, target) with the gradient computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, x, weight, target, bias, ignore_index, reduction, chunk_size, grad_enabled):
        need = [n and grad_enabled for n in ctx.needs_input_grad]  # no gradients under torch.no_grad()
        ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
        n_valid = int((target != ignore_index).sum())
        if reduction == "none":  # gradients later, once the per-token upstream gradient is known
            ctx.save_for_backward(x, weight, target, bias)
            return _chunked(x, weight, target, bias, ignore_index, chunk_size=chunk_size).to(x.dtype)
        grad_x = torch.empty_like(x) if need[0] else None
        grad_w = torch.zeros_like(weight) if need[1] else None
        grad_b = torch.zeros_like(bias) if bias is not None and need[3] else None
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        losses = _chunked(x, weight, target, bias, ignore_index, scale=scale, chunk_size=chunk_size,
                          grad_x=grad_x, grad_w=grad_w, grad_b=grad_b)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        total = losses.sum()
        if reduction == "mean":
            total = total / n_valid  # nan when every target is ignored, as in PyTorch
        return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        need = ctx.needs_input_grad
        if ctx.reduction == "none":
            x, weight, target, bias = ctx.saved_tensors
            grad_x = torch.empty_like(x) if need[0] else None
            grad_w = torch.zeros_like(weight) if need[1] else None
            grad_b = torch.zeros_like(bias) if bias is not None and need[3] else None
            row_scale = grad_loss.reshape(-1).to(acc_dtype(x.dtype))
            _chunked(x, weight, target, bias, ctx.ignore_index, row_scale=row_scale.contiguous(),
                     chunk_size=ctx.chunk_size, grad_x=grad_x, grad_w=grad_w, grad_b=grad_b)
            return grad_x, grad_w, None, grad_b, None, None, None, None
        grads = ctx.saved_tensors
        if grad_loss.item() != 1.0:  # the usual case is loss.backward() on the loss itself: no copy then
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        grad_x, grad_w, grad_b = grads
        return grad_x, grad_w, None, grad_b, None, None, None, None


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", *, chunk_size: int | None = None) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T + bias, target) for x (N, H), weight (V, H), bias (V,), target (N,),
    computed `chunk_size` tokens at a time (default: default_chunk_size(N, H, V))."""
    owner = "fused_linear_cross_entropy"
    check_float_tensor(owner, "x", x)
    check_float_tensor(owner, "weight", weight)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{owner}: x must have shape (N, H) with H >= 1, got {tuple(x.shape)}; "
                         "flatten (B, T, H) with x.reshape(-1, H)")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"{owner}: weight must have shape (V, H) = (V, {x.shape[1]}) with V >= 1, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{owner}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        check_float_tensor(owner, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{owner}: bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{owner}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{owner}: {name} must be on x's device {x.device}, got {t.device}")
    ignore_index = _checks.integer(owner, "ignore_index", ignore_index, low=-(2**62))
    _checks.choice(owner, "reduction", reduction, REDUCTIONS)
    target = check_targets(owner, target, x.shape[0], weight.shape[0], ignore_index, x.device)
    n, h = x.shape
    chunk_size = default_chunk_size(n, h, weight.shape[0]) if chunk_size is None else \
        _checks.integer(owner, "chunk_size", chunk_size, low=1)
    return FusedLinearCrossEntropyFunction.apply(x, weight, target, bias, ignore_index, reduction,
                                                 max(1, min(chunk_size, n)), torch.is_grad_enabled())


class FusedLinearCrossEntropyLoss(nn.Module):
    """The loss module: forward(x, weight, target, bias=None), e.g. with a model's lm_head.weight."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", *, chunk_size: int | None = None):
        super().__init__()
        owner = "FusedLinearCrossEntropyLoss"
        self.ignore_index = _checks.integer(owner, "ignore_index", ignore_index, low=-(2**62))
        self.reduction = _checks.choice(owner, "reduction", reduction, REDUCTIONS)
        self.chunk_size = None if chunk_size is None else _checks.integer(owner, "chunk_size", chunk_size, low=1)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_cross_entropy(x, weight, target, bias, self.ignore_index, self.reduction,
                                          chunk_size=self.chunk_size)


def loss_layer_bytes(n_tokens: int, vocab: int, hidden: int, element_bytes: int, chunk_size: int | None = None
                     ) -> dict[str, int]:
    """Peak memory of the loss layer's forward + backward beyond its inputs, in bytes (N tokens, V vocab,
    H hidden, b bytes per element), as PyTorch allocates it.

    eager, F.cross_entropy(x @ W.T) = log_softmax + nll_loss: inside log_softmax's backward three (N, V)
    tensors are alive (the saved log-probabilities, their gradient, the logits' gradient): 3 N V b;
    later the logits' gradient, dx (N H b) and dW (V H b): whichever is larger.
    fused: one chunk of logits, overwritten by its gradient, next to dx and dW: min(C, N) V b + (N + V) H b.
    """
    owner = "loss_layer_bytes"
    n_tokens = _checks.integer(owner, "n_tokens", n_tokens, low=1)
    vocab = _checks.integer(owner, "vocab", vocab, low=1)
    hidden = _checks.integer(owner, "hidden", hidden, low=1)
    element_bytes = _checks.integer(owner, "element_bytes", element_bytes, low=1)
    if chunk_size is not None:
        chunk_size = _checks.integer(owner, "chunk_size", chunk_size, low=1)
    logits = n_tokens * vocab * element_bytes
    grads = (n_tokens + vocab) * hidden * element_bytes
    c = default_chunk_size(n_tokens, hidden, vocab) if chunk_size is None else min(chunk_size, n_tokens)
    return {"eager": max(3 * logits, logits + grads), "fused": c * vocab * element_bytes + grads,
            "logits": logits, "gradients": grads, "chunk_size": c}


__all__ = ["FusedLinearCrossEntropyFunction", "FusedLinearCrossEntropyLoss", "default_chunk_size",
           "fused_linear_cross_entropy", "loss_layer_bytes"]
