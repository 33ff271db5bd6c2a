"""labkit.runtime: device choice, size profiles, seeding, data folder, Triton's interpreter."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit import runtime

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value", ["cpu", "CPU", " cpu "])
def test_labkit_device_cpu_forces_the_cpu(monkeypatch, value):
    monkeypatch.setenv("LABKIT_DEVICE", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # even with a GPU present
    assert runtime.device() == torch.device("cpu")
    assert not runtime.on_gpu() and runtime.profile() == "cpu"
    assert runtime.pick(cpu=1, gpu=2) == 1


def test_cuda_is_used_when_present(monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.device() == torch.device("cuda")
    assert runtime.on_gpu() and runtime.profile() == "gpu"
    assert runtime.pick(cpu=256, gpu=8192) == 8192


# conftest skips by marker (get_closest_marker("gpu")), so the parameter id "gpu" is harmless
@pytest.mark.parametrize("value", ["gpu", "cuda:0", "tpu"])
def test_bad_labkit_device_raises(monkeypatch, value):
    monkeypatch.setenv("LABKIT_DEVICE", value)
    with pytest.raises(ValueError, match=f"LABKIT_DEVICE must be 'cpu' or 'cuda', got '{value}'"):
        runtime.device()
    with pytest.raises(ValueError, match="LABKIT_DEVICE"):
        runtime.pick(cpu=1, gpu=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's answers")
def test_on_this_cpu_machine(monkeypatch):
    monkeypatch.delenv("LABKIT_DEVICE", raising=False)
    assert runtime.device() == torch.device("cpu")
    assert runtime.profile() == "cpu"
    assert runtime.pick(cpu="small", gpu="large") == "small"
    monkeypatch.setenv("LABKIT_DEVICE", "cuda")  # asking for CUDA without one falls back to the CPU
    assert runtime.device() == torch.device("cpu")


def test_pick_takes_keywords_only():
    with pytest.raises(TypeError):
        runtime.pick(1, 2)
    with pytest.raises(TypeError):
        runtime.pick(cpu=1)


def test_seed_everything_makes_runs_reproducible():
    g = runtime.seed_everything(123)
    a = (torch.rand(5), random.random(), np.random.rand(), torch.rand(3, generator=g))
    g = runtime.seed_everything(123)
    b = (torch.rand(5), random.random(), np.random.rand(), torch.rand(3, generator=g))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2] and torch.equal(a[3], b[3])
    runtime.seed_everything(124)
    assert not torch.equal(torch.rand(5), a[0])
    assert isinstance(g, torch.Generator) and g.initial_seed() == 123


def test_seed_everything_default_is_zero():
    runtime.seed_everything()
    a = torch.rand(4)
    runtime.seed_everything(0)
    assert torch.equal(a, torch.rand(4))


@pytest.mark.parametrize("seed", [1.0, "1", None, True])
def test_seed_everything_rejects_non_int(seed):
    with pytest.raises(TypeError, match=f"seed must be an int, got {type(seed).__name__}"):
        runtime.seed_everything(seed)


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    assert runtime.data_dir() == ROOT / "data"
    assert runtime.repo_root() == ROOT
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    assert runtime.data_dir() == tmp_path
    monkeypatch.setenv("LABKIT_DATA", "")
    assert runtime.data_dir() == ROOT / "data"


def _import_labkit(env_changes: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LABKIT_DEVICE")}
    env.update(env_changes)
    code = "import os, labkit; print(os.environ.get('TRITON_INTERPRET'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="without CUDA only")
def test_import_labkit_turns_on_the_triton_interpreter_without_cuda():
    assert _import_labkit({}) == "1"


def test_labkit_device_cpu_turns_on_the_triton_interpreter():
    assert _import_labkit({"LABKIT_DEVICE": "cpu"}) == "1"


def test_configure_triton_respects_an_explicit_setting(monkeypatch):
    monkeypatch.setenv("LABKIT_DEVICE", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert runtime.configure_triton() is False
    assert os.environ["TRITON_INTERPRET"] == "0"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert runtime.configure_triton() is True
    assert os.environ["TRITON_INTERPRET"] == "1"
