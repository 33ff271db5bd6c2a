"""Chapter 07-clipping-spikes, part 1: labkit.train.clipping (parity with torch.nn.utils.clip_grad_norm_,
local clipping), the chapter's exercises, figures and benchmark."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit.exercises import exercises_for, lookup
from labkit.train import clipping as cl

NORMS = [1.0, 2.0, math.inf]


def make_params(shapes=((5, 3), (4,), (0, 3), (2, 3, 2)), dtype=torch.float32, seed=0, scale=3.0, none_at=(1,)):
    """Parameters with gradients (None at the indices in none_at); the same twice, for ours and torch's."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        p = torch.randn(s, generator=gen, dtype=dtype).requires_grad_()
        p.grad = None if i in none_at else (torch.randn(s, generator=gen, dtype=dtype) * scale)
        out.append(p)
    return out


def twin(params):
    copies = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = None if p.grad is None else p.grad.clone()
        copies.append(q)
    return copies


def same_grads(a, b):
    for p, q in zip(a, b):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad) or torch.allclose(p.grad, q.grad, equal_nan=True, rtol=0, atol=0)


# --- global mode: parity with torch -------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clips / does not clip
def test_global_matches_torch_with_none_grads_and_empty_tensor(norm_type, foreach, max_norm):
    # the inf-norm of a zero-size tensor has no identity: torch raises, and so do we (test below)
    ours = make_params() if norm_type != math.inf else make_params(shapes=((5, 3), (4,), (2, 3, 2)))
    ref = twin(ours)
    got = cl.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type, foreach=foreach)
    assert got.shape == () and torch.equal(got, want)
    same_grads(ours, ref)


@pytest.mark.parametrize("foreach", [None, False])
def test_inf_norm_of_a_zero_size_gradient_raises_like_torch(foreach):
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(make_params(), 1.0, math.inf, foreach=foreach)
    with pytest.raises(RuntimeError):
        cl.clip_grad_norm_(make_params(), 1.0, math.inf, foreach=foreach)


def test_single_tensor_empty_list_and_generator():
    p = make_params(shapes=((3, 4),), none_at=())[0]
    q = twin([p])[0]
    assert torch.equal(cl.clip_grad_norm_(p, 1.0), torch.nn.utils.clip_grad_norm_(q, 1.0))
    assert torch.equal(p.grad, q.grad)
    assert torch.equal(cl.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))   # tensor(0.)
    assert cl.clip_grad_norm_([], 1.0, mode="local").shape == (0,)
    only_none = make_params(shapes=((2,),), none_at=(0,))
    assert cl.clip_grad_norm_(only_none, 1.0).item() == 0.0 and only_none[0].grad is None
    with pytest.warns(UserWarning, match="empty generator"):
        cl.clip_grad_norm_((p for p in []), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cl.clip_grad_norm_((q for q in [p]), 1.0)  # a non-empty generator is consumed once, silently


def test_mixed_dtypes_match_torch():
    gen = torch.Generator().manual_seed(0)
    ours = []
    kinds = [((5, 3), torch.float32), ((4,), torch.float64), ((6,), torch.bfloat16), ((2, 2), torch.float32)]
    for shape, dtype in kinds:
        p = torch.zeros(shape, dtype=dtype, requires_grad=True)
        p.grad = (torch.randn(shape, generator=gen) * 3).to(dtype)
        ours.append(p)
    ref = twin(ours)
    got = cl.clip_grad_norm_(ours, 0.3)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for p, q in zip(ours, ref):
        assert p.grad.dtype == q.grad.dtype
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("foreach", [None, False])
def test_nonfinite_handled_as_torch(bad, foreach):
    ours = make_params(none_at=())
    ours[0].grad[1, 2] = bad
    ref = twin(ours)
    got = cl.clip_grad_norm_(ours, 1.0, foreach=foreach)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=foreach)
    assert torch.equal(got.isnan(), want.isnan()) and (got.isnan() or got == want)
    for p, q in zip(ours, ref):  # inf * 0 = nan, finite * 0 = 0 (inf) or everything nan (nan): as torch
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
    # error_if_nonfinite: both raise, and nothing is modified
    ours = make_params(none_at=())
    ours[0].grad[0, 0] = bad
    before = [p.grad.clone() for p in ours]
    with pytest.raises(RuntimeError, match="non-finite"):
        cl.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(twin(ours), 1.0, error_if_nonfinite=True)
    for p, b in zip(ours, before):
        torch.testing.assert_close(p.grad, b, equal_nan=True)


def test_nonfinite_local_raises_and_names_the_tensor():
    ps = make_params(none_at=(1,))
    ps[2].grad = None
    ps[2].data = torch.zeros(1, 3)
    ps[2].grad = torch.tensor([[1.0, math.inf, 0.0]])
    with pytest.raises(RuntimeError, match="parameter 1 of those with a gradient"):
        cl.clip_grad_norm_(ps, 1.0, mode="local", error_if_nonfinite=True)
    norms = cl.clip_grad_norm_(ps, 1.0, mode="local")            # without the flag: only that tensor is hit
    assert math.isinf(norms[1]) and torch.isfinite(ps[0].grad).all()
    assert torch.isnan(ps[2].grad[0, 1]) and (ps[2].grad[0, [0, 2]] == 0).all()


@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=5),
       norm_type=st.sampled_from([1.0, 1.5, 2.0, 3.0]), log_max=st.floats(-3, 3),
       log_scale=st.floats(-4, 4), foreach=st.sampled_from([None, False]), seed=st.integers(0, 2**16))
def test_global_parity_property(shapes, norm_type, log_max, log_scale, foreach, seed):
    ours = make_params(shapes=[tuple(s) for s in shapes], seed=seed, scale=10 ** log_scale,
                       none_at=(seed % (len(shapes) + 1),))
    ref = twin(ours)
    got = cl.clip_grad_norm_(ours, 10 ** log_max, norm_type, foreach=foreach)
    want = torch.nn.utils.clip_grad_norm_(ref, 10 ** log_max, norm_type, foreach=foreach)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for p, q in zip(ours, ref):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-30)


# --- properties of the two modes -------------------------------------------------------------------


@given(n=st.integers(1, 5), log_max=st.floats(-2, 2), seed=st.integers(0, 2**16),
       norm_type=st.sampled_from([1.0, 2.0, math.inf]))
def test_mode_properties(n, log_max, seed, norm_type):
    max_norm = 10 ** log_max
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(int(torch.randint(1, 6, (1,), generator=gen)), generator=gen, dtype=torch.float64)
             * 10 ** float(torch.empty(1).uniform_(-2, 2, generator=gen)) for _ in range(n)]
    g = cl.clipped(grads, max_norm, norm_type, mode="global")
    # global: the same factor everywhere (direction kept), total norm <= max_norm, never amplified
    total = cl.global_norm(grads, norm_type).item()
    after = cl.global_norm(g, norm_type).item()
    if total > max_norm:
        assert after == pytest.approx(max_norm * total / (total + cl.CLIP_EPS), rel=1e-9)
    else:
        assert after == total
    assert cl.cosine(g, grads) == pytest.approx(1.0, abs=1e-12)
    ratios = [float((a / b)[b != 0].mean()) for a, b in zip(g, grads) if (b != 0).any()]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    # local: every tensor's norm <= max_norm, each tensor's direction kept, unclipped tensors untouched
    norms_before = cl.tensor_norms(grads, norm_type)
    loc = cl.clipped(grads, max_norm, norm_type, mode="local")
    for a, b, nb in zip(loc, grads, norms_before.tolist()):
        na = torch.linalg.vector_norm(a, norm_type).item()
        assert na <= max_norm * (1 + 1e-9) or na == pytest.approx(nb)
        if nb <= max_norm:
            assert torch.equal(a, b)
        else:
            assert na == pytest.approx(max_norm * nb / (nb + cl.CLIP_EPS), rel=1e-9)
    # one tensor: both modes agree
    assert torch.equal(cl.clipped(grads[:1], max_norm, norm_type, "global")[0],
                       cl.clipped(grads[:1], max_norm, norm_type, "local")[0])


def test_local_returns_per_tensor_norms_and_changes_direction():
    big = torch.zeros(4)
    big[0] = 10.0
    small = torch.tensor([0.3, 0.4])                           # norm 0.5
    ps = []
    for g in (big, small):
        p = torch.zeros_like(g, requires_grad=True)
        p.grad = g.clone()
        ps.append(p)
    norms = cl.clip_grad_norm_(ps, 1.0, mode="local")
    torch.testing.assert_close(norms, torch.tensor([10.0, 0.5]))
    assert ps[0].grad[0].item() == pytest.approx(1.0, rel=1e-6)  # clipped to 1
    assert torch.equal(ps[1].grad, small)                      # under the threshold: untouched
    assert cl.cosine([p.grad for p in ps], [big, small]) < 0.99
    # global: both scaled by 1 / ||(10, 0.5)||
    ps2 = [torch.zeros_like(g, requires_grad=True) for g in (big, small)]
    for p, g in zip(ps2, (big, small)):
        p.grad = g.clone()
    total = cl.clip_grad_norm_(ps2, 1.0)
    assert total.item() == pytest.approx(math.hypot(10, 0.5))
    assert cl.cosine([p.grad for p in ps2], [big, small]) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("foreach", [None, False, True])
def test_local_foreach_and_loop_agree(foreach):
    ps = make_params(none_at=(2,))
    ref = twin(ps)
    a = cl.clip_grad_norm_(ps, 0.7, mode="local", foreach=foreach)
    b = cl.clip_grad_norm_(ref, 0.7, mode="local", foreach=False)
    assert torch.equal(a, b)
    same_grads(ps, ref)
    # per-tensor norms equal torch's norm of each gradient
    fresh = make_params(none_at=(2,))
    norms = cl.tensor_norms([p.grad for p in fresh if p.grad is not None])
    torch.testing.assert_close(norms, torch.stack([p.grad.norm() for p in fresh if p.grad is not None]))


def test_helpers():
    assert cl.clip_coefficient(torch.tensor(4.0), 2.0).item() == pytest.approx(2.0 / (4.0 + 1e-6))
    assert cl.clip_coefficient(0.5, 2.0).item() == 1.0
    torch.testing.assert_close(cl.clip_coefficient(torch.tensor([1.0, 4.0]), 2.0),
                               torch.tensor([1.0, 2.0 / (4.0 + 1e-6)]))
    assert cl.global_norm([torch.ones(3), torch.ones(1)]).item() == pytest.approx(2.0)
    assert cl.global_norm([torch.ones(3)], "inf").item() == 1.0
    assert math.isnan(cl.cosine([torch.zeros(2)], [torch.ones(2)]))
    x = [torch.ones(2)]
    assert cl.clipped(x, 0.1)[0].norm().item() == pytest.approx(0.1, rel=1e-5) and torch.equal(x[0], torch.ones(2))


def test_clipping_inside_a_training_step_matches_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin_model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin_model.load_state_dict(model.state_dict())
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(twin_model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1) * 50
    for _ in range(3):
        for m, opt, clip in ((model, opt_a, cl.clip_grad_norm_), (twin_model, opt_b, torch.nn.utils.clip_grad_norm_)):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            clip(m.parameters(), 1.0)
            opt.step()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_norm=-1.0), ValueError, r"clip_grad_norm_: max_norm must be in \[0, inf\), got -1.0"),
    (dict(max_norm="1"), TypeError, "clip_grad_norm_: max_norm must be a real number"),
    (dict(norm_type=0.5), ValueError, r"clip_grad_norm_: norm_type must be in \[1, inf\), got 0.5"),
    (dict(norm_type="two"), TypeError, "clip_grad_norm_: norm_type must be a real number"),
    (dict(mode="layer"), ValueError, r"clip_grad_norm_: mode must be one of \('global', 'local'\), got 'layer'"),
    (dict(error_if_nonfinite=1), TypeError, "clip_grad_norm_: error_if_nonfinite must be a bool, got int 1"),
    (dict(foreach="yes"), TypeError, "clip_grad_norm_: foreach must be None or a bool, got str 'yes'"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(parameters=make_params(), max_norm=1.0) | kwargs
    with pytest.raises(error, match=match):
        cl.clip_grad_norm_(**args)


def test_bad_parameters():
    with pytest.raises(TypeError, match="clip_grad_norm_: parameters must hold tensors, got int at index 1"):
        cl.clip_grad_norm_([torch.zeros(1), 3], 1.0)
    with pytest.raises(TypeError, match="clip_grad_norm_: parameters must be a tensor or an iterable of tensors"):
        cl.clip_grad_norm_(3.0, 1.0)
    with pytest.raises(ValueError, match="cosine: xs and ys must be lists of tensors of the same shapes"):
        cl.cosine([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(RuntimeError, match="foreach=True was passed"):
        cl.global_norm([torch.zeros(2, device="meta")], foreach=True)


@pytest.mark.gpu
def test_parity_on_cuda():
    for foreach in (None, False, True):
        for norm_type in NORMS:
            ours = [p.detach().cuda().requires_grad_() for p in make_params(none_at=())]
            for p, q in zip(ours, make_params(none_at=())):
                p.grad = q.grad.cuda()
            ref = twin(ours)
            got = cl.clip_grad_norm_(ours, 0.5, norm_type, foreach=foreach)
            want = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type, foreach=foreach)
            assert got.device.type == "cuda" and torch.equal(got, want)
            same_grads(ours, ref)
            cl.clip_grad_norm_(ours, 0.5, norm_type, mode="local", foreach=foreach)


# --- exercises, figures, benchmark ----------------------------------------------------------------

NAMES = ["clipping_spikes.bad_batch_response", "clipping_spikes.clip_local", "clipping_spikes.global_coefficient",
         "clipping_spikes.mad_score"]


def test_exercises_registered_and_references_pass():
    assert exercises_for("07-clipping-spikes") == NAMES
    for name in NAMES:
        assert labkit.check(name, lookup(name).reference, quiet=True)


def plain_coefficient(norms, max_norm):
    total = math.sqrt(sum(n * n for n in norms))
    return min(1.0, max_norm / (total + 1e-6))


def plain_local(grads, max_norm):
    return [g * min(1.0, max_norm / (g.norm().item() + 1e-6)) for g in grads]


def plain_mad(history, loss):
    h = sorted(history)
    k = len(h)
    med = h[k // 2] if k % 2 else (h[k // 2 - 1] + h[k // 2]) / 2
    dev = sorted(abs(x - med) for x in h)
    mad = dev[k // 2] if k % 2 else (dev[k // 2 - 1] + dev[k // 2]) / 2
    return (loss - med) / (1.4826 * mad)


def plain_response(beta1, beta2, r, steps):
    return [(1 - beta1) * beta1 ** k * r / math.sqrt(1 + (1 - beta2) * beta2 ** k * (r * r - 1)) for k in range(steps)]


@pytest.mark.parametrize("name,fn", [
    ("clipping_spikes.global_coefficient", plain_coefficient),
    ("clipping_spikes.clip_local", plain_local),
    ("clipping_spikes.mad_score", plain_mad),
    ("clipping_spikes.bad_batch_response", plain_response),
])
def test_plain_answers_pass(name, fn):
    assert labkit.check(name, fn, quiet=True)


@pytest.mark.parametrize("name,fn", [
    # sums the norms instead of taking the norm of the norms
    ("clipping_spikes.global_coefficient", lambda norms, max_norm: min(1.0, max_norm / (sum(norms) + 1e-6))),
    # forgets the min(1, .): amplifies small gradients
    ("clipping_spikes.global_coefficient",
     lambda norms, max_norm: max_norm / (math.sqrt(sum(n * n for n in norms)) + 1e-6)),
    # clips globally instead of per tensor
    ("clipping_spikes.clip_local", lambda grads, max_norm: [
        g * plain_coefficient([h.norm().item() for h in grads], max_norm) for g in grads]),
    # clips every element to max_norm (value clipping)
    ("clipping_spikes.clip_local", lambda grads, max_norm: [g.clamp(-max_norm, max_norm) for g in grads]),
    # the mean and std instead of the median and MAD
    ("clipping_spikes.mad_score", lambda history, loss: (loss - sum(history) / len(history)) / (
        math.sqrt(sum((x - sum(history) / len(history)) ** 2 for x in history) / (len(history) - 1)))),
    # no 1.4826
    ("clipping_spikes.mad_score", lambda history, loss: plain_mad(history, loss) * 1.4826),
    # the gradient jump kept in v forever (no beta2 decay)
    ("clipping_spikes.bad_batch_response", lambda beta1, beta2, r, steps: [
        (1 - beta1) * beta1 ** k * r / math.sqrt(1 + (1 - beta2) * (r * r - 1)) for k in range(steps)]),
])
def test_typical_mistakes_fail(name, fn):
    with pytest.raises(labkit.ExerciseFailed):
        labkit.check(name, fn, quiet=True)


def test_clip_bars_figure():
    from labkit.viz import clipping as vc

    names = ["a.weight", "a.bias", "b.weight"]
    grads = [torch.full((4,), 5.0), torch.tensor([0.1]), torch.tensor([0.3, 0.4])]
    fig = vc.clip_bars_figure(names, grads, max_norm=1.0, mode="local")
    assert [t.name for t in fig.data[:2]] == ["before", "after"]
    assert list(fig.data[1].y) == pytest.approx([1.0, 0.1, 0.5], rel=1e-5)
    assert "1/3 tensors clipped" in fig.layout.title.text and "cosine" in fig.layout.title.text
    glob = vc.clip_bars_figure(names, grads, max_norm=1.0, mode="global")
    assert "3/3 tensors clipped" in glob.layout.title.text and "cosine 1.000" in glob.layout.title.text
    assert "0/3 tensors clipped" in vc.clip_bars_figure(names, grads, max_norm=100.0, mode="global").layout.title.text
    with pytest.raises(ValueError, match="names and grads"):
        vc.clip_bars_figure(names[:2], grads, max_norm=1.0, mode="local")


def test_benchmark_quick_run(monkeypatch):
    from labkit.benchmarks import clipping_spikes as bench

    monkeypatch.setattr(bench, "_configs", lambda quick: [dict(n_layer=1, n_embd=32, n_head=2)])
    rows = bench.run(quick=True)
    clip = [r for r in rows if r["group"] == "clip"]
    assert [r["name"] for r in clip] == list(bench.variants())
    assert all(r["median_ms"] > 0 and r["baseline_ms"] == clip[0]["median_ms"] for r in clip)
    assert all(r["ratio"] == pytest.approx(r["baseline_ms"] / r["median_ms"]) for r in rows)
    by = {r["name"]: r for r in rows}
    # the same total norm as torch, measured on the same gradients, by every variant
    for r in clip:
        assert r["norm"] == pytest.approx(by["torch clip_grad_norm_ (foreach)"]["norm"], rel=1e-5)
    assert all(r["n_tensors"] == rows[0]["n_tensors"] > 1 for r in rows)
    rec = [r for r in rows if r["group"] == "recorder"]
    assert [r["name"] for r in rec] == ["forward + backward", "forward + backward + GradNormRecorder"]
    assert rec[1]["baseline_ms"] == rec[0]["median_ms"] > 0
    with pytest.raises(TypeError, match="quick"):
        bench.run(quick="yes")
