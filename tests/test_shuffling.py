"""Tests of labkit.train.shuffling (chapter 09-data-order), its exercises, figures and benchmarks."""

from __future__ import annotations

import collections
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.datasets import get_tokenizer
from labkit.exercises import exercises_for, lookup
from labkit.train import shuffling as sh

sizes = st.integers(min_value=0, max_value=300)
seeds = st.integers(min_value=0, max_value=2**40)


def positions(out: list[int]) -> dict[int, int]:
    return {item: pos for pos, item in enumerate(out)}


# --- orders: permutation properties ------------------------------------------------------------


@given(n=sizes, seed=seeds)
def test_full_shuffle_is_a_permutation_and_deterministic(n, seed):
    out = list(sh.full_shuffle(n, seed=seed))
    assert sorted(out) == list(range(n))
    assert out == list(sh.full_shuffle(n, seed=seed))


@given(n=sizes, k=st.integers(1, 400), seed=seeds)
def test_buffer_shuffle_is_a_permutation_with_bounded_forward_moves(n, k, seed):
    out = list(sh.buffer_shuffle(n, k, seed=seed))
    assert sorted(out) == list(range(n))
    assert out == list(sh.buffer_shuffle(n, k, seed=seed))  # deterministic
    pos = positions(out)
    assert all(pos[i] >= i - (k - 1) for i in range(n))  # an item cannot leave before it entered the buffer


@given(n=sizes, seed=seeds)
def test_buffer_of_one_is_the_identity(n, seed):
    assert list(sh.buffer_shuffle(n, 1, seed=seed)) == list(range(n))
    items = [random.Random(seed).randint(0, 9) for _ in range(n)]  # any stream, repeats included
    assert list(sh.buffer_shuffle(items, 1, seed=seed)) == items


@given(items=st.lists(st.integers(0, 50), max_size=200), k=st.integers(1, 60), seed=seeds)
def test_buffer_shuffle_matches_a_plain_reference(items, k, seed):
    """tf.data's algorithm written out plainly (no tf.data / WebDataset in the environment to compare with)."""
    assert list(sh.buffer_shuffle(iter(items), k, seed=seed)) == student_buffer(items, k, seed)


def test_buffer_at_least_n_is_a_uniform_permutation():
    """k >= n: all 4! orders of 4 items equally likely (chi-square over 4800 seeds, 23 dof)."""
    n, runs = 4, 4800
    for k in (4, 9):
        counts = collections.Counter(tuple(sh.buffer_shuffle(n, k, seed=s)) for s in range(runs))
        assert set(counts) == set(itertools.permutations(range(n)))
        expected = runs / 24
        x2 = sum((c - expected) ** 2 / expected for c in counts.values())
        assert x2 < 49.7  # the 0.999 quantile of chi-square with 23 degrees of freedom


def test_small_buffer_is_far_from_uniform():
    """k = 2 < n: item 0 can only be emitted at position 0 or later, and the last item never first."""
    firsts = collections.Counter(next(iter(sh.buffer_shuffle(6, 2, seed=s))) for s in range(500))
    assert set(firsts) <= {0, 1}  # the first output is one of the first k items
    assert min(firsts.values()) > 150  # each about half of the time


def test_buffer_displacement_is_geometric():
    """Steady state: mean displacement ~0, mean |displacement| ~ 2k/e, never earlier than -(k-1)."""
    n, k = 30_000, 32
    out = sh.epoch_order("buffer", n, buffer_size=k, seed=0)
    pos = torch.empty(n, dtype=torch.long)
    pos[out] = torch.arange(n)
    disp = (pos - torch.arange(n))[k:n - 4 * k].double()
    assert abs(disp.mean().item()) < 0.05 * k
    assert disp.abs().mean().item() / k == pytest.approx(2 / math.e, abs=0.04)
    assert disp.min().item() == -(k - 1)


def test_buffer_shuffle_reads_a_stream_lazily():
    """It consumes at most k + 1 items before emitting the first one (works on endless streams)."""
    read = []

    def stream():
        for i in itertools.count():
            read.append(i)
            yield i

    first = next(iter(sh.buffer_shuffle(stream(), 8, seed=0)))
    assert first < 9 and len(read) == 9


@given(n=sizes, size=st.integers(1, 50), seed=seeds, within=st.sampled_from(sh.WITHIN),
       buffer=st.one_of(st.none(), st.integers(1, 64)))
def test_shard_shuffle_is_a_permutation_and_deterministic(n, size, seed, within, buffer):
    out = list(sh.shard_shuffle(n, size, seed=seed, within=within, buffer_size=buffer))
    assert sorted(out) == list(range(n))
    assert out == list(sh.shard_shuffle(n, size, seed=seed, within=within, buffer_size=buffer))


@given(n=st.integers(1, 300), size=st.integers(1, 50), seed=seeds)
def test_shard_shuffle_keeps_each_shard_contiguous(n, size, seed):
    out = list(sh.shard_shuffle(n, size, seed=seed))
    shards = [i // size for i in out]
    runs = [s for s, _ in itertools.groupby(shards)]
    assert len(runs) == len(set(runs)) == -(-n // size)  # every shard read once, in one piece
    plain = list(sh.shard_shuffle(n, size, seed=seed, within="none"))
    for s, group in itertools.groupby(plain, key=lambda i: i // size):
        assert list(group) == list(range(s * size, min(n, (s + 1) * size)))  # in storage order inside


@given(n=st.integers(0, 200), seed=seeds, strategy=st.sampled_from(sh.STRATEGIES))
def test_epoch_order_matches_the_iterators(n, seed, strategy):
    kw = dict(buffer_size=7) if strategy == "buffer" else dict(shard_size=5) if strategy == "shard" else {}
    got = sh.epoch_order(strategy, n, seed=seed, **kw)
    assert got.dtype == torch.long and got.shape == (n,)
    expected = {"none": lambda: sh.sequential(n), "full": lambda: sh.full_shuffle(n, seed=seed),
                "buffer": lambda: sh.buffer_shuffle(n, 7, seed=seed),
                "shard": lambda: sh.shard_shuffle(n, 5, seed=seed)}[strategy]()
    assert got.tolist() == list(expected)


def test_epochs_reseed_every_pass():
    out = list(sh.epochs("full", 10, 3, seed=5))
    a, b, c = out[:10], out[10:20], out[20:]
    assert sorted(a) == sorted(b) == sorted(c) == list(range(10))
    assert a == sh.epoch_order("full", 10, seed=5).tolist() and b == sh.epoch_order("full", 10, seed=6).tolist()
    assert a != b


def test_seeds_change_the_order():
    assert list(sh.full_shuffle(50, seed=0)) != list(sh.full_shuffle(50, seed=1))
    assert list(sh.buffer_shuffle(50, 10, seed=0)) != list(sh.buffer_shuffle(50, 10, seed=1))
    assert list(sh.shard_shuffle(50, 5, seed=0)) != list(sh.shard_shuffle(50, 5, seed=1))


# --- batch correlation -------------------------------------------------------------------------


def plain_chi_square(counts: list[int], p: list[float]) -> float:
    b = sum(counts)
    return sum((c - b * q) ** 2 / (b * q) for c, q in zip(counts, p) if q > 0)


def test_sorted_data_is_maximally_concentrated():
    K, per, B = 4, 32, 8
    labels = torch.arange(K).repeat_interleave(per)
    m = sh.batch_correlation(labels, torch.arange(K * per), B)
    assert m["majority_share"] == 1.0 and m["entropy_ratio"] == 0.0
    assert m["kl"] == pytest.approx(math.log(K))  # D(one-hot || uniform) = log K
    assert m["chi2"] == pytest.approx(B * (K - 1)) and m["chi2_ratio"] == pytest.approx(B)
    assert m["baseline_share"] == 1 / K and m["n_batches"] == K * per // B and m["n_classes"] == K


def test_perfectly_mixed_batches_sit_at_the_baseline():
    K, per, B = 4, 32, 8
    labels = torch.arange(K).repeat_interleave(per)
    mixed = torch.arange(K * per).view(K, per).t().flatten()  # round robin: each batch has 2 of each source
    m = sh.batch_correlation(labels, mixed, B)
    assert m["majority_share"] == pytest.approx(1 / K)
    assert m["entropy_ratio"] == pytest.approx(1.0)
    assert m["kl"] == pytest.approx(0.0, abs=1e-12) and m["chi2"] == pytest.approx(0.0, abs=1e-12)


def test_full_shuffle_chi_square_is_about_k_minus_one():
    K, per, B = 5, 2000, 32
    labels = torch.arange(K).repeat_interleave(per)
    m = sh.batch_correlation(labels, sh.epoch_order("full", K * per, seed=0), B)
    # without replacement E[X^2] = (K - 1)(n - B)/(n - 1); the mean over 312 batches is within a few %
    assert m["chi2_ratio"] == pytest.approx((K * per - B) / (K * per - 1), rel=0.1)


@given(data=st.data())
def test_measures_match_plain_formulas(data):
    K = data.draw(st.integers(2, 5))
    B = data.draw(st.integers(1, 12))
    nb = data.draw(st.integers(1, 6))
    labels = torch.tensor(data.draw(st.lists(st.integers(0, K - 1), min_size=B * nb, max_size=B * nb + 5)))
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(data.draw(seeds)))
    counts = sh.batch_counts(labels, order, B, num_classes=K)
    assert counts.shape == (labels.numel() // B, K) and (counts.sum(1) == B).all()
    p = (torch.bincount(labels, minlength=K).double() / labels.numel())
    q = counts.double() / B
    torch.testing.assert_close(sh.majority_share(counts), q.max(1).values)
    # entropy and KL against torch.distributions / F.kl_div
    torch.testing.assert_close(sh.batch_entropy(counts), torch.distributions.Categorical(probs=q).entropy())
    if (p > 0).all():
        kl = F.kl_div(p.log().expand_as(q), q, reduction="none").sum(1)  # sum q (log q - log p)
        torch.testing.assert_close(sh.kl_to_dataset(counts, p), kl)
    for row, x2 in zip(counts.tolist(), sh.chi_square(counts, p).tolist()):
        assert x2 == pytest.approx(plain_chi_square(row, p.tolist()))


def test_kl_is_infinite_for_a_label_absent_from_the_reference():
    counts = torch.tensor([[2, 2]])
    assert sh.kl_to_dataset(counts, [1.0, 0.0]).item() == math.inf


def test_variance_ratio_extremes():
    v = torch.arange(64, dtype=torch.float64)  # total sum of squares 64 (64^2 - 1) / 12 = 21840
    # sorted: batch means 3.5 + 8j, between = 8 sum_j (8j - 28)^2 = 21504
    assert sh.variance_ratio(v, torch.arange(64), 8) == pytest.approx(21504 / 21840)
    mixed = torch.arange(64).view(8, 8).t().flatten()  # batch j = {j, j + 8, ..., j + 56}: means j + 28
    assert sh.variance_ratio(v, mixed, 8) == pytest.approx(8 * 42 / 21840)
    assert sh.variance_ratio(torch.ones(16), torch.arange(16), 4) == 0.0  # no variance at all
    shuffled = sh.variance_ratio(torch.randn(20_000, generator=torch.Generator().manual_seed(0)),
                                 sh.epoch_order("full", 20_000, seed=1), 16)
    assert shuffled == pytest.approx(1 / 16, rel=0.15)


def test_mean_item_age():
    assert sh.mean_item_age(torch.arange(10)) == 0.0
    assert sh.mean_item_age(torch.arange(10).flip(0)) == pytest.approx(5.0)
    assert sh.mean_item_age([]) == 0.0


def test_step_jitter():
    assert sh.step_jitter([1.0, 2.0, 1.0, 2.0]) == pytest.approx(1.0)
    assert sh.step_jitter([1.0, 2.0, 1.0, 2.0], start=2) == pytest.approx(1.0)
    assert sh.step_jitter([5.0] * 10) == 0.0


# --- the demo corpus and training over an order --------------------------------------------------


def test_letter_permutations_are_bijections_that_keep_case():
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!\n"))
    tables = sh.letter_permutations(3, chars, seed=0)
    assert tables.shape == (3, len(chars))
    for row in tables:
        assert sorted(row.tolist()) == list(range(len(chars)))
        for i, c in enumerate(chars):
            mapped = chars[row[i]]
            if c.isalpha():
                assert mapped.isalpha() and mapped.islower() == c.islower()
                assert mapped.lower() == chars[row[chars.index(c.lower())]].lower()  # one permutation per case
            else:
                assert mapped == c
    assert not torch.equal(tables[0], tables[1])


def test_clustered_corpus_is_stored_by_source():
    c = sh.clustered_corpus(3, 20, 16, val_per_source=4, seed=0)
    assert len(c) == 60 and c.x.shape == c.y.shape == (60, 16) and c.val_x.shape == (12, 16)
    assert c.source.tolist() == [0] * 20 + [1] * 20 + [2] * 20
    assert torch.equal(c.x[:, 1:], c.y[:, :-1])  # y is x shifted by one
    assert c.x.max() < c.vocab_size and c.n_sources == 3
    plain = sh.clustered_corpus(3, 20, 16, val_per_source=4, cipher=False)
    assert not torch.equal(c.x, plain.x) and c.x.shape == plain.x.shape
    # the same text underneath: the cipher only relabels letters, so non-letters stay in place
    tok_chars = get_tokenizer("char").chars
    letters = torch.tensor([ch.isalpha() for ch in tok_chars])
    assert torch.equal(letters[c.x], letters[plain.x])
    overlapping = sh.clustered_corpus(2, 10, 8, val_per_source=2, stride=4)
    assert torch.equal(overlapping.x[1, :4], overlapping.x[0, 4:8])  # windows every 4 tokens


def test_train_in_order_runs_and_reports():
    from labkit.models import GPTConfig, TinyGPT

    c = sh.clustered_corpus(2, 16, 8, val_per_source=4)
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=c.vocab_size, n_layer=1, n_embd=16, n_head=2, block_size=8))
    r = sh.train_in_order(model, c, sh.epoch_order("none", len(c)), 4)
    assert len(r["losses"]) == 8 and r["batch_source"] == [0] * 4 + [1] * 4
    assert len(r["val_per_source"]) == 2 and r["val_loss"] == pytest.approx(sum(r["val_per_source"]) / 2)
    assert all(math.isfinite(v) for v in r["losses"])
    got = sh.loss_per_source(model, c.val_x, c.val_y, c.val_source)
    with torch.no_grad():
        direct = torch.stack([model(c.val_x[c.val_source == s], c.val_y[c.val_source == s])[1] for s in range(2)])
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,exc,match", [
    (lambda: list(sh.full_shuffle(-1)), ValueError, "full_shuffle: n must be an int >= 0, got -1"),
    (lambda: list(sh.full_shuffle(4, seed=1.5)), TypeError, "full_shuffle: seed must be an int"),
    (lambda: list(sh.sequential(2.0)), TypeError, "sequential: n must be an int"),
    (lambda: list(sh.buffer_shuffle(5, 0)), ValueError, "buffer_shuffle: buffer_size must be an int >= 1, got 0"),
    (lambda: list(sh.buffer_shuffle("abc", 2)), TypeError, "buffer_shuffle: source must be an int or an iterable"),
    (lambda: list(sh.buffer_shuffle(5, 2, seed="x")), TypeError, "buffer_shuffle: seed must be an int"),
    (lambda: list(sh.shard_shuffle(5, 0)), ValueError, "shard_shuffle: shard_size must be an int >= 1, got 0"),
    (lambda: list(sh.shard_shuffle(5, 2, within="sort")), ValueError, "shard_shuffle: within must be one of"),
    (lambda: list(sh.shard_shuffle(5, 2, buffer_size=0)), ValueError, "shard_shuffle: buffer_size must be"),
    (lambda: sh.epoch_order("random", 5), ValueError, "epoch_order: strategy must be one of"),
    (lambda: sh.epoch_order("buffer", 5), ValueError, "epoch_order: strategy 'buffer' needs buffer_size"),
    (lambda: sh.epoch_order("shard", 5), ValueError, "epoch_order: strategy 'shard' needs shard_size"),
    (lambda: list(sh.epochs("full", 5, -1)), ValueError, "epochs: n_epochs must be an int >= 0"),
    (lambda: sh.batch_counts([0, 1], [0, 1], 0), ValueError, "batch_counts: batch_size must be an int >= 1"),
    (lambda: sh.batch_counts([0, 1], [0, 1], 3), ValueError, "at least one full batch of batch_size=3, got 2"),
    (lambda: sh.batch_counts([0, -1], [0, 1], 1), ValueError, "batch_counts: labels must be >= 0"),
    (lambda: sh.batch_counts([0, 1], [0, 2], 1), ValueError, "batch_counts: order must index into labels"),
    (lambda: sh.batch_counts([0, 3], [0, 1], 1, num_classes=2), ValueError, "num_classes must be >= max"),
    (lambda: sh.batch_counts(torch.zeros(2), [0, 1], 1), ValueError, "labels must be a 1-D integer tensor"),
    (lambda: sh.batch_counts("ab", [0, 1], 1), TypeError, "labels must be a 1-D integer tensor or an iterable"),
    (lambda: sh.batch_counts([0, 1.5], [0, 1], 1), TypeError, "labels must hold ints only"),
    (lambda: sh.majority_share(torch.ones(3)), ValueError, r"majority_share: counts must be a \(n_batches, K\)"),
    (lambda: sh.batch_entropy(torch.zeros(2, 2)), ValueError, "at least one item per batch"),
    (lambda: sh.chi_square(torch.ones(1, 2), [0.5, 0.6]), ValueError, "chi_square: p must be 2 proportions"),
    (lambda: sh.kl_to_dataset(torch.ones(1, 2), [1.0]), ValueError, "kl_to_dataset: p must be 2 proportions"),
    (lambda: sh.variance_ratio([1.0, 2.0], [0, 1], 4), ValueError, "variance_ratio: order must hold at least one"),
    (lambda: sh.variance_ratio([1.0, 2.0], [0, 5], 1), ValueError, "variance_ratio: order must index into values"),
    (lambda: sh.step_jitter([1.0]), ValueError, "step_jitter: need at least 2 losses"),
    (lambda: sh.letter_permutations(0, "abc"), ValueError, "letter_permutations: n_sources must be an int >= 1"),
    (lambda: sh.letter_permutations(1, "abc"), ValueError, "letter_permutations: chars must contain all of"),
    (lambda: sh.clustered_corpus(2, 10**6, 32), ValueError, "clustered_corpus: per_source=1000000 windows"),
    (lambda: sh.clustered_corpus(2, 10, 8, cipher=1), TypeError, "clustered_corpus: cipher must be a bool"),
    (lambda: sh.clustered_corpus(2, 10, 8, stride=0), ValueError, "clustered_corpus: stride must be an int >= 1"),
    (lambda: sh.train_in_order(torch.nn.Linear(1, 1), sh.clustered_corpus(1, 2, 4, val_per_source=1), [0, 1], 4),
     ValueError, "train_in_order: order must hold at least one batch of 4"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- exercises --------------------------------------------------------------------------------------

NAMES = ["data-order.batch_concentration", "data-order.buffer_shuffle", "data-order.pacing", "data-order.seqlen_at"]


def test_exercises_registered():
    assert exercises_for("09-data-order") == NAMES


@pytest.mark.parametrize("name", ["data-order.buffer_shuffle", "data-order.batch_concentration"])
def test_reference_passes_its_own_check(name):
    assert labkit.check(name, lookup(name).reference, quiet=True)


def student_buffer(items, buffer_size, seed):
    rng = random.Random(seed)
    buf, out = [], []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = rng.randrange(buffer_size)
        out.append(buf[j])
        buf[j] = item
    rng.shuffle(buf)
    return out + buf


def student_concentration(labels, order, batch_size):
    n = len(labels)
    h = -sum(c / n * math.log(c / n) for c in collections.Counter(labels).values())
    nb = len(order) // batch_size
    shares, ratios = [], []
    for b in range(nb):
        q = [c / batch_size for c in collections.Counter(labels[i] for i in order[b * batch_size:(b + 1) * batch_size]
                                                         ).values()]
        shares.append(max(q))
        ratios.append(-sum(x * math.log(x) for x in q) / h)
    return sum(shares) / nb, sum(ratios) / nb


def test_plain_python_answers_pass():
    assert labkit.check("data-order.buffer_shuffle", student_buffer, quiet=True)
    assert labkit.check("data-order.batch_concentration", student_concentration, quiet=True)


def wrong_drain_in_order(items, buffer_size, seed):  # forgets to shuffle what is left at the end
    rng = random.Random(seed)
    buf, out = [], []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = rng.randrange(buffer_size)
        out.append(buf[j])
        buf[j] = item
    return out + buf


def wrong_emit_new_item_too(items, buffer_size, seed):  # draws from buffer + the new item (k + 1 slots)
    rng = random.Random(seed)
    buf, out = [], []
    for item in items:
        buf.append(item)
        if len(buf) > buffer_size:
            out.append(buf.pop(rng.randrange(len(buf))))
    rng.shuffle(buf)
    return out + buf


def wrong_entropy_over_present_labels(labels, order, batch_size):  # normalises by log K instead of H(p)
    share, ratio = student_concentration(labels, order, batch_size)
    n, k = len(labels), len(set(labels))
    h = -sum(c / n * math.log(c / n) for c in collections.Counter(labels).values())
    return share, ratio * h / math.log(k)


def wrong_keeps_partial_batch(labels, order, batch_size):
    whole = len(order) // batch_size * batch_size
    if whole == len(order):
        return student_concentration(labels, order, batch_size)
    extra = order[whole:] + order[:batch_size - (len(order) - whole)]  # pads the last batch
    return student_concentration(labels, order[:whole] + extra, batch_size)


@pytest.mark.parametrize("name,fn", [
    ("data-order.buffer_shuffle", lambda items, buffer_size, seed: list(items)),
    ("data-order.buffer_shuffle", wrong_drain_in_order),
    ("data-order.buffer_shuffle", wrong_emit_new_item_too),
    ("data-order.batch_concentration", wrong_entropy_over_present_labels),
    ("data-order.batch_concentration", wrong_keeps_partial_batch),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_not_attempted_does_not_raise():
    def todo(**_):
        raise NotImplementedError("write me")

    assert labkit.check("data-order.buffer_shuffle", todo, quiet=True).status == "not attempted"


# --- figures and benchmarks ---------------------------------------------------------------------------


def test_order_figure_reports_the_measures():
    from labkit.viz.data_order import order_figure

    source = torch.arange(4).repeat_interleave(64)
    for strategy in sh.STRATEGIES:
        fig = order_figure(strategy, 16, 32, 8, source=source)
        kw = {"buffer": dict(buffer_size=16), "shard": dict(shard_size=32)}.get(strategy, {})
        m = sh.batch_correlation(source, sh.epoch_order(strategy, 256, seed=0, **kw), 8)
        assert f"majority share {m['majority_share']:.2f}" in fig.layout.title.text
        assert sum(len(t.x) for t in fig.data[:4]) == 256  # every position drawn once


def test_loss_and_source_figures():
    from labkit.viz.data_order import loss_traces_figure, per_source_figure

    fig = loss_traces_figure({"a": {"losses": [3.0, 4.0, 3.0], "spikes": [1]}, "b": {"losses": [3.0, 2.9, 2.8]}},
                             boundaries=[1])
    assert len(fig.data) == 3 and "1 spikes" in fig.data[0].name and list(fig.data[1].x) == [1]
    bars = per_source_figure({"a": [1.0, 2.0], "b": [1.5, 1.5]})
    assert len(bars.data) == 2 and list(bars.data[0].x) == ["source 0", "source 1"]
    with pytest.raises(TypeError, match="loss_traces_figure: runs must be a non-empty dict"):
        loss_traces_figure({})


def test_benchmark_throughput_rows():
    from labkit.benchmarks import data_order as bench_mod

    rows = bench_mod.shuffle_throughput(2048, buffers=(16, 256), shard=128, repeats=1)
    assert [r["name"] for r in rows] == ["storage order", "full shuffle", "buffer 16", "buffer 256", "shards of 128",
                                         "shards of 128 + buffer 16"]
    assert all(r["median_ms"] > 0 and r["indices_per_s"] > 0 and r["baseline"] == "storage order" for r in rows)
    assert rows[0]["ratio"] == 1.0 and "M indices/s" in bench_mod.speedup_summary(rows)
    assert bench_mod.config(quick=True)["n"] < bench_mod.config()["n"]
    with pytest.raises(TypeError, match="config: quick must be a bool"):
        bench_mod.config("yes")
