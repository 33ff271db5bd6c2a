"""The `labkit` command, on tiny repositories in tmp_path (labkit.runtime.repo_root patched)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from labkit import bench, cli, runtime, student

ROOT = Path(__file__).resolve().parent.parent

TINY = """\
[book]
title = "Tiny course"

[[parts]]
number = 1
title = "First things"

[[chapters]]
id = "01-alpha"
title = "Alpha"
part = 1
sources = ["An article"]
modules = ["labkit.tiny.alpha"]
solution = "solutions/01-alpha.ipynb"
notebook = "notebooks/01-alpha.ipynb"
tests = ["tests/test_alpha.py"]
device = "cpu"
minutes = 30
status = "draft"

[[chapters]]
id = "02-fake-bench"
title = "Benchmarks only"
part = 1
sources = ["Another article"]
modules = ["labkit.tiny.beta"]
solution = "solutions/02-fake-bench.ipynb"
notebook = "notebooks/02-fake-bench.ipynb"
tests = []
device = "gpu"
minutes = 10
status = "planned"
"""

SOLUTION = {
    "cells": [{"cell_type": "code", "execution_count": 1, "id": "ex", "metadata": {},
               "outputs": [{"name": "stdout", "output_type": "stream", "text": "hi\n"}],
               "source": "def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n"}],
    "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
}


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    (tmp_path / "book.toml").write_text(TINY, encoding="utf-8")
    for p in ("tests/test_alpha.py", "labkit/tiny/alpha.py"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("")
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions/01-alpha.ipynb").write_text(json.dumps(SOLUTION))
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks/01-alpha.ipynb").write_text("{}")  # stale
    monkeypatch.setattr(runtime, "repo_root", lambda: tmp_path)
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path / "data"))
    return tmp_path


def test_list_names_every_chapter_and_part_of_the_course(tmp_path, monkeypatch, capsys):
    """`labkit list` on the repository's manifest (read as all-planned, so chapter files do not matter)."""
    text = (ROOT / "book.toml").read_text(encoding="utf-8")
    ids = re.findall(r'(?m)^id = "([^"]+)"$', text)
    part_titles = re.findall(r'(?m)^\[\[parts\]\]\nnumber = \d+\ntitle = "([^"]+)"$', text)
    (tmp_path / "book.toml").write_text(re.sub(r'(?m)^status = "\w+"$', 'status = "planned"', text), encoding="utf-8")
    monkeypatch.setattr(runtime, "repo_root", lambda: tmp_path)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "LLM Systems Lab: 29 chapters in 9 parts"
    assert len(ids) == 29 and len(part_titles) == 9
    for cid in ids:
        assert re.search(rf"(?m)^  {re.escape(cid)} ", out), cid
    for n, title in enumerate(part_titles, 1):
        assert f"Part {n}. {title}" in out
    assert out.rstrip().splitlines()[-1] == "29 planned, 0 draft, 0 complete"


def test_list_on_a_tiny_repo(repo, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Tiny course: 2 chapters in 1 parts" in out and "Part 1. First things" in out
    assert re.search(r"01-alpha\s+Alpha\s+draft\s+cpu\s+30 min", out)
    assert "1 planned, 1 draft, 0 complete" in out


def test_student_check_fails_on_a_stale_repo_and_passes_after_the_build(repo, capsys):
    assert cli.main(["student", "--check"]) == 1
    out = capsys.readouterr().out
    assert "notebooks/00-start.ipynb: missing" in out
    assert "notebooks/01-alpha.ipynb: differs from the student build of solutions/" in out
    assert "notebooks/ is stale" in out

    assert cli.main(["student"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "01-alpha.ipynb" in out
    assert student.stale() == []

    assert cli.main(["student", "--check"]) == 0
    assert "notebooks/ matches the student build" in capsys.readouterr().out
    assert cli.main(["check"]) == 0
    assert "book.toml: 2 chapters, 1 with notebooks" in capsys.readouterr().out


def test_check_reports_a_broken_manifest(repo, capsys):
    (repo / "tests/test_alpha.py").unlink()
    assert cli.main(["check"]) == 2
    err = capsys.readouterr().err
    assert "labkit: book.toml: chapter 01-alpha: tests: 'tests/test_alpha.py' does not exist" in err


def test_student_reports_bad_markers(repo, capsys):
    bad = json.loads(json.dumps(SOLUTION))
    bad["cells"][0]["source"] = "x = 1\n### END SOLUTION\n"
    (repo / "solutions/01-alpha.ipynb").write_text(json.dumps(bad))
    assert cli.main(["student"]) == 2
    assert "solutions/01-alpha.ipynb: cell 0: line 2" in capsys.readouterr().err


@pytest.fixture
def fake_bench(monkeypatch):
    calls = []

    def run(quick: bool = False):
        calls.append(quick)
        return [{"name": "fake kernel", "n": 8 if quick else 4096, "median_ms": 0.125}]

    module = types.ModuleType("labkit.benchmarks.fake_bench")
    module.run = run
    monkeypatch.setitem(sys.modules, "labkit.benchmarks.fake_bench", module)
    return calls


def test_bench_runs_and_records(repo, fake_bench, capsys):
    assert cli.main(["bench", "2", "--quick"]) == 0
    assert fake_bench == [True]
    out = capsys.readouterr().out
    assert out.startswith("02-fake-bench on cpu: ")
    assert "name=fake kernel" in out and "n=8" in out and "median_ms=0.125" in out
    rec = bench.load("02-fake-bench", "cpu")
    assert rec["results"] == [{"name": "fake kernel", "n": 8, "median_ms": 0.125}]
    assert (repo / "data/bench/02-fake-bench.json").exists()


def test_bench_no_save(repo, fake_bench, capsys):
    assert cli.main(["bench", "fake-bench", "--no-save"]) == 0
    assert fake_bench == [False] and "n=4096" in capsys.readouterr().out
    assert not (repo / "data/bench").exists()


def test_bench_unknown_chapter(repo, capsys):
    assert cli.main(["bench", "nope"]) == 2
    assert "no chapter 'nope'" in capsys.readouterr().err


def test_validate_refuses_planned_chapters(repo, capsys, monkeypatch):
    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: pytest.fail("must not run pytest"))
    assert cli.main(["validate", "02"]) == 2
    assert "planned chapters have no notebooks yet: 02-fake-bench" in capsys.readouterr().out


def test_validate_runs_nbval_on_solution_notebook_and_start_page(repo, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd=None: calls.append((cmd, cwd)) or 0)
    assert cli.main(["validate"]) == 0
    (cmd, cwd), = calls
    assert cwd == repo and "--nbval-lax" in cmd
    assert cmd[-3:] == [str(repo / "solutions/01-alpha.ipynb"), str(repo / "notebooks/01-alpha.ipynb"),
                        str(repo / "notebooks/00-start.ipynb")]
    calls.clear()
    assert cli.main(["validate", "alpha"]) == 0
    assert calls[0][0][-2:] == [str(repo / "solutions/01-alpha.ipynb"), str(repo / "notebooks/01-alpha.ipynb")]


def test_usage_errors_exit_with_argparse_code(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
