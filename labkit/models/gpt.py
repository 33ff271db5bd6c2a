"""A small, configurable decoder-only transformer (the course's TinyGPT).

The skeleton is GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners") as written in nanoGPT (Karpathy 2022, github.com/karpathy/nanoGPT): token +
learned position embeddings, pre-norm blocks `x + attn(norm(x))`, `x + mlp(norm(x))`, a
final norm and a linear head tied to the token embedding. Switches turn it into the
Llama recipe (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"):

- norm="rmsnorm": RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm;
- mlp="swiglu": SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer");
- rope=True: rotary position embeddings (Su et al. 2021, "RoFormer") instead of learned ones;
- n_kv_head: grouped-query attention (Ainslie et al. 2023, "GQA"): n_kv_head key/value
  heads shared by groups of n_head // n_kv_head query heads; n_kv_head=1 is multi-query
  attention (Shazeer 2019), None (= n_head) is ordinary multi-head attention.

Attention runs through `F.scaled_dot_product_attention(..., is_causal=True)`, so PyTorch
picks a fused kernel (FlashAttention on a GPU). There is no KV cache: `generate` re-runs
the model on the whole (cropped) context each step, which is simple and fine at this size.

Shapes: B batch, T time (sequence), C = n_embd, H = n_head, Hkv = n_kv_head, D = C // H,
V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets equal to this are not scored (PyTorch's cross_entropy default)


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128  # longest context the model accepts
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int | None = None  # None: MHA; 1: MQA; a divisor of n_head in between: GQA
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    mlp: str = "gelu"  # "gelu" | "swiglu"
    mlp_ratio: float = 4.0  # hidden width = int(mlp_ratio * n_embd); swiglu has 3 matrices, not 2
    tie_embeddings: bool = True  # lm_head.weight is tok_emb.weight
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm
    rope: bool = False  # rotary embeddings instead of learned positions
    rope_base: float = 10000.0

    def __post_init__(self):
        def fail(field, expected, got):
            raise ValueError(f"GPTConfig: {field} must be {expected}, got {got}")

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(name, "a positive int", repr(v))
        if self.n_embd % self.n_head:
            fail("n_embd", f"divisible by n_head={self.n_head}", self.n_embd)
        if self.n_kv_head is not None:
            k = self.n_kv_head
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                fail("n_kv_head", "None or a positive int", repr(k))
            if self.n_head % k:
                fail("n_kv_head", f"a divisor of n_head={self.n_head}", k)
        if self.norm not in ("layernorm", "rmsnorm"):
            fail("norm", "'layernorm' or 'rmsnorm'", repr(self.norm))
        if self.mlp not in ("gelu", "swiglu"):
            fail("mlp", "'gelu' or 'swiglu'", repr(self.mlp))
        if not number(self.mlp_ratio) or self.mlp_ratio <= 0:
            fail("mlp_ratio", "a positive number", repr(self.mlp_ratio))
        if int(self.mlp_ratio * self.n_embd) < 1:
            fail("mlp_ratio", f"large enough that int(mlp_ratio * n_embd) >= 1 (n_embd={self.n_embd})",
                 self.mlp_ratio)
        if not number(self.dropout) or not 0 <= self.dropout < 1:
            fail("dropout", "a number in [0, 1)", repr(self.dropout))
        for name in ("tie_embeddings", "bias", "rope"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool", repr(getattr(self, name)))
        if self.rope and self.head_dim % 2:
            fail("n_embd", f"such that head_dim = n_embd // n_head is even with rope=True "
                 f"(n_head={self.n_head})", self.n_embd)
        if not number(self.rope_base) or self.rope_base <= 1:
            fail("rope_base", "a number > 1", repr(self.rope_base))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_head, or n_head when it is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        return int(self.mlp_ratio * self.n_embd)


# --------------------------------------------------------------------------- normalization


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        xf = x.float()  # statistics in float32 even under bf16
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


# --------------------------------------------------------------------------- rotary embeddings


def rope_cache(T: int, D: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (T, D/2): position t rotates channel pair i by angle t * base^(-2i/D)."""
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, H, T, D) by the angles in cos/sin (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each ("rotate half", as in GPT-NeoX / Llama)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, T, D)


# --------------------------------------------------------------------------- attention


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with H query heads and Hkv key/value heads (MHA/GQA/MQA)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C, H, Hkv, D = config.n_embd, config.n_head, config.kv_heads, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=config.bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=config.bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=config.bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.bias)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)
        self.rope = config.rope
        if config.rope:
            cos, sin = rope_cache(config.block_size, D, config.rope_base)
            self.register_buffer("cos", cos, persistent=False)  # (block_size, D/2)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.rope:
            q = apply_rope(q, self.cos[:T], self.sin[:T])
            k = apply_rope(k, self.cos[:T], self.sin[:T])
        if Hkv != H:
            # GQA: query head h reads key/value head h // (H // Hkv).
            k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, T, D)
            v = v.repeat_interleave(H // Hkv, dim=1)  # (B, H, T, D)
        y = self.attend(q, k, v)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)
        return self.resid_drop(self.o_proj(y))  # (B, T, C)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + causal mask) v on (B, H, T, D); a subclass may swap the kernel."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)


# --------------------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """gelu: down(gelu(up x)).  swiglu: down(silu(gate x) * up x)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C, hidden = config.n_embd, config.hidden_dim
        self.kind = config.mlp
        if config.mlp == "swiglu":
            self.gate = nn.Linear(C, hidden, bias=config.bias)
        self.up = nn.Linear(C, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, C, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, hidden)
        else:
            h = F.gelu(self.up(x))  # (B, T, hidden)
        return self.drop(self.down(h))


# --------------------------------------------------------------------------- the model


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(.))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TinyGPT(nn.Module):
    """Decoder-only language model: idx (B, T) -> logits (B, T, V) [, mean cross-entropy]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"TinyGPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = None if config.rope else nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one (V, C) matrix, read twice
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("attn.o_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding: leave out the token and
        position embeddings and an untied output head (Kaplan et al. 2020's N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
            raise ValueError(
                "TinyGPT.forward: idx must be an integer tensor of shape (B, T), got "
                f"{type(idx).__name__} {tuple(getattr(idx, 'shape', ()))} {getattr(idx, 'dtype', '')}"
            )
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"TinyGPT.forward: sequence length T must be <= block_size={self.config.block_size}, got {T}"
            )
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))  # (B, T, C) + (T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(
                f"TinyGPT.forward: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}"
            )
        loss = F.cross_entropy(
            logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX
        )  # mean over scored positions
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T0); returns (B, T0 + max_new_tokens).

        temperature=0 is greedy decoding; top_k keeps the k most likely tokens. Pass a
        torch.Generator (on the model's device) for reproducible samples. Runs in eval mode.
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"TinyGPT.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"TinyGPT.generate: temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"TinyGPT.generate: top_k must be None or an int >= 1, got {top_k!r}")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(
                f"TinyGPT.generate: idx must be a (B, T) tensor with T >= 1, got {tuple(getattr(idx, 'shape', ()))}"
            )
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                context = idx[:, -self.config.block_size :]  # (B, <= block_size)
                logits, _ = self(context)
                logits = logits[:, -1, :].float()  # (B, V): only the last position predicts
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)  # (B, V)
                    nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
                idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)  # (B, T + 1)
        finally:
            self.train(was_training)
        return idx
