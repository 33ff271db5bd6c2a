"""Data order: full shuffles, shuffle buffers, shard shuffles, and how correlated their batches are.

Sources. "训练中的 Loss Spike: 数据洗牌不充分导致的 Batch 相关性分析" (loss spikes from batch
correlation after insufficient shuffling); the shuffle buffer of streaming loaders as in
tf.data's `Dataset.shuffle(buffer_size)` and WebDataset's `shuffle(bufsize)` (shard order
shuffled, then samples mixed through a buffer); L. Bottou, "Curiously fast convergence of some
stochastic gradient descent algorithms" (2009) on sampling without replacement.

The problem. A pretraining corpus is usually stored the way it was assembled: one source, one
language, one topic, one crawl after another. SGD's gradient is an unbiased estimate of the
full-data gradient only when every batch is a fair sample of the data. If a batch is drawn
from one contiguous stretch of storage, its gradient is the gradient of *that source*: the
model is pulled toward it for as many steps as the stretch lasts and drifts away from the
rest, and when the stream reaches the next source the loss jumps (a spike), then falls again.

Three ways to order n examples, as iterators over indices (each deterministic under `seed`):

- `full_shuffle(n)`: a uniform random permutation (needs random access to all n examples).
- `buffer_shuffle(stream, k)`: what a streaming loader can afford. Fill a buffer with the first
  k items; then for each new item, emit a uniformly chosen buffered item and put the new one in
  its place; at the end, emit what is left in random order. k = 1 is the identity; k >= n is a
  uniform permutation. In between, a buffered item survives each draw with probability 1 - 1/k,
  so the item read at position i leaves at position i - k + G with G ~ Geometric(1/k) on
  {1, 2, ...}: mean displacement 0, spread about k (E|G - k| -> 2k/e), never more than k - 1
  places earlier. The buffer blurs the storage order over ~k items; a batch mixes only items
  stored within about k of each other.
- `shard_shuffle(n, shard_size)`: storage in shards of contiguous examples (WebDataset tar
  files, Parquet row groups); shuffle the shard order, then shuffle within each shard, or pass
  the shard stream through a buffer.

Measuring batch correlation. With labels s_i (source, topic, class) of K kinds in the dataset
proportions p_k, a batch of B examples holds counts c_k, with batch proportions q_k = c_k / B:

    majority share   max_k q_k                                   1 when one source fills the batch
    entropy ratio    H(q) / H(p),  H(q) = -sum_k q_k log q_k      0 for one source, ~1 for a fair batch
    KL               D(q || p) = sum_k q_k log(q_k / p_k)         0 when q = p
    chi-square       X^2 = sum_k (c_k - B p_k)^2 / (B p_k)        E[X^2] ~ K - 1 under a full shuffle
                                                                  (multinomial), B (1/p - 1) for one source

For a numeric per-example value v_i (length, difficulty, loss) the analogue is the share of its
variance that lies *between* batches, sum_b B (mean_b - mean)^2 / sum_i (v_i - mean)^2: 1 when
every batch is homogeneous (sorted data), about 1/B under a full shuffle.

Spikes are flagged with labkit.train.spikes (`detect_spikes(losses, method="relative", ...)`:
a step whose loss exceeds the median of the previous steps by more than a relative threshold).
`step_jitter` measures how much the loss jumps from one batch to the next.

The demo. `clustered_corpus` builds a corpus stored by source, the way a concatenated corpus is:
n_sources contiguous regions of the Shakespeare character corpus, each written in its own
letter substitution (a different random permutation of a-z per source, the same for upper
case), so all sources are equally hard (identical statistics up to relabelling) while a model
that has only seen one of them predicts the others badly: any loss jump at a source boundary
is the model's drift, not a harder source. `train_in_order` trains a model over a given order.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from labkit import _checks

STRATEGIES = ("none", "full", "buffer", "shard")
WITHIN = ("shuffle", "none")


# --------------------------------------------------------------------------- helpers


def _seed(owner: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{owner}: seed must be an int, got {type(seed).__name__} {seed!r}")
    return seed


def _generator(owner: str, seed) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(owner, seed) % 2**63)


def _as_index_tensor(owner: str, name: str, value) -> torch.Tensor:
    """A 1-D int64 tensor from a tensor, list, range or iterator of ints."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"{owner}: {name} must be a 1-D integer tensor, got shape {tuple(value.shape)} "
                             f"dtype {value.dtype}")
        return value.long()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}: {name} must be a 1-D integer tensor or an iterable of ints, "
                        f"got {type(value).__name__}")
    items = list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise TypeError(f"{owner}: {name} must hold ints only")
    return torch.tensor(items, dtype=torch.long)


# --------------------------------------------------------------------------- orders


def sequential(n: int) -> Iterator[int]:
    """No shuffle: 0, 1, ..., n - 1 (storage order)."""
    return iter(range(_checks.integer("sequential", "n", n, low=0)))


def full_shuffle(n: int, *, seed: int = 0) -> Iterator[int]:
    """A uniform random permutation of range(n) (torch.randperm under a seeded generator)."""
    n = _checks.integer("full_shuffle", "n", n, low=0)
    return iter(torch.randperm(n, generator=_generator("full_shuffle", seed)).tolist())


def _buffered(stream: Iterable[int], k: int, rng: random.Random) -> Iterator[int]:
    buf: list[int] = []
    for item in stream:
        if len(buf) < k:  # filling
            buf.append(item)
            continue
        j = rng.randrange(k)  # a uniform slot in [0, k)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)  # drain: the rest in random order
    yield from buf


def buffer_shuffle(source: int | Iterable[int], buffer_size: int, *, seed: int = 0) -> Iterator[int]:
    """Stream `source` (an int n means range(n)) through a shuffle buffer of `buffer_size` items.

    Fill the buffer; then per incoming item emit a uniformly chosen buffered item and store the
    new one in its slot; at the end emit the remainder in random order (tf.data's algorithm).
    Randomness: rng = random.Random(seed); slot j = rng.randrange(buffer_size) per incoming item
    once the buffer is full; the remainder is emitted after rng.shuffle(buffer). Lazy: it reads
    at most buffer_size + 1 items before the first one comes out, so endless streams work.
    """
    k = _checks.integer("buffer_shuffle", "buffer_size", buffer_size, low=1)
    rng = random.Random(_seed("buffer_shuffle", seed))
    if isinstance(source, int) and not isinstance(source, bool):
        stream: Iterable[int] = range(_checks.integer("buffer_shuffle", "source", source, low=0))
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        stream = source
    else:
        raise TypeError(f"buffer_shuffle: source must be an int or an iterable of ints, got {type(source).__name__}")
    return _buffered(stream, k, rng)


def _shards(n: int, size: int, within: str, g: torch.Generator) -> Iterator[int]:
    for s in torch.randperm(-(-n // size), generator=g).tolist():  # the shard order
        lo, hi = s * size, min(n, (s + 1) * size)
        if within == "shuffle":
            yield from (lo + torch.randperm(hi - lo, generator=g)).tolist()
        else:
            yield from range(lo, hi)


def shard_shuffle(n: int, shard_size: int, *, seed: int = 0, within: str = "shuffle",
                  buffer_size: int | None = None) -> Iterator[int]:
    """Shards of `shard_size` contiguous indices (the last may be shorter) in a random order.

    within="shuffle": each shard's indices in random order; "none": in storage order.
    buffer_size: then pass the whole shard stream through a shuffle buffer of that size (seed + 1).
    """
    owner = "shard_shuffle"
    n = _checks.integer(owner, "n", n, low=0)
    size = _checks.integer(owner, "shard_size", shard_size, low=1)
    _checks.choice(owner, "within", within, WITHIN)
    stream = _shards(n, size, within, _generator(owner, seed))
    if buffer_size is None:
        return stream
    _checks.integer(owner, "buffer_size", buffer_size, low=1)
    return buffer_shuffle(stream, buffer_size, seed=seed + 1)


def epoch_order(strategy: str, n: int, *, seed: int = 0, buffer_size: int | None = None,
                shard_size: int | None = None, within: str = "shuffle") -> torch.Tensor:
    """One epoch's order as a (n,) LongTensor: strategy in STRATEGIES.

    "none": storage order; "full": full_shuffle; "buffer": buffer_shuffle(n, buffer_size);
    "shard": shard_shuffle(n, shard_size, within=within, buffer_size=buffer_size).
    """
    _checks.choice("epoch_order", "strategy", strategy, STRATEGIES)
    if strategy == "none":
        it: Iterable[int] = sequential(n)
    elif strategy == "full":
        it = full_shuffle(n, seed=seed)
    elif strategy == "buffer":
        if buffer_size is None:
            raise ValueError("epoch_order: strategy 'buffer' needs buffer_size (an int >= 1), got None")
        it = buffer_shuffle(_checks.integer("epoch_order", "n", n, low=0), buffer_size, seed=seed)
    else:
        if shard_size is None:
            raise ValueError("epoch_order: strategy 'shard' needs shard_size (an int >= 1), got None")
        it = shard_shuffle(n, shard_size, seed=seed, within=within, buffer_size=buffer_size)
    return torch.tensor(list(it), dtype=torch.long)


def epochs(strategy: str, n: int, n_epochs: int, *, seed: int = 0, **kw) -> Iterator[int]:
    """`n_epochs` passes over range(n), epoch e ordered by `epoch_order(strategy, n, seed=seed + e, **kw)`."""
    n_epochs = _checks.integer("epochs", "n_epochs", n_epochs, low=0)
    seed = _seed("epochs", seed)
    passes = (epoch_order(strategy, n, seed=seed + e, **kw).tolist() for e in range(n_epochs))
    return itertools.chain.from_iterable(passes)


# --------------------------------------------------------------------------- batch correlation


def batch_counts(labels, order, batch_size: int, num_classes: int | None = None) -> torch.Tensor:
    """Counts of each label per batch: (n_batches, K) for `order` cut into full batches of `batch_size`."""
    owner = "batch_counts"
    labels = _as_index_tensor(owner, "labels", labels)  # (n,)
    idx = _as_index_tensor(owner, "order", order)  # (m,)
    b = _checks.integer(owner, "batch_size", batch_size, low=1)
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"{owner}: labels must be >= 0, got {labels.min().item()}")
    k = int(labels.max()) + 1 if labels.numel() else 0
    if num_classes is not None:
        if _checks.integer(owner, "num_classes", num_classes, low=1) < k:
            raise ValueError(f"{owner}: num_classes must be >= max(labels) + 1 = {k}, got {num_classes}")
        k = num_classes
    if idx.numel() and (idx.min() < 0 or idx.max() >= labels.numel()):
        raise ValueError(f"{owner}: order must index into labels (0 <= i < {labels.numel()}), "
                         f"got values in [{idx.min().item()}, {idx.max().item()}]")
    nb = idx.numel() // b
    if nb == 0:
        raise ValueError(f"{owner}: order must hold at least one full batch of batch_size={b}, got {idx.numel()}")
    per_slot = labels[idx[: nb * b]].view(nb, b)  # (nb, B)
    return torch.nn.functional.one_hot(per_slot, k).sum(1)  # (nb, K)


def _proportions(owner: str, counts) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor) or counts.dim() != 2:
        raise ValueError(f"{owner}: counts must be a (n_batches, K) tensor, got "
                         f"{type(counts).__name__} {tuple(getattr(counts, 'shape', ()))}")
    counts = counts.double()
    if (counts < 0).any() or (counts.sum(1) == 0).any():
        raise ValueError(f"{owner}: counts must be >= 0 with at least one item per batch")
    return counts / counts.sum(1, keepdim=True)  # (nb, K)


def _reference(owner: str, p, k: int) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64).flatten()  # (K,)
    if p.numel() != k or (p < 0).any() or not math.isclose(p.sum().item(), 1.0, rel_tol=1e-6):
        raise ValueError(f"{owner}: p must be {k} proportions >= 0 summing to 1, got {p.tolist()}")
    return p


def _entropy(q: torch.Tensor) -> torch.Tensor:
    return -(q * q.clamp_min(1e-300).log()).sum(-1)  # 0 log 0 = 0


def majority_share(counts: torch.Tensor) -> torch.Tensor:
    """(nb,): the share of each batch taken by its most common label."""
    return _proportions("majority_share", counts).max(1).values


def batch_entropy(counts: torch.Tensor) -> torch.Tensor:
    """(nb,): entropy (nats) of each batch's label distribution."""
    return _entropy(_proportions("batch_entropy", counts))


def kl_to_dataset(counts: torch.Tensor, p) -> torch.Tensor:
    """(nb,): D(q_b || p) in nats, q_b the batch's label proportions, p the dataset's."""
    q = _proportions("kl_to_dataset", counts)
    p = _reference("kl_to_dataset", p, q.shape[1])
    if ((q > 0) & (p == 0)).any():
        return torch.full((q.shape[0],), math.inf, dtype=torch.float64)
    ratio = torch.where(q > 0, q / p.clamp_min(1e-300), torch.ones_like(q))
    return (q * ratio.log()).sum(1)


def chi_square(counts: torch.Tensor, p) -> torch.Tensor:
    """(nb,): Pearson's X^2 = sum_k (c_k - B p_k)^2 / (B p_k) of each batch against proportions p."""
    c = counts.double() if isinstance(counts, torch.Tensor) else counts
    q = _proportions("chi_square", c)
    p = _reference("chi_square", p, q.shape[1])
    b = c.sum(1, keepdim=True)  # (nb, 1)
    expected = b * p  # (nb, K)
    keep = p > 0
    return ((c[:, keep] - expected[:, keep]) ** 2 / expected[:, keep]).sum(1)


def variance_ratio(values, order, batch_size: int) -> float:
    """Share of the variance of a per-example value that lies between batches (eta squared).

    1 when every batch is homogeneous (e.g. sorted by length), about 1/B under a full shuffle.
    """
    owner = "variance_ratio"
    v = torch.as_tensor(values, dtype=torch.float64).flatten()  # (n,)
    idx = _as_index_tensor(owner, "order", order)
    b = _checks.integer(owner, "batch_size", batch_size, low=1)
    nb = idx.numel() // b
    if nb == 0:
        raise ValueError(f"{owner}: order must hold at least one full batch of batch_size={b}, got {idx.numel()}")
    if idx.min() < 0 or idx.max() >= v.numel():
        raise ValueError(f"{owner}: order must index into values (0 <= i < {v.numel()})")
    x = v[idx[: nb * b]].view(nb, b)  # (nb, B)
    total = (x - x.mean()).pow(2).sum()
    if total == 0:
        return 0.0
    between = b * (x.mean(1) - x.mean()).pow(2).sum()
    return (between / total).item()


def batch_correlation(labels, order, batch_size: int) -> dict:
    """Mean concentration measures of `order`'s batches against the dataset's label proportions.

    Keys: majority_share, baseline_share (max_k p_k: a perfectly mixed batch), entropy_ratio
    (mean H(q)/H(p)), kl (mean nats), chi2 (mean X^2), chi2_ratio (mean X^2 / (K - 1): ~1 under a
    full shuffle), n_batches, n_classes.
    """
    labels = _as_index_tensor("batch_correlation", "labels", labels)
    counts = batch_counts(labels, order, batch_size)  # (nb, K)
    k = counts.shape[1]
    p = torch.bincount(labels, minlength=k).double() / labels.numel()  # (K,)
    h = _entropy(p).item()
    return {
        "majority_share": majority_share(counts).mean().item(),
        "baseline_share": p.max().item(),
        "entropy_ratio": (batch_entropy(counts).mean().item() / h) if h > 0 else 1.0,
        "kl": kl_to_dataset(counts, p).mean().item(),
        "chi2": chi_square(counts, p).mean().item(),
        "chi2_ratio": chi_square(counts, p).mean().item() / max(int((p > 0).sum()) - 1, 1),
        "n_batches": counts.shape[0],
        "n_classes": k,
    }


def mean_item_age(order) -> float:
    """Mean |output position - storage position|: how far an order moves items (0 for none)."""
    idx = _as_index_tensor("mean_item_age", "order", order)
    return (idx - torch.arange(idx.numel())).abs().double().mean().item() if idx.numel() else 0.0


# --------------------------------------------------------------------------- loss jitter


def step_jitter(losses: Sequence[float] | torch.Tensor, *, start: int = 0) -> float:
    """Mean |loss_t - loss_(t-1)| from step `start` on: how much the loss jumps from batch to batch."""
    x = torch.as_tensor(losses, dtype=torch.float64).flatten()[_checks.integer("step_jitter", "start", start):]
    if x.numel() < 2:
        raise ValueError(f"step_jitter: need at least 2 losses from step {start} on, got {x.numel()}")
    return (x[1:] - x[:-1]).abs().mean().item()


# --------------------------------------------------------------------------- the demo corpus


@dataclass
class ClusteredCorpus:
    """Examples stored by source: x, y (n, T) next-token pairs, source (n,) non-decreasing."""

    x: torch.Tensor  # (n, T) inputs
    y: torch.Tensor  # (n, T) targets
    source: torch.Tensor  # (n,) source id of each example, contiguous runs 0, 0, ..., 1, 1, ...
    val_x: torch.Tensor  # (m, T) held-out examples of every source
    val_y: torch.Tensor  # (m, T)
    val_source: torch.Tensor  # (m,)
    vocab_size: int
    n_sources: int

    def __len__(self) -> int:
        return self.x.shape[0]


def letter_permutations(n_sources: int, chars: Sequence[str], *, seed: int = 0) -> torch.Tensor:
    """(n_sources, V) lookup tables: source s maps a-z (and A-Z alike) through its own permutation."""
    owner = "letter_permutations"
    k = _checks.integer(owner, "n_sources", n_sources, low=1)
    g = _generator(owner, seed)
    stoi = {c: i for i, c in enumerate(chars)}
    tables = torch.arange(len(chars)).repeat(k, 1)  # (S, V)
    for case in (string.ascii_lowercase, string.ascii_uppercase):
        if not all(c in stoi for c in case):
            raise ValueError(f"{owner}: chars must contain all of {case!r}")
    for s in range(k):
        perm = torch.randperm(26, generator=g).tolist()
        for case in (string.ascii_lowercase, string.ascii_uppercase):
            for a, b in zip(case, perm):
                tables[s, stoi[a]] = stoi[case[b]]
    return tables


def clustered_corpus(n_sources: int = 4, per_source: int = 256, block_size: int = 32, *, val_per_source: int = 32,
                     stride: int | None = None, cipher: bool = True, seed: int = 0) -> ClusteredCorpus:
    """A corpus stored source after source (see the module docstring).

    The character corpus's training split is cut into n_sources equal contiguous regions; region
    s gives per_source consecutive windows of block_size + 1 characters starting every `stride`
    characters (default block_size + 1: no overlap), and val_per_source non-overlapping windows
    from the region's end for validation, relabelled by source s's letter permutation when `cipher`.
    """
    from labkit.datasets import get_tokenizer, token_dataset

    owner = "clustered_corpus"
    k = _checks.integer(owner, "n_sources", n_sources, low=1)
    per = _checks.integer(owner, "per_source", per_source, low=1)
    t = _checks.integer(owner, "block_size", block_size, low=1)
    nv = _checks.integer(owner, "val_per_source", val_per_source, low=1)
    step = _checks.integer(owner, "stride", t + 1 if stride is None else stride, low=1)
    if not isinstance(cipher, bool):
        raise TypeError(f"{owner}: cipher must be a bool, got {type(cipher).__name__}")
    data = token_dataset("char", "train")  # (N,)
    region = len(data) // k
    need = (per - 1) * step + (nv + 1) * (t + 1)
    if need > region:
        raise ValueError(f"{owner}: per_source={per} windows every {step} tokens plus val_per_source={nv} windows "
                         f"of {t + 1} tokens need {need} tokens, more than a region of {region} ({k} sources)")
    chars = get_tokenizer("char").chars
    tables = letter_permutations(k, chars, seed=seed) if cipher else torch.arange(len(chars)).repeat(k, 1)
    xs, vs = [], []
    for s in range(k):
        start = s * region
        win = data[start + step * torch.arange(per)[:, None] + torch.arange(t + 1)]  # (per, T+1)
        val = data[start + region - nv * (t + 1):start + region].view(nv, t + 1)  # (nv, T+1)
        xs.append(tables[s][win])
        vs.append(tables[s][val])
    w, v = torch.cat(xs), torch.cat(vs)  # (k*per, T+1), (k*nv, T+1)
    return ClusteredCorpus(
        x=w[:, :-1].contiguous(), y=w[:, 1:].contiguous(), source=torch.arange(k).repeat_interleave(per),
        val_x=v[:, :-1].contiguous(), val_y=v[:, 1:].contiguous(), val_source=torch.arange(k).repeat_interleave(nv),
        vocab_size=len(chars), n_sources=k)


def batches_in_order(x: torch.Tensor, y: torch.Tensor, order, batch_size: int, *,
                     device: str | torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x[idx], y[idx]) for consecutive full batches of `order`: (B, T) each."""
    idx = _as_index_tensor("batches_in_order", "order", order)
    b = _checks.integer("batches_in_order", "batch_size", batch_size, low=1)
    return ((x[sel].to(device or x.device), y[sel].to(device or y.device))
            for sel in (idx[i:i + b] for i in range(0, idx.numel() - b + 1, b)))


@torch.no_grad()
def loss_per_source(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, source: torch.Tensor,
                    batch_size: int = 256) -> torch.Tensor:
    """(S,): the model's mean next-token loss on the examples of each source (eval mode)."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    losses = []
    for i in range(0, x.shape[0], batch_size):
        logits, _ = model(x[i:i + batch_size].to(dev))  # (b, T, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), y[i:i + batch_size].to(dev),
                                                reduction="none")  # (b, T)
        losses.append(nll.mean(1).cpu())
    model.train(was)
    per_example = torch.cat(losses)  # (n,)
    k = int(source.max()) + 1
    totals = torch.zeros(k, dtype=per_example.dtype).index_add_(0, source, per_example)  # (S,)
    return totals / torch.bincount(source, minlength=k)


def train_in_order(model: torch.nn.Module, corpus: ClusteredCorpus, order, batch_size: int, *, lr: float = 3e-3,
                   progress: bool = False) -> dict:
    """Train `model` for one pass over `order`; returns losses (per step), the majority source of each
    batch, validation loss per source and overall (mean over sources)."""
    from labkit.models import train

    idx = _as_index_tensor("train_in_order", "order", order)
    b = _checks.integer("train_in_order", "batch_size", batch_size, low=1)
    steps = idx.numel() // b
    if steps == 0:
        raise ValueError(f"train_in_order: order must hold at least one batch of {b}, got {idx.numel()}")
    dev = next(model.parameters()).device
    log = train(model, batches_in_order(corpus.x, corpus.y, idx, b, device=dev), steps, lr=lr, progress=progress)
    counts = batch_counts(corpus.source, idx, b, num_classes=corpus.n_sources)  # (steps, S)
    val = loss_per_source(model, corpus.val_x, corpus.val_y, corpus.val_source)
    return {"losses": log.losses, "batch_source": counts.argmax(1).tolist(), "val_per_source": val.tolist(),
            "val_loss": val.mean().item(), "seconds": log.seconds}


__all__ = [
    "STRATEGIES", "ClusteredCorpus", "batch_correlation", "batch_counts", "batch_entropy", "batches_in_order",
    "buffer_shuffle", "chi_square", "clustered_corpus", "epochs", "full_shuffle", "kl_to_dataset",
    "epoch_order", "letter_permutations", "loss_per_source", "majority_share", "mean_item_age", "sequential",
    "shard_shuffle", "step_jitter", "train_in_order", "variance_ratio",
]
