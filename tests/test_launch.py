"""labkit.parallel.launch: real gloo process groups in subprocesses; failures name the rank and never hang."""

import time

import pytest
import torch
import torch.distributed as dist

from labkit.parallel.launch import RankError, launch, rank, world_size

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


# Functions the ranks import (module level, so the subprocesses find them by name).
def _sum_of_ranks(offset):
    t = torch.tensor([float(rank() + offset)])
    dist.all_reduce(t)
    return t.item(), world_size(), dist.get_backend()


def _raise_on_one():
    if rank() == 1:
        raise ValueError("rank one refuses")
    t = torch.ones(1)
    dist.all_reduce(t)


def _skip_collective_and_wait():
    if rank() == 1:
        time.sleep(60)  # alive, but never joins the all_reduce
        return
    dist.all_reduce(torch.ones(1))


def _sleep():
    time.sleep(60)


def _unpicklable():
    return lambda: 0


@pytest.mark.parametrize("n", [2, 4])
def test_results_come_back_in_rank_order(n):
    out = launch(_sum_of_ranks, n, args=(1,))
    total = sum(r + 1 for r in range(n))
    assert out == [(float(total), n, "gloo")] * n


def test_the_rank_that_raised_is_named_not_its_victims():
    with pytest.raises(RankError, match="rank 1 failed first") as err:
        launch(_raise_on_one, 2)
    assert err.value.rank == 1
    assert "ValueError: rank one refuses" in str(err.value)


def test_a_skipped_collective_times_out_on_the_waiting_rank():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 0 failed first") as err:
        launch(_skip_collective_and_wait, 2, timeout=3, grace=1)
    assert "Timed out" in err.value.failures[0]
    assert "killed after another rank failed" in err.value.failures[1]
    assert time.monotonic() - t0 < 30  # the process-group timeout fired, not the 60 s sleep


def test_deadline_kills_everything():
    with pytest.raises(RankError, match="deadline of 3 s passed"):
        launch(_sleep, 2, deadline=3)


def test_unpicklable_result_is_the_functions_error():
    with pytest.raises(RankError, match="cannot be pickled"):
        launch(_unpicklable, 2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="importable"):
        launch(lambda: 0, 2)
    with pytest.raises(ValueError, match="module:function"):
        launch("no_colon", 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        launch(_sleep, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        launch(_sleep, 2, backend="mpi")
    with pytest.raises(ValueError, match="timeout must be in"):
        launch(_sleep, 2, timeout=0)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="one GPU per rank"):
            launch(_sleep, 64, backend="nccl")


def _world_report():
    t = torch.ones(1)
    dist.all_reduce(t)
    return f"world={world_size()} sum={t.item():g}"


def test_the_same_function_runs_under_torchrun(tmp_path):
    """The multi-node path: torchrun starts the ranks, `python -m labkit.parallel.launch module:fn` joins them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "labkit.parallel.launch", "test_launch:_world_report"],
        env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world=2 sum=2" in out.stdout
