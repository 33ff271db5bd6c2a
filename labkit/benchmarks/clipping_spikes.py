"""Benchmarks of chapter 07-clipping-spikes: labkit's clip_grad_norm_ against torch's, and the cost of
recording per-layer gradient norms.

Group "clip": on a TinyGPT's real gradients (one backward on a Shakespeare batch), the median
time of one clipping call: torch.nn.utils.clip_grad_norm_ with its multi-tensor kernels (the
baseline, measured in the same run) and with foreach=False (a loop over tensors), labkit's global
mode with and without foreach, and labkit's local mode with and without foreach. ratio =
baseline_ms / median_ms (> 1: faster than torch's foreach path). norm: the total 2-norm each
variant measured on the same fresh gradients (the global ones must equal torch's).

Group "recorder": one forward + backward of the same model without hooks (the baseline) and with
a GradNormRecorder attached (one norm kernel per parameter, no host synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from labkit import bench, datasets, runtime
from labkit.benchmarks import char_gpt
from labkit.benchmarks.adamw import _configs  # the same TinyGPT sizes as chapter 04's AdamW benchmark
from labkit.train import clipping
from labkit.train.spikes import GradNormRecorder

MAX_NORM = 1.0


def variants() -> dict[str, Callable[[list[torch.Tensor]], torch.Tensor]]:
    """name -> clip(params) for every clipping variant compared (the baseline first)."""
    return {
        "torch clip_grad_norm_ (foreach)": lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=True),
        "torch clip_grad_norm_ (foreach=False)": lambda ps: torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=False),
        "labkit global (foreach)": lambda ps: clipping.clip_grad_norm_(ps, MAX_NORM, foreach=True),
        "labkit global (foreach=False)": lambda ps: clipping.clip_grad_norm_(ps, MAX_NORM, foreach=False),
        "labkit local (foreach)": lambda ps: clipping.clip_grad_norm_(ps, MAX_NORM, mode="local", foreach=True),
        "labkit local (foreach=False)": lambda ps: clipping.clip_grad_norm_(ps, MAX_NORM, mode="local",
                                                                           foreach=False),
    }


def run(quick: bool = False) -> list[dict]:
    """Clipping time of each variant and the recorder's overhead, side by side, on this machine's device."""
    if not isinstance(quick, bool):
        raise TypeError(f"run: quick must be a bool, got {type(quick).__name__}")
    dev = runtime.device()
    data = datasets.token_dataset("char", "train")
    B, T = runtime.pick(cpu=(8, 32), gpu=(16, 256))
    warmup, repeats = (2, 5) if quick else runtime.pick(cpu=(3, 15), gpu=(10, 50))
    name_of_device = bench.device_name(dev)
    rows: list[dict] = []
    for config in _configs(quick):
        model = char_gpt(block_size=T, device=dev, **config)
        params = [p for p in model.parameters() if p.requires_grad]
        label = f"{config['n_layer']}x{config['n_embd']}"
        common = dict(model=label, params=sum(p.numel() for p in params), n_tensors=len(params),
                      device=name_of_device)
        x, y = next(datasets.batches(data, B, T, seed=0, device=dev))
        model(x, y)[1].backward()
        grads = [p.grad.clone() for p in params]

        def fresh():
            for p, g in zip(params, grads):
                p.grad = g.clone()

        baseline_ms = None
        for name, clip in variants().items():
            fresh()
            norm = clip(params)
            norm = float(clipping.global_norm([norm.double()]) if norm.dim() else norm)  # local: ||(N_i)||
            fresh()
            t = bench.timeit(lambda: clip(params), warmup=warmup, repeats=repeats, device=dev)
            baseline_ms = t.median_ms if baseline_ms is None else baseline_ms
            rows.append({"name": name, "group": "clip", **common, "median_ms": t.median_ms,
                         "baseline_ms": baseline_ms, "ratio": baseline_ms / t.median_ms, "norm": norm})

        def backward():
            model.zero_grad(set_to_none=True)
            model(x, y)[1].backward()

        plain = bench.timeit(backward, warmup=warmup, repeats=repeats, device=dev)
        with GradNormRecorder(model) as rec:
            def backward_recorded():
                backward()
                rec.step()
            hooked = bench.timeit(backward_recorded, warmup=warmup, repeats=repeats, device=dev)
        for name, t in (("forward + backward", plain), ("forward + backward + GradNormRecorder", hooked)):
            rows.append({"name": name, "group": "recorder", **common, "median_ms": t.median_ms,
                         "baseline_ms": plain.median_ms, "ratio": plain.median_ms / t.median_ms, "norm": None})
        del model, params, grads
    return rows


__all__ = ["MAX_NORM", "run", "variants"]
