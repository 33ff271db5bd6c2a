"""Tests of labkit.parallel.zero (chapter 12-zero): ZeRO stages 0-3 on real gloo process groups against a
single process and torch's ZeroRedundancyOptimizer, the memory and communication accounting against what
the ranks hold and send, consolidated optimizer states, failures, input checks, exercises, figures and
benchmarks. The rank functions live at module level: the ranks import this file by name."""

from __future__ import annotations

import gc
import math
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.benchmarks import zero as bz
from labkit.models import GPTConfig, TinyGPT
from labkit.parallel import zero as z
from labkit.parallel.launch import RankError, launch, rank, world_size

STEPS = 20
TIED = dict(vocab_size=32, block_size=8, n_layer=2, n_embd=16, n_head=2)  # tied head: root unit holds it
# numels not divisible by 4 (the flat buffers get padding), biases, an untied head
ODD = dict(vocab_size=33, block_size=6, n_layer=2, n_embd=10, n_head=2, bias=True, tie_embeddings=False)


def make_model(cfg: dict, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(**cfg))


def batches(cfg: dict, steps: int, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    V, T = cfg["vocab_size"], cfg["block_size"]
    return [(torch.randint(0, V, (batch, T), generator=g), torch.randint(0, V, (batch, T), generator=g))
            for _ in range(steps)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def decay_groups(model: nn.Module) -> list[dict]:
    """Two param groups: matrices with weight decay, vectors without (the usual AdamW split)."""
    ps = list(model.parameters())
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr": 5e-3}]


def reference(cfg, data, make_opt, micro: int = 1) -> dict:
    """One process, each global batch as `micro` equal slices with accumulated gradients (the ranks' slices:
    the same sum data parallelism computes): losses and flat params per step."""
    m = make_model(cfg)
    opt = make_opt(m)
    losses, params = [], []
    for x, y in data:
        total = 0.0
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = m(xs, ys)[1] / micro
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
        params.append(flat(m.parameters()))
    return dict(losses=losses, params=params, model=m, optimizer=opt)


# --- what the ranks run ------------------------------------------------------------------------


def _train(mode, cfg, data, make_opt, *, micro: int = 1, bucket_numel: int = 700, units=None, consolidate_at=None):
    """Train on this rank's slice of each global batch; returns losses (global mean), flat params per step,
    the model states held after the last step, comm per step, peaks, and optionally a consolidated state."""
    r, n = rank(), world_size()
    m = make_model(cfg)
    forward, wrapper = m, None
    if mode == 3:
        forward = wrapper = z.Zero3Module(m, units=units(m) if units else None)
        opt = make_opt(wrapper)
    elif mode == "torch_zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2)
    else:
        opt = z.ZeroOptimizer(make_opt.groups(m), make_opt.cls, mode, bucket_numel=bucket_numel, **make_opt.kw)
    out = dict(losses=[], params=[])
    for step, (x, y) in enumerate(data, 1):
        b = x.shape[0] // n
        x, y = x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]
        total = torch.zeros(())
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = forward(xs, ys)[1] / micro
            loss.backward()
            total += loss.detach()
        if mode == "torch_zero1":  # ZeroRedundancyOptimizer leaves the gradient averaging to DDP
            for p in m.parameters():
                dist.all_reduce(p.grad)
                p.grad /= n
        opt.step()
        if step == len(data) and mode != "torch_zero1":
            out["held"] = wrapper.rank_bytes(opt) if wrapper else opt.rank_bytes()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        out["losses"].append(total.item() / n)
        out["params"].append(flat(wrapper.full_parameters().values() if wrapper else m.parameters()))
        if step == consolidate_at and mode != "torch_zero1":
            out["state"] = wrapper.consolidated_optimizer_state_dict(opt) if wrapper else opt.consolidated_state_dict()
    if wrapper is not None:
        out.update(comm=wrapper.comm.volume() / len(data), padded=sum(u.bucket.padded for u in wrapper.units),
                   peak=wrapper.peak_gathered_bytes, by_op=wrapper.comm.by_op())
    elif mode != "torch_zero1":
        out.update(comm=opt.comm.volume() / len(data), padded=sum(b.padded for b in opt.buckets),
                   numel=sum(b.numel for b in opt.buckets), peak=opt.peak_grad_bytes, by_op=opt.comm.by_op())
    return out


class Opt:
    """A picklable optimizer recipe: cls, keyword arguments, and optionally param groups."""

    def __init__(self, cls, grouped=False, **kw):
        self.cls, self.grouped, self.kw = cls, grouped, kw

    def groups(self, model):
        return decay_groups(model) if self.grouped else model.parameters()

    def __call__(self, model):  # a plain optimizer over model (or a Zero3Module's shards)
        if self.grouped and not isinstance(model, z.Zero3Module):
            return self.cls(decay_groups(model), **self.kw)
        return self.cls(model.parameters(), **self.kw)


ADAMW = Opt(torch.optim.AdamW, lr=1e-2)


def _two_rank_run():
    data = batches(TIED, STEPS, 8)
    return {mode: _train(mode, TIED, data, ADAMW, consolidate_at=10) for mode in (0, 1, 2, 3, "torch_zero1")}


def _blocks_and_head(model):
    return [*model.blocks, model.lm_head]


# 4 ranks: optimizers linear in the gradient, so the 4-way sum's rounding is not amplified the way Adam's
# 1/sqrt(v) amplifies it for gradients near zero (2 ranks above check Adam over 20 steps)
STEPS4 = 10
GROUPED_SGD = Opt(torch.optim.SGD, grouped=True, lr=0.05, momentum=0.9)
NESTEROV = Opt(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True)


def _four_rank_run():
    data = batches(ODD, STEPS4, 8)
    return {
        "stage1_groups": _train(1, ODD, data, GROUPED_SGD, bucket_numel=300),
        "stage2_accumulate": _train(2, ODD, data, NESTEROV, micro=2, bucket_numel=300),
        "stage3_units": _train(3, ODD, data, NESTEROV, units=_blocks_and_head),
    }


def _mismatched_models():
    cfg = dict(TIED, n_embd=16 if rank() == 0 else 32)
    z.ZeroOptimizer(make_model(cfg).parameters(), torch.optim.AdamW, 1)


def _rank_one_dies_mid_step():
    m = make_model(TIED)
    opt = z.ZeroOptimizer(m.parameters(), torch.optim.AdamW, 2, lr=1e-2)
    x, y = batches(TIED, 1, 2)[0]
    if rank() == 1:
        raise RuntimeError("rank 1 dies before its backward pass")
    m(x, y)[1].backward()  # rank 0 blocks in a reduce-scatter that rank 1 never joins
    opt.step()


# --- 2 ranks: parity, memory, communication, consolidation ----------------------------------


@pytest.fixture(scope="module")
def two_ranks():
    out = launch(_two_rank_run, 2, timeout=60, deadline=240)
    ref = reference(TIED, batches(TIED, STEPS, 8), ADAMW, micro=2)  # the ranks' two halves, accumulated
    return out, ref


@pytest.mark.parametrize("mode", [0, 1, 2, 3, "torch_zero1"])
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_every_stage_matches_one_process_every_step(two_ranks, mode):
    out, ref = two_ranks
    for r in out:
        got = r[mode]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]))
        for step, (p, q) in enumerate(zip(got["params"], ref["params"]), 1):
            torch.testing.assert_close(p, q, msg=lambda m: f"stage {mode}, step {step}: {m}")
    assert out[0][mode]["params"][-1].equal(out[1][mode]["params"][-1])  # both ranks hold the same model


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_stage1_equals_zero_redundancy_optimizer(two_ranks):
    out, _ = two_ranks
    for r in out:
        for p, q in zip(r[1]["params"], r["torch_zero1"]["params"]):
            torch.testing.assert_close(p, q)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_bytes_held_per_rank_equal_memory_per_rank(two_ranks, stage):
    """fp32 Adam: 4 + 4 + 8 bytes a parameter, divided by N as the stage says, on the padded count."""
    out, ref = two_ranks
    psi = ref["model"].num_params()
    for r in out:
        got = r[stage]
        assert psi <= got["padded"] < psi + 2 * 16  # at most N - 1 padding elements per bucket
        expected = z.memory_per_rank(got["padded"], stage, 2, "adam", torch.float32)
        assert got["held"] == expected, (got["held"], expected)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_communication_is_2psi_then_3psi(two_ranks):
    out, _ = two_ranks
    for r in out:
        for stage in range(4):
            assert r[stage]["comm"] == z.comm_volume(r[stage]["padded"], stage)
        psi = r[1]["padded"]
        assert r[0]["by_op"] == {"all_reduce": psi * STEPS}
        assert r[1]["by_op"] == r[2]["by_op"] == {"reduce_scatter": psi * STEPS, "all_gather": psi * STEPS}
        # stage 3: the forward gathers everything, the backward everything again (every unit's weights are saved)
        psi3 = r[3]["padded"]
        assert r[3]["by_op"] == {"all_gather": 2 * psi3 * STEPS, "reduce_scatter": psi3 * STEPS}


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_stage2_and_stage3_never_hold_everything_in_full(two_ranks):
    out, ref = two_ranks
    full = ref["model"].num_params() * 4
    for r in out:
        assert r[0]["peak"] == r[1]["peak"] == r[1]["numel"] * 4  # every full gradient at once
        assert r[2]["peak"] < r[1]["peak"] / 2  # one bucket of full gradients at a time
        assert r[3]["peak"] < full  # the root unit and one block gathered, never the whole model


@pytest.mark.parametrize("mode", [1, 2, 3])
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_consolidated_state_loads_into_a_plain_optimizer_and_training_continues(two_ranks, mode):
    """Step 10's consolidated state + parameters, loaded into torch.optim.AdamW on one process, then 10 more
    steps == the uninterrupted single-process run."""
    out, ref = two_ranks
    m = make_model(TIED)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(out[0][mode]["params"][9], m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    opt.load_state_dict(out[0][mode]["state"])
    assert float(opt.state_dict()["state"][0]["step"]) == 10
    for x, y in batches(TIED, STEPS, 8)[10:]:
        m(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(flat(m.parameters()), ref["params"][-1])


# --- 4 ranks: padding, param groups, other optimizers, accumulation, custom units -----------


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_four_ranks_with_padding_groups_accumulation_and_units():
    out = launch(_four_rank_run, 4, timeout=60, deadline=240)
    data = batches(ODD, STEPS4, 8)
    refs = {"stage1_groups": reference(ODD, data, GROUPED_SGD, micro=4),
            "stage2_accumulate": reference(ODD, data, NESTEROV, micro=8),
            "stage3_units": reference(ODD, data, NESTEROV, micro=4)}
    psi = refs["stage3_units"]["model"].num_params()
    for name, ref in refs.items():
        for r in out:
            torch.testing.assert_close(torch.tensor(r[name]["losses"]), torch.tensor(ref["losses"]))
            for step, (p, q) in enumerate(zip(r[name]["params"], ref["params"]), 1):
                torch.testing.assert_close(p, q, msg=lambda m: f"{name}, step {step}: {m}")
    got = out[0]["stage1_groups"]
    assert got["padded"] > got["numel"] == psi  # padding was exercised
    padded, exact = (z.memory_per_rank(got[k], 1, 4, "sgd_momentum", torch.float32) for k in ("padded", "numel"))
    held = got["held"]  # flat buffers and their slices are padded; the full gradients on the parameters are not
    assert (held.params, held.grads, held.optimizer) == (padded.params, exact.grads, padded.optimizer)
    got = out[0]["stage2_accumulate"]
    assert got["held"] == z.memory_per_rank(got["padded"], 2, 4, "sgd_momentum", torch.float32)
    assert got["by_op"]["reduce_scatter"] == 2 * got["padded"] * STEPS4  # one reduce-scatter per micro-batch
    got = out[0]["stage3_units"]
    assert got["held"] == z.memory_per_rank(got["padded"], 3, 4, "sgd_momentum", torch.float32)


# --- failures never hang -------------------------------------------------------------------


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_ranks_with_different_models_fail_at_construction():
    with pytest.raises(RankError, match=r"every rank must pass the same parameters .* ranks \[1\] differ"):
        launch(_mismatched_models, 2, timeout=20, deadline=120)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_rank_dying_mid_step_is_named_and_nothing_hangs():
    with pytest.raises(RankError, match="rank 1 failed first") as err:
        launch(_rank_one_dies_mid_step, 2, timeout=10, grace=1, deadline=120)
    assert "rank 1 dies before its backward pass" in str(err.value)
    assert 0 in err.value.failures  # rank 0 was stopped, not left waiting


# --- DeepSpeed side by side (optional: DS_BUILD_OPS=0 pip install deepspeed) ---------------------

DS_MODEL = dict(n_layer=2, n_embd=32, n_head=2, block_size=32)  # the chapter's CPU size, char vocabulary
DS_STEPS = 5


def _ours_and_deepspeed():
    kw = dict(model=DS_MODEL, steps=DS_STEPS, batch=8, bucket_numel=4096)
    return bz.train_stages(modes=(2, 3), **kw), bz.train_deepspeed((2, 3), **kw)


@pytest.mark.skipif(not bz.deepspeed_available(), reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install "
                    "deepspeed); looked up, not imported: the ranks import it")
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_deepspeed_zero2_and_zero3_train_bit_for_bit_like_ours():
    """deepspeed.initialize (fp32, torch's AdamW, no clipping) at ZeRO-2 and ZeRO-3 against our stages 2 and 3
    and one process, every step, demanded bit for bit: on 2 CPU ranks with one thread each both compute the
    same per-rank gradients with the same kernels, a sum of two terms does not depend on its order, the
    division by 2 is exact, and both step torch's elementwise AdamW on flat fp32 partitions. (With
    DeepSpeed's default clipping at norm 1.0 the parameters differed by 1e-3 after 2 steps.)"""
    out = launch(_ours_and_deepspeed, 2, timeout=120, deadline=280)  # the first run compiles a comm op (~40 s)
    ref = bz.reference_run(DS_MODEL, DS_STEPS, 8, world_size=2)
    psi, tensors = ref["num_params"], len(list(bz.make_model(DS_MODEL).parameters()))
    for ours, ds in out:
        for stage in (2, 3):
            got = ds[stage]
            assert got["losses"] == ours[stage]["losses"]  # the same fp32 all-reduce of the same losses
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]))  # ref sums in fp64
            for step, (p, q, r) in enumerate(zip(got["params"], ours[stage]["params"], ref["params"]), 1):
                assert torch.equal(p, q) and torch.equal(p, r), f"ZeRO-{stage}, step {step}"
            # memory: this rank's partition (DeepSpeed pads each flat group, or at stage 3 each parameter)
            part = got["partition_numel"]
            assert psi <= 2 * part < psi + 2 * tensors
            expected = z.memory_per_rank(2 * part, stage, 2, "adam", torch.float32)
            assert got["optimizer_bytes"] == expected.optimizer == 8 * part  # two fp32 moments, 1/N of them
            assert got["param_bytes"] == expected.params  # the whole flat buffer (stage 2), a slice (stage 3)
        # an fp32 master copy of the partition besides the fp32 weights: K = 12 bytes where ours needs 8.
        # Stage 3 may skip it when the partition already is fp32 on its device (DeepSpeed's device check
        # fails on its CPU accelerator, so here it copies too)
        assert ds[2]["master_bytes"] == 4 * ds[2]["partition_numel"]
        assert ds[3]["master_bytes"] in (0, 4 * ds[3]["partition_numel"])
    (_, ds0), (_, ds1) = out
    assert ds0[3]["params"][-1].equal(ds1[3]["params"][-1])  # both ranks gathered the same model


@pytest.mark.parametrize("call,error,match", [
    (lambda: bz.deepspeed_config(4, 8, 2), ValueError, r"deepspeed_config: stage must be one of \(0, 1, 2, 3\)"),
    (lambda: bz.deepspeed_config(2, 7, 2), ValueError, r"deepspeed_config: batch must be divisible by world_size=2"),
    (lambda: bz.deepspeed_config(2, 8, 2, lr=0), ValueError, r"deepspeed_config: lr must be"),
    (lambda: bz.deepspeed_config(2, 8, 2, bucket_numel=0), ValueError, r"deepspeed_config: bucket_numel must be"),
    (lambda: bz.train_deepspeed((0,)), ValueError, r"train_deepspeed: stage must be one of \(1, 2, 3\), got 0"),
    (lambda: bz.train_deepspeed(), RuntimeError, r"train_deepspeed: run it on ranks"),
])
def test_deepspeed_helpers_check_their_input_without_importing_deepspeed(call, error, match):
    loaded = "deepspeed" in sys.modules
    with pytest.raises(error, match=match):
        call()
    assert ("deepspeed" in sys.modules) == loaded  # the checks come before DeepSpeed's (lazy) import


def test_deepspeed_config_describes_our_run():
    """torch.optim.AdamW's defaults (what our stages use), fp32, no clipping, one micro-batch per rank and step."""
    cfg = bz.deepspeed_config(3, 8, 2, lr=3e-3, bucket_numel=1000)
    ours = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=3e-3).defaults
    adam = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW" and adam["torch_adam"] is True
    assert (adam["lr"], tuple(adam["betas"]), adam["eps"], adam["weight_decay"]) == (
        ours["lr"], ours["betas"], ours["eps"], ours["weight_decay"])
    assert "fp16" not in cfg and "bf16" not in cfg and cfg["gradient_clipping"] == 0.0
    sizes = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
    assert sizes == (8, 4, 1)
    assert cfg["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000, "stage3_param_persistence_threshold": 0}
    assert "stage3_param_persistence_threshold" not in bz.deepspeed_config(2, 8, 2)["zero_optimization"]


# --- one process: the same code without collectives ------------------------------------------


shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=5)


@given(shapes=shapes, stage=st.sampled_from([0, 1, 2]), bucket=st.integers(1, 60), seed=st.integers(0, 999))
def test_one_process_equals_the_plain_optimizer(shapes, stage, bucket, seed):
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(*s, generator=g) for s in shapes]
    ours = [nn.Parameter(t.clone()) for t in start]
    theirs = [nn.Parameter(t.clone()) for t in start]
    opt = z.ZeroOptimizer(ours, torch.optim.AdamW, stage, bucket_numel=bucket, lr=0.1, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.1, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, q, gr in zip(ours, theirs, grads):
            (p * gr).sum().backward()
            q.grad = gr.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)
    assert all(len(b.params) == 1 or b.numel <= bucket for b in opt.buckets)
    sd = opt.consolidated_state_dict()
    for i, q in enumerate(theirs):
        torch.testing.assert_close(sd["state"][i]["exp_avg"], ref.state[q]["exp_avg"])


def test_parameters_become_views_of_the_flat_buffer():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = [p.detach().clone() for p in m.parameters()]
    opt = z.ZeroOptimizer(m.parameters(), torch.optim.SGD, 1, lr=0.1)
    (b,) = opt.buckets
    assert all(p.untyped_storage().data_ptr() == b.flat.untyped_storage().data_ptr() for p in m.parameters())
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert opt.rank_bytes() == z.ZeroMemory(params=b.padded * 4, grads=0, optimizer=0)


def test_stage2_frees_each_bucket_of_full_gradients_during_backward():
    m = make_model(TIED)
    opt = z.ZeroOptimizer(m.parameters(), torch.optim.AdamW, 2, bucket_numel=600, lr=1e-2)
    x, y = batches(TIED, 1, 4)[0]
    m(x, y)[1].backward()
    assert all(p.grad is None for p in m.parameters())  # reduced into the slices already
    biggest = max(b.numel for b in opt.buckets) + max(p.numel() for p in m.parameters())
    assert opt.peak_grad_bytes <= 4 * biggest < 4 * m.num_params() / 3
    assert all(b.reduced for b in opt.buckets)


@pytest.mark.parametrize("units", [None, "attn+mlp"])
def test_zero3_one_process_matches_plain_training_and_consolidates(units):
    data = batches(TIED, 5, 4)
    ref = reference(TIED, data, ADAMW)
    m = make_model(TIED)
    w = z.Zero3Module(m, units=[u for b in m.blocks for u in (b.attn, b.mlp)] if units else None)
    assert [n for n, _ in make_model(TIED).named_parameters()] == w.param_names
    opt = torch.optim.AdamW(w.parameters(), lr=1e-2)
    for x, y in data:
        w(x, y)  # a forward whose graph is dropped without a backward must leave nothing stale behind
        w(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(flat(w.full_parameters().values()), ref["params"][-1])
    plain = torch.optim.AdamW(ref["model"].parameters(), lr=1e-2)
    plain.load_state_dict(w.consolidated_optimizer_state_dict(opt))
    for p in ref["model"].parameters():  # the consolidated state == the single-process optimizer's
        torch.testing.assert_close(plain.state[p]["exp_avg_sq"], ref["optimizer"].state[p]["exp_avg_sq"])
    assert all(getattr(mod, "weight", None) is None for mod in m.modules() if isinstance(mod, nn.Linear))
    assert w.gathered_bytes == 0  # nothing stays gathered after a step


def test_zero3_frees_the_full_parameters():
    """After wrapping, the rank keeps its shards only: nothing holds on to the original (full) tensors."""
    m = make_model(TIED)
    originals = [weakref.ref(p) for p in m.parameters()]
    w = z.Zero3Module(m)
    gc.collect()
    assert not [r for r in originals if r() is not None]
    assert w.rank_bytes().params == sum(u.bucket.padded for u in w.units) * 4


def test_stage2_keeps_the_gradients_of_a_micro_batch_that_skips_a_parameter():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    ra, rb = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = z.ZeroOptimizer([a, b], torch.optim.SGD, 2, lr=0.1)
    ref = torch.optim.SGD([ra, rb], lr=0.1)
    for x, y in ((a, b), (ra, rb)):
        (2 * x.sum() + 3 * y.sum()).backward()  # micro-batch 1: the bucket is complete and reduced
        (5 * x.sum()).backward()  # micro-batch 2: y gets no gradient, the bucket never completes
    opt.step()
    ref.step()
    torch.testing.assert_close(a, ra)
    torch.testing.assert_close(b, rb)


def test_zero3_gradcheck_in_float64():
    """Gather (forward), the saved-weight placeholders (re-gathered in backward) and the reduce-scatter
    of the gradient, against finite differences."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    w = z.Zero3Module(model, units=[model[0], model[2]])
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *shards):
        for u, s in zip(w.units, shards):
            u.shard = s
        return w(x)

    inputs = [x] + [u.shard.detach().clone().requires_grad_() for u in w.units]
    assert torch.autograd.gradcheck(f, inputs)
    with torch.no_grad():  # no graph: gathering still works (evaluation)
        assert f(*inputs).shape == (5, 2)


# --- accounting -----------------------------------------------------------------------------


def test_memory_per_rank_reproduces_the_papers_example():
    """ZeRO paper, Psi = 7.5B, N = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.88 GB per rank."""
    gb = [z.memory_per_rank(7_500_000_000, s, 64).total / 1e9 for s in z.STAGES]
    assert gb == pytest.approx([120, 31.40625, 16.640625, 1.875])
    assert z.optimizer_bytes_per_param("adam", torch.bfloat16) == 12
    assert z.optimizer_bytes_per_param("adam", torch.float32) == 8
    assert z.optimizer_bytes_per_param("sgd", torch.float16) == 4  # the fp32 master copy alone
    assert z.optimizer_bytes_per_param("sgd", torch.float32) == 0


@given(psi=st.integers(0, 10**12), n=st.integers(1, 4096), opt=st.sampled_from(list(z.STATES_PER_PARAM)),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_memory_shrinks_stage_by_stage_and_stage3_is_stage0_over_n(psi, n, opt, dtype):
    mems = [z.memory_per_rank(psi, s, n, opt, dtype) for s in z.STAGES]
    totals = [m.total for m in mems]
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    assert totals[3] == pytest.approx(totals[0] / n)
    b = torch.empty((), dtype=dtype).element_size()
    assert mems[0].params == mems[2].params == b * psi and mems[1].grads == b * psi
    if n > 1 and psi > 0 and z.optimizer_bytes_per_param(opt, dtype) > 0:
        assert totals[1] < totals[0]


@given(psi=st.integers(0, 10**12), n=st.integers(1, 4096), stage=st.sampled_from(z.STAGES))
def test_comm_volume(psi, n, stage):
    paper = z.comm_volume(psi, stage)
    assert paper == (3 if stage == 3 else 2) * psi
    assert z.comm_volume(psi, stage, n) == pytest.approx(paper * (n - 1) / n)


@given(numel=st.integers(0, 5000), n=st.integers(1, 64))
def test_shards_partition_the_flat_buffer(numel, n):
    ranges = [z.shard_range(numel, n, r) for r in range(n)]
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
    size = z.padded_numel(numel, n) // n
    assert z.padded_numel(numel, n) % n == 0 and z.padded_numel(numel, n) - numel < n
    assert all(0 <= e - s <= size for s, e in ranges)
    if numel:
        bucket = z.FlatBucket([torch.zeros(numel)], n, n - 1)
        assert bucket.start + bucket.shard_numel == bucket.padded and bucket.shard_numel == size


def test_flat_bucket_lays_parameters_end_to_end():
    ps = [torch.randn(3, 4), torch.randn(4), torch.randn(())]
    b = z.FlatBucket(ps, world_size=4, rank=1)
    assert b.offsets == [0, 12, 16] and b.numels == [12, 4, 1] and (b.numel, b.padded) == (17, 20)
    assert (b.start, b.shard_numel) == (5, 5)
    flat = b.flatten(ps)
    assert torch.equal(flat[17:], torch.zeros(3))  # the padding
    assert all(torch.equal(v, p) for v, p in zip(b.views(flat), ps))
    assert torch.equal(b.local(flat), flat[5:10])


def test_comm_log_counts_the_papers_way():
    log = z.CommLog(4)
    log.add("all_reduce", 10)
    log.add("all_gather", 10)
    assert log.volume() == 30 and log.sent() == pytest.approx(22.5) and log.by_op() == {"all_reduce": 10,
                                                                                         "all_gather": 10}
    single = z.CommLog(1)
    single.add("all_reduce", 10)
    assert single.calls == []  # one rank sends nothing


# --- input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda: z.memory_per_rank(-1, 0, 1), ValueError, r"memory_per_rank: num_params must be an int >= 0, got -1"),
    (lambda: z.memory_per_rank(10, 4, 1), ValueError, r"memory_per_rank: stage must be one of \(0, 1, 2, 3\), got 4"),
    (lambda: z.memory_per_rank(10, 1, 0), ValueError, r"memory_per_rank: world_size must be an int >= 1, got 0"),
    (lambda: z.memory_per_rank(10, 1.5, 2), TypeError, r"memory_per_rank: stage must be an int"),
    (lambda: z.memory_per_rank(10, 1, 2, "lion"), ValueError, r"optimizer_bytes_per_param: optimizer must be one of"),
    (lambda: z.memory_per_rank(10, 1, 2, dtype=torch.int8), TypeError, r"dtype must be a floating torch.dtype"),
    (lambda: z.comm_volume(10, 1, 0), ValueError, r"comm_volume: world_size must be an int >= 1"),
    (lambda: z.shard_range(10, 4, 4), ValueError, r"shard_range: rank must be in \[0, 3\] for world_size=4, got 4"),
    (lambda: z.shard_range(10, 4, -1), ValueError, r"shard_range: rank must be an int >= 0"),
    (lambda: z.padded_numel(10, 0), ValueError, r"padded_numel: world_size must be an int >= 1"),
    (lambda: z.single_process_run(nn.Linear(2, 2), None, [], micro=0), ValueError,
     r"single_process_run: micro must be an int >= 1, got 0"),
])
def test_accounting_input_checks(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_zero_optimizer_input_checks():
    ps = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="stage must be 0, 1 or 2; stage 3 partitions the parameters themselves"):
        z.ZeroOptimizer(ps, torch.optim.AdamW, 3)
    with pytest.raises(ValueError, match=r"ZeroOptimizer: stage must be one of \(0, 1, 2\), got 5"):
        z.ZeroOptimizer(ps, torch.optim.AdamW, 5)
    with pytest.raises(TypeError, match="optimizer_cls must be a torch.optim.Optimizer subclass"):
        z.ZeroOptimizer(ps, "adam", 1)
    with pytest.raises(ValueError, match="parameter 1 of param group 0 appears twice"):
        z.ZeroOptimizer([ps[0], ps[0]], torch.optim.SGD, 1, lr=0.1)
    with pytest.raises(ValueError, match="must share one dtype and device"):
        z.ZeroOptimizer([ps[0], nn.Parameter(torch.zeros(2, dtype=torch.float64))], torch.optim.SGD, 1, lr=0.1)
    with pytest.raises(TypeError, match="parameter 0 of param group 0 must be a floating-point leaf tensor"):
        z.ZeroOptimizer([torch.zeros(3, dtype=torch.long)], torch.optim.SGD, 1, lr=0.1)
    with pytest.raises(TypeError, match="params must be an iterable of tensors"):
        z.ZeroOptimizer(ps[0], torch.optim.SGD, 1, lr=0.1)
    with pytest.raises(ValueError, match="param group 0 has no parameters"):
        z.ZeroOptimizer([{"params": []}], torch.optim.SGD, 1, lr=0.1)
    with pytest.raises(ValueError, match="bucket_numel must be an int >= 1, got 0"):
        z.ZeroOptimizer(ps, torch.optim.SGD, 1, bucket_numel=0, lr=0.1)


def test_zero3_input_checks():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="Zero3Module: module must be an nn.Module"):
        z.Zero3Module([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"units\[0\] must be a submodule of module"):
        z.Zero3Module(model, units=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match=r"units\[1\] \(Linear\) sits inside another unit"):
        z.Zero3Module(model, units=[model[1], model[1][0]])
    shared = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    shared[1].weight = shared[0].weight
    with pytest.raises(ValueError, match="parameter 1.weight is shared by two units"):
        z.Zero3Module(shared, units=[shared[0], shared[1]])


# --- exercises, figures, benchmarks -------------------------------------------------------------


EXERCISES = ["zero.bytes_per_rank", "zero.comm_volume", "zero.offload_efficiency", "zero.shard_range"]


def test_exercises_registered_and_references_pass():
    from labkit.exercises import exercises_for, lookup

    assert exercises_for("12-zero") == EXERCISES
    for name in EXERCISES:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def _bytes_plain(num_params, stage, world_size, optimizer):
    k = {"adam": 12, "sgd_momentum": 8, "sgd": 4}[optimizer]
    n = world_size
    return 2 * num_params / (n if stage == 3 else 1) + 2 * num_params / (n if stage >= 2 else 1) \
        + k * num_params / (n if stage >= 1 else 1)


def _shard_plain(numel, world_size, rank):
    size = math.ceil(numel / world_size)
    return min(rank * size, numel), min((rank + 1) * size, numel)


@pytest.mark.parametrize("name,fn", [
    ("zero.bytes_per_rank", _bytes_plain),
    ("zero.shard_range", _shard_plain),
    ("zero.comm_volume", lambda num_params, stage, world_size: (3 if stage == 3 else 2) * num_params
     * (world_size - 1) / world_size),
    ("zero.offload_efficiency", lambda seq, bsz, bandwidth, peak_flops, kind: (
        (seq * bsz / (4 if kind == "optimizer" else 1)) * bandwidth
        / ((seq * bsz / (4 if kind == "optimizer" else 1)) * bandwidth + peak_flops))),
])
def test_student_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn", [
    # stage 1 also divides the gradients (that is stage 2)
    ("zero.bytes_per_rank", lambda num_params, stage, world_size, optimizer: _bytes_plain(
        num_params, min(stage + 1, 3) if stage == 1 else stage, world_size, optimizer)),
    # Adam without the fp32 master copy (K = 8)
    ("zero.bytes_per_rank", lambda num_params, stage, world_size, optimizer: _bytes_plain(
        num_params, stage, world_size, optimizer) - (4 * num_params / (world_size if stage else 1)
                                                     if optimizer == "adam" else 0)),
    # no padding: numel // world_size per rank, the tail lost
    ("zero.shard_range", lambda numel, world_size, rank: (rank * (numel // world_size),
                                                          (rank + 1) * (numel // world_size))),
    # padding but no clamping at numel
    ("zero.shard_range", lambda numel, world_size, rank: (rank * math.ceil(numel / world_size),
                                                          (rank + 1) * math.ceil(numel / world_size))),
    # stage 3 costs the same as the others
    ("zero.comm_volume", lambda num_params, stage, world_size: 2 * num_params * (world_size - 1) / world_size),
    # the paper's round number instead of the ring's (N-1)/N
    ("zero.comm_volume", lambda num_params, stage, world_size: (3 if stage == 3 else 2) * num_params),
    # optimizer states with the parameters' intensity
    ("zero.offload_efficiency", lambda seq, bsz, bandwidth, peak_flops, kind: (
        seq * bsz * bandwidth / (seq * bsz * bandwidth + peak_flops))),
    # no saturation: transfer time / compute time, unbounded
    ("zero.offload_efficiency", lambda seq, bsz, bandwidth, peak_flops, kind: min(
        1.0, seq * bsz / (4 if kind == "optimizer" else 1) * bandwidth / peak_flops)),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_figures_build_and_the_planner_handles_every_setting():
    from labkit.parallel import offload as off
    from labkit.viz import zero as vz

    fig = vz.memory_per_stage_figure(7_500_000_000, 64)
    assert [round(v, 3) for v in fig.data[-1].y] == [120.0, 31.406, 16.641, 1.875]
    for stage in z.STAGES:
        for pt in off.TIERS:
            for ot in off.TIERS:
                fig = vz.planner_figure(70, 8, stage, pt, ot, "H100 80GB", 2048, 10.0)
                if pt != "gpu" and stage != 3:
                    assert "not a valid setup" in fig.layout.title.text
                else:
                    assert "fits</b>" in fig.layout.title.text or "does not fit (" in fig.layout.title.text
    assert "does not fit (GPU" in vz.planner_figure(70, 8, 2, "gpu", "gpu").layout.title.text
    assert "<b>fits</b>" in vz.planner_figure(70, 8, 3, "nvme", "nvme").layout.title.text
    with pytest.raises(ValueError, match="planner_figure: gpu must be one of"):
        vz.planner_figure(gpu="TPU")
    assert len(vz.efficiency_figure(tokens=(1024,), measured={"disk": 1e9}).data) == 3 + 3 + 1  # curves, tiers, disk
    fake = {s: dict(bytes=z.memory_per_rank(100, s, 2, "adam", torch.float32), padded=100, padded_params=100,
                    comm=z.comm_volume(100, s)) for s in z.STAGES}
    assert len(vz.stage_memory_figure(fake, 2).data) == 6
    with pytest.raises(ValueError, match="no ZeRO stage with measured bytes"):
        vz.stage_memory_figure({}, 2)


def test_benchmark_rows(monkeypatch):
    """The rows' bookkeeping, on one in-process rank (the chapter's notebook runs the real 2-rank launch)."""
    tiny = dict(model=dict(n_layer=1, n_embd=16, n_head=2, block_size=8), batch=4, steps=3, bucket_numel=512,
                world_size=1, offload_model=dict(n_layer=1, n_embd=16, n_head=2, block_size=8), offload_batch=2,
                offload_steps=2, bandwidth_bytes=1 << 16)
    monkeypatch.setattr(bz, "settings", lambda quick=False: dict(tiny))
    monkeypatch.setattr(bz, "launch", lambda fn, n, kwargs, **_: [fn(**kwargs)])
    rows = bz.run(quick=True)
    stages = {r["name"]: r for r in rows if r["kind"] == "stage"}
    assert len(stages) == 4 and stages["stage 0"]["ratio"] == 1.0  # no ZeroRedundancyOptimizer without a group
    for name, r in stages.items():
        assert r["max_param_diff"] < 1e-5 and r["median_ms"] > 0
        if "bytes_per_rank" in r:
            assert r["bytes_per_rank"] == r["predicted_bytes"] and r["comm_per_step"] == r["predicted_comm"]
    offload = [r for r in rows if r["kind"] == "offload"]
    assert len(offload) == 6 and all(r["max_param_diff"] == 0.0 for r in offload)
    assert {r["transfer"] for r in rows if r["kind"] == "bandwidth"} >= {"disk_read", "disk_write", "host_copy"}
