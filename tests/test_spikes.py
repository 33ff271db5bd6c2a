"""Chapter 07-clipping-spikes, part 2: labkit.train.spikes (the spike detector, per-layer gradient-norm
recording, Adam's bad-batch response, the harness that provokes spikes) and its figures."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from labkit.train import spikes as sp

# --- scores -----------------------------------------------------------------------------------------


def test_scores_by_hand():
    assert sp.mad_score([1.0, 2.0, 3.0], 10.0) == pytest.approx(8 / 1.4826)        # median 2, MAD 1
    assert sp.mad_score([1.0, 2.0, 3.0, 4.0], 2.5) == 0.0                           # even length: median 2.5
    assert sp.z_score([1.0, 2.0, 3.0], 4.0) == pytest.approx(2.0)                   # mean 2, sample std 1
    assert sp.mad_score(torch.tensor([1.0, 1.0, 1.0]), 1.5) == math.inf            # a flat window
    assert sp.mad_score([1.0, 1.0, 1.0], 0.5) == -math.inf and sp.mad_score([1.0, 1.0], 1.0) == 0.0
    # one outlier in the window moves the MAD score little and the z-score a lot
    calm = [2.0 + 0.01 * math.sin(i) for i in range(40)]
    spiked = calm[:-1] + [20.0]
    assert sp.mad_score(spiked, 2.2) == pytest.approx(sp.mad_score(calm, 2.2), rel=0.1)
    assert sp.z_score(spiked, 2.2) < 0.1 * sp.z_score(calm, 2.2)
    assert sp.relative_rise([1.0, 2.0, 3.0], 2.5) == pytest.approx(0.25)          # 25% above the median 2
    assert sp.relative_rise([-2.0, -2.0], -1.0) == pytest.approx(0.5)              # the level's magnitude
    assert sp.relative_rise([0.0, 0.0], 0.1) == math.inf


def test_relative_method_on_a_constructed_trace():
    """Chapter 09's rule: 15% above the median of the previous 20 steps, a run of flagged steps counted once."""
    trace = [3.0 - 0.001 * t for t in range(100)]
    for t in (40, 70):
        trace[t] += 1.0  # two one-step spikes
    trace[71] += 0.8  # ... the second lasting two steps
    kw = dict(method="relative", window=20, min_history=20, threshold=0.15)
    flagged = sp.detect_spikes(trace, **kw)
    assert flagged == [40, 70, 71]
    assert [a for a, _ in sp.spike_events(flagged)] == [40, 70]
    assert sp.detect_spikes([3.0] * 50, **kw) == []
    assert sp.detect_spikes(trace[:20], **kw) == []  # no full window: nothing judged
    assert sp.detect_spikes(trace, **{**kw, "threshold": 0.3}) == [40, 70]  # step 71 rises 0.8 / 2.95 = 27%
    assert sp.detect_spikes(trace, **{**kw, "threshold": 0.35}) == []       # the spikes rise 1 / 2.96 = 34%


@given(n=st.integers(3, 40), seed=st.integers(0, 2**16))
def test_mad_score_matches_a_plain_reference(n, seed):
    rng = random.Random(seed)
    h = [rng.gauss(3.0, 0.2) for _ in range(n)]
    x = rng.gauss(3.0, 1.0)
    med = statistics.median(h)
    mad = statistics.median(abs(v - med) for v in h)
    assert sp.mad_score(h, x) == pytest.approx((x - med) / (1.4826 * mad), rel=1e-12)
    assert sp.z_score(h, x) == pytest.approx((x - statistics.mean(h)) / statistics.stdev(h), rel=1e-12)


# --- the streaming detector ---------------------------------------------------------------------------


def noisy(n, seed=0, level=2.0, noise=0.02):
    rng = random.Random(seed)
    return [level + noise * rng.gauss(0, 1) for _ in range(n)]


def test_detector_flags_injected_spikes_only():
    losses = noisy(300)
    for t in (80, 200):
        losses[t] += 0.5                                        # 25 sigma
    det = sp.SpikeDetector(window=50, threshold=6.0)
    verdicts = [det.update(x) for x in losses]
    assert det.flagged == [80, 200] == [i for i, v in enumerate(verdicts) if v]
    assert det.step == 300 and len(det.scores) == 300
    assert all(math.isnan(s) for s in det.scores[:10]) and not math.isnan(det.scores[10])   # min_history
    assert sp.detect_spikes(losses, window=50, threshold=6.0) == [80, 200]
    assert sp.detect_spikes(torch.tensor(losses), window=50, threshold=6.0) == [80, 200]


def test_zscore_is_masked_by_a_recent_spike_mad_is_not():
    losses = noisy(200, seed=1)
    losses[100] += 5.0                                          # a big spike ...
    losses[110] += 0.5                                          # ... then a smaller one, 10 steps later
    mad = sp.detect_spikes(losses, window=50, threshold=6.0, method="mad")
    z = sp.detect_spikes(losses, window=50, threshold=6.0, method="zscore")
    assert mad == [100, 110]
    assert z == [100]                                           # the first spike inflated the std


def test_nonfinite_losses_are_flagged_and_kept_out_of_the_window():
    det = sp.SpikeDetector(window=20, threshold=6.0, min_history=5)
    for x in noisy(30):
        det.update(x)
    assert det.update(float("nan")) and det.update(torch.tensor(float("inf")))
    assert det.flagged == [30, 31]
    assert not det.update(2.0)                                  # the window still holds the calm losses
    det.reset()
    assert det.step == 0 and det.flagged == []


def test_log_mode_and_min_delta():
    losses = [10 ** (-t / 50) * (1 + 0.01 * math.sin(t)) for t in range(300)]   # falls over 6 decades
    losses[250] *= 30
    assert sp.detect_spikes(losses, log=True, window=10, min_history=5) == [250]
    flat = [1.0] * 30 + [1.0 + 1e-9]
    assert sp.detect_spikes(flat) == [30]                      # a zero-MAD window: any rise scores inf
    assert sp.detect_spikes(flat, min_delta=1e-3) == []
    with pytest.raises(ValueError, match=r"SpikeDetector.update: loss must be > 0 with log=True, got -1.0"):
        sp.SpikeDetector(log=True).update(-1.0)


@given(seed=st.integers(0, 2**16), window=st.integers(5, 40), threshold=st.floats(1.0, 10.0),
       method=st.sampled_from(["mad", "zscore", "relative"]))
def test_streaming_verdicts_equal_recomputation(seed, window, threshold, method):
    rng = random.Random(seed)
    losses = [1.0 + 0.1 * rng.gauss(0, 1) + (5.0 if rng.random() < 0.05 else 0.0) for _ in range(80)]
    got = sp.detect_spikes(losses, window=window, threshold=threshold, method=method, min_history=3)
    want, hist = [], []
    score = {"mad": sp.mad_score, "zscore": sp.z_score, "relative": sp.relative_rise}[method]
    for t, x in enumerate(losses):
        if len(hist) >= 3 and score(hist[-window:], x) > threshold:
            want.append(t)
        hist.append(x)
    assert got == want


def test_spike_events():
    assert sp.spike_events([3, 4, 5, 9, 10, 30]) == [(3, 5), (9, 10), (30, 30)]
    assert sp.spike_events([3, 5, 9], gap=2) == [(3, 5), (9, 9)]
    assert sp.spike_events([]) == []


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window=1), ValueError, "SpikeDetector: window must be an int >= 2, got 1"),
    (dict(window=2.5), TypeError, "SpikeDetector: window must be an int, got float 2.5"),
    (dict(threshold=0.0), ValueError, r"SpikeDetector: threshold must be in \(0, inf\), got 0.0"),
    (dict(method="iqr"), ValueError, r"SpikeDetector: method must be one of \('mad', 'zscore', 'relative'\), got 'iqr'"),
    (dict(min_history=60), ValueError, "SpikeDetector: min_history must be <= window=50, got 60"),
    (dict(min_delta=-1.0), ValueError, r"SpikeDetector: min_delta must be in \[0, inf\), got -1.0"),
    (dict(log="yes"), TypeError, "SpikeDetector: log must be a bool, got str 'yes'"),
])
def test_detector_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sp.SpikeDetector(**kwargs)


def test_score_bad_arguments():
    with pytest.raises(ValueError, match="mad_score: history must hold at least 1 loss, got 0"):
        sp.mad_score([], 1.0)
    with pytest.raises(ValueError, match="relative_rise: history must hold at least 1 loss, got 0"):
        sp.relative_rise([], 1.0)
    with pytest.raises(ValueError, match="z_score: history must hold at least 2 losses, got 1"):
        sp.z_score([1.0], 1.0)
    with pytest.raises(TypeError, match="mad_score: history must be a sequence of numbers, got float"):
        sp.mad_score(1.0, 1.0)
    with pytest.raises(TypeError, match="SpikeDetector.update: loss must be a real number, got str"):
        sp.SpikeDetector().update("1.0")
    with pytest.raises(ValueError, match="spike_events: gap must be an int >= 1, got 0"):
        sp.spike_events([1], gap=0)


# --- per-layer gradient norms --------------------------------------------------------------------------


def test_recorder_matches_manual_norms_and_accumulates():
    torch.manual_seed(0)
    model = sp.DeepMLP(depth=3, width=8, d_in=4)
    rec = sp.GradNormRecorder(model)
    assert rec.groups == ["layers.0", "layers.1", "layers.2"]
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    model(x, y)[1].backward()
    row = rec.step()
    want = torch.stack([torch.cat([p.grad.flatten() for p in layer.parameters()]).norm() for layer in model.layers])
    torch.testing.assert_close(row, want)
    # gradient accumulation: two backwards, one step -> the norms of the summed gradients
    model.zero_grad()
    model(x[:8], y[:8])[1].backward()
    model(x[8:], y[8:])[1].backward()
    rec.step()
    want2 = torch.stack([torch.cat([p.grad.flatten() for p in layer.parameters()]).norm() for layer in model.layers])
    torch.testing.assert_close(rec.history[1], want2)
    # a step without any backward: nan; removed hooks record nothing more
    assert torch.isnan(rec.step()).all()
    rec.remove()
    model(x, y)[1].backward()
    assert torch.isnan(rec.step()).all() and rec.history.shape == (4, 3)


def test_recorder_per_param_tied_weights_and_frozen_params():
    from labkit.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_embd=8, n_head=2))
    model.blocks[0].norm1.weight.requires_grad_(False)
    with sp.GradNormRecorder(model.named_parameters(), group_by="param") as rec:
        x = torch.randint(0, 11, (2, 8))
        model(x, x)[1].backward()
        row = rec.step()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert rec.groups == names and "blocks.0.norm1.weight" not in names
    assert "lm_head.weight" not in names                      # tied to tok_emb.weight: one entry
    want = torch.stack([p.grad.norm() for n, p in model.named_parameters() if p.requires_grad])
    torch.testing.assert_close(row, want)
    by_block = sp.GradNormRecorder(model, group_by=lambda n: n.split(".")[0])
    assert by_block.groups == ["tok_emb", "pos_emb", "blocks", "norm_f"]
    by_block.remove()
    with pytest.raises(ValueError, match="GradNormRecorder: group_by must be 'layer', 'param' or a function"):
        sp.GradNormRecorder(model, group_by="block")
    with pytest.raises(TypeError, match="GradNormRecorder: named_parameters must be"):
        sp.GradNormRecorder([])


def test_layer_of():
    assert sp.layer_of("blocks.0.attn.q_proj.weight") == "blocks.0.attn.q_proj"
    assert sp.layer_of("scale") == "scale"


# --- Adam's response to one bad batch ----------------------------------------------------------------


def test_bad_batch_response_limits():
    u = sp.adam_bad_batch_response(0.9, 0.999, 1e6, 200)
    assert u[0] == pytest.approx(0.1 / math.sqrt(0.001), rel=1e-6)
    assert sum(u) == pytest.approx(u[0] / (1 - 0.9 / math.sqrt(0.999)), rel=1e-3)      # about 32 lr
    u95 = sp.adam_bad_batch_response(0.9, 0.95, 1e6, 200)
    assert u95[0] == pytest.approx(0.1 / math.sqrt(0.05), rel=1e-6) and sum(u95) < sum(u) / 5
    assert sp.adam_bad_batch_response(0.9, 0.999, 1.0, 3) == pytest.approx([0.1, 0.09, 0.081])   # no jump
    with pytest.raises(ValueError, match=r"adam_bad_batch_response: betas\[1\] must be in \[0, 1\), got 1.0"):
        sp.adam_bad_batch_response(0.9, 1.0, 2.0, 3)
    with pytest.raises(ValueError, match="adam_bad_batch_response: steps must be an int >= 1, got 0"):
        sp.adam_bad_batch_response(0.9, 0.99, 2.0, 0)


@pytest.mark.parametrize("beta2", [0.95, 0.999])
def test_bad_batch_moments_match_torch_adamw(beta2):
    """torch.optim.AdamW's own moments, from a steady state (m = 0, v = σ²), after one gradient of r·σ and
    then noise: their means over many coordinates follow m_k = (1−β1)β1^k·G and
    v_k = σ² + (1−β2)β2^k(G² − σ²)."""
    n, sigma, r, beta1 = 200_000, 0.01, 30.0, 0.9
    gen = torch.Generator().manual_seed(0)
    p = torch.zeros(n, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(beta1, beta2), weight_decay=0.0, foreach=False)
    p.grad = torch.zeros(n)
    opt.step()                                                   # creates the state
    state = opt.state[p]
    state["exp_avg"].zero_()
    state["exp_avg_sq"].fill_(sigma ** 2)
    state["step"].fill_(1e6)                                     # bias corrections ~ 1: mid-training
    u = sp.adam_bad_batch_response(beta1, beta2, r, 8)
    for k in range(8):
        p.grad = torch.full((n,), r * sigma) if k == 0 else torch.randn(n, generator=gen) * sigma
        opt.step()
        m, v = state["exp_avg"].mean().item(), state["exp_avg_sq"].mean().item()
        assert m == pytest.approx((1 - beta1) * beta1 ** k * r * sigma, rel=0.03)
        assert v == pytest.approx(sigma ** 2 * (1 + (1 - beta2) * beta2 ** k * (r * r - 1)), rel=0.01)
        assert m / math.sqrt(v) == pytest.approx(u[k], rel=0.03)


# --- the harness -----------------------------------------------------------------------------------------


def test_train_and_watch_matches_a_plain_loop():
    from labkit.optim import AdamW

    x, y = sp.teacher_task(n=64, seed=3)

    def fresh():
        torch.manual_seed(0)
        m = sp.DeepMLP(depth=4, width=16)
        return m, AdamW(m.parameters(), lr=1e-2)

    model, opt = fresh()
    run = sp.train_and_watch(model, sp.sample_batches(x, y, 16, seed=1), 12, opt, max_norm=0.05,
                             bad_steps=[5], corrupt=sp.scale_targets(10.0))
    ref, ref_opt = fresh()
    losses, totals, updates = [], [], []
    for t, (xb, yb) in zip(range(12), sp.sample_batches(x, y, 16, seed=1)):
        if t == 5:
            yb = yb * 10.0
        loss = ref(xb, yb)[1]
        ref_opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in ref.parameters()]
        totals.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05).item())
        ref_opt.step()
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(ref.parameters(), before)]).norm().item())
        losses.append(loss.item())
    assert run.losses == pytest.approx(losses, rel=1e-6)
    assert run.total_norms == pytest.approx(totals, rel=1e-5)
    assert run.update_norms == pytest.approx(updates, rel=1e-4)
    assert run.grad_norms.shape == (12, 4) and run.groups == [f"layers.{i}" for i in range(4)]
    assert run.grad_norms.square().sum(1).sqrt().tolist() == pytest.approx(totals, rel=1e-5)   # layers add up
    assert run.bad_steps == [5] and run.steps == 12
    assert losses[5] > 10 * losses[4]                          # the corrupted batch
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_provoke_spikes_clipping_tames_a_bad_batch():
    kw = dict(steps=70, batch_size=32, bad_steps=[50], bad_scale=30.0, model_kwargs=dict(depth=4, width=32))
    raw = sp.provoke_spikes("mlp", **kw)
    clipped = sp.provoke_spikes("mlp", max_norm=0.2, **kw)
    pre = statistics.median(raw.losses[30:50])
    peak_raw, peak_clip = max(raw.losses[51:70]) / pre, max(clipped.losses[51:70]) / pre
    assert raw.losses[:50] == pytest.approx(clipped.losses[:50], rel=0.5)   # same seed: same data and model
    assert peak_raw > 5 * peak_clip
    assert 50 in raw.flagged and raw.total_norms[50] > 20 * statistics.median(raw.total_norms[30:50])


def test_provoke_spikes_gpt_runs_and_corrupts():
    run = sp.provoke_spikes("gpt", steps=3, bad_steps=[2], model_kwargs=dict(n_layer=1, n_embd=16, n_head=2,
                                                                               block_size=8), batch_size=2)
    assert run.steps == 3 and run.grad_norms.shape[0] == 3 and "tok_emb" in run.groups
    assert all(math.isfinite(v) for v in run.losses)


def test_harness_bad_arguments():
    with pytest.raises(ValueError, match=r"provoke_spikes: task must be one of \('mlp', 'gpt'\), got 'cnn'"):
        sp.provoke_spikes("cnn")
    model = sp.DeepMLP(2, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = sp.teacher_task(n=8)
    with pytest.raises(ValueError, match="train_and_watch: bad_steps needs a corrupt"):
        sp.train_and_watch(model, sp.sample_batches(x, y, 4), 2, opt, bad_steps=[1])
    with pytest.raises(ValueError, match=r"train_and_watch: max_norm must be in \(0, inf\), got 0.0"):
        sp.train_and_watch(model, sp.sample_batches(x, y, 4), 2, opt, max_norm=0.0)
    with pytest.raises(ValueError, match="DeepMLP: depth must be an int >= 1, got 0"):
        sp.DeepMLP(depth=0)

    class PerExample(torch.nn.Module):  # returns a loss per example, not a scalar
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 1)

        def forward(self, x, y):
            return (self.lin(x) - y).squeeze(1)

    bad = PerExample()
    with pytest.raises(ValueError, match=r"train_and_watch: model\(x, y\) must return \(output, loss\)"):
        sp.train_and_watch(bad, sp.sample_batches(x, y, 4), 1, torch.optim.SGD(bad.parameters(), lr=0.1))


# --- figures -------------------------------------------------------------------------------------------------


def test_figures():
    from labkit.viz import clipping as vc

    run = sp.SpikeRun(losses=[1.0, 0.5, 5.0, 0.4], grad_norms=torch.tensor([[1.0, 2.0]] * 4), groups=["a", "b"],
                      total_norms=[1.0, 1.0, 9.0, 1.0], update_norms=[0.1] * 4, flagged=[2], bad_steps=[2])
    fig = vc.spike_anatomy_figure(run, grad_flags=[2])
    assert len(fig.data) == 6 and fig.data[1].x == (2,) and fig.data[5].z[0][0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="spike_anatomy_figure: need 0 <= start < end"):
        vc.spike_anatomy_figure(run, start=3, end=2)
    resp = vc.response_figure({"a": [1.0, 0.0, 0.5]})
    assert list(resp.data[0].y) == [1.0, None, 0.5]
    det = vc.detector_figure([1.0, 3.0, 1.0], {"MAD": [1], "z": []})
    assert [t.name for t in det.data] == ["loss", "MAD (1)", "z (0)"]
    with pytest.raises(TypeError, match="response_figure: curves must be"):
        vc.response_figure([])


def test_rise_events():
    assert sp.rise_events([1, 1, 1, 20, 1, 1, 0.5, 0.5, 8, 0.5]) == [(3, 3, 20.0), (8, 8, 16.0)]
    assert sp.rise_events([1.0, 2.0, float("nan"), 1.0]) == [(2, 2, math.inf)]
    assert sp.rise_events([1.0, 0.5, 0.25]) == []
    assert sp.rise_events([1, 1, 30, 1, 30, 1], factor=10, gap=2) == [(2, 4, 30.0)]
    with pytest.raises(ValueError, match=r"rise_events: factor must be in \[1, inf\), got 0.5"):
        sp.rise_events([1.0], factor=0.5)


def test_guard_skips_the_outlier_update_and_param_norm():
    kw = dict(steps=60, batch_size=32, bad_steps=[50], bad_scale=30.0, model_kwargs=dict(depth=3, width=16))
    guarded = sp.provoke_spikes("mlp", guard=sp.SpikeDetector(log=True), **kw)
    plain = sp.provoke_spikes("mlp", **kw)
    assert 50 in guarded.skipped and guarded.update_norms[50] == 0.0 and plain.skipped == []
    assert guarded.losses[:51] == plain.losses[:51]              # identical until the skipped update
    assert max(guarded.losses[51:]) < max(plain.losses[51:])
    assert math.isfinite(plain.param_norm) and plain.param_norm > 0
