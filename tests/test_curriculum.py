"""Tests of labkit.train.curriculum (chapter 09-data-order), its exercises, figures and benchmarks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.exercises import lookup
from labkit.train import curriculum as cu

kinds = st.sampled_from(cu.PACINGS)
c0s = st.floats(min_value=1e-3, max_value=1.0)
ramps = st.integers(min_value=1, max_value=5000)
ps = st.floats(min_value=0.25, max_value=8.0)
stages = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


# --- pacing functions ---------------------------------------------------------------------------


@given(kind=kinds, c0=c0s, ramp=ramps, p=ps, n=stages, t=st.floats(min_value=0, max_value=20_000))
def test_pacing_range_and_endpoints(kind, c0, ramp, p, n, t):
    c = cu.pacing(kind, t, ramp, c0, p=p, n_stages=n)
    assert c0 <= c <= 1.0
    assert cu.pacing(kind, 0, ramp, c0, p=p, n_stages=n) == pytest.approx(c0, rel=1e-12)
    assert cu.pacing(kind, ramp, ramp, c0, p=p, n_stages=n) == 1.0
    if t >= ramp:
        assert c == 1.0


@given(kind=kinds, c0=c0s, ramp=ramps, p=ps, n=stages, a=st.floats(0, 10_000), b=st.floats(0, 10_000))
def test_pacing_is_monotone(kind, c0, ramp, p, n, a, b):
    lo, hi = sorted((a, b))
    assert cu.pacing(kind, lo, ramp, c0, p=p, n_stages=n) <= cu.pacing(kind, hi, ramp, c0, p=p, n_stages=n)


def test_pacing_by_hand():
    assert cu.pacing("linear", 50, 100, 0.2) == pytest.approx(0.6)
    assert cu.pacing("root", 50, 100, 0.2) == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))
    assert cu.pacing("root", 50, 100, 0.2, p=1.0) == pytest.approx(0.6)  # p = 1 is linear
    assert cu.pacing("exponential", 50, 100, 0.01) == pytest.approx(0.1)  # geometric mean of c0 and 1
    assert cu.pacing("step", 24, 100, 0.2, n_stages=4) == pytest.approx(0.2)
    assert cu.pacing("step", 25, 100, 0.2, n_stages=4) == pytest.approx(0.4)
    assert cu.pacing("step", 99, 100, 0.2, n_stages=4) == pytest.approx(0.8)
    assert all(cu.pacing(k, 30, 100, 1.0) == 1.0 for k in cu.PACINGS)  # c0 = 1: no curriculum
    # the orderings the chapter's widget shows: root opens fastest, exponential slowest
    r, lin, e = (cu.pacing(k, 20, 100, 0.1) for k in ("root", "linear", "exponential"))
    assert r > lin > e


def test_pacing_curve_and_eligibility():
    curve = cu.pacing_curve("linear", 11, 10, 0.0 + 0.5)
    torch.testing.assert_close(curve, torch.tensor([0.5 + 0.05 * t for t in range(10)] + [1.0], dtype=torch.float64))
    assert cu.eligible_count(0.1, 4096) == 410 and cu.eligible_count(1.0, 7) == 7 and cu.eligible_count(0.0, 7) == 1
    assert cu.eligible_count(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004: still 3
    torch.testing.assert_close(cu.eligible_buckets(0.35, 10),
                               torch.tensor([1, 1, 1, 0.5, 0, 0, 0, 0, 0, 0], dtype=torch.float64))


@given(c=st.floats(0, 1), k=st.integers(1, 50))
def test_eligible_buckets_sum_to_competence(c, k):
    e = cu.eligible_buckets(c, k)
    assert e.sum().item() == pytest.approx(c * k, abs=1e-9)
    assert ((e >= 0) & (e <= 1)).all() and (e[1:] <= e[:-1]).all()  # easier buckets open first


# --- difficulty scores -----------------------------------------------------------------------------


def test_length_and_rarity_by_hand():
    ex = [[0, 1, 1], [2], torch.tensor([1, -100, 1])]
    torch.testing.assert_close(cu.length_scores(ex), torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    lp = cu.unigram_log_probs(torch.tensor([0, 1, 1, 1]), 3, alpha=1.0)  # counts 2, 4, 1 over 7
    torch.testing.assert_close(lp, torch.tensor([2 / 7, 4 / 7, 1 / 7], dtype=torch.float64).log())
    r = cu.rarity_scores(ex, lp)
    torch.testing.assert_close(r, torch.tensor([-(math.log(2 / 7) + 2 * math.log(4 / 7)) / 3, -math.log(1 / 7),
                                                -math.log(4 / 7)], dtype=torch.float64))
    assert cu.length_scores(torch.zeros(4, 5, dtype=torch.long)).tolist() == [5.0] * 4


@given(tokens=st.lists(st.integers(0, 9), min_size=1, max_size=200), alpha=st.floats(0.01, 5))
def test_unigram_log_probs_normalise(tokens, alpha):
    lp = cu.unigram_log_probs(torch.tensor(tokens), 10, alpha)
    assert lp.exp().sum().item() == pytest.approx(1.0)
    assert lp.argmax().item() in {t for t in tokens if tokens.count(t) == max(tokens.count(u) for u in tokens)}


def test_bigram_lm_counts_by_hand_and_scores_like_cross_entropy():
    tokens = torch.tensor([0, 1, 0, 1, 1, 2, 0])
    bigram = cu.BigramLM.fit(tokens, 3, alpha=0.5)
    # after 0: (0->1) twice; after 1: (1->0), (1->1), (1->2) once each; after 2: (2->0) once
    expected = torch.tensor([[0.5, 2.5, 0.5], [1.5, 1.5, 1.5], [1.5, 0.5, 0.5]])
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(bigram.table.exp(), expected)
    x, y = torch.tensor([[0, 1, 2], [1, 1, 0]]), torch.tensor([[1, 2, 0], [1, -100, 1]])
    logits, loss = bigram(x, y)
    assert logits.shape == (2, 3, 3)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100))
    per = cu.model_loss_scores(bigram, x, y, batch_size=1)
    for i in range(2):
        keep = y[i] != -100
        torch.testing.assert_close(per[i], F.cross_entropy(logits[i][keep], y[i][keep]).double())


def test_model_loss_scores_match_tinygpt_and_restore_training_mode():
    from labkit.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=11, n_layer=1, n_embd=16, n_head=2, block_size=6))
    x, y = torch.randint(11, (5, 6)), torch.randint(11, (5, 6))
    scores = cu.model_loss_scores(model, x, y, batch_size=2)
    assert model.training
    with torch.no_grad():
        model.eval()
        direct = torch.stack([model(x[i:i + 1], y[i:i + 1])[1] for i in range(5)]).double()
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-6)


@given(scores=st.lists(st.floats(-100, 100), min_size=1, max_size=100), k=st.integers(1, 12))
def test_difficulty_buckets_are_equal_sized_and_ordered(scores, k):
    s = torch.tensor(scores, dtype=torch.float64)
    b = cu.difficulty_buckets(s, k)
    assert b.min() >= 0 and b.max() < k
    counts = torch.bincount(b, minlength=k)
    assert counts.max() - counts.min() <= 1 or len(scores) < k
    order = torch.argsort(s, stable=True)
    assert (b[order][1:] >= b[order][:-1]).all()  # harder examples never sit in an easier bucket


# --- the sampler -------------------------------------------------------------------------------------


@given(n=st.integers(1, 300), bs=st.integers(1, 16), kind=kinds, c0=c0s, seed=seeds)
def test_sampler_draws_only_from_the_allowed_prefix(n, bs, kind, c0, seed):
    scores = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    steps = 40
    smp = cu.CurriculumSampler(scores, bs, steps, pacing=kind, c0=c0, ramp_steps=25, seed=seed)
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(scores, stable=True)] = torch.arange(n)
    batches = list(smp)
    assert len(batches) == len(smp) == steps
    for t, batch in enumerate(batches):
        assert batch.shape == (bs,) and batch.dtype == torch.long
        m = smp.eligible(t)
        assert m == cu.eligible_count(cu.pacing(kind, t, 25, c0), n)
        assert rank[batch].max() < m  # never beyond the easiest ceil(c(t) n)
    assert all(smp.eligible(t) == n for t in range(25, steps))


def test_sampler_is_deterministic_and_random_access():
    scores = torch.arange(100.0)
    a = cu.CurriculumSampler(scores, 8, 50, seed=3)
    b = cu.CurriculumSampler(scores, 8, 50, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a.batch(31), list(b)[31])  # batch t does not depend on the batches before it
    assert not torch.equal(a.batch(31), cu.CurriculumSampler(scores, 8, 50, seed=4).batch(31))


def test_sampler_is_uniform_over_the_prefix():
    """Competence 1 on 10 examples: 20,000 draws land about 2,000 on each (chi-square, 9 dof)."""
    smp = cu.uniform_sampler(10, 100, 200, seed=0)
    counts = torch.bincount(torch.cat(list(smp)), minlength=10).double()
    x2 = ((counts - 2000) ** 2 / 2000).sum().item()
    assert x2 < 27.9  # the 0.999 quantile
    half = cu.CurriculumSampler(torch.arange(10.0), 100, 100, pacing=lambda t: 0.5, seed=0)
    assert torch.cat(list(half)).max() < 5  # a callable pacing: only the 5 easiest


def test_sampled_batches_index_the_data():
    x, y = torch.arange(20).view(10, 2), torch.arange(20).view(10, 2) + 100
    smp = cu.CurriculumSampler(torch.arange(10.0), 3, 4, c0=0.2, ramp_steps=3, seed=0)
    for (xb, yb), idx in zip(cu.sampled_batches(x, y, smp), smp):
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])


# --- sequence-length warm-up ----------------------------------------------------------------------------


@given(start=st.integers(1, 512), extra=st.integers(0, 4096), ramp=ramps, m=st.sampled_from([1, 8, 16, 64]),
       kind=kinds, a=st.integers(0, 8000), b=st.integers(0, 8000))
def test_seqlen_schedule_properties(start, extra, ramp, m, kind, a, b):
    end = start + extra
    la, lb = (cu.seqlen_at(t, start=start, end=end, ramp_steps=ramp, multiple=m, pacing=kind) for t in sorted((a, b)))
    assert start <= la <= lb <= end  # within range, non-decreasing
    assert cu.seqlen_at(0, start=start, end=end, ramp_steps=ramp, multiple=m, pacing=kind) == start
    assert cu.seqlen_at(ramp, start=start, end=end, ramp_steps=ramp, multiple=m, pacing=kind) == end
    for L in (la, lb):
        assert L % m == 0 or L in (start, end)


def test_seqlen_by_hand():
    sched = [cu.seqlen_at(t, start=8, end=32, ramp_steps=30) for t in range(0, 31, 5)]
    assert sched == [8, 8, 16, 16, 24, 24, 32]  # 8, 12, 16, 20, 24, 28 rounded down to multiples of 8, then 32
    assert cu.seqlen_at(7, start=8, end=32, ramp_steps=21) == 16  # exactly 16 (a float product may give 15.99...)
    assert cu.seqlen_at(999, start=8, end=1000, ramp_steps=1000, multiple=64) == 960
    assert cu.seqlen_at(1000, start=8, end=1000, ramp_steps=1000, multiple=64) == 1000


def test_truncate_and_warmup_batches():
    data = torch.arange(1000)
    x, y = cu.truncate(data[:40].view(4, 10), data[1:41].view(4, 10), 3)
    assert x.shape == (4, 3) and torch.equal(y, x + 1)
    sched = lambda t: [8, 16, 32][min(t, 2)]
    packed = cu.seqlen_warmup_batches(data, 4, 32, sched, mode="pack", seed=0)
    for L in (8, 16, 32, 32):
        xb, yb = next(packed)
        assert xb.shape == (4 * 32 // L, L) and torch.equal(yb, xb + 1)  # same tokens per step, consecutive text
    trunc = cu.seqlen_warmup_batches(data, 4, 32, sched, mode="truncate", seed=0)
    assert [next(trunc)[0].shape for _ in range(3)] == [(4, 8), (4, 16), (4, 32)]
    a = next(cu.seqlen_warmup_batches(data, 4, 32, sched, seed=5))[0]
    assert torch.equal(a, next(cu.seqlen_warmup_batches(data, 4, 32, sched, seed=5))[0])  # seeded


def test_train_and_evaluate_compares_at_tokens():
    from labkit.models import GPTConfig, TinyGPT

    data = torch.randint(7, (500,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=7, n_layer=1, n_embd=8, n_head=2, block_size=8))
    vx, vy = data[:64].view(8, 8), data[1:65].view(8, 8)
    r = cu.train_and_evaluate(model, cu.seqlen_warmup_batches(data, 2, 8, lambda t: 8, seed=0), 5,
                              eval_x=vx, eval_y=vy, eval_every=2)
    assert r["tokens"] == [0, 32, 64, 80] and len(r["val"]) == 4 and len(r["losses"]) == 5
    assert all(math.isfinite(v) for v in r["val"]) and r["seconds"] > 0


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,exc,match", [
    (lambda: cu.pacing("cosine", 1, 10), ValueError, "pacing: kind must be one of"),
    (lambda: cu.pacing("linear", -1, 10), ValueError, r"pacing: step must be in \[0, inf\), got -1.0"),
    (lambda: cu.pacing("linear", 1, 0), ValueError, "pacing: ramp_steps must be an int >= 1, got 0"),
    (lambda: cu.pacing("linear", 1, 10, c0=0.0), ValueError, r"pacing: c0 must be in \(0, 1\], got 0.0"),
    (lambda: cu.pacing("linear", 1, 10, c0=1.5), ValueError, "pacing: c0 must be in"),
    (lambda: cu.pacing("root", 1, 10, p=0), ValueError, "pacing: p must be in"),
    (lambda: cu.pacing("step", 1, 10, n_stages=0), ValueError, "pacing: n_stages must be an int >= 1"),
    (lambda: cu.pacing("linear", "1", 10), TypeError, "pacing: step must be a real number"),
    (lambda: cu.pacing_curve("linear", 0, 10), ValueError, "pacing_curve: total_steps must be an int >= 1"),
    (lambda: cu.eligible_count(1.2, 10), ValueError, "eligible_count: c must be in"),
    (lambda: cu.eligible_buckets(0.5, 0), ValueError, "eligible_buckets: n_buckets must be an int >= 1"),
    (lambda: cu.length_scores(torch.zeros(3)), ValueError, r"length_scores: examples must be a \(n, T\) tensor"),
    (lambda: cu.length_scores("abc"), TypeError, "length_scores: examples must be"),
    (lambda: cu.unigram_log_probs(torch.tensor([0, 5]), 3), ValueError, r"tokens must lie in \[0, vocab_size=3\)"),
    (lambda: cu.unigram_log_probs(torch.tensor([0.5]), 3), TypeError, "unigram_log_probs: tokens must be an integer"),
    (lambda: cu.unigram_log_probs(torch.tensor([0]), 3, alpha=0.0), ValueError, "alpha must be > 0 when"),
    (lambda: cu.rarity_scores([[0]], torch.zeros(2, 2)), ValueError, r"rarity_scores: log_probs must be a \(V,\)"),
    (lambda: cu.rarity_scores([[-100]], torch.zeros(2)), ValueError, "every example needs at least one token"),
    (lambda: cu.rarity_scores([[3]], torch.zeros(2)), ValueError, r"rarity_scores: tokens must lie in \[0, 2\)"),
    (lambda: cu.BigramLM(torch.zeros(2, 3)), ValueError, r"BigramLM: log_probs must be a \(V, V\)"),
    (lambda: cu.BigramLM.fit(torch.tensor([0, 4]), 3), ValueError, "BigramLM.fit: tokens must lie in"),
    (lambda: cu.BigramLM.fit(torch.tensor([0, 1]), 3, alpha=0), ValueError, r"BigramLM.fit: alpha must be in \(0"),
    (lambda: cu.model_loss_scores(cu.BigramLM(torch.zeros(2, 2)), torch.zeros(2, 3, dtype=torch.long),
                                  torch.zeros(2, 4, dtype=torch.long)), ValueError, "x and y must be"),
    (lambda: cu.difficulty_buckets([], 3), ValueError, "difficulty_buckets: scores must not be empty"),
    (lambda: cu.CurriculumSampler([], 2, 10), ValueError, "CurriculumSampler: scores must be a non-empty"),
    (lambda: cu.CurriculumSampler([1.0, float("nan")], 2, 10), ValueError, "finite numbers"),
    (lambda: cu.CurriculumSampler([1.0], 0, 10), ValueError, "CurriculumSampler: batch_size must be an int >= 1"),
    (lambda: cu.CurriculumSampler([1.0], 1, 0), ValueError, "CurriculumSampler: total_steps must be an int >= 1"),
    (lambda: cu.CurriculumSampler([1.0], 1, 5, ramp_steps=0), ValueError, "CurriculumSampler: ramp_steps must be"),
    (lambda: cu.CurriculumSampler([1.0], 1, 5, pacing="cosine"), ValueError, "CurriculumSampler: pacing must be"),
    (lambda: cu.CurriculumSampler([1.0], 1, 5, c0=0), ValueError, "pacing: c0 must be in"),
    (lambda: cu.CurriculumSampler([1.0], 1, 5, seed=0.5), TypeError, "CurriculumSampler: seed must be an int"),
    (lambda: cu.CurriculumSampler([1.0], 1, 5, pacing=lambda t: 2.0).batch(0), ValueError,
     r"the pacing function must return a value in \[0, 1\], got 2.0"),
    (lambda: cu.CurriculumSampler([1.0], 1, 5).batch(-1), ValueError, "CurriculumSampler: step must be an int >= 0"),
    (lambda: cu.seqlen_at(0, start=0, end=8, ramp_steps=4), ValueError, "seqlen_at: start must be an int >= 1"),
    (lambda: cu.seqlen_at(0, start=16, end=8, ramp_steps=4), ValueError, "seqlen_at: start must be <= end=8"),
    (lambda: cu.seqlen_at(0, start=8, end=16, ramp_steps=4, multiple=0), ValueError, "seqlen_at: multiple must be"),
    (lambda: cu.truncate(torch.zeros(2, 4), torch.zeros(2, 4), 5), ValueError, "truncate: seq_len must be <= T=4"),
    (lambda: cu.truncate(torch.zeros(2, 4), torch.zeros(2, 3), 2), ValueError, "truncate: x and y must be"),
    (lambda: next(cu.seqlen_warmup_batches(torch.arange(100), 2, 8, lambda t: 8, mode="pad")), ValueError,
     "seqlen_warmup_batches: mode must be one of"),
    (lambda: next(cu.seqlen_warmup_batches(torch.arange(100), 2, 8, lambda t: 9)), ValueError,
     r"schedule\(0\) must be an int in \[1, block_size=8\], got 9"),
    (lambda: next(cu.seqlen_warmup_batches(torch.arange(8), 2, 8, lambda t: 8)), ValueError,
     "data must be longer than block_size=8"),
    (lambda: next(cu.seqlen_warmup_batches(torch.arange(100), 2, 8, 8)), TypeError, "schedule must be callable"),
    (lambda: cu.train_and_evaluate(torch.nn.Linear(1, 1), iter([]), 0, eval_x=None, eval_y=None, eval_every=1),
     ValueError, "train_and_evaluate: steps must be an int >= 1"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- exercises ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data-order.pacing", "data-order.seqlen_at"])
def test_reference_passes_its_own_check(name):
    assert labkit.check(name, lookup(name).reference, quiet=True)


def student_pacing(kind, step, ramp_steps, c0, p, n_stages):
    r = min(1.0, step / ramp_steps)
    if r >= 1:
        return 1.0
    if kind == "linear":
        return c0 + (1 - c0) * r
    if kind == "root":
        return (c0**p + (1 - c0**p) * r) ** (1 / p)
    if kind == "step":
        return c0 + (1 - c0) * math.floor(n_stages * r) / n_stages
    return c0 ** (1 - r)


def student_seqlen(step, start, end, ramp_steps, multiple):
    if step >= ramp_steps:
        return end
    length = start + (end - start) * step / ramp_steps
    return max(start, min(end, int(length) // multiple * multiple))


def test_plain_answers_pass():
    assert labkit.check("data-order.pacing", student_pacing, quiet=True)
    assert labkit.check("data-order.seqlen_at", student_seqlen, quiet=True)


@pytest.mark.parametrize("name,fn", [
    # forgets to clamp after the ramp (linear keeps growing past 1)
    ("data-order.pacing", lambda kind, step, ramp_steps, c0, p, n_stages:
     c0 + (1 - c0) * step / ramp_steps if kind == "linear"
     else student_pacing(kind, step, ramp_steps, c0, p, n_stages)),
    # root without the c0**p offset (starts at 0, then clipped up to c0)
    ("data-order.pacing", lambda kind, step, ramp_steps, c0, p, n_stages:
     max(c0, min(1.0, (step / ramp_steps) ** (1 / p))) if kind == "root"
     else student_pacing(kind, step, ramp_steps, c0, p, n_stages)),
    # exponential the wrong way round: c0 ** r falls from 1 to c0
    ("data-order.pacing", lambda kind, step, ramp_steps, c0, p, n_stages:
     c0 ** min(1.0, step / ramp_steps) if kind == "exponential"
     else student_pacing(kind, step, ramp_steps, c0, p, n_stages)),
    # rounds to the nearest multiple instead of down
    ("data-order.seqlen_at", lambda step, start, end, ramp_steps, multiple:
     end if step >= ramp_steps else max(start, min(end, round((start + (end - start) * step / ramp_steps) / multiple)
                                                    * multiple))),
    # forgets that the schedule must end exactly at `end`
    ("data-order.seqlen_at", lambda step, start, end, ramp_steps, multiple:
     max(start, int(start + (end - start) * min(1, step / ramp_steps)) // multiple * multiple)),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


# --- figures and benchmarks ----------------------------------------------------------------------------------


def test_pacing_figure_reads_off_the_marked_step():
    from labkit.viz.data_order import pacing_figure

    fig = pacing_figure("linear", c0=0.1, ramp=0.5, at=0.25, total_steps=400, n_buckets=10)
    c = cu.pacing("linear", 100, 200, 0.1)  # 0.55
    assert f"step 100: c = {c:.2f}" in fig.layout.title.text and "buckets 0–4 in full" in fig.layout.title.text
    assert len(fig.data) == len(cu.PACINGS) + 1  # four curves and the bucket heatmap
    heat = torch.tensor(fig.data[-1].z)
    assert heat.shape == (10, 400) and heat[:, 200:].eq(1).all() and heat[-1, 0] == 0


def test_seqlen_and_val_figures():
    from labkit.viz.data_order import seqlen_figure, val_vs_tokens_figure

    assert len(seqlen_figure({"a": [8, 16, 32]}).data) == 1
    fig = val_vs_tokens_figure({"u": {"tokens": [0, 10, 20], "val": [4.0, 3.0, 2.5]},
                                "c": {"tokens": [0, 10, 20], "val": [4.0, 3.2, 2.6]}})
    assert [list(t.x) for t in fig.data] == [[0, 10, 20]] * 2
    with pytest.raises(TypeError, match="seqlen_figure: schedules must be a non-empty dict"):
        seqlen_figure({})


def test_benchmark_curriculum_rows():
    from labkit.benchmarks import data_order as bench_mod

    cfg = dict(bench_mod.config(quick=True), steps=4, pool=64, n_val=8,
               model=dict(n_layer=1, n_embd=8, n_head=2, block_size=16))
    rows = bench_mod.curriculum_at_budget(cfg, torch.device("cpu"))
    names = [r["name"] for r in rows]
    assert names == ["uniform windows", "curriculum (bigram loss, root)", "full-length stream", "seq-length warm-up"]
    by = {r["name"]: r for r in rows}
    assert by["uniform windows"]["ratio"] == 1.0 and by["full-length stream"]["ratio"] == 1.0
    assert by["curriculum (bigram loss, root)"]["baseline"] == "uniform windows"
    assert by["seq-length warm-up"]["baseline_val_loss"] == by["full-length stream"]["val_loss"]
    assert all(r["tokens"] > 0 and math.isfinite(r["val_loss"]) and r["median_ms"] > 0 for r in rows)
