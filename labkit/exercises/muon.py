"""Exercises of chapter 05-muon (registered on import; graded by labkit.check).

    muon.newton_schulz  fn(G, steps, coefficients, eps) -> X ~ U V^T, float32, G's shape
    muon.lr_scale       fn(shape, adjust_lr) -> the factor Muon multiplies lr by
    muon.ns_flops       fn(m, n, steps) -> matmul FLOPs of newton_schulz on an (m, n) matrix
    muon.split_params   fn(model) -> (names for Muon, names for AdamW)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from labkit.exercises import Exercise, register
from labkit.models import GPTConfig, TinyGPT
from labkit.optim import muon as mu

# --- muon.newton_schulz -----------------------------------------------------------------


def newton_schulz(G: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float) -> torch.Tensor:
    """Reference: labkit's newton_schulz, iterated in float32."""
    return mu.newton_schulz(G, steps, coefficients, eps, dtype=torch.float32)


def _ns_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def g(m, n, scale=1.0):
        return torch.randn(m, n, generator=gen) * scale

    J, C = mu.JORDAN_COEFFICIENTS, mu.CUBIC_COEFFICIENTS
    yield dict(G=g(1, 1), steps=5, coefficients=J, eps=1e-7)  # a 1x1 matrix: its sign (roughly)
    yield dict(G=g(4, 6), steps=0, coefficients=J, eps=1e-7)  # no iteration: only the normalization
    yield dict(G=g(4, 6), steps=1, coefficients=J, eps=1e-7)  # exactly one step
    yield dict(G=g(1, 16), steps=5, coefficients=J, eps=1e-7)  # a row vector
    yield dict(G=g(16, 1), steps=5, coefficients=J, eps=1e-7)  # a column vector (tall)
    yield dict(G=g(40, 12), steps=5, coefficients=J, eps=1e-7)  # tall: transpose first
    yield dict(G=g(12, 12, 1e-2), steps=5, coefficients=J, eps=1e-7)  # scale does not matter
    yield dict(G=g(8, 20), steps=10, coefficients=C, eps=1e-7)  # the classic cubic
    yield dict(G=torch.zeros(3, 5), steps=5, coefficients=J, eps=1e-7)  # zero in, zero out
    for _ in range(12):
        m, n = rng.randint(1, 48), rng.randint(1, 48)
        yield dict(G=g(m, n, 10 ** rng.uniform(-3, 3)), steps=rng.randint(1, 7),
                   coefficients=rng.choice([J, C]), eps=1e-7)


register(Exercise(
    name="muon.newton_schulz",
    reference=newton_schulz,
    cases=_ns_cases,
    rtol=1e-4, atol=1e-4,
    hint="X = G / max(||G||_F, eps) (or G / (||G||_F + eps)); if G is tall (m > n) work on X^T; "
         "repeat `steps` times: A = X X^T, X = a X + (b A + c A A) X; transpose back. "
         "The Frobenius norm (G.norm()), not the spectral norm.",
))

# --- muon.lr_scale ----------------------------------------------------------------------


def lr_scale(shape: tuple[int, int], adjust_lr: str) -> float:
    """Reference: max(1, A/B)^0.5 ("original") or 0.2 * max(A, B)^0.5 ("match_rms_adamw")."""
    return mu.adjust_lr_factor(shape, adjust_lr)


def _scale_cases(rng):
    for mode in mu.ADJUST_LR:
        yield dict(shape=(1, 1), adjust_lr=mode)
        yield dict(shape=(512, 512), adjust_lr=mode)
        yield dict(shape=(2048, 512), adjust_lr=mode)  # an MLP up weight (out, in): tall
        yield dict(shape=(512, 2048), adjust_lr=mode)  # an MLP down weight: wide
    for _ in range(12):
        yield dict(shape=(rng.randint(1, 16384), rng.randint(1, 16384)), adjust_lr=rng.choice(mu.ADJUST_LR))


register(Exercise(
    name="muon.lr_scale",
    reference=lr_scale,
    cases=_scale_cases,
    rtol=1e-9, atol=0.0,
    hint='shape is (A, B) = (out_features, in_features). "original": sqrt(max(1, A / B)); '
         '"match_rms_adamw": 0.2 * sqrt(max(A, B)).',
))

# --- muon.ns_flops ----------------------------------------------------------------------


def ns_flops(m: int, n: int, steps: int) -> int:
    """Reference: steps * (4 s^2 l + 2 s^3) with s = min(m, n), l = max(m, n)."""
    return mu.newton_schulz_flops(m, n, steps)


def _flops_cases(rng):
    yield dict(m=1, n=1, steps=1)
    yield dict(m=4096, n=4096, steps=5)
    yield dict(m=4096, n=11008, steps=5)  # Llama-7B MLP up: wide
    yield dict(m=11008, n=4096, steps=5)  # its down projection: tall, same cost
    yield dict(m=7, n=3, steps=0)
    for _ in range(15):
        yield dict(m=rng.randint(1, 16384), n=rng.randint(1, 16384), steps=rng.randint(1, 10))


register(Exercise(
    name="muon.ns_flops",
    reference=ns_flops,
    cases=_flops_cases,
    rtol=0.0, atol=0.0,
    hint="Work on the wide orientation (s, l), s = min(m, n). A (s, p) @ (p, q) matmul costs 2 s p q FLOPs. "
         "Per step: X X^T, then A A, then B X. Count only the matmuls.",
))

# --- muon.split_params ------------------------------------------------------------------


def split_params(model: nn.Module) -> tuple[list[str], list[str]]:
    """Reference: names of the parameters for Muon and for AdamW (split_muon_named_params)."""
    muon, adamw = mu.split_muon_named_params(model)
    return [n for n, _ in muon], [n for n, _ in adamw]


class _TwoTower(nn.Module):
    """Not a TinyGPT: an embedding, a 2-D hidden weight with a bias, a conv, and an untied head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.scale = nn.Parameter(torch.ones(8))
        self.lm_head = nn.Linear(8, 10, bias=False)


def _split_cases(rng):
    def tiny(**kw):
        base = dict(vocab_size=11, block_size=8, n_layer=2, n_embd=16, n_head=2)
        base.update(kw)
        return TinyGPT(GPTConfig(**base))

    yield dict(model=tiny())  # tied embeddings: the shared matrix once, to AdamW
    yield dict(model=tiny(tie_embeddings=False))  # untied: the head is a separate AdamW weight
    yield dict(model=tiny(bias=True))  # biases are 1-D: AdamW
    yield dict(model=tiny(norm="rmsnorm", mlp="swiglu", rope=True, n_kv_head=1))  # Llama-style, no pos_emb
    yield dict(model=_TwoTower())
    for _ in range(4):
        yield dict(model=tiny(tie_embeddings=rng.random() < 0.5, bias=rng.random() < 0.5,
                              mlp=rng.choice(["gelu", "swiglu"]), n_layer=rng.randint(1, 3)))


def _compare_split(got, expected, case) -> str | None:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a pair (muon_names, adamw_names), got {type(got).__name__}"
    muon, adamw = (list(x) for x in got)
    if not all(isinstance(n, str) for n in muon + adamw):
        return "expected parameter names (str), as model.named_parameters() gives them"
    for label, names in (("muon", muon), ("adamw", adamw)):
        if len(set(names)) != len(names):
            return f"{label} names contain duplicates: a shared (tied) weight must be listed once"
    both = set(muon) & set(adamw)
    if both:
        return f"{sorted(both)} in both lists"
    exp_muon, exp_adamw = set(expected[0]), set(expected[1])
    if set(muon) != exp_muon:
        missing, extra = sorted(exp_muon - set(muon)), sorted(set(muon) - exp_muon)
        return f"muon names differ: missing {missing}, should not be there {extra}"
    if set(adamw) != exp_adamw:
        missing, extra = sorted(exp_adamw - set(adamw)), sorted(set(adamw) - exp_adamw)
        return f"adamw names differ: missing {missing}, should not be there {extra}"
    return None


register(Exercise(
    name="muon.split_params",
    reference=split_params,
    cases=_split_cases,
    compare=_compare_split,
    hint="Walk model.named_modules(): every parameter of an nn.Embedding or of the module named lm_head goes "
         "to AdamW; then walk model.named_parameters() (shared tensors once): 2-D -> Muon unless already marked, "
         "everything else -> AdamW. Compare tensors by id(), since a tied weight has two names.",
))

__all__ = ["lr_scale", "newton_schulz", "ns_flops", "split_params"]
