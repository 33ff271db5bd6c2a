"""Tests of labkit.parallel.fsdp (chapter 13-fsdp): shard and schedule math, the schedule model, parity of
the FSDP engine with a single process and with FSDP2 on 2 and 4 gloo ranks, the recorded timelines,
a failing rank, bad input, exercises, figures and benchmarks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.models import GPTConfig, TinyGPT
from labkit.parallel import fsdp as fs
from labkit.parallel import offload as off
from labkit.parallel import zero as z
from labkit.parallel.launch import RankError, launch, rank


# --- shard math (the layout is chapter 12's: labkit.parallel.zero) ---------------------------


@given(numel=st.integers(0, 500), world=st.integers(1, 17))
def test_shards_tile_the_padded_flat_vector(numel, world):
    flat = torch.arange(1, numel + 1, dtype=torch.float32)
    P = z.padded_numel(numel, world)
    shards = [fs.shard_flat(flat, world, r) for r in range(world)]
    assert all(s.numel() == P // world for s in shards)
    assert torch.equal(torch.cat(shards), torch.cat([flat, torch.zeros(P - numel)]))  # padding at the end
    assert torch.equal(fs.unshard_flat(shards, numel), flat)
    for r in range(world):
        start, stop = z.shard_range(numel, world, r)
        assert torch.equal(shards[r][:stop - start], flat[start:stop])
        assert stop - start == P // world or stop == numel  # only the ranks at the end hold padding
    if numel:  # the engine's layout of one tensor: the same shards
        bucket = z.FlatBucket([flat], world, world - 1)
        assert torch.equal(bucket.local(bucket.flatten([flat])), shards[-1])


def test_shard_flat_examples_and_bad_input():
    assert fs.shard_flat(torch.arange(10.0), 4, 3).tolist() == [9.0, 0.0, 0.0]
    assert fs.shard_flat(torch.arange(3.0), 8, 5).tolist() == [0.0]  # a rank with padding only
    with pytest.raises(ValueError, match=r"shard_range: rank must be in \[0, 3\] for world_size=4, got 4"):
        fs.shard_flat(torch.arange(10.0), 4, 4)
    with pytest.raises(ValueError, match=r"shard_flat: flat must be a 1-D tensor, got shape \(2, 3\)"):
        fs.shard_flat(torch.zeros(2, 3), 2, 0)
    with pytest.raises(TypeError, match="shard_flat: flat must be a torch.Tensor, got list"):
        fs.shard_flat([1.0, 2.0], 2, 0)
    with pytest.raises(ValueError, match=r"unshard_flat: 2 shards of 3 elements cannot hold numel=7"):
        fs.unshard_flat([torch.zeros(3), torch.zeros(3)], 7)
    with pytest.raises(ValueError, match=r"unshard_flat: shards must be .* equal sizes, got sizes \[3, 2\]"):
        fs.unshard_flat([torch.zeros(3), torch.zeros(2)], 5)
    with pytest.raises(TypeError, match="unshard_flat: shards must be 1-D tensors"):
        fs.unshard_flat([torch.zeros(3), [0.0, 1.0, 2.0]], 6)


# --- the schedule -------------------------------------------------------------------------


@given(n=st.integers(1, 12), depth=st.integers(0, 14))
def test_prefetch_plan_properties(n, depth):
    plan = fs.prefetch_plan(n, depth)
    assert len(plan) == 2 * n
    for phase in (range(n), range(n, 2 * n)):
        assert sorted(u for k in phase for u in plan[k]) == list(range(n))  # each unit once per pass
        live: set[int] = set()
        for k in phase:
            u = fs.unit_at(k, n)
            live |= set(plan[k])
            assert u in live  # gathered no later than computed ...
            assert all(abs(v - u) <= depth for v in plan[k])  # ... and at most `depth` units early
            assert sorted(live) == fs.resident_units(n, depth, k)
            live.discard(u)  # resharded after its compute
    assert plan[0] == list(range(min(depth, n - 1) + 1))
    assert plan[n] == list(range(n - 1, max(n - 1 - depth, 0) - 1, -1))  # backward starts again at the top
    if depth == 0:
        assert plan == [[fs.unit_at(k, n)] for k in range(2 * n)]


def _replayed_peak(numels, world, depth, offload, bpp=4):
    """Allocate each gathered unit when the plan issues it, free it after its compute step."""
    n = len(numels)
    padded = [z.padded_numel(k, world) for k in numels]
    live, peak = set(), 0
    base = 0 if offload else sum(padded) // world
    for k, issues in enumerate(fs.prefetch_plan(n, depth)):
        live |= set(issues)
        peak = max(peak, base + sum(padded[u] for u in live))
        live.discard(fs.unit_at(k, n))
    return peak * bpp


@given(numels=st.lists(st.integers(0, 5000), min_size=1, max_size=9), world=st.integers(1, 9),
       depth=st.integers(0, 10), offload=st.booleans())
def test_peak_param_bytes_matches_a_replay_of_the_plan(numels, world, depth, offload):
    assert fs.peak_param_bytes(numels, world, depth, offload) == _replayed_peak(numels, world, depth, offload)


def test_schedule_bad_input_is_named():
    with pytest.raises(ValueError, match="prefetch_plan: depth must be an int >= 0, got -1"):
        fs.prefetch_plan(4, -1)
    with pytest.raises(ValueError, match="unit_at: step must be < 2 \\* n_units = 8, got 8"):
        fs.unit_at(8, 4)
    with pytest.raises(ValueError, match="peak_param_bytes: unit_numels must hold at least one unit"):
        fs.peak_param_bytes([], 2, 1)
    with pytest.raises(TypeError, match="peak_param_bytes: offload must be a bool"):
        fs.peak_param_bytes([4], 2, 1, offload="yes")
    with pytest.raises(ValueError, match=r"peak_param_bytes: unit_numels\[1\] must be an int >= 0, got -3"):
        fs.peak_param_bytes([4, -3], 2, 1)


# --- the schedule model -------------------------------------------------------------------

times = st.lists(st.one_of(st.just(0.0), st.floats(0.01, 5.0)), min_size=1, max_size=6)


def _first(xs, n):  # the first n values, padded with 0.5
    return tuple(xs[:n]) + (0.5,) * (n - len(xs[:n]))


@given(fwd=times, bwd=times, ag=times, rs=times, issue=times, copies=times, depth=st.integers(0, 7),
       offload=st.booleans())
def test_simulated_step_is_consistent(fwd, bwd, ag, rs, issue, copies, depth, offload):
    n = len(fwd)
    cal = fs.Calibration(*(_first(x, n) for x in [fwd, bwd, ag, rs, issue, issue, copies, copies]),
                         optimizer_ms=1.0, offload_optimizer_ms=2.0, overhead_ms=0.3)
    sim = fs.simulate_step(cal, depth, offload)
    lane = sorted((s for s in sim["spans"] if s["lane"] == "compute"), key=lambda s: s["start"])
    # the compute lane never idles and never does two things: the step is the sum of its spans
    assert all(abs(a["end"] - b["start"]) < 1e-9 for a, b in zip(lane, lane[1:]))
    assert sim["step_ms"] == pytest.approx(sum(s["end"] - s["start"] for s in lane))
    link = sorted((s for s in sim["spans"] if s["lane"] == "comm"), key=lambda s: s["start"])
    assert all(a["end"] <= b["start"] + 1e-9 for a, b in zip(link, link[1:]))  # one collective at a time
    for s in lane:  # a unit computes only once its gather has completed
        if s["kind"] in fs.COMPUTE_KINDS:
            gathers = [g["end"] for g in link if g["kind"] == "all-gather" and g["unit"] == s["unit"]
                       and g["end"] <= s["start"] + 1e-9]
            assert gathers or cal.gather_ms[s["unit"]] == 0
    assert sim["compute_ms"] == pytest.approx(sum(cal.forward_ms) + sum(cal.backward_ms))


def test_simulated_depth_0_exposes_every_gather_and_depth_1_hides_them():
    n = 4
    z = (0.0,) * n
    cal = fs.Calibration((2.0,) * n, (4.0,) * n, (1.0,) * n, z, z, z, z, z)
    d0, d1 = fs.simulate_step(cal, 0), fs.simulate_step(cal, 1)
    assert d0["exposed_ms"] == pytest.approx(2 * n * 1.0) and d0["hidden_ms"] == 0
    assert d1["exposed_ms"] == pytest.approx(2 * 1.0)  # only the first gather of each pass
    assert d0["hidden_gather_ms"] == 0 and d1["hidden_gather_ms"] == pytest.approx(2 * (n - 1) * 1.0)
    assert d0["step_ms"] - d1["step_ms"] == pytest.approx(2 * (n - 1))
    for depth in (1, 3):  # gathers of 3 ms against 2 ms of forward compute: the link sets the pace, n * 3 + 2,
        slow = fs.simulate_step(cal.scaled(comm=3.0), depth)  # and no prefetch depth changes that
        assert max(s["end"] for s in slow["spans"] if s["kind"] == "forward") == pytest.approx(n * 3.0 + 2.0)
    with pytest.raises(ValueError, match="simulate_step: depth must be an int >= 0"):
        fs.simulate_step(cal, -2)
    with pytest.raises(TypeError, match="simulate_step: cal must be a Calibration"):
        fs.simulate_step({"forward_ms": (1.0,)}, 1)
    with pytest.raises(ValueError, match="Calibration: gather_ms must hold one time per unit, 4 like forward_ms, got"):
        fs.Calibration((2.0,) * n, (4.0,) * n, (1.0,) * 3, z, z, z, z, z)


def test_calibrate_recovers_the_model_from_its_own_timeline():
    n = 3
    cal = fs.Calibration((1.0, 2.0, 3.0), (2.0, 4.0, 6.0), (0.5, 1.5, 0.7), (0.0,) * n, (0.1, 0.2, 0.3), (0.0,) * n,
                         (0.3, 0.2, 0.1), (0.4, 0.5, 0.6), optimizer_ms=1.5, offload_optimizer_ms=2.5, overhead_ms=0.25)
    on, off = fs.simulate_step(cal, 0, False)["spans"], fs.simulate_step(cal, 0, True)["spans"]
    back = fs.calibrate([on], [off])
    for field in ("forward_ms", "backward_ms", "gather_ms", "gather_issue_ms", "h2d_ms", "d2h_ms"):
        assert getattr(back, field) == pytest.approx(getattr(cal, field)), field
    assert (back.optimizer_ms, back.offload_optimizer_ms) == (1.5, 2.5) and back.overhead_ms == pytest.approx(0.25)
    with pytest.raises(ValueError, match="calibrate: steps must hold at least one recorded step"):
        fs.calibrate([])


# --- the engine: bad input without ranks ---------------------------------------------------


def test_fsdp_and_gpt_units_name_bad_input():
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="FSDP: depth must be an int >= 0, got -1"):
        fs.FSDP([nn.Linear(2, 2)], depth=-1)
    with pytest.raises(TypeError, match="FSDP: offload must be a bool"):
        fs.FSDP([nn.Linear(2, 2)], offload=1)
    with pytest.raises(TypeError, match="FSDP: units must be a non-empty list"):
        fs.FSDP([])
    with pytest.raises(ValueError, match="parameter 'weight' of unit 1 is also 'weight' of another unit"):
        fs.FSDP([shared, shared])
    with pytest.raises(RuntimeError, match="FSDP: needs a process group"):
        fs.FSDP([nn.Linear(2, 2)])
    tied = TinyGPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_embd=8, n_head=2))
    with pytest.raises(ValueError, match="tinygpt_layers: model must have tie_embeddings=False"):
        fs.gpt_units(tied)
    with pytest.raises(TypeError, match="tinygpt_layers: model must be a TinyGPT"):
        fs.gpt_units(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sized_setup: world_size must be an int >= 1"):
        fs.sized_setup(0)
    with pytest.raises(ValueError, match="sized_setup: backend must be one of"):
        fs.sized_setup(2, backend="mpi")


def test_gpt_units_compute_the_model_and_its_loss():
    model = TinyGPT(fs.Setup().config())
    x, y = torch.randint(0, 31, (2, 16)), torch.randint(0, 31, (2, 16))
    y[:, :5] = -100  # unscored targets (a prompt, as labkit.datasets marks it)
    out = x
    for _, unit in fs.gpt_units(model):
        out = unit(out)
    logits, loss = model(x, y)
    torch.testing.assert_close(out, logits)
    torch.testing.assert_close(off.lm_loss(out, y), loss)  # the loss fsdp_runs trains with
    names = [prefix + n for prefix, unit in fs.gpt_units(model) for n, _ in unit.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()]  # full names, every parameter once


# --- the engine on real ranks ---------------------------------------------------------------


def _assert_params_close(got: dict, expected: dict):
    assert set(got) == set(expected)
    for name, p in expected.items():
        torch.testing.assert_close(got[name], p, msg=lambda m: f"{name}: {m}")


def _check_timeline(run: dict, n: int):
    """Recorded order: the plan's gathers, prefetched before the previous unit's compute ends."""
    plan = fs.prefetch_plan(n, run["depth"])
    for step in run["steps"]:
        assert step["issue_log"] == [(k, u) for k, units in enumerate(plan) for u in units]
        spans = [s for s in step["spans"] if s["rank"] == run["rank"]]
        assert all(s["end"] >= s["start"] for s in spans)
        compute = {s["label"]: s for s in spans if s["kind"] in fs.COMPUTE_KINDS}
        assert [s["label"] for s in sorted(compute.values(), key=lambda s: s["start"])] \
            == [f"F{u}" for u in range(n)] + [f"B{u}" for u in reversed(range(n))]
        forward_end = compute[f"F{n - 1}"]["end"]
        issued = {s["label"].split()[-1]: s["start"] for s in spans
                  if s["kind"] == "issue" and s["label"].startswith("issue AG") and s["start"] < forward_end}
        for u in range(1, n):
            if run["depth"] >= 1:  # prefetch: unit u's all-gather goes out before unit u-1's compute ends
                assert issued[f"AG{u}"] < compute[f"F{u - 1}"]["end"]
            else:  # just in time: only after it
                assert issued[f"AG{u}"] > compute[f"F{u - 1}"]["end"]
        for s in spans:  # a unit computes after its all-gather completed
            if s["kind"] == "all-gather":
                user = ("F" if s["start"] < forward_end else "B") + s["label"][2:]
                assert s["end"] <= compute[user]["start"]
        if run["depth"] == 0:  # just in time: no all-gather is in flight while any unit computes
            assert fs.timeline_stats(spans)[run["rank"]]["hidden_gather_ms"] == 0


def _check_memory(run: dict, world: int):
    expected = fs.peak_param_bytes(run["unit_numels"], world, run["depth"], run["offload"])
    assert all(s["memory"]["param_peak"] == expected for s in run["steps"])
    assert all(s["memory"]["grad"] == 0 for s in run["steps"])  # every gathered gradient freed
    largest_two = sorted(z.padded_numel(k, world) * 4 for k in run["unit_numels"])[-2:]
    assert all(s["memory"]["grad_peak"] <= sum(largest_two) for s in run["steps"])  # <= 2 reduce-scatters alive
    if run["offload"]:
        assert run["shard_device"] == run["grad_device"] == "cpu"


SMALL = fs.Setup()
SMALL_CONFIGS = [dict(depth=0), dict(depth=1, offload=True), dict(depth=3)]


@pytest.fixture(scope="module")
def two_ranks():
    """One 2-rank launch shared by the parity and the benchmark tests: three configurations and FSDP2."""
    return launch(fs.rank_runs, 2, args=(SMALL, SMALL_CONFIGS, True, True), timeout=60)


def _check_parity(out, setup, world):
    ref = fs.reference_run(setup, world)
    n = setup.n_layer + 2
    for r, res in enumerate(out):
        for run in res["runs"]:
            assert run["rank"] == r and run["world"] == world
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]))
            _assert_params_close(run["params"], ref["params"])
            _check_timeline(run, n)
            _check_memory(run, world)
        if res["fsdp2"] is not None:
            torch.testing.assert_close(torch.tensor(res["fsdp2"]["losses"]), torch.tensor(ref["losses"]))
            _assert_params_close(res["fsdp2"]["params"], ref["params"])
    start = dict(fs.make_model(setup).named_parameters())
    still = {k for k in start if (ref["params"][k] - start[k]).abs().max() < 1e-4}
    assert all(k.endswith("k_proj.bias") for k in still)  # all moved but key biases (softmax ignores a shared shift)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_fsdp_matches_one_process_and_fsdp2_on_2_ranks(two_ranks):
    _check_parity(two_ranks, SMALL, 2)
    assert two_ranks[0]["fsdp2"] is not None


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_fsdp_matches_one_process_on_4_ranks_with_padding():
    setup = fs.Setup(n_embd=18, n_head=2, bias=True, batch=2, steps=3, seed=1)
    out = launch(fs.rank_runs, 4, args=(setup, [dict(depth=1), dict(depth=2, offload=True)], False, True), timeout=60)
    _check_parity(out, setup, 4)
    assert any(k % 4 for k in out[0]["runs"][0]["unit_numels"])  # the layout really pads


class _FailingUnit(nn.Module):
    """A unit whose forward raises on rank 1 (after rank 0 has gone ahead to its next all-gather)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if rank() == 1:
            raise ValueError("unit 1 refuses on rank 1")
        return self.lin(x)


def _fsdp_with_a_failing_unit():
    torch.manual_seed(0)
    fsdp = fs.FSDP([nn.Linear(4, 4), _FailingUnit(), nn.Linear(4, 4)], depth=1)
    loss = fsdp.forward(torch.randn(2, 4)).sum()
    fsdp.backward(loss)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_failing_rank_is_named_and_nothing_hangs():
    # rank 0 blocks in an all-gather rank 1 never joins: it must be released by the collective timeout
    # (3 s) or the grace period, long before the launch's deadline (which would say "deadline ... passed")
    with pytest.raises(RankError, match="rank 1 failed first") as err:
        launch(_fsdp_with_a_failing_unit, 2, timeout=3, grace=1, deadline=120)
    assert "ValueError: unit 1 refuses on rank 1" in str(err.value)


# --- exercises, figures, benchmarks ---------------------------------------------------------

EXERCISES = ["fsdp.forward_time", "fsdp.gathers_before", "fsdp.peak_param_bytes", "fsdp.shard"]


def test_exercises_registered_and_references_pass():
    from labkit.exercises import exercises_for, lookup

    assert exercises_for("13-fsdp") == EXERCISES
    for name in EXERCISES:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def _shard_by_hand(flat, world_size, rank):
    S = -(-flat.numel() // world_size)
    piece = flat[rank * S:(rank + 1) * S]
    return torch.cat([piece, torch.zeros(S - piece.numel())])


def _plan_by_hand(n_units, depth, step):
    forward = step < n_units
    u = step if forward else 2 * n_units - 1 - step
    first = step in (0, n_units)
    if first:  # the pass starts: its own unit and `depth` more
        return list(range(u, min(u + depth, n_units - 1) + 1)) if forward else list(range(u, max(u - depth, 0) - 1, -1))
    ahead = u + depth if forward else u - depth  # later: one new unit, `depth` ahead
    return [ahead] if 0 <= ahead < n_units else []


def _peak_by_hand(unit_numels, world_size, depth, offload, bytes_per_param):
    P = [math.ceil(k / world_size) * world_size for k in unit_numels]
    w = min(depth + 1, len(P))
    gathered = max(sum(P[i:i + w]) for i in range(len(P) - w + 1))
    return ((0 if offload else sum(P) // world_size) + gathered) * bytes_per_param


def _forward_by_hand(compute_ms, gather_ms, depth):
    n, t, link, ready = len(compute_ms), 0.0, 0.0, {}
    for k in range(n):
        for u in _plan_by_hand(n, depth, k):
            link = max(t, link) + gather_ms[u]
            ready[u] = link
        t = max(t, ready[k]) + compute_ms[k]
    return t


@pytest.mark.parametrize("name,fn", [
    ("fsdp.shard", _shard_by_hand),
    ("fsdp.gathers_before", _plan_by_hand),
    ("fsdp.peak_param_bytes", _peak_by_hand),
    ("fsdp.forward_time", _forward_by_hand),
])
def test_student_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


def _forward_parallel_links(compute_ms, gather_ms, depth):  # every gather gets its own link
    n, t, ready = len(compute_ms), 0.0, {}
    for k in range(n):
        for u in _plan_by_hand(n, depth, k):
            ready[u] = t + gather_ms[u]
        t = max(t, ready[k]) + compute_ms[k]
    return t


def _plan_no_reset(n_units, depth, step):  # one "issued" set for both passes: backward gathers nothing
    issued = set()
    for k in range(step + 1):
        u = fs.unit_at(k, n_units)
        wanted = range(u, min(u + depth, n_units - 1) + 1) if k < n_units else range(u, max(u - depth, 0) - 1, -1)
        new = [v for v in wanted if v not in issued]
        issued.update(new)
    return new


@pytest.mark.parametrize("name,fn", [
    ("fsdp.shard", lambda flat, world_size, rank: torch.chunk(flat, world_size)[rank]),  # uneven, no padding
    ("fsdp.shard", lambda flat, world_size, rank: torch.cat([torch.zeros((-flat.numel()) % world_size), flat])
     .view(world_size, -1)[rank]),  # padding at the front
    ("fsdp.gathers_before", lambda n_units, depth, step: _plan_by_hand(n_units, depth, step % n_units)),  # backward
    # prefetches upwards, like forward
    ("fsdp.gathers_before", _plan_no_reset),
    ("fsdp.gathers_before", lambda n_units, depth, step: _plan_by_hand(n_units, depth + 1, step)),  # one too deep
    ("fsdp.peak_param_bytes", lambda unit_numels, world_size, depth, offload, bytes_per_param:
     _peak_by_hand(unit_numels, world_size, max(depth - 1, 0), offload, bytes_per_param)),  # window of depth
    ("fsdp.peak_param_bytes", lambda unit_numels, world_size, depth, offload, bytes_per_param:
     (sum(unit_numels) // world_size + max(unit_numels) * (depth + 1)) * bytes_per_param),  # no padding, max unit
    ("fsdp.peak_param_bytes", lambda unit_numels, world_size, depth, offload, bytes_per_param:
     _peak_by_hand(unit_numels, world_size, depth, False, bytes_per_param)),  # offloaded shards still counted
    ("fsdp.forward_time", _forward_parallel_links),
    ("fsdp.forward_time", lambda compute_ms, gather_ms, depth: max(sum(compute_ms), sum(gather_ms))),  # perfect overlap
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_figures_build():
    from labkit.viz import fsdp as vf

    n = 4
    cal = fs.Calibration(*(((1.0,) * n,) * 8), optimizer_ms=1.0, offload_optimizer_ms=2.0)
    fig = vf.schedule_figure(cal, 1, True, 2.0, unit_numels=[100, 1000, 1000, 100], world_size=2)
    assert "depth 1, offload on, links x2" in fig.layout.title.text
    peak = fs.peak_param_bytes([100, 1000, 1000, 100], 2, 1, True) / 2**20
    assert f"peak parameters {peak:.3g} MiB" in fig.layout.title.text
    sim = fs.simulate_step(cal, 2)
    assert len(vf.fsdp_timeline_figure(sim["spans"], title=vf.timeline_title(sim["spans"], "sim")).data) >= 4
    mem = vf.param_memory_figure([100, 1000, 1000, 100], 2, 0)
    tops = [sum(t.y[k] for t in mem.data) for k in range(2 * n)]
    assert max(tops) * 2**20 == pytest.approx(fs.peak_param_bytes([100, 1000, 1000, 100], 2, 0))
    rows = [dict(name="a", compute_ms=1.0, exposed_ms=2.0, hidden_ms=0.5, sim_exposed_ms=1.5)]
    assert len(vf.exposure_figure(rows).data) == 4
    with pytest.raises(ValueError, match="fsdp_timeline_figure: spans must hold at least one span"):
        vf.fsdp_timeline_figure([])


def test_recorded_calibration_describes_the_chapters_model():
    from labkit.viz import fsdp as vf

    # the widget's recording is of the model the notebook's experiments train (2 gloo ranks) ...
    assert dataclasses.replace(fs.sized_setup(2, backend="gloo"), steps=vf.RECORDED_SETUP.steps) == vf.RECORDED_SETUP
    n = len(fs.gpt_units(fs.make_model(vf.RECORDED_SETUP)))
    per_unit = [v for v in vars(vf.RECORDED_CALIBRATION).values() if isinstance(v, tuple)]
    assert len(per_unit) == 8 and all(len(v) == n for v in per_unit)  # ... with one time per unit


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_benchmark_rows(monkeypatch, two_ranks):
    from labkit.benchmarks import fsdp as bm

    monkeypatch.setattr(bm, "settings", lambda quick=False, backend=None: dict(
        world=2, backend="gloo", setup=SMALL, configs=SMALL_CONFIGS, fsdp2=True))

    def launched(fn, world, args, kwargs, backend, deadline):  # the fixture's launch, but without the parameters
        assert (fn, world, args, backend) == (fs.rank_runs, 2, (SMALL, SMALL_CONFIGS), "gloo")
        assert kwargs == dict(fsdp2=True, record=True, params=False)
        return two_ranks

    monkeypatch.setattr(bm, "launch", launched)
    rows = bm.run(quick=True)
    assert [r["name"] for r in rows] == ["depth 0", "depth 1, offload", "depth 3", "FSDP2 (fully_shard)"]
    assert rows[0]["ratio"] == 1.0 and all(r["baseline_ms"] == rows[0]["median_ms"] > 0 for r in rows)
    assert all(r["peak_param_bytes"] == r["predicted_bytes"] for r in rows[:3])
    assert all(r["exposed_ms"] >= 0 and r["comm_ms"] > 0 for r in rows[:3])


def test_benchmark_settings():
    from labkit.benchmarks import fsdp as bm

    quick, full = bm.settings(quick=True), bm.settings()
    assert (quick["configs"], quick["fsdp2"]) == (bm.QUICK_CONFIGS, False)
    assert (full["configs"], full["fsdp2"]) == (bm.CONFIGS, True) and full["setup"].steps > quick["setup"].steps
    gpus = bm.settings(backend="nccl")["setup"]
    assert gpus.n_embd > quick["setup"].n_embd and bm.settings(backend="gloo")["setup"] == full["setup"]
    with pytest.raises(TypeError, match="settings: quick must be a bool"):
        bm.settings("yes")
