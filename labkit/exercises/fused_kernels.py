"""Exercises of chapter 17-fused-kernels (registered on import; graded by labkit.check).

    fused-kernels.rmsnorm_kernel     fn(x, weight, eps) -> y: RMSNorm of x (N, C) computed by a Triton kernel
    fused-kernels.ce_grad            fn(logits, target, ignore_index, reduction) -> d loss / d logits
    fused-kernels.loss_layer_bytes   fn(tokens, vocab, hidden, dtype_bytes, chunk_size) -> (eager, fused) peak bytes
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from labkit.exercises import Exercise, register
from labkit.kernels import fused_linear_ce as flce
from labkit.kernels._common import kernel_device
from labkit.kernels.rmsnorm import rms_norm

# --- fused-kernels.rmsnorm_kernel ------------------------------------------------------------


def rmsnorm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: labkit's fused RMSNorm forward."""
    return rms_norm(x, weight, eps)


def _rms_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    dev = kernel_device()  # the student's kernel runs where labkit's do: compiled on a GPU, interpreted on a CPU

    def case(n, c, eps=1e-6, scale=1.0):
        return dict(x=(torch.randn(n, c, generator=gen) * scale).to(dev),
                    weight=(1 + 0.1 * torch.randn(c, generator=gen)).to(dev), eps=eps)

    yield case(4, 64)  # a power of two: no masking needed
    yield case(3, 100)  # C not a power of two: the mean must divide by C, not by the block size
    yield case(1, 1)  # one element: y = x / sqrt(x^2 + eps) * w
    yield case(5, 37, eps=0.5)  # a large eps shows where it goes: inside the square root
    yield case(2, 48, scale=1e-3)  # tiny inputs: eps matters
    yield case(7, 130, scale=30.0)  # large inputs: the result does not depend on the scale
    yield dict(x=torch.zeros(2, 10, device=dev), weight=torch.ones(10, device=dev), eps=1e-6)  # zero in, zero out
    for _ in range(6):
        yield case(rng.randint(1, 9), rng.randint(1, 200), eps=10 ** rng.uniform(-6, -2),
                   scale=10 ** rng.uniform(-1, 1))


@contextlib.contextmanager
def _count_launches():
    """Count Triton kernel launches (compiled or interpreted) inside the block."""
    from triton.runtime import interpreter, jit

    calls = []
    patched = [(cls, cls.run) for cls in (jit.JITFunction, interpreter.InterpretedFunction)]

    def wrap(orig):
        def run(self, *args, **kwargs):
            calls.append(getattr(self, "__name__", "kernel"))
            return orig(self, *args, **kwargs)
        return run

    try:
        for cls, orig in patched:
            cls.run = wrap(orig)
        yield calls
    finally:
        for cls, orig in patched:
            cls.run = orig


def _require_kernel(fn, case) -> str | None:
    with _count_launches() as calls:
        fn(**case)
    if not calls:
        return "no Triton kernel was launched: write a @triton.jit kernel and launch it with kernel[grid](...)"
    return None


register(Exercise(
    name="fused-kernels.rmsnorm_kernel",
    reference=rmsnorm_kernel,
    cases=_rms_cases,
    rtol=1e-5, atol=1e-5,
    require=_require_kernel,
    timeout=30.0,
    hint="One program per row (grid = (N,)): cols = tl.arange(0, BLOCK_C) with BLOCK_C = "
         "triton.next_power_of_2(C), mask = cols < C, load x with other=0.0; "
         "rstd = 1 / tl.sqrt(tl.sum(x * x) / C + eps) (divide by C, not BLOCK_C); store x * rstd * w under the mask.",
))

# --- fused-kernels.ce_grad ----------------------------------------------------------------------


def ce_grad(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Reference: PyTorch autograd of F.cross_entropy (float64)."""
    z = logits.detach().double().requires_grad_()
    F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction).backward()
    return z.grad.to(logits.dtype)


def _ce_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def case(n, v, ignored=(), ignore_index=-100, reduction="mean", scale=2.0):
        t = torch.randint(0, v, (n,), generator=gen)
        for i in ignored:
            t[i] = ignore_index
        return dict(logits=torch.randn(n, v, generator=gen) * scale, target=t, ignore_index=ignore_index,
                    reduction=reduction)

    yield case(4, 5)  # nothing ignored
    yield case(6, 7, ignored=(1, 4))  # mean over the 4 scored rows, not all 6
    yield case(6, 7, ignored=(1, 4), reduction="sum")  # no division at all
    yield case(5, 3, ignored=(0, 1, 2, 3))  # one scored row: its gradient is not divided
    yield case(3, 9, ignored=(2,), ignore_index=0)  # ignore_index is a real class id here
    yield case(1, 1)  # one class: p = 1, the gradient is 0
    yield case(8, 50, ignored=(0, 7), scale=30.0)  # peaked softmax: subtract the max before exp
    for _ in range(6):
        n, v = rng.randint(1, 12), rng.randint(2, 64)
        yield case(n, v, ignored=rng.sample(range(n), rng.randint(0, n - 1)), reduction=rng.choice(["mean", "sum"]))


register(Exercise(
    name="fused-kernels.ce_grad",
    reference=ce_grad,
    cases=_ce_cases,
    rtol=1e-5, atol=1e-6,
    hint="p = softmax(logits) row by row; subtract 1 at each row's target; zero the rows whose target is "
         "ignore_index; for reduction='mean' divide by the number of rows that are *not* ignored.",
))

# --- fused-kernels.loss_layer_bytes ---------------------------------------------------------------


def loss_layer_bytes(tokens: int, vocab: int, hidden: int, dtype_bytes: int, chunk_size: int) -> tuple[int, int]:
    """Reference: (eager, fused) peak bytes from labkit.kernels.fused_linear_ce.loss_layer_bytes."""
    m = flce.loss_layer_bytes(tokens, vocab, hidden, dtype_bytes, chunk_size)
    return m["eager"], m["fused"]


def _bytes_cases(rng):
    yield dict(tokens=8192, vocab=128256, hidden=4096, dtype_bytes=2, chunk_size=256)  # Llama-3, Liger's chunk
    yield dict(tokens=8192, vocab=32000, hidden=4096, dtype_bytes=2, chunk_size=1024)  # Llama-2
    yield dict(tokens=4096, vocab=151936, hidden=3584, dtype_bytes=4, chunk_size=512)  # Qwen2-7B, fp32
    yield dict(tokens=100, vocab=50257, hidden=768, dtype_bytes=2, chunk_size=4096)  # chunk larger than N
    yield dict(tokens=64, vocab=300, hidden=256, dtype_bytes=4, chunk_size=16)  # small vocab: dx + dW dominate
    yield dict(tokens=1, vocab=1, hidden=1, dtype_bytes=2, chunk_size=1)
    for _ in range(8):
        yield dict(tokens=rng.randint(1, 65536), vocab=rng.randint(2, 262144),
                   hidden=rng.choice([512, 2048, 4096, 8192]), dtype_bytes=rng.choice([2, 4]),
                   chunk_size=2 ** rng.randint(0, 14))


register(Exercise(
    name="fused-kernels.loss_layer_bytes",
    reference=loss_layer_bytes,
    cases=_bytes_cases,
    rtol=0.0, atol=0.0,
    hint="b = dtype_bytes, grads = (N + V) H b. eager = max(3 N V b, N V b + grads): log_softmax's backward "
         "holds three (N, V) tensors at once. fused = min(C, N) V b + grads: one chunk of logits at a time.",
))

__all__ = ["ce_grad", "loss_layer_bytes", "rmsnorm_kernel"]
