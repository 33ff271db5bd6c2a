"""labkit.bench: timing, records (in tmp dirs), summaries, running a chapter's benchmarks."""

from __future__ import annotations

import json

import pytest
import torch

from labkit import bench, runtime
from labkit.bench import Timing

from _helpers import fake_benchmark_result, install_fake_benchmarks


# --- timeit -----------------------------------------------------------------------------


def test_timeit_runs_warmup_then_repeats_and_reports_a_positive_median():
    calls = []
    x = torch.randn(64, 64)

    def work():
        calls.append(1)
        return x @ x

    t = bench.timeit(work, warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7
    assert isinstance(t, Timing) and len(t.times) == 5
    assert t.median_s > 0 and 0 < t.min_s <= t.median_s <= max(t.times)
    assert t.median_ms == pytest.approx(t.median_s * 1e3)
    assert t.device.startswith("cpu: ")


def test_timeit_defaults_to_the_runtime_device(monkeypatch):
    monkeypatch.setenv("LABKIT_DEVICE", "cpu")
    t = bench.timeit(lambda: None, warmup=0, repeats=1)
    assert len(t.times) == 1 and t.device == bench.device_name("cpu")


@pytest.mark.parametrize("kw,fragment", [
    (dict(repeats=0), "repeats must be an int >= 1, got 0"),
    (dict(repeats=2.5), "repeats must be an int >= 1, got 2.5"),
    (dict(repeats=True), "repeats must be an int >= 1, got True"),
    (dict(warmup=-1), "warmup must be an int >= 0, got -1"),
    (dict(warmup="3"), "warmup must be an int >= 0, got '3'"),
])
def test_timeit_validates_counts(kw, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        bench.timeit(lambda: None, device="cpu", **kw)


def test_timeit_rejects_a_non_callable():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        bench.timeit(3)


def test_device_name_and_environment(monkeypatch):
    monkeypatch.setenv("LABKIT_DEVICE", "cpu")
    assert bench.device_name().startswith("cpu: ")
    env = bench.environment()
    assert {"device", "torch", "triton", "python", "date", "profile"} <= set(env)
    assert env["profile"] == "cpu" and env["torch"] == torch.__version__


# --- record / load ----------------------------------------------------------------------


RESULTS = [
    {"name": "matmul", "shape": [256, 256], "dtype": torch.float32, "median_ms": 1.23456, "ratio": 2.0},
    {"name": "baseline", "shape": [256, 256], "dtype": torch.float32, "median_ms": 2.46912, "note": None},
]


def test_record_load_round_trip(tmp_path):
    path = bench.record("01-alpha", RESULTS, directory=tmp_path)
    assert path == tmp_path / "01-alpha.json" and path.exists()
    rec = bench.load("01-alpha", "cpu", directory=tmp_path)
    assert {"device", "torch", "triton", "python", "date", "profile"} <= set(rec["meta"])
    assert rec["meta"]["profile"] == "cpu"
    assert rec["results"][0] == {"name": "matmul", "shape": [256, 256], "dtype": "torch.float32",
                                 "median_ms": 1.23456, "ratio": 2.0}
    assert rec["results"][1]["note"] is None
    assert bench.load("01-alpha", "gpu", directory=tmp_path) is None  # no GPU run recorded
    assert bench.load("02-beta", "cpu", directory=tmp_path) is None  # no file


def test_timing_is_stored_as_a_dict(tmp_path):
    t = Timing(0.5, 0.4, [0.4, 0.5, 0.6], "cpu: test")
    bench.record("01-alpha", [{"name": "t", "timing": t}], directory=tmp_path)
    got = bench.load("01-alpha", "cpu", directory=tmp_path)["results"][0]["timing"]
    assert got == {"median_s": 0.5, "min_s": 0.4, "times": [0.4, 0.5, 0.6], "device": "cpu: test"}


def test_cpu_and_gpu_records_are_kept_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "profile", lambda: "gpu")
    bench.record("01-alpha", [{"name": "gpu-run", "median_ms": 0.1}], directory=tmp_path)
    monkeypatch.setattr(runtime, "profile", lambda: "cpu")
    bench.record("01-alpha", [{"name": "cpu-run", "median_ms": 9.0}], directory=tmp_path)
    gpu = bench.load("01-alpha", "gpu", directory=tmp_path)
    cpu = bench.load("01-alpha", "cpu", directory=tmp_path)
    assert gpu["results"] == [{"name": "gpu-run", "median_ms": 0.1}] and gpu["meta"]["profile"] == "gpu"
    assert cpu["results"] == [{"name": "cpu-run", "median_ms": 9.0}] and cpu["meta"]["profile"] == "cpu"
    # a second CPU run replaces the CPU record only
    bench.record("01-alpha", [{"name": "cpu-run-2"}], directory=tmp_path)
    assert bench.load("01-alpha", "gpu", directory=tmp_path) == gpu
    assert bench.load("01-alpha", "cpu", directory=tmp_path)["results"] == [{"name": "cpu-run-2"}]
    assert set(json.loads((tmp_path / "01-alpha.json").read_text())) == {"cpu", "gpu"}


@pytest.mark.parametrize("results", [[1, 2], {"name": "x"}, "results", [{"ok": 1}, ["no"]], None])
def test_record_refuses_anything_but_a_list_of_dicts(tmp_path, results):
    with pytest.raises(TypeError, match="results must be a list of dicts"):
        bench.record("01-alpha", results, directory=tmp_path)
    assert not (tmp_path / "01-alpha.json").exists()


def test_record_refuses_unstorable_values_and_keeps_the_old_record(tmp_path):
    bench.record("01-alpha", [{"name": "good"}], directory=tmp_path)
    before = (tmp_path / "01-alpha.json").read_text()
    with pytest.raises(TypeError, match="cannot store a object"):
        bench.record("01-alpha", [{"name": "bad", "value": object()}], directory=tmp_path)
    assert (tmp_path / "01-alpha.json").read_text() == before


@pytest.mark.parametrize("chapter", ["", "a/b", None, 3])
def test_bad_chapter_ids(tmp_path, chapter):
    with pytest.raises(ValueError, match="chapter must be a chapter id"):
        bench.record(chapter, [], directory=tmp_path)
    with pytest.raises(ValueError, match="chapter must be a chapter id"):
        bench.load(chapter, directory=tmp_path)


def test_load_rejects_a_bad_profile(tmp_path):
    with pytest.raises(ValueError, match="profile must be 'gpu' or 'cpu', got 'tpu'"):
        bench.load("01-alpha", "tpu", directory=tmp_path)


def test_default_directory_follows_labkit_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    assert bench.bench_dir() == tmp_path / "bench"
    path = bench.record("01-alpha", [{"name": "x"}])
    assert path == tmp_path / "bench" / "01-alpha.json"
    assert bench.load("01-alpha", "cpu")["results"] == [{"name": "x"}]


# --- summary and run_chapter ------------------------------------------------------------


def test_summary_without_a_record():
    assert bench.summary("01-alpha", None) == "01-alpha: no record yet"


def test_summary_names_device_and_formats_results(tmp_path):
    bench.record("01-alpha", RESULTS, directory=tmp_path)
    rec = bench.load("01-alpha", "cpu", directory=tmp_path)
    text = bench.summary("01-alpha", rec)
    head, first, second = text.splitlines()
    assert head.startswith(f"01-alpha on {rec['meta']['device']} (torch {torch.__version__}")
    for part in ("dtype=torch.float32", "median_ms=1.235", "name=matmul", "ratio=2", "shape=[256, 256]"):
        assert part in first
    assert "name=baseline" in second and "note=None" in second


def test_record_keeps_the_column_order_of_each_result(tmp_path):
    """summary() and viz.bench_table show a result's keys in order: "name" first, as the chapter wrote it."""
    bench.record("01-alpha", RESULTS, directory=tmp_path)
    rec = bench.load("01-alpha", "cpu", directory=tmp_path)
    assert list(rec["results"][0]) == list(RESULTS[0])
    assert bench.summary("01-alpha", rec).splitlines()[1].startswith("  name=matmul, shape=[256, 256]")


@pytest.fixture
def fake_benchmarks(monkeypatch):
    return install_fake_benchmarks(monkeypatch)


def test_run_chapter_runs_and_records(tmp_path, monkeypatch, fake_benchmarks):
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    results = bench.run_chapter("07-fake-bench", quick=True)
    assert results == fake_benchmark_result(quick=True) and fake_benchmarks == [True]
    assert bench.load("07-fake-bench", "cpu")["results"] == results


def test_run_chapter_without_saving(tmp_path, monkeypatch, fake_benchmarks):
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))
    assert bench.run_chapter("fake-bench", save=False)[0]["n"] == 4096
    assert fake_benchmarks == [False]
    assert not (tmp_path / "bench").exists()
