"""Benchmarks of chapter 09-data-order: what the shuffles cost, and what the curricula buy at a budget.

1. Throughput of the orders (labkit.train.shuffling) over n indices, side by side: storage order
   (the baseline), full shuffle, shuffle buffers of two sizes, shard shuffle, shard shuffle through a
   buffer. Each row: median_ms for one epoch of n indices (consumed as Python ints, as a loader
   would), indices_per_s, and `ratio` = its time over the storage order's. This is host (CPU) work
   whatever the accelerator.
2. Loss at a token budget (labkit.train.curriculum): a TinyGPT on the character corpus trained for
   the same number of steps and (almost) the same tokens by uniform sampling from a pool of windows
   (the baseline), by a difficulty curriculum (bigram-model loss, root pacing, c0 = 0.1, ramp over
   half the run), and by sequence-length warm-up (8 -> block_size over half the run, packed to
   the same tokens per step) against random full-length windows (its own baseline). Each row:
   val_loss on held-out windows, the baseline's, their ratio, tokens, median_ms per training step.
"""

from __future__ import annotations

import collections

import torch

from labkit import bench, datasets, runtime
from labkit.models import GPTConfig, TinyGPT
from labkit.train import curriculum as cu
from labkit.train import shuffling as sh


def config(quick: bool = False) -> dict:
    """Sizes for the current profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"config: quick must be a bool, got {type(quick).__name__}")
    if runtime.on_gpu():
        model = dict(n_layer=4, n_embd=256, n_head=4, block_size=128)
        return dict(n=2**18 if quick else 2**20, buffers=(1024, 16384), shard=4096, repeats=3 if quick else 5,
                    model=model, batch=64, steps=300 if quick else 1500, pool=32768, n_val=1024, lr=1e-3)
    model = dict(n_layer=1, n_embd=32, n_head=4, block_size=32)
    return dict(n=2**15 if quick else 2**18, buffers=(256, 4096), shard=1024, repeats=3 if quick else 5,
                model=model, batch=16, steps=80 if quick else 400, pool=4096, n_val=256, lr=3e-3)


def shuffle_throughput(n: int, *, buffers=(256, 4096), shard: int = 1024, repeats: int = 5) -> list[dict]:
    """One row per order: the time to iterate over one epoch of n indices."""
    orders = {
        "storage order": lambda: sh.sequential(n),
        "full shuffle": lambda: sh.full_shuffle(n, seed=0),
        **{f"buffer {k}": (lambda k=k: sh.buffer_shuffle(n, k, seed=0)) for k in buffers},
        f"shards of {shard}": lambda: sh.shard_shuffle(n, shard, seed=0),
        f"shards of {shard} + buffer {buffers[0]}": lambda: sh.shard_shuffle(n, shard, seed=0,
                                                                              buffer_size=buffers[0]),
    }
    rows = []
    for name, make in orders.items():
        t = bench.timeit(lambda: collections.deque(make(), maxlen=0), warmup=1, repeats=repeats, device="cpu")
        rows.append({"name": name, "kind": "shuffle", "device": t.device, "n": n, "median_ms": t.median_ms,
                     "indices_per_s": n / t.median_s})
    base = rows[0]
    for r in rows:
        r.update(baseline=base["name"], baseline_ms=base["median_ms"], ratio=r["median_ms"] / base["median_ms"])
    return rows


def _windows(data: torch.Tensor, n: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(len(data) - T - 1, (n,), generator=g)  # (n,)
    w = data[start[:, None] + torch.arange(T + 1)]  # (n, T+1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def curriculum_at_budget(cfg: dict, dev: torch.device) -> list[dict]:
    """Uniform vs difficulty curriculum, and full-length vs sequence-length warm-up, at one step budget."""
    data, val = datasets.token_dataset("char"), datasets.token_dataset("char", "val")
    V, T, B, steps = int(data.max()) + 1, cfg["model"]["block_size"], cfg["batch"], cfg["steps"]
    x, y = _windows(data, cfg["pool"], T, seed=0)
    vx, vy = _windows(val, cfg["n_val"], T, seed=1)
    scores = cu.model_loss_scores(cu.BigramLM.fit(data, V), x, y)  # (pool,)
    ramp = max(1, steps // 2)
    arms = {
        "uniform windows": (None, lambda: cu.sampled_batches(x, y, cu.uniform_sampler(len(x), B, steps, seed=1),
                                                             device=dev)),
        "curriculum (bigram loss, root)": ("uniform windows", lambda: cu.sampled_batches(
            x, y, cu.CurriculumSampler(scores, B, steps, pacing="root", c0=0.1, ramp_steps=ramp, seed=1), device=dev)),
        "full-length stream": (None, lambda: cu.seqlen_warmup_batches(data, B, T, lambda t: T, seed=1, device=dev)),
        "seq-length warm-up": ("full-length stream", lambda: cu.seqlen_warmup_batches(
            data, B, T, lambda t: cu.seqlen_at(t, start=min(8, T), end=T, ramp_steps=ramp), seed=1, device=dev)),
    }
    rows: dict[str, dict] = {}
    for name, (baseline, make) in arms.items():
        runtime.seed_everything(0)
        model = TinyGPT(GPTConfig(vocab_size=V, **cfg["model"])).to(dev)
        r = cu.train_and_evaluate(model, make(), steps, eval_x=vx, eval_y=vy, eval_every=steps, lr=cfg["lr"])
        rows[name] = {"name": name, "kind": "curriculum", "device": bench.device_name(dev), "steps": steps,
                      "tokens": r["tokens"][-1], "val_loss": r["val"][-1], "median_ms": 1e3 * r["seconds"] / steps,
                      "baseline": baseline or name}
    for r in rows.values():
        base = rows[r["baseline"]]
        r.update(baseline_val_loss=base["val_loss"], ratio=r["val_loss"] / base["val_loss"],
                 baseline_ms=base["median_ms"])
    return list(rows.values())


def run(quick: bool = False) -> list[dict]:
    """The shuffles' throughput and the curricula's loss at a budget, each beside its baseline."""
    cfg = config(quick)
    rows = shuffle_throughput(cfg["n"], buffers=cfg["buffers"], shard=cfg["shard"], repeats=cfg["repeats"])
    rows += curriculum_at_budget(cfg, runtime.device())
    return rows


def speedup_summary(rows: list[dict]) -> str:
    """A line per shuffle row: indices/s and the slowdown against the storage order."""
    out = []
    for r in rows:
        if r.get("kind") == "shuffle":
            out.append(f"{r['name']:32s} {r['indices_per_s'] / 1e6:7.2f} M indices/s  ({r['ratio']:.1f}x the time "
                       f"of the storage order)")
    return "\n".join(out) if out else "no shuffle rows"


__all__ = ["config", "curriculum_at_budget", "run", "shuffle_throughput", "speedup_summary"]
