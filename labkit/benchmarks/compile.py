"""Benchmarks of chapter 02-compile: a transformer block, eager vs torch.compile (Inductor).

For each input shape the block runs eagerly (the baseline) and compiled with Inductor
(`mode=None`; on a GPU also "max-autotune-no-cudagraphs", which benchmarks Triton GEMM
templates against cuBLAS). Each row gives the median time, the speed-up over eager in the
same run (ratio = eager ms / compiled ms), the compile time of the first call (seconds, warm or
cold Inductor cache) and the difference from eager: max_abs_diff, and rel_err =
max |compiled - eager| / max |eager|, to compare with REL_TOL[dtype].
fp32 on a CPU; bf16 on a GPU, where eager rounds every op's output to bf16 and Inductor's fused
kernels compute in fp32 between loads and stores, so the two differ by a few bf16 ulps (bf16
keeps 8 significant bits: one ulp is 0.031 for values between 4 and 8).
Inference (no_grad), dynamic=False: each shape gets its own specialised graph.
"""

from __future__ import annotations

import time

import torch

from labkit import bench, runtime
from labkit.models import Block, GPTConfig
from labkit.perf import compile as pc


# Largest accepted rel_err per dtype. fp32: Inductor only reorders sums (~1e-7 seen on a CPU).
# bf16: one ulp is 2**-8 to 2**-7 of a value, so 2e-2 allows 2.5 to 5 ulps at the output's
# largest magnitude (eager and Inductor round intermediate values in different places).
REL_TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def configs(quick: bool = False) -> list[tuple[int, int, int, int]]:
    """(B, T, C, n_head) per measured shape, for the current size profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"configs: quick must be a bool, got {type(quick).__name__}")
    cpu = [(4, 32, 64, 4)] if quick else [(4, 32, 64, 4), (8, 64, 128, 4)]
    gpu = [(8, 512, 768, 12)] if quick else [(8, 512, 768, 12), (8, 1024, 1024, 16), (4, 2048, 2048, 16)]
    return runtime.pick(cpu=cpu, gpu=gpu)


def run(quick: bool = False) -> list[dict]:
    """Eager vs compiled block, side by side, for a few shapes on this machine's device."""
    dev = runtime.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    modes = runtime.pick(cpu=["default"], gpu=["default"] if quick else ["default", "max-autotune-no-cudagraphs"])
    warmup, repeats = (2, 5) if quick else runtime.pick(cpu=(3, 10), gpu=(5, 30))
    device_name = bench.device_name(dev)
    rows: list[dict] = []
    for B, T, C, H in configs(quick):
        torch.manual_seed(0)
        # Llama-style block; block_size = 2T (only the rope tables' length) matches chapter 02's notebook
        config = GPTConfig(n_embd=C, n_head=H, block_size=2 * T, norm="rmsnorm", mlp="swiglu", rope=True)
        block = Block(config).to(dev, dtype).eval()
        x = torch.randn(B, T, C, device=dev, dtype=dtype)  # (B, T, C)
        shape = f"{B}x{T}x{C}"
        with torch.no_grad():
            ref = block(x)
            eager = bench.timeit(lambda: block(x), warmup=warmup, repeats=repeats, device=dev)
        rows.append({"name": "eager", "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                     "median_ms": eager.median_ms, "baseline_ms": eager.median_ms, "ratio": 1.0,
                     "compile_s": 0.0, "max_abs_diff": 0.0, "rel_err": 0.0, "device": device_name})
        for mode in modes:
            torch._dynamo.reset()
            compiled = torch.compile(block, mode=None if mode == "default" else mode, dynamic=False)
            with torch.no_grad(), pc.quiet_dynamo():
                t0 = time.perf_counter()
                out = compiled(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                compile_s = time.perf_counter() - t0
                timing = bench.timeit(lambda: compiled(x), warmup=warmup, repeats=repeats, device=dev)
            rows.append({"name": f"compiled ({mode})", "shape": shape, "dtype": str(dtype).replace("torch.", ""),
                         "median_ms": timing.median_ms, "baseline_ms": eager.median_ms,
                         "ratio": eager.median_ms / timing.median_ms, "compile_s": compile_s,
                         "max_abs_diff": pc.max_abs_diff(out, ref), "rel_err": pc.max_rel_diff(out, ref),
                         "device": device_name})
    return rows


__all__ = ["REL_TOL", "configs", "run"]
