"""Exercises of chapter 16-flash-attention (registered on import; graded by labkit.check).

    flash-attention.logsumexp          fn(x) -> log(sum(exp(x))) over the last dim, without overflow
    flash-attention.merge_states       fn(m1, l1, acc1, m2, l2, acc2) -> (m, l, acc): two online-softmax states
    flash-attention.causal_key_blocks  fn(query_block, block_m, block_n, seq_len) -> key blocks it must read
    flash-attention.hbm_bytes          fn(batch, heads, seq_len, head_dim, block_m, bytes_per_element)
                                       -> (naive bytes, FlashAttention forward bytes)
"""

from __future__ import annotations

import torch

from labkit.exercises import Exercise, default_compare, register
from labkit.kernels import flash_attention as fa

# --- flash-attention.logsumexp ------------------------------------------------------------


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Reference: torch.logsumexp over the last dimension."""
    return torch.logsumexp(x, dim=-1)


def _lse_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def randn(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    yield dict(x=randn(5))  # one row
    yield dict(x=randn(3, 1))  # one element per row: lse = x
    yield dict(x=randn(4, 8) * 30 + 1000)  # exp(1000) overflows even in float64
    yield dict(x=randn(4, 8) * 30 - 1000)  # exp(-1000) underflows to 0: log(0) = -inf
    yield dict(x=torch.stack([randn(6) + 500, randn(6) - 500]))  # rows far apart: the max must be per row
    yield dict(x=randn(2, 3, 7, dtype=torch.float32) * 40)  # float32 overflows already at exp(89)
    masked = randn(3, 9)
    masked[:, 4:] = float("-inf")  # masked keys (causal): exp(-inf) = 0
    yield dict(x=masked)
    yield dict(x=torch.full((2, 5), 3.0, dtype=torch.float64))  # all equal: lse = 3 + log 5
    for _ in range(12):
        shape = [rng.randint(1, 4) for _ in range(rng.randint(0, 2))] + [rng.randint(1, 64)]
        yield dict(x=randn(*shape) * 10 ** rng.uniform(-1, 3) + rng.uniform(-800, 800))


register(Exercise(
    name="flash-attention.logsumexp",
    reference=logsumexp,
    cases=_lse_cases,
    rtol=1e-5, atol=1e-5,
    hint="Subtract the row's maximum m first: log sum exp(x) = m + log sum exp(x - m). Every exponent is then "
         "<= 0 (no overflow) and one of them is 0 (the sum is >= 1, no log(0)). Use the max of each row "
         "(x.amax(dim=-1, keepdim=True)), not of the whole tensor.",
))

# --- flash-attention.merge_states ------------------------------------------------------------


def merge_states(m1, l1, acc1, m2, l2, acc2):
    """Reference: labkit.kernels.flash_attention.merge_states."""
    return fa.merge_states((m1, l1, acc1), (m2, l2, acc2))


def _state(s: torch.Tensor, v: torch.Tensor):
    """The online-softmax state (m, l, acc) of scores s (M, n) against values v (n, D)."""
    M, D = s.shape[0], v.shape[1]
    init = (torch.full((M,), float("-inf"), dtype=s.dtype), torch.zeros(M, dtype=s.dtype),
            torch.zeros(M, D, dtype=s.dtype))
    return fa.online_softmax_update(*init, s, v)


def _merge_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def case(M, n1, n2, D, shift1=0.0, shift2=0.0, scale=1.0):
        a = _state(randn(M, n1) * scale + shift1, randn(n1, D))
        b = _state(randn(M, n2) * scale + shift2, randn(n2, D))
        return dict(m1=a[0], l1=a[1], acc1=a[2], m2=b[0], l2=b[1], acc2=b[2])

    yield case(1, 1, 1, 1)  # one row, one key each side
    yield case(4, 8, 8, 4)  # two equal blocks
    yield case(3, 5, 2, 6, shift1=4.0)  # the first block holds the larger scores
    yield case(3, 5, 2, 6, shift2=4.0)  # the second does
    yield case(2, 4, 4, 3, shift1=600.0, shift2=-600.0)  # exp(m1 - m2) overflows: rescale to the larger max
    yield case(2, 4, 4, 3, shift1=-600.0, shift2=600.0)
    c = case(3, 4, 4, 2)  # an empty second state (no keys yet): m = -inf, l = 0, acc = 0
    c.update(m2=torch.full((3,), float("-inf"), dtype=torch.float64), l2=torch.zeros(3, dtype=torch.float64),
             acc2=torch.zeros(3, 2, dtype=torch.float64))
    yield c
    for _ in range(12):
        yield case(rng.randint(1, 8), rng.randint(1, 16), rng.randint(1, 16), rng.randint(1, 8),
                   shift1=rng.uniform(-50, 50), shift2=rng.uniform(-50, 50), scale=10 ** rng.uniform(-1, 1.5))


def _compare_states(got, expected, case) -> str | None:
    """A state is defined up to the choice of m: compare what it stands for, O = acc / l and LSE = m + log l."""
    if not isinstance(got, (tuple, list)) or len(got) != 3 or not all(isinstance(t, torch.Tensor) for t in got):
        return f"expected a tuple of three tensors (m, l, acc), got {type(got).__name__}"
    m, l, acc = (t.detach().to(torch.float64) for t in got)
    want_m, want_l, want_acc = expected
    if m.shape != want_m.shape or l.shape != want_l.shape or acc.shape != want_acc.shape:
        return (f"shapes m {tuple(m.shape)}, l {tuple(l.shape)}, acc {tuple(acc.shape)} != expected "
                f"{tuple(want_m.shape)}, {tuple(want_l.shape)}, {tuple(want_acc.shape)}")
    if not (torch.isfinite(m).all() and torch.isfinite(l).all() and torch.isfinite(acc).all()):
        return "the merged state has inf or nan entries (did exp(m1 - m2) overflow? rescale to the larger max)"
    o, lse = fa.finalize(m, l, acc)
    want_o, want_lse = fa.finalize(*expected)
    msg = default_compare(lse, want_lse, 1e-9, 1e-9)
    if msg:
        return "log-sum-exp m + log(l) of the merged state: " + msg
    msg = default_compare(o, want_o, 1e-9, 1e-9)
    return None if msg is None else "output acc / l of the merged state: " + msg


register(Exercise(
    name="flash-attention.merge_states",
    reference=merge_states,
    cases=_merge_cases,
    compare=_compare_states,
    hint="Bring both states to the common max m = max(m1, m2): a state's l and acc were summed against its own "
         "max, so multiply them by exp(m_i - m) (<= 1, never overflows), then add. acc has one more dimension "
         "than l: broadcast the factor with [..., None].",
))

# --- flash-attention.causal_key_blocks ---------------------------------------------------------


def causal_key_blocks(query_block: int, block_m: int, block_n: int, seq_len: int) -> list[int]:
    """Reference: the key blocks holding at least one key j <= the query block's last row."""
    return list(fa.key_blocks(query_block, block_m, block_n, seq_len, causal=True))


def _blocks_cases(rng):
    yield dict(query_block=0, block_m=64, block_n=64, seq_len=1)  # one token
    yield dict(query_block=0, block_m=64, block_n=64, seq_len=4096)  # the first block sees only itself
    yield dict(query_block=3, block_m=64, block_n=64, seq_len=4096)  # square tiles: blocks 0..3
    yield dict(query_block=3, block_m=128, block_n=64, seq_len=4096)  # taller query tiles
    yield dict(query_block=3, block_m=64, block_n=128, seq_len=4096)  # wider key tiles
    yield dict(query_block=2, block_m=64, block_n=64, seq_len=150)  # the last block is a short tail
    yield dict(query_block=1, block_m=128, block_n=32, seq_len=200)  # tail, and 4 key blocks per query block
    yield dict(query_block=0, block_m=16, block_n=128, seq_len=1000)
    for _ in range(12):
        block_m, block_n = 2 ** rng.randint(4, 7), 2 ** rng.randint(4, 7)
        seq_len = rng.randint(1, 5000)
        yield dict(query_block=rng.randrange(-(-seq_len // block_m)), block_m=block_m, block_n=block_n,
                   seq_len=seq_len)


def _short(blocks: list) -> str:
    return str(blocks) if len(blocks) < 12 else f"[{blocks[0]}, {blocks[1]}, ..., {blocks[-1]}] ({len(blocks)} blocks)"


def _compare_blocks(got, expected, case) -> str | None:
    try:
        got = [int(b) for b in got]
    except TypeError:
        return f"expected a list of key block indices, got {type(got).__name__}"
    return None if got == expected else f"{_short(got)} != expected {_short(expected)}"


register(Exercise(
    name="flash-attention.causal_key_blocks",
    reference=causal_key_blocks,
    cases=_blocks_cases,
    compare=_compare_blocks,
    hint="Query block b holds rows b*block_m .. min((b+1)*block_m, seq_len) - 1. With a causal mask row i sees "
         "keys 0..i, so the block needs every key block up to the one holding its last row: key block k holds "
         "keys k*block_n .. (k+1)*block_n - 1.",
))

# --- flash-attention.hbm_bytes ----------------------------------------------------------------


def hbm_bytes(batch: int, heads: int, seq_len: int, head_dim: int, block_m: int,
              bytes_per_element: float) -> tuple[float, float]:
    """Reference: (naive attention's bytes, FlashAttention forward's bytes with no cache reuse)."""
    return (fa.naive_hbm_bytes(batch, heads, seq_len, head_dim, dtype=bytes_per_element),
            fa.flash_forward_hbm_bytes(batch, heads, seq_len, head_dim, block_m=block_m, dtype=bytes_per_element))


def _bytes_cases(rng):
    yield dict(batch=1, heads=1, seq_len=1, head_dim=16, block_m=64, bytes_per_element=2)
    yield dict(batch=8, heads=32, seq_len=4096, head_dim=128, block_m=128, bytes_per_element=2)  # the benchmark
    yield dict(batch=1, heads=32, seq_len=131072, head_dim=128, block_m=128, bytes_per_element=2)  # long context
    yield dict(batch=2, heads=4, seq_len=1000, head_dim=64, block_m=128, bytes_per_element=4)  # a tail block
    yield dict(batch=2, heads=4, seq_len=1000, head_dim=64, block_m=64, bytes_per_element=1)  # fp8
    for _ in range(12):
        yield dict(batch=rng.randint(1, 16), heads=rng.choice([1, 8, 12, 32, 64]), seq_len=rng.randint(1, 32768),
                   head_dim=rng.choice([16, 32, 64, 128, 256]), block_m=rng.choice([16, 32, 64, 128]),
                   bytes_per_element=rng.choice([1, 2, 4]))


register(Exercise(
    name="flash-attention.hbm_bytes",
    reference=hbm_bytes,
    cases=_bytes_cases,
    rtol=1e-12, atol=0.0,
    hint="Naive: Q, K, V read and O written (4 B H N D elements), plus S = QK^T written then read by the softmax "
         "and P written then read by PV (4 B H N^2). Flash: Q read and O written once, but K and V are read "
         "once per query block, ceil(N / block_m) times; plus one float32 log-sum-exp (4 bytes) per row.",
))

__all__ = ["causal_key_blocks", "hbm_bytes", "logsumexp", "merge_states"]
