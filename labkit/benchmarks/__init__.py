"""Chapter benchmarks: `labkit/benchmarks/<slug>.py` defines `run(quick=False) -> list[dict]`.

`labkit bench <chapter>` runs one and records it under data/bench/ (see labkit.bench).
"""

from __future__ import annotations

import torch

from labkit import datasets, runtime
from labkit.models import GPTConfig, TinyGPT


def char_gpt(*, seed: int = 0, device: torch.device | str | None = None, **config) -> TinyGPT:
    """The benchmarks' model: a TinyGPT over the Shakespeare corpus's character vocabulary, built right
    after seed_everything(seed), so the same config and seed give the same weights in every chapter."""
    runtime.seed_everything(seed)
    model = TinyGPT(GPTConfig(vocab_size=datasets.get_tokenizer("char").vocab_size, **config))
    return model if device is None else model.to(device)
