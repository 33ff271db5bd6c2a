"""Chapter 02-compile: graph capture, graph breaks, recompilation, Inductor code, torch.export."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import labkit
from labkit.exercises import compile as ex
from labkit.models import Block, GPTConfig
from labkit.perf import compile as pc

# The benchmark's quick CPU shape, so Inductor's on-disk cache serves both.
CONFIG = dict(n_embd=64, n_head=4, block_size=64, norm="rmsnorm", mlp="swiglu", rope=True)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block(GPTConfig(**CONFIG)).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(1))  # (B, T, C)


@pytest.fixture(scope="module")
def block_code(block, x):
    return pc.inductor_code(block, x)


def sin_plus_cos(x):
    return x.sin() + x.cos()


def with_print(x):
    y = x * 2
    print("between the graphs")
    return y + 1


def residual_gate(x, w):
    h = torch.relu(x @ w)
    if h.sum() > 0:  # Tensor.__bool__: a data-dependent branch
        x = x + h
    return torch.tanh(x)


def residual_gate_fixed(x, w):
    h = torch.relu(x @ w)
    return torch.tanh(torch.where(h.sum() > 0, x + h, x))


def softcap_fixed(logits, cap):
    capped = cap * torch.tanh(logits / cap)
    return torch.softmax(torch.where(logits.abs().amax() > cap, capped, logits), dim=-1)


# --- graph capture ----------------------------------------------------------------------


def test_capture_counts_on_known_functions(capsys):
    cap = pc.capture_graphs(sin_plus_cos, torch.randn(3))
    assert cap.n_graphs == 1 and cap.node_counts == [3]
    assert cap.op_histogram() == {"sin": 1, "cos": 1, "add": 1}
    assert "sin" in cap.code and "cos" in cap.code
    assert pc.readable_code(cap.graphs[0]).startswith("def forward(self, x):")
    x = torch.randn(3)
    two = pc.capture_graphs(with_print, x)
    assert two.n_graphs == 2 and two.node_counts == [1, 1]  # the print splits mul | add
    assert "between the graphs" in capsys.readouterr().out  # the print still ran, eagerly
    torch.testing.assert_close(two.output, x * 2 + 1)


def test_capture_block_is_one_graph(block, x):
    cap = pc.capture_graphs(block, x)
    hist = cap.op_histogram()
    assert cap.n_graphs == 1
    assert hist["linear"] == 7  # q, k, v, o, gate, up, down
    assert hist["scaled_dot_product_attention"] == 1
    torch.testing.assert_close(cap.output, block(x))


# --- graph breaks -----------------------------------------------------------------------


def test_graph_breaks_counted_and_fixed():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    before = pc.graph_breaks(residual_gate, x, w)
    assert (before.n_graphs, before.n_breaks) == (2, 1)
    (brk,) = before.breaks
    assert brk.function == "residual_gate" and "h.sum() > 0" in brk.line
    assert "residual_gate" in before.summary()
    after = pc.graph_breaks(residual_gate_fixed, x, w)
    assert (after.n_graphs, after.n_breaks, after.breaks) == (1, 0, [])
    for sign in (1.0, -1.0):  # both sides of the branch
        w2 = sign * w.abs()
        torch.testing.assert_close(residual_gate_fixed(x.abs(), w2), residual_gate(x.abs(), w2))


def test_item_break_reason_names_item():
    report = pc.graph_breaks(ex.softcap_probs, 40 * torch.randn(2, 8), 30.0)
    assert report.n_breaks == 1 and "item" in report.breaks[0].reason
    assert pc.graph_breaks(softcap_fixed, 40 * torch.randn(2, 8), 30.0).n_breaks == 0


# --- recompilation ----------------------------------------------------------------------


def _rows(sizes):
    return [torch.randn(n, 7) for n in sizes]  # 7: never equal to a varying size (duck sizing)


def test_recompiles_static_vs_dynamic():
    def f(x):
        return (x * 2).softmax(-1)

    sizes = [4, 8, 16]
    assert pc.count_compiles(f, _rows(sizes), dynamic=False).per_call == [1, 1, 1]
    assert pc.count_compiles(f, _rows(sizes), dynamic=None).per_call == [1, 1, 0]
    assert pc.count_compiles(f, _rows(sizes), dynamic=True).n_compiles == 1
    assert pc.count_compiles(f, _rows(sizes), dynamic=False, mark_dynamic={0: 0}).n_compiles == 1
    same = pc.count_compiles(f, _rows([5, 5, 5, 5]), dynamic=False)
    assert (same.n_compiles, same.n_calls) == (1, 4)
    many = pc.count_compiles(f, _rows(range(2, 14)), dynamic=False)  # 12 shapes
    assert many.n_compiles == pc.RECOMPILE_LIMIT == pc.recompile_limit() == torch._dynamo.config.recompile_limit


def test_recompile_limit_follows_dynamo_config():
    def f(x):
        return x + 1

    sizes = list(range(2, 7))  # 5 shapes
    with torch._dynamo.config.patch(recompile_limit=3):
        assert pc.recompile_limit() == 3
        assert pc.predict_compiles(sizes, "static") == 3  # the model reads the limit in force
        assert pc.count_compiles(f, _rows(sizes), dynamic=False).n_compiles == 3  # and so does Dynamo
    assert pc.recompile_limit() == pc.RECOMPILE_LIMIT
    assert pc.predict_compiles(sizes, "static") == min(5, pc.RECOMPILE_LIMIT)
    assert pc.predict_compiles(sizes, "static", limit=2) == 2


def test_generation_sizes():
    assert pc.generation_sizes(5, 3) == [5, 6, 7]
    assert pc.generation_sizes(1, 1) == [1]
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="prompt_len must be an int >= 1"):
            pc.generation_sizes(bad, 3)
    with pytest.raises(ValueError, match="new_tokens must be an int >= 1, got 0"):
        pc.generation_sizes(4, 0)


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 2, 3, 5, 8]), min_size=1, max_size=6),
       mode=st.sampled_from(pc.MODES))
def test_simulation_matches_dynamo(sizes, mode):
    def g(x):
        return x.exp() - 1

    log = pc.count_compiles(g, _rows(sizes), dynamic=pc.DYNAMIC_ARG[mode])
    assert log.per_call == [int(b) for b in pc.simulate_compiles(sizes, mode)]


@given(sizes=st.lists(st.integers(0, 64), min_size=1, max_size=30), mode=st.sampled_from(pc.MODES))
def test_simulation_properties(sizes, mode):
    n = pc.predict_compiles(sizes, mode)
    assert 1 <= n <= min(len(set(sizes)), pc.RECOMPILE_LIMIT)
    assert pc.predict_compiles(sizes, "dynamic") <= pc.predict_compiles(sizes, "static")
    assert pc.predict_compiles(sizes + sizes, mode) == n  # repeating known shapes compiles nothing


# --- Inductor's code --------------------------------------------------------------------


def test_fused_kernel_count_on_pointwise_chain():
    x = torch.randn(64)  # a CPU tensor: C++ kernels even where CUDA exists (tests/test_perf_gpu.py: Triton)
    code = pc.inductor_code(lambda x: torch.relu(torch.sin(x) * 2.0 + 1.0), x)
    assert code.n_kernels == 1 and code.languages == {"cpp": 1}
    assert code.kernels[0].startswith("cpp_fused_")
    torch.testing.assert_close(code.output, torch.relu(torch.sin(x) * 2.0 + 1.0))


@pytest.mark.parametrize("n,language,n_mm,relaunch", [(0, "cpp", 2, 0), (1, "cpp", 0, 0), (4, "cpp", 1, 2),
                                                       (3, "triton", 1, 2), (7, "triton", 0, 5)])
def test_kernel_counter_on_synthetic_sources(n, language, n_mm, relaunch):
    src = ex.synthetic_source(n, language, n_mm=n_mm, relaunch=relaunch, seed=n)
    assert pc.count_fused_kernels(src) == n
    assert pc.count_fused_kernels([src, src]) == 2 * n
    assert sum(pc.kernel_languages(src).values()) == n
    assert pc.library_calls(src).get("extern_kernels.mm", 0) == n_mm
    for name in pc.kernel_names(src):
        body = pc.kernel_source(src, name)
        if language == "triton":  # the @triton.jit function carries the kernel's name
            assert f"@triton.jit\ndef {name}(" in body and "tl.store" in body
        else:  # Inductor names every C++ kernel `kernel`; the fused ops in its name tag the body here
            fused = name.removeprefix("cpp_fused_").rsplit("_", 1)[0]
            assert body.startswith("#include") and 'extern "C"' in body and f"/* {fused} */" in body
        assert "async_compile" not in body and "def call(" not in body  # one kernel, not the whole file


def test_compiled_block_matches_eager(block, x, block_code):  # CPU tensors: C++ kernels
    torch.testing.assert_close(block_code.output, block(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(block_code.compiled(x), block(x), rtol=1e-4, atol=1e-5)
    assert 1 <= block_code.n_kernels < 20 and block_code.languages == {"cpp": block_code.n_kernels}
    calls = block_code.library_calls  # q, k, v, o, gate, up, down: GEMMs left to a library
    assert sum(n for k, n in calls.items() if k.startswith("extern_kernels.")) == 7
    assert 'extern "C"' in block_code.kernel_source(block_code.kernels[0])


# --- torch.export -----------------------------------------------------------------------


def test_export_with_dims_round_trips(block, tmp_path):
    batch = torch.export.Dim("batch", min=1, max=16)
    seq = torch.export.Dim("seq", min=1, max=CONFIG["block_size"])
    ep = pc.export_program(block, (torch.randn(2, 8, 64),), {"x": {0: batch, 1: seq}})
    assert pc.dim_ranges(ep) == {"x.shape[0]": (1, 16), "x.shape[1]": (1, 64)}
    counts = pc.signature_counts(ep)
    assert counts == {"PARAMETER": 9, "BUFFER": 2, "USER_INPUT": 1, "USER_OUTPUT": 1}  # 2 buffers: rope cos, sin
    assert {r["target"] for r in pc.signature_table(ep) if r["kind"] == "BUFFER"} == {"attn.cos", "attn.sin"}
    loaded = pc.save_and_load(ep, tmp_path / "block.pt2")
    for b, t in [(1, 1), (3, 7), (16, 64), (5, 32)]:
        xb = torch.randn(b, t, 64)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(xb), block(xb), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="x.size"):  # outside the declared range
        loaded.module()(torch.randn(2, 65, 64))


def test_export_rejects_too_wide_dim(block):
    seq = torch.export.Dim("seq", max=4 * CONFIG["block_size"])  # rope tables stop at block_size
    with pytest.raises(Exception, match="seq"):
        pc.export_program(block, (torch.randn(2, 8, 64),), {"x": {1: seq}})


def test_aoti_package_runs_or_says_why(block, tmp_path):
    batch = torch.export.Dim("batch", min=1, max=8)
    ep = pc.export_program(block, (torch.randn(2, 8, 64),), {"x": {0: batch}})
    pkg = pc.aoti_package(ep, tmp_path / "block_aoti.pt2")
    if not pkg.ok:
        assert pkg.reason  # never a silent skip
        pytest.skip(f"AOTInductor unavailable here: {pkg.reason}")
    assert pkg.path.exists()
    for b in (1, 3, 8):
        xb = torch.randn(b, 8, 64)
        with torch.no_grad():
            torch.testing.assert_close(pkg.runner(xb), block(xb), rtol=1e-4, atol=1e-5)


# --- bad inputs -------------------------------------------------------------------------


def test_bad_inputs_raise_clearly(tmp_path):
    with pytest.raises(TypeError, match="capture_graphs: fn must be callable"):
        pc.capture_graphs(3)
    with pytest.raises(ValueError, match="count_compiles: calls must be a non-empty"):
        pc.count_compiles(sin_plus_cos, [])
    with pytest.raises(ValueError, match="dynamic must be None, True or False"):
        pc.count_compiles(sin_plus_cos, [torch.randn(2)], dynamic="yes")
    with pytest.raises(ValueError, match="mode must be one of"):
        pc.simulate_compiles([1, 2], "fast")
    with pytest.raises(ValueError, match="sizes must be ints >= 0, got -3"):
        pc.predict_compiles([4, -3], "static")
    with pytest.raises(TypeError, match="kernel_names: source must be a str"):
        pc.kernel_names(b"bytes")
    with pytest.raises(ValueError, match="no kernel named 'nope'"):
        pc.kernel_source(ex.synthetic_source(1, "cpp"), "nope")
    with pytest.raises(TypeError, match="export_program: module must be a torch.nn.Module"):
        pc.export_program(sin_plus_cos, (torch.randn(2),))
    with pytest.raises(TypeError, match="args must be a tuple"):
        pc.export_program(torch.nn.Linear(2, 2), torch.randn(2))
    with pytest.raises(TypeError, match="ExportedProgram"):
        pc.dim_ranges("not a program")
    ep = pc.export_program(torch.nn.Linear(2, 2), (torch.randn(3, 2),))
    with pytest.raises(ValueError, match="should end in .pt2"):
        pc.save_and_load(ep, tmp_path / "model.zip")
    with pytest.raises(ValueError, match="max_abs_diff: shapes differ"):
        pc.max_abs_diff(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="shapes differ"):
        pc.max_rel_diff(torch.zeros(2), torch.zeros(3))
    assert pc.dim_ranges(ep) == {}  # no Dim given: everything static


# --- exercises, benchmarks, figures -----------------------------------------------------


def test_exercise_references_pass():
    for name, fn in [("compile.fix_graph_break", softcap_fixed), ("compile.predict_compiles", pc.predict_compiles),
                     ("compile.dynamic_spec", ex.dynamic_spec), ("compile.count_kernels", pc.count_fused_kernels)]:
        assert labkit.check(name, fn, quiet=True)


def test_exercises_reject_wrong_answers():
    from torch.export import Dim

    def separate_dims(max_batch, max_seq):  # x and mask get unrelated Dims: export refuses
        return {"x": {0: Dim("b", max=max_batch), 1: Dim("t", max=max_seq)},
                "mask": {0: Dim("b2", max=max_batch), 1: Dim("t2", max=max_seq)}}

    wrong = [("compile.fix_graph_break", ex.softcap_probs),  # right values, still a graph break
             ("compile.predict_compiles", lambda sizes, mode: len(set(sizes))),
             ("compile.dynamic_spec", separate_dims),
             ("compile.count_kernels", lambda source: source.count("cpp_fused") + source.count("triton_"))]
    for name, fn in wrong:
        with pytest.raises(labkit.ExerciseFailed):
            labkit.check(name, fn, quiet=True)

    def todo(**kwargs):
        raise NotImplementedError

    assert labkit.check("compile.count_kernels", todo, quiet=True).status == "not attempted"


def test_max_rel_diff():
    ref = torch.tensor([4.0, -8.0, 1.0])
    assert pc.max_rel_diff(ref + torch.tensor([0.0, 0.5, 0.0]), ref) == 0.5 / 8
    assert pc.max_rel_diff((ref, 2 * ref + 1), (ref, 2 * ref)) == 1 / 16  # over tuples: one max, one scale
    assert pc.max_rel_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    assert pc.max_rel_diff(torch.ones(3), torch.zeros(3)) == math.inf
    x = torch.randn(64, 64)
    assert 0 < pc.max_rel_diff(x.bfloat16(), x) <= 2**-8  # round to nearest: at most half a bf16 ulp


def test_benchmark_rows(block_code):  # block_code first: on a CPU the benchmark then hits Inductor's cache
    from labkit.benchmarks import compile as bc

    rows = bc.run(quick=True)
    (B, T, C, _), = bc.configs(quick=True)  # the current profile's shape
    assert [r["name"] for r in rows] == ["eager", "compiled (default)"]
    for r in rows:
        assert r["median_ms"] > 0 and r["device"] and r["shape"] == f"{B}x{T}x{C}"
        assert r["dtype"] in bc.REL_TOL and r["rel_err"] < bc.REL_TOL[r["dtype"]]
    assert rows[0]["rel_err"] == rows[0]["max_abs_diff"] == 0.0
    assert math.isclose(rows[1]["ratio"], rows[0]["median_ms"] / rows[1]["median_ms"])
    with pytest.raises(TypeError, match="configs: quick must be a bool"):
        bc.configs(quick="yes")


def test_figures():
    from labkit.viz import compile as vc

    fig = vc.recompile_figure(prompt_len=4, new_tokens=12)
    assert len(fig.data) == 4 and "static 8, auto 2, dynamic 1" in fig.layout.title.text
    assert list(fig.data[0].y)[-1] == 8
    assert vc.recompile_figure(prompt_len=1, new_tokens=3).data[2].y[-1] == 2  # T=1 specialised
    hist = vc.op_histogram_figure({"linear": 7, "add": 2})
    assert list(hist.data[0].y) == ["add", "linear"]
    with pytest.raises(ValueError, match="prompt_len must be an int >= 1"):
        vc.recompile_figure(prompt_len=0)
