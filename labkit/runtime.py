"""Where the course runs: device choice, seeding, size profiles, Triton's interpreter.

Every chapter sizes its experiments with `pick(cpu=..., gpu=...)`, so the same cell takes
seconds on a 2-core laptop and shows the real effect on an H100.

Environment:
    LABKIT_DEVICE=cpu   force the CPU even when CUDA is present
    LABKIT_DATA=PATH    where the course's data files live (default: the repository's data/)
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch


def _cuda_wanted() -> bool:
    forced = os.environ.get("LABKIT_DEVICE", "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"LABKIT_DEVICE must be 'cpu' or 'cuda', got {forced!r}")
    if forced == "cpu":
        return False
    return torch.cuda.is_available()


def configure_triton() -> bool:
    """Switch Triton to its CPU interpreter when there is no GPU; returns whether it is on.

    Must run before any `@triton.jit` kernel is defined (labkit's __init__ calls it).
    """
    if not _cuda_wanted():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_gpu() -> bool:
    """True when chapters should run on CUDA."""
    return _cuda_wanted()


def device() -> torch.device:
    """The device chapters run on: cuda if present (and not forced off), else cpu."""
    return torch.device("cuda" if on_gpu() else "cpu")


def profile() -> str:
    """'gpu' or 'cpu': which size profile the chapters use."""
    return "gpu" if on_gpu() else "cpu"


def pick(*, cpu, gpu):
    """The value for the current size profile: `pick(cpu=256, gpu=8192)`."""
    return gpu if on_gpu() else cpu


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); returns a torch.Generator seeded the same."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed_everything: seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must never be the thing that fails
        pass
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def repo_root() -> Path:
    """The checkout the package was installed from (editable install)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The course's data/ folder (LABKIT_DATA overrides)."""
    return Path(os.environ.get("LABKIT_DATA") or repo_root() / "data")
