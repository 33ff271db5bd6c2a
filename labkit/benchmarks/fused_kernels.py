"""Benchmarks of chapter 17-fused-kernels: labkit's Triton kernels beside eager PyTorch and Liger-Kernel.

Every row carries the device, median_ms, baseline (its name), baseline_ms, ratio = baseline_ms / median_ms
(above 1, the row's implementation is faster), a throughput and roof_fraction, the fraction of this
device's roof that bounds the op, measured in the same run by `roofline.probe_device` (on the course's
H100: about 786 TFLOP/s for a bf16 matmul, 3.0 TB/s for a copy).

1. kind "flce": the loss layer, linear + cross-entropy, forward + backward, three ways in one run:
   eager (`F.cross_entropy(F.linear(x, W), target)`, the baseline), labkit's fused_linear_cross_entropy,
   and Liger's LigerFusedLinearCrossEntropyLoss. Each row has its median time, tflops (the three
   matmuls, 6 N V H FLOPs, against the matmul roof) and its peak memory above the inputs; the rows carry
   memory_vs_eager (target for labkit <= 0.25) and time_vs_liger (target <= 1).
   On a GPU: tokens 8192, hidden 4096, vocab 128,256 (Llama-3), bf16, peak from
   torch.cuda.max_memory_allocated. On a CPU: small sizes, fp32, and the peak counted by
   `PeakMemory` (every storage torch allocates, freed when its storage dies): a CPU stand-in
   for the CUDA allocator's statistics, labeled as such in the row.
2. kinds "rmsnorm", "swiglu", "rope": forward + backward at Llama-3-8B shapes (8192 tokens,
   hidden 4096, intermediate 14336, 32 query / 8 KV heads of dim 128, bf16) on a GPU, small on
   a CPU. baseline_ms is Liger's kernel on a GPU and eager PyTorch on a CPU (Liger's Triton
   kernels other than cross-entropy do not run under the interpreter); eager_ms is always
   there. gb_per_s = the fused kernels' minimum bytes (fused_bytes) / time, against the copy
   bandwidth. eager_bytes counts what eager PyTorch's aten ops read and write (`ByteCounter`).
   Each implementation runs on its own copy of the inputs and upstream gradients: Liger's kernels
   write in place (RoPE into q and k, SwiGLU's backward into its inputs, RMSNorm's into dy).

Also here, for the chapter and its tests: `kernel_loss` (TinyGPT's loss with every fusable op
replaced by labkit.kernels, what Liger's `apply_liger_kernel_to_llama` patches into a model).
"""

from __future__ import annotations

import gc
import logging
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from labkit import bench
from labkit.kernels._common import INTERPRET, kernel_device
from labkit.kernels.fused_linear_ce import default_chunk_size, fused_linear_cross_entropy
from labkit.kernels.rmsnorm import rms_norm, rms_norm_bytes
from labkit.kernels.rope import apply_rope, rope_bytes
from labkit.kernels.swiglu import swiglu, swiglu_bytes
from labkit.models import TinyGPT
from labkit.models.gpt import IGNORE_INDEX, rope_cache
from labkit.models.gpt import apply_rope as eager_rope
from labkit.perf import roofline as rl


# --- measuring without a GPU ------------------------------------------------------------------


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by torch ops while active (any device).

    Every new storage an op returns is counted until Python frees it (a finalizer on the
    storage), so views cost nothing and freed temporaries stop counting: the CPU analogue of
    torch.cuda.max_memory_allocated() - memory_allocated() at entry. In-place and out= ops
    (mutable schemas) allocate nothing new. It sees only tensors created inside the block,
    and nothing Triton's interpreter does with NumPy. The interpreter leaves the tensors a kernel
    was launched on in a reference cycle, freed only by the garbage collector; under it the
    automatic collector is paused and a cheap young-generation collection runs before each new
    storage is counted (never during a launch), so interpreted kernels count as compiled ones would."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0  # the largest single storage: eager's (tokens, vocab) logits, say
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __enter__(self):
        self._gc_was_enabled = gc.isenabled()
        if INTERPRET:
            gc.disable()
        return super().__enter__()

    def __exit__(self, *exc):
        if self._gc_was_enabled:
            gc.enable()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self._sizes:
                    if INTERPRET:
                        gc.collect(0)  # free what the last kernel launch left in a cycle
                    self._sizes[key] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    self.largest = max(self.largest, n)
                    weakref.finalize(storage, self._free, key)
        return out


class ByteCounter(TorchDispatchMode):
    """Bytes that eager aten ops read (tensor inputs) and write (outputs) while active: each op is
    a kernel that goes to memory and back. Views and allocations (empty*) move nothing; a broadcast
    input counts its storage."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops: list[str] = []

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and "empty" not in func.overloadpacket.__name__:
            ins = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            moved = sum(self._nbytes(t) for t in ins + outs)
            if moved:
                self.bytes += moved
                self.ops.append(str(func.overloadpacket.__name__))
        return out


def peak_bytes(fn) -> tuple[int, str]:
    """(peak bytes above what was allocated before, how it was measured) for one call of fn() on the
    kernels' device. Free what an earlier call left behind (e.g. .grad) before: on a GPU it counts as
    allocated before the call, and freeing it inside fn would hide that much of the peak."""
    if kernel_device().type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    with PeakMemory() as pm:
        fn()
    return pm.peak, "PeakMemory (storages allocated by torch ops, CPU)"


# --- TinyGPT with the kernels -------------------------------------------------------------------


def kernel_loss(model: TinyGPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """TinyGPT's mean next-token loss with RMSNorm, RoPE, SwiGLU and lm_head + cross-entropy computed
    by labkit.kernels; the same parameters and the same maths as model(idx, targets)[1]."""
    if not isinstance(model, TinyGPT):
        raise TypeError(f"kernel_loss: model must be a TinyGPT, got {type(model).__name__}")
    cfg = model.config
    if (cfg.norm, cfg.mlp, cfg.rope, cfg.dropout) != ("rmsnorm", "swiglu", True, 0.0):
        raise ValueError("kernel_loss: model must be Llama-style: GPTConfig(norm='rmsnorm', mlp='swiglu', "
                         f"rope=True, dropout=0.0), got norm={cfg.norm!r}, mlp={cfg.mlp!r}, rope={cfg.rope}, "
                         f"dropout={cfg.dropout}")
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    x = model.tok_emb(idx)  # (B, T, C)
    for block in model.blocks:
        h = rms_norm(x, block.norm1.weight, block.norm1.eps)
        attn = block.attn
        q = attn.q_proj(h).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D), a strided view
        k = attn.k_proj(h).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = attn.v_proj(h).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, k, attn.cos[:T], attn.sin[:T])
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        h = rms_norm(x, block.norm2.weight, block.norm2.eps)
        mlp = block.mlp
        x = x + mlp.down(swiglu(mlp.gate(h), mlp.up(h)))
    h = rms_norm(x, model.norm_f.weight, model.norm_f.eps)  # (B, T, C)
    return fused_linear_cross_entropy(h.reshape(B * T, -1), model.lm_head.weight, targets.reshape(-1),
                                      ignore_index=IGNORE_INDEX)


# --- settings ------------------------------------------------------------------------------------


def settings(quick: bool = False) -> dict:
    """Sizes for the current profile: Llama-3-8B's on a GPU, small ones on a CPU."""
    if not isinstance(quick, bool):
        raise TypeError(f"settings: quick must be a bool, got {type(quick).__name__}")
    if kernel_device().type == "cuda":
        return dict(dtype=torch.bfloat16, tokens=8192, hidden=4096, vocab=128256, chunk_size=None,
                    intermediate=14336, n_head=32, n_kv_head=8, head_dim=128, repeats=5 if quick else 20, warmup=2)
    # Liger's chunk rule gives tiny chunks at vocab / hidden = 64 (N / 64 tokens): slow under the interpreter
    return dict(dtype=torch.float32, tokens=128 if quick else 512, hidden=32 if quick else 64,
                vocab=2048 if quick else 8192, chunk_size=32 if quick else 64, intermediate=256, n_head=4,
                n_kv_head=2, head_dim=32, repeats=1 if quick else 5, warmup=0 if quick else 1)


def _liger(name: str):
    """Liger-Kernel's implementation of `name` (liger-kernel 0.8.5's names), or None where it cannot run
    (its Triton kernels other than cross-entropy need a GPU) or is not installed."""
    try:
        logging.getLogger("liger_kernel").setLevel(logging.ERROR)  # optional-backend import chatter
        if name == "flce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            loss = LigerFusedLinearCrossEntropyLoss()
            return lambda x, w, t: loss(w, x, t)  # Liger takes the weight first
        if kernel_device().type != "cuda":
            return None
        if name == "rmsnorm":  # LigerRMSNorm's function; in_place=True (its default) writes dx over dy
            from liger_kernel.transformers.functional import liger_rms_norm
            return lambda x, w: liger_rms_norm(x, w, 1e-6)
        if name == "swiglu":  # LigerSwiGLUMLP's gate, silu(a) * b
            from liger_kernel.transformers.functional import liger_swiglu
            return liger_swiglu
        if name == "rope":  # Hugging Face's tables: (1, T, D), each angle twice
            from liger_kernel.transformers import liger_rotary_pos_emb
            return liger_rotary_pos_emb
    except ImportError:
        return None
    raise ValueError(f"_liger: unknown kernel {name!r}")


def _fwd_bwd(fn, inputs: list[torch.Tensor], grads):
    """A callable running fn(*inputs) and its backward with fixed upstream gradients."""
    leaves = [t for t in inputs if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads if isinstance(grads, tuple) else (grads,))
    return step


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with t's values, strides and requires_grad."""
    return t.detach().clone().requires_grad_(t.requires_grad)


def measured_roofs(dtype: torch.dtype) -> rl.Device:
    """This device's matmul peak for `dtype` and copy bandwidth, measured now (roofline.probe_device)."""
    return rl.probe_device((dtype,), device=kernel_device())


# --- 1. the loss layer ----------------------------------------------------------------------------


def flce_rows(quick: bool = False, *, roofs: rl.Device | None = None) -> list[dict]:
    """Eager vs labkit vs Liger fused linear cross-entropy: time and peak memory, forward + backward."""
    s = settings(quick)
    dev, dtype = kernel_device(), s["dtype"]
    device, roofs = bench.device_name(dev), roofs or measured_roofs(dtype)
    N, Hd, V = s["tokens"], s["hidden"], s["vocab"]
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(N, Hd, generator=gen) * 0.5).to(dev, dtype).requires_grad_()
    W = (torch.randn(V, Hd, generator=gen) * Hd ** -0.5).to(dev, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen).to(dev)
    t[::7] = IGNORE_INDEX  # some unscored positions, like padding
    chunk = s["chunk_size"] or default_chunk_size(N, Hd, V)
    flops = 3 * 2 * N * V * Hd  # logits x W^T, dx = dz W, dW = dz^T x: the same for all three
    impls = {"eager": lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
             "labkit": lambda x, w, t: fused_linear_cross_entropy(x, w, t, chunk_size=chunk)}
    liger = _liger("flce")
    if liger is not None:
        impls["liger"] = liger
    results = {}
    for name, fn in impls.items():
        step = _fwd_bwd(lambda x, w: fn(x, w, t), [x, W], torch.ones((), device=dev, dtype=dtype))
        step()  # warm-up (compilation); then the peak of one clean call
        x.grad = W.grad = None
        peak, how = peak_bytes(step)
        x.grad = W.grad = None
        timing = bench.timeit(step, warmup=s["warmup"], repeats=s["repeats"], device=dev)
        results[name] = (timing.median_ms, peak, how)
    eager_ms, eager_peak, _ = results["eager"]
    liger_ms = results.get("liger", (None,))[0]
    rows = []
    for name, (ms, peak, how) in results.items():
        rows.append({
            "name": f"linear+CE fwd+bwd: {name}", "kind": "flce", "impl": name, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "tokens": N, "hidden": Hd, "vocab": V,
            "chunk_size": chunk if name == "labkit" else None,
            "median_ms": ms, "baseline": "eager", "baseline_ms": eager_ms, "ratio": eager_ms / ms,
            "flops": flops, "tflops": flops / (ms / 1e3) / 1e12, "roof_tflops": roofs.peak(dtype) / 1e12,
            "roof_fraction": flops / (ms / 1e3) / roofs.peak(dtype),
            "peak_bytes": peak, "eager_peak_bytes": eager_peak, "memory_vs_eager": peak / eager_peak,
            "liger_ms": liger_ms, "time_vs_liger": ms / liger_ms if liger_ms else None,
            "logits_bytes": N * V * dtype.itemsize, "memory_measured_by": how,
        })
    return rows


# --- 2. RMSNorm, SwiGLU, RoPE ----------------------------------------------------------------------


def _op_cases(s: dict, gen: torch.Generator) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """For each op: (labkit fn, eager fn, inputs, upstream grads, fused bytes fwd+bwd); and RoPE's cos, sin."""
    dev, dtype = kernel_device(), s["dtype"]
    N, C, I = s["tokens"], s["hidden"], s["intermediate"]
    Hq, Hk, D = s["n_head"], s["n_kv_head"], s["head_dim"]
    b = dtype.itemsize

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dev, dtype)

    x, w = rand(N, C).requires_grad_(), (1 + rand(C, scale=0.1)).requires_grad_()

    def eager_rms(x, w):  # labkit.models.RMSNorm / HF Llama: statistics in float32
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w

    g, u = rand(N, I).requires_grad_(), rand(N, I).requires_grad_()
    # q, k as a projection leaves them: (B, T, H, D) memory, viewed as (B, H, T, D)
    q = rand(1, N, Hq, D).transpose(1, 2).detach().requires_grad_()
    k = rand(1, N, Hk, D).transpose(1, 2).detach().requires_grad_()
    cos, sin = (t.to(dev) for t in rope_cache(N, D))
    return {
        "rmsnorm": (rms_norm, eager_rms, [x, w], rand(N, C),
                    rms_norm_bytes(N, C, b) + rms_norm_bytes(N, C, b, backward=True)),
        "swiglu": (swiglu, lambda g, u: F.silu(g) * u, [g, u], rand(N, I), swiglu_bytes(N * I, b) +
                   swiglu_bytes(N * I, b, backward=True)),
        "rope": (lambda q, k: apply_rope(q, k, cos, sin),
                 lambda q, k: (eager_rope(q, cos, sin), eager_rope(k, cos, sin)), [q, k],
                 (rand(1, Hq, N, D), rand(1, Hk, N, D)), 2 * rope_bytes(q.numel(), k.numel(), N, D, b)),
    }, (cos, sin)


def op_rows(quick: bool = False, *, roofs: rl.Device | None = None) -> list[dict]:
    """labkit vs Liger (GPU) or eager (CPU) for RMSNorm, SwiGLU and RoPE, forward + backward."""
    s = settings(quick)
    dev = kernel_device()
    device, roofs = bench.device_name(dev), roofs or measured_roofs(s["dtype"])
    cases, (cos, sin) = _op_cases(s, torch.Generator().manual_seed(1))
    rows = []
    for name, (ours, eager, inputs, grads, fused_bytes) in cases.items():
        liger = _liger(name)
        if name == "rope" and liger is not None:
            liger_rope, full = liger, [torch.cat([t, t], -1)[None] for t in (cos, sin)]  # built once, not timed
            liger = lambda q, k: liger_rope(q, k, *full)  # noqa: E731
        with ByteCounter() as bc:
            _fwd_bwd(eager, inputs, grads)()
        timed = {"labkit": ours, "eager": eager} | ({"liger": liger} if liger is not None else {})
        ms = {}
        for impl, fn in timed.items():  # each on its own copies: Liger's kernels write in place
            upstream = tuple(map(_copy, grads)) if isinstance(grads, tuple) else _copy(grads)
            step = _fwd_bwd(fn, [_copy(t) for t in inputs], upstream)
            ms[impl] = bench.timeit(step, warmup=s["warmup"], repeats=s["repeats"], device=dev).median_ms
        base = "liger" if "liger" in ms else "eager"
        bytes_per_s = fused_bytes / (ms["labkit"] / 1e3)
        rows.append({
            "name": f"{name} fwd+bwd: labkit vs {base}", "kind": name, "device": device,
            "dtype": str(s["dtype"]).removeprefix("torch."), "shape": [list(t.shape) for t in inputs],
            "median_ms": ms["labkit"], "baseline": base, "baseline_ms": ms[base], "ratio": ms[base] / ms["labkit"],
            "eager_ms": ms["eager"], "liger_ms": ms.get("liger"), "fused_bytes": fused_bytes, "eager_bytes": bc.bytes,
            "gb_per_s": bytes_per_s / 1e9, "roof_gb_per_s": roofs.bandwidth / 1e9,
            "roof_fraction": bytes_per_s / roofs.bandwidth,
        })
    return rows


def run(quick: bool = False) -> list[dict]:
    """All of the chapter's benchmarks on the current device, against roofs measured once for both."""
    roofs = measured_roofs(settings(quick)["dtype"])
    return flce_rows(quick, roofs=roofs) + op_rows(quick, roofs=roofs)


__all__ = ["ByteCounter", "PeakMemory", "flce_rows", "kernel_loss", "measured_roofs", "op_rows", "peak_bytes",
           "run", "settings"]
