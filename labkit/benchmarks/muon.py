"""Benchmarks of chapter 05-muon: Muon (+ AdamW for the rest) against plain AdamW, side by side.

1. kind "optimizer": the same TinyGPT trained on the char Shakespeare corpus with the same
   batches, steps and tokens by AdamW (the baseline) and by MuonWithAdamW; each row holds the
   optimizer step's median time (median_ms, baseline_ms = AdamW's, ratio = baseline / median:
   below 1 means slower than AdamW), the forward+backward time of one step for scale, the
   optimizer state in bytes, the Newton-Schulz GFLOPs per step, and the train/validation loss
   at the end of the budget. The full run (quick=False) first sweeps a small lr grid per
   optimizer (kind "sweep") and compares the best of each.
2. kind "ns_vs_svd": newton_schulz on one matrix (bf16 on a GPU, float32 on a CPU) against the
   exact polar factor U V^T from torch.linalg.svd (float32), with the NS result's distance to
   it and its singular-value range.
"""

from __future__ import annotations

import torch

from labkit import bench, datasets, runtime
from labkit.benchmarks import char_gpt
from labkit.models import TinyGPT, evaluate, train
from labkit.optim import muon as mu
from labkit.optim.memory import state_bytes

ADAMW_BETAS = (0.9, 0.95)


def settings(quick: bool = False) -> dict:
    """Model, data and lr settings for the current size profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    if runtime.on_gpu():
        s = dict(n_layer=6, n_embd=384, n_head=6, block_size=256, batch_size=64, steps=300 if quick else 1000,
                 adamw_lrs=(1e-3,) if quick else (1e-3, 3e-3), muon_lrs=(0.02,) if quick else (0.01, 0.02, 0.04),
                 sizes=[(1024, 1024), (2048, 2048), (4096, 4096), (1024, 4096)] if quick else
                 [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096), (1024, 4096), (4096, 16384)])
    else:
        s = dict(n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=16, steps=10 if quick else 150,
                 adamw_lrs=(3e-3,) if quick else (1e-3, 3e-3, 1e-2), muon_lrs=(0.02,) if quick else (0.01, 0.02, 0.05),
                 sizes=[(64, 64), (128, 128), (64, 256)] if quick else [(64, 64), (128, 128), (256, 256), (128, 512)])
    s["adamw_aux_lr"] = 3e-3 if not runtime.on_gpu() else 1e-3  # AdamW part of Muon: embeddings, head, norms
    return s


def make_optimizer(name: str, model: TinyGPT, lr: float, s: dict) -> torch.optim.Optimizer:
    """'AdamW' (every parameter) or 'Muon' (MuonWithAdamW: Muon on hidden matrices, AdamW on the rest)."""
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAMW_BETAS, weight_decay=0.0)
    if name == "Muon":
        return mu.MuonWithAdamW.from_model(model, lr=lr, adamw_lr=s["adamw_aux_lr"], adamw_betas=ADAMW_BETAS)
    raise ValueError(f"make_optimizer: name must be 'AdamW' or 'Muon', got {name!r}")


def train_run(name: str, lr: float, s: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """Train a fresh seeded TinyGPT with one optimizer; returns the model, optimizer, log and losses."""
    dev = runtime.device()
    data = datasets.token_dataset("char", "train")
    val = datasets.token_dataset("char", "val")
    model = char_gpt(seed=seed, device=dev, block_size=s["block_size"], n_layer=s["n_layer"], n_embd=s["n_embd"],
                     n_head=s["n_head"])
    opt = make_optimizer(name, model, lr, s)
    log = train(model, datasets.batches(data, s["batch_size"], s["block_size"], seed=seed, device=dev), s["steps"],
                optimizer=opt, progress=progress)
    val_loss = evaluate(model, datasets.batches(val, s["batch_size"], s["block_size"], seed=1234, device=dev), n=10)
    return dict(name=name, lr=lr, model=model, optimizer=opt, log=log, train_loss=log.smoothed(10), val_loss=val_loss)


def _step_timings(run: dict, s: dict, repeats: int) -> tuple[float, float]:
    """(optimizer.step ms, forward+backward ms) on one batch, medians."""
    model, opt, dev = run["model"], run["optimizer"], runtime.device()
    x, y = next(datasets.batches(datasets.token_dataset("char", "train"), s["batch_size"], s["block_size"],
                                 seed=7, device=dev))

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()

    fb = bench.timeit(fwd_bwd, warmup=2, repeats=repeats)
    fwd_bwd()  # leave gradients for the step
    st = bench.timeit(opt.step, warmup=2, repeats=repeats)
    return st.median_ms, fb.median_ms


def ns_gflops_per_step(model: torch.nn.Module, ns_steps: int = 5) -> float:
    """Newton-Schulz GFLOPs of one Muon step over the model's Muon parameters."""
    muon_params, _ = mu.split_muon_params(model)
    return sum(mu.newton_schulz_flops(*p.shape, steps=ns_steps) for p in muon_params) / 1e9


def optimizer_rows(quick: bool = False, *, progress: bool = True) -> list[dict]:
    """Sweep (full run only) and the side-by-side AdamW vs Muon rows."""
    from tqdm.auto import tqdm

    s = settings(quick)
    plan = [("AdamW", lr) for lr in s["adamw_lrs"]] + [("Muon", lr) for lr in s["muon_lrs"]]
    runs = [train_run(n, lr, s) for n, lr in tqdm(plan, desc="AdamW vs Muon", leave=False, disable=not progress)]
    rows = []
    best = {}
    for r in runs:
        if r["name"] not in best or r["val_loss"] < best[r["name"]]["val_loss"]:
            best[r["name"]] = r
        if not quick:
            rows.append({"name": f"sweep: {r['name']} lr={r['lr']:g}", "kind": "sweep", "optimizer": r["name"],
                         "lr": r["lr"], "train_loss": r["train_loss"], "val_loss": r["val_loss"]})
    repeats = 5 if quick else 20
    timings = {n: _step_timings(best[n], s, repeats) for n in ("AdamW", "Muon")}
    base_ms, base_state = timings["AdamW"][0], state_bytes(best["AdamW"]["optimizer"])
    device = bench.device_name()
    for n in ("AdamW", "Muon"):
        r, (step_ms, fb_ms) = best[n], timings[n]
        model = r["model"]
        muon_p, adamw_p = mu.split_muon_params(model)
        rows.append({
            "name": f"{n} step (lr={r['lr']:g})", "kind": "optimizer", "optimizer": n, "device": device,
            "model": f"TinyGPT L{s['n_layer']} d{s['n_embd']}", "params": model.num_params(),
            "muon_params": sum(p.numel() for p in muon_p) if n == "Muon" else 0,
            "steps": s["steps"], "tokens": r["log"].tokens,
            "median_ms": step_ms, "baseline_ms": base_ms, "ratio": base_ms / step_ms, "fwd_bwd_ms": fb_ms,
            "state_bytes": state_bytes(r["optimizer"]), "baseline_state_bytes": base_state,
            "ns_gflop_per_step": ns_gflops_per_step(model) if n == "Muon" else 0.0,
            "train_loss": r["train_loss"], "val_loss": r["val_loss"],
        })
    return rows


def ns_vs_svd_rows(quick: bool = False) -> list[dict]:
    """newton_schulz vs the SVD polar factor on random Gaussian matrices of several shapes."""
    s = settings(quick)
    dev, device = runtime.device(), bench.device_name()
    dtype = mu.default_ns_dtype(torch.empty(0, device=dev))
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for m, n in s["sizes"]:
        G = torch.randn(m, n, generator=gen).to(dev)  # (m, n)
        big = max(m, n) >= 4096
        ns = bench.timeit(lambda: mu.newton_schulz(G), warmup=2, repeats=5 if big else 10)
        svd = bench.timeit(lambda: mu.polar_factor(G), warmup=1, repeats=3 if big else 5)
        O, P = mu.newton_schulz(G).float(), mu.polar_factor(G)
        sv = torch.linalg.svdvals(O)
        flops = mu.newton_schulz_flops(m, n)
        rows.append({
            "name": f"NS vs SVD {m}x{n}", "kind": "ns_vs_svd", "m": m, "n": n,
            "dtype": str(dtype).replace("torch.", ""),
            "device": device, "median_ms": ns.median_ms, "baseline_ms": svd.median_ms,
            "ratio": svd.median_ms / ns.median_ms, "ns_gflop": flops / 1e9, "ns_tflops": flops / ns.median_s / 1e12,
            "polar_rel_err": ((O - P).norm() / P.norm()).item(), "sv_min": sv.min().item(), "sv_max": sv.max().item(),
        })
    return rows


def run(quick: bool = False) -> list[dict]:
    """All of the chapter's benchmarks on the current device."""
    return optimizer_rows(quick) + ns_vs_svd_rows(quick)


__all__ = ["make_optimizer", "ns_gflops_per_step", "ns_vs_svd_rows", "optimizer_rows", "run", "settings",
           "train_run"]
