"""Benchmarks of chapter 04-lion-tiger: Lion and Tiger against AdamW on the same task and budget.

One TinyGPT (same seed, same initial weights), the char-level Shakespeare corpus, the same
batches and the same number of steps for every optimizer: torch.optim.AdamW (the baseline),
labkit's Lion and labkit's Tiger. Each row names the device and reports the median time of
one optimizer.step() (timed on the final gradients, the three optimizers taking turns; CUDA
events on a GPU), the same for AdamW (baseline_ms), ratio = baseline_ms / median_ms (> 1:
faster than AdamW), the median time of a whole training step, the bytes of the optimizer state
(labkit.optim.memory.state_bytes; state_ratio = state_bytes / AdamW's), and the final training
loss (mean of the last 10% of steps). AdamW: lr 3e-3 (CPU size) or 1e-3 (GPU size), weight decay 0.1. Lion and Tiger:
on the CPU the same lr and decay (in a run this short the best lr on a coarse grid is the same,
see the chapter); on the GPU lr/3 and weight decay 0.3 (the paper's "smaller lr, larger λ",
with the same decay per step lr·λ).
"""

from __future__ import annotations

import statistics
import time

import torch

from labkit import bench, datasets, runtime
from labkit.benchmarks import char_gpt
from labkit.optim.lion import Lion
from labkit.optim.memory import state_bytes
from labkit.optim.tiger import Tiger


def config(quick: bool = False) -> dict:
    """Model size, batch and step budget for the current profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"config: quick must be a bool, got {type(quick).__name__}")
    if runtime.on_gpu():
        model = dict(n_layer=6, n_embd=384, n_head=6, block_size=256)
        return dict(model=model, batch=64, steps=200 if quick else 1000, lr=1e-3, wd=0.1, sign_lr=1e-3 / 3,
                    sign_wd=0.3, repeats=50)
    model = dict(n_layer=1, n_embd=32, n_head=4, block_size=32)
    return dict(model=model, batch=16, steps=60 if quick else 300, lr=3e-3, wd=0.1, sign_lr=3e-3, sign_wd=0.1,
                repeats=10 if quick else 30)


def _optimizers(cfg: dict) -> dict:
    return {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=cfg["wd"]),
        "Lion": lambda ps: Lion(ps, lr=cfg["sign_lr"], betas=(0.9, 0.99), weight_decay=cfg["sign_wd"]),
        "Tiger": lambda ps: Tiger(ps, lr=cfg["sign_lr"], beta=0.965, weight_decay=cfg["sign_wd"]),
    }


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_one(name: str, make_opt, cfg: dict, dev: torch.device) -> dict:
    """Train a fresh TinyGPT with one optimizer; time its training steps; measure its state."""
    data = datasets.token_dataset("char")
    model = char_gpt(device=dev, **cfg["model"])
    opt = make_opt(model.parameters())
    it = datasets.batches(data, cfg["batch"], cfg["model"]["block_size"], seed=1, device=dev)
    losses, step_s = [], []
    for _ in range(cfg["steps"]):
        x, y = next(it)
        _sync(dev)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev)
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.detach())
    tail = torch.stack(losses[-max(1, cfg["steps"] // 10):]).float()
    return {"name": name, "device": bench.device_name(dev), "params": sum(p.numel() for p in model.parameters()),
            "steps": cfg["steps"], "lr": opt.param_groups[0]["lr"],
            "weight_decay": opt.param_groups[0]["weight_decay"],
            "train_step_ms": statistics.median(step_s[1:]) * 1e3, "state_bytes": state_bytes(opt),
            "final_loss": tail.mean().item(), "losses": [v.item() for v in torch.stack(losses).float().cpu()],
            "optimizer": opt}


def time_steps(opts: dict, *, repeats: int, rounds: int = 3, device: torch.device | None = None) -> dict:
    """Median ms of opt.step() per optimizer, on the gradients left by training (the state keeps evolving;
    the cost does not). Optimizers take turns for `rounds` rounds and each keeps the median of its
    round medians, so a burst of load on a shared machine does not land on one optimizer only."""
    per_round: dict = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            per_round[name].append(bench.timeit(opt.step, warmup=2, repeats=repeats, device=device).median_ms)
    return {name: statistics.median(v) for name, v in per_round.items()}


def run(quick: bool = False) -> list[dict]:
    """AdamW (baseline), Lion, Tiger on the same TinyGPT task: one dict per optimizer."""
    from tqdm.auto import tqdm

    cfg = config(quick)
    dev = runtime.device()
    rows = [train_one(name, make, cfg, dev) for name, make in tqdm(_optimizers(cfg).items(), desc="optimizers",
                                                                   leave=False)]
    times = time_steps({r["name"]: r["optimizer"] for r in rows}, repeats=cfg["repeats"], device=dev)
    base = rows[0]
    out = []
    for r in rows:  # the loss curve and the optimizer object stay out of the record
        out.append({"name": r["name"], "device": r["device"], "median_ms": times[r["name"]],
                    "baseline": base["name"], "baseline_ms": times[base["name"]],
                    "ratio": times[base["name"]] / times[r["name"]], "train_step_ms": r["train_step_ms"],
                    "state_bytes": r["state_bytes"], "state_ratio": r["state_bytes"] / base["state_bytes"],
                    "final_loss": r["final_loss"], "params": r["params"], "steps": r["steps"], "lr": r["lr"],
                    "weight_decay": r["weight_decay"]})
    return out


__all__ = ["config", "run", "time_steps", "train_one"]
