"""Exercises of chapter 02-compile (registered on import; graded by labkit.check).

    compile.fix_graph_break   fn(logits, cap) -> probs: softcap_probs without its graph break
    compile.predict_compiles  fn(sizes, mode) -> graphs torch.compile builds for those call sizes
    compile.dynamic_spec      fn(max_batch, max_seq) -> dynamic_shapes for MaskedMeanPool(x, mask)
    compile.count_kernels     fn(source) -> number of kernels defined in an Inductor output file
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from labkit.exercises import Exercise, register
from labkit.perf import compile as pc

# --- compile.fix_graph_break ------------------------------------------------------------


def softcap_probs(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Reference (eager, with one graph break): softmax over the last dim of the logits,
    squashed by cap * tanh(logits / cap) when their largest magnitude exceeds cap."""
    peak = logits.abs().max().item()  # a tensor becomes a Python float: graph break
    if peak > cap:  # a Python branch on data
        logits = cap * torch.tanh(logits / cap)
    return torch.softmax(logits, dim=-1)


def _softcap_cases(rng):
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    yield dict(logits=torch.randn(2, 8, generator=g), cap=30.0)  # peak below cap: no capping
    yield dict(logits=40.0 * torch.randn(2, 8, generator=g), cap=30.0)  # peak above cap
    yield dict(logits=torch.randn(1, 1, generator=g) + 5.0, cap=1.0)  # one element
    yield dict(logits=10.0 * torch.randn(3, 4, 16, generator=g), cap=15.0)  # 3-D
    for _ in range(2):
        scale = rng.choice([1.0, 20.0, 60.0])
        yield dict(logits=scale * torch.randn(rng.randint(1, 4), rng.randint(2, 33), generator=g),
                   cap=rng.choice([10.0, 30.0, 50.0]))


def _no_graph_breaks(fn, case) -> str | None:
    report = pc.graph_breaks(fn, **case)
    if report.n_graphs == 1 and report.n_breaks == 0:
        return None
    if report.n_graphs == 0:
        return "Dynamo captured no graph at all (is the function disabled for torch.compile?)"
    return f"torch._dynamo.explain still finds {report.n_breaks} graph break(s):\n    " + \
        "\n    ".join(str(b) for b in report.breaks)


register(Exercise(
    name="compile.fix_graph_break",
    reference=softcap_probs,
    cases=_softcap_cases,
    rtol=1e-5, atol=1e-6,
    require=_no_graph_breaks,
    timeout=20.0,
    hint="Keep the decision on the tensor side: compute both candidates and pick with "
         "torch.where(logits.abs().amax() > cap, capped, logits): no .item(), no Python `if` on data.",
))

# --- compile.predict_compiles -----------------------------------------------------------


def predict_compiles(sizes: list[int], mode: str) -> int:
    """Reference: graphs torch.compile(fn, dynamic=...) builds when fn is called with one
    dimension taking `sizes` in turn; mode 'static' (dynamic=False), 'auto' (None), 'dynamic' (True)."""
    return pc.predict_compiles(sizes, mode)


def _predict_cases(rng):
    for mode in pc.MODES:
        yield dict(sizes=[4, 4, 4], mode=mode)  # same shape: one graph
        yield dict(sizes=[4, 8, 16], mode=mode)  # three shapes
    yield dict(sizes=[1, 4, 8], mode="dynamic")  # 1 is specialised even when dynamic
    yield dict(sizes=[4, 8, 1, 2, 0], mode="auto")
    yield dict(sizes=list(range(16, 28)), mode="static")  # 12 shapes: past the recompile limit
    yield dict(sizes=list(range(16, 28)), mode="auto")
    for _ in range(24):
        n = rng.randint(1, 12)
        yield dict(sizes=[rng.choice([0, 1, 2, 3, 5, 8, 13, 32]) for _ in range(n)], mode=rng.choice(pc.MODES))


register(Exercise(
    name="compile.predict_compiles",
    reference=predict_compiles,
    cases=_predict_cases,
    rtol=0.0, atol=0.0,
    hint="A call hits the cache if its size matches a specialised graph, or a dynamic graph exists and "
         "size >= 2 (0 and 1 always get graphs of their own). 'auto' specialises the first compile and "
         "goes dynamic on the first miss. After 8 graphs (recompile_limit) a miss runs eagerly.",
))

# --- compile.dynamic_spec ---------------------------------------------------------------


class MaskedMeanPool(nn.Module):
    """A transformer block, then the mean over the positions where mask is 1:
    x (B, T, C), mask (B, T) -> (B, C)."""

    def __init__(self, n_embd: int = 16, n_head: int = 2):
        super().__init__()
        from labkit.models import Block, GPTConfig

        self.block = Block(GPTConfig(n_embd=n_embd, n_head=n_head))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.block(x)  # (B, T, C)
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, C)


def dynamic_spec(max_batch: int, max_seq: int) -> dict:
    """Reference: dynamic_shapes for MaskedMeanPool.forward(x, mask): one batch Dim and one
    sequence Dim, shared by both inputs, bounded by max_batch and max_seq."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    return {"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}


@functools.lru_cache(maxsize=1)
def _pool_model() -> MaskedMeanPool:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MaskedMeanPool().eval()


def _pool_inputs(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, 16, generator=g)  # (B, T, C)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()  # (B, T)
    return x, mask


def _check_spec(got, expected, case) -> str | None:
    B, T = case["max_batch"], case["max_seq"]
    model = _pool_model()
    example = _pool_inputs(min(3, B), min(5, T), seed=1)
    try:
        ep = pc.export_program(model, example, got)
    except Exception as e:
        text = "\n    ".join(str(e).strip().splitlines()[:6])
        return f"torch.export.export rejected this spec ({type(e).__name__}):\n    {text}"
    ranges = pc.dim_ranges(ep)
    for name, bound in (("x.shape[0]", B), ("x.shape[1]", T)):
        if name not in ranges:
            return f"{name} is static in the exported program: give it a torch.export.Dim"
        lo, hi = ranges[name]
        if hi != bound:
            return f"{name} may go up to {hi} in the exported program; declare max={bound} in its Dim"
    for b, t in [(1, 1), (B, T), (max(1, B // 2), max(1, T // 3 + 1))]:
        x, mask = _pool_inputs(b, t, seed=b * 1000 + t)
        try:
            out = ep.module()(x, mask)
        except Exception as e:
            return f"the exported program fails on x {(b, t, 16)}, mask {(b, t)}: {str(e).splitlines()[0]}"
        with torch.no_grad():
            ref = model(x, mask)
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
            return f"exported output differs from eager at B={b}, T={t} (max |diff| {pc.max_abs_diff(out, ref):.3g})"
    return None


def _spec_cases(rng):
    yield dict(max_batch=8, max_seq=32)
    yield dict(max_batch=4, max_seq=128)
    yield dict(max_batch=rng.randint(2, 16), max_seq=rng.randint(8, 96))


register(Exercise(
    name="compile.dynamic_spec",
    reference=dynamic_spec,
    cases=_spec_cases,
    compare=_check_spec,
    timeout=20.0,
    hint="One torch.export.Dim per dynamic size, with min=1 and max=...; x and mask share their batch and "
         "sequence sizes, so pass the same Dim objects for both: {'x': {0: batch, 1: seq}, 'mask': {0: batch, 1: seq}}.",
))

# --- compile.count_kernels --------------------------------------------------------------


def count_kernels(source: str) -> int:
    """Reference: kernels defined (not launched) in one Inductor output code file."""
    return pc.count_fused_kernels(source)


def _cpp_kernel(name: str, body: str) -> str:
    return (f"{name} = async_compile.cpp_pybinding(['const float*', 'float*'], r'''\n"
            "#include <torch/csrc/inductor/cpp_prefix.h>\n"
            'extern "C"  void  kernel(const float* in_ptr0,\n                       float* out_ptr0)\n{\n'
            f"    #pragma omp parallel\n    {{ /* {body} */ }}\n}}\n''')\n")


def _triton_kernel(name: str, kind: str) -> str:
    heur = {"poi": "pointwise", "red": "reduction", "per": "persistent_reduction"}[kind]
    return (f"{name} = async_compile.triton('{name}', '''\n"
            "import triton\nimport triton.language as tl\n\n"
            "from torch._inductor.runtime import triton_helpers, triton_heuristics\n"
            f"@triton_heuristics.{heur}(\n    size_hints={{'x': 1024}},\n    filename=__file__,\n"
            f"    inductor_meta={{'kernel_name': '{name}'}},\n)\n"
            f"@triton.jit\ndef {name}(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):\n"
            "    xoffset = tl.program_id(0) * XBLOCK\n    xindex = xoffset + tl.arange(0, XBLOCK)[:]\n"
            "    xmask = xindex < xnumel\n    tmp0 = tl.load(in_ptr0 + (xindex), xmask)\n"
            "    tl.store(out_ptr0 + (xindex), tmp0 * 2.0, xmask)\n''', device_str='cuda')\n")


_HEADER = ("# AOT ID: ['0_inference']\nfrom ctypes import c_void_p, c_long, c_int\nimport torch\n"
           "from torch._inductor.select_algorithm import extern_kernels\nfrom torch._inductor.async_compile import AsyncCompile\n"
           "aten = torch.ops.aten\nasync_compile = AsyncCompile()\n\n")


def synthetic_source(n_kernels: int, language: str, n_mm: int = 0, relaunch: int = 0, seed: int = 0) -> str:
    """An Inductor-style output file with n_kernels definitions (cpp or triton), their launches in
    call() (`relaunch` of them launched twice) and n_mm library matmuls. For exercises and tests."""
    import random

    if language not in ("cpp", "triton"):
        raise ValueError(f"synthetic_source: language must be 'cpp' or 'triton', got {language!r}")
    rng = random.Random(seed)
    ops = ["add", "mul", "gelu", "native_layer_norm", "sum", "exp", "div", "silu", "pow_rsqrt", "mean"]
    names, defs = [], []
    for i in range(n_kernels):
        fused = "_".join(sorted(rng.sample(ops, rng.randint(1, 3))))
        if language == "cpp":
            name = f"cpp_fused_{fused}_{i}"
            defs.append(_cpp_kernel(name, fused))
        else:
            kind = rng.choice(["poi", "red", "per"])
            name = f"triton_{kind}_fused_{fused}_{i}"
            defs.append(_triton_kernel(name, kind))
        names.append(name)
    calls = []
    launches = names + rng.sample(names, min(relaunch, len(names)))
    for i, name in enumerate(launches):
        if language == "cpp":
            calls.append(f"        {name}(arg0_1, buf{i})")
        else:
            calls.append(f"        {name}.run(arg0_1, buf{i}, 1024, stream=stream0)")
    for j in range(n_mm):
        calls.insert(rng.randint(0, len(calls)), f"        extern_kernels.mm(buf{j}, arg1_1, out=buf{j + 100})")
    body = "\n".join(calls) if calls else "        pass"
    return (_HEADER + "\n".join(defs) + "\nasync_compile.wait(globals())\ndel async_compile\n\n"
            "def call(args):\n    arg0_1, arg1_1 = args\n    args.clear()\n    with torch.no_grad():\n"
            f"{body}\n        return (buf0, )\n")


@functools.lru_cache(maxsize=1)
def _real_sources() -> tuple[str, ...]:
    """Inductor's output for two tiny functions on this machine's device (compiled once per process)."""
    from torch._inductor.utils import run_and_get_code

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def chain(x):  # pointwise chain: one fused kernel
        return torch.relu(torch.sin(x) * 2.0 + 1.0)

    def mm_softmax(x, w):  # a library matmul, then a fused softmax (+ mean)
        return torch.softmax(x @ w, dim=-1) + x.mean()

    x, w = torch.randn(8, 16, device=dev), torch.randn(16, 16, device=dev)
    out = []
    with torch.no_grad(), pc.quiet_dynamo():
        for fn, args in ((chain, (x,)), (mm_softmax, (x, w))):
            _, codes = run_and_get_code(torch.compile(fn, dynamic=False), *args)
            out.append("\n".join(codes))
    return tuple(out)


def _kernel_cases(rng):
    yield dict(source=synthetic_source(0, "cpp", n_mm=2))  # only library calls: no generated kernel
    yield dict(source=synthetic_source(1, "cpp", seed=1))
    yield dict(source=synthetic_source(3, "triton", n_mm=1, relaunch=2, seed=2))  # launches != kernels
    for source in _real_sources():
        yield dict(source=source)
    for i in range(3):
        yield dict(source=synthetic_source(rng.randint(0, 9), rng.choice(["cpp", "triton"]), n_mm=rng.randint(0, 3),
                                           relaunch=rng.randint(0, 3), seed=rng.randint(0, 10**6)))


register(Exercise(
    name="compile.count_kernels",
    reference=count_kernels,
    cases=_kernel_cases,
    rtol=0.0, atol=0.0,
    hint="Count definitions, not mentions: each kernel is defined once as `<name> = async_compile.<lang>(` "
         "(cpp_pybinding on CPU, triton on GPU) and then launched from call(), maybe several times. "
         "extern_kernels.mm is a library call, not a generated kernel.",
))

__all__ = ["MaskedMeanPool", "count_kernels", "dynamic_spec", "predict_compiles", "softcap_probs", "synthetic_source"]
