"""Chapter 11-checkpointing, crash tests: a saving process killed with SIGKILL after each of its I/O
steps (every write chunk, fsync, rename, unlink) must leave load_latest returning the old or the new
checkpoint, bit for bit, and never raising. Processes are started with subprocess (one interpreter
that forks a child per crash point: labkit.train.crashtest), so the whole file stays ~15 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from labkit.train import checkpoint as ck
from labkit.train import crashtest as ct


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Both savers, all crash points, one driver process (files under <tmp>/<saver>/crash-<k>)."""
    return ct.sweep_all(["protocol", "naive"], tmp_path_factory.mktemp("sweeps"))


@pytest.fixture(scope="module")
def protocol_sweep(sweeps):
    return sweeps["protocol"]


def test_every_crash_point_leaves_the_old_or_the_new_checkpoint(protocol_sweep):
    result = protocol_sweep
    assert len(result.points) >= 50 and len(result.points) == len(result.events) + 1
    for prefix in ("mkdir ", "write model shard", "write optimizer shard", "fsync ", "write manifest",
                   "rename manifest", "unlink step-"):                   # unlink: purges (keep_last=2) crash too
        assert any(e.startswith(prefix) for e in result.events), prefix
    assert all(p.process == "killed" for p in result.points[:-1]) and result.points[-1].process == "exit 0"
    assert result.failures == [], [(p.k, p.label, p.outcome, p.expected) for p in result.failures]
    outcomes = {p.outcome for p in result.points}
    assert outcomes == {"old", "new"}
    commits = [p for p in result.points if p.label.endswith("(commit)")]
    assert len(commits) == ct.SAVES and all(p.outcome == "new" for p in commits)
    before = [result.points[p.k - 2] for p in commits]                     # the step just before each rename
    assert all(p.outcome == "old" for p in before)


def test_async_saves_were_crashed_too(protocol_sweep):
    # saves 1 and 3 of the scenario go through async_save: their writes run in the writer thread
    assert {p.save for p in protocol_sweep.points if p.process == "killed"} == set(range(ct.SAVES))


def test_a_crashed_directory_accepts_the_next_save(protocol_sweep, tmp_path):
    """Recovery: resume from what load_latest found and save again, into the same (dirty) directory,
    at the step of the interrupted save: the new checkpoint wins and nothing stale remains."""
    for p in protocol_sweep.points[:-1]:
        directory = protocol_sweep.root / f"crash-{p.k:03d}"
        got = ck.load_latest(directory)
        resumed = -1 if got is None else got[0] // 10 - 1
        step = ct.scenario_step(resumed + 1)
        replacement = ct.scenario_state(resumed + 5)
        ck.save(replacement, directory, step, keep_last=ct.KEEP_LAST)
        step_got, state = ck.load_latest(directory)
        assert step_got == step and ct.same(state, replacement), p
        folder = directory / ck.step_dir_name(step)
        assert len(os.listdir(folder)) == 1 + len(replacement), (p, os.listdir(folder))


def test_the_naive_saver_fails_the_same_sweep(sweeps):
    """The harness can fail: a saver that moves its `latest` pointer before writing, in place,
    leaves a loader that raises at most crash points."""
    result = sweeps["naive"]
    assert len(result.failures) >= len(result.points) // 2
    first = result.points[0]
    assert first.label == "write latest pointer" and first.outcome == "error: FileNotFoundError"
    assert any(p.outcome == "error: RuntimeError" for p in result.failures)      # a torn torch.save file


@pytest.mark.parametrize("offset,expected", [(-1, "old"), (0, "new")])
def test_crash_env_var_in_a_fresh_interpreter(tmp_path, protocol_sweep, offset, expected):
    """LABKIT_CKPT_CRASH_AT=k arms the default trace of a fresh process: killed right before / right
    after the commit rename of the second save, plain `python -c`, default write chunk."""
    trace, marks = ck.IOTrace(record=True), []
    ct.run_scenario("protocol", tmp_path / "dry", trace, marks=marks)
    commit = next(i + 1 for i in range(marks[1], marks[2]) if trace.events[i].endswith("(commit)"))
    k = commit + offset
    code = ("from labkit.train import crashtest as ct; "
            f"ct.run_scenario('protocol', {str(tmp_path / 'run')!r})")
    env = {**os.environ, ck.CRASH_ENV: str(k), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert ct.classify("protocol", tmp_path / "run", save=1) == expected
