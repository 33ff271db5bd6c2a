"""Training memory: weights, gradients, optimizer states and activations, on paper and measured.

The accounting of Rajbhandari et al. 2020 ("ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", SC20), per parameter: 2 bytes of bf16 weights, 2 of bf16 gradients, and for
mixed-precision Adam 12 more (an fp32 master copy and two fp32 moments): 16 bytes a parameter,
112 GB for a 7B model before a single activation. The GaLore paper's baseline (Zhao et al. 2024)
keeps everything in bf16: 14 GB of weights, 14 GB of gradients and 28 GB of Adam moments for
LLaMA-7B, plus about 2 GB of activations: 58 GB.

Optimizer state per parameter tensor, in stored values (times the state dtype's bytes):

    SGD (momentum)    n                     momentum buffer (none without momentum)
    AdamW             2 n  (+ n amsgrad)    first and second moments
    Lion, Tiger       n                     one momentum (the update is its sign)
    Muon              n for a 2-D weight    momentum (orthogonalized on the fly);
                      2 n otherwise         its AdamW for embeddings, head, norms, biases
    GaLoreAdamW       r min(m,n) + 2 r max(m,n) for a 2-D (m, n) weight with the "std" projection
                      (projector + two low-rank moments), 2 n otherwise; r = min(rank, m, n)
    Adafactor         m + n for (m, n) (row and column second-moment factors; no first moment),
                      n for a vector (Shazeer & Stern 2018, "Adafactor", ICML)

Low-precision states: "bf16"/"fp16" halve them; "8bit" is bitsandbytes' blockwise quantization
(Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", ICLR): one byte a value
plus an fp32 scale per block of 2048 values.

Activations per transformer layer follow Korthikanti et al. 2023 ("Reducing Activation
Recomputation in Large Transformer Models", MLSys): s b h (34 + 5 a s / h) bytes for sequence
length s, batch b, hidden h, a heads, 16-bit activations; FlashAttention-style kernels drop the
5 a s / h term (the stored s x s attention scores).

`state_bytes(optimizer)` measures what an optimizer really holds (the one byte counter of
labkit: every chapter uses it); `predicted_state_bytes` applies the formulas above to its
parameters, and the tests hold the two equal. `grad_bytes(optimizer)` measures the gradients
its parameters hold (what gradient accumulation keeps between micro-steps).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from labkit import _checks

OPTIMIZERS = ("none", "sgd", "adamw", "lion", "tiger", "muon", "galore_adamw", "adafactor")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
BLOCK_8BIT = 2048  # values per quantization block of bitsandbytes' 8-bit optimizer states
_BYTES = {"fp64": 8, "float64": 8, "fp32": 4, "float32": 4, "tf32": 4, "bf16": 2, "bfloat16": 2,
          "fp16": 2, "float16": 2, "half": 2, "fp8": 1, "int8": 1, "8bit": 1 + 4 / BLOCK_8BIT}


# --------------------------------------------------------------------------- bytes per value


def bytes_per_value(dtype) -> float:
    """Bytes one stored value takes: a torch.dtype, a name ("bf16", "fp32", "8bit", ...) or a number."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _BYTES:
            return _BYTES[key]
        raise ValueError(f"bytes_per_value: dtype must be a torch.dtype, a number or one of {sorted(_BYTES)}, "
                         f"got {dtype!r}")
    if isinstance(dtype, numbers.Real) and not isinstance(dtype, bool) and dtype > 0:
        return float(dtype)
    raise TypeError(f"bytes_per_value: dtype must be a torch.dtype, a name or a positive number, got {dtype!r}")


def _shape(owner: str, shape) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        return tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{owner}: shape must be a tuple of ints >= 0, got {shape!r}")
    return tuple(int(d) for d in shape)


# --------------------------------------------------------------------------- per parameter tensor


def galore_state_numel(m: int, n: int, rank: int, proj_type: str = "std") -> int:
    """Projector + low-rank moments of GaLoreAdamW for one (m, n) weight (see the module docstring)."""
    _checks.choice("galore_state_numel", "proj_type", proj_type, PROJ_TYPES)
    rank = _checks.integer("galore_state_numel", "rank", rank, low=1)
    r = min(rank, m, n)
    side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(proj_type,
                                                                                                  proj_type)
    if side == "left":
        return m * r + 2 * r * n  # P (m, r), moments (r, n)
    if side == "right":
        return r * n + 2 * m * r  # Q (r, n), moments (m, r)
    return m * r + r * n + 2 * r * r  # P, Q, moments (r, r)


def state_numel(shape, optimizer: str, *, rank: int | None = None, proj_type: str = "std",
                momentum: bool = True, amsgrad: bool = False) -> int:
    """Values an optimizer stores for one parameter tensor of `shape` (step counters not counted)."""
    shape = _shape("state_numel", shape)
    _checks.choice("state_numel", "optimizer", optimizer, OPTIMIZERS)
    n = math.prod(shape)
    if optimizer == "none":
        return 0
    if optimizer == "sgd":
        return n if momentum else 0
    if optimizer == "adamw":
        return (3 if amsgrad else 2) * n
    if optimizer in ("lion", "tiger"):
        return n
    if optimizer == "muon":
        return n if len(shape) == 2 else 2 * n
    if optimizer == "galore_adamw":
        if rank is None or len(shape) != 2 or n == 0:
            return 2 * n
        return galore_state_numel(shape[0], shape[1], rank, proj_type)
    # adafactor (torch.optim.Adafactor): factored second moment for >= 2-D tensors
    if len(shape) >= 2:
        return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
    return n


def param_state_bytes(shape, optimizer: str, *, state_dtype="fp32", **kwargs) -> float:
    """Bytes of optimizer state for one parameter tensor: state_numel(...) * bytes_per_value(state_dtype)."""
    return state_numel(shape, optimizer, **kwargs) * bytes_per_value(state_dtype)


def bytes_per_param(optimizer: str, shape=(4096, 4096), *, state_dtype="fp32", **kwargs) -> float:
    """Optimizer-state bytes per parameter for a tensor of `shape` (elementwise optimizers: any shape)."""
    shape = _shape("bytes_per_param", shape)
    n = math.prod(shape)
    if n == 0:
        raise ValueError(f"bytes_per_param: shape must have at least one element, got {shape}")
    return param_state_bytes(shape, optimizer, state_dtype=state_dtype, **kwargs) / n


# --------------------------------------------------------------------------- measured state


def _storage_bytes(tensors, *, include_scalars: bool) -> int:
    """Bytes of the storages behind `tensors` (nested lists/tuples allowed), each storage once."""
    seen: dict[tuple, int] = {}
    stack = list(tensors)
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, torch.Tensor) and (include_scalars or v.dim() > 0):
            storage = v.untyped_storage()
            seen[(v.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _optimizer(owner: str, optimizer) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def state_bytes(optimizer: torch.optim.Optimizer, *, include_scalars: bool = False) -> int:
    """Bytes of the tensors an optimizer's state holds now, each storage counted once.

    0-dim tensors (step counters) are left out unless include_scalars: they cost O(#tensors),
    not O(#parameters). A state tensor that is a view of a larger storage counts the storage.
    """
    _optimizer("state_bytes", optimizer)
    return _storage_bytes([v for st in optimizer.state.values() for v in st.values()],
                          include_scalars=include_scalars)


def grad_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the .grad tensors the optimizer's parameters hold now, each storage once (a tied
    parameter counts once): what gradient accumulation keeps between micro-steps."""
    _optimizer("grad_bytes", optimizer)
    return _storage_bytes([p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None],
                          include_scalars=True)


def _kind_of(optimizer: torch.optim.Optimizer, group: dict) -> tuple[str, dict]:
    """(formula name, keyword arguments) for one param group of a known optimizer class."""
    name = type(optimizer).__name__
    if name == "MuonWithAdamW":
        return ("muon" if group["use_muon"] else "adamw"), {}
    if name == "SGD":
        return "sgd", {"momentum": group.get("momentum", 0) != 0}
    if name in ("AdamW", "Adam"):
        return "adamw", {"amsgrad": bool(group.get("amsgrad", False))}
    if name in ("Lion", "Tiger", "Muon", "Adafactor"):
        return name.lower(), {}
    if name == "GaLoreAdamW":
        return "galore_adamw", {"rank": group.get("rank"), "proj_type": group.get("proj_type", "std")}
    raise ValueError(f"predicted_state_bytes: no formula for optimizer class {name}; known: SGD, AdamW, Adam, Lion, "
                     f"Tiger, Muon, MuonWithAdamW, GaLoreAdamW, Adafactor")


def _state_dtype(group: dict, p: torch.Tensor):
    for key in ("state_dtype", "moment_dtype", "exp_avg_dtype"):
        if group.get(key) is not None:
            return group[key]
    return p.dtype


def predicted_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The formulas applied to every parameter of `optimizer`: its state once each has taken a step."""
    _optimizer("predicted_state_bytes", optimizer)
    total, seen = 0.0, set()
    for group in optimizer.param_groups:
        kind, kwargs = _kind_of(optimizer, group)
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                total += param_state_bytes(p.shape, kind, state_dtype=_state_dtype(group, p), **kwargs)
    return int(round(total))


# --------------------------------------------------------------------------- a model on paper


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor of a model on paper. kind: "matrix" (a block's linear weight),
    "embedding", "head", "norm", "bias" or "other"; layer: the block index (None outside blocks)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    layer: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# LLaMA-shaped configurations (vocabulary 32000, SwiGLU, RMSNorm, untied head). "7B" and "13B"
# are LLaMA's published shapes (Touvron et al. 2023); the smaller ones are LLaMA-shaped models of
# the sizes used in GaLore-style pre-training studies.
LLAMA_CONFIGS = {
    "60M": dict(n_layer=8, d_model=512, d_ff=1376, n_head=8),
    "130M": dict(n_layer=12, d_model=768, d_ff=2048, n_head=12),
    "350M": dict(n_layer=24, d_model=1024, d_ff=2736, n_head=16),
    "1B": dict(n_layer=24, d_model=2048, d_ff=5461, n_head=32),
    "7B": dict(n_layer=32, d_model=4096, d_ff=11008, n_head=32),
    "13B": dict(n_layer=40, d_model=5120, d_ff=13824, n_head=40),
}


def transformer_params(n_layer: int, d_model: int, *, vocab_size: int = 32000, d_ff: int | None = None,
                       n_head: int | None = None, n_kv_head: int | None = None, mlp: str = "swiglu",
                       tie_embeddings: bool = False, bias: bool = False, norm: str = "rmsnorm",
                       max_positions: int = 0) -> list[ParamSpec]:
    """The parameter tensors of a pre-norm decoder (LLaMA by default; GPT-2 with mlp="gelu",
    norm="layernorm", max_positions=block size, tie_embeddings=True). Weights are (out, in)."""
    owner = "transformer_params"
    n_layer = _checks.integer(owner, "n_layer", n_layer, low=1)
    d = _checks.integer(owner, "d_model", d_model, low=1)
    vocab = _checks.integer(owner, "vocab_size", vocab_size, low=1)
    f = 4 * d if d_ff is None else _checks.integer(owner, "d_ff", d_ff, low=1)
    _checks.choice(owner, "mlp", mlp, ("swiglu", "gelu"))
    _checks.choice(owner, "norm", norm, ("rmsnorm", "layernorm"))
    h = n_head or max(1, d // 128)
    kv = n_kv_head or h
    if d % h or h % kv:
        raise ValueError(f"{owner}: n_head must divide d_model and n_kv_head divide n_head, got d_model={d}, "
                         f"n_head={h}, n_kv_head={kv}")
    d_kv = d // h * kv
    norm_shapes = [(d,)] if norm == "rmsnorm" or not bias else [(d,), (d,)]
    specs = [ParamSpec("tok_emb.weight", (vocab, d), "embedding")]
    if max_positions:
        specs.append(ParamSpec("pos_emb.weight", (max_positions, d), "embedding"))
    for i in range(n_layer):
        linears = [("attn.q", (d, d)), ("attn.k", (d_kv, d)), ("attn.v", (d_kv, d)), ("attn.o", (d, d))]
        linears += [("mlp.gate", (f, d))] if mlp == "swiglu" else []
        linears += [("mlp.up", (f, d)), ("mlp.down", (d, f))]
        for j, s in enumerate(norm_shapes * 2):
            specs.append(ParamSpec(f"blocks.{i}.norm{j}", s, "norm", i))
        for name, s in linears:
            specs.append(ParamSpec(f"blocks.{i}.{name}.weight", s, "matrix", i))
            if bias:
                specs.append(ParamSpec(f"blocks.{i}.{name}.bias", (s[0],), "bias", i))
    specs += [ParamSpec(f"norm_f.{j}", s, "norm") for j, s in enumerate(norm_shapes)]
    if not tie_embeddings:
        specs.append(ParamSpec("lm_head.weight", (vocab, d), "head"))
    return specs


def llama_params(size: str = "7B") -> list[ParamSpec]:
    """The parameter tensors of a LLaMA-shaped model: one of LLAMA_CONFIGS' sizes."""
    _checks.choice("llama_params", "size", size, tuple(LLAMA_CONFIGS))
    return transformer_params(**LLAMA_CONFIGS[size])


def model_params(model: nn.Module) -> list[ParamSpec]:
    """ParamSpecs of a real model: its blocks' 2-D Linear weights are "matrix" (what GaLore and
    Muon act on); a Linear outside the blocks is the "head" (an embedding when tied)."""
    from labkit.optim.lisa import find_blocks

    if not isinstance(model, nn.Module):
        raise TypeError(f"model_params: model must be an nn.Module, got {type(model).__name__}")
    try:
        blocks = list(find_blocks(model))
    except ValueError:
        blocks = []
    layer_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    kind_of: dict[int, str] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, nn.Embedding):
                kind = "embedding"
            elif isinstance(module, nn.Linear) and p.dim() == 2:
                kind = "matrix" if id(p) in layer_of else "head"
            elif "norm" in type(module).__name__.lower():
                kind = "norm"
            else:
                kind = "bias" if p.dim() == 1 else "other"
            if kind_of.get(id(p)) != "embedding":  # a tied head stays an embedding
                kind_of[id(p)] = kind
    return [ParamSpec(name, tuple(p.shape), kind_of[id(p)], layer_of.get(id(p)))
            for name, p in model.named_parameters()]


def _specs(owner: str, params) -> list[ParamSpec]:
    if isinstance(params, nn.Module):
        return model_params(params)
    if isinstance(params, numbers.Integral) and not isinstance(params, bool):
        if params < 0:
            raise ValueError(f"{owner}: params must be >= 0, got {params}")
        return [ParamSpec("all", (int(params),), "other")]
    if isinstance(params, str) and params in LLAMA_CONFIGS:
        return llama_params(params)
    if isinstance(params, Sequence) and all(isinstance(s, ParamSpec) for s in params):
        return list(params)
    raise TypeError(f"{owner}: params must be a parameter count, a list of ParamSpec, an nn.Module or one of "
                    f"{tuple(LLAMA_CONFIGS)}, got {type(params).__name__}")


# --------------------------------------------------------------------------- the whole budget


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of one training setup: weights, fp32 master copy, gradients, optimizer state, activations."""

    weights: float
    master: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.master + self.grads + self.optimizer + self.activations

    def parts(self) -> dict[str, float]:
        return {"weights": self.weights, "fp32 master": self.master, "gradients": self.grads,
                "optimizer states": self.optimizer, "activations": self.activations}

    def gb(self) -> dict[str, float]:
        """The parts and the total in GB (1e9 bytes, as papers quote them)."""
        return {**{k: v / 1e9 for k, v in self.parts().items()}, "total": self.total / 1e9}


def activation_bytes(n_layer: int, d_model: int, n_head: int, seq_len: int, batch: int = 1, *,
                     flash_attention: bool = False) -> float:
    """Activations a 16-bit transformer stores for its backward pass (Korthikanti et al. 2023):
    n_layer * s b h (34 + 5 a s / h) bytes; flash_attention drops the 5 a s / h score term."""
    owner = "activation_bytes"
    L, h, a = (_checks.integer(owner, k, v, low=1) for k, v in (("n_layer", n_layer), ("d_model", d_model),
                                                                 ("n_head", n_head)))
    s = _checks.integer(owner, "seq_len", seq_len, low=1)
    b = _checks.integer(owner, "batch", batch, low=1)
    per_layer = s * b * h * (34 + (0 if flash_attention else 5 * a * s / h))
    return float(L * per_layer)


def training_memory(params, *, optimizer: str = "adamw", weight_dtype="bf16", grad_dtype=None, state_dtype=None,
                    master_weights: bool = False, rank: int | None = None, proj_type: str = "std",
                    lisa_layers: int | None = None, layerwise_grads: bool = False,
                    activations: float = 0.0) -> MemoryBreakdown:
    """Memory of training `params` (a count, ParamSpecs, an nn.Module or a LLAMA_CONFIGS size) on paper.

    optimizer: one of OPTIMIZERS. GaLore ("galore_adamw", with `rank`) and Muon act on the blocks'
    "matrix" tensors; every other tensor gets AdamW (a bare count is all elementwise).
    grad_dtype / state_dtype default to weight_dtype (the GaLore paper's all-bf16 baseline);
    master_weights adds an fp32 copy of the trainable weights (mixed precision, ZeRO's 16 bytes).
    lisa_layers: only that many blocks (plus everything outside the blocks) train, as in LISA.
    layerwise_grads: the optimizer steps each tensor inside the backward pass (GaLore's per-layer
    updates), so only the largest trainable gradient exists at a time.
    activations: bytes (see activation_bytes).
    """
    owner = "training_memory"
    specs = _specs(owner, params)
    _checks.choice(owner, "optimizer", optimizer, OPTIMIZERS)
    if optimizer == "galore_adamw":
        _checks.integer(owner, "rank", rank, low=1)
    if lisa_layers is not None:
        _checks.integer(owner, "lisa_layers", lisa_layers, low=0)
    activations = _checks.number(owner, "activations", activations, low=0.0)
    wb = bytes_per_value(weight_dtype)
    gb = bytes_per_value(grad_dtype if grad_dtype is not None else weight_dtype)
    sb = bytes_per_value(state_dtype if state_dtype is not None else weight_dtype)

    trainable = [s for s in specs if lisa_layers is None or s.layer is None or s.layer < lisa_layers]
    weights = sum(s.numel for s in specs) * wb
    master = sum(s.numel for s in trainable) * 4.0 if master_weights else 0.0
    if layerwise_grads:
        grads = max((s.numel for s in trainable), default=0) * gb
    else:
        grads = sum(s.numel for s in trainable) * gb
    states = 0.0
    for s in trainable:
        kind = optimizer
        if optimizer in ("muon", "galore_adamw") and s.kind != "matrix":
            kind = "adamw"  # the paper recipes: embeddings, head, norms, biases stay on AdamW
        states += param_state_bytes(s.shape, kind, state_dtype=sb, rank=rank, proj_type=proj_type)
    return MemoryBreakdown(weights=float(weights), master=float(master), grads=float(grads),
                           optimizer=float(states), activations=activations)


def svd_flops(m: int, n: int) -> float:
    """Approximate FLOPs of a thin SVD (U, S, V) of an (m, n) matrix: 6 l s^2 + 20 s^3 with
    s = min(m, n), l = max(m, n) (Golub & Van Loan, Matrix Computations, R-SVD count)."""
    s, l = min(m, n), max(m, n)
    return 6.0 * l * s * s + 20.0 * s**3


def galore_svd_overhead(params, update_proj_gap: int, tokens_per_step: int) -> float:
    """GaLore's SVD FLOPs per step (all "matrix" tensors, amortized over the gap) / 6 N tokens."""
    owner = "galore_svd_overhead"
    specs = _specs(owner, params)
    gap = _checks.integer(owner, "update_proj_gap", update_proj_gap, low=1)
    tokens = _checks.integer(owner, "tokens_per_step", tokens_per_step, low=1)
    svd = sum(svd_flops(*s.shape) for s in specs if s.kind == "matrix")
    n = sum(s.numel for s in specs)
    return svd / gap / (6.0 * n * tokens)


__all__ = ["BLOCK_8BIT", "LLAMA_CONFIGS", "MemoryBreakdown", "OPTIMIZERS", "ParamSpec", "activation_bytes",
           "bytes_per_param", "bytes_per_value", "galore_state_numel", "galore_svd_overhead", "grad_bytes",
           "llama_params", "model_params", "param_state_bytes", "predicted_state_bytes", "state_bytes",
           "state_numel", "svd_flops", "training_memory", "transformer_params"]
