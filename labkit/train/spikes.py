"""Loss spikes: a streaming detector, per-layer gradient-norm traces, and a harness that provokes them.

A loss spike is a sudden rise of the training loss well above its recent level, which then
recovers (or does not: divergence). Reported at scale by A. Chowdhery et al., "PaLM: Scaling
Language Modeling with Pathways", 2022 (about 20 spikes in the 540B run despite gradient
clipping; their fix: restart from a checkpoint ~100 steps before the spike and skip ~200-500
batches; the same batches did not spike from another state, so neither data nor state alone
causes them). I. Molybog et al., "A Theory on Adam Instability in Large-Scale Machine Learning",
2023: Adam can enter a state where its update has a large norm and is nearly uncorrelated with the
descent direction (many coordinates with gradients near ε, time-correlated gradient estimates);
more likely for deep models and large batches. M. Wortsman et al., "Small-scale proxies for
large-scale Transformer training instabilities", ICLR 2024: the same instabilities appear in
small models at high learning rates, so they can be studied cheaply.

Detection. Over a sliding window of the last W finite losses h_1..h_W, a new loss x scores

    robust ("mad"):  s = (x − median(h)) / (1.4826 · median(|h − median(h)|))
    plain ("zscore"): s = (x − mean(h)) / std(h)          (sample std, W − 1 in the denominator)
    relative ("relative"): s = (x − median(h)) / |median(h)|   (the rise as a fraction of the level)

and is flagged when s > threshold and x − centre > min_delta. 1.4826 = 1/Φ⁻¹(3/4) makes the MAD
estimate σ for Gaussian noise. The median and MAD ignore the spikes inside the window (a 50%
breakdown point); the mean and std do not, so one spike inflates std and can mask the next one
for W steps. The relative rise ignores the noise level: it suits a loss whose step-to-step
noise is small next to the jump (chapter 09 flags a step 15% above the median of the previous 20;
a zero median reads as an infinitely tight window). A non-finite loss is always flagged and never enters the window. Even-length
medians average the two middle values (statistics.median).

Why Adam turns one bad batch into a burst (the maths the chapter measures). Before step 0 a
coordinate's gradient is noise with E[g] = 0, E[g²] = σ² (so m ≈ 0, v ≈ σ²); at step 0 it is G = r·σ,
then noise again. In expectation

    m_k = (1 − β1)·β1^k·G,     v_k = σ² + (1 − β2)·β2^k·(G² − σ²)          (k = 0, 1, ...)
    u_k = |m_k| / √v_k = (1 − β1)·β1^k·r / √(1 + (1 − β2)·β2^k·(r² − 1))     (update / lr)

For r → ∞: u_0 = (1 − β1)/√(1 − β2) (3.16 for β2 = 0.999, 0.45 for 0.95) and u_k decays like
(β1/√β2)^k, so the total move along the bad gradient is u_0/(1 − β1/√β2): about 32 learning rates
for β2 = 0.999 and 6 for β2 = 0.95, against 1 for a gradient clipped to the normal scale (r ≈ 1).
`adam_bad_batch_response` computes u_k.

Tools here: `SpikeDetector` (streaming, `update(loss) -> bool`, `.flagged`), `detect_spikes`,
`GradNormRecorder` (post-accumulate-grad hooks: one norm kernel per tensor per step, no host sync
until read), `DeepMLP` + `teacher_task` (a deep tanh MLP without normalisation regressing a random
teacher: spikes in seconds on a CPU), `train_and_watch` (a training loop that records losses,
per-layer gradient norms, the total norm, the update norm, with optional clipping and corrupted
batches) and `provoke_spikes` (all of it set up from a few knobs: lr, β2, ε, weight decay,
clipping, bad batches).
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from labkit import _checks, datasets, runtime
from labkit.models import GPTConfig, TinyGPT
from labkit.optim import AdamW
from labkit.train import clipping

MAD_TO_SIGMA = 1.4826  # 1 / Φ⁻¹(3/4): MAD · 1.4826 estimates σ of Gaussian noise
METHODS = ("mad", "zscore", "relative")


# --- scores -----------------------------------------------------------------------------------


def _history(owner: str, history) -> list[float]:
    if isinstance(history, torch.Tensor):
        history = history.detach().flatten().tolist()
    if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
        raise TypeError(f"{owner}: history must be a sequence of numbers, got {type(history).__name__}")
    return [_checks.number(owner, "history[i]", h) for h in history]


def _score(excess: float, scale: float) -> float:
    """excess / scale, with a zero scale read as an infinitely tight window."""
    if scale > 0:
        return excess / scale
    return math.inf if excess > 0 else (-math.inf if excess < 0 else 0.0)


def mad_score(history, loss: float) -> float:
    """(loss − median(history)) / (1.4826 · MAD(history)): the robust z-score of `loss`.

    A window whose MAD is 0 gives +inf for a loss above its median (−inf below, 0 at it)."""
    h = _history("mad_score", history)
    if not h:
        raise ValueError("mad_score: history must hold at least 1 loss, got 0")
    loss = _checks.number("mad_score", "loss", loss)
    centre = statistics.median(h)
    mad = statistics.median([abs(x - centre) for x in h])
    return _score(loss - centre, MAD_TO_SIGMA * mad)


def z_score(history, loss: float) -> float:
    """(loss − mean(history)) / std(history), sample std (needs >= 2 losses)."""
    h = _history("z_score", history)
    if len(h) < 2:
        raise ValueError(f"z_score: history must hold at least 2 losses, got {len(h)}")
    loss = _checks.number("z_score", "loss", loss)
    return _score(loss - statistics.fmean(h), statistics.stdev(h))


def relative_rise(history, loss: float) -> float:
    """(loss − median(history)) / |median(history)|: the rise of `loss` as a fraction of the window's level."""
    h = _history("relative_rise", history)
    if not h:
        raise ValueError("relative_rise: history must hold at least 1 loss, got 0")
    loss = _checks.number("relative_rise", "loss", loss)
    centre = statistics.median(h)
    return _score(loss - centre, abs(centre))


_SCORES = {"mad": mad_score, "zscore": z_score, "relative": relative_rise}


# --- the streaming detector ---------------------------------------------------------------------


class SpikeDetector:
    """Flags loss spikes online: `update(loss) -> bool`, the flagged step indices in `.flagged`.

    method: "mad" (rolling median / MAD, robust), "zscore" (rolling mean / std) or "relative"
    (rise above the rolling median as a fraction of it; threshold 0.15 = 15% above).
    window: how many recent finite losses are the reference. threshold: the score above which a
    loss is a spike. min_history: no verdict (False) before this many losses are in the window.
    min_delta: the loss must also exceed the centre by this much (guards against a window so
    flat that a tiny wiggle scores high). log: score log(loss) instead of the loss (for losses
    that fall over decades, such as a regression's; the loss must then be > 0, and min_delta is
    in log units). Steps are counted from 0, one per update call.
    """

    def __init__(self, window: int = 50, threshold: float = 6.0, method: str = "mad", min_history: int = 10,
                 min_delta: float = 0.0, log: bool = False):
        self.window = _checks.integer("SpikeDetector", "window", window, low=2)
        self.threshold = _checks.number("SpikeDetector", "threshold", threshold, low=0.0, low_open=True)
        self.method = _checks.choice("SpikeDetector", "method", method, METHODS)
        self.min_history = _checks.integer("SpikeDetector", "min_history", min_history, low=2)
        if self.min_history > self.window:
            raise ValueError(f"SpikeDetector: min_history must be <= window={self.window}, got {min_history}")
        self.min_delta = _checks.number("SpikeDetector", "min_delta", min_delta, low=0.0)
        if not isinstance(log, bool):
            raise TypeError(f"SpikeDetector: log must be a bool, got {type(log).__name__} {log!r}")
        self.log = log
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._window: deque[float] = deque(maxlen=self.window)
        self.step = 0                  # number of losses seen
        self.flagged: list[int] = []   # steps flagged as spikes
        self.scores: list[float] = []  # the score of every step (nan before min_history)

    def score(self, loss: float) -> float:
        """The score `loss` would get now (nan while the window holds fewer than min_history losses)."""
        if len(self._window) < self.min_history:
            return math.nan
        return _SCORES[self.method](list(self._window), loss)

    def update(self, loss) -> bool:
        """Feed the next loss (a float or a 0-d tensor); True if it is a spike."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().item()
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
            raise TypeError(f"SpikeDetector.update: loss must be a real number, got {type(loss).__name__} {loss!r}")
        loss = float(loss)
        if self.log and math.isfinite(loss):
            if loss <= 0:
                raise ValueError(f"SpikeDetector.update: loss must be > 0 with log=True, got {loss!r}")
            loss = math.log(loss)
        if not math.isfinite(loss):                  # nan / inf: always a spike, never in the window
            spike, s = True, math.inf
        else:
            s = self.score(loss)                     # nan before min_history: no verdict
            spike = False
            if not math.isnan(s):
                centre = (statistics.fmean(self._window) if self.method == "zscore"
                          else statistics.median(self._window))
                spike = s > self.threshold and loss - centre > self.min_delta
            self._window.append(loss)
        if spike:
            self.flagged.append(self.step)
        self.scores.append(s)
        self.step += 1
        return spike


def detect_spikes(losses, **kwargs) -> list[int]:
    """Run a fresh SpikeDetector(**kwargs) over a sequence of losses; the flagged indices."""
    det = SpikeDetector(**kwargs)
    for x in _sequence("detect_spikes", losses):
        det.update(x)
    return det.flagged


def spike_events(flagged: Iterable[int], gap: int = 1) -> list[tuple[int, int]]:
    """Merge flagged steps into events (first, last): steps at most `gap` apart belong to one event."""
    gap = _checks.integer("spike_events", "gap", gap, low=1)
    events: list[tuple[int, int]] = []
    for t in sorted(set(flagged)):
        if events and t - events[-1][1] <= gap:
            events[-1] = (events[-1][0], t)
        else:
            events.append((t, t))
    return events


def rise_events(losses, factor: float = 10.0, window: int = 50, gap: int = 3) -> list[tuple[int, int, float]]:
    """Looking back at a finished run: excursions where the loss exceeds `factor` times the lowest loss
    of the previous `window` steps, as (first, last, peak ratio), steps <= `gap` apart merged.

    A plain, retrospective yardstick for comparing runs (the online detector is SpikeDetector)."""
    xs = _sequence("rise_events", losses)
    factor = _checks.number("rise_events", "factor", factor, low=1.0)
    window = _checks.integer("rise_events", "window", window, low=1)
    ratios = [xs[t] / min(xs[max(0, t - window):t]) if t else 1.0 for t in range(len(xs))]
    flagged = [t for t, r in enumerate(ratios) if not r <= factor]   # nan / inf count as excursions
    peak = lambda a, b: max(math.inf if math.isnan(r) else r for r in ratios[a:b + 1])  # noqa: E731
    return [(a, b, peak(a, b)) for a, b in spike_events(flagged, gap=gap)]


def _sequence(owner: str, losses) -> list[float]:
    if isinstance(losses, torch.Tensor):
        return losses.detach().flatten().double().tolist()
    if isinstance(losses, (str, bytes)) or not isinstance(losses, Iterable):
        raise TypeError(f"{owner}: losses must be a sequence of numbers, got {type(losses).__name__}")
    return [float(x) for x in losses]


# --- per-layer gradient norms, recorded with hooks ---------------------------------------------


def layer_of(name: str) -> str:
    """'blocks.0.attn.q_proj.weight' -> 'blocks.0.attn.q_proj': the module a parameter belongs to."""
    return name.rsplit(".", 1)[0] if "." in name else name


class GradNormRecorder:
    """Per-step 2-norms of the gradients of every layer (or parameter), recorded by hooks.

    A post-accumulate-grad hook on each parameter stores ||p.grad||² (a device tensor, no sync)
    each time backward writes the gradient; `step()` closes the step, combining parameters into
    groups (group norm = √Σ||g||²). With gradient accumulation the hooks overwrite, so the step
    holds the norms of the accumulated gradients. Call `step()` after the last backward of an
    optimizer step and before clipping changes the gradients (the hooks already fired: the
    values are the raw norms). `history` -> (steps, groups) float32 tensor on the CPU.
    group_by: "layer" (module name), "param" (parameter name) or a function name -> group.
    """

    def __init__(self, named_parameters, group_by: str | Callable[[str], str] = "layer"):
        if isinstance(named_parameters, nn.Module):
            named_parameters = named_parameters.named_parameters()
        named = list(named_parameters)
        if not named or not all(isinstance(n, str) and isinstance(p, torch.Tensor) for n, p in named):
            raise TypeError("GradNormRecorder: named_parameters must be a module or a non-empty iterable of "
                            "(name, tensor) pairs")
        if group_by == "layer":
            group_fn = layer_of
        elif group_by == "param":
            group_fn = lambda n: n  # noqa: E731
        elif callable(group_by):
            group_fn = group_by
        else:
            raise ValueError(f"GradNormRecorder: group_by must be 'layer', 'param' or a function, got {group_by!r}")
        named = [(n, p) for n, p in named if p.requires_grad]
        self.groups: list[str] = list(dict.fromkeys(group_fn(n) for n, _ in named))
        index = {g: i for i, g in enumerate(self.groups)}
        self._param_group = [index[group_fn(n)] for n, _ in named]   # parameter -> group
        self._params = [p for _, p in named]
        self._current: list[torch.Tensor | None] = [None] * len(named)
        self._rows: list[torch.Tensor] = []
        self._handles = []
        self.attach()

    def attach(self) -> "GradNormRecorder":
        if not self._handles:
            for i, p in enumerate(self._params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))
        return self

    def _hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            self._current[i] = p.grad.detach().float().pow(2).sum()  # ||g||², on the device
        return hook

    def remove(self) -> None:
        """Remove the hooks (recorded history is kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "GradNormRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Close the step: the group norms of the gradients written since the last call (nan: none)."""
        present = [(self._param_group[i], sq) for i, sq in enumerate(self._current) if sq is not None]
        if present:
            device = present[0][1].device
            sums = torch.zeros(len(self.groups), device=device)
            seen = torch.zeros(len(self.groups), dtype=torch.bool, device=device)
            idx = torch.tensor([g for g, _ in present], device=device)
            sums.index_add_(0, idx, torch.stack([sq.to(device) for _, sq in present]))
            seen[idx] = True
            row = torch.where(seen, sums.sqrt(), torch.full_like(sums, math.nan))
        else:
            row = torch.full((len(self.groups),), math.nan)
        self._rows.append(row)
        self._current = [None] * len(self._params)
        return row

    @property
    def history(self) -> torch.Tensor:
        """(steps, groups) float32 on the CPU (reading it synchronises once)."""
        if not self._rows:
            return torch.zeros(0, len(self.groups))
        return torch.stack([r.cpu() for r in self._rows])


# --- a small model that spikes: a deep MLP on a teacher task -------------------------------------


class DeepMLP(nn.Module):
    """depth Linear layers (width hidden units, tanh between them, no normalisation, no residuals).

    forward(x (B, d_in), y (B, d_out) or None) -> (prediction (B, d_out), mean squared error or None),
    the (output, loss) convention of TinyGPT, so the same training loop drives both."""

    def __init__(self, depth: int = 8, width: int = 64, d_in: int = 16, d_out: int = 1):
        super().__init__()
        depth = _checks.integer("DeepMLP", "depth", depth, low=1)
        width = _checks.integer("DeepMLP", "width", width, low=1)
        d_in = _checks.integer("DeepMLP", "d_in", d_in, low=1)
        d_out = _checks.integer("DeepMLP", "d_out", d_out, low=1)
        dims = [d_in] + [width] * (depth - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        for i, layer in enumerate(self.layers):
            x = layer(x)                                   # (B, width) or (B, d_out) at the end
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        if y is None:
            return x, None
        return x, (x - y).pow(2).mean()


def teacher_task(n: int = 4096, d_in: int = 16, d_out: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression data set: x ~ N(0, 1) (n, d_in), y = teacher(x) (n, d_out) for a random
    3-layer tanh teacher of width 64 (targets of std ~0.3-0.5); deterministic in `seed`."""
    n = _checks.integer("teacher_task", "n", n, low=1)
    gen = torch.Generator().manual_seed(_checks.integer("teacher_task", "seed", seed, low=0))
    x = torch.randn(n, d_in, generator=gen)                                   # (n, d_in)
    h = torch.tanh(x @ torch.randn(d_in, 64, generator=gen) / math.sqrt(d_in))  # (n, 64)
    h = torch.tanh(h @ torch.randn(64, 64, generator=gen) / 8.0)              # (n, 64)
    y = h @ torch.randn(64, d_out, generator=gen) / 8.0                       # (n, d_out)
    return x, y


def sample_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0,
                   device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random minibatches (x[i], y[i]) of a fixed data set, from a private seeded generator."""
    batch_size = _checks.integer("sample_batches", "batch_size", batch_size, low=1)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else x.device
    while True:
        idx = torch.randint(len(x), (batch_size,), generator=gen)            # (B,)
        yield x[idx].to(device), y[idx].to(device)


# --- Adam's response to one bad batch (closed form) ----------------------------------------------


def adam_bad_batch_response(beta1: float, beta2: float, r: float, steps: int) -> list[float]:
    """u_k = |m_k| / √v_k (update / lr) for k = 0..steps-1 after one gradient of r noise-sigmas.

    Expected moments, see the module docstring: u_k = (1−β1)β1^k·r / √(1 + (1−β2)β2^k(r² − 1))."""
    beta1, beta2 = _checks.betas("adam_bad_batch_response", (beta1, beta2))
    r = _checks.number("adam_bad_batch_response", "r", r, low=0.0)
    steps = _checks.integer("adam_bad_batch_response", "steps", steps, low=1)
    return [(1 - beta1) * beta1 ** k * r / math.sqrt(1 + (1 - beta2) * beta2 ** k * (r * r - 1))
            for k in range(steps)]


# --- the harness ---------------------------------------------------------------------------------


@dataclass
class SpikeRun:
    """What train_and_watch recorded, one entry per step."""

    losses: list[float] = field(default_factory=list)        # training loss of the step's batch
    grad_norms: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # (steps, groups), raw
    groups: list[str] = field(default_factory=list)          # the column names of grad_norms
    total_norms: list[float] = field(default_factory=list)   # global 2-norm of the raw gradients
    update_norms: list[float] = field(default_factory=list)  # ||θ_after − θ_before||
    flagged: list[int] = field(default_factory=list)         # steps the detector flagged
    bad_steps: list[int] = field(default_factory=list)       # steps that got a corrupted batch
    skipped: list[int] = field(default_factory=list)         # steps whose update the guard skipped
    param_norm: float = math.nan                             # ||θ|| after the last step

    @property
    def steps(self) -> int:
        return len(self.losses)


def _loss_of(out) -> torch.Tensor:
    loss = out[1] if isinstance(out, tuple) else out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("train_and_watch: model(x, y) must return (output, loss) or a scalar loss tensor")
    return loss


def train_and_watch(model: nn.Module, batches: Iterable, steps: int, optimizer: torch.optim.Optimizer, *,
                    max_norm: float | None = None, clip_mode: str = "global", bad_steps: Iterable[int] = (),
                    corrupt: Callable | None = None, detector: SpikeDetector | None = None,
                    guard: SpikeDetector | None = None, group_by: str | Callable[[str], str] = "layer",
                    progress: bool = False, desc: str = "train") -> SpikeRun:
    """Train `steps` steps, recording per step the loss, every layer's raw gradient norm, the total
    norm, and the size of the update. max_norm: clip (labkit.train.clipping, `clip_mode`) before
    the step; None: no clipping. At each step in `bad_steps` the batch (x, y) is replaced by
    corrupt(x, y). detector: flags loss spikes (default SpikeDetector(); it reads the losses after
    the run, so it costs no synchronisation per step). guard: a detector fed the total gradient norm
    of every step before the update; when it flags, the update is skipped (the batch is dropped,
    PaLM's "skip the batches", done online; this reads the norm every step: one sync per step)."""
    steps = _checks.integer("train_and_watch", "steps", steps, low=1)
    if max_norm is not None:
        max_norm = _checks.number("train_and_watch", "max_norm", max_norm, low=0.0, low_open=True)
    _checks.choice("train_and_watch", "clip_mode", clip_mode, clipping.MODES)
    bad = sorted({_checks.integer("train_and_watch", "bad_steps[i]", s) for s in bad_steps})
    if bad and corrupt is None:
        raise ValueError("train_and_watch: bad_steps needs a corrupt(x, y) -> (x, y) function, got None")
    detector = detector if detector is not None else SpikeDetector()
    params = [p for p in model.parameters() if p.requires_grad]
    it = iter(batches)
    losses, totals, updates, skipped = [], [], [], []
    model.train()
    with GradNormRecorder(model, group_by=group_by) as rec:
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            x, y = next(it)
            if step in bad:
                x, y = corrupt(x, y)
            loss = _loss_of(model(x, y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            rec.step()
            grads = [p.grad for p in params if p.grad is not None]
            totals.append(clipping.global_norm(grads))
            if guard is not None and guard.update(totals[-1]):
                skipped.append(step)
                updates.append(torch.zeros((), device=totals[-1].device))
                losses.append(loss.detach())
                continue
            if max_norm is not None:
                clipping.clip_tensors_(grads, max_norm, 2.0, clip_mode)
            before = [p.detach().clone() for p in params]
            optimizer.step()
            with torch.no_grad():
                deltas = torch._foreach_sub([p.detach() for p in params], before)
                updates.append(clipping.global_norm(deltas))
            losses.append(loss.detach())
    run = SpikeRun(losses=torch.stack(losses).float().cpu().tolist(), grad_norms=rec.history, groups=rec.groups,
                   total_norms=torch.stack(totals).float().cpu().tolist(),
                   update_norms=torch.stack(updates).float().cpu().tolist(), bad_steps=bad, skipped=skipped,
                   param_norm=clipping.global_norm([p.detach() for p in params]).item())
    for x in run.losses:
        detector.update(x)
    run.flagged = list(detector.flagged)
    return run


def scale_targets(factor: float) -> Callable:
    """A corruption for regression batches: (x, y) -> (x, factor · y) (mislabelled / unnormalised data)."""
    factor = _checks.number("scale_targets", "factor", factor)
    return lambda x, y: (x, y * factor)


def repeat_tokens(token_in: int, token_out: int) -> Callable:
    """A corruption for LM batches: every input `token_in`, every target `token_out` (a garbage document)."""
    return lambda x, y: (torch.full_like(x, token_in), torch.full_like(y, token_out))


TASKS = ("mlp", "gpt")


def full_batches(x: torch.Tensor, y: torch.Tensor, device: torch.device | str | None = None):
    """The whole data set as every batch (full-batch training: no gradient noise)."""
    device = torch.device(device) if device is not None else x.device
    x, y = x.to(device), y.to(device)
    while True:
        yield x, y


def provoke_spikes(task: str = "mlp", *, steps: int = 600, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 0.0, max_norm: float | None = None,
                   clip_mode: str = "global", bad_steps: Iterable[int] = (), bad_scale: float = 30.0,
                   batch_size: int | None = None, n_examples: int | None = None, seed: int = 0,
                   device: torch.device | str | None = None, detector: SpikeDetector | None = None,
                   guard: SpikeDetector | None = None, progress: bool = False,
                   model_kwargs: dict | None = None) -> SpikeRun:
    """Build a small model, its data and labkit's AdamW from a few knobs, and train_and_watch it.

    task "mlp": DeepMLP(**model_kwargs) (default depth 6, width 64) on teacher_task(n_examples)
    (default 256 examples full-batch, 4096 with minibatches); batch_size None trains full-batch (no
    gradient noise: Adam's self-induced spikes once the loss is small), an int samples minibatches;
    a bad batch has its targets multiplied by bad_scale.
    task "gpt": TinyGPT (2 layers, 64 wide, block 32; model_kwargs override GPTConfig fields) on
    the character Shakespeare corpus, batch_size default 16; a bad batch is a garbage document
    (every input 'e', every target 'z'). The same seed gives the same initial weights and batches
    whatever the optimizer knobs. detector: default SpikeDetector(log=True) for "mlp", SpikeDetector()
    for "gpt"; guard: see train_and_watch.
    """
    _checks.choice("provoke_spikes", "task", task, TASKS)
    seed = _checks.integer("provoke_spikes", "seed", seed, low=0)
    if batch_size is not None:
        batch_size = _checks.integer("provoke_spikes", "batch_size", batch_size, low=1)
    device = torch.device(device) if device is not None else runtime.device()
    runtime.seed_everything(seed)
    if task == "mlp":
        model = DeepMLP(**(dict(depth=6, width=64) | (model_kwargs or {}))).to(device)
        n = n_examples if n_examples is not None else (256 if batch_size is None else 4096)
        x, y = teacher_task(n=n, d_in=model.layers[0].in_features, d_out=model.layers[-1].out_features)
        batches = (full_batches(x, y, device) if batch_size is None else
                   sample_batches(x, y, batch_size, seed=seed + 1, device=device))
        corrupt = scale_targets(bad_scale)
        detector = detector if detector is not None else SpikeDetector(log=True)
    else:
        tok = datasets.get_tokenizer("char")
        cfg = GPTConfig(**(dict(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_embd=64, n_head=4)
                           | (model_kwargs or {})))
        model = TinyGPT(cfg).to(device)
        data = datasets.token_dataset("char", "train")
        batches = datasets.batches(data, batch_size or 16, cfg.block_size, seed=seed + 1, device=device)
        e, z = tok.encode("ez")
        corrupt = repeat_tokens(e, z)
    opt = AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return train_and_watch(model, batches, steps, opt, max_norm=max_norm, clip_mode=clip_mode, bad_steps=bad_steps,
                           corrupt=corrupt, detector=detector, guard=guard, progress=progress,
                           desc=f"{task} lr={lr:g}")


__all__ = ["DeepMLP", "GradNormRecorder", "MAD_TO_SIGMA", "METHODS", "SpikeDetector", "SpikeRun", "TASKS",
           "adam_bad_batch_response", "detect_spikes", "full_batches", "layer_of", "mad_score", "provoke_spikes",
           "relative_rise", "repeat_tokens", "rise_events", "sample_batches", "scale_targets", "spike_events", "teacher_task",
           "train_and_watch", "z_score"]
