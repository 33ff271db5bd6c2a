"""Benchmarks of chapter 16-flash-attention: labkit's Triton FlashAttention against PyTorch's SDPA.

One row per (shape, causal, pass, baseline), measured side by side in one run:

- on a GPU (bf16): the forward and the forward+backward of `flash_attention` against
  `F.scaled_dot_product_attention` restricted to its FLASH_ATTENTION backend (FlashAttention-2)
  and to its CUDNN_ATTENTION backend (cuDNN's fused attention), at B*N = 32k tokens, H = 32,
  D = 128 (N = 4096 in the quick run; N from 1k to 16k and D = 64 too in the full one);
- on a CPU: a tiny shape in Triton's interpreter against SDPA's CPU kernel, a check of the code
  path and of the numbers, not of speed (the interpreter is ~1000x slower than a GPU).

Each row holds the device, median_ms (labkit's kernel), baseline_ms, ratio = baseline_ms / median_ms
(above 1, labkit is faster), flops, tflops and baseline_tflops, roof_fraction = tflops / roof_tflops (the
matmul peak `roofline.probe_device` measures in the same run: about 786 TFLOP/s in bf16 on the course's
H100), and max_abs_diff, the largest difference between the two forwards' outputs.

FLOPs follow FlashAttention's benchmarks (`attention_flops`): the matmuls only, 4 B H N^2 D for the
forward (Q K^T and P V), halved with a causal mask (the tiles above the diagonal are skipped); the
backward counts 2.5x the forward (five matmuls, one of them the recomputed Q K^T), so a forward+backward
row counts 3.5x. The exponentials and the diagonal tiles' masked half are not counted.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from labkit import bench
from labkit.kernels import flash_attention as fa
from labkit.perf import roofline as rl


def settings(quick: bool = False) -> dict:
    """Shapes, dtype and repeats for the current size profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    if fa.kernel_device().type == "cuda":
        tokens, heads = 32768, 32
        shapes = [(4096, 128)] if quick else [(n, 128) for n in (1024, 2048, 4096, 8192, 16384)] + [(4096, 64)]
        return dict(dtype=torch.bfloat16, heads=heads, shapes=[(tokens // n, n, d) for n, d in shapes],
                    causal=(False, True), warmup=5 if quick else 10, repeats=20 if quick else 50)
    shapes = [(1, 64, 32)] if quick else [(1, 64, 32), (1, 128, 64)]
    return dict(dtype=torch.float32, heads=2, shapes=shapes, causal=(False, True), warmup=1,
                repeats=2 if quick else 5)


def baselines() -> dict:
    """name -> a context manager that restricts SDPA to one backend (on a CPU: SDPA as it is)."""
    if fa.kernel_device().type != "cuda":
        return {"sdpa (cpu)": contextlib.nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {"sdpa FLASH_ATTENTION": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
            "sdpa CUDNN_ATTENTION": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}


def _step(attn, q, k, v, do, backward: bool):
    """One call: the forward, or the forward and its backward (the gradients via autograd.grad)."""
    def fn():
        o = attn(q, k, v)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)
        return o
    return fn


def attention_rows(quick: bool = False, *, progress: bool = True) -> list[dict]:
    """labkit's kernel vs each SDPA backend, forward and forward+backward, causal and not."""
    from tqdm.auto import tqdm

    s = settings(quick)
    dev, dtype, H = fa.kernel_device(), s["dtype"], s["heads"]
    device = bench.device_name(dev)
    peak = rl.probe_device((dtype,), device=dev).peak(dtype)  # FLOP/s of a large matmul, measured now
    plan = [(shape, causal, backward) for shape in s["shapes"] for causal in s["causal"] for backward in (False, True)]
    rows = []
    for (B, N, D), causal, backward in tqdm(plan, desc="flash attention vs SDPA", leave=False, disable=not progress):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, generator=g, device=dev, dtype=dtype) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(backward)
        flops = fa.attention_flops(B, H, N, D, causal=causal)
        if backward:
            flops += fa.attention_flops(B, H, N, D, causal=causal, backward=True)

        def ours(a, b, c):
            return fa.flash_attention(a, b, c, causal=causal)

        def sdpa(a, b, c):
            return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

        mine = bench.timeit(_step(ours, q, k, v, do, backward), warmup=s["warmup"], repeats=s["repeats"], device=dev)
        with torch.no_grad():
            out = ours(q, k, v).float()
        for name, restrict in baselines().items():
            try:
                with restrict():
                    base = bench.timeit(_step(sdpa, q, k, v, do, backward), warmup=s["warmup"],
                                        repeats=s["repeats"], device=dev)
                    with torch.no_grad():
                        diff = (sdpa(q, k, v).float() - out).abs().max().item()
            except RuntimeError as e:  # a backend that does not run this shape or build
                print(f"{name} skipped for N={N}, D={D}, causal={causal}: {str(e).splitlines()[0]}")
                continue
            rows.append({
                "name": f"{'fwd+bwd' if backward else 'fwd'} N={N}{' causal' if causal else ''} vs {name}",
                "kind": "attention", "device": device, "dtype": str(dtype).removeprefix("torch."),
                "batch": B, "heads": H, "seq_len": N, "head_dim": D, "causal": causal,
                "pass": "fwd+bwd" if backward else "fwd", "baseline": name,
                "median_ms": mine.median_ms, "baseline_ms": base.median_ms, "ratio": base.median_s / mine.median_s,
                "flops": flops, "tflops": flops / mine.median_s / 1e12, "baseline_tflops": flops / base.median_s / 1e12,
                "roof_tflops": peak / 1e12, "roof_fraction": flops / mine.median_s / peak, "max_abs_diff": diff,
            })
    return rows


def run(quick: bool = False) -> list[dict]:
    """All of the chapter's benchmarks on the current device."""
    return attention_rows(quick)


__all__ = ["attention_rows", "baselines", "run", "settings"]
