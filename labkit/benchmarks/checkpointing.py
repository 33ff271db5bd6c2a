"""Benchmarks of chapter 11-checkpointing: how long a save blocks training, synchronous vs asynchronous.

For each model size (a TinyGPT with torch.optim.AdamW after one step, on this machine's device; the
state is `training_state`: weights, both Adam moments, RNG states) the same state is saved with the
crash-safe protocol of labkit.train.checkpoint into a temporary directory, keep_last=2:

- "sync save": `save(...)`; median_ms is the time the call blocks (= the whole save).
- "async save": `AsyncCheckpointer.save(...)` with reused host buffers; median_ms is the time until
  the trainer may continue: the call, plus on a GPU a device synchronisation so the device-to-host
  copies of the snapshot are counted (later kernels queue behind them); snapshot_ms is the copy
  alone; persist_ms is the time until the background write is done.

baseline_ms is the sync save's median in the same run; ratio = baseline_ms / median_ms (how many
times less the trainer is blocked). state_mb = snapshot_mb: the host memory one snapshot takes.
step_ms is one training step of the same model, for scale: blocked_steps = median_ms / step_ms is
the cost of one save in training steps.
The directory is on the machine's temporary file system (`fs` names it): fsync costs differ.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

import torch

from labkit import bench, runtime
from labkit.models import GPTConfig, TinyGPT
from labkit.train import checkpoint as ck


def _configs(quick: bool) -> list[dict]:
    cpu = [dict(n_layer=2, n_embd=256, n_head=4)]
    if not quick:
        cpu += [dict(n_layer=4, n_embd=384, n_head=6), dict(n_layer=4, n_embd=512, n_head=8)]
    gpu = [dict(n_layer=6, n_embd=768, n_head=12)]
    if not quick:
        gpu += [dict(n_layer=12, n_embd=1024, n_head=16), dict(n_layer=24, n_embd=1536, n_head=16)]
    return runtime.pick(cpu=cpu, gpu=gpu)


def _filesystem(path: str) -> str:
    """The type of the file system holding `path` (from /proc/mounts; '?' elsewhere)."""
    try:
        best, kind = "", "?"
        for line in open("/proc/mounts").read().splitlines():
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
        return kind
    except OSError:
        return "?"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _training_setup(config: dict, dev: torch.device, B: int, T: int):
    runtime.seed_everything(0)
    model = TinyGPT(GPTConfig(vocab_size=256, block_size=T, **config)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (B, T), device=dev)

    def step():
        loss = model(x, x)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, opt, step


def run(quick: bool = False) -> list[dict]:
    """Blocked time per save, sync vs async, at a few model sizes, on this machine's device."""
    if not isinstance(quick, bool):
        raise TypeError(f"run: quick must be a bool, got {type(quick).__name__}")
    dev = runtime.device()
    B, T = runtime.pick(cpu=(4, 32), gpu=(8, 256))
    repeats = 2 if quick else runtime.pick(cpu=3, gpu=5)
    device_name = bench.device_name(dev)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="labkit-ckpt-bench-") as root:
        fs = _filesystem(root)
        for i, config in enumerate(_configs(quick)):
            model, opt, step = _training_setup(config, dev, B, T)
            step_ms = bench.timeit(step, warmup=1, repeats=2 if quick else 3, device=dev).median_ms
            state = ck.training_state(model, opt, data_position=0)
            mb = ck.state_nbytes(state) / 1e6
            directory = f"{root}/model-{i}"
            n = iter(range(10**6))
            sync = bench.timeit(lambda: ck.save(state, directory, next(n), keep_last=2), warmup=1,
                                repeats=repeats, device=torch.device("cpu"))
            blocked, persist, snap = [], [], []
            with ck.AsyncCheckpointer(reuse_buffers=True) as saver:
                for r in range(repeats + 1):                 # the first allocates the buffers: not timed
                    _sync(dev)
                    t0 = time.perf_counter()
                    future = saver.save(state, directory, next(n), keep_last=2)
                    _sync(dev)
                    t1 = time.perf_counter()
                    future.result()
                    t2 = time.perf_counter()
                    if r:
                        blocked.append(t1 - t0)
                        persist.append(t2 - t0)
                        snap.append(saver.last_snapshot_s)
            name = f"{config['n_layer']}x{config['n_embd']}"
            common = dict(model=name, params=sum(p.numel() for p in model.parameters()), state_mb=mb,
                          step_ms=step_ms, device=device_name, fs=fs)
            rows.append(dict(name="sync save", **common, median_ms=sync.median_ms, baseline_ms=sync.median_ms,
                             ratio=1.0, persist_ms=sync.median_ms, snapshot_ms=None, snapshot_mb=0.0,
                             blocked_steps=sync.median_ms / step_ms))
            async_ms = statistics.median(blocked) * 1e3
            rows.append(dict(name="async save", **common, median_ms=async_ms, baseline_ms=sync.median_ms,
                             ratio=sync.median_ms / async_ms, persist_ms=statistics.median(persist) * 1e3,
                             snapshot_ms=statistics.median(snap) * 1e3, snapshot_mb=mb,
                             blocked_steps=async_ms / step_ms))
            del model, opt, state
            shutil.rmtree(directory, ignore_errors=True)   # the largest GPU sizes write GBs per save
    return rows


__all__ = ["run"]
