"""Arithmetic intensity and the roofline model.

An operation does `flops` floating-point operations and moves `bytes` between the chip and
its main memory (HBM on a GPU, DRAM on a CPU). Its arithmetic intensity is

    I = flops / bytes                                   (FLOP per byte)

and a device with peak compute P (FLOP/s) and memory bandwidth W (bytes/s) can run it at
most at

    attainable(I) = min(P, W * I)                       (the roofline)

The two roofs meet at the ridge point I* = P / W. Below it an operation is memory-bound
(faster memory helps, more FLOP/s do not); above it, compute-bound. A bf16 H100 has
I* ~ 295 FLOP/byte: a large GEMM sits far above it, while elementwise ops, norms, softmax
and every GEMV of autoregressive decoding (intensity ~ 1 FLOP/byte) sit far below. That gap
is the "memory wall".

Byte counts here are the *minimum* traffic: each input read once, each output written once
(perfect on-chip reuse). Real kernels move at least this much, so the intensities are upper
bounds. FLOP counts follow the usual convention: a multiply-add is 2 FLOPs, and an `exp`, a
compare or a division count 1 each.

References:
    S. Williams, A. Waterman, D. Patterson, "Roofline: an insightful visual performance
        model for multicore architectures", CACM 52(4), 2009.
    NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOP/s dense BF16, 494 TF32,
        67 FP32, 3.35 TB/s HBM3); NVIDIA A100 datasheet (SXM4 80GB: 312 TFLOP/s BF16,
        156 TF32, 19.5 FP32, 2,039 GB/s HBM2e).
    J. Kaplan et al., "Scaling Laws for Neural Language Models", 2020 (C ~ 6 N D).
    T. Dao et al., "FlashAttention", 2022 (attention without materializing the T x T scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import torch

# --- dtypes -----------------------------------------------------------------------------

# Canonical short names used as keys of Device.peak_flops. "tf32" is fp32 storage (4 bytes)
# computed on tensor cores with a 10-bit mantissa.
DTYPE_BYTES: dict[str, int] = {"fp64": 8, "fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}

_ALIASES = {
    "float64": "fp64", "double": "fp64", "float32": "fp32", "float": "fp32",
    "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}

_TORCH_NAMES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int8: "int8",
}
for _n in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _n):
        _TORCH_NAMES[getattr(torch, _n)] = "fp8"

_TORCH_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32,
                 "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype, *, where: str = "dtype_name") -> str:
    """Canonical name of a torch dtype or a name: torch.bfloat16 -> 'bf16', 'float32' -> 'fp32'."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_NAMES:
            raise ValueError(f"{where}: dtype must be a floating dtype like torch.bfloat16, got {dtype}")
        return _TORCH_NAMES[dtype]
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        key = _ALIASES.get(key, key)
        if key not in DTYPE_BYTES:
            raise ValueError(f"{where}: dtype must be one of {sorted(DTYPE_BYTES)} or a torch dtype, got {dtype!r}")
        return key
    raise TypeError(f"{where}: dtype must be a torch.dtype or a name like 'bf16', got {type(dtype).__name__}")


def bytes_per_element(dtype, *, where: str = "bytes_per_element") -> float:
    """Bytes of one element: a torch dtype, a name ('bf16'), or a positive number (e.g. 0.5 for 4-bit)."""
    if isinstance(dtype, (int, float)) and not isinstance(dtype, bool):
        if not (dtype > 0 and math.isfinite(dtype)):
            raise ValueError(f"{where}: dtype as bytes per element must be a positive number, got {dtype!r}")
        return dtype
    return DTYPE_BYTES[dtype_name(dtype, where=where)]


# --- input checks -----------------------------------------------------------------------


def _pos_int(where: str, name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value}")
    return value


def _nonneg_num(where: str, name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}")
    if math.isnan(value) or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{where}: {name} must be {kind} number, got {value!r}")
    return value


# --- operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """An operation's work (`flops`) and its minimum memory traffic (`bytes`)."""

    name: str
    flops: float
    bytes: float

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Op: name must be a str, got {type(self.name).__name__}")
        _nonneg_num("Op", "flops", self.flops)
        _nonneg_num("Op", "bytes", self.bytes, positive=True)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.bytes

    def __add__(self, other: "Op") -> "Op":
        """Two ops run back to back (their traffic adds: nothing is fused)."""
        if not isinstance(other, Op):
            return NotImplemented
        return Op(f"{self.name} + {other.name}", self.flops + other.flops, self.bytes + other.bytes)


def gemm(M: int, N: int, K: int, *, batch: int = 1, dtype=torch.bfloat16, name: str | None = None) -> Op:
    """C = A @ B with A (M, K), B (K, N), C (M, N); `batch` independent products (bmm).

    FLOPs 2*M*N*K (a multiply and an add per (m, n, k)); bytes (M*K + K*N + M*N) * size.
    """
    where = "gemm"
    for n, v in (("M", M), ("N", N), ("K", K), ("batch", batch)):
        _pos_int(where, n, v)
    s = bytes_per_element(dtype, where=where)
    flops = 2 * M * N * K * batch
    nbytes = (M * K + K * N + M * N) * batch * s  # read A, read B, write C
    return Op(name or f"gemm {M}x{N}x{K}", flops, nbytes)


def gemv(N: int, K: int, *, batch: int = 1, dtype=torch.bfloat16, name: str | None = None) -> Op:
    """Decode-time linear layer: `batch` token vectors x (batch, K) times a weight W (K, N).

    The same count as gemm(batch, N, K): the weight (K*N elements) is read once per step
    whatever the batch, so the intensity is ~ batch * 2 / size FLOP/byte (~ batch in bf16).
    """
    where = "gemv"
    for n, v in (("N", N), ("K", K), ("batch", batch)):
        _pos_int(where, n, v)
    op = gemm(batch, N, K, dtype=bytes_per_element(dtype, where=where))
    return Op(name or f"gemv {K}->{N} (batch {batch})", op.flops, op.bytes)


def elementwise(n: int, *, n_inputs: int = 2, flops_per_element: float = 1, dtype=torch.bfloat16,
                name: str | None = None) -> Op:
    """An elementwise op over n elements: reads `n_inputs` tensors of n, writes one (c = a + b: 2 inputs, 1 FLOP)."""
    where = "elementwise"
    _pos_int(where, "n", n)
    _pos_int(where, "n_inputs", n_inputs, minimum=0)
    _nonneg_num(where, "flops_per_element", flops_per_element)
    s = bytes_per_element(dtype, where=where)
    return Op(name or f"elementwise n={n}", n * flops_per_element, (n_inputs + 1) * n * s)


SOFTMAX_FLOPS_PER_ELEMENT = 5  # max-compare, subtract, exp, sum, divide
RMSNORM_FLOPS_PER_ELEMENT = 4  # square, sum, scale by rsqrt, multiply by weight
LAYERNORM_FLOPS_PER_ELEMENT = 7  # sum (mean), subtract, square, sum (var), scale, weight, bias


def softmax(rows: int, cols: int, *, dtype=torch.bfloat16, name: str | None = None) -> Op:
    """Row softmax of x (rows, cols): read x once, write y once; 5 FLOPs per element."""
    where = "softmax"
    _pos_int(where, "rows", rows)
    _pos_int(where, "cols", cols)
    s = bytes_per_element(dtype, where=where)
    n = rows * cols
    return Op(name or f"softmax {rows}x{cols}", SOFTMAX_FLOPS_PER_ELEMENT * n, 2 * n * s)


def norm(tokens: int, hidden: int, *, kind: str = "rms", dtype=torch.bfloat16, name: str | None = None) -> Op:
    """RMSNorm (kind='rms') or LayerNorm (kind='layer') of x (tokens, hidden) with weight (hidden,) [+ bias]."""
    where = "norm"
    _pos_int(where, "tokens", tokens)
    _pos_int(where, "hidden", hidden)
    if kind not in ("rms", "layer"):
        raise ValueError(f"norm: kind must be 'rms' or 'layer', got {kind!r}")
    s = bytes_per_element(dtype, where=where)
    n = tokens * hidden
    per, params = (RMSNORM_FLOPS_PER_ELEMENT, 1) if kind == "rms" else (LAYERNORM_FLOPS_PER_ELEMENT, 2)
    nbytes = (2 * n + params * hidden) * s  # read x, write y, read weight (and bias)
    return Op(name or f"{kind}norm {tokens}x{hidden}", per * n, nbytes)


def attention(batch: int, heads: int, seq_len: int, head_dim: int, *, fused: bool = True,
              dtype=torch.bfloat16, name: str | None = None) -> Op:
    """Self-attention softmax(Q K^T / sqrt(D)) V over Q, K, V, O of shape (B, H, T, D).

    FLOPs: Q K^T and P V are 2*B*H*T*T*D each, plus the softmax on the (B, H, T, T) scores
    (the 1/sqrt(D) scale is folded into it). Bytes:
      naive (fused=False): S = Q K^T is written to memory, read by softmax, P written,
          read again by P V: 4*B*H*T*D + 4*B*H*T*T elements;
      fused (FlashAttention): scores stay on chip; read Q, K, V and write O: 4*B*H*T*D.
    """
    where = "attention"
    for n, v in (("batch", batch), ("heads", heads), ("seq_len", seq_len), ("head_dim", head_dim)):
        _pos_int(where, n, v)
    if not isinstance(fused, bool):
        raise TypeError(f"attention: fused must be a bool, got {type(fused).__name__}")
    s = bytes_per_element(dtype, where=where)
    bh, T, D = batch * heads, seq_len, head_dim
    flops = 2 * 2 * bh * T * T * D + SOFTMAX_FLOPS_PER_ELEMENT * bh * T * T
    qkvo = 4 * bh * T * D  # (B, H, T, D) x 4
    scores = 0 if fused else 4 * bh * T * T  # S written + read, P written + read: (B, H, T, T) x 4
    label = name or f"{'fused' if fused else 'naive'} attention T={T}"
    return Op(label, flops, (qkvo + scores) * s)


def decode_attention(batch: int, heads: int, kv_len: int, head_dim: int, *, kv_heads: int | None = None,
                     dtype=torch.bfloat16, name: str | None = None) -> Op:
    """One new token per sequence attending to a KV cache of length L.

    q (B, H, 1, D) against K, V caches (B, Hkv, L, D) (Hkv < H: grouped-query attention).
    FLOPs 4*B*H*L*D + softmax; bytes: read q, K, V; write o. Intensity ~ 2*H / (Hkv * size):
    independent of the batch, because every sequence has its own cache.
    """
    where = "decode_attention"
    for n, v in (("batch", batch), ("heads", heads), ("kv_len", kv_len), ("head_dim", head_dim)):
        _pos_int(where, n, v)
    kv_heads = heads if kv_heads is None else _pos_int(where, "kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"decode_attention: heads must be a multiple of kv_heads, "
                         f"got heads={heads}, kv_heads={kv_heads}")
    s = bytes_per_element(dtype, where=where)
    flops = 4 * batch * heads * kv_len * head_dim + SOFTMAX_FLOPS_PER_ELEMENT * batch * heads * kv_len
    nbytes = (2 * batch * heads * head_dim + 2 * batch * kv_heads * kv_len * head_dim) * s  # q, o + K, V cache
    return Op(name or f"decode attention L={kv_len}", flops, nbytes)


def decoder_weight_shapes(hidden: int, *, ffn_hidden: int | None = None,
                          kv_dim: int | None = None) -> dict[str, tuple[int, int]]:
    """The weight matrices of one decoder layer as (K, N): a GEMM (tokens, K) @ (K, N) each.

    QKV projection (h -> h + 2 kv_dim), output projection (h -> h), MLP up (h -> f) and MLP
    down (f -> h), keyed by the names decoder_layer_ops gives their GEMMs. ffn_hidden (f)
    defaults to 4 * hidden, kv_dim to hidden (multi-head attention; GQA makes it smaller).
    """
    where = "decoder_weight_shapes"
    _pos_int(where, "hidden", hidden)
    f = 4 * hidden if ffn_hidden is None else _pos_int(where, "ffn_hidden", ffn_hidden)
    kv = hidden if kv_dim is None else _pos_int(where, "kv_dim", kv_dim)
    return {
        "QKV proj": (hidden, hidden + 2 * kv),  # (t, h) @ (h, h + 2 kv)
        "out proj": (hidden, hidden),  # (t, h) @ (h, h)
        "MLP up": (hidden, f),  # (t, h) @ (h, f)
        "MLP down": (f, hidden),  # (t, f) @ (f, h)
    }


def decoder_layer_ops(batch: int, seq_len: int, hidden: int, *, heads: int | None = None,
                      kv_heads: int | None = None, ffn_hidden: int | None = None, phase: str = "prefill",
                      fused_attention: bool = True, dtype=torch.bfloat16) -> list[Op]:
    """The ops of one pre-norm decoder layer (RMSNorm, attention, MLP), as the roofline sees them.

    phase='prefill': batch * seq_len tokens go through at once (training looks like this too);
    phase='decode': one new token per sequence, attending to a cache of seq_len tokens.
    heads defaults to hidden // 128 (at least 1), ffn_hidden to 4 * hidden.
    """
    where = "decoder_layer_ops"
    _pos_int(where, "batch", batch)
    _pos_int(where, "seq_len", seq_len)
    _pos_int(where, "hidden", hidden)
    heads = max(1, hidden // 128) if heads is None else _pos_int(where, "heads", heads)
    kv_heads = heads if kv_heads is None else _pos_int(where, "kv_heads", kv_heads)
    ffn = 4 * hidden if ffn_hidden is None else _pos_int(where, "ffn_hidden", ffn_hidden)
    if hidden % heads:
        raise ValueError(f"decoder_layer_ops: hidden must be a multiple of heads, got hidden={hidden}, heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"decoder_layer_ops: heads must be a multiple of kv_heads, got {heads} and {kv_heads}")
    if phase not in ("prefill", "decode"):
        raise ValueError(f"decoder_layer_ops: phase must be 'prefill' or 'decode', got {phase!r}")
    s = bytes_per_element(dtype, where=where)
    D = hidden // heads
    kv_dim = kv_heads * D
    tokens = batch * seq_len if phase == "prefill" else batch  # rows of every GEMM
    if phase == "prefill":
        attn = attention(batch, heads, seq_len, D, fused=fused_attention, dtype=s, name="attention")
        if kv_heads != heads:  # K, V are smaller: only their reads shrink
            attn = Op("attention", attn.flops, attn.bytes - 2 * batch * (heads - kv_heads) * seq_len * D * s)
    else:
        attn = decode_attention(batch, heads, seq_len, D, kv_heads=kv_heads, dtype=s, name="attention (KV cache)")
    w = {name: gemm(tokens, N, K, dtype=s, name=name)  # (tokens, K) @ (K, N)
         for name, (K, N) in decoder_weight_shapes(hidden, ffn_hidden=ffn, kv_dim=kv_dim).items()}
    return [
        norm(tokens, hidden, kind="rms", dtype=s, name="rmsnorm"),
        w["QKV proj"],
        attn,
        w["out proj"],
        elementwise(tokens * hidden, dtype=s, name="residual add"),
        norm(tokens, hidden, kind="rms", dtype=s, name="rmsnorm 2"),
        w["MLP up"],
        elementwise(tokens * ffn, n_inputs=1, flops_per_element=8, dtype=s, name="GELU"),
        w["MLP down"],
        elementwise(tokens * hidden, dtype=s, name="residual add 2"),
    ]


# --- the roofline -----------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A chip as the roofline sees it: peak FLOP/s per dtype name and memory bandwidth in bytes/s."""

    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Device: name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.peak_flops, dict) or not self.peak_flops:
            raise ValueError(f"Device: peak_flops must be a non-empty dict of dtype -> FLOP/s, got {self.peak_flops!r}")
        peaks = {}
        for k, v in self.peak_flops.items():
            peaks[dtype_name(k, where="Device")] = _nonneg_num("Device", f"peak_flops[{k!r}]", v, positive=True)
        object.__setattr__(self, "peak_flops", peaks)
        _nonneg_num("Device", "bandwidth", self.bandwidth, positive=True)
        if not math.isfinite(self.bandwidth):
            raise ValueError(f"Device: bandwidth must be finite, got {self.bandwidth}")

    def peak(self, dtype) -> float:
        """Peak FLOP/s for `dtype` (a torch dtype or a name like 'bf16')."""
        key = dtype_name(dtype, where="Device.peak")
        if key not in self.peak_flops:
            raise ValueError(f"Device.peak: {self.name} has no peak for dtype {key!r}; "
                             f"it has {sorted(self.peak_flops)}")
        return self.peak_flops[key]

    def ridge(self, dtype) -> float:
        """Ridge point, FLOP/byte: the intensity at which the two roofs meet."""
        return self.peak(dtype) / self.bandwidth


# Dense (no 2:4 sparsity) tensor-core peaks from the datasheets; "fp32" is the non-tensor-core
# rate, which is what a plain fp32 matmul gets unless TF32 is allowed.
H100_SXM = Device(
    "H100 SXM",
    {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12, "fp16": 989e12, "fp8": 1979e12},
    3.35e12,
    source="NVIDIA H100 Tensor Core GPU datasheet (SXM5)",
)
A100_SXM_80GB = Device(
    "A100 SXM 80GB",
    {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    2.039e12,
    source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)",
)


def _check_device(where: str, device) -> Device:
    if not isinstance(device, Device):
        raise TypeError(f"{where}: device must be a labkit.perf.roofline.Device, got {type(device).__name__}")
    return device


def attainable(device: Device, intensity: float, dtype=torch.bfloat16) -> float:
    """Roofline bound on FLOP/s at `intensity` FLOP/byte: min(peak, bandwidth * intensity)."""
    _check_device("attainable", device)
    _nonneg_num("attainable", "intensity", intensity)
    return min(device.peak(dtype), device.bandwidth * intensity)


def ridge_point(device: Device, dtype=torch.bfloat16) -> float:
    """Intensity (FLOP/byte) where memory- and compute-bound meet: peak / bandwidth."""
    return _check_device("ridge_point", device).ridge(dtype)


def is_memory_bound(device: Device, op: Op, dtype=torch.bfloat16) -> bool:
    """True when `op` sits left of the ridge (its time is set by bytes, not FLOPs)."""
    if not isinstance(op, Op):
        raise TypeError(f"is_memory_bound: op must be an Op, got {type(op).__name__}")
    return op.intensity < ridge_point(device, dtype)


def roofline_time(device: Device, op: Op, dtype=torch.bfloat16) -> float:
    """Lower bound on the op's run time, seconds: max(flops / peak, bytes / bandwidth)."""
    _check_device("roofline_time", device)
    if not isinstance(op, Op):
        raise TypeError(f"roofline_time: op must be an Op, got {type(op).__name__}")
    return max(op.flops / device.peak(dtype), op.bytes / device.bandwidth)


# --- measuring the current machine ------------------------------------------------------


def _torch_dtype(where: str, dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        dtype_name(dtype, where=where)
        return dtype
    key = dtype_name(dtype, where=where)
    if key not in _TORCH_DTYPES:
        raise ValueError(f"{where}: cannot run dtype {key!r} here; use one of {sorted(_TORCH_DTYPES)}")
    return _TORCH_DTYPES[key]


class _allow_tf32:
    """Let fp32 matmuls use TF32 tensor cores inside the block when `on`, forbid it otherwise
    (the previous setting is restored after).

    Uses torch.set_float32_matmul_precision ("high" allows TF32, "highest" forbids it), not the
    legacy torch.backends.cuda.matmul.allow_tf32 switch, which raises on torch >= 2.9 once the
    per-backend `fp32_precision` API has been used. When that API has left the global setting
    unreadable (it raises then too), the CUDA matmul backend's own setting is saved and set.
    """

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        try:
            self.saved = ("global", torch.get_float32_matmul_precision())
        except RuntimeError:  # torch >= 2.9: the per-backend and the global settings disagree
            matmul = torch.backends.cuda.matmul
            self.saved = ("cuda", matmul.fp32_precision)
            matmul.fp32_precision = "tf32" if self.on else "ieee"
            return self
        torch.set_float32_matmul_precision("high" if self.on else "highest")
        return self

    def __exit__(self, *exc):
        kind, value = self.saved
        if kind == "global":
            torch.set_float32_matmul_precision(value)
        else:
            torch.backends.cuda.matmul.fp32_precision = value


def _default_dtype() -> torch.dtype:
    from labkit import runtime

    return runtime.pick(cpu=torch.float32, gpu=torch.bfloat16)


def probe_device(dtypes=None, *, device=None, matmul_size: int | None = None,
                 copy_bytes: int | None = None) -> Device:
    """Measure this machine's roofline: FLOP/s of a square matmul per dtype, bytes/s of a large copy.

    Sizes come from labkit.runtime.pick (well under a second on a 2-core CPU). A copy reads and
    writes its buffer, so it moves 2 * nbytes. Peaks use the fastest repeat (a shared CPU is
    noisy). Measured peaks sit below the datasheet's.
    """
    from labkit import bench, runtime

    dev = torch.device(device) if device is not None else runtime.device()
    if dtypes is None:
        dtypes = runtime.pick(cpu=("fp32",), gpu=("bf16", "fp32"))
    if isinstance(dtypes, (str, torch.dtype)):
        dtypes = (dtypes,)
    if not isinstance(dtypes, (tuple, list)) or not dtypes:
        raise ValueError(f"probe_device: dtypes must be a non-empty tuple of dtypes like ('bf16',), got {dtypes!r}")
    n = runtime.pick(cpu=512, gpu=8192) if matmul_size is None else _pos_int("probe_device", "matmul_size", matmul_size)
    nbytes = runtime.pick(cpu=32 * 2**20, gpu=2 * 2**30) if copy_bytes is None else \
        _pos_int("probe_device", "copy_bytes", copy_bytes)
    repeats = runtime.pick(cpu=15, gpu=10)  # short calls: on a busy CPU some repeat runs undisturbed
    peaks = {}
    for dt in dtypes:
        key = dtype_name(dt, where="probe_device")
        tdt = _torch_dtype("probe_device", dt)
        a = torch.randn(n, n, device=dev).to(tdt)  # (n, n)
        b = torch.randn(n, n, device=dev).to(tdt)  # (n, n)
        c = torch.empty(n, n, device=dev, dtype=tdt)
        with _allow_tf32(key == "tf32"):
            t = bench.timeit(lambda: torch.mm(a, b, out=c), warmup=2, repeats=repeats, device=dev)
        peaks[key] = 2 * n**3 / t.min_s  # a peak: the best of the repeats
        del a, b, c
    x = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).fill_(1.0)  # (nbytes / 4,)
    y = torch.empty_like(x)
    t = bench.timeit(lambda: y.copy_(x), warmup=2, repeats=repeats, device=dev)
    bw = 2 * x.numel() * 4 / t.min_s
    del x, y
    return Device(f"{bench.device_name(dev)} (measured)", peaks, bw, source="labkit.perf.roofline.probe_device")


@dataclass(frozen=True)
class Measurement:
    """An op run for real: its model counts, its time (seconds per call), where and in what dtype."""

    op: Op
    seconds: float
    device: str
    dtype: str
    extra: dict = field(default_factory=dict)

    @property
    def intensity(self) -> float:
        return self.op.intensity

    @property
    def flops_per_s(self) -> float:
        """Achieved FLOP/s (the model's FLOPs over the measured time)."""
        return self.op.flops / self.seconds

    @property
    def bytes_per_s(self) -> float:
        """Effective bandwidth: the model's minimum bytes over the measured time."""
        return self.op.bytes / self.seconds

    def as_dict(self) -> dict:
        """A flat record for benchmark files."""
        return {"name": self.op.name, **self.extra, "dtype": self.dtype, "device": self.device,
                "flops": float(self.op.flops), "bytes": float(self.op.bytes), "intensity": self.intensity,
                "median_ms": self.seconds * 1e3, "tflops": self.flops_per_s / 1e12,
                "gb_per_s": self.bytes_per_s / 1e9}


def _setup_op(kind: str, shape: dict, dtype: torch.dtype, dev: torch.device) -> tuple[Op, Callable[[], object]]:
    """The op's counts and a closure that runs it (inputs allocated once, outside the timing)."""
    F = torch.nn.functional

    def rand(*size):
        return torch.randn(*size, device=dev).to(dtype)

    def need(*names, optional=()):
        """The required shape arguments of this kind, in order; optional ones are read by the caller."""
        extra = sorted(set(shape) - set(names) - set(optional))
        if extra:
            takes = f"{names} (optional: {optional})" if optional else f"{names}"
            raise TypeError(f"measure_op: kind {kind!r} does not take {extra}; it takes shape arguments {takes}")
        missing = [n for n in names if n not in shape]
        if missing:
            raise ValueError(f"measure_op: kind {kind!r} takes shape arguments {names}, "
                             f"missing {missing} (got {sorted(shape)})")
        return [shape[n] for n in names]

    if kind == "gemm":
        M, N, K = need("M", "N", "K")
        op = gemm(M, N, K, dtype=dtype)
        a, b, c = rand(M, K), rand(K, N), torch.empty(M, N, device=dev, dtype=dtype)  # (M,K) (K,N) (M,N)
        return op, lambda: torch.mm(a, b, out=c)
    if kind == "gemv":
        N, K, batch = need("N", "K", "batch")
        op = gemv(N, K, batch=batch, dtype=dtype)
        x, w = rand(batch, K), rand(N, K)  # (batch, K), (N, K) as nn.Linear stores it
        return op, lambda: F.linear(x, w)
    if kind == "elementwise":
        (n,) = need("n")
        op = elementwise(n, dtype=dtype, name=f"add n={n}")
        a, b, c = rand(n), rand(n), torch.empty(n, device=dev, dtype=dtype)  # (n,) x 3
        return op, lambda: torch.add(a, b, out=c)
    if kind == "softmax":
        rows, cols = need("rows", "cols")
        op = softmax(rows, cols, dtype=dtype)
        x = rand(rows, cols)  # (rows, cols)
        return op, lambda: torch.softmax(x, dim=-1)
    if kind in ("rmsnorm", "layernorm"):
        tokens, hidden = need("tokens", "hidden")
        op = norm(tokens, hidden, kind=kind[:-4], dtype=dtype)
        x, w, b = rand(tokens, hidden), rand(hidden), rand(hidden)  # (tokens, hidden), (hidden,), (hidden,)
        if kind == "rmsnorm":
            return op, lambda: F.rms_norm(x, (hidden,), w)
        return op, lambda: F.layer_norm(x, (hidden,), w, b)
    if kind == "attention":
        batch, heads, seq_len, head_dim = need("batch", "heads", "seq_len", "head_dim", optional=("fused",))
        fused = shape.get("fused", True)  # attention() checks it is a bool
        op = attention(batch, heads, seq_len, head_dim, fused=fused, dtype=dtype)
        q, k, v = (rand(batch, heads, seq_len, head_dim) for _ in range(3))  # (B, H, T, D)
        if fused:
            return op, lambda: F.scaled_dot_product_attention(q, k, v)
        scale = head_dim ** -0.5

        def naive():  # the model's T x T traffic: S written and read, P written and read
            s = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, T) in memory; scaling q adds only (B, H, T, D)
            return torch.softmax(s, dim=-1) @ v  # (B, H, T, D)
        return op, naive
    if kind == "decode_attention":
        batch, heads, kv_len, head_dim = need("batch", "heads", "kv_len", "head_dim", optional=("kv_heads",))
        op = decode_attention(batch, heads, kv_len, head_dim, kv_heads=shape.get("kv_heads"), dtype=dtype)  # checks it
        kv_heads = heads if shape.get("kv_heads") is None else shape["kv_heads"]
        q = rand(batch, heads, 1, head_dim)  # (B, H, 1, D)
        k, v = rand(batch, kv_heads, kv_len, head_dim), rand(batch, kv_heads, kv_len, head_dim)  # (B, Hkv, L, D)
        if kv_heads != heads:  # enable_gqa needs torch >= 2.5
            return op, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return op, lambda: F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"measure_op: kind must be one of {MEASURABLE}, got {kind!r}")


MEASURABLE = ("gemm", "gemv", "elementwise", "softmax", "rmsnorm", "layernorm", "attention", "decode_attention")


def measure_op(kind: str, *, dtype=None, device=None, warmup: int = 3, repeats: int = 7, stat: str = "median",
               **shape) -> Measurement:
    """Run one op on this machine and time it: `measure_op("gemm", M=512, N=512, K=512)`.

    kinds and their shape arguments:
        gemm (M, N, K) · gemv (N, K, batch) · elementwise (n) · softmax (rows, cols) ·
        rmsnorm / layernorm (tokens, hidden) · attention (batch, heads, seq_len, head_dim, fused=True) ·
        decode_attention (batch, heads, kv_len, head_dim, kv_heads=None)
    dtype defaults to fp32 on a CPU and bf16 on a GPU. The result's FLOP/s and bytes/s divide
    the model's counts (see the functions above) by the measured time: the median of the
    repeats, or with stat="min" the fastest one (the least disturbed on a shared machine).
    """
    from labkit import bench, runtime

    if not isinstance(kind, str) or kind not in MEASURABLE:
        raise ValueError(f"measure_op: kind must be one of {MEASURABLE}, got {kind!r}")
    dtype = _default_dtype() if dtype is None else dtype
    tdt = _torch_dtype("measure_op", dtype)
    key = dtype_name(dtype, where="measure_op")  # 'tf32' stays 'tf32' (fp32 storage)
    dev = torch.device(device) if device is not None else runtime.device()
    _pos_int("measure_op", "warmup", warmup, minimum=0)
    _pos_int("measure_op", "repeats", repeats)
    if stat not in ("median", "min"):
        raise ValueError(f"measure_op: stat must be 'median' or 'min', got {stat!r}")
    op, fn = _setup_op(kind, shape, tdt, dev)
    with torch.inference_mode(), _allow_tf32(key == "tf32"):
        t = bench.timeit(fn, warmup=warmup, repeats=repeats, device=dev)
    seconds = t.median_s if stat == "median" else t.min_s
    return Measurement(op, seconds, t.device, key, extra={"kind": kind, **shape, "stat": stat})


# --- the memory wall --------------------------------------------------------------------


def gemm_critical_batch(N: int, K: int, ridge: float, *, dtype=torch.bfloat16) -> float:
    """Smallest M at which gemm(M, N, K) reaches intensity `ridge` (math.inf if it never does).

    I(M) = 2 M N K / (size (M K + K N + M N)) grows with M towards 2 N K / (size (N + K)); solving
    I(M) = R gives M* = R size N K / (2 N K - R size (N + K)). Exact (rational) arithmetic decides
    the boundary: I(M) >= R  <=>  M >= M* (when the denominator is positive), so ceil(M*),
    computed on Fractions, is the true smallest integer.
    """
    where = "gemm_critical_batch"
    _pos_int(where, "N", N)
    _pos_int(where, "K", K)
    _nonneg_num(where, "ridge", ridge, positive=True)
    if not math.isfinite(ridge):
        raise ValueError(f"{where}: ridge must be finite, got {ridge}")
    s = Fraction(bytes_per_element(dtype, where=where))
    R = Fraction(ridge)
    denom = 2 * N * K - R * s * (N + K)
    if denom <= 0:
        return math.inf
    return math.ceil(R * s * N * K / denom)  # exact: a Fraction's ceiling; >= 1 since R, s > 0


def decode_critical_batch(device: Device, hidden: int, *, ffn_hidden: int | None = None,
                          kv_dim: int | None = None, dtype=torch.bfloat16) -> float:
    """Decode batch at which every weight GEMM of a decoder layer is compute-bound on `device`.

    The layer's GEMMs (decoder_weight_shapes): QKV (h -> h + 2 kv_dim), out (h -> h), MLP up
    (h -> f), MLP down (f -> h). The smallest matrix (the out projection) needs the largest
    batch. Roughly batch ~ ridge * size / 2 (~ 295 in bf16 on an H100). Attention over the KV
    cache is not included: its intensity does not grow with the batch at all.
    """
    where = "decode_critical_batch"
    _check_device(where, device)
    _pos_int(where, "hidden", hidden)
    weights = decoder_weight_shapes(hidden, ffn_hidden=ffn_hidden, kv_dim=kv_dim)  # name -> (K, N)
    R = device.ridge(dtype)
    s = bytes_per_element(dtype, where=where)
    return max(gemm_critical_batch(N, K, R, dtype=s) for K, N in weights.values())


def training_flops(n_params: float, n_tokens: float) -> float:
    """Training compute C ~ 6 N D (Kaplan et al. 2020): 2 N D forward + 4 N D backward."""
    _nonneg_num("training_flops", "n_params", n_params, positive=True)
    _nonneg_num("training_flops", "n_tokens", n_tokens, positive=True)
    return 6 * n_params * n_tokens


def kv_cache_bytes_per_token(n_layers: int, kv_dim: int, *, dtype=torch.bfloat16) -> float:
    """KV-cache bytes one token occupies: K and V (kv_dim each) in every layer."""
    _pos_int("kv_cache_bytes_per_token", "n_layers", n_layers)
    _pos_int("kv_cache_bytes_per_token", "kv_dim", kv_dim)
    return 2 * n_layers * kv_dim * bytes_per_element(dtype, where="kv_cache_bytes_per_token")


def training_step_op(n_params: float, tokens: int, *, dtype=torch.bfloat16) -> Op:
    """One training step on `tokens` tokens: 6 N tokens FLOPs; weights read twice (forward,
    backward) and gradients written once: 3 N size bytes (activations and optimizer states
    ignored, so this intensity, ~ 2 tokens / size, is an upper bound)."""
    _nonneg_num("training_step_op", "n_params", n_params, positive=True)
    _pos_int("training_step_op", "tokens", tokens)
    s = bytes_per_element(dtype, where="training_step_op")
    return Op(f"training step ({tokens} tokens)", training_flops(n_params, tokens), 3 * n_params * s)


def decode_step_op(n_params: float, *, batch: int, kv_len: int, n_layers: int, d_model: int,
                   kv_dim: int | None = None, dtype=torch.bfloat16) -> Op:
    """One decoding step for `batch` sequences, each with `kv_len` cached tokens.

    FLOPs: 2 N per token (the weights) + 4 kv_len d_model per token per layer (attention).
    Bytes: every weight once (N size) + each sequence's KV cache (kv_len tokens).
    """
    where = "decode_step_op"
    _nonneg_num(where, "n_params", n_params, positive=True)
    _pos_int(where, "batch", batch)
    _pos_int(where, "kv_len", kv_len)
    _pos_int(where, "n_layers", n_layers)
    _pos_int(where, "d_model", d_model)
    kv = d_model if kv_dim is None else _pos_int(where, "kv_dim", kv_dim)
    s = bytes_per_element(dtype, where=where)
    flops = 2 * n_params * batch + 4 * batch * n_layers * kv_len * d_model
    nbytes = n_params * s + batch * kv_len * kv_cache_bytes_per_token(n_layers, kv, dtype=s)
    return Op(f"decode step (batch {batch}, L={kv_len})", flops, nbytes)


__all__ = [
    "A100_SXM_80GB", "DTYPE_BYTES", "Device", "H100_SXM", "MEASURABLE", "Measurement", "Op",
    "attainable", "attention", "bytes_per_element", "decode_attention", "decode_critical_batch",
    "decode_step_op", "decoder_layer_ops", "decoder_weight_shapes", "dtype_name", "elementwise", "gemm",
    "gemm_critical_batch", "gemv", "is_memory_bound", "kv_cache_bytes_per_token", "measure_op", "norm", "probe_device",
    "ridge_point", "roofline_time", "softmax", "training_flops", "training_step_op",
]
