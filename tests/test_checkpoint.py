"""Chapter 11-checkpointing: labkit.train.checkpoint (the commit protocol, verification, purge, async
saves from a snapshot, exact resume), its cost model, exercises, figures and benchmark.
The crash tests (SIGKILL at every I/O step) are in test_checkpoint_crash.py."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit import datasets
from labkit.exercises import exercises_for, lookup
from labkit.models import GPTConfig, TinyGPT
from labkit.optim import AdamW, WarmupCosine, lambda_lr
from labkit.train import checkpoint as ck
from labkit.train.crashtest import same


def sample_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, generator=gen)
    return {
        "model": {"w": w, "tied": w, "half": torch.randn(4, generator=gen).to(torch.bfloat16),
                  "ints": torch.randint(-5, 5, (3, 2), generator=gen), "mask": torch.tensor([True, False]),
                  "empty": torch.zeros(0, 3), "view": w.t()[1:3]},       # a non-contiguous view
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(6, 5, generator=gen)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0], "name": None}]},
        "meta": {"note": "hello", "seed": seed, "nested": [1, 2.5, (3, "x")]},
    }


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def shard_path(directory: Path, step: int, key: str) -> Path:
    folder = directory / ck.step_dir_name(step)
    return folder / json.loads((folder / ck.MANIFEST).read_text())["shards"][key]["file"]


# --- the protocol: round trip, layout, verification ------------------------------------------------


def test_round_trip_is_bitwise_and_layout_is_the_documented_one(tmp_path):
    state = sample_state()
    folder = ck.save(state, tmp_path, 7)
    assert folder == tmp_path / "step-000000007"
    manifest = json.loads((folder / ck.MANIFEST).read_text())
    assert manifest["format"] == ck.FORMAT and manifest["step"] == 7 and set(manifest["shards"]) == set(state)
    for entry in manifest["shards"].values():
        data = (folder / entry["file"]).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert sorted(os.listdir(folder)) == sorted([ck.MANIFEST] + [e["file"] for e in manifest["shards"].values()])
    step, got = ck.load_latest(tmp_path)
    assert step == 7 and same(got, state)
    assert got["model"]["tied"].data_ptr() == got["model"]["w"].data_ptr()   # torch.save keeps the aliasing


def test_load_latest_returns_newest_and_none_when_empty(tmp_path):
    assert ck.load_latest(tmp_path / "missing") is None
    assert ck.load_latest(tmp_path) is None
    for step in (5, 50, 20):
        ck.save(sample_state(step), tmp_path, step)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "step-abc").mkdir()
    step, got = ck.load_latest(tmp_path)
    assert step == 50 and same(got, sample_state(50))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_shard", "delete_manifest", "garbage_manifest",
                                    "wrong_step"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    ck.save(sample_state(1), tmp_path, 1)
    ck.save(sample_state(2), tmp_path, 2)
    folder, shard = tmp_path / "step-000000002", shard_path(tmp_path, 2, "optimizer")
    if damage == "flip":
        flip_byte(shard)                                  # torch.load would accept it silently: only the hash sees it
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete_shard":
        shard.unlink()
    elif damage == "delete_manifest":
        (folder / ck.MANIFEST).unlink()
    elif damage == "garbage_manifest":
        (folder / ck.MANIFEST).write_text('{"format": ')
    else:
        m = json.loads((folder / ck.MANIFEST).read_text())
        m["step"] = 3
        (folder / ck.MANIFEST).write_text(json.dumps(m))
    step, got = ck.load_latest(tmp_path)
    assert step == 1 and same(got, sample_state(1))
    newest = ck.list_checkpoints(tmp_path)[0]
    assert newest.step == 2 and newest.status == ("uncommitted" if damage == "delete_manifest" else "invalid")
    if damage == "flip":
        assert "sha256" in newest.reason


def test_bit_flip_is_invisible_to_torch_load_but_not_to_the_manifest(tmp_path):
    ck.save({"model": {"w": torch.arange(4096, dtype=torch.float32)}}, tmp_path, 1)
    shard = shard_path(tmp_path, 1, "model")
    flip_byte(shard, offset=len(shard.read_bytes()) // 2)
    loaded = torch.load(shard, weights_only=True)["w"]       # no error: a silently wrong tensor
    assert (loaded != torch.arange(4096, dtype=torch.float32)).sum() == 1
    assert ck.load_latest(tmp_path) is None


def test_unpicklable_under_weights_only_is_skipped(tmp_path):
    ck.save(sample_state(1), tmp_path, 1)
    ck.save({"model": {"w": torch.ones(2)}, "extra": {"obj": Path("x")}}, tmp_path, 2)  # not allow-listed
    step, _ = ck.load_latest(tmp_path)
    assert step == 1
    assert "Unpickl" in ck.list_checkpoints(tmp_path)[0].reason or "weights" in ck.list_checkpoints(tmp_path)[0].reason


def test_resaving_a_step_replaces_it_and_leaves_no_stale_files(tmp_path):
    ck.save(sample_state(1), tmp_path, 3)
    folder = ck.save(sample_state(2), tmp_path, 3)
    step, got = ck.load_latest(tmp_path)
    assert step == 3 and same(got, sample_state(2))
    assert len(os.listdir(folder)) == 1 + len(sample_state())
    (folder / f"{ck.MANIFEST}.tmp-deadbeef").write_text("left by a crash")
    ck.save(sample_state(3), tmp_path, 3)
    assert not any(".tmp-" in n for n in os.listdir(folder))


def test_io_trace_records_the_protocol_in_order(tmp_path):
    trace = ck.IOTrace(record=True, write_chunk=1 << 30)
    ck.save({"model": {"w": torch.ones(3)}, "optimizer": {"x": 1}}, tmp_path, 1, io=trace)
    assert trace.events == [
        "mkdir checkpoint dir", "fsync checkpoints dir", "fsync model shard", "fsync optimizer shard",
        "fsync checkpoint dir (shard entries)", "write manifest (temporary name)", "fsync manifest",
        "rename manifest -> MANIFEST.json (commit)", "fsync checkpoint dir"]
    small = ck.IOTrace(record=True, write_chunk=64)
    ck.save({"model": {"w": torch.ones(300)}}, tmp_path, 2, io=small)
    writes = [e for e in small.events if e.startswith("write model")]
    assert len(writes) >= 1200 // 64 and small.count == len(small.events)


# --- purge: keep the last k -------------------------------------------------------------------------


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_purge_keeps_the_newest_k_committed(tmp_path, keep_last):
    for step in range(1, 6):
        ck.save(sample_state(step), tmp_path, step * 10, keep_last=keep_last)
    kept = [c.step for c in ck.list_checkpoints(tmp_path)]
    assert kept == [50, 40, 30][:keep_last]
    assert all(c.status == "valid" for c in ck.list_checkpoints(tmp_path))


def test_purge_removes_old_partial_directories_but_not_newer_ones(tmp_path):
    for step in (10, 20, 30):
        ck.save(sample_state(step), tmp_path, step)
    (tmp_path / ck.step_dir_name(15)).mkdir()               # a torn save from long ago
    (tmp_path / ck.step_dir_name(40)).mkdir()               # newer than anything committed
    assert ck.purge(tmp_path, 2) == [10, 15]
    assert [c.step for c in ck.list_checkpoints(tmp_path, verify=False)] == [40, 30, 20]


@given(st.lists(st.integers(0, 60), max_size=12, unique=True), st.lists(st.integers(0, 60), max_size=6, unique=True),
       st.integers(1, 5))
def test_purge_plan_properties(committed, partial, keep_last):
    partial = [p for p in partial if p not in committed]
    doomed = ck.purge_plan(committed, partial, keep_last)
    assert doomed == sorted(doomed) and set(doomed) <= set(committed) | set(partial)
    kept = sorted(set(committed) - set(doomed), reverse=True)
    assert kept[:keep_last] == sorted(committed, reverse=True)[:keep_last]     # the newest k always survive
    assert len(kept) == min(keep_last, len(committed))                          # and only they
    if kept and len(committed) >= keep_last:
        assert all(s >= kept[-1] for s in set(partial) - set(doomed))


# --- snapshots and async saves --------------------------------------------------------------------


def test_snapshot_copies_once_per_alias_and_counts_bytes(tmp_path):
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_embd=16, n_head=2))  # tied embeddings
    sd = model.state_dict()
    assert ck.state_nbytes(sd) == 4 * sum(p.numel() for p in model.parameters())
    snap = ck.snapshot(sd)
    assert snap["tok_emb.weight"].data_ptr() == snap["lm_head.weight"].data_ptr()
    assert all(snap[k].data_ptr() != v.data_ptr() for k, v in sd.items())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    names = {n for n, _ in model.named_parameters()}
    assert all(torch.equal(snap[k] + 1.0, v) for k, v in model.state_dict().items() if k in names)


def test_async_save_persists_the_state_before_the_mutation(tmp_path):
    """The writer is held at its first I/O step while the trainer mutates everything in place:
    the checkpoint must still hold the values at the time of the call."""
    model = TinyGPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_embd=16, n_head=2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randint(0, 32, (2, 8))
    model(x, x)[1].backward()
    opt.step()
    expected = ck.snapshot(ck.training_state(model, opt, data_position=5))
    release, reached = threading.Event(), threading.Event()

    def hold(count, label):
        if count == 1:
            reached.set()
            assert release.wait(30)

    with ck.AsyncCheckpointer() as saver:
        future = saver.save(ck.training_state(model, opt, data_position=5), tmp_path, 1,
                            io=ck.IOTrace(on_event=hold))
        assert reached.wait(30) and not future.done()
        with torch.no_grad():                                 # training goes on at once
            for p in model.parameters():
                p.mul_(-3.0)
        model(x, x)[1].backward()
        opt.step()                                            # moments and step counts change in place
        release.set()
        assert future.result(timeout=30) == tmp_path / "step-000000001"
    step, got = ck.load_latest(tmp_path)
    assert step == 1 and same(got, expected)
    assert not same(got["model"], model.state_dict())


def test_at_most_one_save_in_flight(tmp_path):
    release = threading.Event()
    order = []

    def hold(count, label):
        if count == 1:
            order.append("first writing")
            assert release.wait(30)

    with ck.AsyncCheckpointer() as saver:
        first = saver.save({"model": {"w": torch.ones(2)}}, tmp_path, 1, io=ck.IOTrace(on_event=hold))
        second_done = threading.Event()

        def second():
            saver.save({"model": {"w": torch.zeros(2)}}, tmp_path, 2).result()
            order.append("second saved")
            second_done.set()

        t = threading.Thread(target=second)
        t.start()
        assert not second_done.wait(0.3)                      # blocked behind the first
        assert not first.done()
        release.set()
        t.join(30)
    assert order == ["first writing", "second saved"] and ck.load_latest(tmp_path)[0] == 2
    assert saver.last_wait_s >= 0.0 and saver.last_snapshot_s >= 0.0


def test_a_failed_async_save_is_reported_by_its_future_and_the_next_save(tmp_path):
    def boom(count, label):
        if label == "fsync manifest":                     # before the commit: step 1 stays uncommitted
            raise OSError("disk full")

    saver = ck.AsyncCheckpointer(reuse_buffers=False)
    future = saver.save({"model": {"w": torch.ones(2)}}, tmp_path, 1, io=ck.IOTrace(on_event=boom))
    with pytest.raises(OSError, match="disk full"):
        future.result(timeout=30)
    with pytest.raises(RuntimeError, match="save of step 1 failed"):
        saver.save({"model": {"w": torch.ones(2)}}, tmp_path, 2)
    saver.save({"model": {"w": torch.ones(2)}}, tmp_path, 3).result(timeout=30)
    saver.close()
    assert ck.load_latest(tmp_path)[0] == 3


def test_parity_with_torch_distributed_checkpoint_async_save(tmp_path):
    """torch.distributed.checkpoint.async_save (single process, no process group) is the production
    reference: from the same state, mutated right after both calls, both persist the same bits."""
    import warnings

    import torch.distributed.checkpoint as dcp

    model = TinyGPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_embd=16, n_head=2, tie_embeddings=False))
    live = {k: v for k, v in model.state_dict().items()}
    expected = {k: v.clone() for k, v in live.items()}
    ours = ck.async_save({"model": live}, tmp_path / "ours", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dcp.async_save({"model": live}, checkpoint_id=str(tmp_path / "dcp"))
        with torch.no_grad():
            for v in live.values():
                v.add_(1.0)
        ours.result(timeout=60)
        theirs.result(timeout=60)
        loaded = {"model": {k: torch.zeros_like(v) for k, v in live.items()}}
        dcp.load(loaded, checkpoint_id=str(tmp_path / "dcp"))
    _, got = ck.load_latest(tmp_path / "ours")
    assert same(got["model"], loaded["model"]) and same(got["model"], expected)


def test_module_level_async_save(tmp_path):
    state = sample_state(4)
    future = ck.async_save(state, tmp_path, 4, keep_last=1)
    state["model"]["w"].zero_()
    ck.wait_for_saves()
    assert future.done() and same(ck.load_latest(tmp_path)[1], sample_state(4))


# --- resuming exactly --------------------------------------------------------------------------------


VOCAB = 65


def token_stream() -> torch.Tensor:
    """A fixed stream of token ids for labkit.datasets.batches (the corpus takes seconds to encode)."""
    return torch.randint(0, VOCAB, (20_000,), generator=torch.Generator().manual_seed(7))


def make_run(torch_adamw: bool, seed: int):
    """A TinyGPT with dropout (so torch's RNG matters), an optimizer, a warm-up + cosine LambdaLR, and a
    generator for labkit.datasets.batches; built from `seed` (a resumed run gets a different one)."""
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_embd=32, n_head=2, dropout=0.1))
    opt = (torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False) if torch_adamw
           else AdamW(model.parameters(), lr=3e-3))
    sched = lambda_lr(opt, WarmupCosine(max_lr=3e-3, total_steps=10, warmup_steps=3))
    return model, opt, sched, torch.Generator().manual_seed(seed)


def train_steps(model, opt, sched, gen, data, n):
    losses = []
    stream = datasets.batches(data, 4, 16, generator=gen)
    for _ in range(n):
        x, y = next(stream)
        loss = model(x, y)[1]
        keep = random.random() < 0.9 and np.random.rand() < 0.9   # Python's and NumPy's RNGs take part too
        opt.zero_grad()
        (loss * (1.0 if keep else 0.5)).backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("torch_adamw", [False, True])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, torch_adamw):
    data = token_stream()
    labkit.runtime.seed_everything(0)
    model, opt, sched, gen = make_run(torch_adamw, seed=1)
    full = train_steps(model, opt, sched, gen, data, 8)
    rng_full = ck.rng_state()

    labkit.runtime.seed_everything(0)
    model2, opt2, sched2, gen2 = make_run(torch_adamw, seed=1)
    first = train_steps(model2, opt2, sched2, gen2, data, 4)
    future = ck.async_save(ck.training_state(model2, opt2, sched2, data_position=gen2.get_state()), tmp_path, 4)
    train_steps(model2, opt2, sched2, gen2, data, 2)       # work after the checkpoint, lost in the "crash"
    future.result()
    del model2, opt2, sched2, gen2

    labkit.runtime.seed_everything(123)                      # a new process: other RNG states, other weights
    model3, opt3, sched3, gen3 = make_run(torch_adamw, seed=99)
    step, state = ck.load_latest(tmp_path)
    gen3.set_state(ck.restore(state, model3, opt3, sched3))
    rest = train_steps(model3, opt3, sched3, gen3, data, 8 - step)

    assert first + rest == full
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model3.state_dict().values()))
    assert same(opt.state_dict(), opt3.state_dict()) and sched.state_dict() == sched3.state_dict()
    assert same(ck.rng_state(), rng_full)                  # and the processes' RNGs end in the same state


def test_resume_without_the_rng_state_diverges(tmp_path):
    """The bitwise test above can fail: restoring everything but the RNG changes the dropout masks."""
    data = token_stream()
    labkit.runtime.seed_everything(0)
    model, opt, sched, gen = make_run(False, seed=1)
    full = train_steps(model, opt, sched, gen, data, 6)
    labkit.runtime.seed_everything(0)
    model2, opt2, sched2, gen2 = make_run(False, seed=1)
    train_steps(model2, opt2, sched2, gen2, data, 3)
    ck.save(ck.training_state(model2, opt2, sched2, data_position=gen2.get_state()), tmp_path, 3)
    step, state = ck.load_latest(tmp_path)
    labkit.runtime.seed_everything(123)
    state["rng"] = ck.rng_state()                            # forget it: keep whatever the new process has
    model3, opt3, sched3, gen3 = make_run(False, seed=99)
    gen3.set_state(ck.restore(state, model3, opt3, sched3))
    assert train_steps(model3, opt3, sched3, gen3, data, 3) != full[3:]


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.randn()                                        # leaves a cached Gaussian in NumPy's state
    ck.save({"rng": ck.rng_state()}, tmp_path, 1)
    want = (random.random(), np.random.randn(), torch.rand(2))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck.set_rng_state(ck.load_latest(tmp_path)[1]["rng"])
    got = (random.random(), np.random.randn(), torch.rand(2))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


# --- the cost model ---------------------------------------------------------------------------------


def test_save_schedule_by_hand():
    # 10 steps of 100 ms, a save every 2 steps, snapshot 20 ms, persist 500 ms
    sync = ck.save_schedule(10, 100.0, 2, 20.0, 500.0, "sync")
    assert sync.saves == 5 and sync.blocked_ms == 5 * 520 and sync.wall_ms == 1000 + 5 * 520
    a = ck.save_schedule(10, 100.0, 2, 20.0, 500.0, "async")
    # save 1 at 200: snapshot to 220, persist to 720; save 2 at 420: wait 300, snapshot to 740, persist to 1240; ...
    assert a.saves == 5 and a.blocked_ms == pytest.approx(20 + 4 * (300 + 20))
    assert a.wall_ms == pytest.approx(2800)                 # the last persist (2300 -> 2800) ends the run
    fits = ck.save_schedule(10, 100.0, 5, 20.0, 300.0, "async")
    assert fits.blocked_ms == 40 and fits.wall_ms == 1340 and fits.saves == 2
    assert ck.blocked_ms(10, 100.0, 5, 20.0, 300.0) == (640.0, 40.0)


@given(st.integers(1, 60), st.floats(0, 500), st.integers(1, 12), st.floats(0, 100), st.floats(0, 3000))
def test_async_never_blocks_longer_than_sync(n, step_ms, interval, snapshot_ms, persist_ms):
    sync, asy = ck.blocked_ms(n, step_ms, interval, snapshot_ms, persist_ms)
    saves = n // interval
    assert sync == pytest.approx(saves * (snapshot_ms + persist_ms))
    assert saves * snapshot_ms * (1 - 1e-12) - 1e-9 <= asy <= sync * (1 + 1e-12) + 1e-9
    if interval * step_ms >= persist_ms:                       # the persist hides behind the steps
        assert asy == pytest.approx(saves * snapshot_ms)
    spans = ck.save_schedule(n, step_ms, interval, snapshot_ms, persist_ms, "async").spans
    trainer = sorted((s for s in spans if s["lane"].endswith("trainer")), key=lambda s: s["start"])
    assert all(a["end"] <= b["start"] + 1e-9 for a, b in zip(trainer, trainer[1:]))   # one thing at a time


@given(st.floats(1e-3, 1e3), st.floats(1e2, 1e7), st.floats(0.5, 2.0))
def test_young_interval_minimises_the_waste(c, m, factor):
    tau, waste = ck.young_interval(c, m)
    w = lambda t: c / t + t / (2 * m)
    assert waste == pytest.approx(w(tau)) and w(tau) <= w(tau * factor) * (1 + 1e-12)


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_input(tmp_path):
    with pytest.raises(TypeError, match="save: state must be a non-empty dict"):
        ck.save({}, tmp_path, 1)
    with pytest.raises(ValueError, match="save: state's keys must be identifiers"):
        ck.save({"../evil": 1}, tmp_path, 1)
    with pytest.raises(TypeError, match="save: directory must be a str or os.PathLike, got int"):
        ck.save({"a": 1}, 3, 1)
    with pytest.raises(ValueError, match="save: step must be an int >= 0, got -1"):
        ck.save({"a": 1}, tmp_path, -1)
    with pytest.raises(TypeError, match="save: step must be an int, got float"):
        ck.save({"a": 1}, tmp_path, 1.0)
    with pytest.raises(ValueError, match="save: keep_last must be an int >= 1, got 0"):
        ck.save({"a": 1}, tmp_path, 1, keep_last=0)
    with pytest.raises(TypeError, match="save: io must be an IOTrace or None, got str"):
        ck.save({"a": 1}, tmp_path, 1, io="trace")
    with pytest.raises(TypeError, match="load_latest: directory must be a str or os.PathLike"):
        ck.load_latest(None)
    with pytest.raises(ValueError, match="IOTrace: crash_at must be an int >= 1, got 0"):
        ck.IOTrace(crash_at=0)
    with pytest.raises(ValueError, match="IOTrace: write_chunk must be an int >= 1, got 0"):
        ck.IOTrace(write_chunk=0)
    with pytest.raises(TypeError, match="IOTrace: on_event must be callable"):
        ck.IOTrace(on_event=1)
    with pytest.raises(ValueError, match="purge_plan: keep_last must be an int >= 1, got 0"):
        ck.purge_plan([1], [], 0)
    with pytest.raises(ValueError, match="AsyncCheckpointer.save: step must be an int >= 0"):
        ck.async_save({"a": 1}, tmp_path, -2)
    with pytest.raises(ValueError, match="save_schedule: mode must be one of"):
        ck.save_schedule(4, 1.0, 2, 1.0, 1.0, "later")
    with pytest.raises(ValueError, match="save_schedule: interval must be an int >= 1, got 0"):
        ck.save_schedule(4, 1.0, 0, 1.0, 1.0, "sync")
    with pytest.raises(ValueError, match=r"save_schedule: persist_ms must be in \[0, inf\), got -1.0"):
        ck.save_schedule(4, 1.0, 2, 1.0, -1.0, "sync")
    with pytest.raises(ValueError, match=r"young_interval: mtbf_s must be in \(0, inf\), got 0.0"):
        ck.young_interval(1.0, 0.0)
    with pytest.raises(TypeError, match="training_state: optimizer must be a torch.optim.Optimizer"):
        ck.training_state(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="restore: state must come from training_state"):
        ck.restore({"model": {}}, torch.nn.Linear(2, 2), None)
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="restore: pass a scheduler exactly when the checkpoint holds one"):
        ck.restore(ck.training_state(lin, opt), lin, opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1))
    with pytest.raises(TypeError, match="set_rng_state: state must be a dict from rng_state"):
        ck.set_rng_state([1])


def test_crash_env_var_must_be_an_int(monkeypatch):
    monkeypatch.setattr(ck, "_ENV_TRACE", None)
    monkeypatch.setenv(ck.CRASH_ENV, "soon")
    with pytest.raises(ValueError, match="LABKIT_CKPT_CRASH_AT must be a positive int, got 'soon'"):
        ck.default_trace()
    monkeypatch.setenv(ck.CRASH_ENV, "")
    assert ck.default_trace().crash_at is None


# --- exercises, figures, benchmark -------------------------------------------------------------------

NAMES = ["checkpointing.blocked_time", "checkpointing.newest_valid", "checkpointing.purge_set",
         "checkpointing.young_interval"]


def test_exercises_registered_and_references_pass():
    assert exercises_for("11-checkpointing") == NAMES
    for name in NAMES:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def student_newest(checkpoints):
    for c in sorted(checkpoints, key=lambda c: -c["step"]):
        try:
            m = json.loads(c["manifest"])
        except (TypeError, ValueError):
            continue
        if m.get("format") != ck.FORMAT or m.get("step") != c["step"]:
            continue
        if all(e["file"] in c["files"] and len(c["files"][e["file"]]) == e["bytes"]
               and hashlib.sha256(c["files"][e["file"]]).hexdigest() == e["sha256"] for e in m["shards"].values()):
            return c["step"]
    return None


def student_blocked(n_steps, step_ms, interval, snapshot_ms, persist_ms):
    t = sync = asy = end = 0.0
    for step in range(1, n_steps + 1):
        t += step_ms
        if step % interval == 0:
            sync += snapshot_ms + persist_ms
            wait = max(0.0, end - t)
            asy += wait + snapshot_ms
            t += wait + snapshot_ms
            end = t + persist_ms
    return sync, asy


def student_purge(committed, partial, keep_last):
    newest = sorted(committed, reverse=True)
    if len(newest) < keep_last:
        return []
    return sorted(s for s in committed + partial if s < newest[keep_last - 1])


@pytest.mark.parametrize("name,fn", [
    ("checkpointing.newest_valid", student_newest),
    ("checkpointing.blocked_time", student_blocked),
    ("checkpointing.purge_set", student_purge),
    ("checkpointing.young_interval", lambda save_cost_s, mtbf_s: (math.sqrt(2 * save_cost_s * mtbf_s),
                                                                  math.sqrt(2 * save_cost_s / mtbf_s))),
])
def test_plain_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


def newest_without_hashes(checkpoints):
    good = [c["step"] for c in checkpoints if c["manifest"] is not None]
    return max(good) if good else None


@pytest.mark.parametrize("name,fn", [
    ("checkpointing.newest_valid", newest_without_hashes),                      # trusts any manifest
    ("checkpointing.blocked_time", lambda n_steps, step_ms, interval, snapshot_ms, persist_ms:   # forgets the waits
        ((n_steps // interval) * (snapshot_ms + persist_ms), (n_steps // interval) * snapshot_ms)),
    ("checkpointing.purge_set", lambda committed, partial, keep_last:           # leaves torn directories behind
        student_purge(committed, [], keep_last)),
    ("checkpointing.young_interval", lambda save_cost_s, mtbf_s: (math.sqrt(save_cost_s * mtbf_s),
                                                                  math.sqrt(save_cost_s / mtbf_s))),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_figures():
    from labkit.viz import checkpoint as vc

    fig = vc.save_timeline_figure(interval=2, state_mb=100.0, step_ms=100.0, n_steps=10, snapshot_gbps=5.0,
                                  persist_gbps=0.2)
    title = fig.layout.title.text
    assert "5 saves" in title and "blocked: sync 2600 ms, async 1300 ms" in title
    lanes = {y for trace in fig.data for y in trace.y}
    assert lanes == {"sync: trainer", "async: trainer", "async: writer thread"}
    with pytest.raises(ValueError, match="save_costs: bandwidths must be > 0"):
        vc.save_costs(1.0, 0.0, 1.0)


def test_benchmark_quick_runs_side_by_side(monkeypatch):
    from labkit.benchmarks import checkpointing as bench_ck

    monkeypatch.setattr(bench_ck, "_configs", lambda quick: [dict(n_layer=1, n_embd=32, n_head=2)])
    rows = bench_ck.run(quick=True)
    assert [r["name"] for r in rows] == ["sync save", "async save"]
    assert all(r["median_ms"] > 0 and r["persist_ms"] > 0 and r["device"] for r in rows)
    assert rows[1]["baseline_ms"] == rows[0]["median_ms"] and rows[1]["snapshot_mb"] == rows[0]["state_mb"] > 0
    with pytest.raises(TypeError, match="run: quick must be a bool"):
        bench_ck.run(quick=1)


# --- on a GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_async_save_of_cuda_tensors_snapshots_through_pinned_memory(tmp_path):
    w = torch.randn(1024, 1024, device="cuda")
    expected = w.cpu()
    with ck.AsyncCheckpointer() as saver:
        future = saver.save({"model": {"w": w}, "rng": ck.rng_state()}, tmp_path, 1)
        w.mul_(2.0)                                   # queued behind the device-to-host copy
        future.result(timeout=60)
        assert all(b.is_pinned() for b in saver._buffers.buffers)
    step, state = ck.load_latest(tmp_path, map_location="cuda")
    assert step == 1 and state["model"]["w"].is_cuda and torch.equal(state["model"]["w"].cpu(), expected)
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()
