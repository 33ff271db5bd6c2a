"""Tests of chapter 06-galore-lisa: GaLoreAdamW (parity with galore_torch), LISA, the exercises,
the figures and the benchmark."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import labkit
from labkit.models import GPTConfig, TinyGPT, train
from labkit.optim import galore
from labkit.optim import memory as mem
from labkit.optim.galore import GaLoreAdamW, galore_param_groups
from labkit.optim.lisa import LISA, find_blocks

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    galore_torch = pytest.importorskip("galore_torch")

GALORE = dict(rank=3, update_proj_gap=3, scale=0.25)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)


def reference(params_2d, params_1d, proj_type="std", **kw):
    """galore_torch's GaLoreAdamW with the same groups as ours: plain AdamW for 1-D, GaLore for 2-D."""
    hp = {**GALORE, **kw.pop("galore", {})}
    groups = [{"params": params_1d}, {"params": params_2d, **hp, "proj_type": proj_type}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return galore_torch.GaLoreAdamW([g for g in groups if g["params"]], no_deprecation_warning=True, **kw)


def ours(params_2d, params_1d, proj_type="std", **kw):
    hp = {**GALORE, **kw.pop("galore", {})}
    groups = [{"params": params_1d, "rank": None}, {"params": params_2d}]
    return GaLoreAdamW([g for g in groups if g["params"]], proj_type=proj_type, **hp, **kw)


def twin_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    return [torch.nn.Parameter(t.clone()) for t in init], [torch.nn.Parameter(t.clone()) for t in init]


def run_both(shapes, *, proj_type="std", dtype=torch.float64, steps=8, none_at=(), **kw):
    """Step ours and the reference on the same gradients; return both parameter lists."""
    a, b = twin_params(shapes, dtype)
    split = lambda ps: ([p for p in ps if p.dim() == 2], [p for p in ps if p.dim() != 2])  # noqa: E731
    ref, opt = reference(*split(a), proj_type, **copy.deepcopy(kw)), ours(*split(b), proj_type, **copy.deepcopy(kw))
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        for i, (pa, pb) in enumerate(zip(a, b)):
            grad = torch.randn(pa.shape, generator=g, dtype=dtype)
            pa.grad = None if (t, i) in none_at else grad.clone()
            pb.grad = None if (t, i) in none_at else grad.clone()
        ref.step()
        opt.step()
    return a, b, opt


# --- GaLoreAdamW: parity with galore_torch -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("proj_type", galore.PROJ_TYPES)
@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_parity_with_galore_torch(dtype, proj_type, shape):
    """8 steps with a new SVD at steps 0, 3, 6, weight decay on, a plain-AdamW vector beside: bitwise equal."""
    a, b, opt = run_both([shape, (shape[0],)], proj_type=proj_type, dtype=dtype, lr=0.01, weight_decay=0.1,
                         betas=(0.9, 0.99))
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb), (pa - pb).abs().max()
    assert opt.state[b[0]]["step"] == 8


def test_parity_when_rank_exceeds_the_matrix():
    a, b, _ = run_both([(4, 9), (9, 4)], galore=dict(rank=16), lr=0.01)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_reverse_std_where_galore_torch_breaks():
    """galore_torch re-derives the side from the low-rank shape and crashes for m < n, rank >= m;
    ours keeps the side it projected with: reverse_std on a wide matrix is the "right" rule."""
    with pytest.raises(RuntimeError):
        run_both([(3, 8)], proj_type="reverse_std", galore=dict(rank=4))
    results = []
    for proj_type in ("reverse_std", "right"):
        p = twin_params([(3, 8)], torch.float64)[1]
        opt = ours(p, [], proj_type, galore=dict(rank=4))
        g = torch.Generator().manual_seed(1)
        for _ in range(8):
            p[0].grad = torch.randn(3, 8, generator=g, dtype=torch.float64)
            opt.step()
        results.append(p[0].detach())
    assert torch.equal(*results)


def test_none_grads_are_skipped_like_the_reference():
    a, b, opt = run_both([(5, 7), (7,)], none_at={(1, 0), (2, 1), (4, 0)}, lr=0.01)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    assert opt.state[b[0]]["step"] == 6 and opt.state[b[1]]["step"] == 7


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_zero_size_matrix(shape):
    a, b, opt = run_both([shape, (3, 4)], lr=0.01)
    assert torch.equal(a[1], b[1]) and b[0].shape == shape
    assert opt.state[b[0]]["exp_avg"].shape == shape


def test_bf16_params_use_an_fp32_svd():
    a, b, opt = run_both([(6, 10)], dtype=torch.bfloat16, steps=4, lr=0.01)
    assert torch.equal(a[0], b[0])
    assert opt.state[b[0]]["P"].dtype == torch.bfloat16


def test_state_layout_and_bytes():
    p = torch.nn.Parameter(torch.randn(6, 10))
    opt = GaLoreAdamW([p], rank=2, update_proj_gap=5, scale=1.0)
    p.grad = torch.randn(6, 10)
    opt.step()
    st = opt.state[p]
    assert st["P"].shape == (6, 2) and st["exp_avg"].shape == (2, 10) and "Q" not in st
    assert mem.state_bytes(opt) == (6 * 2 + 2 * 2 * 10) * 4  # projector + two low-rank moments, fp32


def test_closure_returns_the_loss():
    p = torch.nn.Parameter(torch.randn(4, 5))
    opt = GaLoreAdamW([p], rank=2, update_proj_gap=5, scale=1.0)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0


def test_state_dict_round_trip_is_bitwise():
    """10 steps, save, load into a fresh optimizer, 10 more (crossing SVD refreshes) == 20 uninterrupted."""
    torch.manual_seed(0)
    grads = [[torch.randn(6, 9), torch.randn(9)] for _ in range(20)]
    init = [torch.randn(6, 9), torch.randn(9)]

    def make():
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        return ps, GaLoreAdamW([{"params": ps[:1]}, {"params": ps[1:], "rank": None}], lr=0.01, weight_decay=0.1,
                               rank=2, update_proj_gap=4, scale=0.5)

    def steps(ps, opt, gs):
        for g in gs:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()

    ps, opt = make()
    steps(ps, opt, grads)
    ps2, opt2 = make()
    steps(ps2, opt2, grads[:10])
    saved = copy.deepcopy(opt2.state_dict())
    ps3, opt3 = make()
    with torch.no_grad():
        for p3, p2 in zip(ps3, ps2):
            p3.copy_(p2)
    opt3.load_state_dict(saved)
    steps(ps3, opt3, grads[10:])
    for p, p3 in zip(ps, ps3):
        assert torch.equal(p, p3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "GaLoreAdamW: lr must be in"),
    (dict(betas=(0.9, 1.0)), r"GaLoreAdamW: betas\[1\] must be in"),
    (dict(betas=(0.9,)), "GaLoreAdamW: betas must be a tuple"),
    (dict(eps=-1e-8), "GaLoreAdamW: eps must be in"),
    (dict(weight_decay=-0.1), "GaLoreAdamW: weight_decay must be in"),
    (dict(rank=0), "GaLoreAdamW: rank must be an int >= 1, got 0"),
    (dict(rank=2.5), "GaLoreAdamW: rank must be an int"),
    (dict(update_proj_gap=0), "GaLoreAdamW: update_proj_gap must be an int >= 1"),
    (dict(scale=-1.0), "GaLoreAdamW: scale must be in"),
    (dict(proj_type="diagonal"), "GaLoreAdamW: proj_type must be one of"),
])
def test_hyperparameter_checks(kwargs, match):
    args = dict(rank=2, update_proj_gap=10, scale=0.25)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        GaLoreAdamW([torch.nn.Parameter(torch.randn(3, 3))], **args)


def test_param_group_values_are_checked_too():
    with pytest.raises(ValueError, match="GaLoreAdamW: rank must be an int >= 1, got -2"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(3, 3))], "rank": -2}], rank=None,
                    update_proj_gap=10, scale=0.25)


def test_galore_param_groups_on_tinygpt():
    model = TinyGPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16))
    rest, mats = galore_param_groups(model, rank=4, update_proj_gap=7, scale=0.5, lr=1e-3)
    assert rest["rank"] is None and rest["lr"] == 1e-3 and mats["rank"] == 4 and mats["update_proj_gap"] == 7
    assert all(p.dim() == 2 for p in mats["params"]) and len(mats["params"]) == 2 * 6  # q, k, v, o, up, down
    assert model.tok_emb.weight not in set(mats["params"])  # the tied head stays on AdamW
    ids = [id(p) for g in (rest, mats) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_galore_trains_tinygpt():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=16))
    opt = GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=10, scale=0.25), lr=1e-2, rank=None,
                      update_proj_gap=10, scale=0.25)
    x = torch.randint(0, 16, (8, 16))
    log = train(model, iter([(x, x)] * 40), 40, optimizer=opt, progress=False)
    assert log.losses[-1] < 0.5 * log.losses[0]


# --- the projection ------------------------------------------------------------------------------


shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@given(shape=shapes, rank=st.integers(1, 14), seed=st.integers(0, 2**16))
def test_projection_of_own_gradient_is_truncated_svd(shape, rank, seed):
    """With the basis from G itself, project then project back = G's best rank-r approximation."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    P, Q = galore.low_rank_basis(G, rank, galore.projection_side(shape, "std"))
    back = galore.project_back(galore.project(G, P, Q), P, Q)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    r = min(rank, *shape)
    residual = torch.linalg.norm(G - back)
    assert math.isclose(residual.item(), S[r:].norm().item(), rel_tol=1e-4, abs_tol=1e-5)
    low = galore.project(G, P, Q)
    assert low.shape == ((r, shape[1]) if P is not None else (shape[0], r))
    assert math.isclose(galore.captured_fraction(G, P, Q), (S[:r].norm() / S.norm()).item(), rel_tol=1e-4)


@given(shape=shapes, rank=st.integers(1, 6), proj_type=st.sampled_from(galore.PROJ_TYPES),
       seed=st.integers(0, 2**16))
def test_update_lies_in_the_subspace(shape, rank, proj_type, seed):
    """Without weight decay, a GaLore step moves W only inside span(P) (left) / rowspan(Q) (right)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
    w0 = p.detach().clone()
    opt = GaLoreAdamW([p], lr=0.1, rank=rank, update_proj_gap=100, scale=1.0, proj_type=proj_type)
    p.grad = torch.randn(shape, generator=g, dtype=torch.float64)
    opt.step()
    delta = p.detach() - w0
    P, Q = opt.state[p].get("P"), opt.state[p].get("Q")
    if P is not None:
        assert torch.allclose(P @ (P.T @ delta), delta, atol=1e-6)
    if Q is not None:
        assert torch.allclose((delta @ Q.T) @ Q, delta, atol=1e-6)


@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9)), rank=st.integers(1, 5),
       proj_type=st.sampled_from(galore.PROJ_TYPES), gap=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_parity(shape, rank, proj_type, gap, seed):
    m, n = shape
    assume(not (proj_type == "reverse_std" and m < n and rank >= m))  # galore_torch's crash (tested above)
    a, b = twin_params([shape], torch.float64, seed)
    ref = reference(a, [], proj_type, galore=dict(rank=rank, update_proj_gap=gap), lr=0.05)
    opt = ours(b, [], proj_type, galore=dict(rank=rank, update_proj_gap=gap), lr=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        grad = torch.randn(shape, generator=g, dtype=torch.float64)
        a[0].grad, b[0].grad = grad.clone(), grad.clone()
        ref.step()
        opt.step()
    assert torch.equal(a[0], b[0])


def test_projection_side_rules():
    assert galore.projection_side((8, 3), "std") == "right" and galore.projection_side((3, 8), "std") == "left"
    assert galore.projection_side((8, 3), "reverse_std") == "left"
    assert galore.projection_side((3, 3), "full") == "full"
    with pytest.raises(ValueError, match="projection_side: shape must be 2-D"):
        galore.projection_side((3,), "std")
    with pytest.raises(ValueError, match="project: at least one of P"):
        galore.project(torch.zeros(2, 2), None, None)


@pytest.mark.gpu
def test_parity_on_cuda():
    dev = torch.device("cuda")
    init, grads = torch.randn(64, 96), [torch.randn(64, 96) for _ in range(8)]
    a, b = torch.nn.Parameter(init.clone().to(dev)), torch.nn.Parameter(init.clone().to(dev))
    ref, opt = reference([a], [], lr=0.01), ours([b], [], lr=0.01)
    for g in grads:
        a.grad, b.grad = g.to(dev), g.to(dev)
        ref.step()
        opt.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- LISA ----------------------------------------------------------------------------------------


def tiny(n_layer=4, **kw):
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(n_layer=n_layer, n_embd=16, n_head=2, block_size=8, vocab_size=32, **kw))


def trainable_blocks(model):
    return tuple(i for i, b in enumerate(model.blocks) if all(p.requires_grad for p in b.parameters()))


def one_step(model, opt):
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(x, x)[1]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def test_lisa_freezes_all_but_n_active_blocks():
    model = tiny()
    lisa = LISA(model, n_active=2, interval=3, seed=0)
    assert find_blocks(model) is model.blocks
    assert len(lisa.active) == 2 and trainable_blocks(model) == lisa.active
    frozen = [i for i in range(4) if i not in lisa.active]
    assert all(not p.requires_grad for i in frozen for p in model.blocks[i].parameters())
    for p in (model.tok_emb.weight, model.pos_emb.weight, model.norm_f.weight):
        assert p.requires_grad  # embeddings, (tied) head and final norm always train
    layer = sum(p.numel() for p in model.blocks[0].parameters())
    assert lisa.n_trainable() == model.num_params() - 2 * layer


def test_lisa_resamples_every_interval_and_drops_optimizer_state():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lisa = LISA(model, n_active=1, interval=3, seed=1, optimizer=opt)  # counts opt.step() itself
    schedule = []
    for t in range(12):
        before = {i: [p.detach().clone() for p in b.parameters()] for i, b in enumerate(model.blocks)}
        active = lisa.active
        one_step(model, opt)
        for i, b in enumerate(model.blocks):  # only the active block moved
            moved = any(not torch.equal(p0, p) for p0, p in zip(before[i], b.parameters()))
            assert moved == (i in active)
        schedule.append(active)
        trainable = {id(p) for p in lisa.trainable_parameters()}
        assert all(id(p) in trainable for p in opt.state)  # no state left for frozen parameters
        assert all(p.grad is None for p in lisa.frozen_parameters())
    assert lisa.steps == 12 and lisa.switches == 5  # the first draw + one every 3 steps
    assert [s for t, s in lisa.history] == [schedule[0], schedule[3], schedule[6], schedule[9], lisa.active]
    assert all(schedule[t] == schedule[t - t % 3] for t in range(12))


def test_lisa_is_deterministic_under_a_seed():
    def schedule(seed):
        model = tiny(n_layer=6)
        lisa = LISA(model, n_active=2, interval=1, seed=seed)
        state = torch.get_rng_state()
        out = [lisa.step() for _ in range(30)]
        assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
        return out

    assert schedule(3) == schedule(3)
    assert schedule(3) != schedule(4)


def test_lisa_with_train_and_a_hook():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lisa = LISA(model, 2, 5, optimizer=opt)
    x = torch.randint(0, 32, (4, 8))
    train(model, iter([(x, x)] * 12), 12, optimizer=opt, progress=False)
    assert lisa.steps == 12 and len(lisa.history) == 3
    lisa.detach()
    one_step(model, opt)
    assert lisa.steps == 12


def test_lisa_always_trainable_options_and_tied_weights():
    model = tiny()
    LISA(model, 1, 5, always_trainable=())
    assert not model.tok_emb.weight.requires_grad and not model.norm_f.weight.requires_grad
    model = tiny()
    LISA(model, 1, 5, always_trainable=("head",))  # the head is tied to the embedding: it trains
    assert model.tok_emb.weight.requires_grad and not model.pos_emb.weight.requires_grad
    model = tiny(tie_embeddings=False)
    LISA(model, 1, 5, always_trainable="norms")
    assert model.norm_f.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_lisa_on_a_list_of_layers_and_user_frozen_params():
    model = tiny()
    model.blocks[0].norm1.weight.requires_grad_(False)
    lisa = LISA(list(model.blocks), n_active=4, interval=2)
    assert lisa.active == (0, 1, 2, 3) and not model.blocks[0].norm1.weight.requires_grad
    assert lisa.n_trainable() == sum(p.numel() for b in model.blocks for p in b.parameters()) - 16
    lisa = LISA(model.blocks, n_active=0, interval=2)
    assert lisa.active == () and lisa.n_trainable() == 0


def test_lisa_state_dict_round_trip():
    a = LISA(tiny(n_layer=8), 3, 2, seed=5)
    for _ in range(7):
        a.step()
    saved = copy.deepcopy(a.state_dict())
    model_b = tiny(n_layer=8)
    b = LISA(model_b, 3, 2, seed=99)
    b.load_state_dict(saved)
    assert b.active == a.active and trainable_blocks(model_b) == a.active
    assert [a.step() for _ in range(10)] == [b.step() for _ in range(10)]
    with pytest.raises(ValueError, match="LISA.load_state_dict: active must be 3 block indices"):
        b.load_state_dict({**saved, "active": [0, 1]})


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((2, 0), {}, ValueError, "LISA: interval must be an int >= 1, got 0"),
    ((5, 2), {}, ValueError, r"LISA: n_active must be <= the number of blocks \(4\), got 5"),
    ((-1, 2), {}, ValueError, "LISA: n_active must be an int >= 0"),
    ((1.5, 2), {}, TypeError, "LISA: n_active must be an int"),
    ((1, 2), dict(always_trainable=("embedding",)), ValueError, "LISA: always_trainable must be one of"),
    ((1, 2), dict(seed="0"), TypeError, "LISA: seed must be an int"),
    ((1, 2), dict(optimizer="adam"), TypeError, "LISA: optimizer must be a torch.optim.Optimizer"),
])
def test_lisa_argument_checks(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        LISA(tiny(), *args, **kwargs)


def test_lisa_needs_blocks():
    with pytest.raises(ValueError, match="LISA: model_or_layers must have a ModuleList of blocks"):
        LISA(torch.nn.Linear(3, 3), 1, 1)
    with pytest.raises(TypeError, match="LISA: model_or_layers must be an nn.Module"):
        LISA("model", 1, 1)


@given(n_layer=st.integers(1, 10), data=st.data(), interval=st.integers(1, 5), seed=st.integers(0, 1000))
def test_lisa_property_schedule(n_layer, data, interval, seed):
    n_active = data.draw(st.integers(0, n_layer))
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(n_layer))
    lisa = LISA(blocks, n_active, interval, seed=seed)
    prev = lisa.active
    for t in range(1, 3 * interval + 1):
        active = lisa.step()
        assert len(set(active)) == n_active and all(0 <= i < n_layer for i in active)
        assert tuple(i for i, b in enumerate(blocks) if b.weight.requires_grad) == active
        if t % interval:
            assert active == prev
        prev = active
    assert lisa.switches == 1 + 3


# --- exercises -----------------------------------------------------------------------------------


EXERCISES = ["galore-lisa.project_gradient", "galore-lisa.state_bytes", "galore-lisa.lisa_memory",
             "galore-lisa.training_bytes"]


def test_exercises_are_registered():
    from labkit.exercises import exercises_for

    assert sorted(exercises_for("06-galore-lisa")) == sorted(EXERCISES)


@pytest.mark.parametrize("name", EXERCISES)
def test_reference_passes_its_own_check(name, capsys):
    from labkit.exercises import lookup

    assert labkit.check(name, lookup(name).reference, quiet=True)


def test_wrong_answers_fail():
    from labkit.exercises import ExerciseFailed

    def always_left(grad, old_grad, rank):  # ignores the std rule's choice of side
        U, _, _ = torch.linalg.svd(old_grad, full_matrices=False)
        P = U[:, :rank]
        back = P @ P.T @ grad
        return back, (back.norm() / grad.norm()).item()

    def no_projector(m, n, rank, bytes_per_value):
        r = min(rank, m, n)
        return 2 * m * n * bytes_per_value, 2 * r * max(m, n) * bytes_per_value

    def lisa_forgets_the_rest(n_layer, layer_params, other_params, n_active, grad_bytes, state_bytes):
        per = grad_bytes + 2 * state_bytes
        return (n_layer * layer_params + other_params) * per, n_active * layer_params * per

    def no_master(n_params, weight_bytes, grad_bytes, state_bytes, n_states, master_weights):
        return {"weights": n_params * weight_bytes, "master": 0, "grads": n_params * grad_bytes,
                "optimizer": n_params * n_states * state_bytes}

    for name, fn in zip(EXERCISES, (always_left, no_projector, lisa_forgets_the_rest, no_master)):
        with pytest.raises(ExerciseFailed):
            labkit.check(name, fn, quiet=True)


def test_not_attempted_does_not_raise():
    def todo(**kw):
        raise NotImplementedError

    assert labkit.check("galore-lisa.state_bytes", todo, quiet=True).status == "not attempted"


# --- figures and benchmark --------------------------------------------------------------------------


def test_memory_breakdown_figure():
    import plotly.graph_objects as go

    from labkit.viz.memory import memory_breakdown, memory_breakdown_figure

    fig = memory_breakdown_figure("7B", rank=1024, update_proj_gap=200, lisa_layers=2)
    assert isinstance(fig, go.Figure) and "cuts the optimizer states by 65" in fig.layout.title.text
    b = memory_breakdown("60M", rank=4096, lisa_layers=99)  # rank and LISA layers beyond the model: clamped
    assert b["LISA 8 blocks"].total == pytest.approx(b["AdamW (bf16)"].total)


def test_other_figures():
    from labkit.viz import memory as vm

    assert len(vm.captured_fraction_figure({"w": [1.0, 0.9, 0.8, 1.0]}, 2).layout.shapes) == 2
    assert vm.cumulative_energy_figure({"g": [3.0, 1.0, 0.0]}, rank=1).data[0].y[0] == pytest.approx(0.9)
    fig = vm.lisa_schedule_figure([(0, (1,)), (3, (0,))], n_layers=2, steps=5)
    assert [list(row) for row in fig.data[0].z] == [[0, 0, 0, 1, 1], [1, 1, 1, 0, 0]]
    assert len(vm.state_bytes_figure([{"name": "x", "predicted": 10, "measured": 10}]).data) == 2
    with pytest.raises(ValueError, match="state_bytes_figure: row 0 lacks"):
        vm.state_bytes_figure([{"name": "x"}])


def test_benchmark_runs_a_tiny_setup(monkeypatch):
    from labkit.benchmarks import galore_lisa as gb

    s = gb.Setup(n_layer=2, n_embd=16, n_head=2, block_size=16, batch_size=4, steps=6, warmup=1, lr=3e-3,
                 galore_lr=1e-2, rank=4, update_proj_gap=3, scale=0.25, lisa_active=1, lisa_interval=2)
    monkeypatch.setattr(gb, "setup", lambda quick=False: s)
    rows = gb.run(quick=True)
    assert [r["name"] for r in rows] == list(gb.METHODS)
    adam, gal, lisa = rows
    assert adam["ratio"] == 1.0 and all(r["baseline_ms"] == adam["median_ms"] for r in rows)
    assert gal["state_bytes"] < adam["state_bytes"] and lisa["state_bytes"] < adam["state_bytes"]
    assert lisa["trainable_params"] < adam["trainable_params"]
    assert all(len(r["losses"]) == 6 and math.isfinite(r["val_loss"]) for r in rows)
    with pytest.raises(ValueError, match="build: method must be one of"):
        gb.build("SGD", torch.nn.Linear(2, 2), s)
