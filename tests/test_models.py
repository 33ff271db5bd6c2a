"""TinyGPT (labkit.models.gpt) and the training loop (labkit.models.train)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.datasets import batches, token_dataset
from labkit.models import Block, CausalSelfAttention, GPTConfig, RMSNorm, TinyGPT, evaluate, train
from labkit.models.gpt import IGNORE_INDEX, apply_rope, rope_cache
from labkit.runtime import seed_everything


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=32, block_size=16, n_layer=2, n_embd=16, n_head=4)
    base.update(kw)
    return GPTConfig(**base)


VARIANTS = {
    "mha": {},
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "llama": dict(n_kv_head=2, norm="rmsnorm", mlp="swiglu", rope=True),
}


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_embd=130, n_head=4), "n_embd"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(block_size=-1), "block_size"),
        (dict(n_layer=2.0), "n_layer"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="relu"), "mlp"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(dropout=1.0), "dropout"),
        (dict(tie_embeddings=1), "tie_embeddings"),
        (dict(rope=True, n_embd=12, n_head=4), "n_embd"),  # head_dim 3 is odd
    ],
)
def test_config_rejects_bad_fields(kw, field):
    with pytest.raises(ValueError, match=rf"GPTConfig: {field} must be .*, got"):
        GPTConfig(**kw)


def test_config_defaults_and_derived_sizes():
    c = GPTConfig()
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_embd, c.n_head) == (256, 128, 4, 128, 4)
    assert (c.head_dim, c.kv_heads, c.hidden_dim) == (32, 4, 512)
    assert GPTConfig(n_kv_head=1).kv_heads == 1


def test_model_rejects_non_config():
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        TinyGPT(dict(n_layer=1))


# --------------------------------------------------------------------------- shapes


@st.composite
def configs(draw):
    n_head = draw(st.sampled_from([1, 2, 4]))
    n_kv_head = draw(st.sampled_from([None] + [k for k in (1, 2, 4) if n_head % k == 0]))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    return GPTConfig(
        vocab_size=draw(st.integers(2, 40)),
        block_size=8,
        n_layer=draw(st.integers(1, 2)),
        n_embd=n_head * head_dim,
        n_head=n_head,
        n_kv_head=n_kv_head,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        mlp=draw(st.sampled_from(["gelu", "swiglu"])),
        mlp_ratio=draw(st.sampled_from([1.0, 8 / 3, 4.0])),
        rope=draw(st.booleans()),
        bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
    )


@settings(max_examples=30, deadline=None)
@given(config=configs(), B=st.integers(1, 3), T=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_forward_shapes(config, B, T, seed):
    torch.manual_seed(seed)
    model = TinyGPT(config)
    idx = torch.randint(config.vocab_size, (B, T))
    logits, loss = model(idx)
    assert logits.shape == (B, T, config.vocab_size) and loss is None
    logits, loss = model(idx, torch.randint(config.vocab_size, (B, T)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    x = torch.randn(B, T, config.n_embd)
    assert Block(config)(x).shape == (B, T, config.n_embd)
    attn = model.blocks[0].attn
    assert attn.k_proj.out_features == config.kv_heads * config.head_dim


def test_initial_loss_is_uniform_guess():
    torch.manual_seed(0)
    config = tiny(vocab_size=64)
    logits, loss = TinyGPT(config)(torch.randint(64, (4, 16)), torch.randint(64, (4, 16)))
    assert abs(loss.item() - math.log(64)) < 0.1  # small init: near-uniform predictions


# --------------------------------------------------------------------------- attention maths


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causality(variant):
    torch.manual_seed(0)
    model = TinyGPT(tiny(**VARIANTS[variant])).double()
    idx = torch.randint(32, (2, 12))
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 32
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)  # the past does not see t
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-6  # t and the future do


def reference_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D) + causal mask) V written out, each query head with its KV head."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2)
    if attn.rope:
        q, k = apply_rope(q, attn.cos[:T], attn.sin[:T]), apply_rope(k, attn.cos[:T], attn.sin[:T])
    heads = []
    for h in range(H):
        g = h // (H // Hkv)  # the KV head this query head reads
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(D)  # (B, T, T)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, g])  # (B, T, D)
    y = torch.stack(heads, dim=1).transpose(1, 2).reshape(B, T, H * D)
    return y @ attn.o_proj.weight.T


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_matches_plain_reference_fp64(variant):
    torch.manual_seed(1)
    attn = CausalSelfAttention(tiny(n_embd=32, **VARIANTS[variant])).double()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), rtol=1e-10, atol=1e-12)


def test_gqa_with_as_many_kv_heads_as_query_heads_is_mha():
    torch.manual_seed(0)
    mha = TinyGPT(tiny())
    torch.manual_seed(0)
    gqa = TinyGPT(tiny(n_kv_head=4))
    idx = torch.randint(32, (2, 10))
    torch.testing.assert_close(mha(idx)[0], gqa(idx)[0], rtol=0, atol=0)


def test_gqa_equals_mha_with_kv_heads_duplicated():
    torch.manual_seed(0)
    gqa = CausalSelfAttention(tiny(n_embd=32, n_head=4, n_kv_head=2)).double()
    mha = CausalSelfAttention(tiny(n_embd=32, n_head=4)).double()
    D = gqa.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, D, 32)  # (Hkv, D, C)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * D, 32))
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-12, atol=1e-12)
    n_kv = lambda m: m.k_proj.weight.numel() + m.v_proj.weight.numel()  # noqa: E731
    assert n_kv(gqa) * 2 == n_kv(mha)  # and it stores half the KV weights


def test_rmsnorm_matches_formula_and_torch():
    torch.manual_seed(0)
    norm = RMSNorm(8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    ref = torch.nn.RMSNorm(8, eps=norm.eps).double()
    with torch.no_grad():
        ref.weight.copy_(norm.weight)
    torch.testing.assert_close(norm(x), ref(x))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    D = 8
    cos, sin = rope_cache(32, D)
    q, k = torch.randn(D), torch.randn(D)

    def score(m, n):  # q at position m, k at position n
        qm = apply_rope(q.expand(1, 1, 32, D), cos, sin)[0, 0, m]
        kn = apply_rope(k.expand(1, 1, 32, D), cos, sin)[0, 0, n]
        return qm @ kn

    torch.testing.assert_close(score(5, 2), score(20, 17), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)
    x = torch.randn(2, 3, 32, D)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))  # a rotation


# --------------------------------------------------------------------------- parameters and loss


def test_tied_embeddings_share_storage():
    tied, untied = TinyGPT(tiny()), TinyGPT(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 32 * 16
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)


def test_non_embedding_params_are_blocks_and_final_norm():
    model = TinyGPT(tiny(norm="rmsnorm", mlp="swiglu", n_kv_head=1))
    inner = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.norm_f.parameters())
    assert model.num_params(non_embedding=True) == inner
    assert model.num_params() == inner + 32 * 16 + 16 * 16  # + token and position embeddings


def test_ignored_targets_are_not_scored():
    torch.manual_seed(0)
    model = TinyGPT(tiny())
    idx = torch.randint(32, (2, 6))
    targets = torch.full((2, 6), IGNORE_INDEX)
    targets[1, 3] = 5
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[1, 3], torch.tensor(5)))


@pytest.mark.parametrize(
    "idx, targets, match",
    [
        (torch.zeros(1, 17, dtype=torch.long), None, "T must be <= block_size=16"),
        (torch.zeros(1, 4), None, "idx must be an integer tensor"),
        (torch.zeros(4, dtype=torch.long), None, "idx must be an integer tensor"),
        (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), "targets must have"),
    ],
)
def test_forward_rejects_bad_input(idx, targets, match):
    with pytest.raises(ValueError, match=match):
        TinyGPT(tiny())(idx, targets)


# --------------------------------------------------------------------------- generation


def test_generate_length_and_determinism():
    torch.manual_seed(0)
    model = TinyGPT(tiny())
    model.train()
    prompt = torch.randint(32, (2, 3))
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))  # 23 > block_size 16
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 23) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert model.training  # mode restored
    c = model.generate(prompt, 20, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)
    greedy = model.generate(prompt, 5, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 5, top_k=1, generator=torch.Generator().manual_seed(3)))
    assert model.generate(prompt, 0).shape == (2, 3)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-0.5), "temperature"),
        (dict(max_new_tokens=2, top_k=0), "top_k"),
    ],
)
def test_generate_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TinyGPT(tiny()).generate(torch.zeros(1, 2, dtype=torch.long), **kw)


# --------------------------------------------------------------------------- training


def _char_run(steps, seed=0):
    seed_everything(seed)
    data = token_dataset("char")
    vocab = int(data.max()) + 1
    model = TinyGPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_embd=32, n_head=2))
    log = train(model, batches(data, 16, 32), steps, lr=1e-2, progress=False)
    return model, log, vocab


def test_loss_drops_on_char_corpus_and_is_deterministic():
    model, log, vocab = _char_run(30)
    assert log.steps == 30 and log.tokens == 30 * 16 * 32 and log.tokens_per_s > 0
    assert abs(log.losses[0] - math.log(vocab)) < 0.3  # starts at the uniform guess, ln(76) = 4.33
    assert log.smoothed(5) < log.losses[0] - 0.8  # a real drop: ~4.33 -> ~3.2 nats in 30 steps
    _, again, _ = _char_run(30)
    assert again.losses == log.losses  # seeded: bit-identical on the CPU
    val = evaluate(model, batches(token_dataset("char", "val"), 8, 32, seed=0), n=3)
    assert val < log.losses[0] - 0.6
    assert model.training


def test_train_on_a_synthetic_task_with_custom_optimizer():
    from labkit.datasets import copy_task

    torch.manual_seed(0)
    x, y = copy_task(n=64, length=4, vocab_size=8, seed=0)
    model = TinyGPT(tiny(vocab_size=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: parameters must not move
    before = [p.clone() for p in model.parameters()]
    log = train(model, [(x, y)] * 3, 3, optimizer=opt, progress=True, log_every=1)
    assert log.losses[0] == pytest.approx(log.losses[2])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_and_evaluate_reject_bad_arguments():
    model = TinyGPT(tiny())
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="steps must be"):
        train(model, [(x, x)], 0, progress=False)
    with pytest.raises(ValueError, match="batches ran out after 1 of 2"):
        train(model, [(x, x)], 2, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        evaluate(model, [(x, x)], n=0)
    with pytest.raises(ValueError, match="batches ran out"):
        evaluate(model, [(x, x)], n=2)
