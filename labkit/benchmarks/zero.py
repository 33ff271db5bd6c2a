"""Benchmarks of chapter 12-zero, and the experiment its ranks run.

1. kind "stage": one TinyGPT trained on 2 ranks (gloo on a CPU; NCCL when every rank has a GPU)
   with the same global batches at ZeRO stages 0-3, and with torch's ZeroRedundancyOptimizer (the
   production counterpart of stage 1). Each row: median step time (median_ms; baseline_ms is stage
   0's, ratio = baseline / median), model-state bytes per rank measured and as memory_per_rank
   predicts them, elements through the collectives per step measured and as comm_volume predicts,
   the peak of full gradients (stages 0-2) or of gathered parameters (stage 3) a rank held, and the
   largest distance of losses and parameters from a single-process run over all steps.
2. kind "offload": OffloadedModel (ZeRO-Infinity) steps with parameters and optimizer states on each
   tier, with and without prefetch, against the same model trained in memory (baseline_ms): bytes
   read and written per step, peak device-resident parameter bytes, distance to the in-memory run.
3. kind "bandwidth": this machine's disk write and read (page cache dropped), host copy and, on a
   GPU, host <-> device bandwidth; median_ms is the time to move nbytes, baseline_ms that of the host
   copy (ratio = bandwidth / host-copy bandwidth).

`train_stages` is the function the ranks run (launch imports it by name); the chapter calls it too.
`train_deepspeed` runs the same training through DeepSpeed's engine (`deepspeed.initialize` at ZeRO
stages 1-3; the chapter compares 2 and 3), for the chapter's side by side when DeepSpeed is installed
(`DS_BUILD_OPS=0 pip install deepspeed`: no prebuilt ops; on a CPU its first run JIT-compiles one
communication op, ~40 s). DeepSpeed is imported inside the ranks only, never with this module.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from labkit import _checks, bench, datasets, runtime
from labkit.benchmarks import char_gpt
from labkit.models import TinyGPT
from labkit.optim import memory
from labkit.parallel import offload as off
from labkit.parallel import zero
from labkit.parallel.launch import default_backend, launch, rank_device

MODES = (0, 1, 2, 3, "torch_zero1")


def settings(quick: bool = False) -> dict:
    """Model and run sizes for the current profile."""
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    if runtime.on_gpu():
        return dict(model=dict(n_layer=4, n_embd=256, n_head=4, block_size=128), batch=16, steps=10 if quick else 20,
                    bucket_numel=2**18, world_size=2,
                    offload_model=dict(n_layer=8, n_embd=1024, n_head=16, block_size=256), offload_batch=8,
                    offload_steps=3 if quick else 6, bandwidth_bytes=256 << 20)
    return dict(model=dict(n_layer=2, n_embd=32, n_head=2, block_size=32), batch=8, steps=5 if quick else 20,
                bucket_numel=2**12, world_size=2,
                offload_model=dict(n_layer=3, n_embd=128, n_head=4, block_size=64), offload_batch=8,
                offload_steps=3 if quick else 6, bandwidth_bytes=16 << 20 if quick else 64 << 20)


def make_model(model: dict, seed: int = 0, *, tie_embeddings: bool = True) -> TinyGPT:
    """A seeded TinyGPT over the char vocabulary (the same weights on every rank)."""
    return char_gpt(seed=seed, tie_embeddings=tie_embeddings, **model)


def global_batches(steps: int, batch: int, block_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `steps` global batches (batch, block_size) of the char corpus, wherever they are made."""
    stream = datasets.batches(datasets.token_dataset("char"), batch, block_size, seed=seed)
    return [next(stream) for _ in range(steps)]


@contextmanager
def _one_thread():
    """One intra-op thread inside the block. A CPU matmul's rounding depends on how many threads split it:
    the ranks and the single-process reference both compute with one, so that they agree bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])


def _storage_bytes(tensors) -> int:
    """Bytes of the storages behind the tensors, each storage once (views of one flat buffer share it)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def reference_run(model: dict, steps: int, batch: int, lr: float = 1e-2, seed: int = 0, world_size: int = 1,
                  device: torch.device | str = "cpu") -> dict:
    """zero.single_process_run with plain torch.optim.AdamW, each global batch as `world_size` equal slices:
    the sum data parallelism computes, in the same order, so with 2 ranks on the same kind of device the
    ranks match it bit for bit. Returns the losses and flat parameters (on the CPU) per step."""
    m = make_model(model, seed).to(device)
    with _one_thread():
        run = zero.single_process_run(m, torch.optim.AdamW(m.parameters(), lr=lr),
                                      global_batches(steps, batch, model["block_size"], seed), micro=world_size)
    return dict(losses=run["losses"], params=[_flat(p.values()) for p in run["params"]], num_params=m.num_params())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_stages(modes=MODES, model: dict | None = None, steps: int = 20, batch: int = 8, lr: float = 1e-2,
                 seed: int = 0, bucket_numel: int = zero.DEFAULT_BUCKET_NUMEL, keep_params: bool = True) -> dict:
    """Run on every rank: train a TinyGPT `steps` steps per mode (a ZeRO stage, or "torch_zero1" for
    ZeroRedundancyOptimizer), each rank on its slice of the same global batches.

    Returns mode -> {losses (global mean per step), params (flat, per step, if keep_params), step_ms,
    bytes (ZeroMemory held after the last optimizer step, gradients not yet zeroed), comm (elements per
    step) and collectives (calls per step), peak_grad_bytes /
    peak_gathered_bytes, num_params, padded_params}."""
    model = model or settings()["model"]
    r, n = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch % n:
        raise ValueError(f"train_stages: batch must be divisible by the world size {n}, got {batch}")
    dev, b = rank_device(), batch // n
    data = global_batches(steps, batch, model["block_size"], seed)
    out = {}
    with _one_thread():
        for mode in modes:
            if mode == "torch_zero1" and not dist.is_initialized():
                continue  # ZeroRedundancyOptimizer needs a process group
            m = make_model(model, seed).to(dev)
            num_params = m.num_params()
            forward, log, wrapper = m, None, None
            if mode == 3:
                forward = wrapper = zero.Zero3Module(m)
                opt = torch.optim.AdamW(wrapper.parameters(), lr=lr)
                log = wrapper.comm
            elif mode == "torch_zero1":
                from torch.distributed.optim import ZeroRedundancyOptimizer

                opt = ZeroRedundancyOptimizer(m.parameters(), torch.optim.AdamW, lr=lr)
            else:
                opt = zero.ZeroOptimizer(m.parameters(), torch.optim.AdamW, mode, lr=lr, bucket_numel=bucket_numel)
                log = opt.comm
            losses, params, times, held = [], [], [], None
            for step, (x, y) in enumerate(data):
                x, y = x[r * b:(r + 1) * b].to(dev), y[r * b:(r + 1) * b].to(dev)
                _sync(dev)
                t0 = time.perf_counter()
                loss = forward(x, y)[1]
                loss.backward()
                if mode == "torch_zero1" and n > 1:  # ZeroRedundancyOptimizer expects averaged gradients (DDP's job)
                    for p in m.parameters():
                        dist.all_reduce(p.grad)
                        p.grad /= n
                opt.step()
                if step == len(data) - 1 and mode != "torch_zero1":  # every model state exists now: measure it
                    held = wrapper.rank_bytes(opt) if wrapper is not None else opt.rank_bytes()
                opt.zero_grad(set_to_none=True)
                _sync(dev)
                times.append((time.perf_counter() - t0) * 1e3)
                mean = loss.detach().clone()
                if n > 1:
                    dist.all_reduce(mean)
                losses.append(mean.item() / n)
                if keep_params:
                    params.append(_flat(wrapper.full_parameters().values() if wrapper else m.parameters()))
            res = dict(losses=losses, params=params, step_ms=statistics.median(times), num_params=num_params)
            if wrapper is not None:
                res.update(bytes=held, padded_params=sum(u.bucket.padded for u in wrapper.units),
                           peak_gathered_bytes=wrapper.peak_gathered_bytes)
            elif mode != "torch_zero1":
                res.update(bytes=held, padded_params=sum(bk.padded for bk in opt.buckets),
                           peak_grad_bytes=opt.peak_grad_bytes)
            if log is not None:
                res.update(comm=log.volume() / steps, collectives=len(log.calls) / steps)
            out[mode] = res
    return out


# --------------------------------------------------------------------------- DeepSpeed, side by side

DEEPSPEED_STAGES = (2, 3)


def deepspeed_available() -> bool:
    """Whether DeepSpeed is installed (looked up without importing it: its import takes seconds)."""
    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_config(stage: int, batch: int, world_size: int, lr: float = 1e-2,
                     bucket_numel: int = zero.DEFAULT_BUCKET_NUMEL) -> dict:
    """The DeepSpeed config of train_stages' run: fp32, torch's AdamW with its default hyperparameters (what
    train_stages uses), one micro-batch of batch / world_size per rank and step, no gradient clipping."""
    owner = "deepspeed_config"
    stage = _checks.choice(owner, "stage", _checks.integer(owner, "stage", stage), zero.STAGES)
    batch = _checks.integer(owner, "batch", batch, low=1)
    world_size = _checks.integer(owner, "world_size", world_size, low=1)
    if batch % world_size:
        raise ValueError(f"{owner}: batch must be divisible by world_size={world_size}, got {batch}")
    zero_cfg = {"stage": stage, "reduce_bucket_size": _checks.integer(owner, "bucket_numel", bucket_numel, low=1)}
    if stage == 3:
        zero_cfg["stage3_param_persistence_threshold"] = 0  # partition every parameter (DeepSpeed keeps < 1e5 whole)
    return {
        "train_batch_size": batch,  # global batch = micro-batch x accumulation steps x ranks
        "train_micro_batch_size_per_gpu": batch // world_size,
        "gradient_accumulation_steps": 1,  # engine.backward divides the loss by it: 1, as in train_stages
        "gradient_clipping": 0.0,  # DeepSpeed clips the gradient norm at 1.0 unless told otherwise
        # no "fp16" / "bf16" section: fp32 weights, gradients and states, and no loss scaling
        "optimizer": {"type": "AdamW", "params": {
            "lr": _checks.number(owner, "lr", lr, low=0.0, low_open=True), "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": 0.01,
            "torch_adam": True}},  # torch.optim.AdamW: no fused or CPU Adam op is built (DS_BUILD_OPS=0)
        "zero_optimization": zero_cfg,
        "steps_per_print": 10**9,  # no progress lines in the ranks' logs
    }


def train_deepspeed(stages=DEEPSPEED_STAGES, model: dict | None = None, steps: int = 20, batch: int = 8,
                    lr: float = 1e-2, seed: int = 0, bucket_numel: int = zero.DEFAULT_BUCKET_NUMEL,
                    keep_params: bool = True) -> dict:
    """Run on every rank (through launch): train_stages' run, the same TinyGPT on the same slices of the same
    global batches, through `deepspeed.initialize` at each ZeRO stage in `stages` (config: deepspeed_config).

    Returns stage -> {losses (global mean per step), params (flat, per step, gathered at stage 3, if
    keep_params), step_ms, num_params, partition_numel (elements of the partition this rank's optimizer steps,
    DeepSpeed's padding included), param_bytes (the parameter storage the rank holds: all of it at stages 1-2,
    its slices at stage 3), optimizer_bytes (its Adam moments), master_bytes (an fp32 copy of the partition
    kept besides the parameters; 0 where the optimizer steps the parameters' own storage)}."""
    owner = "train_deepspeed"
    stages = [_checks.choice(owner, "stage", _checks.integer(owner, "stage", s), (1, 2, 3)) for s in stages]
    if not dist.is_initialized():
        raise RuntimeError(f"{owner}: run it on ranks, e.g. launch({owner}, 2, kwargs=...)")
    model = model or settings()["model"]
    r, n = dist.get_rank(), dist.get_world_size()
    configs = {stage: deepspeed_config(stage, batch, n, lr, bucket_numel) for stage in stages}
    dev, b = rank_device(), batch // n
    os.environ["DS_ACCELERATOR"] = dev.type  # DeepSpeed computes where the rank does ("cpu" or "cuda")
    import deepspeed  # here, not at the top: DeepSpeed is optional

    data = global_batches(steps, batch, model["block_size"], seed)
    out = {}
    with _one_thread():
        for stage in stages:
            m = make_model(model, seed).to(dev)
            num_params = m.num_params()  # before DeepSpeed partitions the parameters (stage 3)
            engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=configs[stage])
            losses, params, times = [], [], []
            for x, y in data:
                x, y = x[r * b:(r + 1) * b].to(dev), y[r * b:(r + 1) * b].to(dev)
                _sync(dev)
                t0 = time.perf_counter()
                loss = engine(x, y)[1]
                engine.backward(loss)
                engine.step()  # step this rank's partition (stages 1-2: then all-gather the parameters)
                _sync(dev)
                times.append((time.perf_counter() - t0) * 1e3)
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                losses.append(mean.item() / n)
                if keep_params:
                    ps = list(engine.module.parameters())
                    if stage == 3:  # each rank holds a slice of every parameter: gather them (on every rank)
                        with deepspeed.zero.GatheredParameters(ps):
                            params.append(_flat(ps))
                    else:
                        params.append(_flat(ps))
            inner = engine.optimizer.optimizer  # the torch.optim.AdamW inside DeepSpeed's ZeRO optimizer
            masters = list(inner.state)  # the fp32 partitions it steps (its state is keyed by them)
            held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]  # stage 3: this rank's slices
            own = {t.untyped_storage().data_ptr() for t in held}
            out[stage] = dict(losses=losses, params=params, step_ms=statistics.median(times), num_params=num_params,
                              partition_numel=sum(t.numel() for t in masters),
                              param_bytes=_storage_bytes(held), optimizer_bytes=memory.state_bytes(inner),
                              master_bytes=sum(t.numel() * t.element_size() for t in masters
                                               if t.untyped_storage().data_ptr() not in own))
            engine.destroy()
    return out


def stage_rows(quick: bool = False) -> list[dict]:
    """kind "stage": ZeRO stages 0-3 and ZeroRedundancyOptimizer on s["world_size"] ranks, side by side."""
    s = settings(quick)
    n = s["world_size"]
    backend = default_backend(n)  # NCCL with a GPU per rank, else gloo on the CPU
    results = launch(train_stages, n, kwargs=dict(model=s["model"], steps=s["steps"], batch=s["batch"],
                                                  bucket_numel=s["bucket_numel"]), backend=backend,
                     timeout=120, deadline=600)
    ref = reference_run(s["model"], s["steps"], s["batch"], world_size=n,
                        device="cuda" if backend == "nccl" else "cpu")  # the ranks' kind of device
    mine = results[0]
    device = f"{n} ranks, {'NCCL' if backend == 'nccl' else 'gloo on CPU'}"
    rows = []
    for mode in [m for m in MODES if m in mine]:
        r = mine[mode]
        row = {"name": f"stage {mode}" if mode != "torch_zero1" else "torch ZeroRedundancyOptimizer",
               "kind": "stage", "stage": mode if mode != "torch_zero1" else 1, "device": device,
               "params": ref["num_params"], "median_ms": r["step_ms"], "baseline_ms": mine[0]["step_ms"],
               "ratio": mine[0]["step_ms"] / r["step_ms"], "collectives_per_step": r.get("collectives"),
               "max_loss_diff": max(abs(a - c) for a, c in zip(r["losses"], ref["losses"])),
               "max_param_diff": max((p - q).abs().max().item() for p, q in zip(r["params"], ref["params"]))}
        if "bytes" in r:
            pred = zero.memory_per_rank(r["padded_params"], row["stage"], n, "adam", torch.float32)
            row.update(bytes_per_rank=r["bytes"].total, predicted_bytes=pred.total,
                       comm_per_step=r["comm"],
                       predicted_comm=zero.comm_volume(r["padded_params"], row["stage"]) if n > 1 else 0.0,
                       peak_full_bytes=r.get("peak_grad_bytes", r.get("peak_gathered_bytes")))
        rows.append(row)
    return rows


def offload_rows(quick: bool = False) -> list[dict]:
    """kind "offload": OffloadedModel on each tier combination vs the in-memory run of the same model."""
    s = settings(quick)
    dev = runtime.device()
    data = global_batches(s["offload_steps"] + 1, s["offload_batch"], s["offload_model"]["block_size"], seed=1)
    base = make_model(s["offload_model"], 0, tie_embeddings=False)
    plans = [("gpu", "gpu", True), ("gpu", "cpu", True), ("cpu", "cpu", True), ("cpu", "cpu", False),
             ("nvme", "nvme", True), ("nvme", "nvme", False)]
    runs = {}
    for param_tier, opt_tier, prefetch in plans:
        with off.OffloadedModel(**off.tinygpt_layers(copy.deepcopy(base)), param_tier=param_tier,
                                optimizer_tier=opt_tier, prefetch=prefetch, evict_files=True, device=dev,
                                lr=1e-3) as om:
            om.step(*data[0])  # warm-up (and the optimizer states get created)
            read0, written0 = om.io.bytes_read, om.io.bytes_written
            times, losses = [], []
            for x, y in data[1:]:
                t0 = time.perf_counter()
                losses.append(om.step(x, y))
                times.append((time.perf_counter() - t0) * 1e3)
            runs[(param_tier, opt_tier, prefetch)] = dict(
                ms=statistics.median(times), losses=losses, peak=om.peak_resident_bytes,
                read=(om.io.bytes_read - read0) / len(times), written=(om.io.bytes_written - written0) / len(times),
                params=_flat(om.full_parameters().values()))
    baseline = runs[plans[0]]
    device = bench.device_name()
    rows = []
    for (param_tier, opt_tier, prefetch), r in runs.items():
        rows.append({"name": f"params:{param_tier} states:{opt_tier}{' prefetch' if prefetch else ''}",
                     "kind": "offload", "device": device, "param_tier": param_tier, "optimizer_tier": opt_tier,
                     "prefetch": prefetch, "params": base.num_params(), "median_ms": r["ms"],
                     "baseline_ms": baseline["ms"], "ratio": baseline["ms"] / r["ms"],
                     "read_mb_per_step": r["read"] / 1e6, "written_mb_per_step": r["written"] / 1e6,
                     "peak_resident_mb": r["peak"] / 1e6,
                     "max_loss_diff": max(abs(a - c) for a, c in zip(r["losses"], baseline["losses"])),
                     "max_param_diff": (r["params"] - baseline["params"]).abs().max().item()})
    return rows


def bandwidth_rows(quick: bool = False) -> list[dict]:
    """kind "bandwidth": measured GB/s of this machine's tiers."""
    s = settings(quick)
    nbytes = s["bandwidth_bytes"]
    bw = off.measure_bandwidth(nbytes=nbytes, repeats=2 if quick else 3)
    device, base_ms = bench.device_name(), nbytes / bw["host_copy"] * 1e3
    return [{"name": f"bandwidth {k}", "kind": "bandwidth", "device": device, "transfer": k, "gb_per_s": v / 1e9,
             "nbytes": nbytes, "median_ms": nbytes / v * 1e3, "baseline_ms": base_ms, "ratio": v / bw["host_copy"]}
            for k, v in bw.items()]


def run(quick: bool = False) -> list[dict]:
    """All of the chapter's benchmarks on the current machine."""
    return stage_rows(quick) + offload_rows(quick) + bandwidth_rows(quick)


__all__ = ["DEEPSPEED_STAGES", "MODES", "bandwidth_rows", "deepspeed_available", "deepspeed_config", "global_batches",
           "make_model", "offload_rows", "reference_run", "run", "settings", "stage_rows", "train_deepspeed",
           "train_stages"]
