"""The `labkit` command, on tiny repositories in tmp_path (labkit.runtime.repo_root patched)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from labkit import bench, cli, runtime, student

from _helpers import ROOT, chapter, create_files, fake_benchmark_result, install_fake_benchmarks, write_book

# A draft chapter with a notebook, and a planned one that only has (fake) benchmarks.
CHAPTERS = [chapter("01-alpha", title="Alpha", status="draft"),
            chapter("02-fake-bench", title="Benchmarks only", tests=[], device="gpu", minutes=10)]

SOLUTION = {
    "cells": [{"cell_type": "code", "execution_count": 1, "id": "ex", "metadata": {},
               "outputs": [{"name": "stdout", "output_type": "stream", "text": "hi\n"}],
               "source": "def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n"}],
    "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
}


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    write_book(tmp_path, CHAPTERS, parts=((1, "First things"),), title="Tiny course")
    create_files(tmp_path, CHAPTERS[0])  # the notebook is a stale "{}"
    (tmp_path / "solutions/01-alpha.ipynb").write_text(json.dumps(SOLUTION))
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
    return install_fake_benchmarks(monkeypatch)


def test_bench_runs_and_records(repo, fake_bench, capsys):
    assert cli.main(["bench", "2", "--quick"]) == 0
    assert fake_bench == [True]
    out = capsys.readouterr().out
    assert out.startswith("02-fake-bench on cpu: ")
    assert "name=fake kernel" in out and "n=8" in out and "median_ms=0.125" in out
    rec = bench.load("02-fake-bench", "cpu")
    assert rec["results"] == fake_benchmark_result(quick=True)
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
