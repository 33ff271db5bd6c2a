"""FSDP from collectives: flat-parameter units, all-gather and reshard, reduce-scatter, offload, prefetch.

Y. Zhao, A. Gu, R. Varma et al. "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel",
VLDB 2023, arXiv:2304.11277 (flat parameters, units, prefetching, CPU offload, the rate limiter).
S. Rajbhandari, J. Rasley, O. Ruwase, Y. He. "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", SC 2020, arXiv:1910.02054 (stage 3: shard parameters, gradients and optimizer
state). J. Ren et al. "ZeRO-Offload: Democratizing Billion-Scale Model Training", USENIX ATC 2021,
arXiv:2101.06840 (the optimizer step on the CPU).

FSDP is ZeRO stage 3 (chapter 12, labkit.parallel.zero) run as a pipeline. The model is cut into
units (a TinyGPT: the embeddings, each block, the final norm + head, as offload.tinygpt_layers cuts
it) applied one after the other. Each unit's parameters are concatenated into one flat vector,
padded with zeros to P elements, a multiple of the world size W, and every rank keeps one
contiguous shard of S = P / W elements (chapter 12's layout: zero.FlatBucket, padded_numel,
shard_range): that shard is the only copy of the parameters that persists, and the only one the
optimizer sees. One training step on every rank:

    forward,  unit i = 0 .. n-1:   all-gather the flat parameter (S -> P), compute, free the P buffer
    backward, unit i = n-1 .. 0:   all-gather again, compute the gradients (P elements),
                                   free the P buffer, reduce-scatter the gradient (P -> S, sum / W)
    optimizer step on the shards (S elements per unit, on the CPU with offload)

Reshard = free the gathered buffer's storage (`untyped_storage().resize_(0)`), as FSDP does:
autograd's saved tensors are views of that storage, and the backward all-gather refills the same
storage before the unit's backward reads them. The all-gather sits inside an autograd Function whose
backward is its adjoint, the reduce-scatter (zero's, shared with Zero3Module).

Prefetch depth d: before computing unit k the all-gathers of units k+1 .. k+d are already issued
(`async_op=True`), so they run while unit k computes; in backward the order is reversed. At most
d + 1 gathered units are alive at once (`peak_param_bytes`). The reduce-scatter of unit i runs while
unit i-1's backward computes. CPU offload keeps the shards, their gradients and the optimizer step
on the host: a shard is copied into its slot of the gathered buffer before the all-gather (H2D), the
reduced gradient shard is copied back (D2H). On a machine without a GPU both memories are the same
RAM and a copy is a memcpy; on a GPU it crosses PCIe.

A `Timeline` records wall-clock spans per rank: compute (forward/backward of a unit), waits (the
compute thread blocked on communication: the exposed part), collectives (issue to completion, from
the Work's future), copies and the optimizer step. `simulate_step` is a schedule model of the same
step that the chapter's widget draws, calibrated from recorded timelines (`calibrate`).
"""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from labkit import _checks
from labkit.models.gpt import GPTConfig, TinyGPT
from labkit.parallel.launch import default_backend, rank, rank_device, world_size
from labkit.parallel.offload import lm_loss, tinygpt_layers
from labkit.parallel.zero import FlatBucket, _GatherParams, padded_numel, shard_range, single_process_run

# --------------------------------------------------------------------------- a flat parameter's shards


def shard_flat(flat: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Rank's shard (S,) of a flat vector (numel,), zero-padded at the end: a new tensor."""
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"shard_flat: flat must be a torch.Tensor, got {type(flat).__name__}")
    if flat.dim() != 1:
        raise ValueError(f"shard_flat: flat must be a 1-D tensor, got shape {tuple(flat.shape)}")
    start, stop = shard_range(flat.numel(), world_size, rank)  # the real elements; padding fills up to S
    S = padded_numel(flat.numel(), world_size) // world_size
    return torch.cat([flat[start:stop], flat.new_zeros(S - (stop - start))])  # (S,)


def unshard_flat(shards: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
    """The inverse: concatenate the W shards (S,) in rank order and drop the padding -> (numel,)."""
    shards = list(shards)
    if not all(isinstance(s, torch.Tensor) and s.dim() == 1 for s in shards):
        raise TypeError("unshard_flat: shards must be 1-D tensors, got "
                        f"{[tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__ for s in shards]}")
    if not shards or len({s.numel() for s in shards}) != 1:
        raise ValueError("unshard_flat: shards must be a non-empty list of equal sizes, got sizes "
                         f"{[s.numel() for s in shards]}")
    numel = _checks.integer("unshard_flat", "numel", numel, low=0)
    if padded_numel(numel, len(shards)) != shards[0].numel() * len(shards):
        raise ValueError(f"unshard_flat: {len(shards)} shards of {shards[0].numel()} elements cannot hold "
                         f"numel={numel} (need ceil(numel / W) each)")
    return torch.cat(shards)[:numel]


# --------------------------------------------------------------------------- the schedule


def unit_at(step: int, n_units: int) -> int:
    """The unit computed at compute step `step` of 2 n: forward 0 .. n-1, then backward n-1 .. 0."""
    n_units = _checks.integer("unit_at", "n_units", n_units, low=1)
    step = _checks.integer("unit_at", "step", step, low=0)
    if step >= 2 * n_units:
        raise ValueError(f"unit_at: step must be < 2 * n_units = {2 * n_units}, got {step}")
    return step if step < n_units else 2 * n_units - 1 - step


def _window(n_units: int, depth: int, step: int) -> list[int]:
    """Step `step`'s unit and the next `depth` units of its pass (fewer at the end), nearest first."""
    u = unit_at(step, n_units)
    if step < n_units:  # forward: u, u+1, .., u+depth
        return list(range(u, min(u + depth, n_units - 1) + 1))
    return list(range(u, max(u - depth, 0) - 1, -1))  # backward: u, u-1, .., u-depth


def prefetch_plan(n_units: int, depth: int) -> list[list[int]]:
    """For each of the 2 n compute steps, the units whose all-gather is issued just before it: those
    of the step's window (its unit and the next `depth` of the pass) not issued yet in this pass.
    Each unit is gathered once per pass (twice a step: backward starts again from the last unit)."""
    n_units = _checks.integer("prefetch_plan", "n_units", n_units, low=1)
    depth = _checks.integer("prefetch_plan", "depth", depth, low=0)
    plan: list[list[int]] = []
    issued: set[int] = set()
    for step in range(2 * n_units):
        if step == n_units:  # backward starts: every unit is gathered again
            issued = set()
        plan.append([v for v in _window(n_units, depth, step) if v not in issued])
        issued.update(plan[-1])
    return plan


def resident_units(n_units: int, depth: int, step: int) -> list[int]:
    """Units whose gathered buffer is alive while compute step `step` runs (ascending)."""
    depth = _checks.integer("resident_units", "depth", depth, low=0)
    return sorted(_window(n_units, depth, step))


def peak_param_bytes(unit_numels: Sequence[int], world_size: int, depth: int, offload: bool = False,
                     bytes_per_param: int = 4) -> int:
    """Peak parameter bytes on one rank's device: its shards (none with offload) + the largest
    window of depth + 1 consecutive gathered (padded) units."""
    owner = "peak_param_bytes"
    numels = [_checks.integer(owner, f"unit_numels[{i}]", n, low=0) for i, n in enumerate(unit_numels)]
    if not numels:
        raise ValueError(f"{owner}: unit_numels must hold at least one unit, got none")
    world_size = _checks.integer(owner, "world_size", world_size, low=1)
    depth = _checks.integer(owner, "depth", depth, low=0)
    bytes_per_param = _checks.integer(owner, "bytes_per_param", bytes_per_param, low=1)
    if not isinstance(offload, bool):
        raise TypeError(f"{owner}: offload must be a bool, got {type(offload).__name__} {offload!r}")
    padded = [padded_numel(n, world_size) for n in numels]
    shards = 0 if offload else sum(padded) // world_size
    window = min(depth + 1, len(padded))
    gathered = max(sum(padded[i:i + window]) for i in range(len(padded) - window + 1))
    return (shards + gathered) * bytes_per_param


# --------------------------------------------------------------------------- the timeline


class Timeline:
    """Wall-clock spans of one rank, in ms since `t0`: {'lane', 'kind', 'label', 'start', 'end', ...}.

    Lanes: "compute" (the main thread: forward/backward compute, waits, copies, optimizer step) and
    "comm" (collectives in flight, issue to completion). Collective completion comes from the
    Work's future, stamped by gloo's communication thread when the data has arrived. Under NCCL a
    future completes when the host may enqueue work that uses the result, not when the GPU is done:
    the comm lane is then only indicative (use torch.profiler on GPUs).
    """

    def __init__(self, rank: int = 0, enabled: bool = True, cuda: bool = False):
        self.rank = rank
        self.enabled = enabled
        self.cuda = cuda  # close spans after the compute stream's work (host times mean GPU times then)
        self.spans: list[dict] = []
        self.t0 = time.perf_counter()

    def reset(self) -> None:
        """Start a new recording at time 0 (call after a barrier so ranks share the origin)."""
        self.spans = []
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    def add(self, kind: str, label: str, start: float, end: float, lane: str = "compute", **extra) -> None:
        if self.enabled:
            self.spans.append(dict(rank=self.rank, lane=lane, kind=kind, label=label, start=start, end=end, **extra))

    @contextmanager
    def span(self, kind: str, label: str, lane: str = "compute", **extra):
        start = self.now()
        try:
            yield
        finally:
            if self.enabled and self.cuda:
                torch.cuda.current_stream().synchronize()
            self.add(kind, label, start, self.now(), lane, **extra)

    def collective(self, kind: str, label: str, issue, **extra) -> "_InFlight":
        """Call `issue()` (an async collective: returns its Work) and track it until it completes.

        The call itself is an 'issue' span on the compute lane: gloo does part of a collective's work
        on the calling thread before it returns (milliseconds for a reduce-scatter here).
        """
        start = self.now()
        work = issue()
        self.add("issue", f"issue {label}", start, self.now(), unit=extra.get("unit"))
        return _InFlight(self, kind, label, work, start, extra)


class _InFlight:
    """An issued collective: `wait()` blocks (recording a wait span) and logs its comm span."""

    def __init__(self, timeline: Timeline, kind: str, label: str, work, issued: float, extra: dict):
        self.timeline, self.kind, self.label, self.work, self.issued, self.extra = \
            timeline, kind, label, work, issued, extra
        self.done_at: float | None = None
        self.waited = False
        self._stamped = threading.Event()
        self._watcher: threading.Thread | None = None
        self._error: BaseException | None = None
        if not timeline.enabled:
            return
        try:
            work.get_future().add_done_callback(self._stamp)
        except RuntimeError:  # gloo's reduce-scatter has no future: a thread waits for it instead
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()

    def _stamp(self, _future=None) -> None:  # runs on the communication (or watcher) thread
        self.done_at = self.timeline.now()
        self._stamped.set()

    def _watch(self) -> None:
        try:
            self.work.wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait() on the main thread
            self._error = exc
        self._stamp()

    def wait(self, label: str) -> None:
        """Block until the collective is done; the blocked time is a 'wait' span on the compute lane."""
        if self.waited:
            return
        self.waited = True
        start = self.timeline.now()
        if self._watcher is not None:
            self._watcher.join()
            if self._error is not None:
                raise self._error
        else:
            self.work.wait()
        if self.timeline.enabled:
            self._stamped.wait(timeout=5.0)
            end = self.timeline.now()
            self.timeline.add("wait", label, start, end, "compute", unit=self.extra.get("unit"))
            self.timeline.add(self.kind, self.label, self.issued, self.done_at if self.done_at is not None else end,
                              "comm", issued=self.issued, **self.extra)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in xs for c, d in ys)


COMPUTE_KINDS = ("forward", "backward")
COMM_KINDS = ("all-gather", "reduce-scatter")
BLOCKED_KINDS = ("wait", "issue")  # the compute lane held up by communication


def timeline_stats(spans: Sequence[dict]) -> dict:
    """Per rank, in ms: step, compute, comm (collectives in flight, union), hidden (in flight while
    compute ran), exposed (the compute lane blocked: waits + issue calls), exposed_gather (the part
    due to all-gathers), gather (all-gathers in flight, union), hidden_gather (all-gathers in flight
    while compute ran), copies, optimizer."""
    out = {}
    for r in sorted({s["rank"] for s in spans}):
        mine = [s for s in spans if s["rank"] == r]

        def intervals(kinds):
            return _union([(s["start"], s["end"]) for s in mine if s["kind"] in kinds])

        def total(kinds):
            return sum(b - a for a, b in intervals(kinds))

        comm, gather, compute = intervals(COMM_KINDS), intervals(("all-gather",)), intervals(COMPUTE_KINDS)
        gather_blocked = sum(s["end"] - s["start"] for s in mine
                             if s["kind"] in BLOCKED_KINDS and s["label"].split()[-1].startswith("AG"))
        out[r] = dict(step_ms=max(s["end"] for s in mine) - min(s["start"] for s in mine),
                      compute_ms=total(COMPUTE_KINDS), comm_ms=total(COMM_KINDS), hidden_ms=_overlap(comm, compute),
                      exposed_ms=total(BLOCKED_KINDS), exposed_gather_ms=gather_blocked,
                      gather_ms=total(("all-gather",)), hidden_gather_ms=_overlap(gather, compute),
                      copy_ms=total(("copy H2D", "copy D2H")),
                      optimizer_ms=total(("optimizer",)))
    return out


# --------------------------------------------------------------------------- the FSDP engine


class _Unit:
    """One unit: its module, the flat layout of its parameters (P padded elements, this rank's S of them),
    this rank's shard and the gathered buffer."""

    def __init__(self, module: nn.Module, prefix: str, world: int, r: int, device: torch.device, offload: bool):
        named = [(n, p) for n, p in module.named_parameters()]
        if not named:
            raise ValueError(f"FSDP: unit {prefix or type(module).__name__!r} has no parameters")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"FSDP: a unit's parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.module, self.prefix = module, prefix
        self.names = [n for n, _ in named]
        self.bucket = FlatBucket([p for _, p in named], world, r)  # offsets, shapes; padded = P, shard_numel = S
        flat = self.bucket.flatten([p.detach() for _, p in named])  # (P,)
        home = torch.device("cpu") if offload else device
        shard = self.bucket.local(flat).to(home, copy=True)  # (S,)
        if offload and device.type == "cuda":
            shard = shard.pin_memory()
        self.shard = nn.Parameter(shard)  # the persistent, optimized copy
        self.full = torch.empty(self.bucket.padded, dtype=shard.dtype, device=device)  # gathered (P,), storage freed
        self.full.untyped_storage().resize_(0)
        for _, p in named:  # drop the unsharded originals: the module is called with views of `full`
            p.data = torch.empty(0, dtype=p.dtype, device=device)
        module.to(device)  # its buffers (e.g. rotary tables) to the compute device

    @property
    def nbytes(self) -> int:
        return self.bucket.padded * self.full.element_size()

    def views(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter name -> a view of the gathered flat parameter (P,) with the parameter's shape."""
        return dict(zip(self.names, self.bucket.views(full)))


class FSDP:
    """Fully sharded data parallel over units applied in sequence: x -> units[n-1](... units[0](x)).

    units     modules, or (prefix, module) pairs (prefix + parameter name = the full name)
    depth     prefetch depth: all-gathers issued this many units ahead (0: gather just in time)
    offload   keep shards, gradient shards and the optimizer step on the CPU
    timeline  a Timeline to record into (None: a disabled one)

    Use: `out = fsdp.forward(x)`, `fsdp.backward(loss)`, then step an optimizer over
    `fsdp.parameters()` (the flat shards, one per unit). `memory` counts the parameter and
    gathered-gradient bytes on the device (current and peak since the last forward); `issue_log`
    lists (compute step, unit) for every all-gather issued.
    """

    def __init__(self, units: Sequence, *, depth: int = 1, offload: bool = False, timeline: Timeline | None = None,
                 device: torch.device | None = None):
        self.depth = _checks.integer("FSDP", "depth", depth, low=0)
        if not isinstance(offload, bool):
            raise TypeError(f"FSDP: offload must be a bool, got {type(offload).__name__} {offload!r}")
        pairs = [u if isinstance(u, tuple) else ("", u) for u in units]
        if not pairs or not all(isinstance(m, nn.Module) for _, m in pairs):
            raise TypeError("FSDP: units must be a non-empty list of nn.Module or (prefix, nn.Module) pairs")
        seen: dict[int, str] = {}
        for i, (prefix, m) in enumerate(pairs):
            for n, p in m.named_parameters():
                if id(p) in seen:
                    raise ValueError(f"FSDP: parameter {prefix + n!r} of unit {i} is also {seen[id(p)]!r} of another "
                                     "unit; a parameter must belong to one unit (untie shared weights)")
                seen[id(p)] = prefix + n
        if not dist.is_initialized():
            raise RuntimeError("FSDP: needs a process group (run it on ranks, e.g. labkit.parallel.launch.launch)")
        self.rank, self.world = rank(), world_size()
        self.device = device or rank_device()
        self.offload = offload
        self.timeline = timeline or Timeline(self.rank, enabled=False)
        self.units = [_Unit(m, prefix, self.world, self.rank, self.device, offload) for prefix, m in pairs]
        self.n = len(self.units)
        self.plan = prefetch_plan(self.n, self.depth)
        self.issue_log: list[tuple[int, int]] = []  # (compute step, unit) in the order gathers were issued
        self._gathers: dict[int, _InFlight] = {}
        self._pending_rs: tuple | None = None
        self._bwd_start: dict[int, float] = {}
        self.memory = dict(param=0, param_peak=0, grad=0, grad_peak=0)
        self.memory["param"] = 0 if offload else sum(u.shard.numel() * u.shard.element_size() for u in self.units)
        self.memory["param_peak"] = self.memory["param"]

    # -- public ----------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """The flat shards (S,) of every unit: what an optimizer steps."""
        return [u.shard for u in self.units]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the units in order, gathering each one's parameters (with prefetch) and freeing them after."""
        self.memory["param_peak"] = self.memory["param"]
        self.memory["grad_peak"] = self.memory["grad"]
        self._gathers.clear()
        for i, unit in enumerate(self.units):
            self._before_compute(i)
            with self.timeline.span("forward", f"F{i}", unit=i):
                full = _GatherParams.apply(unit.shard, self, i)  # (P,)
                x = torch.func.functional_call(unit.module, unit.views(full), (x,))
            self._reshard(i)
            if x.requires_grad:
                x.register_hook(lambda grad, i=i: self._pre_backward(i))
        return x

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward() through the units, then wait for the last reduce-scatter."""
        loss.backward()
        self._finish_pending_reduce_scatter()

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter, gathered (on every rank), under its full name; padding dropped."""
        out = {}
        for u in self.units:
            full = torch.empty(u.bucket.padded, dtype=u.shard.dtype, device=self.device)
            dist.all_gather_into_tensor(full, u.shard.detach().to(self.device))
            for name, view in u.views(full).items():
                out[u.prefix + name] = view.detach().cpu().clone()
        return out

    # -- the schedule ----------------------------------------------------------------

    def _before_compute(self, step: int) -> None:
        """Issue the gathers the plan puts before this compute step, then wait for this step's unit."""
        for u in self.plan[step]:
            self._issue_gather(step, u)
        u = unit_at(step, self.n)
        self._gathers.pop(u).wait(f"wait AG{u}")

    def _issue_gather(self, step: int, i: int) -> None:
        unit = self.units[i]
        unit.full.untyped_storage().resize_(unit.nbytes)  # allocate the gathered buffer (P,)
        self._count("param", unit.nbytes)
        slot = unit.bucket.local(unit.full.data)  # (S,): this rank's part
        if self.offload:
            with self.timeline.span("copy H2D", f"H2D{i}", unit=i):
                slot.copy_(unit.shard.detach(), non_blocking=True)
            source = slot  # an in-place all-gather: the input is the output's own slot
        else:
            source = unit.shard.detach()
        self._gathers[i] = self.timeline.collective(
            "all-gather", f"AG{i}", lambda: dist.all_gather_into_tensor(unit.full.data, source, async_op=True),
            unit=i, step=step)
        self.issue_log.append((step, i))

    def _unshard(self, i: int) -> torch.Tensor:
        """_GatherParams' forward: unit i's gathered flat parameter (P,), its all-gather already waited for
        (_before_compute). `.data`: an alias of the gathered storage with its own version counter, so
        refilling the storage before backward does not look like an in-place change of a saved tensor."""
        return self.units[i].full.data

    def _reshard(self, i: int) -> None:
        unit = self.units[i]
        unit.full.untyped_storage().resize_(0)  # saved views keep the (now empty) storage
        self._count("param", -unit.nbytes)

    def _pre_backward(self, i: int) -> None:
        """Hook on unit i's output: its gradient is ready, unit i's backward comes next."""
        self._before_compute(2 * self.n - 1 - i)
        self._bwd_start[i] = self.timeline.now()

    def _reduce_grad(self, i: int, grad_full: torch.Tensor) -> None:
        """_GatherParams' backward, once unit i's backward is done: free its parameters and reduce-scatter
        its gradient (async). The shard's gradient arrives in _finish_pending_reduce_scatter, not through
        autograd (hence None)."""
        self.timeline.add("backward", f"B{i}", self._bwd_start.pop(i), self.timeline.now(), unit=i)
        self._reshard(i)
        self._finish_pending_reduce_scatter()  # at most one in flight: the previous unit's
        unit = self.units[i]
        grad_full = grad_full.contiguous()  # (P,)
        grad_shard = torch.empty(unit.bucket.shard_numel, dtype=grad_full.dtype, device=self.device)  # (S,)
        self._count("grad", unit.nbytes)
        flight = self.timeline.collective(  # sum over ranks
            "reduce-scatter", f"RS{i}", lambda: dist.reduce_scatter_tensor(grad_shard, grad_full, async_op=True),
            unit=i)
        self._pending_rs = (i, flight, grad_full, grad_shard)

    def _finish_pending_reduce_scatter(self) -> None:
        if self._pending_rs is None:
            return
        i, flight, grad_full, grad_shard = self._pending_rs
        self._pending_rs = None
        flight.wait(f"wait RS{i}")
        del grad_full
        self._count("grad", -self.units[i].nbytes)
        grad_shard.div_(self.world)  # the mean over ranks of the local-mean-loss gradients
        unit = self.units[i]
        shard = unit.shard
        if self.offload:
            with self.timeline.span("copy D2H", f"D2H{i}", unit=i):
                host = torch.empty(grad_shard.shape, dtype=grad_shard.dtype, pin_memory=grad_shard.is_cuda)  # (S,) CPU
                grad_shard = host.copy_(grad_shard)
        shard.grad = grad_shard if shard.grad is None else shard.grad + grad_shard

    def _count(self, kind: str, nbytes: int) -> None:
        self.memory[kind] += nbytes
        self.memory[f"{kind}_peak"] = max(self.memory[f"{kind}_peak"], self.memory[kind])


# --------------------------------------------------------------------------- TinyGPT as units


def gpt_units(model: TinyGPT) -> list[tuple[str, nn.Module]]:
    """A TinyGPT (untied) as FSDP units, (prefix, module) pairs: embeddings, one unit per block, final
    norm + head, cut as chapter 12's offload.tinygpt_layers cuts it (the loss is its lm_loss)."""
    parts = tinygpt_layers(model)
    return list(zip(parts["prefixes"], parts["layers"]))


def unit_numels(units: Sequence) -> list[int]:
    """Parameters per unit (modules or (prefix, module) pairs), before padding."""
    return [sum(p.numel() for p in (u[1] if isinstance(u, tuple) else u).parameters()) for u in units]


# --------------------------------------------------------------------------- runs (single process and ranks)


@dataclass(frozen=True)
class Setup:
    """A small training run: model size, per-rank batch, steps, AdamW settings, seed."""

    n_layer: int = 2
    n_embd: int = 32
    n_head: int = 2
    vocab_size: int = 31
    block_size: int = 16
    bias: bool = False
    batch: int = 4  # sequences per rank and step
    steps: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 0

    def config(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_embd=self.n_embd, n_head=self.n_head, bias=self.bias, tie_embeddings=False)


def sized_setup(world_size: int, steps: int = 4, backend: str | None = None) -> Setup:
    """The chapter's experiment size for where `world_size` ranks run: bigger on GPUs (backend "nccl",
    one GPU per rank), small on CPU cores ("gloo"); None: launch's default for this machine."""
    world_size = _checks.integer("sized_setup", "world_size", world_size, low=1)
    steps = _checks.integer("sized_setup", "steps", steps, low=1)
    backend = _checks.choice("sized_setup", "backend", backend or default_backend(world_size), ("gloo", "nccl"))
    if backend == "nccl":
        return Setup(n_layer=8, n_embd=1024, n_head=16, vocab_size=256, block_size=512, batch=8, steps=steps)
    return Setup(n_layer=4, n_embd=128, n_head=4, vocab_size=65, block_size=64, batch=8, steps=steps)


def make_model(setup: Setup) -> TinyGPT:
    """The same initial TinyGPT on every rank and in the single-process reference."""
    torch.manual_seed(setup.seed)
    return TinyGPT(setup.config())


def global_batch(setup: Setup, step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s inputs and targets for all ranks: (world * batch, block_size) each."""
    g = torch.Generator().manual_seed(setup.seed * 1000 + step)
    data = torch.randint(0, setup.vocab_size, (world * setup.batch, setup.block_size + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _adamw(params, setup: Setup) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=setup.lr, weight_decay=setup.weight_decay, foreach=False)


def reference_run(setup: Setup, world: int, device: torch.device | str = "cpu") -> dict:
    """One process, the whole global batch each step (zero.single_process_run): losses and final
    parameters (on the CPU)."""
    model = make_model(setup).to(device)
    batches = (global_batch(setup, step, world) for step in range(setup.steps))
    run = single_process_run(model, _adamw(model.parameters(), setup), batches)
    return dict(losses=run["losses"], params=run["params"][-1])


def _elapsed_ms(t0: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def _mean_over_ranks(value: torch.Tensor) -> float:
    t = value.detach().reshape(1).clone()
    dist.all_reduce(t)
    return t.item() / world_size()


def _local(batch: tuple[torch.Tensor, torch.Tensor], setup: Setup, r: int, device) -> tuple[torch.Tensor, ...]:
    """This rank's slice (batch, block_size) of a global batch."""
    return tuple(t[r * setup.batch:(r + 1) * setup.batch].to(device) for t in batch)


def fsdp_runs(setup: Setup, configs: Sequence[dict] = (dict(depth=1),), record: bool = False,
              params: bool = True) -> list[dict]:
    """On every rank: train one model per configuration (FSDP keyword arguments, e.g. depth=2,
    offload=True) on the same batches. The configurations take turns step by step, so a busy moment
    of a shared machine hits them alike. Per configuration: losses (mean over ranks), gathered
    parameters (params=True; None otherwise: a benchmark-size model is hundreds of MB per rank and
    configuration), each step's gather issue order, memory counters and (record=True) timeline spans."""
    r, world = rank(), world_size()
    runs = []
    for cfg in configs:
        timeline = Timeline(r, enabled=record, cuda=rank_device().type == "cuda")
        fsdp = FSDP(gpt_units(make_model(setup)), timeline=timeline, **cfg)
        runs.append(dict(fsdp=fsdp, opt=_adamw(fsdp.parameters(), setup), losses=[], steps=[], times=[]))
    for step in range(setup.steps):
        batch = global_batch(setup, step, world)
        for run in runs:
            fsdp, opt = run["fsdp"], run["opt"]
            x, y = _local(batch, setup, r, fsdp.device)
            dist.barrier()  # a common time origin for the ranks' timelines
            t0 = time.perf_counter()
            fsdp.timeline.reset()
            fsdp.issue_log = []
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(fsdp.forward(x), y)
            fsdp.backward(loss)
            with fsdp.timeline.span("optimizer", "step"):
                opt.step()
            run["times"].append(_elapsed_ms(t0, fsdp.device))
            run["steps"].append(dict(spans=fsdp.timeline.spans, issue_log=fsdp.issue_log, memory=dict(fsdp.memory)))
            run["losses"].append(_mean_over_ranks(loss))
    out = []
    for run in runs:
        fsdp = run["fsdp"]
        out.append(dict(rank=r, world=world, depth=fsdp.depth, offload=fsdp.offload, losses=run["losses"],
                        times=run["times"], params=fsdp.full_state_dict() if params else None, steps=run["steps"],
                        unit_numels=[u.bucket.numel for u in fsdp.units],
                        shard_device=str(fsdp.units[0].shard.device), grad_device=str(fsdp.units[0].shard.grad.device)))
    return out


def fsdp2_run(setup: Setup, params: bool = True) -> dict:
    """On every rank: the same training with PyTorch's FSDP2 (`fully_shard` on each block and the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    r, world = rank(), world_size()
    dev = rank_device()
    model = make_model(setup).to(dev)
    mesh = init_device_mesh(dev.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _adamw(model.parameters(), setup)
    losses, times = [], []
    for step in range(setup.steps):
        x, y = _local(global_batch(setup, step, world), setup, r, dev)
        dist.barrier()
        t0 = time.perf_counter()
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(_elapsed_ms(t0, dev))
        losses.append(_mean_over_ranks(loss))
    full = {n: p.full_tensor().detach().cpu().clone() for n, p in model.named_parameters()} if params else None
    return dict(losses=losses, times=times, params=full)


def rank_runs(setup: Setup, configs: Sequence[dict] = (dict(depth=1),), fsdp2: bool = True,
              record: bool = False, params: bool = True) -> dict:
    """One launch's worth: fsdp_runs over `configs`, then FSDP2 on the same data (if asked)."""
    return dict(runs=fsdp_runs(setup, configs, record, params), fsdp2=fsdp2_run(setup, params) if fsdp2 else None)


# --------------------------------------------------------------------------- a schedule model


@dataclass(frozen=True)
class Calibration:
    """Per-unit times (ms) of one training step: compute, collectives (the time on the wire after the
    call returned, and the call itself), copies, and the optimizer step (on the device / on the CPU)."""

    forward_ms: tuple[float, ...]
    backward_ms: tuple[float, ...]
    gather_ms: tuple[float, ...]
    scatter_ms: tuple[float, ...]
    gather_issue_ms: tuple[float, ...]
    scatter_issue_ms: tuple[float, ...]
    h2d_ms: tuple[float, ...]
    d2h_ms: tuple[float, ...]
    optimizer_ms: float = 0.0
    offload_optimizer_ms: float = 0.0
    overhead_ms: float = 0.0  # per compute step, outside every span: Python, autograd, hooks, the loss

    def __post_init__(self):
        n = len(self.forward_ms)
        if n == 0:
            raise ValueError("Calibration: forward_ms must hold one time per unit, got none")
        for name in ("backward_ms", "gather_ms", "scatter_ms", "gather_issue_ms", "scatter_issue_ms", "h2d_ms",
                     "d2h_ms"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Calibration: {name} must hold one time per unit, {n} like forward_ms, "
                                 f"got {len(getattr(self, name))}")

    def scaled(self, comm: float = 1.0, copy: float = 1.0) -> "Calibration":
        """The same step with collectives `comm` times and host-device copies `copy` times slower."""
        comm = _checks.number("Calibration.scaled", "comm", comm, low=0.0)
        copy = _checks.number("Calibration.scaled", "copy", copy, low=0.0)
        times = lambda xs, f: tuple(x * f for x in xs)  # noqa: E731
        return replace(self, gather_ms=times(self.gather_ms, comm), scatter_ms=times(self.scatter_ms, comm),
                       h2d_ms=times(self.h2d_ms, copy), d2h_ms=times(self.d2h_ms, copy))


def calibrate(steps: Sequence[Sequence[dict]], offload_steps: Sequence[Sequence[dict]] = ()) -> Calibration:
    """Median per-unit times from recorded steps: `steps` without offload (depth 0 is best: nothing
    overlaps a collective), `offload_steps` with it (for the copies and the CPU optimizer step).
    A step is one rank's spans, e.g. `fsdp_run(..., record=True)['steps'][k]['spans']`."""
    if not steps:
        raise ValueError("calibrate: steps must hold at least one recorded step, got none")

    def med(recorded, kind, label_prefix=""):
        values: dict = {}
        for spans in recorded:
            for s in spans:
                if s["kind"] == kind and s["label"].startswith(label_prefix):
                    values.setdefault(s.get("unit"), []).append(s["end"] - s["start"])
        return {k: statistics.median(v) for k, v in values.items()}

    fwd = med(steps, "forward")
    n = len(fwd)

    def per(d):  # per unit 0 .. n-1 (0 where nothing was recorded)
        return tuple(float(d.get(i, 0.0)) for i in range(n))

    def overhead(spans):  # the step's wall time not covered by compute-lane spans, per compute step
        lane = _union([(s["start"], s["end"]) for s in spans if s["lane"] == "compute" and s["kind"] != "other"])
        extent = max(s["end"] for s in spans) - min(s["start"] for s in spans)
        return (extent - sum(b - a for a, b in lane)) / (2 * n)

    ag_issue, rs_issue = per(med(steps, "issue", "issue AG")), per(med(steps, "issue", "issue RS"))
    ag = tuple(max(a - b, 0.0) for a, b in zip(per(med(steps, "all-gather")), ag_issue))
    rs = tuple(max(a - b, 0.0) for a, b in zip(per(med(steps, "reduce-scatter")), rs_issue))
    opt = med(steps, "optimizer").get(None, 0.0)
    return Calibration(per(fwd), per(med(steps, "backward")), ag, rs, ag_issue, rs_issue,
                       per(med(offload_steps, "copy H2D")), per(med(offload_steps, "copy D2H")), opt,
                       med(offload_steps, "optimizer").get(None, opt), statistics.median(map(overhead, steps)))


def simulate_step(cal: Calibration, depth: int, offload: bool = False) -> dict:
    """The step's schedule under a simple model of the engine above: one compute lane (compute,
    copies, collective calls, waits, optimizer, host overhead) and one communication lane that runs
    collectives one at a time in issue order. Gathers follow `prefetch_plan`; a reduce-scatter follows its unit's
    backward after the previous one was waited for. Returns the spans and `timeline_stats` totals."""
    if not isinstance(cal, Calibration):
        raise TypeError(f"simulate_step: cal must be a Calibration, got {type(cal).__name__}")
    depth = _checks.integer("simulate_step", "depth", depth, low=0)
    if not isinstance(offload, bool):
        raise TypeError(f"simulate_step: offload must be a bool, got {type(offload).__name__} {offload!r}")
    n = len(cal.forward_ms)
    spans: list[dict] = []
    t = comm_free = 0.0  # the compute lane's clock; when the communication lane is next free

    def run(kind, label, duration, unit=None):  # on the compute lane
        nonlocal t
        spans.append(dict(rank=0, lane="compute", kind=kind, label=label, start=t, end=t + duration, unit=unit))
        t += duration

    def wait_until(when, label, unit):
        if when > t:
            run("wait", label, when - t, unit)

    def collective(kind, label, issue_ms, wire_ms, unit):
        nonlocal comm_free
        start = max(t, comm_free)  # on the link: from the call (or when the link frees up) to completion
        run("issue", f"issue {label}", issue_ms, unit)
        comm_free = max(t, comm_free) + wire_ms
        spans.append(dict(rank=0, lane="comm", kind=kind, label=label, start=start, end=comm_free, unit=unit))
        return comm_free

    def finish_scatter(pending):
        u, done = pending
        wait_until(done, f"wait RS{u}", u)
        if offload:
            run("copy D2H", f"D2H{u}", cal.d2h_ms[u], u)

    plan, ready, pending = prefetch_plan(n, depth), {}, None
    for step in range(2 * n):
        u = unit_at(step, n)
        run("other", "", cal.overhead_ms)
        for v in plan[step]:
            if offload:
                run("copy H2D", f"H2D{v}", cal.h2d_ms[v], v)
            ready[v] = collective("all-gather", f"AG{v}", cal.gather_issue_ms[v], cal.gather_ms[v], v)
        wait_until(ready.pop(u), f"wait AG{u}", u)
        if step < n:
            run("forward", f"F{u}", cal.forward_ms[u], u)
            continue
        run("backward", f"B{u}", cal.backward_ms[u], u)
        if pending is not None:
            finish_scatter(pending)
        pending = (u, collective("reduce-scatter", f"RS{u}", cal.scatter_issue_ms[u], cal.scatter_ms[u], u))
    finish_scatter(pending)
    run("optimizer", "step", cal.offload_optimizer_ms if offload else cal.optimizer_ms)
    spans = [s for s in spans if s["end"] > s["start"]]
    return dict(spans=spans, **timeline_stats(spans)[0])


__all__ = ["Calibration", "FSDP", "Setup", "Timeline", "calibrate", "fsdp2_run", "fsdp_runs", "global_batch",
           "gpt_units", "make_model", "peak_param_bytes", "prefetch_plan", "rank_runs", "reference_run",
           "resident_units", "shard_flat", "simulate_step", "sized_setup", "timeline_stats", "unit_at",
           "unit_numels", "unshard_flat"]
