"""torch.compile, Inductor and torch.export: watching the PyTorch 2 compiler stack work.

`torch.compile(fn)` runs three stages the first time `fn` is called with new inputs:

1. **TorchDynamo** hooks CPython's frame evaluation (PEP 523), reads `fn`'s bytecode and
   symbolically executes it, recording every tensor operation into an FX graph. Python that
   it cannot put in a graph (a `print`, a `.item()` whose value steers an `if`, an unsupported
   library call) causes a *graph break*: the graph so far is compiled, the offending bytecode
   runs in ordinary Python, and capture resumes after it. Each compiled graph is stored with
   *guards* (input shapes, dtypes, Python constants it specialised on); a call that fails the
   guards of every cached graph is *recompiled* (up to `torch._dynamo.config.recompile_limit`,
   8 by default, graphs per code object; after that the frame runs eagerly).
2. **AOTAutograd** traces the graph to ATen operators (the forward, and the backward when
   gradients are needed), functionalizes it and decomposes it into a smaller core op set.
3. **Inductor** lowers the ATen graph to a loop-level IR, groups pointwise and reduction ops
   that can share a loop into *fused kernels* and prints their source: Triton on a GPU,
   C++ with OpenMP and vector intrinsics on a CPU. Matrix multiplies usually go to a library
   (cuBLAS, oneDNN/MKL: `extern_kernels.mm`) unless `mode="max-autotune"` benchmarks
   generated templates against them. (Inductor is written in Python; it is not built on MLIR.)

`torch.export` is the ahead-of-time path: one whole graph (a graph break is an error, not a
fallback), ATen ops, a signature saying which graph inputs are parameters, buffers or user
inputs, and range constraints for the dimensions declared dynamic with `torch.export.Dim`.
An ExportedProgram is saved as a `.pt2` archive; AOTInductor compiles it into a shared
library packaged in a `.pt2` that runs without Dynamo.

This module makes each stage inspectable: capture the FX graphs (`capture_graphs`), list graph
breaks (`graph_breaks`), count compilations and predict them (`count_compiles`, `generation_sizes`,
`predict_compiles`), read Inductor's generated code and count its kernels (`inductor_code`,
`count_fused_kernels`), export with dynamic dims, save/load and package (`export_program`,
`signature_table`, `dim_ranges`, `save_and_load`, `aoti_package`).

Functions that measure compilation (`capture_graphs`, `graph_breaks`, `count_compiles`,
`inductor_code`) start from `torch._dynamo.reset()` (as `torch._dynamo.explain` does), so a
function compiled earlier in the same process recompiles on its next call. Inductor's
on-disk cache (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_<user>) survives that
and makes the second compile of the same graph take a fraction of the first.

References:
    J. Ansel et al., "PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode
        Transformation and Graph Compilation", ASPLOS 2024.
    PyTorch documentation: torch.compiler (Dynamo, graph breaks, dynamic shapes),
        torch.export (ExportedProgram, Dim), AOTInductor.
    P. Tillet, H. T. Kung, D. Cox, "Triton: an intermediate language and compiler for tiled
        neural network computations", MAPL 2019.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx

# --- constants --------------------------------------------------------------------------

MODES = ("static", "auto", "dynamic")  # names for torch.compile(dynamic=False | None | True)
DYNAMIC_ARG = {"static": False, "auto": None, "dynamic": True}


def recompile_limit() -> int:
    """Dynamo's graphs-per-function limit now: torch._dynamo.config.recompile_limit (named
    cache_size_limit before torch 2.6); 8, its default, if this torch has neither."""
    for name in ("recompile_limit", "cache_size_limit"):
        value = getattr(torch._dynamo.config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return 8


RECOMPILE_LIMIT = recompile_limit()  # the value when labkit was imported (8 unless configured)

# A kernel definition in Inductor's output code, e.g.
#   cpp_fused_add_gelu_0 = async_compile.cpp_pybinding(['float*', ...], r'''
#   triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''
_KERNEL_DEF = re.compile(r"^[ \t]*(?P<name>[A-Za-z_]\w*)[ \t]*=[ \t]*async_compile\.(?P<kind>\w+)\(", re.M)
_EXTERN_CALL = re.compile(r"\bextern_kernels\.(\w+)\(")
_ATEN_FALLBACK = re.compile(r"\btorch\.ops\.aten\.(\w+)\.\w+\(")
_LANGUAGE = {"cpp_pybinding": "cpp", "cpp": "cpp", "triton": "triton", "cuda": "cuda", "halide": "halide"}


# --- helpers ----------------------------------------------------------------------------


def _require_callable(where: str, fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"{where}: fn must be callable, got {type(fn).__name__}")


@contextlib.contextmanager
def quiet_dynamo(level: int = logging.ERROR):
    """Silence Dynamo/Inductor's warning logs (graph-break advice, recompile-limit notices) inside the block."""
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch._inductor")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def op_name(node: torch.fx.Node) -> str:
    """A short name for what an FX node computes ('matmul', 'relu', 'aten.add', 'view', ...)."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op == "call_module":
        return f"module:{target}"
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._overloadpacket.__name__}" if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))


_OP_NODES = ("call_function", "call_method", "call_module")


def op_histogram(graphs: Iterable[torch.fx.GraphModule]) -> collections.Counter:
    """How often each op appears across `graphs` (placeholders, get_attr and output not counted)."""
    hist: collections.Counter = collections.Counter()
    for gm in graphs:
        if not isinstance(gm, torch.fx.GraphModule):
            raise TypeError(f"op_histogram: graphs must hold torch.fx.GraphModule, got {type(gm).__name__}")
        hist.update(op_name(n) for n in gm.graph.nodes if n.op in _OP_NODES)
    return hist


# --- 1. graph capture: what Dynamo hands to the backend ---------------------------------


class GraphRecorder:
    """A torch.compile backend that keeps every FX graph it is given and runs it unchanged.

    `torch.compile(fn, backend=GraphRecorder())`: each call of the backend is one compiled
    graph (a new graph after a graph break, or a recompilation after a guard failure).
    """

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs.append(gm)
        return gm.forward  # run the captured graph as is: no optimisation

    @property
    def count(self) -> int:
        return len(self.graphs)


@dataclass
class Capture:
    """The FX graphs Dynamo captured for one call, and the call's output."""

    graphs: list[torch.fx.GraphModule]
    output: Any = field(default=None, repr=False)

    @property
    def n_graphs(self) -> int:
        return len(self.graphs)

    @property
    def node_counts(self) -> list[int]:
        """Op nodes (call_function / call_method / call_module) per graph."""
        return [sum(n.op in _OP_NODES for n in gm.graph.nodes) for gm in self.graphs]

    def op_histogram(self) -> collections.Counter:
        return op_histogram(self.graphs)

    @property
    def code(self) -> str:
        """The Python code FX generates for each graph, one after another."""
        return "\n".join(f"# --- graph {i} ---{gm.code}" for i, gm in enumerate(self.graphs))


def readable_code(gm: torch.fx.GraphModule) -> str:
    """gm.code with Dynamo's long input names shortened for reading.

    `L_self_modules_attn_modules_q_proj_parameters_weight_` becomes `attn_q_proj_weight`,
    `L_x_` becomes `x`; the lines that only alias an input to itself are dropped.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"readable_code: gm must be a torch.fx.GraphModule, got {type(gm).__name__}")

    text = gm.code
    taken = set(re.findall(r"\b\w+\b", text))
    names: dict[str, str] = {}
    for long in re.findall(r"\b[lL]_\w+?_(?!\w)", text):
        key = long[2:]  # L_ (the input) and l_ (its local alias) map to the same short name
        if key not in names:
            name = re.sub(r"(^|_)(modules|parameters|buffers)_", r"\1", key)
            name = re.sub(r"^self_", "", name).strip("_")
            names[key] = name if name not in taken else name + "_in"  # never clash with a graph value
    text = re.sub(r"\b[lL]_(\w+?_)(?!\w)", lambda m: names.get(m.group(1), m.group(0)), text)
    text = re.sub(r" : [\w.]+(?=[,)])", "", text)  # drop the type annotations in the signature
    lines = [ln for ln in text.splitlines() if not re.fullmatch(r"\s*(\w+) = \1", ln)]
    return "\n".join(ln for ln in lines if ln.strip())


def capture_graphs(fn: Callable, *args, dynamic: bool | None = None, **kwargs) -> Capture:
    """Call `torch.compile(fn, backend=GraphRecorder())(*args, **kwargs)` once; return its graphs.

    Resets Dynamo first, so the graphs are those of this call alone.
    """
    _require_callable("capture_graphs", fn)
    torch._dynamo.reset()
    recorder = GraphRecorder()
    with quiet_dynamo():
        out = torch.compile(fn, backend=recorder, dynamic=dynamic)(*args, **kwargs)
    return Capture(list(recorder.graphs), out)


# --- 2. graph breaks --------------------------------------------------------------------


@dataclass(frozen=True)
class GraphBreak:
    """Where and why Dynamo stopped a graph."""

    reason: str  # the first line of Dynamo's message, e.g. "Unsupported Tensor.item() call ..."
    function: str
    filename: str
    lineno: int | None
    line: str  # the source line, when Python can find it
    detail: str = field(default="", repr=False)  # Dynamo's full message (explanation, hints)

    def __str__(self) -> str:
        where = f"{self.function}:{self.lineno}" if self.lineno is not None else self.function
        code = f"  `{self.line}`" if self.line else ""
        return f"{where}{code}: {self.reason}"


@dataclass
class BreakReport:
    """torch._dynamo.explain's verdict, flattened: graphs, breaks and their locations."""

    n_graphs: int
    n_breaks: int
    breaks: list[GraphBreak]
    ops_per_graph: list[int]
    graphs: list[torch.fx.GraphModule] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        lines = [f"{self.n_graphs} graph(s), {self.n_breaks} graph break(s); ops per graph: {self.ops_per_graph}"]
        lines += [f"  break {i}: {b}" for i, b in enumerate(self.breaks, 1)]
        return "\n".join(lines)


def _clean_function_name(name: str) -> str:
    # Dynamo names the code that resumes after a break "torch_dynamo_resume_in_<fn>_at_<line>".
    m = re.match(r"torch_dynamo_resume_in_(\w+?)_at_\d+$", name)
    return m.group(1) if m else name


def graph_breaks(fn: Callable, *args, **kwargs) -> BreakReport:
    """Run `torch._dynamo.explain(fn)(*args, **kwargs)` (no compiler: cheap) and report its breaks.

    `n_breaks` is explain's graph_break_count (graphs - 1); `breaks` lists one entry per
    graph that ended in a break, with Dynamo's reason and the user source line.
    """
    _require_callable("graph_breaks", fn)
    with quiet_dynamo():
        ex = torch._dynamo.explain(fn)(*args, **kwargs)
    breaks = []
    for r in ex.break_reasons:
        frame = r.user_stack[-1] if r.user_stack else None
        text = str(r.reason).strip()
        breaks.append(GraphBreak(
            reason=text.splitlines()[0] if text else "(no reason given)",
            function=_clean_function_name(frame.name) if frame else "?",
            filename=frame.filename if frame else "?",
            lineno=frame.lineno if frame else None,
            line=(frame.line or "").strip() if frame else "",
            detail=text,
        ))
    ops = [sum(n.op in _OP_NODES for n in g.graph.nodes) for g in ex.graphs]
    return BreakReport(ex.graph_count, ex.graph_break_count, breaks, ops, list(ex.graphs))


# --- 3. recompilation: guards, shapes, dynamic=True -------------------------------------


@dataclass
class CompileLog:
    """Graphs compiled at each call of a compiled function."""

    mode: str
    per_call: list[int]  # graphs compiled during call i (0 = a cached graph's guards passed)
    graphs: list[torch.fx.GraphModule] = field(default_factory=list, repr=False)

    @property
    def n_compiles(self) -> int:
        return sum(self.per_call)

    @property
    def n_calls(self) -> int:
        return len(self.per_call)


def count_compiles(fn: Callable, calls: Sequence, *, dynamic: bool | None = None,
                   mark_dynamic: dict[int, int | Sequence[int]] | None = None) -> CompileLog:
    """Compile `fn` with a recording backend, call it once per entry of `calls`, log the compiles.

    calls: a sequence of argument tuples (a lone tensor counts as a 1-tuple).
    dynamic: torch.compile's argument: False (specialise on every shape: "static"), None
        (automatic: specialise first, make a dim dynamic once it changes: "auto"), True
        ("dynamic" from the start).
    mark_dynamic: {argument index: dim or dims} passed to torch._dynamo.mark_dynamic on each
        call's tensors before the call (the per-tensor alternative to dynamic=True).
    """
    _require_callable("count_compiles", fn)
    if dynamic not in (None, True, False):
        raise ValueError(f"count_compiles: dynamic must be None, True or False, got {dynamic!r}")
    if isinstance(calls, (torch.Tensor, str)) or not isinstance(calls, Sequence) or len(calls) == 0:
        raise ValueError(f"count_compiles: calls must be a non-empty sequence of argument tuples, got {calls!r:.80}")
    marks = {} if mark_dynamic is None else dict(mark_dynamic)
    for idx in marks:
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ValueError(f"count_compiles: mark_dynamic keys must be argument indices >= 0, got {idx!r}")
    torch._dynamo.reset()
    recorder = GraphRecorder()
    compiled = torch.compile(fn, backend=recorder, dynamic=dynamic)
    per_call = []
    with quiet_dynamo():
        for i, args in enumerate(calls):
            args = (args,) if not isinstance(args, (tuple, list)) else tuple(args)
            for idx, dims in marks.items():
                if idx >= len(args) or not isinstance(args[idx], torch.Tensor):
                    raise ValueError(f"count_compiles: mark_dynamic names argument {idx}, but call {i} has no tensor there")
                torch._dynamo.mark_dynamic(args[idx], dims if isinstance(dims, int) else list(dims))
            before = recorder.count
            compiled(*args)
            per_call.append(recorder.count - before)
    mode = next(m for m, d in DYNAMIC_ARG.items() if d is dynamic)
    return CompileLog(mode, per_call, list(recorder.graphs))


def simulate_compiles(sizes: Sequence[int], mode: str, *, limit: int | None = None) -> list[bool]:
    """Which calls compile, for calls whose one varying dim takes `sizes` in turn (a model of Dynamo's cache).

    - a call reuses a cached graph when its size equals a specialised graph's size, or a
      dynamic graph exists and size >= 2 (Dynamo specialises sizes 0 and 1 even when a dim
      is dynamic: they get graphs of their own);
    - "static": every new size compiles a graph specialised to it;
    - "dynamic": sizes >= 2 share one dynamic graph;
    - "auto": the first compile specialises; any later miss marks the dim dynamic, so a
      size >= 2 then compiles the shared dynamic graph;
    - after `limit` graphs (default: recompile_limit(), Dynamo's current setting) a miss is not
      compiled: the call runs eagerly.

    The model assumes the other input sizes never equal the varying one: with dynamic dims
    Dynamo gives equal sizes one symbol ("duck sizing"), which adds an equality guard.
    """
    if mode not in MODES:
        raise ValueError(f"simulate_compiles: mode must be one of {MODES}, got {mode!r}")
    limit = recompile_limit() if limit is None else limit
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"simulate_compiles: limit must be a positive int, got {limit!r}")
    sizes = list(sizes)
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ValueError(f"simulate_compiles: sizes must be ints >= 0, got {s!r}")
    specialised: set[int] = set()
    dynamic_graph = False
    compiled_any = False
    out = []
    for s in sizes:
        if s in specialised or (dynamic_graph and s >= 2):
            out.append(False)
            continue
        if len(specialised) + dynamic_graph >= limit:
            out.append(False)  # recompile limit hit: this call runs eagerly
            continue
        generic = s >= 2 and (mode == "dynamic" or (mode == "auto" and compiled_any))
        if generic:
            dynamic_graph = True
        else:
            specialised.add(s)
        compiled_any = True
        out.append(True)
    return out


def predict_compiles(sizes: Sequence[int], mode: str, *, limit: int | None = None) -> int:
    """How many graphs `torch.compile(fn, dynamic=...)` builds for calls with these sizes (see simulate_compiles)."""
    return sum(simulate_compiles(sizes, mode, limit=limit))


def generation_sizes(prompt_len: int, new_tokens: int) -> list[int]:
    """Sequence lengths a model without a KV cache sees while generating: T0, T0+1, ..., T0+n-1."""
    if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or prompt_len < 1:
        raise ValueError(f"generation_sizes: prompt_len must be an int >= 1, got {prompt_len!r}")
    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        raise ValueError(f"generation_sizes: new_tokens must be an int >= 1, got {new_tokens!r}")
    return [prompt_len + i for i in range(new_tokens)]


# --- 4. Inductor's generated code -------------------------------------------------------


def kernel_names(source: str) -> list[str]:
    """Names of the kernels defined in one Inductor output file (definitions, not launches)."""
    if not isinstance(source, str):
        raise TypeError(f"kernel_names: source must be a str of Inductor output code, got {type(source).__name__}")
    return [m.group("name") for m in _KERNEL_DEF.finditer(source)]


def count_fused_kernels(source: str | Sequence[str]) -> int:
    """Number of kernels Inductor generated (cpp_fused_* on CPU, triton_* on GPU) in one or more output files."""
    if isinstance(source, str):
        return len(kernel_names(source))
    if not isinstance(source, Sequence):
        raise TypeError(f"count_fused_kernels: source must be a str or a list of str, got {type(source).__name__}")
    return sum(len(kernel_names(s)) for s in source)


def kernel_languages(source: str) -> collections.Counter:
    """Kernels per language ('cpp', 'triton', ...) in an Inductor output file."""
    if not isinstance(source, str):
        raise TypeError(f"kernel_languages: source must be a str, got {type(source).__name__}")
    return collections.Counter(_LANGUAGE.get(m.group("kind"), m.group("kind")) for m in _KERNEL_DEF.finditer(source))


def library_calls(source: str) -> collections.Counter:
    """Work Inductor left to libraries: extern_kernels.* (mm, bmm, addmm, ...) and aten fallbacks."""
    if not isinstance(source, str):
        raise TypeError(f"library_calls: source must be a str, got {type(source).__name__}")
    calls = collections.Counter(f"extern_kernels.{m}" for m in _EXTERN_CALL.findall(source))
    calls.update(f"aten.{m}" for m in _ATEN_FALLBACK.findall(source))
    return calls


def kernel_source(source: str, name: str) -> str:
    """The source of kernel `name` (the C++ or Triton text between its triple quotes)."""
    if not isinstance(source, str) or not isinstance(name, str):
        raise TypeError("kernel_source: source and name must be str")
    m = re.search(rf"^[ \t]*{re.escape(name)}[ \t]*=[ \t]*async_compile\.\w+\((?:.*?)r?'''\n(.*?)'''", source, re.M | re.S)
    if m is None:
        raise ValueError(f"kernel_source: no kernel named {name!r}; kernels here: {kernel_names(source)}")
    return m.group(1)


@dataclass
class InductorCode:
    """What Inductor wrote for one compiled call."""

    sources: list[str]  # one Python "output code" module per compiled graph (forward, backward, ...)
    output: Any = field(default=None, repr=False)
    compiled: Callable | None = field(default=None, repr=False)  # the torch.compile'd fn (reuse it: no recompile)
    compile_s: float = 0.0  # wall time of the first (compiling) call

    @property
    def kernels(self) -> list[str]:
        return [k for s in self.sources for k in kernel_names(s)]

    @property
    def n_kernels(self) -> int:
        return len(self.kernels)

    @property
    def languages(self) -> collections.Counter:
        c: collections.Counter = collections.Counter()
        for s in self.sources:
            c.update(kernel_languages(s))
        return c

    @property
    def library_calls(self) -> collections.Counter:
        c: collections.Counter = collections.Counter()
        for s in self.sources:
            c.update(library_calls(s))
        return c

    def kernel_source(self, name: str) -> str:
        for s in self.sources:
            if name in kernel_names(s):
                return kernel_source(s, name)
        raise ValueError(f"kernel_source: no kernel named {name!r}; kernels: {self.kernels}")


def inductor_code(fn: Callable, *args, dynamic: bool | None = False, mode: str | None = None,
                  options: dict | None = None, no_grad: bool = True, **kwargs) -> InductorCode:
    """Compile `fn` with Inductor, call it once on `args`, return the generated source code.

    Uses torch._inductor.utils.run_and_get_code (it captures the output code whether the graph
    was compiled now or loaded from Inductor's on-disk cache). no_grad=True compiles an
    inference graph (forward only); with gradients, the backward's code appears only when
    backward runs. Resets Dynamo first so the call really compiles.
    """
    _require_callable("inductor_code", fn)
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=dynamic, mode=mode, options=options)
    ctx = torch.no_grad() if no_grad else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx, quiet_dynamo():
        out, sources = run_and_get_code(compiled, *args, **kwargs)
    elapsed = time.perf_counter() - t0
    if no_grad:
        compiled = _under_no_grad(compiled)
    return InductorCode(list(sources), out, compiled, elapsed)


def _under_no_grad(compiled: Callable) -> Callable:
    def run(*args, **kwargs):
        with torch.no_grad():
            return compiled(*args, **kwargs)

    run.__wrapped__ = compiled
    return run


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled kernels between processes (TORCHINDUCTOR_CACHE_DIR overrides)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # older layouts
        from torch._inductor.runtime.runtime_utils import cache_dir
    return cache_dir()


def max_rel_diff(out: Any, ref: Any) -> float:
    """max |out - ref| / max |ref| over two tensors (or equal-length tuples of tensors).

    One number for "how far is a compiled result from eager" that a dtype's precision bounds:
    bf16 keeps 8 significant bits (a relative step of 2**-8 to 2**-7), fp32 keeps 24.
    0.0 when both are zero; inf when only ref is.
    """
    err = max_abs_diff(out, ref)
    scale = _max_abs(ref)
    if scale == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / scale


def _max_abs(x: Any) -> float:
    if isinstance(x, torch.Tensor):
        return x.detach().float().abs().max().item() if x.numel() else 0.0
    return max((_max_abs(t) for t in x), default=0.0)


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over two tensors (or equal-length tuples of tensors)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            raise ValueError(f"max_abs_diff: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        return (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    raise TypeError(f"max_abs_diff: expected two tensors or two equal-length sequences, got "
                    f"{type(a).__name__} and {type(b).__name__}")


# --- 5. torch.export: one static graph with symbolic dims --------------------------------


def export_program(module: torch.nn.Module, args: tuple, dynamic_shapes: Any = None, *,
                   strict: bool = False) -> torch.export.ExportedProgram:
    """torch.export.export(module, args, dynamic_shapes=...) with argument checks.

    dynamic_shapes: for each input, {dim: torch.export.Dim(...)} (or Dim.AUTO / None), as a
    tuple in argument order or a dict keyed by forward's parameter names. One Dim object used
    for two inputs declares those sizes equal.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"export_program: module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"export_program: args must be a tuple of example inputs, got {type(args).__name__}")
    with quiet_dynamo():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=strict)


def _require_ep(where: str, ep: Any) -> None:
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"{where}: ep must be a torch.export.ExportedProgram, got {type(ep).__name__}")


def signature_table(ep: torch.export.ExportedProgram) -> list[dict]:
    """One row per graph input and output: {'role': 'input'|'output', 'kind', 'graph_name', 'target'}.

    kind is PARAMETER, BUFFER, USER_INPUT, ... for inputs and USER_OUTPUT, BUFFER_MUTATION,
    ... for outputs; target is the module attribute ("attn.q_proj.weight") where there is one.
    """
    _require_ep("signature_table", ep)
    rows = []
    sig = ep.graph_signature
    for role, specs in (("input", sig.input_specs), ("output", sig.output_specs)):
        for s in specs:
            rows.append({"role": role, "kind": s.kind.name, "graph_name": getattr(s.arg, "name", str(s.arg)),
                         "target": s.target})
    return rows


def signature_counts(ep: torch.export.ExportedProgram) -> dict[str, int]:
    """{'PARAMETER': n, 'BUFFER': n, 'USER_INPUT': n, 'USER_OUTPUT': n, ...} from the graph signature."""
    return dict(collections.Counter(r["kind"] for r in signature_table(ep)))


def dim_ranges(ep: torch.export.ExportedProgram) -> dict[str, tuple[int, int | float]]:
    """For each dynamic dim of each user input: 'x.shape[0]' -> (min, max) (max math.inf when unbounded)."""
    _require_ep("dim_ranges", ep)
    user_inputs = set(ep.graph_signature.user_inputs)
    ranges = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        for d, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt):
                vr = ep.range_constraints.get(size.node.expr)
                if vr is None:
                    continue
                hi = float(vr.upper)  # torch's int_oo (no upper bound) converts to inf
                ranges[f"{node.name}.shape[{d}]"] = (int(vr.lower), int(hi) if math.isfinite(hi) else math.inf)
    return ranges


def save_and_load(ep: torch.export.ExportedProgram, path: str | os.PathLike) -> torch.export.ExportedProgram:
    """torch.export.save to `path` (a .pt2 archive), then torch.export.load it back."""
    _require_ep("save_and_load", ep)
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"save_and_load: path should end in .pt2, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation notices from the unpickler
        return torch.export.load(path)


@dataclass
class AOTIPackage:
    """The result of AOTInductor packaging: ok and a runner, or the reason it could not be built."""

    ok: bool
    path: Path | None
    runner: Callable | None = field(default=None, repr=False)
    reason: str = ""
    compile_s: float = 0.0


def aoti_package(ep: torch.export.ExportedProgram, path: str | os.PathLike, *,
                 inductor_configs: dict | None = None) -> AOTIPackage:
    """AOT-compile `ep` with AOTInductor into a .pt2 package and load it back.

    Returns AOTIPackage(ok=False, reason=...) (and warns) when this platform cannot build
    it, e.g. no C++ compiler (every package, CPU or GPU, compiles a C++ wrapper), or the
    build fails: callers report the reason and skip.
    """
    _require_ep("aoti_package", ep)
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"aoti_package: path should end in .pt2, got {str(path)!r}")
    # Every package has a C++ wrapper (and, on a CPU, C++ kernels): a GPU package needs the compiler too.
    if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
        reason = "no C++ compiler (g++/c++/clang++) on PATH: AOTInductor needs one to build its C++ wrapper"
        warnings.warn(f"aoti_package: skipped: {reason}", RuntimeWarning, stacklevel=2)
        return AOTIPackage(False, None, None, reason)
    try:
        from torch._inductor import aoti_compile_and_package, aoti_load_package
    except ImportError as e:  # torch < 2.6
        reason = f"this torch ({torch.__version__}) has no aoti_compile_and_package: {e}"
        warnings.warn(f"aoti_package: skipped: {reason}", RuntimeWarning, stacklevel=2)
        return AOTIPackage(False, None, None, reason)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with quiet_dynamo(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            built = aoti_compile_and_package(ep, package_path=str(path), inductor_configs=inductor_configs or {})
            runner = aoti_load_package(built)
    except Exception as e:  # a compiler or linker failure: report it, do not hide it
        first = (str(e).strip().splitlines() or [""])[0][:300]
        reason = f"AOTInductor failed with {type(e).__name__}: {first}"
        warnings.warn(f"aoti_package: skipped: {reason}", RuntimeWarning, stacklevel=2)
        return AOTIPackage(False, None, None, reason, time.perf_counter() - t0)
    return AOTIPackage(True, Path(built), runner, "", time.perf_counter() - t0)


__all__ = [
    "AOTIPackage", "BreakReport", "Capture", "CompileLog", "GraphBreak", "GraphRecorder", "InductorCode",
    "DYNAMIC_ARG", "MODES", "RECOMPILE_LIMIT", "aoti_package", "capture_graphs", "count_compiles", "count_fused_kernels",
    "dim_ranges", "export_program", "generation_sizes", "graph_breaks", "inductor_code", "kernel_languages",
    "kernel_names", "inductor_cache_dir", "kernel_source", "library_calls", "max_abs_diff", "max_rel_diff",
    "op_histogram", "op_name", "predict_compiles", "quiet_dynamo", "readable_code", "recompile_limit",
    "save_and_load", "signature_counts", "signature_table", "simulate_compiles",
]
