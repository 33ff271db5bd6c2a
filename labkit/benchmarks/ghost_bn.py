"""Benchmarks and experiments of chapter 08-ghost-bn: ghost batch norm against nn.BatchNorm, side by side.

1. kind "timing": forward+backward of GhostBatchNorm at several ghost batch sizes against
   nn.BatchNorm on the same input (baseline_ms; ratio = baseline / median: below 1 means
   slower than BatchNorm), for a (N, C) activation after a linear layer and a (N, C, H, W)
   one after a convolution, plus the naive implementation (one F.batch_norm call per ghost
   batch, loop_ms) that labkit's folded one replaces.
2. kind "generalization" (full run only): the large-batch generalization gap on a small
   synthetic vision task (`labkit.datasets.image_task`): the same MLP with batch norm trained for the same
   number of epochs with a small batch, with a large batch (at Hoffer et al.'s sqrt-scaled
   learning rate and at the best one of a sweep), and with the large batch and ghost batch
   norm at several ghost sizes; test accuracy and loss, mean and spread over seeds. Kind
   "lr_sweep" holds the sweep behind the learning rates in `settings`.

The synthetic task (`image_task`) lives in labkit.datasets.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit import _checks, bench, runtime
from labkit.datasets import ImageTask, image_task
from labkit.train import ghost_bn as gbn

# --- the model and one training run --------------------------------------------------------


def make_model(in_features: int, classes: int, width: int = 128, depth: int = 2,
               ghost_batch_size: int | None = None) -> nn.Sequential:
    """Flatten -> depth x (Linear without bias -> BatchNorm1d -> ReLU) -> Linear; with
    `ghost_batch_size` the batch norms become GhostBatchNorm1d (convert_to_ghost_batchnorm)."""
    who = "make_model"
    d = _checks.integer(who, "in_features", in_features, low=1)
    width = _checks.integer(who, "width", width, low=1)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(_checks.integer(who, "depth", depth, low=1)):
        layers += [nn.Linear(d, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, _checks.integer(who, "classes", classes, low=2)))
    model = nn.Sequential(*layers)
    if ghost_batch_size is not None:
        model = gbn.convert_to_ghost_batchnorm(model, ghost_batch_size)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` in eval mode on (x, y); training mode restored."""
    was = model.training
    model.eval()
    try:
        logits = model(x)  # (n, classes)
        return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()
    finally:
        model.train(was)


def train_run(task: ImageTask, batch_size: int, lr: float, *, epochs: int = 30, width: int = 128,
              ghost_batch_size: int | None = None, momentum: float = 0.9, seed: int = 0,
              progress: bool = False, desc: str | None = None) -> dict:
    """Train a fresh seeded model with SGD (momentum, cosine-decayed lr, no weight decay) for
    `epochs` passes over the training set in shuffled batches (the last partial batch dropped).

    Returns the final train/test/validation accuracy and loss (eval mode), the test accuracy
    after every epoch, the number of steps, the wall time and the model.
    """
    from tqdm.auto import tqdm

    who = "train_run"
    n = task.x_train.shape[0]
    batch_size = _checks.integer(who, "batch_size", batch_size, low=1)
    if batch_size > n:
        raise ValueError(f"{who}: batch_size must be <= the training set size {n}, got {batch_size}")
    lr = _checks.number(who, "lr", lr, low=0.0, low_open=True)
    epochs = _checks.integer(who, "epochs", epochs, low=1)
    dev = runtime.device()
    runtime.seed_everything(seed)
    model = make_model(task.x_train[0].numel(), task.classes, width, ghost_batch_size=ghost_batch_size).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    per_epoch = n // batch_size
    total = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    x_train, y_train = task.x_train.to(dev), task.y_train.to(dev)
    x_test, y_test = task.x_test.to(dev), task.y_test.to(dev)
    order = torch.Generator().manual_seed(seed + 1)  # the data order
    if desc is None:
        desc = f"B={batch_size}" + (f", G={ghost_batch_size}" if ghost_batch_size else "")
    curve = []  # test accuracy after each epoch
    t0 = time.perf_counter()
    for _ in tqdm(range(epochs), desc=desc, leave=False, disable=not progress):
        perm = torch.randperm(n, generator=order).to(dev)
        for i in range(per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        curve.append(evaluate(model, x_test, y_test)[0])
    seconds = time.perf_counter() - t0
    train_acc, train_loss = evaluate(model, x_train, y_train)
    test_acc, test_loss = evaluate(model, x_test, y_test)
    val_acc, val_loss = evaluate(model, task.x_val.to(dev), task.y_val.to(dev))
    return dict(batch_size=batch_size, lr=lr, ghost_batch_size=ghost_batch_size, epochs=epochs, steps=total,
                train_acc=train_acc, train_loss=train_loss, test_acc=test_acc, test_loss=test_loss,
                val_acc=val_acc, val_loss=val_loss, test_acc_curve=curve, seconds=seconds, model=model)


# --- settings ------------------------------------------------------------------------------


def settings(quick: bool = False) -> dict:
    """Task, model and run settings for the current size profile.

    The learning rates are the best validation accuracy of a sweep on the CPU profile over 3
    seeds (the full run repeats it): small batch {0.025, 0.05, 0.1} -> 0.05; large batch
    {0.2, 0.4, 0.8, 1.6} -> 0.8 (with and without ghost batch norm). sqrt_lr is Hoffer et al.'s rule,
    small_lr * sqrt(large_batch / small_batch) = 0.2.
    """
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    gpu = runtime.on_gpu()
    s = dict(n_train=2048, n_test=4096, n_val=2048, epochs=30, width=128, small_batch=32, large_batch=512,
             small_lr=0.05, large_lr=0.8,
             ghost_sizes=(4, 8, 32, 128) if quick else (2, 4, 8, 16, 32, 64, 128),
             seeds=((0, 1, 2) if gpu else (0,)) if quick else ((0, 1, 2, 3, 4) if gpu else (0, 1, 2)),
             lr_sweep={} if quick else {"small": (0.025, 0.05, 0.1), "large": (0.2, 0.4, 0.8, 1.6),
                                        "ghost": (0.2, 0.4, 0.8, 1.6)}, sweep_ghost_size=32)
    s["sqrt_lr"] = s["small_lr"] * math.sqrt(s["large_batch"] / s["small_batch"])
    if gpu:
        s["timing"] = dict(linear=(8192, 1024), conv=(256, 64, 56, 56),
                           ghost_sizes=(256, 64, 32, 16, 8) if quick else (1024, 256, 128, 64, 32, 16, 8))
    else:
        s["timing"] = dict(linear=(512, 256), conv=(64, 32, 16, 16),
                           ghost_sizes=(128, 32, 8) if quick else (256, 128, 64, 32, 16, 8))
    return s


def plan(s: dict) -> list[tuple[str, int, float, int | None]]:
    """(label, batch size, lr, ghost batch size) of every run of the experiment."""
    sb, lb = s["small_batch"], s["large_batch"]
    runs = [(f"small batch {sb}", sb, s["small_lr"], None),
            (f"large batch {lb}, sqrt-scaled lr", lb, s["sqrt_lr"], None),
            (f"large batch {lb}", lb, s["large_lr"], None)]
    runs += [(f"large batch {lb} + ghost BN {g}", lb, s["large_lr"], g) for g in s["ghost_sizes"]]
    return runs


def sweep_plan(s: dict) -> list[tuple[str, int, float, int | None]]:
    """The learning-rate sweep behind settings()' choices (empty in quick runs)."""
    sb, lb, g = s["small_batch"], s["large_batch"], s["sweep_ghost_size"]
    sweep = s["lr_sweep"]
    return ([(f"lr sweep: small batch {sb}", sb, lr, None) for lr in sweep.get("small", ())]
            + [(f"lr sweep: large batch {lb}", lb, lr, None) for lr in sweep.get("large", ())]
            + [(f"lr sweep: large batch {lb} + ghost BN {g}", lb, lr, g) for lr in sweep.get("ghost", ())])


# --- the rows -----------------------------------------------------------------------------


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def generalization_rows(quick: bool = False, *, progress: bool = True) -> list[dict]:
    """Every configuration of `plan` (and `sweep_plan`) for every seed: one row per configuration
    with the mean and std over seeds. A configuration in both is trained once."""
    from tqdm.auto import tqdm

    s = settings(quick)
    task = image_task(s["n_train"], s["n_test"], n_val=s["n_val"])
    device = bench.device_name()
    labelled = [(label, "generalization", cfg) for label, *cfg in plan(s)]
    labelled += [(label, "lr_sweep", cfg) for label, *cfg in sweep_plan(s)]
    configs = list(dict.fromkeys(tuple(cfg) for _, _, cfg in labelled))  # unique (batch, lr, ghost)
    todo = [(cfg, seed) for cfg in configs for seed in s["seeds"]]
    results: dict[tuple, list[dict]] = {}
    for (b, lr, g), seed in tqdm(todo, desc="generalization runs", leave=False, disable=not progress):
        r = train_run(task, b, lr, epochs=s["epochs"], width=s["width"], ghost_batch_size=g, seed=seed)
        results.setdefault((b, lr, g), []).append(r)
    rows = []
    for label, kind, (b, lr, g) in labelled:
        rs = results[(b, lr, g)]

        def mean(key):
            return statistics.fmean(r[key] for r in rs)

        rows.append({
            "name": f"{label} (lr {lr:g})" if kind == "lr_sweep" else label, "kind": kind, "device": device,
            "batch_size": b, "lr": lr, "ghost_batch_size": g or b, "epochs": s["epochs"], "steps": rs[0]["steps"],
            "seeds": len(rs), "test_acc": mean("test_acc"), "test_acc_std": _spread([r["test_acc"] for r in rs]),
            "test_loss": mean("test_loss"), "val_acc": mean("val_acc"), "val_loss": mean("val_loss"),
            "train_acc": mean("train_acc"), "train_loss": mean("train_loss"), "seconds": mean("seconds"),
        })
    return rows


def naive_ghost_batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, ghost_batch_size: int) -> torch.Tensor:
    """The obvious implementation: one nn.BatchNorm call per ghost batch, outputs concatenated
    (same split and same running-statistics updates as GhostBatchNorm)."""
    sizes = gbn.ghost_batch_sizes(x.shape[0], ghost_batch_size, max(math.prod(x.shape[2:]), 1))
    return torch.cat([bn(chunk) for chunk in x.split(sizes)])


def timing_rows(quick: bool = False) -> list[dict]:
    """Forward+backward time of GhostBatchNorm at several ghost sizes against nn.BatchNorm."""
    s = settings(quick)["timing"]
    dev, device = runtime.device(), bench.device_name()
    repeats = 10 if quick else 30
    gen = torch.Generator().manual_seed(0)
    rows = []
    for layout, bn_cls, gbn_cls in (("linear", nn.BatchNorm1d, gbn.GhostBatchNorm1d),
                                    ("conv", nn.BatchNorm2d, gbn.GhostBatchNorm2d)):
        shape = s[layout]
        N, C = shape[0], shape[1]
        x = torch.randn(*shape, generator=gen).to(dev).requires_grad_()
        grad = torch.randn(*shape, generator=gen).to(dev)

        def step(module):
            def fn():
                x.grad = None
                module(x).backward(grad)
            return fn

        bn = bn_cls(C).to(dev)
        base = bench.timeit(step(bn), warmup=3, repeats=repeats)
        for g in (N,) + tuple(g for g in s["ghost_sizes"] if g < N):
            layer = gbn_cls(C, g).to(dev)
            t = bench.timeit(step(layer), warmup=3, repeats=repeats)
            naive_bn = bn_cls(C).to(dev)

            def naive(g=g, naive_bn=naive_bn):
                x.grad = None
                naive_ghost_batch_norm(x, naive_bn, g).backward(grad)

            loop = bench.timeit(naive, warmup=2, repeats=max(3, repeats // 3))
            rows.append({
                "name": f"{layout} {tuple(shape)} G={g}", "kind": "timing", "layout": layout, "shape": list(shape),
                "ghost_batch_size": g, "ghost_batches": len(gbn.ghost_batch_sizes(N, g)), "device": device,
                "median_ms": t.median_ms, "baseline_ms": base.median_ms, "ratio": base.median_ms / t.median_ms,
                "loop_ms": loop.median_ms,
            })
    return rows


def run(quick: bool = False) -> list[dict]:
    """The chapter's benchmarks on the current device: timings, and (quick=False) the training
    runs of every configuration over several seeds plus the learning-rate sweep. quick=True
    times only: the notebook's experiments already train the quick configurations."""
    return timing_rows(quick) + ([] if quick else generalization_rows(quick))


__all__ = ["evaluate", "generalization_rows", "make_model", "naive_ghost_batch_norm",
           "plan", "run", "settings", "sweep_plan", "timing_rows", "train_run"]
