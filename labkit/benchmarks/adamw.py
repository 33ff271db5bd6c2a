"""Benchmarks of chapter 03-adamw: labkit's AdamW against torch.optim.AdamW on a TinyGPT.

For one model size (two unless quick) every optimizer is timed on the same parameters and the
same gradients: the median time of `optimizer.step()` (median_ms), torch.optim.AdamW with its
default implementation as the baseline measured in the same run (baseline_ms; the default is
the multi-tensor "foreach" path on CUDA and the per-tensor loop on a CPU), ratio =
baseline_ms / median_ms (> 1: faster than torch's default), the bytes of optimizer state
after one step, and the loss after a short training run from the same seed and batches
(final_loss: the mean of the last 5 steps; nan or huge where the run diverged).
"""

from __future__ import annotations

import math

import torch

from labkit import bench, datasets, runtime
from labkit.benchmarks import char_gpt
from labkit.models import train
from labkit.optim.adamw import AdamW
from labkit.optim.memory import state_bytes

LR = 3e-3


def _configs(quick: bool) -> list[dict]:
    cpu = [dict(n_layer=2, n_embd=64, n_head=4)]
    if not quick:
        cpu.append(dict(n_layer=4, n_embd=128, n_head=4))
    gpu = [dict(n_layer=6, n_embd=512, n_head=8)]
    if not quick:
        gpu.append(dict(n_layer=12, n_embd=768, n_head=12))
    return runtime.pick(cpu=cpu, gpu=gpu)


def _train_steps(quick: bool) -> int:
    return runtime.pick(cpu=20 if quick else 60, gpu=100 if quick else 300)


def optimizers() -> dict[str, callable]:
    """name -> factory(params) for every optimizer compared (the baseline first)."""
    return {
        "torch AdamW (default)": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0),
        "torch AdamW (foreach=False)": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0, foreach=False),
        "labkit AdamW (fp32 states)": lambda ps: AdamW(ps, lr=LR, weight_decay=0.0),
        "labkit AdamW (bf16 states)": lambda ps: AdamW(ps, lr=LR, weight_decay=0.0, state_dtype=torch.bfloat16),
        "labkit AdamW (fp16 states)": lambda ps: AdamW(ps, lr=LR, weight_decay=0.0, state_dtype=torch.float16),
    }


def run(quick: bool = False) -> list[dict]:
    """Step time, state bytes and final loss of each optimizer, side by side, on this machine's device."""
    if not isinstance(quick, bool):
        raise TypeError(f"run: quick must be a bool, got {type(quick).__name__}")
    dev = runtime.device()
    data = datasets.token_dataset("char", "train")
    B, T = runtime.pick(cpu=(16, 32), gpu=(32, 256))
    train_steps = _train_steps(quick)
    warmup, repeats = (2, 5) if quick else runtime.pick(cpu=(3, 10), gpu=(5, 30))
    device_name = bench.device_name(dev)
    rows: list[dict] = []
    for config in _configs(quick):
        model = char_gpt(block_size=T, device=dev, **config)
        n_params = sum(p.numel() for p in model.parameters())
        x, y = next(datasets.batches(data, B, T, seed=0, device=dev))
        model(x, y)[1].backward()  # one set of real gradients, reused by every timed step
        grads = [p.grad.clone() for p in model.parameters()]
        baseline_ms = None
        for name, make in optimizers().items():
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt = make(list(model.parameters()))
            timing = bench.timeit(opt.step, warmup=warmup, repeats=repeats, device=dev)
            baseline_ms = timing.median_ms if baseline_ms is None else baseline_ms
            trained = char_gpt(block_size=T, device=dev, **config)
            log = train(trained, datasets.batches(data, B, T, seed=1, device=dev), train_steps,
                        optimizer=make(list(trained.parameters())), progress=False, grad_clip=None)
            tail = log.losses[-5:]
            final = sum(tail) / len(tail)
            rows.append({
                "name": name, "model": f"{config['n_layer']}x{config['n_embd']}", "params": n_params,
                "median_ms": timing.median_ms, "baseline_ms": baseline_ms, "ratio": baseline_ms / timing.median_ms,
                "state_bytes": state_bytes(opt), "state_bytes_per_param": state_bytes(opt) / n_params,
                "final_loss": final if math.isfinite(final) else float("nan"), "train_steps": train_steps,
                "device": device_name,
            })
        del model, grads
    return rows


__all__ = ["optimizers", "run"]
