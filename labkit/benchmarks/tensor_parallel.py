"""Benchmarks of chapter 15-tensor-parallel, each measured beside its baseline in the same run.

1. kind "comm_vs_compute": on 2 ranks, one TP MLP shard's matmuls (the baseline, baseline_ms)
   against the all-reduce of its output (median_ms) for decode- to prefill-sized token counts;
   ratio = compute / all-reduce (below 1: the all-reduce takes longer than the matmuls).
2. kind "overlap": on 2 ranks, a stack of TP blocks on a batch split into chunks, each chunk's
   all-reduce waited for at once (the baseline) or issued with async_op=True and overlapped
   with the next chunk's compute; plus the unchunked forward for scale.
3. kind "cuda_graph" (GPU only): a decode step of TP blocks run eagerly (the baseline) and
   replayed from a CUDA graph that captured its NCCL all-reduces, per batch size, on as many
   GPUs as there are (up to 8; a group of one still runs a real NCCL all-reduce).

Ranks use NCCL with one GPU each when there are enough GPUs, else gloo on the CPU; every row
names its device and backend. The functions each rank runs (comm_vs_compute,
overlap_experiment, decode_graph_experiment) are module-level so that labkit.parallel.launch
can start them; the chapter launches them too.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from labkit import bench
from labkit.models.gpt import MLP, Block, GPTConfig
from labkit.parallel.launch import default_backend, launch, rank_device
from labkit.parallel import tensor as tp

# --------------------------------------------------------------------------- what every rank runs


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _tp_blocks(seed: int, dev: torch.device, dt: torch.dtype, **cfg) -> list[tp.TensorParallelBlock]:
    """TensorParallelBlocks of GPTConfig(**cfg), built one dense Block at a time on `dev` (the same
    seeded weights on every rank), so no rank ever holds the dense stack."""
    config = GPTConfig(**cfg)
    torch.manual_seed(seed)
    with torch.device(dev):
        return [tp.TensorParallelBlock(Block(config)).to(dtype=dt) for _ in range(config.n_layer)]


def comm_vs_compute(token_counts: Sequence[int], d_model: int = 256, mlp_ratio: float = 4.0, *,
                    repeats: int = 20, inner: int = 10, dtype: str = "float32") -> list[dict]:
    """On every rank: time one TP MLP's local compute and its all-reduce for each token count.

    Rows: tokens, compute_ms (this rank's column -> activation -> row-partial matmuls),
    allreduce_ms (the tokens x d_model all-reduce alone), message_bytes: medians over `repeats`
    timings of `inner` back-to-back calls each, per call (the ranks fall into step after the
    first all-reduce of a batch, so one rank's late start does not count as communication);
    compute_min_ms, allreduce_min_ms: the fastest timing, per call (what a shared CPU disturbs least).
    """
    dev, dt = rank_device(), getattr(torch, dtype)
    torch.manual_seed(0)
    with torch.device(dev):
        mlp = tp.TensorParallelMLP(MLP(GPTConfig(n_embd=d_model, n_head=1, mlp_ratio=mlp_ratio))).to(dtype=dt)
    rows = []
    for n in token_counts:
        x = torch.randn(n, 1, d_model, device=dev, dtype=dt)  # (tokens, T=1, C): a decode step's batch
        buf = torch.zeros(n, 1, d_model, device=dev, dtype=dt)
        with torch.no_grad():
            comp = bench.timeit(lambda: [mlp.local(x) for _ in range(inner)], warmup=1, repeats=repeats, device=dev)
        if dist.is_initialized():
            dist.barrier()
        comm = bench.timeit(lambda: [tp.all_reduce(buf) for _ in range(inner)], warmup=1, repeats=repeats,
                            device=dev)
        rows.append(dict(tokens=n, compute_ms=comp.median_ms / inner, allreduce_ms=comm.median_ms / inner,
                         compute_min_ms=comp.min_s * 1e3 / inner, allreduce_min_ms=comm.min_s * 1e3 / inner,
                         message_bytes=buf.numel() * buf.element_size()))
    return rows


def overlap_experiment(batch: int = 8, seq: int = 1, chunks: int = 2, repeats: int = 10, seed: int = 0,
                       dtype: str = "float32", n_layer: int = 2, n_embd: int = 256, n_head: int = 8) -> dict:
    """On every rank: a stack of TP blocks run three ways on the same input: plain forward, chunked
    with each all-reduce waited for at once ("sequential"), and chunked with async all-reduces
    overlapped ("overlapped").

    Returns the medians and minima (ms, min_ms), the largest output differences of the chunked
    runs from the plain forward (diff), and a host-side trace of one overlapped run (Span dicts).
    """
    rank, world = tp.group_rank_world()
    dev, dt = rank_device(), getattr(torch, dtype)
    blocks = _tp_blocks(seed, dev, dt, n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=seq)
    stages = [st for b in blocks for st in b.stages()]
    x = torch.randn(batch, seq, n_embd, generator=torch.Generator().manual_seed(seed + 1)).to(dev, dt)

    @torch.no_grad()
    def plain():
        h = x
        for b in blocks:
            h = b(h)
        return h

    def chunked(overlap):
        return lambda: tp.overlapped_forward(stages, x, chunks, overlap=overlap)

    ref = plain()
    diff = {"sequential": _max_diff(chunked(False)(), ref), "overlapped": _max_diff(chunked(True)(), ref)}
    times, best = {}, {}
    for name, fn in (("plain", plain), ("sequential", chunked(False)), ("overlapped", chunked(True))):
        if dist.is_initialized():
            dist.barrier()
        t = bench.timeit(fn, warmup=2, repeats=repeats, device=dev)
        times[name], best[name] = t.median_ms, t.min_s * 1e3
    trace: list[tp.Span] = []
    tp.overlapped_forward(stages, x, chunks, overlap=True, trace=trace)
    return dict(rank=rank, world=world, chunks=chunks, diff=diff, ms=times, min_ms=best,
                trace=[dataclasses.asdict(s) for s in trace], allreduces=len(stages) * chunks)


def decode_graph_experiment(n_layer: int = 4, n_embd: int = 1024, n_head: int = 16, batch: int = 1,
                            dtype: str = "bfloat16", repeats: int = 50, seed: int = 0) -> dict:
    """On every rank (GPU only): a decode step (n_layer TP blocks on a (batch, 1, C) input) run eagerly
    and replayed from a CUDA graph that captured its NCCL all-reduces.

    Returns eager_ms, graph_ms, their ratio, the per-layer saving in microseconds, the all-reduce
    alone (eager), and the largest difference between graph and eager outputs.
    """
    dev = rank_device()
    if dev.type != "cuda":
        raise RuntimeError("decode_graph_experiment: needs a CUDA device per rank (NCCL); "
                           "on a CPU the chapter shows the recorded GPU measurement instead")
    rank, world = tp.group_rank_world()
    dt = getattr(torch, dtype)
    blocks = _tp_blocks(seed, dev, dt, n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=8)
    x = torch.randn(batch, 1, n_embd, device=dev, dtype=dt)  # the same on every rank (same seed): replicated

    @torch.no_grad()
    def step(h):
        for b in blocks:
            h = b(h)
        return h

    eager_out = step(x).clone()  # also creates the NCCL communicator, outside any capture
    graph = tp.DecodeGraph(step, x)
    graph_out = graph(x).clone()
    buf = torch.zeros(batch, n_embd, device=dev, dtype=dt)
    dist.barrier()
    eager = bench.timeit(lambda: step(x), warmup=5, repeats=repeats, device=dev)
    dist.barrier()
    replay = bench.timeit(graph.replay, warmup=5, repeats=repeats, device=dev)  # every rank replays: collective
    dist.barrier()
    ar = bench.timeit(lambda: tp.all_reduce(buf), warmup=5, repeats=repeats, device=dev)
    return dict(rank=rank, world=world, device=bench.device_name(dev), n_layer=n_layer, n_embd=n_embd,
                batch=batch, dtype=dtype, eager_ms=eager.median_ms, graph_ms=replay.median_ms,
                ratio=eager.median_ms / replay.median_ms,
                saved_us_per_layer=(eager.median_ms - replay.median_ms) * 1e3 / n_layer,
                allreduce_ms=ar.median_ms, allreduces_per_step=2 * n_layer,
                graph_vs_eager=_max_diff(graph_out, eager_out))


# --------------------------------------------------------------------------- the benchmark rows


def settings(quick: bool = False) -> dict:
    """Sizes for the backend the ranks will get (NCCL on GPUs or gloo on the CPU)."""
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    if default_backend(2) == "nccl":
        s = dict(d_model=4096, tokens=[1, 8, 64, 512, 4096] if quick else [1, 4, 16, 64, 256, 1024, 4096, 16384],
                 overlap=dict(batch=64, seq=64, n_embd=4096, n_head=32, n_layer=2), repeats=20 if quick else 50,
                 dtype="bfloat16")
    else:
        s = dict(d_model=256, tokens=[1, 16, 256] if quick else [1, 4, 16, 64, 256, 1024],
                 overlap=dict(batch=8, seq=1, n_embd=256, n_head=8, n_layer=2), repeats=5 if quick else 20,
                 dtype="float32")
    s["chunks"] = 2
    s["graph"] = dict(n_layer=8 if quick else 16, n_embd=4096, n_head=32, batches=[1, 8] if quick else [1, 8, 64],
                      repeats=20 if quick else 100)
    return s


def _ranks_rows(s: dict) -> dict:
    """On every rank: comm_vs_compute and overlap_experiment (one launch for both)."""
    return dict(device=bench.device_name(rank_device()), backend=dist.get_backend(),
                comm=comm_vs_compute(s["tokens"], s["d_model"], repeats=s["repeats"], dtype=s["dtype"]),
                overlap=overlap_experiment(chunks=s["chunks"], repeats=s["repeats"], dtype=s["dtype"],
                                           **s["overlap"]))


def _graph_rows(s: dict) -> list[dict]:
    g = s["graph"]
    return [decode_graph_experiment(n_layer=g["n_layer"], n_embd=g["n_embd"], n_head=g["n_head"], batch=b,
                                    repeats=g["repeats"]) for b in g["batches"]]


def ranks_rows(quick: bool = False) -> list[dict]:
    """Rows of kinds "comm_vs_compute" and "overlap" from one 2-rank launch (rank 0's clock)."""
    s = settings(quick)
    r = launch(_ranks_rows, 2, args=(s,), deadline=600)[0]
    where = dict(device=r["device"], backend=r["backend"], world=2)
    rows = []
    for c in r["comm"]:
        rows.append(dict(name=f"MLP shard vs its all-reduce, {c['tokens']} tokens", kind="comm_vs_compute", **where,
                         tokens=c["tokens"], d_model=s["d_model"], message_bytes=c["message_bytes"],
                         median_ms=c["allreduce_ms"], baseline_ms=c["compute_ms"],
                         ratio=c["compute_ms"] / c["allreduce_ms"]))
    o, ms = r["overlap"], r["overlap"]["ms"]
    for variant, label in (("plain", "unchunked forward"), ("sequential", f"{o['chunks']} chunks, waited at once"),
                           ("overlapped", f"{o['chunks']} chunks, async all-reduce overlapped")):
        row = dict(name=f"TP blocks: {label}", kind="overlap", variant=variant, **where, chunks=o["chunks"],
                   allreduces=o["allreduces"] if variant != "plain" else o["allreduces"] // o["chunks"],
                   **s["overlap"], median_ms=ms[variant], baseline_ms=ms["sequential"],
                   ratio=ms["sequential"] / ms[variant], best_ms=o["min_ms"][variant])
        if variant in o["diff"]:  # the chunked runs, against the plain forward
            row["max_diff"] = o["diff"][variant]
        rows.append(row)
    return rows


def graph_rows(quick: bool = False) -> list[dict]:
    """Rows of kind "cuda_graph" (GPU only; [] without CUDA)."""
    if not tp.cuda_graphs_available():
        return []
    s = settings(quick)
    world = max(w for w in (1, 2, 4, 8) if w <= torch.cuda.device_count())
    per_rank = launch(_graph_rows, world, args=(s,), backend="nccl", deadline=600)
    rows = []
    for r in per_rank[0]:
        rows.append(dict(name=f"decode step, batch {r['batch']}: CUDA graph vs eager", kind="cuda_graph",
                         device=r["device"], backend="nccl", world=r["world"], n_layer=r["n_layer"],
                         n_embd=r["n_embd"], batch=r["batch"], dtype=r["dtype"], median_ms=r["graph_ms"],
                         baseline_ms=r["eager_ms"], ratio=r["ratio"], saved_us_per_layer=r["saved_us_per_layer"],
                         allreduce_ms=r["allreduce_ms"], allreduces_per_step=r["allreduces_per_step"],
                         max_diff=r["graph_vs_eager"]))
    return rows


def run(quick: bool = False) -> list[dict]:
    """All of the chapter's benchmarks on the current machine."""
    return ranks_rows(quick) + graph_rows(quick)


__all__ = ["comm_vs_compute", "decode_graph_experiment", "graph_rows", "overlap_experiment", "ranks_rows", "run",
           "settings"]
