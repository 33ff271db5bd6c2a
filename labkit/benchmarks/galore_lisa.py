"""Benchmarks of chapter 06-galore-lisa: AdamW vs GaLoreAdamW vs LISA on the same TinyGPT.

One run trains the same model (same seed, same batches of the character-level Shakespeare
corpus, same number of steps) three times: full AdamW (the baseline), GaLoreAdamW on the
blocks' matrices, and AdamW under LISA. Each result carries the step time (median and mean of
every timed step: the mean includes GaLore's SVD steps), the baseline's median and
ratio = baseline_ms / median_ms (> 1: faster than AdamW), the optimizer state measured at its
largest (labkit.optim.memory.state_bytes; state_ratio to AdamW's), the trainable parameters,
the training loss at the end (mean of the last 10 steps), the validation loss and, on a GPU,
the peak memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from labkit import bench, datasets, runtime
from labkit.models import GPTConfig, TinyGPT, evaluate
from labkit.optim.galore import GaLoreAdamW, galore_param_groups
from labkit.optim.lisa import LISA
from labkit.optim.memory import state_bytes

METHODS = ("AdamW", "GaLoreAdamW", "LISA")


@dataclass(frozen=True)
class Setup:
    """Model, data and optimizer sizes of one comparison."""

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int
    steps: int
    warmup: int
    lr: float  # AdamW's, LISA's, and GaLore's non-matrix parameters'
    galore_lr: float  # GaLore's matrices (times scale)
    rank: int
    update_proj_gap: int
    scale: float
    lisa_active: int
    lisa_interval: int


def setup(quick: bool = False) -> Setup:
    """The sizes for the current profile (quick: a smoke-sized run)."""
    if not isinstance(quick, bool):
        raise TypeError(f"setup: quick must be a bool, got {type(quick).__name__}")
    if runtime.on_gpu():
        return Setup(n_layer=8, n_embd=512, n_head=8, block_size=256, batch_size=32,
                     steps=120 if quick else 600, warmup=10, lr=1e-3, galore_lr=1e-2, rank=128,
                     update_proj_gap=50 if quick else 200, scale=0.25, lisa_active=2, lisa_interval=20)
    if quick:
        return Setup(n_layer=4, n_embd=32, n_head=4, block_size=32, batch_size=8, steps=24, warmup=3, lr=3e-3,
                     galore_lr=1e-2, rank=8, update_proj_gap=10, scale=0.25, lisa_active=1, lisa_interval=6)
    return Setup(n_layer=4, n_embd=48, n_head=4, block_size=64, batch_size=12, steps=120, warmup=3, lr=3e-3,
                 galore_lr=1e-2, rank=8, update_proj_gap=40, scale=0.25, lisa_active=1, lisa_interval=20)


def config(s: Setup, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
                     block_size=s.block_size)


def build(method: str, model: torch.nn.Module, s: Setup) -> tuple[torch.optim.Optimizer, LISA | None]:
    """The optimizer of `method` for `model` (and LISA's sampler, attached to it, for "LISA")."""
    if method == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0), None
    if method == "GaLoreAdamW":
        groups = galore_param_groups(model, rank=s.rank, update_proj_gap=s.update_proj_gap, scale=s.scale, lr=s.lr)
        return GaLoreAdamW(groups, lr=s.galore_lr, betas=(0.9, 0.99), rank=None, update_proj_gap=s.update_proj_gap,
                           scale=s.scale), None
    if method == "LISA":
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
        return opt, LISA(model, s.lisa_active, s.lisa_interval, seed=0, optimizer=opt)
    raise ValueError(f"build: method must be one of {METHODS}, got {method!r}")


def run_one(method: str, s: Setup, *, seed: int = 0) -> dict:
    """Train one method for s.steps steps, timing each one; return its result row."""
    dev = runtime.device()
    train_data, val_data = datasets.token_dataset("char", "train"), datasets.token_dataset("char", "val")
    vocab = datasets.get_tokenizer("char").vocab_size
    torch.manual_seed(seed)
    model = TinyGPT(config(s, vocab)).to(dev)
    opt, lisa = build(method, model, s)
    batches = datasets.batches(train_data, s.batch_size, s.block_size, seed=seed + 1, device=dev)
    losses: list[torch.Tensor] = []
    peak_state = 0

    def train_step() -> None:
        nonlocal peak_state
        x, y = next(batches)
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()  # LISA re-samples in its post-step hook
        losses.append(loss.detach())
        peak_state = max(peak_state, state_bytes(opt))

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timing = bench.timeit(train_step, warmup=s.warmup, repeats=s.steps - s.warmup, device=dev)
    train_losses = torch.stack(losses).float().cpu().tolist()
    val = evaluate(model, datasets.batches(val_data, s.batch_size, s.block_size, seed=seed + 2, device=dev), n=10)
    chunk = math.ceil(len(train_losses) / 100)
    trainable = lisa.n_trainable() if lisa is not None else sum(p.numel() for p in model.parameters())
    return {
        "name": method,
        "device": timing.device,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": trainable,
        "steps": s.steps,
        "tokens": s.steps * s.batch_size * s.block_size,
        "median_ms": timing.median_ms,
        "mean_ms": 1e3 * sum(timing.times) / len(timing.times),
        "state_bytes": peak_state,
        "final_loss": sum(train_losses[-10:]) / len(train_losses[-10:]),
        "val_loss": val,
        "peak_mem_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        "loss_every": chunk,
        "losses": [sum(train_losses[i:i + chunk]) / len(train_losses[i:i + chunk])
                   for i in range(0, len(train_losses), chunk)],  # at most 100 points: records stay readable
    }


def run(quick: bool = False) -> list[dict]:
    """AdamW (baseline), GaLoreAdamW and LISA side by side on the same model, data and budget."""
    from tqdm.auto import tqdm

    s = setup(quick)
    rows = [run_one(m, s) for m in tqdm(METHODS, desc="06-galore-lisa benchmarks", leave=False)]
    base = rows[0]
    for r in rows:
        r["baseline_ms"] = base["median_ms"]
        r["ratio"] = base["median_ms"] / r["median_ms"]
        r["state_ratio"] = r["state_bytes"] / base["state_bytes"]
        r["setup"] = asdict(s)
        if not math.isfinite(r["final_loss"]):
            raise RuntimeError(f"{r['name']}: the training loss diverged ({r['final_loss']})")
    return rows


__all__ = ["METHODS", "Setup", "build", "config", "run", "run_one", "setup"]
