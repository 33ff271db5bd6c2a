"""Shared test set-up: markers, hypothesis profiles, the repository root."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent

# CI has 2 cores: keep property tests lean there; `HYPOTHESIS_PROFILE=thorough` for more.
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU runner: make gpu)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _cpu_profile_unless_gpu(request, monkeypatch):
    """Tests run the CPU profile (and file records under 'cpu') unless marked `gpu`, even on a GPU machine."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("LABKIT_DEVICE", "cpu")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on a shared 2-core machine a second OpenMP thread makes tiny ops
    (an SVD, a small matmul) up to ~100x slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
