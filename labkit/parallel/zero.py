"""ZeRO stages 1, 2 and 3, written from collectives.

S. Rajbhandari, J. Rasley, O. Ruwase, Y. He, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", SC20 (arXiv:1910.02054).

Plain data parallelism keeps every model state on every rank. For Psi parameters trained with
mixed-precision Adam that is 2 Psi bytes of 16-bit weights, 2 Psi of 16-bit gradients and
K Psi of optimizer states (K = 12: an fp32 master copy, the momentum and the variance). ZeRO
partitions them over the N data-parallel ranks, one more kind per stage:

    stage 0  data parallelism          (2 + 2 + K) Psi            all-reduce of the gradients      2 Psi
    stage 1  P_os   optimizer states   2 Psi + 2 Psi + K Psi / N  reduce-scatter of the gradients
                                                                  + all-gather of the parameters   2 Psi
    stage 2  P_os+g + gradients        2 Psi + (2 + K) Psi / N    the same two collectives          2 Psi
    stage 3  P_os+g+p + parameters     (2 + 2 + K) Psi / N        all-gather in forward, again in
                                                                  backward, reduce-scatter          3 Psi

The paper's example, Psi = 7.5B on N = 64 ranks: 120 GB, 31.4 GB, 16.6 GB and 1.9 GB a rank.
Communication is counted the paper's way, in elements a rank sends (and receives) per step: a
reduce-scatter or an all-gather of a Psi-element buffer is Psi (a ring sends (N-1)/N Psi of it),
an all-reduce is a reduce-scatter followed by an all-gather, 2 Psi. Stages 1 and 2 therefore cost
what data parallelism costs; stage 3 costs 1.5x.

The layout. A bucket of parameters is flattened, in order, into one 1-D buffer padded with zeros to
a multiple of N; rank r owns the contiguous slice [r S, (r+1) S) with S = padded / N (`shard_range`
gives the real elements in it). A parameter may straddle two ranks' slices, which an elementwise
optimizer (SGD, Adam, AdamW, Adagrad, ...) does not notice: every element's update depends on that
element alone. (torch.distributed.optim.ZeroRedundancyOptimizer instead hands whole parameters to
ranks, which suits any optimizer but balances less evenly.) The model's parameters become views
into the flat buffers, so a rank holds each value once.

    ZeroOptimizer(params, optimizer_cls, stage, process_group=None, **kw)    stages 0, 1 and 2
    Zero3Module(module, units=None, process_group=None)                       stage 3: train its
        .parameters() (the shards) with any elementwise optimizer
    single_process_run(model, optimizer, batches, micro=1)                    the one-process run
        every stage must reproduce

Stage 2 reduce-scatters each bucket of gradients from a post-accumulate-grad hook as soon as the
backward pass has produced all of them, and frees the full gradients: only about one bucket of full
gradients exists at a time. Stage 3 all-gathers a unit's parameters (by default each child of every
nn.ModuleList, plus a root unit with the rest) in a forward pre-hook, frees them after the unit's
forward, gathers them again when the backward pass first needs them (a saved-tensors hook stores a
placeholder instead of the weight), and reduce-scatters the unit's gradient when its backward ends.

FSDP (labkit.parallel.fsdp, chapter 13) is stage 3 with prefetching and offload: it reuses this layout
(FlatBucket, padded_numel, shard_range) and stage 3's all-gather / reduce-scatter autograd function.

Everything here trains in the parameters' own dtype (fp32 in the course, for exact parity with a
single process); `memory_per_rank` accounts for either precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from labkit import _checks

STAGES = (0, 1, 2, 3)
# fp32-sized state tensors an optimizer keeps per parameter (its "K" is 4 bytes each, plus a 4-byte
# fp32 master copy when the weights are 16-bit)
STATES_PER_PARAM = {"adam": 2, "adamw": 2, "sgd_momentum": 1, "sgd": 0}
DEFAULT_BUCKET_NUMEL = 2**23  # elements per gradient bucket (8M: 32 MB in fp32, DDP's 25 MB order)

# --------------------------------------------------------------------------- the accounting


def _dtype_bytes(owner: str, dtype) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{owner}: dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype.itemsize


def optimizer_bytes_per_param(optimizer: str = "adam", dtype: torch.dtype = torch.bfloat16) -> int:
    """K, the optimizer-state bytes per parameter. 16-bit weights need an fp32 master copy (4 bytes) and
    fp32 states (4 bytes each): Adam 12 (the paper's K), SGD with momentum 8, plain SGD 4. Weights in
    fp32 (or fp64) are their own master copy and the states take their dtype: Adam in fp32 is 8."""
    owner = "optimizer_bytes_per_param"
    _checks.choice(owner, "optimizer", optimizer, tuple(STATES_PER_PARAM))
    b = _dtype_bytes(owner, dtype)
    if b < 4:
        return 4 + 4 * STATES_PER_PARAM[optimizer]
    return b * STATES_PER_PARAM[optimizer]


@dataclass(frozen=True)
class ZeroMemory:
    """Bytes of model states on one rank."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer

    def parts(self) -> dict[str, float]:
        return {"parameters": self.params, "gradients": self.grads, "optimizer states": self.optimizer}

    def gb(self) -> dict[str, float]:
        """The parts and the total in GB (1e9 bytes, as the paper quotes them)."""
        return {**{k: v / 1e9 for k, v in self.parts().items()}, "total": self.total / 1e9}


def _stage(owner: str, stage, allowed=STAGES) -> int:
    stage = _checks.integer(owner, "stage", stage)
    return _checks.choice(owner, "stage", stage, allowed)


def memory_per_rank(num_params: int, stage: int, world_size: int, optimizer: str = "adam",
                    dtype: torch.dtype = torch.bfloat16) -> ZeroMemory:
    """Model-state bytes per rank at a ZeRO stage (the paper's accounting, activations not included):
    weights b Psi, gradients b Psi, optimizer states K Psi (b = dtype's bytes, K from
    optimizer_bytes_per_param), each divided by N from the stage that partitions it on."""
    owner = "memory_per_rank"
    psi = _checks.integer(owner, "num_params", num_params)
    stage = _stage(owner, stage)
    n = _checks.integer(owner, "world_size", world_size, low=1)
    b = _dtype_bytes(owner, dtype)
    k = optimizer_bytes_per_param(optimizer, dtype)
    return ZeroMemory(params=b * psi / (n if stage >= 3 else 1),
                      grads=b * psi / (n if stage >= 2 else 1),
                      optimizer=k * psi / (n if stage >= 1 else 1))


def comm_volume(num_params: int, stage: int, world_size: int | None = None) -> float:
    """Elements one rank sends per training step (it receives as many). world_size None: the paper's
    round numbers, 2 Psi at stages 0-2 and 3 Psi at stage 3; with world_size N, what ring collectives
    send: (N-1)/N of that (nothing on one rank)."""
    owner = "comm_volume"
    psi = _checks.integer(owner, "num_params", num_params)
    stage = _stage(owner, stage)
    factor = 1.0
    if world_size is not None:
        n = _checks.integer(owner, "world_size", world_size, low=1)
        factor = (n - 1) / n
    return (3 if stage == 3 else 2) * psi * factor


def padded_numel(numel: int, world_size: int) -> int:
    """numel rounded up to a multiple of world_size: the length of the flat buffer."""
    numel = _checks.integer("padded_numel", "numel", numel)
    n = _checks.integer("padded_numel", "world_size", world_size, low=1)
    return -(-numel // n) * n


def shard_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the real elements rank owns in a flat buffer of numel elements padded to a
    multiple of world_size. Every rank's slice has padded_numel / world_size slots; the padding sits at
    the end, so the last ranks may own fewer real elements (or none: start == end)."""
    owner = "shard_range"
    numel = _checks.integer(owner, "numel", numel)
    n = _checks.integer(owner, "world_size", world_size, low=1)
    rank = _checks.integer(owner, "rank", rank)
    if rank >= n:
        raise ValueError(f"{owner}: rank must be in [0, {n - 1}] for world_size={n}, got {rank}")
    size = padded_numel(numel, n) // n
    return min(rank * size, numel), min((rank + 1) * size, numel)


# --------------------------------------------------------------------------- collectives, counted


@dataclass
class CommLog:
    """The collectives one rank issued: (op, elements of the full buffer). volume() counts them the
    paper's way (all-reduce 2x, reduce-scatter and all-gather 1x); sent() what a ring sends."""

    world_size: int
    calls: list[tuple[str, int]] = field(default_factory=list)

    def add(self, op: str, numel: int) -> None:
        if self.world_size > 1:
            self.calls.append((op, int(numel)))

    def volume(self) -> int:
        return sum(2 * n if op == "all_reduce" else n for op, n in self.calls)

    def sent(self) -> float:
        return self.volume() * (self.world_size - 1) / self.world_size

    def by_op(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op, n in self.calls:
            out[op] = out.get(op, 0) + n
        return out

    def clear(self) -> None:
        self.calls.clear()


def _group_info(owner: str, process_group) -> tuple[object, int, int]:
    """(group, world size, rank); without an initialized process group: one rank, no collectives."""
    if process_group is None and not dist.is_initialized():
        return None, 1, 0
    if not dist.is_initialized():
        raise RuntimeError(f"{owner}: process_group given but torch.distributed is not initialized")
    return process_group, dist.get_world_size(process_group), dist.get_rank(process_group)


def _all_gather(full: torch.Tensor, shard: torch.Tensor, group, world_size: int, log: CommLog | None) -> None:
    """full (N S,) <- every rank's shard (S,), in rank order. shard may be full's own slice (in place)."""
    if world_size == 1:
        if full.data_ptr() != shard.data_ptr():
            full.copy_(shard)
        return
    dist.all_gather_into_tensor(full, shard, group=group)
    if log is not None:
        log.add("all_gather", full.numel())


def _gathered(shard: torch.Tensor, padded: int, group, world_size: int, log: CommLog | None = None) -> torch.Tensor:
    """A new (padded,) buffer holding every rank's shard (S,), in rank order."""
    full = torch.empty(padded, dtype=shard.dtype, device=shard.device)
    _all_gather(full, shard.detach().contiguous(), group, world_size, log)
    return full


def _reduce_scatter(shard: torch.Tensor, full: torch.Tensor, group, world_size: int, log: CommLog | None) -> None:
    """shard (S,) <- this rank's slice of the sum over ranks of full (N S,)."""
    if world_size == 1:
        shard.copy_(full)
        return
    dist.reduce_scatter_tensor(shard, full, op=dist.ReduceOp.SUM, group=group)
    if log is not None:
        log.add("reduce_scatter", full.numel())


def _all_reduce(t: torch.Tensor, group, world_size: int, log: CommLog | None) -> None:
    if world_size == 1:
        return
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if log is not None:
        log.add("all_reduce", t.numel())


def _same_on_all_ranks(owner: str, signature, group, world_size: int) -> None:
    """Raise (on every rank) unless every rank built the same parameter layout: a mismatch would make the
    collectives hang or silently mix unrelated numbers."""
    if world_size == 1:
        return
    seen = [None] * world_size
    dist.all_gather_object(seen, signature, group=group)
    odd = [r for r, s in enumerate(seen) if s != seen[0]]
    if odd:
        raise ValueError(f"{owner}: every rank must pass the same parameters (shapes and dtypes, in the same "
                         f"order); ranks {odd} differ from rank 0")


def _storage_bytes(tensors: Iterable) -> int:
    """Bytes of the storages behind the tensors, each storage once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (0-dim step counters left out)."""
    return _storage_bytes(v for st in optimizer.state.values() for v in st.values()
                          if isinstance(v, torch.Tensor) and v.dim() > 0)


# --------------------------------------------------------------------------- the flat buffer


class FlatBucket:
    """The layout of parameters flattened in order into one zero-padded 1-D buffer of `padded` elements;
    the rank owns [start, start + shard_numel). It keeps the shapes, not the tensors (stage 3,
    offload and FSDP free the originals)."""

    def __init__(self, params: list[torch.Tensor], world_size: int, rank: int):
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        self.numel = sum(self.numels)
        self.padded = padded_numel(self.numel, world_size)
        self.shard_numel = self.padded // world_size
        self.start = rank * self.shard_numel
        self.dtype, self.device = params[0].dtype, params[0].device

    def flatten(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """(padded,) buffer holding the tensors one after the other (None: zeros), zero padding at the end."""
        out = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        for t, o, n in zip(tensors, self.offsets, self.numels):
            if t is not None:
                out[o:o + n].copy_(t.reshape(-1))
        return out

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's view into a (padded,) buffer: one split (whose backward is one concatenation)."""
        pieces = flat.split([*self.numels, self.padded - self.numel])  # the last piece: the padding
        return [piece.view(s) for piece, s in zip(pieces, self.shapes)]

    def local(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a (padded,) buffer (a view)."""
        return flat.narrow(0, self.start, self.shard_numel)


def _consolidate(optimizer: torch.optim.Optimizer, placements: dict, gather: Callable) -> dict:
    """The state dict a plain optimizer over the original parameters would have.

    placements: shard parameter -> (bucket, original index of each of the bucket's parameters).
    gather(state_shard, bucket) -> the state's (padded,) buffer. Per-element states (shaped like the
    shard) are gathered and cut into per-parameter tensors; anything else (a step count) is copied."""
    state: dict[int, dict] = {}
    groups = []
    for group in optimizer.param_groups:
        indices = []
        for shard in group["params"]:
            bucket, idx = placements[shard]
            indices += idx
            st = optimizer.state.get(shard, {})
            for key in sorted(st):
                v = st[key]
                if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape == shard.shape:
                    for i, view in zip(idx, bucket.views(gather(v, bucket))):
                        state.setdefault(i, {})[key] = view.clone()
                else:
                    for i in idx:
                        state.setdefault(i, {})[key] = v.clone() if isinstance(v, torch.Tensor) else v
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": sorted(indices)})
    return {"state": dict(sorted(state.items())), "param_groups": groups}


# --------------------------------------------------------------------------- stages 0, 1, 2


class _Bucket(FlatBucket):
    """A bucket of ZeroOptimizer: its parameters (views into `flat`, the (padded,) buffer they live in), the
    slice the inner optimizer steps, the stage-2 gradient slice, and which gradients the backward pass
    delivered."""

    def __init__(self, params: list[torch.Tensor], world_size: int, rank: int):
        super().__init__(params, world_size, rank)
        self.params = list(params)
        self.flat: torch.Tensor | None = None  # (padded,)
        self.shard: nn.Parameter | None = None  # (padded,) at stage 0, else (S,)
        self.grad_shard: torch.Tensor | None = None  # (S,), stage 2
        self.ready: set = set()
        self.reduced = False


def _buckets(params: list[torch.Tensor], bucket_numel: int, world_size: int, rank: int) -> list[_Bucket]:
    """Consecutive parameters, last first (the order backward produces their gradients), in buckets of
    at most bucket_numel elements (a larger parameter gets a bucket of its own)."""
    out, current, size = [], [], 0
    for p in reversed(params):
        if current and size + p.numel() > bucket_numel:
            out.append(_Bucket(current, world_size, rank))
            current, size = [], 0
        current.append(p)
        size += p.numel()
    if current:
        out.append(_Bucket(current, world_size, rank))
    return out


class ZeroOptimizer:
    """ZeRO stages 0-2 around an elementwise torch optimizer class.

    stage 0: all-reduce the gradients, every rank steps everything (plain data parallelism);
    stage 1: reduce-scatter the gradients, each rank steps its slice (its optimizer state is 1/N),
             all-gather the updated parameters;
    stage 2: like stage 1, but each bucket's gradients are reduce-scattered during the backward pass
             and the full gradients freed: the rank keeps only its slice.
    Do not wrap the model in DDP: this class averages the gradients itself. Every rank must pass the
    same parameters, and each parameter must get a gradient on every rank or on none.
    """

    def __init__(self, params, optimizer_cls: type, stage: int = 1, process_group=None, *,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, **defaults):
        owner = "ZeroOptimizer"
        if _checks.integer(owner, "stage", stage) == 3:
            raise ValueError(f"{owner}: stage must be 0, 1 or 2; stage 3 partitions the parameters themselves: "
                             f"wrap the model in Zero3Module and give its .parameters() to a plain optimizer")
        self.stage = _stage(owner, stage, (0, 1, 2))
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"{owner}: optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
        bucket_numel = _checks.integer(owner, "bucket_numel", bucket_numel, low=1)
        self.group, self.world_size, self.rank = _group_info(owner, process_group)
        groups = self._param_groups(owner, params)
        self.params = [p for g in groups for p in g["params"]]
        _same_on_all_ranks(owner, [[(tuple(p.shape), str(p.dtype)) for p in g["params"]] for g in groups],
                           self.group, self.world_size)
        self.comm = CommLog(self.world_size)

        index = {p: i for i, p in enumerate(self.params)}
        self.buckets: list[_Bucket] = []
        self._placements: dict[torch.Tensor, tuple[_Bucket, list[int]]] = {}
        inner_groups = []
        for g in groups:
            shards = []
            for b in _buckets(g["params"], bucket_numel, self.world_size, self.rank):
                b.flat = b.flatten([p.detach() for p in b.params])
                for p, view in zip(b.params, b.views(b.flat)):
                    p.data = view  # the parameter now lives in the flat buffer
                # what the inner optimizer steps: the whole buffer (stage 0) or this rank's slice of it
                b.shard = nn.Parameter(b.flat if self.stage == 0 else b.local(b.flat), requires_grad=False)
                if self.stage == 2:
                    b.grad_shard = torch.zeros(b.shard_numel, dtype=b.dtype, device=b.device)  # (S,)
                self.buckets.append(b)
                self._placements[b.shard] = (b, [index[p] for p in b.params])
                shards.append(b.shard)
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": shards})
        self.optimizer = optimizer_cls(inner_groups, **defaults)

        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._counted: set[torch.Tensor] = set()
        self.live_grad_bytes = self.peak_grad_bytes = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    @staticmethod
    def _param_groups(owner: str, params) -> list[dict]:
        if isinstance(params, torch.Tensor):
            raise TypeError(f"{owner}: params must be an iterable of tensors or of param-group dicts, got a Tensor")
        items = list(params)
        groups = [dict(g) for g in items] if items and isinstance(items[0], dict) else [{"params": items}]
        seen = set()
        for gi, g in enumerate(groups):
            g["params"] = list(g.get("params", ()))
            if not g["params"]:
                raise ValueError(f"{owner}: param group {gi} has no parameters")
            for i, p in enumerate(g["params"]):
                if not isinstance(p, torch.Tensor) or not p.is_floating_point() or not p.is_leaf:
                    raise TypeError(f"{owner}: parameter {i} of param group {gi} must be a floating-point leaf "
                                    f"tensor, got {type(p).__name__}")
                if p in seen:
                    raise ValueError(f"{owner}: parameter {i} of param group {gi} appears twice")
                seen.add(p)
            kinds = {(p.dtype, p.device) for p in g["params"]}
            if len(kinds) > 1:
                raise ValueError(f"{owner}: the parameters of param group {gi} must share one dtype and device "
                                 f"(they are flattened into one buffer), got {sorted(map(str, kinds))}")
        return groups

    # -- the backward pass (stage 2 reduces here) --

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        """Runs after p.grad was accumulated: count it; at stage 2 reduce a bucket once it is complete."""
        if p not in self._counted:
            self._counted.add(p)
            self.live_grad_bytes += p.grad.numel() * p.grad.element_size()
            self.peak_grad_bytes = max(self.peak_grad_bytes, self.live_grad_bytes)
        if self.stage == 2:
            b = self._bucket_of[p]
            b.ready.add(p)
            if len(b.ready) == len(b.params):
                self._reduce_bucket(b)

    def _reduce_bucket(self, b: _Bucket) -> None:
        """Stage 2: reduce-scatter the bucket's gradients into this rank's slice, free the full ones."""
        part = torch.empty_like(b.grad_shard)
        _reduce_scatter(part, b.flatten([p.grad for p in b.params]), self.group, self.world_size, self.comm)
        b.grad_shard += part  # (S,): accumulates over micro-batches until zero_grad
        for p in b.params:
            if p.grad is not None and p in self._counted:
                self.live_grad_bytes -= p.grad.numel() * p.grad.element_size()
                self._counted.discard(p)
            p.grad = None
        b.ready.clear()
        b.reduced = True

    # -- the step --

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for b in self.buckets:
            if self.stage == 0:
                g = b.flatten([p.grad for p in b.params])  # (padded,)
                _all_reduce(g, self.group, self.world_size, self.comm)
            elif self.stage == 1:
                g = torch.empty(b.shard_numel, dtype=b.dtype, device=b.device)  # (S,)
                _reduce_scatter(g, b.flatten([p.grad for p in b.params]), self.group, self.world_size, self.comm)
            else:
                if b.ready or not b.reduced:  # gradients still waiting (some never came), or no backward
                    self._reduce_bucket(b)
                g = b.grad_shard.clone()
            b.shard.grad = g.div_(self.world_size)
        self.optimizer.step()
        for b in self.buckets:
            b.shard.grad = None
            b.reduced = False
            if self.stage > 0:  # every rank stepped its slice: put the full buffer back together, in place
                _all_gather(b.flat, b.local(b.flat), self.group, self.world_size, self.comm)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self._counted = {p for p in self.params if p.grad is not None}
        self.live_grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in self._counted)
        for b in self.buckets:
            if b.grad_shard is not None:
                b.grad_shard.zero_()
            b.ready.clear()

    # -- what the rank holds --

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def rank_bytes(self) -> ZeroMemory:
        """Bytes this rank holds now: parameter storages (the flat buffers), gradients (full ones on the
        parameters, plus the stage-2 slices) and the inner optimizer's state tensors."""
        grads = [p.grad for p in self.params if p.grad is not None]
        grads += [b.grad_shard for b in self.buckets if b.grad_shard is not None]
        return ZeroMemory(params=_storage_bytes(self.params), grads=_storage_bytes(grads),
                          optimizer=_state_bytes(self.optimizer))

    def reset_peak(self) -> None:
        self.peak_grad_bytes = self.live_grad_bytes

    def state_dict(self) -> dict:
        """This rank's own state (its slices): save one per rank, load with load_state_dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict:
        """The state dict `optimizer_cls(params)` on one process would hold, the slices of all ranks put
        together; it loads into that plain optimizer. A collective: call it on every rank."""
        def gather(v, bucket):
            return v if self.stage == 0 else _gathered(v, bucket.padded, self.group, self.world_size)

        return _consolidate(self.optimizer, self._placements, gather)

    def close(self) -> None:
        """Remove the gradient hooks (the parameters stay views of the flat buffers)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


# --------------------------------------------------------------------------- stage 3


class _Unit:
    """Parameters gathered together: flattened into a bucket, of which the rank keeps only its slice."""

    def __init__(self, name: str, modules: list[nn.Module], params: list[nn.Parameter], world_size: int, rank: int):
        self.name = name
        self.modules = modules
        self.bucket = FlatBucket(params, world_size, rank)
        flat = self.bucket.flatten([p.detach() for p in params])
        self.shard = nn.Parameter(self.bucket.local(flat).clone())  # (S,): the only persistent copy
        self.slots: list[tuple[nn.Module, str, int]] = []  # (module, attribute, index into params)


class _Use:
    """One forward call of a unit: the placeholders its saved weights became point here, and so does the
    copy re-gathered for its backward pass (dropped with the graph if no backward ever runs)."""

    def __init__(self, unit: _Unit):
        self.unit = unit
        self.backward_full: torch.Tensor | None = None


class _GatherParams(torch.autograd.Function):
    """shard (S,) -> the full flat parameters (padded,): an all-gather, whose adjoint in backward is the
    reduce-scatter of the full gradient (padded,) into the shard's gradient (S,). The engine that owns the
    shard runs both: owner._unshard(key) in forward, owner._reduce_grad(key, grad_full) in backward, which
    returns the shard's gradient (or None when the engine delivers it later itself, as
    labkit.parallel.fsdp does after an asynchronous reduce-scatter)."""

    @staticmethod
    def forward(ctx, shard, owner, key):
        ctx.owner, ctx.key = owner, key
        return owner._unshard(key)

    @staticmethod
    def backward(ctx, grad_full):
        return ctx.owner._reduce_grad(ctx.key, grad_full), None, None


_SAVED = object()  # tags a saved weight replaced by a placeholder


class Zero3Module(nn.Module):
    """ZeRO stage 3: the wrapped module's parameters partitioned over the ranks.

    units: the submodules gathered as one piece (default: the children of the outermost nn.ModuleLists,
    e.g. a transformer's blocks); the parameters outside them form a root unit, gathered for the whole
    forward.
    A unit's parameters exist in full only while its forward runs and again during its backward.
    Train with any elementwise optimizer over `.parameters()`: the shards, (S,) each, already averaged
    over the ranks after backward, so `optimizer.step()` needs no communication.
    """

    def __init__(self, module: nn.Module, units: Iterable[nn.Module] | None = None, process_group=None):
        super().__init__()
        owner = "Zero3Module"
        if not isinstance(module, nn.Module):
            raise TypeError(f"{owner}: module must be an nn.Module, got {type(module).__name__}")
        self.group, self.world_size, self.rank = _group_info(owner, process_group)
        if units is None:  # the children of the outermost nn.ModuleLists
            units, covered = [], set()
            for m in module.modules():
                if isinstance(m, nn.ModuleList) and m not in covered:
                    units += list(m)
                    covered.update(m.modules())
        units = list(units)
        submodules = set(module.modules())
        for i, u in enumerate(units):
            if not isinstance(u, nn.Module) or u not in submodules or u is module:
                raise ValueError(f"{owner}: units[{i}] must be a submodule of module (not module itself), "
                                 f"got {type(u).__name__}")
            if any(v is not u and u in set(v.modules()) for v in units):
                raise ValueError(f"{owner}: units[{i}] ({type(u).__name__}) sits inside another unit; "
                                 f"units must be disjoint")
        self.param_names = [n for n, _ in module.named_parameters()]  # the names a plain model uses
        named = dict(module.named_parameters())
        _same_on_all_ranks(owner, [(n, tuple(p.shape), str(p.dtype)) for n, p in named.items()],
                           self.group, self.world_size)
        self.comm = CommLog(self.world_size)

        # which unit owns each module: the unit it sits in, else the root
        unit_of_module = {m: i for i, u in enumerate(units) for m in u.modules()}
        members: list[list[nn.Parameter]] = [[] for _ in range(len(units) + 1)]  # last: the root unit
        unit_of_param: dict[nn.Parameter, int] = {}
        slots = []
        for mname, m in module.named_modules():
            for aname, p in m._parameters.items():
                if p is None:
                    continue
                i = unit_of_module.get(m, len(units))
                if p in unit_of_param and unit_of_param[p] != i:
                    raise ValueError(f"{owner}: parameter {mname}.{aname} is shared by two units; put the modules "
                                     f"that share it into one unit")
                if p not in unit_of_param:
                    unit_of_param[p] = i
                    members[i].append(p)
                slots.append((m, aname, p, i))
        self.units: list[_Unit] = []
        index_of: dict[nn.Parameter, tuple[int, int]] = {}
        for i, params in enumerate(members):
            if not params:
                continue
            label = "root" if i == len(units) else f"unit{i}"
            modules = [units[i]] if i < len(units) else []
            if len({(p.dtype, p.device) for p in params}) > 1:
                raise ValueError(f"{owner}: the parameters of {label} must share one dtype and device")
            unit = _Unit(label, modules, params, self.world_size, self.rank)
            for j, p in enumerate(params):
                index_of[p] = (len(self.units), j)
            self.units.append(unit)
        for m, aname, p, i in slots:
            u, j = index_of[p]
            self.units[u].slots.append((m, aname, j))
            del m._parameters[aname]
            setattr(m, aname, None)  # filled with a view of the gathered buffer while the unit runs
        self._placement = {n: index_of[named[n]] for n in self.param_names}
        self.root = next((u for u in self.units if u.name == "root"), None)
        self.module = module
        self.shards = nn.ParameterList([u.shard for u in self.units])
        self._live: dict[int, _Use] = {}  # storage address of a gathered buffer -> the forward call using it
        self.gathered_bytes = self.peak_gathered_bytes = 0  # full parameters this rank holds now / at most
        for u in self.units:
            for m in u.modules:
                m.register_forward_pre_hook(lambda _m, _args, u=u: self._enter(u))
                m.register_forward_hook(lambda _m, _args, _out, u=u: self._exit(u))

    # -- gathering and releasing --

    def _count(self, nbytes: int) -> None:
        self.gathered_bytes += nbytes
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)

    def _gather(self, unit: _Unit) -> torch.Tensor:
        full = _gathered(unit.shard, unit.bucket.padded, self.group, self.world_size, self.comm)  # (padded,)
        self._count(full.numel() * full.element_size())
        return full

    def _unshard(self, use: _Use) -> torch.Tensor:
        """_GatherParams' forward: the unit's full flat parameters (padded,), gathered now."""
        return self._gather(use.unit)

    def _reduce_grad(self, use: _Use, grad_full: torch.Tensor) -> torch.Tensor:
        """_GatherParams' backward: this rank's shard of the full gradient, averaged over the ranks; the
        copy re-gathered for this backward is dropped."""
        grad_shard = torch.empty(use.unit.bucket.shard_numel, dtype=grad_full.dtype, device=grad_full.device)
        _reduce_scatter(grad_shard, grad_full.contiguous(), self.group, self.world_size, self.comm)
        if use.backward_full is not None:
            self._count(-use.backward_full.numel() * use.backward_full.element_size())
            use.backward_full = None
        return grad_shard.div_(self.world_size)

    def _enter(self, unit: _Unit) -> None:
        use = _Use(unit)
        full = _GatherParams.apply(unit.shard, self, use)
        self._live[full.untyped_storage().data_ptr()] = use
        views = unit.bucket.views(full)
        for m, aname, j in unit.slots:
            setattr(m, aname, views[j])

    def _exit(self, unit: _Unit) -> None:
        for m, aname, _ in unit.slots:
            setattr(m, aname, None)
        for ptr in [k for k, v in self._live.items() if v.unit is unit]:
            del self._live[ptr]
        self._count(-unit.bucket.padded * unit.shard.element_size())  # the forward copy is gone

    def _pack(self, t: torch.Tensor):
        """A tensor saved for backward that lives in a gathered buffer becomes a placeholder."""
        use = self._live.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if use is None:
            return t
        return (_SAVED, use, t.storage_offset(), tuple(t.shape), t.stride())

    def _unpack(self, saved):
        if isinstance(saved, tuple) and len(saved) == 5 and saved[0] is _SAVED:
            _, use, offset, shape, stride = saved
            if use.backward_full is None:  # first use in this backward pass: gather again
                use.backward_full = self._gather(use.unit)
            return use.backward_full.as_strided(shape, stride, offset)
        return saved

    def forward(self, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            if self.root is not None:
                self._enter(self.root)
            try:
                return self.module(*args, **kwargs)
            finally:
                if self.root is not None:
                    self._exit(self.root)

    # -- what the rank holds; full copies --

    def reset_peak(self) -> None:
        self.peak_gathered_bytes = self.gathered_bytes

    def rank_bytes(self, optimizer: torch.optim.Optimizer | None = None) -> ZeroMemory:
        """Bytes this rank holds now: its parameter shards, their gradients, the optimizer's state."""
        shards = [u.shard for u in self.units]
        return ZeroMemory(params=_storage_bytes(shards),
                          grads=_storage_bytes(s.grad for s in shards if s.grad is not None),
                          optimizer=_state_bytes(optimizer) if optimizer is not None else 0)

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """name -> the full parameter (copies), named as module.named_parameters() named them before
        wrapping. A collective: call it on every rank."""
        views = [u.bucket.views(_gathered(u.shard, u.bucket.padded, self.group, self.world_size)) for u in self.units]
        return {n: views[u][j].clone() for n, (u, j) in self._placement.items()}

    @torch.no_grad()
    def consolidated_optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """The state dict of a plain optimizer over the unwrapped model's parameters (in
        named_parameters() order) made from `optimizer` over this module's shards. A collective."""
        position = {n: i for i, n in enumerate(self.param_names)}
        placements = {}
        for k, u in enumerate(self.units):
            names = {j: n for n, (uu, j) in self._placement.items() if uu == k}
            placements[u.shard] = (u.bucket, [position[names[j]] for j in range(len(u.bucket.numels))])

        def gather(v, bucket):
            return _gathered(v, bucket.padded, self.group, self.world_size)

        return _consolidate(optimizer, placements, gather)


# --------------------------------------------------------------------------- the single-process reference


def single_process_run(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, micro: int = 1) -> dict:
    """What data parallelism must reproduce: `model` (a TinyGPT: model(x, y)[1] is the loss) trained in one
    process with a plain `optimizer` on the global batches (x, y), each cut into `micro` equal slices whose
    gradients accumulate (loss / micro each: the sum `micro` ranks compute, in their order). Returns each
    step's loss and a CPU copy of the named parameters after it."""
    micro = _checks.integer("single_process_run", "micro", micro, low=1)
    device = next(model.parameters()).device
    losses, params = [], []
    for x, y in batches:
        total = 0.0
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = model(xs.to(device), ys.to(device))[1] / micro
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        params.append({n: p.detach().cpu().clone() for n, p in model.named_parameters()})
    return dict(losses=losses, params=params)


__all__ = [
    "CommLog", "DEFAULT_BUCKET_NUMEL", "FlatBucket", "STAGES", "STATES_PER_PARAM", "Zero3Module", "ZeroMemory",
    "ZeroOptimizer", "comm_volume", "memory_per_rank", "optimizer_bytes_per_param", "padded_numel", "shard_range",
    "single_process_run",
]
