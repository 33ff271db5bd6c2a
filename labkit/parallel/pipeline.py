"""Pipeline parallelism: schedules as data, a simulator, and an executor on real ranks.

Y. Huang et al. "GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism",
NeurIPS 2019, arXiv:1811.06965 (micro-batches, fill-drain: all forwards, then all backwards).
D. Narayanan et al. "PipeDream: Generalized Pipeline Parallelism for DNN Training", SOSP 2019, and
"Memory-Efficient Pipeline-Parallel DNN Training", ICML 2021, arXiv:2006.09503 (1F1B with a flush,
"PipeDream-Flush"). D. Narayanan et al. "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", SC 2021, arXiv:2104.04473 (sec. 2.2: 1F1B and the interleaved schedule).

A model's layers are cut into S consecutive *stages*; stage s lives on rank s % p of p pipeline ranks
(p = S: one stage per rank; interleaved: v = S / p "virtual stages" (model chunks) per rank, rank r
holding stages r, r + p, r + 2p, ...). A batch is cut into m microbatches. Stage s runs
F(s, i), the forward of microbatch i, once F(s - 1, i) has arrived, and B(s, i), its backward, once
B(s + 1, i) has sent back the gradient of its output (the last stage starts from the loss).

A *schedule* is data: for every rank, the ordered list of its actions `Action(op, stage, microbatch)`.
`schedule(kind, stages, microbatches, virtual_stages)` builds them:

    "gpipe"             F(r, 0..m-1) then B(r, 0..m-1): every microbatch's activations stay alive
                        until the backwards start (torch's ScheduleGPipe order).
    "1f1b"              w_r = min(p - 1 - r, m) warm-up forwards, then pairs F, B (one forward,
                        one backward) and the remaining backwards: rank r never holds more than
                        p - r microbatches (Megatron's schedule, torch's Schedule1F1B order).
    "interleaved-1f1b"  the same on v chunks per rank, forwards in groups of p microbatches per chunk
                        ("depth first"), w_r = min((v - 1) p + 2 (p - 1 - r), m v) warm-up forwards;
                        needs m % p == 0 as in Megatron; with v = 1 it is "1f1b" (Megatron dispatches
                        the same way). torch's ScheduleInterleaved1F1B gives the same order.

`simulate(actions, forward_cost, backward_cost)` runs the lists on p ideal devices: each action starts
when its rank is free and its input exists, takes forward_cost / v or backward_cost / v (the costs
are one microbatch through a rank's whole share of the layers, so v does not change the work), and
reports the timeline, its makespan and

    bubble fraction  = (makespan - ideal) / ideal,   ideal = m (t_f + t_b), a rank's busy time,

the definition of Narayanan et al. 2021 (bubble time over ideal compute time), which gives
(p - 1) / m for GPipe and 1F1B and (p - 1) / (m v) for the interleaved schedule. The paper derives
it for t_f = t_b; with free messages the simulator finds it exact for any ratio t_b / t_f (the tests
check several). The share of the wall-clock time a rank idles, bubble / makespan
= (p - 1) / (m v + p - 1), is a different number (GPipe's "bubble overhead"), also in common use.
1F1B has the *same* bubble as GPipe; what it saves is activation memory (p - r microbatches in flight
on rank r instead of m), which is what lets m grow. Interleaving divides the bubble by v at the
price of v times more point-to-point messages and a little more memory in flight.

`run_schedule` executes one rank's list on real stage modules with point-to-point messages
(isend/recv over a gloo group: tags make every message unambiguous; on a GPU the tensors travel via
host memory), records a wall-clock timeline and the bytes autograd saves per in-flight microbatch, and
returns outputs, losses and gradients that equal the unsplit model's (gradient of the mean of the
microbatch losses). `run_jobs` launches several executions (and torch.distributed.pipelining's
schedules on the same stages, for comparison) in one `labkit.parallel.launch` call.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from labkit import _checks

KINDS = ("gpipe", "1f1b", "interleaved-1f1b")
TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B"}
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # codes of the message header
_MAX_DIMS = 8


class Action(NamedTuple):
    """One unit of work: op "F" (forward) or "B" (backward) of `microbatch` on `stage`."""

    op: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.op}{self.microbatch}@s{self.stage}"


# --------------------------------------------------------------------------- schedules


def stage_rank(stage: int, stages: int) -> int:
    """The rank that holds `stage` when there are `stages` pipeline ranks (round robin)."""
    return stage % stages


def _gpipe(rank: int, m: int) -> list[Action]:
    return [Action("F", rank, i) for i in range(m)] + [Action("B", rank, i) for i in range(m)]


def _one_f_one_b(rank: int, p: int, m: int) -> list[Action]:
    warmup = min(p - 1 - rank, m)
    out = [Action("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        out += [Action("F", rank, warmup + i), Action("B", rank, i)]
    out += [Action("B", rank, i) for i in range(m - warmup, m)]  # cool-down
    return out


def _interleaved(rank: int, p: int, m: int, v: int) -> list[Action]:
    total = m * v  # (chunk, microbatch) pairs on this rank

    def forward(k: int) -> Action:  # the k-th forward: groups of p microbatches per chunk, chunks in turn
        chunk = (k // p) % v
        return Action("F", chunk * p + rank, (k // (p * v)) * p + k % p)

    def backward(k: int) -> Action:  # the same groups, chunks from the last one down
        chunk = v - 1 - (k // p) % v
        return Action("B", chunk * p + rank, (k // (p * v)) * p + k % p)

    warmup = min((v - 1) * p + 2 * (p - 1 - rank), total)
    out = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        out += [forward(warmup + k), backward(k)]
    out += [backward(k) for k in range(total - warmup, total)]
    return out


def check_schedule_args(owner: str, kind, stages, microbatches, virtual_stages) -> tuple[str, int, int, int]:
    """Validate (kind, p, m, v) as `schedule` needs them; returns them."""
    kind = _checks.choice(owner, "kind", kind, KINDS)
    p = _checks.integer(owner, "stages", stages, low=1)
    m = _checks.integer(owner, "microbatches", microbatches, low=1)
    v = _checks.integer(owner, "virtual_stages", virtual_stages, low=1)
    if kind != "interleaved-1f1b" and v != 1:
        raise ValueError(f"{owner}: virtual_stages must be 1 for kind {kind!r} (only 'interleaved-1f1b' "
                         f"puts several stages on a rank), got {v}")
    if kind == "interleaved-1f1b" and v > 1 and m % p:
        raise ValueError(f"{owner}: microbatches must be a multiple of stages ({p}) for 'interleaved-1f1b', "
                         f"got {m}")
    return kind, p, m, v


def schedule(kind: str, stages: int, microbatches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Per-rank ordered actions of a pipeline schedule; element r is rank r's list.

    stages          p, the number of pipeline ranks
    microbatches    m
    virtual_stages  v, model chunks per rank (interleaved only): the model has p v stages
    """
    kind, p, m, v = check_schedule_args("schedule", kind, stages, microbatches, virtual_stages)
    if kind == "gpipe":
        return [_gpipe(r, m) for r in range(p)]
    if kind == "1f1b" or v == 1:
        return [_one_f_one_b(r, p, m) for r in range(p)]
    return [_interleaved(r, p, m, v) for r in range(p)]


def _shape(owner: str, actions) -> tuple[int, int, int]:
    """(p, S, m) of a schedule, checked for well-formed actions."""
    if not isinstance(actions, (list, tuple)) or not actions or not all(isinstance(a, (list, tuple)) for a in actions):
        raise TypeError(f"{owner}: actions must be a non-empty list of per-rank action lists, "
                        f"got {type(actions).__name__}")
    flat = [Action(*a) for rank in actions for a in rank]
    if not flat or any(a.op not in ("F", "B") for a in flat):
        raise ValueError(f"{owner}: actions must hold Action('F'|'B', stage, microbatch) items")
    p = len(actions)
    n_stages = max(a.stage for a in flat) + 1
    m = max(a.microbatch for a in flat) + 1
    return p, n_stages, m


def validate(actions: list[list[Action]]) -> None:
    """Raise ValueError unless the schedule is complete and can run.

    Complete: each (stage, microbatch) has exactly one F and one B, on the rank that holds the stage,
    and there are stages = p v stages. Runnable: on every rank F(s, i) comes before B(s, i), and the
    cross-stage dependencies (F(s-1, i) -> F(s, i), B(s+1, i) -> B(s, i)) never wait in a cycle
    (checked by simulating it)."""
    p, n_stages, m = _shape("validate", actions)
    if n_stages % p:
        raise ValueError(f"validate: {n_stages} stages cannot be spread over {p} ranks evenly")
    seen: dict[tuple, int] = {}
    for r, rank_actions in enumerate(actions):
        done_forward = set()
        for a in (Action(*x) for x in rank_actions):
            if stage_rank(a.stage, p) != r:
                raise ValueError(f"validate: {a} is on rank {r}, but stage {a.stage} lives on rank "
                                 f"{stage_rank(a.stage, p)}")
            seen[a] = seen.get(a, 0) + 1
            if a.op == "F":
                done_forward.add((a.stage, a.microbatch))
            elif (a.stage, a.microbatch) not in done_forward:
                raise ValueError(f"validate: rank {r} runs {a} before its forward")
    for s in range(n_stages):
        for i in range(m):
            for op in "FB":
                n = seen.get(Action(op, s, i), 0)
                if n != 1:
                    raise ValueError(f"validate: {Action(op, s, i)} appears {n} times (expected once)")
    simulate(actions)  # raises on a dependency cycle


# --------------------------------------------------------------------------- the simulator


@dataclass
class Simulation:
    """What `simulate` found. Times are in the units of the costs."""

    spans: list[dict]  # one per action: rank, op, stage, microbatch, start, end
    makespan: float
    busy: list[float]  # per rank
    bubble_fraction: float  # (makespan - ideal) / ideal, ideal = a rank's busy time
    idle_share: float  # (makespan - ideal) / makespan: the share of wall time a rank idles
    peak_inflight: list[int]  # per rank: most (stage, microbatch) forwards held awaiting their backward
    peak_activations: list[float]  # peak_inflight / v: in microbatches through a rank's whole share of layers
    stages: int  # p
    microbatches: int  # m
    virtual_stages: int  # v


def _deps(a: Action, n_stages: int) -> list[Action]:
    if a.op == "F":
        return [Action("F", a.stage - 1, a.microbatch)] if a.stage > 0 else []
    deps = [Action("F", a.stage, a.microbatch)]
    if a.stage < n_stages - 1:
        deps.append(Action("B", a.stage + 1, a.microbatch))
    return deps


def peak_inflight_of(rank_actions: list[Action]) -> int:
    """Most forwards a rank holds at once (each waits for its backward), walking its list."""
    held = peak = 0
    for a in rank_actions:
        held += 1 if a.op == "F" else -1
        peak = max(peak, held)
    return peak


def simulate(actions: list[list[Action]], forward_cost: float = 1.0, backward_cost: float = 1.0,
             comm_cost: float = 0.0) -> Simulation:
    """Run per-rank action lists on ideal devices; each rank follows its list in order.

    forward_cost, backward_cost  one microbatch through a rank's whole share of layers (a stage of a
                                 v-chunk schedule costs 1/v of it)
    comm_cost                    latency of a message between two ranks
    """
    p, n_stages, m = _shape("simulate", actions)
    tf = _checks.number("simulate", "forward_cost", forward_cost, low=0.0, low_open=True)
    tb = _checks.number("simulate", "backward_cost", backward_cost, low=0.0, low_open=True)
    tc = _checks.number("simulate", "comm_cost", comm_cost, low=0.0)
    if n_stages % p:
        raise ValueError(f"simulate: {n_stages} stages cannot be spread over {p} ranks evenly")
    v = n_stages // p
    lists = [[Action(*a) for a in rank] for rank in actions]
    end: dict[Action, float] = {}
    pos, free = [0] * p, [0.0] * p
    spans = []
    while any(pos[r] < len(lists[r]) for r in range(p)):
        moved = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                a = lists[r][pos[r]]
                deps = _deps(a, n_stages)
                if not all(d in end for d in deps):
                    break
                ready = max([end[d] + (tc if stage_rank(d.stage, p) != r else 0.0) for d in deps], default=0.0)
                start = max(free[r], ready)
                free[r] = end[a] = start + (tf if a.op == "F" else tb) / v
                spans.append(dict(rank=r, op=a.op, stage=a.stage, microbatch=a.microbatch, start=start, end=end[a]))
                pos[r] += 1
                moved = True
        if not moved:
            stuck = ", ".join(f"rank {r} at {lists[r][pos[r]]}" for r in range(p) if pos[r] < len(lists[r]))
            raise ValueError(f"simulate: the schedule deadlocks (each waits for an action that never runs): {stuck}")
    makespan = max(s["end"] for s in spans)
    busy = [sum(s["end"] - s["start"] for s in spans if s["rank"] == r) for r in range(p)]
    ideal = max(busy)
    peaks = [peak_inflight_of(lst) for lst in lists]
    return Simulation(spans=spans, makespan=makespan, busy=busy, bubble_fraction=(makespan - ideal) / ideal,
                      idle_share=(makespan - ideal) / makespan, peak_inflight=peaks,
                      peak_activations=[k / v for k in peaks], stages=p, microbatches=m, virtual_stages=v)


def bubble_fraction(kind: str, stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble time over ideal time, (p - 1) / (m v), for equal forward and backward costs."""
    kind, p, m, v = check_schedule_args("bubble_fraction", kind, stages, microbatches, virtual_stages)
    return (p - 1) / (m * v)


def peak_inflight(kind: str, stages: int, microbatches: int, rank: int, virtual_stages: int = 1) -> int:
    """Most (stage, microbatch) activations `rank` holds at once under the schedule (closed form)."""
    kind, p, m, v = check_schedule_args("peak_inflight", kind, stages, microbatches, virtual_stages)
    r = _checks.integer("peak_inflight", "rank", rank)
    if r >= p:
        raise ValueError(f"peak_inflight: rank must be < stages ({p}), got {r}")
    if kind == "gpipe":
        return m
    if kind == "1f1b" or v == 1:
        return min(p - r, m)  # warm-up forwards plus the one of the first F, B pair
    return min((v - 1) * p + 2 * (p - 1 - r) + 1, m * v)


# --------------------------------------------------------------------------- the model and its stages


@dataclass(frozen=True)
class ModelSpec:
    """A stack of pre-norm transformer blocks on (batch, seq_len, width) inputs, with an MSE loss
    against a random target. Every rank rebuilds it from the seed, so only this spec travels."""

    n_layers: int = 8
    width: int = 32
    n_head: int = 2
    seq_len: int = 8
    batch: int = 8
    seed: int = 0


def make_model(spec: ModelSpec) -> nn.Sequential:
    """The whole (unsplit) model: n_layers transformer blocks named "0", "1", ..."""
    from labkit.models.gpt import Block, GPTConfig

    torch.manual_seed(spec.seed)
    cfg = GPTConfig(vocab_size=2, block_size=spec.seq_len, n_layer=spec.n_layers, n_embd=spec.width,
                    n_head=spec.n_head, dropout=0.0)
    return nn.Sequential(*[Block(cfg) for _ in range(spec.n_layers)])


def make_batch(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), both (batch, seq_len, width)."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.randn(spec.batch, spec.seq_len, spec.width, generator=g)
    y = torch.randn(spec.batch, spec.seq_len, spec.width, generator=g)
    return x, y


def split_stages(model: nn.Sequential, n_stages: int) -> list[nn.Sequential]:
    """Cut a Sequential into n_stages consecutive pieces (sizes differ by at most one), keeping the
    layers' names, so stage parameters are named as in the whole model."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"split_stages: model must be an nn.Sequential, got {type(model).__name__}")
    n_stages = _checks.integer("split_stages", "n_stages", n_stages, low=1)
    layers = list(model.named_children())
    if n_stages > len(layers):
        raise ValueError(f"split_stages: n_stages must be <= the number of layers ({len(layers)}), got {n_stages}")
    base, extra = divmod(len(layers), n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(nn.Sequential(OrderedDict(layers[start:start + size])))
        start += size
    return out


def reference_step(spec: ModelSpec) -> dict:
    """The unsplit model on the whole batch: output, loss (MSE, mean) and every parameter's gradient."""
    model = make_model(spec)
    x, y = make_batch(spec)
    out = model(x)  # (batch, seq_len, width)
    loss = F.mse_loss(out, y)
    loss.backward()
    return dict(output=out.detach(), loss=loss.item(),
                grads={n: p.grad.detach().clone() for n, p in model.named_parameters()})


# --------------------------------------------------------------------------- point-to-point messages


def _tag(op: str, stage: int, microbatch: int) -> int:
    """A number unique to the message that `op` on (stage, microbatch) sends (m < 100003)."""
    return (stage * 2 + (op == "B")) * 100_003 + microbatch


class _Link:
    """isend / blocking recv over a gloo group; tensors travel through host memory."""

    def __init__(self, group, device: torch.device):
        self.group, self.device, self.pending = group, device, []

    def send(self, t: torch.Tensor, dst: int, tag: int, header: bool) -> None:
        t = t.detach().to("cpu").contiguous()
        if header:  # ndim, dtype code, shape: the receiver of an activation does not know its shape
            h = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
            h[0], h[1] = t.dim(), _DTYPES.index(t.dtype)
            h[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            self.pending.append((dist.isend(h, dst, group=self.group, tag=tag * 2), h))
        self.pending.append((dist.isend(t, dst, group=self.group, tag=tag * 2 + 1), t))

    def recv(self, src: int, tag: int, like: torch.Tensor | None = None) -> torch.Tensor:
        if like is None:
            h = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
            dist.recv(h, src, group=self.group, tag=tag * 2)
            shape, dtype = h[2:2 + int(h[0])].tolist(), _DTYPES[int(h[1])]
        else:
            shape, dtype = like.shape, like.dtype
        t = torch.empty(shape, dtype=dtype)
        dist.recv(t, src, group=self.group, tag=tag * 2 + 1)
        return t.to(self.device)

    def wait_all(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


# --------------------------------------------------------------------------- the executor


@dataclass
class _Held:
    """What one in-flight (stage, microbatch) keeps for its backward."""

    input: torch.Tensor | None
    output: torch.Tensor
    saved_bytes: int


def _saved_bytes_counter(params: list[nn.Parameter]):
    """A saved_tensors_hooks context that adds up the bytes autograd keeps (parameters excluded)."""
    param_storage = {p.untyped_storage().data_ptr() for p in params}
    box = {"bytes": 0}

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_storage:
            box["bytes"] += t.numel() * t.element_size()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), box


def _pad(start: float, ms: float) -> float:
    """Sleep until `ms` milliseconds after `start` (emulated device time); returns the end time."""
    left = start + ms / 1e3 - time.time()
    if left > 0:
        time.sleep(left)
    return time.time()


def run_schedule(rank_actions: list[Action], modules: dict[int, nn.Module], n_stages: int, p: int,
                 inputs: list[torch.Tensor] | None, targets: list[torch.Tensor] | None, *, loss_fn=F.mse_loss,
                 group=None, device_ms: tuple[float, float] = (0.0, 0.0), fail_at: Action | None = None,
                 t0: float = 0.0) -> dict:
    """Execute one rank's actions on its stage modules; call on every rank of the pipeline.

    modules           this rank's stages: {stage index: module}, of n_stages on p ranks
    inputs / targets  the microbatches (on the ranks holding stage 0 / the last stage; None elsewhere)
    loss_fn           loss_fn(output, target) -> a scalar per microbatch (mean-reduced)
    group             the process group for the messages (None: the default group)
    device_ms         emulated device time (forward, backward) of one microbatch through a rank's whole
                      share of layers: each action is padded to it / v with a sleep (0: no padding)
    fail_at           raise when reaching this action (to show what a failing rank does)
    Returns outputs and losses (last stage), spans (wall-clock, seconds since t0), peak in-flight
    count and peak saved-activation bytes. Gradients accumulate in the modules' parameters as the
    gradient of the mean of the m microbatch losses.
    """
    rank_actions = [Action(*a) for a in rank_actions]  # plain (op, stage, microbatch) tuples work too
    device = next(next(iter(modules.values())).parameters()).device
    link = _Link(group, device)
    m = max(a.microbatch for a in rank_actions) + 1
    v = n_stages // p
    held: dict[tuple[int, int], _Held] = {}
    outputs, losses, spans = {}, {}, []
    live = peak_bytes = peak_count = 0
    for a in rank_actions:
        if fail_at is not None and a == Action(*fail_at):
            raise RuntimeError(f"injected failure at {a} on rank {stage_rank(a.stage, p)}")
        s, i = a.stage, a.microbatch
        if a.op == "F":
            if s == 0:
                x = inputs[i].to(device)
            else:
                x = link.recv(stage_rank(s - 1, p), _tag("F", s - 1, i)).requires_grad_()
            start = time.time()
            hooks, box = _saved_bytes_counter(list(modules[s].parameters()))
            with hooks:
                out = modules[s](x)
                if s == n_stages - 1:  # the loss belongs to the last stage's forward, as in torch
                    loss = loss_fn(out, targets[i].to(device))
            end = _pad(start, device_ms[0] / v)
            if s == n_stages - 1:
                outputs[i], losses[i] = out.detach().cpu(), loss.detach().item()
                out = loss
            else:
                link.send(out, stage_rank(s + 1, p), _tag("F", s, i), header=True)
            held[(s, i)] = _Held(x if s > 0 else None, out, box["bytes"])
            live += box["bytes"]
            peak_bytes, peak_count = max(peak_bytes, live), max(peak_count, len(held))
        else:
            h = held.pop((s, i))
            if s == n_stages - 1:
                start = time.time()
                (h.output / m).backward()  # the gradient of the mean of the microbatch losses
            else:
                grad = link.recv(stage_rank(s + 1, p), _tag("B", s + 1, i), like=h.output)
                start = time.time()
                torch.autograd.backward(h.output, grad)
            end = _pad(start, device_ms[1] / v)
            if s > 0:
                link.send(h.input.grad, stage_rank(s - 1, p), _tag("B", s, i), header=False)
            live -= h.saved_bytes
        spans.append(dict(op=a.op, stage=s, microbatch=i, start=start - t0, end=end - t0))
    link.wait_all()
    return dict(outputs=outputs, losses=losses, spans=spans, peak_inflight=peak_count, peak_saved_bytes=peak_bytes)


# --------------------------------------------------------------------------- on ranks: labkit vs torch


@dataclass(frozen=True)
class Job:
    """One pipelined training step to run on the ranks.

    engine      "labkit" (run_schedule) or "torch" (torch.distributed.pipelining's schedule class)
    repeats     steps to time (the result keeps the last step's gradients and timeline)
    """

    kind: str
    microbatches: int
    virtual_stages: int = 1
    engine: str = "labkit"
    device_ms: tuple[float, float] = (0.0, 0.0)
    repeats: int = 1
    fail_at: tuple | None = None  # (op, stage, microbatch): that action raises (see run_schedule)


def _torch_step(job: Job, stages: dict[int, nn.Module], n_stages: int, x, y, device) -> dict:
    from torch.distributed import pipelining

    pipe_stages = [pipelining.PipelineStage(mod, s, n_stages, device) for s, mod in sorted(stages.items())]
    cls = getattr(pipelining, TORCH_SCHEDULES[job.kind])
    sched = cls(pipe_stages if job.kind == "interleaved-1f1b" else pipe_stages[0], job.microbatches,
                loss_fn=F.mse_loss)
    losses: list[torch.Tensor] = []
    first, last = 0 in stages, n_stages - 1 in stages
    args = (x.to(device),) if first else ()
    kwargs = dict(target=y.to(device), losses=losses) if last else {}
    out = sched.step(*args, **kwargs)
    return dict(outputs={0: out.detach().cpu()} if last else {},
                losses={i: l.item() for i, l in enumerate(losses)}, spans=[], peak_inflight=None,
                peak_saved_bytes=None)


def _warm_up(group, spec: ModelSpec, device: torch.device) -> None:
    """One untimed GPipe step of one microbatch, so that no job's first step pays for set-up
    (connections, the autograd engine's first backward from a received gradient)."""
    r, p = dist.get_rank(), dist.get_world_size()
    x, y = make_batch(spec)
    stages = {s: mod.to(device) for s, mod in enumerate(split_stages(make_model(spec), p)) if s == r}
    run_schedule(schedule("gpipe", p, 1)[r], stages, p, p, [x] if r == 0 else None, [y] if r == p - 1 else None,
                 group=group)
    dist.barrier()


def rank_main(spec: ModelSpec, jobs: list[Job]) -> list[dict]:
    """Run every job on this rank (called by `labkit.parallel.launch` on each rank)."""
    from labkit.parallel.launch import rank_device

    r, p = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    group = dist.new_group(backend="gloo")  # p2p with tags, whatever the default backend
    x, y = make_batch(spec)
    _warm_up(group, spec, device)
    results = []
    for job in jobs:
        kind, _, m, v = check_schedule_args("Job", job.kind, p, job.microbatches, job.virtual_stages)
        n_stages = p * v
        stages = {s: mod.to(device) for s, mod in enumerate(split_stages(make_model(spec), n_stages))
                  if stage_rank(s, p) == r}
        actions = schedule(kind, p, m, v)[r]
        times = []
        for _ in range(job.repeats):
            for mod in stages.values():
                mod.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.time()
            if job.engine == "torch":
                res = _torch_step(job, stages, n_stages, x, y, device)
            else:
                res = run_schedule(actions, stages, n_stages, p, list(x.chunk(m)) if 0 in stages else None,
                                   list(y.chunk(m)) if n_stages - 1 in stages else None, group=group,
                                   device_ms=job.device_ms, fail_at=job.fail_at, t0=t0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - t0)
        res.update(rank=r, t0=t0, step_s=times, actions=[tuple(a) for a in actions],
                   grads={f"{n}": q.grad.detach().cpu() for mod in stages.values() for n, q in mod.named_parameters()})
        results.append(res)
    dist.barrier()
    return results


@dataclass
class PipelineRun:
    """One job's results gathered from all ranks."""

    job: Job
    output: torch.Tensor  # (batch, seq_len, width): the microbatch outputs, concatenated
    loss: float  # mean of the microbatch losses
    grads: dict[str, torch.Tensor]  # every parameter, named as in the unsplit model
    spans: list[dict] = field(default_factory=list)  # rank, op, stage, microbatch, start, end (s, wall clock)
    step_s: list[list[float]] = field(default_factory=list)  # per rank, per repeat
    peak_inflight: list = field(default_factory=list)  # per rank
    peak_saved_bytes: list = field(default_factory=list)  # per rank

    @property
    def makespan(self) -> float:
        return max(s["end"] for s in self.spans) - min(s["start"] for s in self.spans)

    def bubble_fraction(self) -> float:
        """Measured (makespan - busy) / busy, with busy the busiest rank's compute time."""
        busy = max(sum(s["end"] - s["start"] for s in self.spans if s["rank"] == r)
                   for r in {s["rank"] for s in self.spans})
        return (self.makespan - busy) / busy


def _gather(job: Job, per_rank: list[dict]) -> PipelineRun:
    t0 = min(res["t0"] for res in per_rank)
    spans, grads, outputs, losses = [], {}, {}, {}
    for res in per_rank:
        grads.update(res["grads"])
        outputs.update(res["outputs"])
        losses.update(res["losses"])
        shift = res["t0"] - t0
        spans += [dict(s, rank=res["rank"], start=s["start"] + shift, end=s["end"] + shift) for s in res["spans"]]
    return PipelineRun(job=job, output=torch.cat([outputs[i] for i in sorted(outputs)]),
                       loss=sum(losses.values()) / len(losses), grads=grads, spans=spans,
                       step_s=[res["step_s"] for res in per_rank],
                       peak_inflight=[res["peak_inflight"] for res in per_rank],
                       peak_saved_bytes=[res["peak_saved_bytes"] for res in per_rank])


def run_jobs(jobs: list[Job], world_size: int, spec: ModelSpec = ModelSpec(), *, timeout: float = 30.0,
             deadline: float = 240.0, grace: float = 3.0) -> list[PipelineRun]:
    """Run the jobs on `world_size` fresh ranks (one launch) and gather each job's results.
    A rank that fails raises labkit.parallel.launch.RankError naming it; nothing hangs."""
    from labkit.parallel.launch import launch

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"run_jobs: spec must be a ModelSpec, got {type(spec).__name__}")
    if not isinstance(jobs, (list, tuple)) or not jobs or not all(isinstance(j, Job) for j in jobs):
        raise TypeError("run_jobs: jobs must be a non-empty list of Job")
    world_size = _checks.integer("run_jobs", "world_size", world_size, low=1)
    for j in jobs:
        kind, p, m, v = check_schedule_args("run_jobs", j.kind, world_size, j.microbatches, j.virtual_stages)
        _checks.choice("run_jobs", "engine", j.engine, ("labkit", "torch"))
        if p * v > spec.n_layers:
            raise ValueError(f"run_jobs: {p * v} stages need at least that many layers, got n_layers={spec.n_layers}")
        if spec.batch % m:
            raise ValueError(f"run_jobs: spec.batch ({spec.batch}) must be a multiple of microbatches ({m})")
        if j.engine == "torch" and kind == "1f1b" and m < p:
            raise ValueError(f"run_jobs: torch's Schedule1F1B needs microbatches >= stages ({p}), got {m}")
    per_rank = launch(rank_main, world_size, args=(spec, list(jobs)), timeout=timeout, deadline=deadline, grace=grace)
    return [_gather(job, [res[k] for res in per_rank]) for k, job in enumerate(jobs)]


__all__ = ["Action", "Job", "KINDS", "ModelSpec", "PipelineRun", "Simulation", "bubble_fraction", "make_batch",
           "make_model", "peak_inflight", "peak_inflight_of", "reference_step", "run_jobs", "run_schedule",
           "schedule", "simulate", "split_stages", "stage_rank", "validate"]
