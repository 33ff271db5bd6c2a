"""Benchmarks of chapter 10-scaling-laws: the TinyGPT family's training throughput, side by side,
and the scaling law fitted to the family's measured runs.

1. kind "throughput": for each width, the time of one training step (forward, backward, gradient
   clipping, AdamW) on the same batch shape: median_ms and min_ms over the repeats, tokens_per_s
   and the model FLOP/s 6 · N_total · tokens/s from the step time (the median on a GPU; the
   fastest repeat on a CPU, the one least disturbed by other programs on a shared machine), and
   baseline_ms / ratio against the smallest width (ratio = baseline_ms / step_ms: below 1 means
   slower). params_ratio = N / N_smallest shows how far step time is from growing with N at this
   size (small models are overhead-bound, so 6ND is not wall time).
2. kind "fit": the family trained with labkit.train.scaling.train_family (or runs passed in) and
   the law fitted to its checkpoints: E, A, B, alpha, beta, the Huber objective and the rms log
   residual, the number of points, and the compute-optimal N, D and tokens per parameter at the
   largest budget measured.
"""

from __future__ import annotations

import time

import torch

from labkit import bench, datasets, runtime
from labkit.models import TinyGPT
from labkit.train import scaling as sc


def settings(quick: bool = False) -> dict:
    """Family, data and fit settings for the current size profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    if runtime.on_gpu():
        s = dict(widths=[64, 128, 256] if quick else [32, 48, 64, 96, 128, 192, 256], n_layer=4, block_size=128,
                 batch_size=64, lr=3e-3, warmup=32, head_dim=32,
                 checkpoints=[2**k for k in range(5, 10 if quick else 13)], min_tokens=64 * 64 * 128, repeats=20)
    else:
        s = dict(widths=[8, 16, 32] if quick else [8, 12, 16, 24, 32, 48], n_layer=2, block_size=32, batch_size=64,
                 lr=1e-2, warmup=16, head_dim=8, checkpoints=[2**k for k in range(4, 8 if quick else 12)],
                 min_tokens=64 * 64 * 32, repeats=10 if quick else 30)
    return s


def throughput_rows(s: dict) -> list[dict]:
    """One row per width: the median training-step time and tokens/s, against the smallest width."""
    dev = runtime.device()
    vocab = datasets.get_tokenizer("char").vocab_size
    x, y = next(datasets.batches(datasets.token_dataset("char", "train"), s["batch_size"], s["block_size"], seed=7,
                                 device=dev))  # (B, T) each
    tokens = x.numel()
    rows = []
    for width in s["widths"]:
        runtime.seed_everything(0)
        config = sc.family_config(width, n_layer=s["n_layer"], block_size=s["block_size"], vocab_size=vocab,
                                  head_dim=s["head_dim"])
        model = TinyGPT(config).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.9, 0.99), weight_decay=0.0)

        def step():
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        t = bench.timeit(step, warmup=3 if rows else 10, repeats=s["repeats"])  # the first also warms the process
        step_s = t.median_s if dev.type == "cuda" else t.min_s
        rows.append({"name": f"TinyGPT d={width}", "kind": "throughput", "device": t.device, "width": width,
                     "n_layer": s["n_layer"], "params": model.num_params(non_embedding=True),
                     "total_params": model.num_params(), "tokens_per_step": tokens, "median_ms": t.median_ms,
                     "min_ms": t.min_s * 1e3, "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
                     "model_gflops_per_s": sc.FLOPS_PER_PARAM_TOKEN * model.num_params() * tokens / step_s / 1e9})
    base = rows[0]
    for r in rows:
        r["baseline_ms"] = base["step_ms"]
        r["ratio"] = base["step_ms"] / r["step_ms"]
        r["params_ratio"] = r["params"] / base["params"]
    return rows


def fit_rows(s: dict, runs: list | None = None, *, progress: bool = False) -> list[dict]:
    """Train the family (unless runs are given), fit the law to its checkpoints, and report it."""
    t0 = time.perf_counter()
    if runs is None:
        runs = sc.train_family(s["widths"], s["checkpoints"], n_layer=s["n_layer"], batch_size=s["batch_size"],
                               block_size=s["block_size"], lr=s["lr"], warmup=s["warmup"], head_dim=s["head_dim"],
                               progress=progress)
    train_s = time.perf_counter() - t0
    usable = sum(t >= s["min_tokens"] for r in runs for t in r.tokens)
    min_tokens = s["min_tokens"] if usable >= 8 else 0  # short (quick) runs: fit every checkpoint
    N, D, L = sc.runs_to_points(runs, min_tokens=min_tokens)
    t1 = time.perf_counter()
    f = sc.fit(N, D, L, name="TinyGPT family")
    fit_s = time.perf_counter() - t1
    C = float(max(sc.training_flops(n, d) for n, d in zip(N, D)))
    n_opt, d_opt = sc.compute_optimal(C, f.law)
    law = f.law
    return [{"name": "fit L(N, D)", "kind": "fit", "device": bench.device_name(), "n_runs": len(runs),
             "n_points": f.n_points, "min_tokens": min_tokens, "E": law.E, "A": law.A, "B": law.B,
             "alpha": law.alpha, "beta": law.beta, "objective": f.objective, "rms_log_residual": f.rms_log_residual,
             "max_flops": C, "opt_params": n_opt, "opt_tokens": d_opt, "opt_tokens_per_param": d_opt / n_opt,
             "train_s": train_s, "fit_s": fit_s}]


def run(quick: bool = False, *, runs: list | None = None) -> list[dict]:
    """Throughput of every width side by side, then the fit (on `runs` if given, else trained here)."""
    s = settings(quick)
    if runs is not None:  # time the widths (and depth) of the runs given
        s["widths"] = list(dict.fromkeys(r.width for r in runs))
        s["n_layer"] = runs[0].n_layer
    return throughput_rows(s) + fit_rows(s, runs)

