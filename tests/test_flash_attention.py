"""Tests of labkit.kernels.flash_attention (chapter 16-flash-attention): the FlashAttention accuracy rule
for the Triton kernels (output and every gradient against a float64 reference), the tiled PyTorch version
(properties, gradcheck in float64), tile shapes, strides, bad input, a TinyGPT trained with the kernel,
exercises, figures and benchmarks.

On a CPU the kernels run in Triton's interpreter, so the CPU cases are a small subset; the full sweep
of shapes is marked `gpu`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import labkit  # before triton: with triton 3.9 TRITON_INTERPRET must be set before `import triton`
import triton  # noqa: E402,I001
from labkit import datasets, runtime
from labkit.kernels import flash_attention as fa
from labkit.models import GPTConfig, TinyGPT, train

pytestmark = pytest.mark.usefixtures("one_thread")
DEV = fa.kernel_device()  # where the kernels run: cuda when compiled, cpu under the interpreter


@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    """One config per kernel: autotuning every test shape on a GPU would compile ~10 variants of each."""
    monkeypatch.setattr(fa, "TUNE", False)


def rand(*shape, dtype=torch.float32, seed=0, device=DEV):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)


def qkv(B, H, N, D, dtype=torch.float32, seed=0, device=DEV):
    return [rand(B, H, N, D, dtype=dtype, seed=seed + i, device=device) for i in range(3)]


def output_and_grads(attn, q, k, v, do):
    """attn(q, k, v) and d(sum(out * do))/d(q, k, v), from fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, do)]


def fa_rule(B, H, N, D, dtype, causal, seed=0, sm_scale=None):
    """fa.accuracy_report (FlashAttention's accuracy rule) on random inputs of this shape."""
    q, k, v = qkv(B, H, N, D, dtype, seed)
    do = rand(B, H, N, D, dtype=dtype, seed=seed + 3)
    return fa.accuracy_report(q, k, v, do, causal, sm_scale)


def assert_fa_rule(report):
    bad = {k: v for k, v in report.items() if not v[0] <= v[2]}
    assert not bad, "kernel error > 2 x PyTorch's + rounding floor: " + ", ".join(
        f"{k}: {e:.3g} > 2 x {p:.3g} + floor = {b:.3g}" for k, (e, p, b) in bad.items())


# --- the Triton kernels: accuracy -------------------------------------------------------------

CPU_CASES = [  # (B, H, N, D, dtype, causal): small enough for the interpreter, every feature once
    (2, 1, 1, 16, torch.float32, False),  # one token
    (1, 2, 17, 32, torch.bfloat16, True),  # a tail shorter than a block
    (2, 1, 97, 64, torch.float16, False),
    (1, 2, 128, 128, torch.bfloat16, True),  # whole blocks, the largest head dim
    (1, 2, 200, 16, torch.float32, True),
    (1, 2, 1025, 16, torch.float16, True),  # 17 query blocks, causal block skipping
]


@pytest.mark.parametrize("B,H,N,D,dtype,causal", CPU_CASES)
def test_kernel_meets_the_flash_attention_rule(B, H, N, D, dtype, causal):
    assert_fa_rule(fa_rule(B, H, N, D, dtype, causal))


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 17, 97, 128, 200, 1025])
@pytest.mark.parametrize("D", fa.HEAD_DIMS)
@pytest.mark.parametrize("dtype", fa.KERNEL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_meets_the_flash_attention_rule_sweep_gpu(N, D, dtype, causal):
    assert_fa_rule(fa_rule(2, 3, N, D, dtype, causal, seed=N + D))


@pytest.mark.parametrize("dtype", fa.KERNEL_DTYPES)
def test_output_and_gradients_keep_the_input_dtype(dtype):
    q, k, v = qkv(1, 1, 5, 16, dtype)
    results = output_and_grads(fa.flash_attention, q, k, v, torch.ones_like(q))
    assert [(t.dtype, t.shape) for t in results] == [(dtype, q.shape)] * 4


def test_custom_softmax_scale():
    assert_fa_rule(fa_rule(1, 2, 40, 32, torch.float32, True, sm_scale=0.7))


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 70), D=st.sampled_from([16, 32]),
       causal=st.booleans(), sm_scale=st.one_of(st.none(), st.floats(0.05, 2.0)), seed=st.integers(0, 2**16))
def test_forward_output_and_log_sum_exp(B, H, N, D, causal, sm_scale, seed):
    q, k, v = qkv(B, H, N, D, seed=seed)
    o, lse = fa.flash_attention_forward(q, k, v, causal, sm_scale)
    ref, ref_lse = fa.attention_reference(*(t.cpu().double() for t in (q, k, v)), causal, sm_scale, return_lse=True)
    assert o.shape == (B, H, N, D) and lse.shape == (B, H, N) and lse.dtype == torch.float32
    torch.testing.assert_close(o.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)


def _with_tiles(monkeypatch, kernel, block_m, block_n, num_stages=1, num_warps=4):
    """Make an autotuned kernel use exactly one tile shape (its cache emptied, so the choice is fresh)."""
    monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                                                          num_stages=num_stages, num_warps=num_warps)])
    monkeypatch.setattr(kernel, "cache", {})


def _check_tiles(monkeypatch, fwd, bwd, B, H, N, D, dtype, causal):
    """Forward with tile config `fwd` and backward with `bwd` (both (BLOCK_M, BLOCK_N, stages, warps))."""
    _with_tiles(monkeypatch, fa._fwd_kernel, *fwd)
    _with_tiles(monkeypatch, fa._bwd_dkdv_kernel, *bwd)
    _with_tiles(monkeypatch, fa._bwd_dq_kernel, *bwd)
    try:
        report = fa_rule(B, H, N, D, dtype, causal, seed=7)
    except triton.runtime.errors.OutOfResources:  # a GPU config too big for this dtype and head dim
        pytest.skip(f"tiles {fwd} / {bwd} do not fit for {dtype}, D={D}")
    assert_fa_rule(report)


FWD_TILES = list(dict.fromkeys(t[:2] for t in fa.GPU_FWD_TILES))  # (BLOCK_M, BLOCK_N) pairs of the GPU configs
BWD_TILES = list(dict.fromkeys(t[:2] for t in fa.GPU_BWD_TILES))


@pytest.mark.parametrize("i,causal", [(i, True) for i in range(len(BWD_TILES))] + [(2, False)])
def test_every_gpu_tile_shape_is_correct_in_the_interpreter(monkeypatch, i, causal):
    """The GPU configs' tile shapes (BLOCK_N > BLOCK_M in the backward too) on a sequence with a ragged tail;
    stages and warps mean nothing to the interpreter."""
    if DEV.type == "cuda":
        pytest.skip("the gpu-marked test below runs every full config")
    fwd, bwd = FWD_TILES[i % len(FWD_TILES)] + (1, 4), BWD_TILES[i] + (1, 4)
    _check_tiles(monkeypatch, fwd, bwd, 1, 1, 150, 16, torch.float32, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D,causal", [(torch.bfloat16, 128, True), (torch.float16, 64, False),
                                            (torch.float32, 64, True)])
@pytest.mark.parametrize("i", range(max(len(fa.GPU_FWD_TILES), len(fa.GPU_BWD_TILES))))
def test_every_gpu_config_compiles_and_is_correct_gpu(monkeypatch, dtype, D, causal, i):
    fwd = fa.GPU_FWD_TILES[i % len(fa.GPU_FWD_TILES)]
    bwd = fa.GPU_BWD_TILES[i % len(fa.GPU_BWD_TILES)]
    _check_tiles(monkeypatch, fwd, bwd, 2, 3, 1000, D, dtype, causal)


@pytest.mark.gpu
def test_autotuned_kernel_at_the_benchmark_shape_gpu(monkeypatch):
    monkeypatch.setattr(fa, "TUNE", True)
    for causal in (False, True):
        assert_fa_rule(fa_rule(1, 8, 4096, 128, torch.bfloat16, causal))


def test_any_strides_give_the_same_result():
    """A (B, N, H, D) projection viewed as (B, H, N, D), and a key tensor with strided head dim."""
    B, H, N, D = 2, 2, 33, 16
    q = rand(B, N, H, D, seed=1).transpose(1, 2)  # (B, H, N, D), not contiguous
    k = rand(B, H, D, N, seed=2).transpose(-2, -1)  # stride(-1) = N
    v = rand(B, H, N, 2 * D, seed=3)[..., ::2]  # stride(-1) = 2
    do = rand(B, H, N, D, seed=4).transpose(-2, -1).contiguous().transpose(-2, -1)  # a strided gradient too
    assert not any(t.is_contiguous() for t in (q, k, v, do))
    strided = output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, True), q, k, v, do)
    dense = output_and_grads(lambda a, b, c: fa.flash_attention(a, b, c, True),
                             *(t.contiguous() for t in (q, k, v, do)))
    for a, b in zip(strided, dense):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_input_names_the_argument():
    q, k, v = qkv(1, 1, 8, 16)
    cases = [
        (TypeError, "flash_attention: q must be a torch.Tensor, got list", dict(q=[1.0])),
        (TypeError, "flash_attention: q must be float16, bfloat16 or float32, got torch.int64",
         dict(q=q.long(), k=k.long(), v=v.long())),
        (TypeError, "flash_attention: q must be float16, bfloat16 or float32, got torch.float64",
         dict(q=q.double(), k=k.double(), v=v.double())),
        (TypeError, "flash_attention: k must have q's dtype torch.float32, got torch.float16", dict(k=k.half())),
        (ValueError, r"flash_attention: q must have shape \(B, H, N, D\), got \(8, 16\)",
         dict(q=q[0, 0], k=k[0, 0], v=v[0, 0])),
        (ValueError, r"flash_attention: v must have q's shape \(B, H, N, D\) = \(1, 1, 8, 16\), got \(1, 1, 7, 16\)",
         dict(v=v[:, :, :7])),
        (ValueError, r"flash_attention: q's head dim D = q.shape\[-1\] must be one of \(16, 32, 64, 128\), got 48",
         dict(q=rand(1, 1, 8, 48), k=rand(1, 1, 8, 48), v=rand(1, 1, 8, 48))),
        (ValueError, r"flash_attention: q must have no empty dimension", dict(q=q[:, :, :0], k=k[:, :, :0],
                                                                              v=v[:, :, :0])),
        (TypeError, "flash_attention: causal must be a bool, got int 1", dict(causal=1)),
        (ValueError, r"flash_attention: sm_scale must be in \(0, inf\), got 0.0", dict(sm_scale=0.0)),
        (ValueError, f"flash_attention: q must be on {DEV.type} here, got meta",
         dict(q=q.to("meta"), k=k.to("meta"), v=v.to("meta"))),
        (ValueError, f"flash_attention: k must be on q's device {q.device}, got meta", dict(k=k.to("meta"))),
    ]
    for error, message, change in cases:
        args = dict(q=q, k=k, v=v, causal=False, sm_scale=None) | change
        with pytest.raises(error, match=message):
            fa.flash_attention(**args)
    with pytest.raises(ValueError, match=r"flash_attention_backward: o and do must have q's shape"):
        fa.flash_attention_backward(q, k, v, q, torch.zeros(1, 1, 7), q)
    with pytest.raises(ValueError, match="tiled_attention_forward: block_m must be an int >= 1, got 0"):
        fa.tiled_attention_forward(q.cpu(), k.cpu(), v.cpu(), block_m=0)
    with pytest.raises(TypeError, match="use_flash_attention: model must be an nn.Module"):
        fa.use_flash_attention("gpt")


def test_kernel_configs_under_the_interpreter_and_the_tune_switch(monkeypatch):
    if DEV.type == "cpu":  # @triton.autotune cannot choose among several configs in the interpreter
        assert len(fa._fwd_kernel.configs) == len(fa._bwd_dq_kernel.configs) == 1
    else:
        assert len(fa._fwd_kernel.configs) == len(fa.GPU_FWD_TILES) > 1
    configs = list(range(5))
    assert fa._prune(configs, {}) == [0]  # TUNE is off in these tests
    monkeypatch.setattr(fa, "TUNE", True)
    assert fa._prune(configs, {}) == configs


# --- the algorithm in plain PyTorch, tile by tile --------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 40), D=st.integers(1, 8), block_m=st.integers(1, 16), block_n=st.integers(1, 16),
       causal=st.booleans(), sm_scale=st.one_of(st.none(), st.floats(0.01, 3.0)), seed=st.integers(0, 2**16))
def test_tiled_forward_and_backward_equal_naive_attention(N, D, block_m, block_n, causal, sm_scale, seed):
    q, k, v = qkv(2, 2, N, D, torch.float64, seed, "cpu")
    do = rand(2, 2, N, D, dtype=torch.float64, seed=seed + 3, device="cpu")
    o, lse = fa.tiled_attention_forward(q, k, v, causal, sm_scale, block_m=block_m, block_n=block_n)
    ref, ref_lse = fa.attention_reference(q, k, v, causal, sm_scale, return_lse=True)
    torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    grads = fa.tiled_attention_backward(q, k, v, o, lse, do, causal, sm_scale, block_m=block_m, block_n=block_n)
    ref_grads = output_and_grads(lambda a, b, c: fa.attention_reference(a, b, c, causal, sm_scale), q, k, v, do)[1:]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_tiled_attention_float64(causal):
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 7, 4, torch.float64, 5, "cpu"))
    assert torch.autograd.gradcheck(
        lambda a, b, c: fa.flash_attention_tiled(a, b, c, causal, 0.6, block_m=3, block_n=2), (q, k, v))


def test_delta_is_the_row_sum_of_p_times_dp():
    """rowsum(dO * O) = rowsum(P * dP): why the backward needs only O and dO to get delta."""
    q, k, v = qkv(2, 3, 19, 8, torch.float64, 1, "cpu")
    do = rand(2, 3, 19, 8, dtype=torch.float64, seed=9, device="cpu")
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)  # (B, H, N, N)
    o, dp = p @ v, do @ v.transpose(-2, -1)
    torch.testing.assert_close((do * o).sum(-1), (p * dp).sum(-1), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n1=st.integers(1, 12), n2=st.integers(1, 12), shift=st.floats(-700, 700), seed=st.integers(0, 2**16))
def test_online_update_and_merge_are_softmax(n1, n2, shift, seed):
    """Folding two blocks one after the other, or each alone and merging, gives softmax(s) V and logsumexp(s)."""
    s = rand(3, n1 + n2, dtype=torch.float64, seed=seed, device="cpu") * 5
    s[:, :n1] += shift  # blocks far apart: exp would overflow without the running max
    v = rand(n1 + n2, 4, dtype=torch.float64, seed=seed + 1, device="cpu")
    empty = (torch.full((3,), -math.inf, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
             torch.zeros(3, 4, dtype=torch.float64))
    a = fa.online_softmax_update(*empty, s[:, :n1], v[:n1])
    b = fa.online_softmax_update(*empty, s[:, n1:], v[n1:])
    for state in (fa.online_softmax_update(*a, s[:, n1:], v[n1:]), fa.merge_states(a, b), fa.merge_states(b, a)):
        o, lse = fa.finalize(*state)
        torch.testing.assert_close(o, torch.softmax(s, -1) @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(N=st.integers(1, 300), block_m=st.sampled_from([16, 32, 64, 128]), block_n=st.sampled_from([16, 32, 64, 128]),
       causal=st.booleans())
def test_key_blocks_are_exactly_the_tiles_with_an_unmasked_entry(N, block_m, block_n, causal):
    allowed = torch.ones(N, N, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    for qb in range(math.ceil(N / block_m)):
        rows = allowed[qb * block_m:(qb + 1) * block_m]
        needed = [kb for kb in range(math.ceil(N / block_n)) if rows[:, kb * block_n:(kb + 1) * block_n].any()]
        assert list(fa.key_blocks(qb, block_m, block_n, N, causal)) == needed


# --- memory and cost accounting -----------------------------------------------------------------


def saved_bytes(fn, *args) -> int:
    """Bytes of the tensors autograd saves for the backward of fn(*args) (inputs included)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_flash_saves_no_n_by_n_tensor():
    B, H, N, D = 1, 2, 256, 16
    q, k, v = (t.requires_grad_() for t in qkv(B, H, N, D))
    flash = saved_bytes(fa.flash_attention, q, k, v, True)
    naive = saved_bytes(fa.attention_reference, q, k, v, True)
    assert flash == 4 * (4 * B * H * N * D) + 4 * B * H * N  # q, k, v, o and the float32 log-sum-exp
    assert naive > 4 * B * H * N * N  # at least one (N, N) tensor per head


def test_hbm_bytes_and_flops():
    B, H, N, D = 8, 32, 4096, 128
    naive = fa.naive_hbm_bytes(B, H, N, D)
    flash = fa.flash_forward_hbm_bytes(B, H, N, D, block_m=128)
    assert naive == 2 * (4 * B * H * N * D + 4 * B * H * N * N)
    assert flash == B * H * (2 * 2 * N * D + 32 * 2 * 2 * N * D + 4 * N)
    assert naive / flash == pytest.approx(2 * 128 / D, rel=0.01)  # no cache reuse: only 2 BLOCK_M / D times less
    ideal = fa.roofline.attention(B, H, N, D).bytes  # Q, K, V, O once: the K/V re-reads all hit the cache
    assert naive / ideal == pytest.approx(1 + N / D, rel=1e-9)
    assert fa.attention_flops(B, H, N, D) == 4 * B * H * N * N * D == 2 * fa.attention_flops(B, H, N, D, causal=True)
    assert fa.attention_flops(B, H, N, D, backward=True) == 2.5 * fa.attention_flops(B, H, N, D)
    with pytest.raises(ValueError, match="attention_flops: seq_len must be an int >= 1"):
        fa.attention_flops(1, 1, 0, 16)


# --- in a model -----------------------------------------------------------------------------------


def test_tinygpt_trains_the_same_with_the_kernel():
    """30 AdamW steps of a TinyGPT with flash_attention give the eager (SDPA) model's losses."""
    data = datasets.token_dataset("char", "train")
    cfg = GPTConfig(vocab_size=datasets.get_tokenizer("char").vocab_size, block_size=32, n_layer=1, n_embd=32,
                    n_head=2)
    runtime.seed_everything(0)
    eager = TinyGPT(cfg).to(DEV)
    flash = fa.use_flash_attention(copy.deepcopy(eager))
    assert type(flash.blocks[0].attn) is fa.FlashCausalSelfAttention
    losses = {}
    for name, model in (("eager", eager), ("flash", flash)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        log = train(model, datasets.batches(data, 1, 32, seed=0, device=DEV), 30, optimizer=opt, progress=False)
        losses[name] = torch.tensor(log.losses)
    torch.testing.assert_close(losses["flash"], losses["eager"], rtol=1e-4, atol=1e-4)
    assert losses["flash"][-10:].mean() < math.log(cfg.vocab_size) - 0.3  # it learned something


# --- exercises, figures, benchmarks ---------------------------------------------------------------

EXERCISES = ["flash-attention.causal_key_blocks", "flash-attention.hbm_bytes", "flash-attention.logsumexp",
             "flash-attention.merge_states"]


def test_exercises_registered_and_references_pass():
    from labkit.exercises import exercises_for, lookup

    assert exercises_for("16-flash-attention") == EXERCISES
    for name in EXERCISES:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def _merge_unrescaled(m1, l1, acc1, m2, l2, acc2):  # adds sums taken against different maxima
    return torch.maximum(m1, m2), l1 + l2, acc1 + acc2


def _merge_to_second(m1, l1, acc1, m2, l2, acc2):  # rescales to m2 even when m1 is larger: exp overflows
    w = torch.exp(m1 - m2)
    return m2, w * l1 + l2, w[:, None] * acc1 + acc2


def _merge_forgets_acc(m1, l1, acc1, m2, l2, acc2):  # rescales l but not acc
    m = torch.maximum(m1, m2)
    return m, torch.exp(m1 - m) * l1 + torch.exp(m2 - m) * l2, acc1 + acc2


def _merge_other_max(m1, l1, acc1, m2, l2, acc2):  # a correct state with a different reference point m' = m + 1
    m = torch.maximum(m1, m2) + 1
    w1, w2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, w1 * l1 + w2 * l2, w1[:, None] * acc1 + w2[:, None] * acc2


def _hbm_flash(batch, heads, seq_len, head_dim, block_m, bytes_per_element):
    n, q_blocks = batch * heads * seq_len * head_dim, -(-seq_len // block_m)
    return (bytes_per_element * (4 * n + 4 * batch * heads * seq_len**2),
            bytes_per_element * (2 * n + 2 * n * q_blocks) + 4 * batch * heads * seq_len)


@pytest.mark.parametrize("name,fn", [
    ("flash-attention.logsumexp", lambda x: x.amax(-1) + torch.log(torch.exp(x - x.amax(-1, keepdim=True)).sum(-1))),
    ("flash-attention.merge_states", _merge_other_max),
    ("flash-attention.causal_key_blocks", lambda query_block, block_m, block_n, seq_len: range(
        (min((query_block + 1) * block_m, seq_len) - 1) // block_n + 1)),
    ("flash-attention.hbm_bytes", _hbm_flash),
])
def test_student_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn", [
    ("flash-attention.logsumexp", lambda x: torch.log(torch.exp(x).sum(-1))),  # overflows
    ("flash-attention.logsumexp", lambda x: x.max() + torch.log(torch.exp(x - x.max()).sum(-1))),  # global max
    ("flash-attention.merge_states", _merge_unrescaled),
    ("flash-attention.merge_states", _merge_to_second),
    ("flash-attention.merge_states", _merge_forgets_acc),
    ("flash-attention.causal_key_blocks", lambda query_block, block_m, block_n, seq_len: list(
        range(query_block + 1))),  # assumes square tiles
    ("flash-attention.causal_key_blocks", lambda query_block, block_m, block_n, seq_len: list(
        range(((query_block + 1) * block_m - 1) // block_n + 1))),  # forgets the sequence's end
    ("flash-attention.hbm_bytes", lambda batch, heads, seq_len, head_dim, block_m, bytes_per_element: (
        _hbm_flash(batch, heads, seq_len, head_dim, block_m, bytes_per_element)[0],
        4 * batch * heads * seq_len * head_dim * bytes_per_element)),  # K and V read only once
    ("flash-attention.hbm_bytes", lambda batch, heads, seq_len, head_dim, block_m, bytes_per_element: (
        bytes_per_element * (4 * batch * heads * seq_len * head_dim + 2 * batch * heads * seq_len**2),
        _hbm_flash(batch, heads, seq_len, head_dim, block_m, bytes_per_element)[1])),  # S and P never read back
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_figures():
    from labkit.viz import flash_attention as vf

    first = vf.online_softmax_figure(step=1, block_n=4, n_keys=24)
    last = vf.online_softmax_figure(step=6, block_n=4, n_keys=24)
    assert "after 1 of 6 key blocks" in first.layout.title.text
    err = float(last.layout.title.text.rsplit("= ", 1)[1])
    assert err < 1e-12  # every block in: exactly softmax(s) V
    assert "0 of 3 key blocks" in vf.online_softmax_figure(step=0, block_n=10, n_keys=25).layout.title.text
    assert vf.online_softmax_figure(step=9).layout.title.text == last.layout.title.text  # past the end: final
    with pytest.raises(ValueError, match="online_softmax_figure: step must be an int >= 0, got -1"):
        vf.online_softmax_figure(step=-1)
    text = vf.tile_schedule_figure(4096, 128, 128, causal=True).layout.title.text
    assert "528 of 1024 tiles computed (52%), 496 without a mask" in text  # 32 * 33 / 2 tiles, 32 on the diagonal
    assert "2048 of 2048" in vf.tile_schedule_figure(4096, 128, 64, causal=False).layout.title.text
    assert len(vf.hbm_traffic_figure().data) == 3
    rows = [dict(kind="attention", seq_len=64, head_dim=32, causal=c, baseline=b, tflops=1.0, baseline_tflops=2.0,
                 **{"pass": p}) for c in (False, True) for p in ("fwd", "fwd+bwd") for b in ("x", "y")]
    assert len(vf.bench_figure(rows).data) == 3


def test_benchmark_rows(monkeypatch):
    from labkit.benchmarks import flash_attention as bm

    dtype = torch.float32 if DEV.type == "cpu" else torch.float16  # SDPA's GPU backends take half precision
    tiny = dict(dtype=dtype, heads=2, shapes=[(1, 40, 16)], causal=(True,), warmup=0, repeats=1)
    monkeypatch.setattr(bm, "settings", lambda quick=False: dict(tiny))
    rows = bm.run(quick=True)
    assert rows and {r["pass"] for r in rows} == {"fwd", "fwd+bwd"} and all(r["causal"] for r in rows)
    assert {r["baseline"] for r in rows} <= set(bm.baselines())
    for r in rows:
        assert r["median_ms"] > 0 and r["baseline_ms"] > 0
        assert r["ratio"] == pytest.approx(r["tflops"] / r["baseline_tflops"])
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_ms"] / 1e9)
        assert r["flops"] == fa.attention_flops(1, 2, 40, 16, causal=True) * (3.5 if r["pass"] == "fwd+bwd" else 1)
        assert r["roof_fraction"] == pytest.approx(r["tflops"] / r["roof_tflops"])
        assert r["max_abs_diff"] < (1e-5 if dtype == torch.float32 else 1e-2)  # the same attention as SDPA
