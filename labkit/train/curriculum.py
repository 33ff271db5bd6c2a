"""Curricula: difficulty scores, pacing functions, a pacing sampler, and sequence-length warm-up.

Sources. "数据课程学习: 动态调整数据难度与序列长度的预训练调度" (data curricula: scheduling
difficulty and sequence length in pretraining); Y. Bengio, J. Louradour, R. Collobert,
J. Weston, "Curriculum learning", ICML 2009; E. A. Platanios, O. Stretcu, G. Neubig,
B. Poczos, T. Mitchell, "Competence-based Curriculum Learning for Neural Machine Translation",
NAACL 2019 (competence and pacing functions); G. Hacohen, D. Weinshall, "On The Power of
Curriculum Learning in Training Deep Networks", ICML 2019 (scoring by a reference model,
stepwise exponential pacing); C. Li, M. Zhang, Y. He, "The Stability-Efficiency Dilemma:
Investigating Sequence Length Warmup for Training GPT Models", NeurIPS 2022 (sequence-length
warm-up, as in DeepSpeed's `seqlen` curriculum: truncate, or reshape to keep tokens per step).

Difficulty. A curriculum needs a score per example, higher = harder:

    length      the number of tokens
    rarity      mean over the example's tokens of -log p(v), p the corpus's unigram frequencies
                (add-alpha smoothed): rare words and names make an example hard
    model loss  the example's mean next-token loss under a small reference model (here a
                bigram model fitted by counting, or any model returning logits)

Competence and pacing (Platanios et al.). At step t the model may see the easiest c(t) fraction
of the data, c(t) in [c0, 1], with c(0) = c0 and c(T) = 1 after a ramp of T steps (r = min(1, t/T)):

    linear        c = c0 + (1 - c0) r
    root (p)      c = (c0^p + (1 - c0^p) r)^(1/p)            (p = 2: Platanios's "sqrt"; fast start)
    step (n)      c = c0 + (1 - c0) floor(n r) / n            (n stages: "baby steps")
    exponential   c = c0^(1 - r) = c0 (1/c0)^r               (slow start; Hacohen & Weinshall's
                                                              exponential pacing, made continuous)

`CurriculumSampler` sorts the examples by score and at step t draws a batch uniformly (with
replacement) from the first ceil(c(t) n) of them; batch t depends only on (seed, t), so a
resumed run draws the same batches.

Sequence-length warm-up (Li et al.). Train on short sequences first: the length at step t is
L(t) = c(t) L_max with c0 = L_min / L_max, rounded down to a multiple of 8 (kernel-friendly
shapes) and kept in [L_min, L_max]. Either truncate each full-length example to L(t) (fewer
tokens per step early on: compare runs at equal tokens, not steps) or cut the token stream into
B L_max // L(t) windows of length L(t) (the same tokens per step, more and shorter sequences).
Li et al. find it lets GPT-2 train stably at larger batches and learning rates, where the
early long-sequence steps otherwise cause loss spikes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit import _checks

PACINGS = ("linear", "root", "step", "exponential")
SEQLEN_MODES = ("pack", "truncate")
IGNORE_INDEX = -100  # targets that are not scored (labkit.models.gpt.IGNORE_INDEX)


# --------------------------------------------------------------------------- pacing


def pacing(kind: str, step: float, ramp_steps: int, c0: float = 0.1, *, p: float = 2.0, n_stages: int = 4) -> float:
    """Competence c(step) in [c0, 1] for pacing `kind` (PACINGS); 1 from step `ramp_steps` on."""
    owner = "pacing"
    _checks.choice(owner, "kind", kind, PACINGS)
    t = _checks.number(owner, "step", step, low=0.0)
    ramp = _checks.integer(owner, "ramp_steps", ramp_steps, low=1)
    c0 = _checks.number(owner, "c0", c0, low=0.0, high=1.0, low_open=True)
    p = _checks.number(owner, "p", p, low=0.0, low_open=True)
    n = _checks.integer(owner, "n_stages", n_stages, low=1)
    r = min(1.0, t / ramp)
    if kind == "linear":
        c = c0 + (1 - c0) * r
    elif kind == "root":
        c = (c0**p + (1 - c0**p) * r) ** (1 / p)
    elif kind == "step":
        c = c0 + (1 - c0) * math.floor(n * r) / n
    else:
        c = c0 ** (1 - r)
    return 1.0 if r >= 1 else min(1.0, max(c0, c))


_pacing = pacing  # for the callers below whose `pacing` argument names the kind


def pacing_curve(kind: str, total_steps: int, ramp_steps: int, c0: float = 0.1, **kw) -> torch.Tensor:
    """(total_steps,) float64: c(t) for t = 0 .. total_steps - 1."""
    n = _checks.integer("pacing_curve", "total_steps", total_steps, low=1)
    return torch.tensor([pacing(kind, t, ramp_steps, c0, **kw) for t in range(n)], dtype=torch.float64)


def eligible_count(c: float, n: int) -> int:
    """How many of n examples (easiest first) competence c admits: ceil(c n), at least 1."""
    c = _checks.number("eligible_count", "c", c, low=0.0, high=1.0)
    n = _checks.integer("eligible_count", "n", n, low=1)
    return min(n, max(1, math.ceil(c * n - 1e-9)))


def eligible_buckets(c: float, n_buckets: int) -> torch.Tensor:
    """(n_buckets,): the admitted fraction of each equal-size difficulty bucket (0 = easiest) at competence c."""
    c = _checks.number("eligible_buckets", "c", c, low=0.0, high=1.0)
    k = _checks.integer("eligible_buckets", "n_buckets", n_buckets, low=1)
    return (c * k - torch.arange(k, dtype=torch.float64)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- difficulty scores


def _sequences(owner: str, examples) -> list[torch.Tensor]:
    if isinstance(examples, torch.Tensor):
        if examples.dim() != 2:
            raise ValueError(f"{owner}: examples must be a (n, T) tensor or a list of sequences, "
                             f"got shape {tuple(examples.shape)}")
        return list(examples)
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(f"{owner}: examples must be a (n, T) tensor or a list of sequences, "
                        f"got {type(examples).__name__}")
    return [torch.as_tensor(e, dtype=torch.long).flatten() for e in examples]


def length_scores(examples) -> torch.Tensor:
    """(n,) float: the number of scored tokens (not IGNORE_INDEX) of each example."""
    return torch.tensor([float((s != IGNORE_INDEX).sum()) for s in _sequences("length_scores", examples)],
                        dtype=torch.float64)


def unigram_log_probs(tokens: torch.Tensor, vocab_size: int, alpha: float = 1.0) -> torch.Tensor:
    """(V,): log p(v) with add-alpha smoothing, p(v) = (count(v) + alpha) / (N + alpha V)."""
    owner = "unigram_log_probs"
    v = _checks.integer(owner, "vocab_size", vocab_size, low=1)
    a = _checks.number(owner, "alpha", alpha, low=0.0)
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point:
        raise TypeError(f"{owner}: tokens must be an integer tensor, got {type(tokens).__name__}")
    t = tokens.flatten()
    t = t[t != IGNORE_INDEX]
    if t.numel() and (t.min() < 0 or t.max() >= v):
        raise ValueError(f"{owner}: tokens must lie in [0, vocab_size={v}), got [{t.min().item()}, {t.max().item()}]")
    counts = torch.bincount(t, minlength=v).double() + a  # (V,)
    if (counts == 0).any():
        raise ValueError(f"{owner}: alpha must be > 0 when some token of the vocabulary never occurs, got {a}")
    return counts.log() - counts.sum().log()


def rarity_scores(examples, log_probs: torch.Tensor) -> torch.Tensor:
    """(n,): mean -log p(v) over each example's tokens (IGNORE_INDEX skipped); higher = rarer."""
    owner = "rarity_scores"
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 1:
        raise ValueError(f"{owner}: log_probs must be a (V,) tensor, got {type(log_probs).__name__}")
    out = []
    for s in _sequences(owner, examples):
        s = s[s != IGNORE_INDEX]
        if s.numel() == 0:
            raise ValueError(f"{owner}: every example needs at least one token")
        if s.min() < 0 or s.max() >= log_probs.numel():
            raise ValueError(f"{owner}: tokens must lie in [0, {log_probs.numel()})")
        out.append(-log_probs.double()[s].mean())
    return torch.stack(out)


class BigramLM(nn.Module):
    """The smallest reference model: logits(next | v) = log p(next | v) from add-alpha bigram counts.

    forward(idx (B, T), targets=None) -> (logits (B, T, V), mean loss or None), like TinyGPT.
    """

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 2 or log_probs.shape[0] != log_probs.shape[1]:
            raise ValueError(f"BigramLM: log_probs must be a (V, V) tensor, "
                             f"got {tuple(getattr(log_probs, 'shape', ()))}")
        self.register_buffer("table", log_probs.float())  # (V, V): row = current token

    @classmethod
    def fit(cls, tokens: torch.Tensor, vocab_size: int, alpha: float = 0.1) -> BigramLM:
        """Count bigrams of a 1-D token stream; p(w | v) = (count(v, w) + alpha) / (count(v) + alpha V)."""
        owner = "BigramLM.fit"
        v = _checks.integer(owner, "vocab_size", vocab_size, low=1)
        a = _checks.number(owner, "alpha", alpha, low=0.0, low_open=True)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype.is_floating_point:
            raise ValueError(f"{owner}: tokens must be a 1-D integer tensor")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= v):
            raise ValueError(f"{owner}: tokens must lie in [0, vocab_size={v})")
        pair = tokens[:-1] * v + tokens[1:]  # (N-1,)
        counts = torch.bincount(pair, minlength=v * v).view(v, v).double() + a  # (V, V)
        return cls((counts / counts.sum(1, keepdim=True)).log())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.table[idx]  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss


@torch.no_grad()
def model_loss_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(n,): each example's mean next-token loss (over targets != IGNORE_INDEX) under `model` (eval mode)."""
    owner = "model_loss_scores"
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"{owner}: x and y must be (n, T) tensors of one shape, got "
                         f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}")
    b = _checks.integer(owner, "batch_size", batch_size, low=1)
    p = next(iter(model.parameters()), None)
    buf = next(iter(model.buffers()), None)
    dev = (p if p is not None else buf).device if (p is not None or buf is not None) else torch.device("cpu")
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, x.shape[0], b):
            xb, yb = x[i:i + b].to(dev), y[i:i + b].to(dev)  # (b, T)
            logits, _ = model(xb)  # (b, T, V)
            nll = F.cross_entropy(logits.transpose(1, 2).float(), yb, ignore_index=IGNORE_INDEX,
                                  reduction="none")  # (b, T), 0 where ignored
            scored = (yb != IGNORE_INDEX).sum(1).clamp_min(1)  # (b,)
            out.append((nll.sum(1) / scored).double().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def difficulty_buckets(scores, n_buckets: int) -> torch.Tensor:
    """(n,): the equal-size difficulty bucket (0 = easiest) of each example, by rank (stable ties)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    k = _checks.integer("difficulty_buckets", "n_buckets", n_buckets, low=1)
    if s.numel() == 0:
        raise ValueError("difficulty_buckets: scores must not be empty")
    rank = torch.empty(s.numel(), dtype=torch.long)
    rank[torch.argsort(s, stable=True)] = torch.arange(s.numel())
    return rank * k // s.numel()


# --------------------------------------------------------------------------- the sampler


def _mix(seed: int, step: int) -> int:
    """A 32-bit seed for (seed, step) (splitmix64's finaliser; torch's CPU generator keeps 32 bits of a seed)."""
    mask = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & 0xFFFFFFFF


class CurriculumSampler:
    """Batches of example indices that follow a pacing function (easiest first).

    At step t: c = pacing(pacing, t, ramp_steps, c0), m = ceil(c n); the batch is `batch_size`
    indices drawn uniformly with replacement from the m easiest examples (ties in score keep
    index order). Deterministic: batch(t) depends only on (seed, t). Iterating yields
    total_steps batches, (batch_size,) LongTensors each.
    """

    def __init__(self, scores, batch_size: int, total_steps: int, *, pacing: str | Callable[[int], float] = "root",
                 c0: float = 0.1, ramp_steps: int | None = None, seed: int = 0, p: float = 2.0, n_stages: int = 4):
        owner = "CurriculumSampler"
        s = torch.as_tensor(scores, dtype=torch.float64).flatten()  # (n,)
        if s.numel() == 0 or not torch.isfinite(s).all():
            raise ValueError(f"{owner}: scores must be a non-empty sequence of finite numbers")
        self.batch_size = _checks.integer(owner, "batch_size", batch_size, low=1)
        self.total_steps = _checks.integer(owner, "total_steps", total_steps, low=1)
        self.ramp_steps = _checks.integer(owner, "ramp_steps", total_steps if ramp_steps is None else ramp_steps, low=1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{owner}: seed must be an int, got {type(seed).__name__} {seed!r}")
        self.seed = seed
        if callable(pacing):
            self._competence = pacing
        else:
            _checks.choice(owner, "pacing", pacing, PACINGS)
            _pacing(pacing, 0, self.ramp_steps, c0, p=p, n_stages=n_stages)  # validate c0, p, n_stages now
            self._competence = lambda t: _pacing(pacing, t, self.ramp_steps, c0, p=p, n_stages=n_stages)
        self.order = torch.argsort(s, stable=True)  # (n,) easiest first
        self.n = s.numel()

    def competence(self, step: int) -> float:
        c = float(self._competence(_checks.integer("CurriculumSampler", "step", step, low=0)))
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"CurriculumSampler: the pacing function must return a value in [0, 1], got {c!r}")
        return c

    def eligible(self, step: int) -> int:
        """How many of the easiest examples step `step` may draw from."""
        return eligible_count(self.competence(step), self.n)

    def batch(self, step: int) -> torch.Tensor:
        """(batch_size,) example indices for step `step`."""
        m = self.eligible(step)
        g = torch.Generator().manual_seed(_mix(self.seed, step))
        return self.order[torch.randint(m, (self.batch_size,), generator=g)]

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        for t in range(self.total_steps):
            yield self.batch(t)


def sampled_batches(x: torch.Tensor, y: torch.Tensor, sampler: Iterator[torch.Tensor] | CurriculumSampler, *,
                    device: str | torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x[idx], y[idx]) for each index batch of `sampler`: (B, T) each."""
    for idx in sampler:
        yield x[idx].to(device or x.device), y[idx].to(device or y.device)


def uniform_sampler(n: int, batch_size: int, total_steps: int, *, seed: int = 0) -> CurriculumSampler:
    """The baseline: every step draws uniformly from all n examples (competence 1 throughout)."""
    return CurriculumSampler(torch.zeros(_checks.integer("uniform_sampler", "n", n, low=1)), batch_size, total_steps,
                             pacing=lambda t: 1.0, seed=seed)


# --------------------------------------------------------------------------- sequence-length warm-up


def seqlen_at(step: float, *, start: int, end: int, ramp_steps: int, pacing: str = "linear", multiple: int = 8,
              **kw) -> int:
    """Sequence length at `step`: c(step) * end with c0 = start / end, rounded down to a multiple of
    `multiple`, kept in [start, end] (and exactly `end` once the ramp is over)."""
    owner = "seqlen_at"
    lo = _checks.integer(owner, "start", start, low=1)
    hi = _checks.integer(owner, "end", end, low=1)
    if lo > hi:
        raise ValueError(f"{owner}: start must be <= end={hi}, got {lo}")
    m = _checks.integer(owner, "multiple", multiple, low=1)
    c = _pacing(pacing, step, ramp_steps, lo / hi, **kw)
    if c >= 1.0:
        return hi
    return max(lo, min(hi, math.floor(c * hi + 1e-6) // m * m))  # 1e-6: c * hi = 16 may round to 15.999...


def truncate(x: torch.Tensor, y: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) -> (B, seq_len): keep the first seq_len positions of inputs and targets."""
    L = _checks.integer("truncate", "seq_len", seq_len, low=1)
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"truncate: x and y must be (B, T) tensors of one shape, "
                         f"got {tuple(x.shape)}, {tuple(y.shape)}")
    if L > x.shape[1]:
        raise ValueError(f"truncate: seq_len must be <= T={x.shape[1]}, got {L}")
    return x[:, :L], y[:, :L]


def seqlen_warmup_batches(data: torch.Tensor, batch_size: int, block_size: int, schedule: Callable[[int], int], *,
                          mode: str = "pack", seed: int = 0, device: str | torch.device | None = None
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of a 1-D token stream whose length follows schedule(step).

    mode="pack": batch_size * block_size // L windows of length L = schedule(step) (the same
    tokens per step, up to rounding); "truncate": batch_size windows of block_size, cut to L.
    """
    owner = "seqlen_warmup_batches"
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise ValueError(f"{owner}: data must be a 1-D token tensor, got {type(data).__name__}")
    b = _checks.integer(owner, "batch_size", batch_size, low=1)
    T = _checks.integer(owner, "block_size", block_size, low=1)
    _checks.choice(owner, "mode", mode, SEQLEN_MODES)
    if not callable(schedule):
        raise TypeError(f"{owner}: schedule must be callable (step -> length), got {type(schedule).__name__}")
    if len(data) <= T:
        raise ValueError(f"{owner}: data must be longer than block_size={T}, got {len(data)} tokens")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{owner}: seed must be an int, got {type(seed).__name__}")
    return _seqlen_stream(data, b, T, schedule, mode, torch.Generator().manual_seed(seed), device)


def _seqlen_stream(data, b, T, schedule, mode, g, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    owner = "seqlen_warmup_batches"
    step = 0
    while True:
        L = schedule(step)
        if isinstance(L, bool) or not isinstance(L, int) or not 1 <= L <= T:
            raise ValueError(f"{owner}: schedule({step}) must be an int in [1, block_size={T}], got {L!r}")
        width, n = (L, max(1, b * T // L)) if mode == "pack" else (T, b)
        start = torch.randint(len(data) - width, (n,), generator=g)  # (n,)
        window = data[start[:, None] + torch.arange(width + 1)]  # (n, width + 1)
        x, y = window[:, :-1], window[:, 1:]  # (n, width)
        if mode == "truncate":
            x, y = truncate(x, y, L)
        yield x.to(device or data.device), y.to(device or data.device)
        step += 1


# --------------------------------------------------------------------------- loss at a token budget


@torch.no_grad()
def _eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    return model_loss_scores(model, x, y, batch_size).mean().item()


def train_and_evaluate(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, *,
                       eval_x: torch.Tensor, eval_y: torch.Tensor, eval_every: int, lr: float = 3e-3,
                       progress: bool = False, desc: str = "train") -> dict:
    """Train with labkit.models.train (one AdamW throughout) and measure the held-out loss every
    `eval_every` steps and at the end, so runs compare at equal tokens rather than equal steps.

    Returns losses (per step), tokens (cumulative tokens at each evaluation), val (mean loss of
    the held-out examples at each evaluation; the first entry is before training), seconds.
    """
    from tqdm.auto import tqdm

    from labkit.models import train

    owner = "train_and_evaluate"
    n = _checks.integer(owner, "steps", steps, low=1)
    every = _checks.integer(owner, "eval_every", eval_every, low=1)
    lr = _checks.number(owner, "lr", lr, low=0.0, low_open=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)  # train()'s default
    it = iter(batches)
    out = {"losses": [], "tokens": [0], "val": [_eval_loss(model, eval_x, eval_y)], "seconds": 0.0}
    done = 0
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)
    while done < n:
        chunk = min(every, n - done)
        log = train(model, it, chunk, optimizer=opt, progress=False)
        done += chunk
        out["losses"] += log.losses
        out["seconds"] += log.seconds
        out["tokens"].append(out["tokens"][-1] + log.tokens)
        out["val"].append(_eval_loss(model, eval_x, eval_y))
        bar.update(chunk)
    bar.close()
    return out


__all__ = [
    "BigramLM", "CurriculumSampler", "PACINGS", "SEQLEN_MODES", "difficulty_buckets", "eligible_buckets",
    "eligible_count", "length_scores", "model_loss_scores", "pacing", "pacing_curve", "rarity_scores",
    "sampled_batches", "seqlen_at", "seqlen_warmup_batches", "train_and_evaluate", "truncate", "uniform_sampler",
    "unigram_log_probs",
]
