"""Tests of labkit.parallel.tensor (chapter 15-tensor-parallel): shard maths, the f/g operators and the
Megatron blocks against the dense TinyGPT and torch.distributed.tensor.parallel on real gloo ranks, the
overlapped forward, the cost model, the CUDA-graph decode step (GPU), exercises, figures and benchmarks."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.models.gpt import MLP, Block, CausalSelfAttention, GPTConfig, TinyGPT
from labkit.parallel import tensor as tp
from labkit.parallel.launch import RankError, launch

dist_test = [pytest.mark.dist, pytest.mark.timeout(300)]
p_st = st.sampled_from([1, 2, 3, 4, 8])


def reference_tp_mlp(x, w_up, w_down, world):
    """Column -> GELU -> row written out plainly: each rank's partial output, then their sum."""
    out, inp = w_up.shape
    parts = []
    for r in range(world):
        rows = slice(r * out // world, (r + 1) * out // world)
        parts.append(F.gelu(x @ w_up[rows].T) @ w_down[:, rows].T)
    return parts


# --- shard maths (one process) ------------------------------------------------------------


@given(out_k=st.integers(1, 6), in_k=st.integers(1, 6), p=p_st, seed=st.integers(0, 2**16))
def test_shards_tile_the_weight(out_k, in_k, p, seed):
    W = torch.randn(out_k * p, in_k * p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cols = [tp.column_shard(W, r, p) for r in range(p)]
    rows = [tp.row_shard(W, r, p) for r in range(p)]
    assert all(c.shape == (out_k, in_k * p) for c in cols) and all(r.shape == (out_k * p, in_k) for r in rows)
    assert torch.equal(torch.cat(cols, dim=0), W) and torch.equal(torch.cat(rows, dim=1), W)
    assert tp.shard_bounds(out_k * p, p - 1, p) == ((p - 1) * out_k, p * out_k)


@given(tokens=st.integers(1, 5), d_k=st.integers(1, 4), h_k=st.integers(1, 4), p=p_st, seed=st.integers(0, 2**16))
def test_column_alone_concatenates_and_column_then_row_sums_once(tokens, d_k, h_k, p, seed):
    g = torch.Generator().manual_seed(seed)
    d, h = d_k * p, h_k * p
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    w_up = torch.randn(h, d, generator=g, dtype=torch.float64)
    w_down = torch.randn(d, h, generator=g, dtype=torch.float64)
    b_up = torch.randn(h, generator=g, dtype=torch.float64)
    # column-parallel: each rank's output is a slice of the features; together they are concatenated, not summed
    ys = [F.linear(x, tp.column_shard(w_up, r, p), tp.column_shard(b_up, r, p)) for r in range(p)]
    torch.testing.assert_close(torch.cat(ys, dim=-1), x @ w_up.T + b_up, rtol=1e-12, atol=1e-12)
    # row-parallel on those slices: partial sums of the full output; one all-reduce finishes the MLP
    parts = [F.gelu(F.linear(x, tp.column_shard(w_up, r, p))) @ tp.row_shard(w_down, r, p).T for r in range(p)]
    for got, want in zip(parts, reference_tp_mlp(x, w_up, w_down, p)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(parts), F.gelu(x @ w_up.T) @ w_down.T, rtol=1e-10, atol=1e-10)


def test_the_exercise_reference_matches_the_plain_reference():
    g = torch.Generator().manual_seed(0)
    x, w_up, w_down = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 8), (16, 8), (8, 16)))
    from labkit.exercises.tensor_parallel import mlp_partials

    for a, b in zip(mlp_partials(x, w_up, w_down, 4), reference_tp_mlp(x, w_up, w_down, 4)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shard_bad_input_is_named():
    W = torch.zeros(6, 4)
    with pytest.raises(ValueError, match=r"column_shard: out_features \(6\) must be divisible by world_size \(4\)"):
        tp.column_shard(W, 0, 4)
    with pytest.raises(ValueError, match=r"row_shard: in_features \(4\) must be divisible by world_size \(3\)"):
        tp.row_shard(W, 0, 3)
    with pytest.raises(ValueError, match=r"column_shard: rank must be in \[0, world_size=2\), got 2"):
        tp.column_shard(W, 2, 2)
    with pytest.raises(ValueError, match="row_shard: weight must be 2-D"):
        tp.row_shard(torch.zeros(4), 0, 2)
    with pytest.raises(ValueError, match="column_shard: weight must be a 1-D or 2-D tensor"):
        tp.column_shard(torch.zeros(2, 2, 2), 0, 1)
    with pytest.raises(TypeError, match="world_size must be an int"):
        tp.column_shard(W, 0, 2.0)


# --- layers in one process (no process group: world size 1, collectives are logged no-ops) ---------


def _cfg(**kw):
    base = dict(vocab_size=17, block_size=8, n_layer=2, n_embd=16, n_head=4)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("kw", [dict(), dict(norm="rmsnorm", mlp="swiglu", rope=True, n_kv_head=2, bias=True)])
def test_single_rank_block_equals_dense_and_logs_one_all_reduce_per_sub_block(kw):
    torch.manual_seed(0)
    block = Block(_cfg(**kw))
    tpb = tp.TensorParallelBlock(block)
    x = torch.randn(2, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with tp.comm_log() as fwd:
        y = tpb(x2)
    torch.testing.assert_close(y, block(x), rtol=0, atol=0)
    with tp.comm_log() as bwd:
        y.sum().backward()
    block(x).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    assert [op for op, _ in fwd] == ["all_reduce"] * 2 and [op for op, _ in bwd] == ["all_reduce"] * 2
    assert all(nbytes == 2 * 5 * 16 * 4 for _, nbytes in fwd)  # tokens x hidden x fp32


def test_linear_layers_from_linear_and_fresh():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    col, row = tp.ColumnParallelLinear.from_linear(lin), tp.RowParallelLinear.from_linear(lin, input_is_parallel=False)
    x = torch.randn(3, 6)
    torch.testing.assert_close(col(x), lin(x))
    torch.testing.assert_close(row(x), lin(x))
    fresh = tp.ColumnParallelLinear(6, 4, bias=False, gather_output=True)
    assert fresh.weight.shape == (4, 6) and fresh.bias is None and "gather_output=True" in repr(fresh)
    assert tp.RowParallelLinear(6, 4).bias.shape == (4,)


def test_parallelize_tinygpt_keeps_the_loss_and_checks_its_input():
    torch.manual_seed(0)
    model = TinyGPT(_cfg())
    idx = torch.randint(0, 17, (2, 8))
    torch.testing.assert_close(tp.parallelize_tinygpt(model)(idx, idx)[1], model(idx, idx)[1])
    assert isinstance(tp.parallelize_tinygpt(model).blocks[0], tp.TensorParallelBlock)
    with pytest.raises(TypeError, match="parallelize_tinygpt: model must be a TinyGPT"):
        tp.parallelize_tinygpt(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="parallelize_tinygpt: dropout must be 0"):
        tp.parallelize_tinygpt(TinyGPT(_cfg(dropout=0.1)))
    with pytest.raises(TypeError, match="TensorParallelMLP: mlp must be a labkit.models.gpt.MLP"):
        tp.TensorParallelMLP(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="TensorParallelAttention: attn must be"):
        tp.TensorParallelAttention(MLP(_cfg()))
    with pytest.raises(TypeError, match="ColumnParallelLinear.from_linear: linear must be an nn.Linear"):
        tp.ColumnParallelLinear.from_linear(MLP(_cfg()))


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("overlap", [False, True])
def test_overlapped_forward_equals_the_blocks_and_traces_every_chunk(chunks, overlap):
    torch.manual_seed(0)
    blocks = [tp.TensorParallelBlock(b) for b in TinyGPT(_cfg()).blocks]
    x = torch.randn(5, 3, 16)
    trace = []
    with tp.comm_log() as log:
        y = tp.overlapped_forward([s for b in blocks for s in b.stages()], x, chunks, overlap=overlap, trace=trace)
    with torch.no_grad():
        torch.testing.assert_close(y, blocks[1](blocks[0](x)), rtol=0, atol=0)
    assert len(log) == 4 * chunks  # 2 blocks x (attention, MLP) x chunks
    kinds = [s.kind for s in trace]
    assert kinds.count("compute") == kinds.count("all-reduce in flight") == 4 * chunks
    assert all(s.end >= s.start for s in trace)
    with pytest.raises(ValueError, match="overlapped_forward: x must have a batch dimension of at least chunks=6"):
        tp.overlapped_forward(blocks[0].stages(), x, 6)


def test_gradcheck_of_f_and_g_without_a_group():
    """World size 1: f and g are identities; gradcheck the TP MLP and attention in float64 anyway."""
    torch.manual_seed(0)
    cfg = _cfg(n_embd=8, n_head=2, bias=True)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    for layer in (tp.TensorParallelMLP(MLP(cfg)), tp.TensorParallelAttention(CausalSelfAttention(cfg))):
        assert torch.autograd.gradcheck(layer.double(), (x,))


def test_dispatched_ops_counts_the_kernels_of_a_decode_step():
    torch.manual_seed(0)
    blocks = [tp.TensorParallelBlock(b) for b in TinyGPT(_cfg(mlp="swiglu")).blocks]
    x = torch.randn(1, 1, 16)

    @torch.no_grad()
    def step():
        h = x
        for b in blocks:
            h = b(h)
        return h

    ops = tp.dispatched_ops(step)
    # per block: q, k, v, o, gate, up, down; 2 norms; 2 residual adds + the SwiGLU product; silu; sdpa;
    # g's copy and all-reduce twice. Views, transposes and the grad-mode switch launch nothing.
    assert ops == {"linear": 14, "layer_norm": 4, "add": 4, "mul": 2, "silu": 2, "scaled_dot_product_attention": 2,
                   "clone": 4, "all_reduce": 4}


def test_decode_graph_refuses_a_cpu():
    assert not tp.cuda_graphs_available()  # the tests run the CPU profile
    with pytest.raises(RuntimeError, match="DecodeGraph: CUDA graphs need a CUDA device"):
        tp.DecodeGraph(lambda x: x, torch.zeros(2))
    with pytest.raises(TypeError, match="DecodeGraph: step must be callable"):
        tp.DecodeGraph(None, torch.zeros(2))


# --- the cost model ---------------------------------------------------------------------


@given(h=st.integers(1, 32768), p=st.integers(1, 64), s=st.sampled_from([1, 2, 4]))
def test_allreduce_bytes(h, p, s):
    b = tp.allreduce_bytes_per_token(h, p, s)
    assert b == pytest.approx(2 * 2 * (p - 1) / p * h * s)
    assert b < 4 * h * s and (b == 0) == (p == 1)
    assert tp.allreduce_bytes_per_token(h, p, s, allreduces=1) == pytest.approx(b / 2)


@given(n=st.floats(0, 1e10), p=st.integers(1, 64), bw=st.floats(1e9, 1e12), lat=st.floats(0, 1e-4))
def test_ring_allreduce_time(n, p, bw, lat):
    t = tp.ring_allreduce_time(n, p, bw, lat)
    assert t == pytest.approx(2 * (p - 1) * lat + 2 * (p - 1) / p * n / bw)
    assert t >= 0 and (p > 1 or t == 0)
    assert tp.ring_allreduce_time(n, p + 1, bw, lat) >= t  # more ranks never help one message


def test_cost_model_bad_input_is_named():
    with pytest.raises(ValueError, match="ring_allreduce_time: bandwidth must be in"):
        tp.ring_allreduce_time(1, 2, 0, 1e-6)
    with pytest.raises(ValueError, match="ring_allreduce_time: world_size must be an int >= 1, got 0"):
        tp.ring_allreduce_time(1, 0, 1e9, 1e-6)
    with pytest.raises(ValueError, match="allreduce_bytes_per_token: tp must be an int >= 1"):
        tp.allreduce_bytes_per_token(4096, 0)
    with pytest.raises(ValueError, match="tp_layer_time: chunks must be <= tokens=2, got 4"):
        tp.tp_layer_time(4096, 2, 2, chunks=4)
    with pytest.raises(TypeError, match="tp_layer_time: link must be a Link"):
        tp.tp_layer_time(4096, 2, 2, link=450e9)
    with pytest.raises(ValueError, match="overlap_schedule: compute and comm must have one entry per stage"):
        tp.overlap_schedule([1.0], [1.0, 2.0], 2)


@given(comp=st.lists(st.floats(0, 10), min_size=1, max_size=4), comm_scale=st.floats(0, 3), k=st.integers(1, 6))
def test_overlap_schedule_bounds(comp, comm_scale, k):
    comm = [c * comm_scale for c in comp]
    seq, _ = tp.overlap_schedule(comp, comm, 1)
    assert seq == pytest.approx(sum(comp) + sum(comm))
    t, spans = tp.overlap_schedule([c / k for c in comp], [m / k for m in comm], k)
    assert max(sum(comp), sum(comm)) - 1e-9 <= t <= seq + 1e-9  # overlap can hide comm, never add work
    for lane in ("compute", "all-reduce"):
        mine = sorted((s.start, s.end) for s in spans if s.lane == lane)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(mine, mine[1:]))  # one engine, one link


def test_layer_model_decode_vs_prefill():
    """Decode: the all-reduce is a large share and chunking only adds weight reads; CUDA graphs remove
    launch time. Prefill: compute dominates and chunked overlap hides part of the all-reduce."""
    dec = tp.tp_layer_time(4096, 1, 8)
    assert dec.comm_fraction > 0.5 and dec.launch_s > dec.gpu_s  # launch-bound at batch 1
    assert tp.tp_layer_time(4096, 1, 8, cuda_graph=True).total_s == pytest.approx(dec.gpu_s)
    assert tp.tp_layer_time(4096, 16, 8, chunks=2, cuda_graph=True).total_s > \
        tp.tp_layer_time(4096, 16, 8, cuda_graph=True).total_s
    pre = tp.tp_layer_time(8192, 8192, 8)
    assert pre.comm_fraction < 0.5
    assert tp.tp_layer_time(8192, 8192, 8, chunks=4).total_s < pre.total_s
    assert tp.tp_layer_time(8192, 8192, 1).comm_s == 0


# --- real ranks (gloo) -------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def ranks(request):
    world = request.param
    # torch's DTensor path (~5 s of imports and mesh set-up per launch here) and gradcheck run on 2 ranks only
    return world, launch(tp.check_on_ranks, world, kwargs=dict(dtensor=world == 2, gradcheck=world == 2),
                         timeout=120, deadline=280)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_tp_tinygpt_matches_the_dense_model(ranks):
    world, results = ranks
    for r, res in enumerate(results):
        for name, d in res["dense"].items():
            tol = 1e-12 if name == "llama" else 1e-5  # float64 / float32
            assert d["world"] == world and d["rank"] == r
            assert d["loss_diff"] < tol and d["logits_diff"] < tol, (name, d)
            assert d["max_grad_diff"] < tol, (name, d["grad_diff"])
            assert d["forward_allreduces_per_block"] == 2 and d["backward_allreduces_per_block"] == 2
            n_embd = 32 if name == "gpt2" else 16 * world
            assert d["forward_bytes_per_block"] == 2 * (2 * 8 * n_embd) * (4 if name == "gpt2" else 8)
            assert d["local_params"] < d["dense_params"]  # norms replicated, everything else split
    assert len({res["dense"]["gpt2"]["loss"] for res in results}) == 1  # every rank holds the same loss


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_matches_torch_colwise_rowwise_parallel(ranks):
    world, results = ranks
    if world != 2:
        pytest.skip("the DTensor comparison runs on the 2-rank launch only (time budget)")
    for res in results:
        d = res["dtensor"]
        assert d["torch_placements"] == {"up.weight": "(Shard(dim=0),)", "up.bias": "(Shard(dim=0),)",
                                         "down.weight": "(Shard(dim=1),)", "down.bias": "(Replicate(),)"}
        assert d["out_diff"] < 1e-5 and d["input_grad_diff"] < 1e-5 and d["out_vs_dense"] < 1e-5
        assert max(d["grad_diff"].values()) < 1e-5, d["grad_diff"]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_overlap_and_bad_heads_on_ranks(ranks):
    world, results = ranks
    for res in results:
        assert max(res["overlap"].values()) < 1e-5, res["overlap"]
        assert res["bad_heads"] == (f"TensorParallelAttention: n_head ({world + 1}) must be divisible by "
                                    f"world_size ({world})")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_gradcheck_on_two_ranks(ranks):
    """f, g, gather and scatter: analytic gradients equal the numerical ones of the distributed function."""
    world, results = ranks
    if world != 2:
        pytest.skip("gradcheck runs on the 2-rank launch only (time budget)")
    for res in results:
        assert res["gradcheck"] == {"column(gather_output)": True, "row(input_is_parallel=False)": True,
                                    "mlp": True, "attention": True}


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_rank_that_cannot_split_its_heads_is_named():
    with pytest.raises(RankError, match="failed first") as err:
        launch(tp.compare_with_dense, 2, kwargs=dict(n_head=3, n_embd=12), timeout=60, deadline=120, grace=1)
    assert "TensorParallelAttention: n_head (3) must be divisible by world_size (2)" in str(err.value)


# --- GPU: the CUDA-graph decode step ---------------------------------------------------------


@pytest.mark.gpu
def test_decode_graph_replays_the_eager_step_on_one_gpu():
    torch.manual_seed(0)
    blocks = [tp.TensorParallelBlock(b).cuda() for b in TinyGPT(_cfg(n_embd=64, n_head=4)).blocks]

    @torch.no_grad()
    def step(h):
        for b in blocks:
            h = b(h)
        return h

    x = torch.randn(4, 1, 64, device="cuda")
    graph = tp.DecodeGraph(step, x)
    torch.testing.assert_close(graph(x), step(x))
    x2 = torch.randn_like(x)
    torch.testing.assert_close(graph(x2), step(x2))  # the replay reads the new input


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_decode_graph_captures_nccl_all_reduces():
    world = max(w for w in (1, 2) if w <= torch.cuda.device_count())
    from labkit.benchmarks import tensor_parallel as bm

    out = launch(bm.decode_graph_experiment, world, kwargs=dict(n_layer=2, n_embd=256, n_head=8, repeats=5),
                 backend="nccl")
    for r in out:
        assert r["world"] == world and r["allreduces_per_step"] == 4
        assert r["graph_vs_eager"] < 0.05  # bf16
        assert r["eager_ms"] > 0 and r["graph_ms"] > 0


# --- exercises, figures, benchmarks ----------------------------------------------------------


EXERCISES = ["tensor-parallel.allreduce_bytes", "tensor-parallel.column_shard", "tensor-parallel.mlp_partials",
             "tensor-parallel.ring_time", "tensor-parallel.row_shard"]


def test_exercises_registered_and_references_pass():
    from labkit.exercises import exercises_for, lookup

    assert exercises_for("15-tensor-parallel") == EXERCISES
    for name in EXERCISES:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def _slice(t, dim, r, p):
    n = t.shape[dim] // p
    return t.narrow(dim, r * n, n)


@pytest.mark.parametrize("name,fn", [
    ("tensor-parallel.column_shard", lambda weight, rank, world_size: _slice(weight, 0, rank, world_size).clone()),
    ("tensor-parallel.row_shard", lambda weight, rank, world_size: weight.chunk(world_size, dim=1)[rank]),
    ("tensor-parallel.mlp_partials", lambda x, w_up, w_down, world_size: [
        F.gelu(x @ _slice(w_up, 0, r, world_size).T) @ _slice(w_down, 1, r, world_size).T for r in range(world_size)]),
    ("tensor-parallel.allreduce_bytes", lambda hidden, tp_degree, bytes_per_elem:
        4 * (tp_degree - 1) * hidden * bytes_per_elem / tp_degree),
    ("tensor-parallel.ring_time", lambda nbytes, world_size, bandwidth, latency:
        (world_size - 1) * (2 * latency + 2 * nbytes / world_size / bandwidth)),
])
def test_student_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn,message", [
    ("tensor-parallel.column_shard", lambda weight, rank, world_size: _slice(weight, 1, rank, world_size),
     "that is the row-parallel shard"),
    ("tensor-parallel.column_shard", lambda weight, rank, world_size: weight[rank::world_size], "values differ"),
    ("tensor-parallel.row_shard", lambda weight, rank, world_size: _slice(weight, 0, rank, world_size),
     "that is the column-parallel shard"),
    ("tensor-parallel.mlp_partials", lambda x, w_up, w_down, world_size:  # the dense MLP split evenly
        [F.gelu(x @ w_up.T) @ w_down.T / world_size] * world_size, "not the way the ranks compute them"),
    ("tensor-parallel.mlp_partials", lambda x, w_up, w_down, world_size:  # row-split first: gelu of partial sums
        [F.gelu(_slice(x, 1, r, world_size) @ _slice(w_up, 1, r, world_size).T) @ w_down.T
         for r in range(world_size)], "must sum to the dense MLP's output"),
    ("tensor-parallel.allreduce_bytes", lambda hidden, tp_degree, bytes_per_elem:  # one all-reduce per layer
        2 * (tp_degree - 1) / tp_degree * hidden * bytes_per_elem, "expected"),
    ("tensor-parallel.allreduce_bytes", lambda hidden, tp_degree, bytes_per_elem:  # the message, not the ring traffic
        2 * hidden * bytes_per_elem if tp_degree > 1 else 0, "expected"),
    ("tensor-parallel.ring_time", lambda nbytes, world_size, bandwidth, latency:  # forgets the ring factor
        2 * (world_size - 1) * latency + nbytes / bandwidth, "expected"),
    ("tensor-parallel.ring_time", lambda nbytes, world_size, bandwidth, latency:  # latency once, not per step
        latency * (world_size > 1) + 2 * (world_size - 1) / world_size * nbytes / bandwidth, "expected"),
])
def test_typical_mistakes_fail(name, fn, message):
    with pytest.raises(labkit.ExerciseFailed, match=message):
        labkit.check(name, fn, quiet=True)


def test_figures_build_and_the_panel_handles_its_range():
    from labkit.viz import tensor_parallel as vt

    eager, graph = (vt.tp_layer_figure(8, 4096, 1, 450.0, 1.0, 1, g) for g in (False, True))
    assert "launch-bound" in eager.layout.title.text and "GPU-bound" in graph.layout.title.text
    assert "CPU launch" in {t.name for t in eager.data} and "CPU launch" not in {t.name for t in graph.data}
    for args in [(1, 1024, 1, 25.0, 0.0, 8, False), (16, 16384, 8192, 900.0, 20.0, 8, True)]:
        vt.tp_layer_figure(*args)  # chunks are capped at tokens; tp=1 has no all-reduce
    assert len(vt.shard_layout_figure(8, 4, 4).data) == 2
    rows = [dict(tokens=t, compute_ms=0.01 * t, allreduce_ms=0.1) for t in (1, 4, 16)]
    assert len(vt.comm_vs_compute_figure(rows).data) == 2
    trace = [dict(lane="rank 0 compute", start=0.0, end=1e-3, label="s0 c0", kind="compute")]
    assert vt.overlap_trace_figure(trace).data[0].x[0] == pytest.approx(1.0)  # milliseconds
    graph = [dict(kind="cuda_graph", batch=1, baseline_ms=1.0, median_ms=0.5, n_layer=4, n_embd=64, world=1,
                  device="GPU")]
    assert len(vt.decode_graph_figure(graph).data) == 2
    with pytest.raises(ValueError, match="overlap_trace_figure: trace is empty"):
        vt.overlap_trace_figure([])
    with pytest.raises(ValueError, match="decode_graph_figure: no rows"):
        vt.decode_graph_figure(rows)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_benchmark_rows(monkeypatch):
    from labkit.benchmarks import tensor_parallel as bm

    real = bm.settings
    monkeypatch.setattr(bm, "settings", lambda quick=False: dict(
        real(True), tokens=[1, 8], repeats=2, overlap=dict(batch=4, seq=1, n_embd=32, n_head=4, n_layer=1)))
    rows = bm.run(quick=True)
    comm = [r for r in rows if r["kind"] == "comm_vs_compute"]
    assert [r["tokens"] for r in comm] == [1, 8] and all(r["backend"] == "gloo" and r["world"] == 2 for r in comm)
    assert all(r["median_ms"] > 0 and r["ratio"] == pytest.approx(r["baseline_ms"] / r["median_ms"]) for r in comm)
    assert [r["message_bytes"] for r in comm] == [1 * 256 * 4, 8 * 256 * 4]
    ov = {r["variant"]: r for r in rows if r["kind"] == "overlap"}
    assert set(ov) == {"plain", "sequential", "overlapped"} and ov["sequential"]["ratio"] == 1.0
    assert ov["overlapped"]["allreduces"] == 2 * ov["plain"]["allreduces"] == 4
    assert ov["sequential"]["max_diff"] < 1e-5 and ov["overlapped"]["max_diff"] < 1e-5  # chunked == plain
    assert not [r for r in rows if r["kind"] == "cuda_graph"]  # no GPU here: nothing to capture
    with pytest.raises(TypeError, match="settings: quick must be a bool"):
        real("yes")
