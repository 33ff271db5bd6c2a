"""Tests of labkit.parallel.pipeline (chapter 14-pipeline): schedules as data (validity, bubble, memory),
the simulator, the executor on real gloo ranks at parity with the unsplit model and with
torch.distributed.pipelining, failures, exercises, figures and benchmarks."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.parallel import pipeline as pl
from labkit.parallel.launch import RankError

RTOL, ATOL = 1e-5, 4e-5


@st.composite
def schedules(draw):
    """(kind, p, m, v) that `schedule` accepts."""
    kind = draw(st.sampled_from(pl.KINDS))
    p = draw(st.integers(1, 8))
    if kind == "interleaved-1f1b":
        v = draw(st.integers(1, 4))
        m = p * draw(st.integers(1, 5)) if v > 1 else draw(st.integers(1, 20))
    else:
        v, m = 1, draw(st.integers(1, 20))
    return kind, p, m, v


def _deps(a: pl.Action, n_stages: int) -> list[pl.Action]:
    if a.op == "F":
        return [pl.Action("F", a.stage - 1, a.microbatch)] if a.stage else []
    return [pl.Action("F", a.stage, a.microbatch)] + ([pl.Action("B", a.stage + 1, a.microbatch)]
                                                      if a.stage < n_stages - 1 else [])


# --------------------------------------------------------------------------- schedules as data


@given(schedules())
def test_every_action_exactly_once_on_its_rank_forward_before_backward(args):
    kind, p, m, v = args
    actions = pl.schedule(kind, p, m, v)
    assert len(actions) == p
    n_stages = p * v
    flat = [(r, a) for r, lst in enumerate(actions) for a in lst]
    assert sorted(a for _, a in flat) == sorted(pl.Action(op, s, i) for op in "FB" for s in range(n_stages)
                                                for i in range(m))
    for r, lst in enumerate(actions):
        assert all(a.stage % p == r for a in lst)
        position = {a: k for k, a in enumerate(lst)}
        assert all(position[pl.Action("F", a.stage, a.microbatch)] < k for k, a in enumerate(lst) if a.op == "B")
    pl.validate(actions)


@given(schedules(), st.sampled_from([(1.0, 1.0), (1.0, 2.0), (2.0, 3.0)]))
def test_simulation_respects_dependencies_and_gives_the_bubble_formula(args, costs):
    kind, p, m, v = args
    sim = pl.simulate(pl.schedule(kind, p, m, v), *costs)
    n_stages = p * v
    spans = {pl.Action(s["op"], s["stage"], s["microbatch"]): s for s in sim.spans}
    for a, s in spans.items():  # cross-stage and local dependencies, in simulated time
        assert all(spans[d]["end"] <= s["start"] + 1e-12 for d in _deps(a, n_stages))
    for r in range(p):  # one action at a time per rank
        mine = sorted((s["start"], s["end"]) for s in sim.spans if s["rank"] == r)
        assert all(e0 <= s1 + 1e-12 for (_, e0), (s1, _) in zip(mine, mine[1:]))
    ideal = m * sum(costs)
    assert sim.busy == pytest.approx([ideal] * p)
    # bubble time over ideal time: (p - 1)/(m v); the idle share of the step is another number
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m * v), abs=1e-12)
    assert sim.bubble_fraction == pytest.approx(pl.bubble_fraction(kind, p, m, v), abs=1e-12)
    assert sim.idle_share == pytest.approx((p - 1) / (m * v + p - 1), abs=1e-12)
    assert sim.makespan == pytest.approx(ideal + (p - 1) * sum(costs) / v)


@given(schedules())
def test_peak_inflight_closed_form_matches_the_schedules(args):
    kind, p, m, v = args
    actions = pl.schedule(kind, p, m, v)
    sim = pl.simulate(actions)
    for r in range(p):
        assert sim.peak_inflight[r] == pl.peak_inflight_of(actions[r]) == pl.peak_inflight(kind, p, m, r, v)
        assert sim.peak_activations[r] == pytest.approx(sim.peak_inflight[r] / v)
    if kind == "1f1b":
        assert sim.peak_inflight == [min(p - r, m) for r in range(p)]
    if kind == "gpipe":
        assert sim.peak_inflight == [m] * p


@pytest.mark.parametrize("p,m", [(2, 2), (4, 8), (4, 3), (8, 16)])
def test_1f1b_has_gpipes_bubble_but_caps_memory(p, m):
    g, f = pl.simulate(pl.schedule("gpipe", p, m), 1.0, 2.0), pl.simulate(pl.schedule("1f1b", p, m), 1.0, 2.0)
    assert g.makespan == pytest.approx(f.makespan) == pytest.approx((m + p - 1) * 3.0)
    assert max(f.peak_inflight) == min(p, m) <= max(g.peak_inflight) == m


def test_interleaving_divides_the_bubble_but_pays_more_for_messages():
    p, m, c = 4, 8, 0.25
    base = pl.simulate(pl.schedule("1f1b", p, m))
    for v in (2, 4):
        sim = pl.simulate(pl.schedule("interleaved-1f1b", p, m, v))
        assert sim.makespan - 2 * m == pytest.approx((base.makespan - 2 * m) / v)
    assert pl.schedule("interleaved-1f1b", p, m, 1) == pl.schedule("1f1b", p, m)  # v = 1 is 1F1B

    def latency_cost(kind, v=1):  # what a message latency c adds to the step
        actions = pl.schedule(kind, p, m, v)
        return pl.simulate(actions, comm_cost=c).makespan - pl.simulate(actions).makespan

    assert latency_cost("gpipe") == pytest.approx(2 * (p - 1) * c)  # fill and drain: p - 1 hops each
    # 1F1B's steady state waits for round trips; four chunks per rank put four times the hops in the way
    assert latency_cost("gpipe") < latency_cost("1f1b") < latency_cost("interleaved-1f1b", 4)


def _torch_ir():
    from torch.distributed.pipelining import schedules as S

    if (not hasattr(S, "_Action") or "_get_pipeline_order" not in vars(S.ScheduleGPipe)
            or not hasattr(S.ScheduleInterleaved1F1B, "_calculate_single_rank_operations")):
        pytest.skip(f"torch {torch.__version__} lacks the schedule IR these comparisons read")
    return S


def _from_torch(S, ops) -> list[pl.Action]:
    kinds = {S._ComputationType.FORWARD: "F", S._ComputationType.FULL_BACKWARD: "B"}
    return [pl.Action(kinds[a.computation_type], a.stage_index, a.microbatch_index) for a in ops
            if a is not None and a.computation_type in kinds]


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (3, 9, 4), (8, 16, 2)])
def test_orders_equal_torch_pipelinings(p, m, v):
    """GPipe and interleaved 1F1B equal torch's schedule IR action for action. (Schedule1F1B's IR,
    `_get_pipeline_order`, is a drawing aid that skips microbatch 0 on the last rank in torch 2.13; its
    execution order, which the dist tests below compare numerically, is the one labkit builds.)"""
    from types import SimpleNamespace

    S = _torch_ir()
    gpipe = S.ScheduleGPipe._get_pipeline_order(SimpleNamespace(_num_stages=p, _n_microbatches=m))
    assert [_from_torch(S, gpipe[r]) for r in range(p)] == pl.schedule("gpipe", p, m)
    me = SimpleNamespace(_n_microbatches=m, n_local_stages=v, pp_group_size=p, microbatches_per_round=p)
    theirs = [_from_torch(S, S.ScheduleInterleaved1F1B._calculate_single_rank_operations(me, r)) for r in range(p)]
    assert theirs == pl.schedule("interleaved-1f1b", p, m, v)


def test_validate_rejects_broken_schedules():
    good = pl.schedule("1f1b", 2, 2)
    pl.validate(good)
    with pytest.raises(ValueError, match="before its forward"):
        pl.validate([[pl.Action("B", 0, 0), pl.Action("F", 0, 0)] + good[0][1:]] + good[1:])
    with pytest.raises(ValueError, match=r"B1@s0 appears 0 times"):
        pl.validate([[a for a in good[0] if a != pl.Action("B", 0, 1)]] + good[1:])
    with pytest.raises(ValueError, match=r"F0@s1 appears 2 times"):
        pl.validate([good[0], [pl.Action("F", 1, 0)] + good[1]])
    with pytest.raises(ValueError, match="lives on rank 1"):
        pl.validate([good[0] + [pl.Action("F", 1, 0)], good[1]])
    crossed = [[pl.Action(o, 0, i) for o, i in [("F", 0), ("B", 0), ("F", 1), ("B", 1)]],
               [pl.Action(o, 1, i) for o, i in [("F", 1), ("F", 0), ("B", 0), ("B", 1)]]]
    with pytest.raises(ValueError, match="deadlocks"):
        pl.validate(crossed)
    with pytest.raises(TypeError, match="actions must be a non-empty list"):
        pl.simulate([])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        pl.schedule("zero-bubble", 4, 8)
    with pytest.raises(ValueError, match="virtual_stages must be 1 for kind 'gpipe'"):
        pl.schedule("gpipe", 4, 8, 2)
    with pytest.raises(ValueError, match=r"microbatches must be a multiple of stages \(4\)"):
        pl.schedule("interleaved-1f1b", 4, 6, 2)
    with pytest.raises(ValueError, match="stages must be an int >= 1, got 0"):
        pl.schedule("1f1b", 0, 8)
    with pytest.raises(TypeError, match="microbatches must be an int"):
        pl.bubble_fraction("1f1b", 4, 8.0)
    with pytest.raises(ValueError, match=r"rank must be < stages \(4\)"):
        pl.peak_inflight("1f1b", 4, 8, 4)
    with pytest.raises(ValueError, match="forward_cost must be in"):
        pl.simulate(pl.schedule("1f1b", 2, 2), forward_cost=0)
    with pytest.raises(ValueError, match="n_stages must be <= the number of layers"):
        pl.split_stages(pl.make_model(pl.ModelSpec(n_layers=2)), 3)
    with pytest.raises(TypeError, match="model must be an nn.Sequential"):
        pl.split_stages(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match=r"spec.batch \(8\) must be a multiple of microbatches \(3\)"):
        pl.run_jobs([pl.Job("gpipe", 3)], 2)
    with pytest.raises(ValueError, match="8 stages need at least that many layers"):
        pl.run_jobs([pl.Job("interleaved-1f1b", 4, 2)], 4, pl.ModelSpec(n_layers=4))
    with pytest.raises(ValueError, match="Schedule1F1B needs microbatches >= stages"):
        pl.run_jobs([pl.Job("1f1b", 2, engine="torch")], 4)
    with pytest.raises(ValueError, match="engine must be one of"):
        pl.run_jobs([pl.Job("1f1b", 2, engine="deepspeed")], 2)


def test_split_stages_keeps_names_and_balances():
    model = pl.make_model(pl.ModelSpec(n_layers=7))
    stages = pl.split_stages(model, 3)
    assert [len(s) for s in stages] == [3, 2, 2]
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()]
    x = torch.randn(2, 8, 32)
    y = x
    for s in stages:
        y = s(y)
    torch.testing.assert_close(y, model(x))


def test_executor_in_one_process_equals_the_unsplit_model():
    """A single rank (p = 1, every stage local) runs without any message: the bookkeeping alone."""
    spec = pl.ModelSpec(n_layers=4, batch=4)
    ref = pl.reference_step(spec)
    model = pl.make_model(spec)
    x, y = pl.make_batch(spec)
    res = pl.run_schedule(pl.schedule("1f1b", 1, 4)[0], {0: model}, 1, 1, list(x.chunk(4)), list(y.chunk(4)))
    torch.testing.assert_close(torch.cat([res["outputs"][i] for i in range(4)]), ref["output"], rtol=RTOL, atol=ATOL)
    assert sum(res["losses"].values()) / 4 == pytest.approx(ref["loss"], rel=RTOL, abs=ATOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref["grads"][n], rtol=RTOL, atol=ATOL)
    assert res["peak_inflight"] == 1 and res["peak_saved_bytes"] > 0


# --------------------------------------------------------------------------- on real ranks


def _assert_parity(run: pl.PipelineRun, ref: dict, what: str) -> None:
    torch.testing.assert_close(run.output, ref["output"], rtol=RTOL, atol=ATOL, msg=f"{what}: output")
    assert run.loss == pytest.approx(ref["loss"], rel=RTOL, abs=ATOL), what
    assert set(run.grads) == set(ref["grads"]), what
    for n, g in ref["grads"].items():
        torch.testing.assert_close(run.grads[n], g, rtol=RTOL, atol=ATOL, msg=f"{what}: gradient of {n}")


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_executor_equals_unsplit_model_and_torch_pipelining(world_size):
    p, m, v = world_size, 4, 2
    spec = pl.ModelSpec(n_layers=p * v, batch=8)
    emulated = (10.0, 20.0)
    jobs = [pl.Job(kind, m, v if kind == "interleaved-1f1b" else 1, engine=engine)
            for kind in pl.KINDS for engine in ("labkit", "torch")]
    jobs += [pl.Job("1f1b", 2), pl.Job("gpipe", m, device_ms=emulated)]  # m < p on 4 ranks; emulated device time
    runs = pl.run_jobs(jobs, p, spec)
    ref = pl.reference_step(spec)
    for run in runs:
        job = run.job
        _assert_parity(run, ref, f"{job.engine} {job.kind} m={job.microbatches} v={job.virtual_stages}")
        if job.engine == "labkit":
            sched = pl.schedule(job.kind, p, job.microbatches, job.virtual_stages)
            assert run.peak_inflight == [pl.peak_inflight(job.kind, p, job.microbatches, r, job.virtual_stages)
                                         for r in range(p)]
            for r in range(p):  # each rank ran its list in order, and waited for what it needed
                mine = sorted((s for s in run.spans if s["rank"] == r), key=lambda s: s["start"])
                assert [pl.Action(s["op"], s["stage"], s["microbatch"]) for s in mine] == sched[r]
            ends = {pl.Action(s["op"], s["stage"], s["microbatch"]): s["end"] for s in run.spans}
            for s in run.spans:
                a = pl.Action(s["op"], s["stage"], s["microbatch"])
                assert all(ends[d] <= s["start"] + 1e-3 for d in _deps(a, p * job.virtual_stages))
    gpipe, one_f = runs[0], runs[2]
    # 1F1B keeps at most p microbatches alive on rank 0 instead of m: the saved bytes shrink by m / p
    assert gpipe.peak_saved_bytes[0] == pytest.approx(one_f.peak_saved_bytes[0] * m / min(p, m), rel=0.01)
    # with emulated device time the ranks cannot beat the simulator: every action lasts at least its
    # emulated time and starts after what it waits for, so this holds on any machine, however loaded
    # (no upper bound: a busy CI machine can stretch a step arbitrarily)
    timed = runs[-1]
    sim = pl.simulate(pl.schedule("gpipe", p, m), *emulated)
    assert timed.makespan * 1e3 >= sim.makespan * 0.99


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_failing_rank_is_named_and_nothing_hangs():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed first") as err:
        pl.run_jobs([pl.Job("1f1b", 4, fail_at=("F", 1, 2))], 2, timeout=10, grace=2)
    assert err.value.rank == 1
    assert "injected failure at F2@s1" in str(err.value)
    assert time.monotonic() - t0 < 60  # the 2 s grace period ended it, not run_jobs' 240 s deadline


# --------------------------------------------------------------------------- exercises


def test_chapter_exercises_are_registered():
    from labkit.exercises import exercises_for

    assert exercises_for("14-pipeline") == ["pipeline.bubble_fraction", "pipeline.makespan",
                                            "pipeline.one_f_one_b", "pipeline.peak_inflight"]


@pytest.mark.parametrize("name", ["pipeline.one_f_one_b", "pipeline.bubble_fraction", "pipeline.peak_inflight",
                                  "pipeline.makespan"])
def test_references_pass(name):
    from labkit.exercises import lookup

    assert labkit.check(name, lookup(name).reference, quiet=True)


def _order_warmup(warmup):
    def fn(stages, microbatches, rank):
        w = min(warmup(stages, rank), microbatches)
        out = [("F", i) for i in range(w)]
        for i in range(microbatches - w):
            out += [("F", w + i), ("B", i)]
        return out + [("B", i) for i in range(microbatches - w, microbatches)]
    return fn


def _makespan_without_dependencies(actions, forward_cost, backward_cost):  # each rank's busy time only
    return max(sum(forward_cost if a[0] == "F" else backward_cost for a in lst) for lst in actions)


def _makespan_full_cost_per_chunk(actions, forward_cost, backward_cost):  # forgets that a chunk costs 1/v
    v = len({a[1] for lst in actions for a in lst}) // len(actions)
    return pl.simulate(actions, forward_cost * v, backward_cost * v).makespan


@pytest.mark.parametrize("name,fn", [
    ("pipeline.one_f_one_b", _order_warmup(lambda p, r: p - 1)),  # the same warm-up on every rank
    ("pipeline.one_f_one_b", _order_warmup(lambda p, r: r)),  # warm-up counted from the wrong end
    ("pipeline.one_f_one_b", lambda stages, microbatches, rank:  # GPipe's order
     [("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)]),
    ("pipeline.bubble_fraction", lambda kind, stages, microbatches, virtual_stages:  # share of the step
     (stages - 1) / (microbatches * virtual_stages + stages - 1)),
    ("pipeline.bubble_fraction", lambda kind, stages, microbatches, virtual_stages:  # forgets v
     (stages - 1) / microbatches),
    ("pipeline.peak_inflight", lambda kind, stages, microbatches, rank, virtual_stages:  # p on every rank
     microbatches if kind == "gpipe" else min(stages, microbatches) * virtual_stages),
    ("pipeline.peak_inflight", lambda kind, stages, microbatches, rank, virtual_stages:  # forgets the cap
     microbatches if kind == "gpipe" else pl.peak_inflight("1f1b", stages, max(microbatches, stages), rank)),
    ("pipeline.makespan", _makespan_without_dependencies),
    ("pipeline.makespan", _makespan_full_cost_per_chunk),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


# --------------------------------------------------------------------------- figures and benchmarks


def test_figures_build_and_the_panel_handles_every_control():
    from labkit.viz import pipeline as vp

    for kind, m, v in [("gpipe", 6, 1), ("1f1b", 6, 1), ("interleaved-1f1b", 8, 3)]:
        fig = vp.schedule_panel_figure(kind, 4, 6, 3, 2.0)  # v is ignored by GPipe and 1F1B; m = 6 -> 8
        assert f"bubble / ideal = {pl.bubble_fraction(kind, 4, m, v):.3f}" in fig.layout.title.text
    assert "m rounded up to 8" in vp.schedule_panel_figure("interleaved-1f1b", 4, 6, 2).layout.title.text
    names = {t.name for t in vp.schedule_panel_figure("interleaved-1f1b", 2, 4, 2).data}
    assert names == {"forward, chunk 0", "forward, chunk 1", "backward, chunk 0", "backward, chunk 1"}
    assert len(vp.bubble_memory_figure(4, 2, 8).data) == 9
    sim = pl.simulate(pl.schedule("1f1b", 2, 4))
    run = pl.PipelineRun(job=pl.Job("1f1b", 4), output=torch.zeros(1), loss=0.0, grads={}, spans=sim.spans)
    fig = vp.measured_figure(run, 2)
    assert f"bubble {sim.bubble_fraction:.3f}" in fig.layout.title.text
    assert len(vp.makespan_figure({"a": 1.0}, {"a": 0.9}).data) == 2


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_benchmark_rows(monkeypatch):
    from labkit.benchmarks import pipeline as bp

    tiny = dict(world_size=2, spec=pl.ModelSpec(n_layers=4, batch=4), microbatches=2, virtual_stages=2,
                device_ms=(4.0, 8.0), repeats=2)
    monkeypatch.setattr(bp, "settings", lambda quick=False: dict(tiny))
    rows = bp.run(quick=True)
    assert [r["name"] for r in rows] == [f"{k} {w}" for k in pl.KINDS for w in ("step", "bubble")]
    steps = [r for r in rows if r["kind"] == "step"]
    assert all(r["median_ms"] > 0 and r["baseline_ms"] > 0 and r["ratio"] == r["baseline_ms"] / r["median_ms"]
               for r in steps)
    assert [r["peak_inflight"] for r in steps] == [pl.peak_inflight(r["schedule"], 2, 2, 0, r["virtual_stages"])
                                                   for r in steps]
    bubbles = [r for r in rows if r["kind"] == "bubble"]
    assert all(r["median_ms"] >= 0.99 * r["baseline_ms"] for r in bubbles)
    assert [r["predicted_bubble"] for r in bubbles] == pytest.approx([1 / 2, 1 / 2, 1 / 4])
