"""A minimal training loop for the course's small models (nanoGPT's train.py, reduced).

One step: forward on a batch (x, y), mean cross-entropy, backward, optional gradient-norm
clipping, optimizer step. Losses stay on the device and are read back only every
`log_every` steps (for the progress bar) and once at the end, so the loop does not force a
GPU synchronisation per step. The default optimizer is plain AdamW; the optimizer chapters
pass their own.

Deterministic on the CPU when the model, the batch iterator and the optimizer are built
after `labkit.runtime.seed_everything(seed)` (or from explicit seeds).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # one per step
    tokens: int = 0  # tokens seen (sum of x.numel())
    seconds: float = 0.0  # wall time of the loop

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def smoothed(self, window: int = 10) -> float:
        """Mean of the last `window` losses."""
        if not self.losses:
            raise ValueError("TrainLog.smoothed: no losses recorded")
        tail = self.losses[-window:]
        return sum(tail) / len(tail)


def _loss_of(out) -> torch.Tensor:
    """TinyGPT returns (logits, loss); accept a bare loss tensor as well."""
    loss = out[1] if isinstance(out, tuple) else out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("train: model(x, y) must return (logits, loss) or a scalar loss tensor")
    return loss


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    device: str | torch.device | None = None,
    progress: bool = True,
    log_every: int = 10,
    grad_clip: float | None = 1.0,
) -> TrainLog:
    """Train `model` for `steps` steps on batches (x, y) and return the per-step losses.

    optimizer: default AdamW(lr, betas=(0.9, 0.99), weight_decay=0) (nanoGPT's char-level
    Shakespeare settings). device: default the model's device (the model is moved there
    otherwise). grad_clip: max global gradient norm, None to disable.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"train: steps must be an int >= 1, got {steps!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"train: log_every must be an int >= 1, got {log_every!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"train: grad_clip must be None or > 0, got {grad_clip!r}")
    if device is None:
        device = _model_device(model)
    else:
        device = torch.device(device)
        model.to(device)
    if optimizer is None:
        if not lr > 0:
            raise ValueError(f"train: lr must be > 0, got {lr!r}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)

    it = iter(batches)
    log = TrainLog()
    losses: list[torch.Tensor] = []  # kept on the device: no sync per step
    model.train()
    bar = tqdm(range(steps), desc="train", disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        try:
            x, y = next(it)
        except StopIteration:
            raise ValueError(f"train: batches ran out after {step} of {steps} steps") from None
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = _loss_of(model(x, y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.detach())
        log.tokens += x.numel()
        if progress and ((step + 1) % log_every == 0 or step + 1 == steps):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log.seconds = time.perf_counter() - t0
    log.losses = torch.stack(losses).float().cpu().tolist()
    bar.close()
    return log


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int = 20) -> float:
    """Mean loss of `model` over the next n batches, in eval mode (training mode restored)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"evaluate: n must be an int >= 1, got {n!r}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    it = iter(batches)
    total = torch.zeros((), device=device)
    try:
        for i in range(n):
            try:
                x, y = next(it)
            except StopIteration:
                raise ValueError(f"evaluate: batches ran out after {i} of {n} batches") from None
            total += _loss_of(model(x.to(device), y.to(device))).float()
    finally:
        model.train(was_training)
    return (total / n).item()
