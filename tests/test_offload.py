"""Tests of labkit.parallel.offload (chapter 12-zero): ZeRO-Infinity-style training with parameters and
optimizer states in CPU memory or in files, against the same model trained in memory; the thread-pool file
I/O; the prefetch schedule; the bandwidth-centric analysis; input checks."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from labkit.models import GPTConfig, TinyGPT
from labkit.parallel import offload as off
from labkit.parallel import zero as z

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = dict(vocab_size=29, block_size=12, n_layer=2, n_embd=24, n_head=2, tie_embeddings=False)


def make_model(seed: int = 0, **kw) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(**{**CFG, **kw}))


def batches(steps: int, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    V, T = CFG["vocab_size"], CFG["block_size"]
    return [(torch.randint(0, V, (batch, T), generator=g), torch.randint(0, V, (batch, T), generator=g))
            for _ in range(steps)]


def in_memory(data, make_opt):
    """The plain run: TinyGPT's own forward, loss.backward(), one optimizer over all parameters."""
    m = make_model()
    opt = make_opt(m.parameters())
    losses, params = [], []
    for x, y in data:
        loss = m(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        params.append({n: p.detach().clone() for n, p in m.named_parameters()})
    return losses, params


# --- parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("param_tier,optimizer_tier,prefetch", [
    ("gpu", "gpu", True),  # nothing offloaded: the layer-by-layer engine alone
    ("gpu", "cpu", False),  # ZeRO-Offload: states on the CPU
    ("cpu", "cpu", True),
    ("nvme", "cpu", True),
    ("cpu", "nvme", False),
    ("nvme", "nvme", True),  # ZeRO-Infinity: everything in files
])
def test_offloaded_training_matches_in_memory_every_step(param_tier, optimizer_tier, prefetch, tmp_path):
    data = batches(6)
    losses, params = in_memory(data, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
    with off.OffloadedModel(**off.tinygpt_layers(make_model()), param_tier=param_tier, optimizer_tier=optimizer_tier,
                            prefetch=prefetch, directory=tmp_path, chunk_bytes=4096, io_threads=3,
                            evict_files=param_tier == "nvme", lr=1e-2, weight_decay=0.1) as om:
        for step, (x, y) in enumerate(data):
            loss = om.step(x, y)
            torch.testing.assert_close(loss, losses[step], rtol=1.3e-6, atol=1e-5)
            got = om.full_parameters()
            assert set(got) == set(params[step])
            for name, p in params[step].items():
                torch.testing.assert_close(got[name], p, msg=lambda m: f"step {step}, {name}: {m}")
        if "nvme" in (param_tier, optimizer_tier):
            assert om.io.bytes_read > 0 and om.io.bytes_written > 0
    assert not any(tmp_path.iterdir())  # close() removed the files


def test_other_optimizers_and_models_work_too():
    data = batches(4)
    make = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)  # noqa: E731
    torch.manual_seed(0)
    ref = TinyGPT(GPTConfig(**{**CFG, "norm": "rmsnorm", "mlp": "swiglu", "rope": True}))
    model = copy.deepcopy(ref)
    opt = make(ref.parameters())
    with off.OffloadedModel(**off.tinygpt_layers(model), optimizer_cls=torch.optim.SGD, param_tier="nvme",
                            optimizer_tier="nvme", lr=0.1, momentum=0.9, nesterov=True) as om:
        for x, y in data:
            loss = ref(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert om.step(x, y) == pytest.approx(loss.item(), rel=1e-6)
        got = om.full_parameters()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(got[name], p.detach())
        usage = om.tier_usage()
        n = ref.num_params()
        assert usage == {"gpu": 0, "cpu": 0, "nvme": 2 * 4 * n}  # parameters + one momentum buffer, fp32


def test_a_plain_stack_of_layers():
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), nn.Sequential(nn.Tanh(), nn.Linear(8, 8)), nn.Linear(8, 3)]
    ref = nn.Sequential(*copy.deepcopy(layers))
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    with off.OffloadedModel(layers, nn.functional.mse_loss, torch.optim.Adam, param_tier="cpu",
                            optimizer_tier="nvme", lr=1e-2) as om:
        for _ in range(3):
            loss = nn.functional.mse_loss(ref(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert om.step(x, y) == pytest.approx(loss.item(), rel=1e-6)
        got = om.full_parameters()
    assert list(got) == ["0.weight", "0.bias", "1.1.weight", "1.1.bias", "2.weight", "2.bias"]
    for (name, p) in ref.named_parameters():
        torch.testing.assert_close(got[name], p.detach())


# --- what lives where; the schedule --------------------------------------------------------------


@pytest.mark.parametrize("param_tier", ["gpu", "cpu", "nvme"])
def test_only_the_working_set_is_on_the_device(param_tier):
    model = make_model(n_layer=4)
    layers = off.tinygpt_layers(model)
    sizes = [sum(p.numel() for p in m.parameters()) * 4 for m in layers["layers"]]
    with off.OffloadedModel(**layers, param_tier=param_tier, optimizer_tier="cpu", lr=1e-3) as om:
        om.step(*batches(1)[0])
        if param_tier == "gpu":
            assert om.peak_resident_bytes == sum(sizes)
        else:  # the layer computing and the one prefetched
            assert max(sizes) <= om.peak_resident_bytes <= sum(sorted(sizes)[-2:]) < sum(sizes)
            assert om.resident_bytes == 0  # nothing left on the device after the step
        expected = {"gpu": 0, "cpu": 2 * sum(sizes), "nvme": 0}  # Adam's two moments on the CPU
        expected[param_tier] += sum(sizes)
        assert om.tier_usage() == expected


def test_the_original_parameters_are_freed():
    """The engine keeps the parameters on their tier only: the model's own tensors are not held on to."""
    model = make_model()
    originals = [weakref.ref(p) for p in model.parameters()]
    with off.OffloadedModel(**off.tinygpt_layers(model), param_tier="nvme", optimizer_tier="cpu", lr=1e-3) as om:
        del model
        gc.collect()
        assert not [r for r in originals if r() is not None]
        assert om.tier_usage()["cpu"] == 0  # no optimizer state before the first step


def _order(timeline, kind):
    return [s["label"] for s in sorted(timeline, key=lambda s: s["start"]) if s["kind"] == kind]


@pytest.mark.parametrize("prefetch", [True, False])
def test_prefetch_fetches_the_next_layer_before_the_current_one_computes(prefetch):
    n = 3
    with off.OffloadedModel(**off.tinygpt_layers(make_model(n_layer=n)), param_tier="nvme", optimizer_tier="cpu",
                            prefetch=prefetch, lr=1e-3) as om:
        om.step(*batches(1)[0])
        assert om.schedule[:4] == (["fetch L0", "fetch L1", "F0", "fetch L2"] if prefetch else
                                   ["fetch L0", "F0", "fetch L1", "F1"])
        total = n + 2
        # every layer fetched once forward and once backward (the last one stays), in order
        fetched = [e for e in om.schedule if e.startswith("fetch")]
        assert fetched == [f"fetch L{i}" for i in range(total)] + [f"fetch L{i}" for i in reversed(range(total - 1))]
        assert _order(om.timeline, "forward") == [f"F{i}" for i in range(total)]
        assert _order(om.timeline, "backward") == [f"B{i}" for i in reversed(range(total))]
        assert _order(om.timeline, "optimizer") == [f"L{i}" for i in reversed(range(total))]


# --- file I/O ---------------------------------------------------------------------------------


@given(numel=st.integers(0, 3000), chunk=st.integers(48, 4096), threads=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int16]), seed=st.integers(0, 99))
def test_async_io_round_trips_any_tensor(tmp_path_factory, numel, chunk, threads, dtype, seed):
    path = tmp_path_factory.mktemp("io") / "t.bin"
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(numel, generator=g) * 100).to(dtype)
    io = off.AsyncIO(threads, chunk)
    try:
        io.write(path, t).wait()
        assert path.stat().st_size == t.numel() * t.element_size()
        out = torch.empty_like(t)
        handle = io.read(path, out)
        handle.wait()
        assert handle.done() and torch.equal(out, t)
    finally:
        io.close()


def test_async_io_errors(tmp_path):
    io = off.AsyncIO(2, 16)
    try:
        t = torch.arange(10, dtype=torch.int8)
        one_byte = off.AsyncIO(3, 1)  # a request per byte, out of order across threads
        one_byte.write(tmp_path / "bytes.bin", t).wait()
        out = torch.empty_like(t)
        one_byte.read(tmp_path / "bytes.bin", out).wait()
        one_byte.close()
        assert torch.equal(out, t)
        io.write(tmp_path / "short.bin", torch.zeros(4)).wait()
        with pytest.raises(EOFError, match="ended at byte 16, before the buffer was full"):
            io.read(tmp_path / "short.bin", torch.empty(8)).wait()
        with pytest.raises(ValueError, match="tensors must be contiguous CPU tensors"):
            io.write(tmp_path / "x.bin", torch.zeros(4, 4).T)
        with pytest.raises(FileNotFoundError):
            io.read(tmp_path / "missing.bin", torch.empty(4)).wait()
    finally:
        io.close()
    with pytest.raises(ValueError, match="AsyncIO: threads must be an int >= 1, got 0"):
        off.AsyncIO(0)


def test_measure_bandwidth_reads_back_what_it_wrote(tmp_path):
    bw = off.measure_bandwidth(tmp_path, 1 << 16, repeats=1)
    assert {"disk_write", "disk_read", "host_copy"} <= set(bw) and all(v > 0 for v in bw.values())
    assert not any(tmp_path.iterdir())


# --- the bandwidth-centric analysis -------------------------------------------------------------


def test_the_papers_bandwidth_claims():
    """ZeRO-Infinity Sec. 4.2 on a 70 TFLOP/s V100: ~70 GB/s keeps parameters and gradients at 50% even at
    seq x bsz = 1024; optimizer states need 4x that; activation checkpoints (hd = 8K) need under 1 GB/s."""
    peak = 70e12
    params = off.required_bandwidth(off.ait_params_grads(1024, 1), peak, 0.5)
    states = off.required_bandwidth(off.ait_optimizer_states(1024, 1), peak, 0.5)
    acts = off.required_bandwidth(off.ait_activations(8192, 1), peak, 0.5)
    assert 60e9 < params < 75e9 and states == pytest.approx(4 * params) and acts < 1e9
    assert off.ait_activations(8192, 4) == 4 * off.ait_activations(8192, 1)


@given(ait=st.floats(1e-3, 1e6), bw=st.just(0.0) | st.floats(1.0, 1e13), peak=st.floats(1e9, 1e16),
       target=st.floats(0.01, 0.99))  # no subnormal bandwidths: ait x bw would underflow to 0
def test_efficiency_and_required_bandwidth_are_inverse(ait, bw, peak, target):
    e = off.efficiency(ait, bw, peak)
    assert 0 <= e < 1 or (e == pytest.approx(1.0))
    assert e == pytest.approx(1 / (1 + peak / (ait * bw))) if bw > 0 else e == 0
    assert off.efficiency(ait, off.required_bandwidth(ait, peak, target), peak) == pytest.approx(target)
    assert off.effective_bandwidth(bw, 8) == pytest.approx(8 * bw)
    assert off.effective_bandwidth(bw, 8, interconnect=1e9) <= 1e9


@given(psi=st.integers(0, 10**12), n=st.integers(1, 1024), opt_tier=st.sampled_from(off.TIERS),
       param_tier=st.sampled_from(off.TIERS), working=st.integers(0, 10**9))
def test_tier_bytes_moves_the_model_states_and_keeps_the_total(psi, n, opt_tier, param_tier, working):
    usage = off.tier_bytes(psi, n, 3, param_tier=param_tier, optimizer_tier=opt_tier, working_params=working)
    extra = 2 * 2 * working if param_tier != "gpu" else 0
    assert sum(usage.values()) == pytest.approx(z.memory_per_rank(psi, 3, n).total + extra)
    mem = z.memory_per_rank(psi, 3, n)
    assert usage[opt_tier] >= mem.grads + mem.optimizer
    if param_tier == opt_tier == "nvme":
        assert usage["gpu"] == extra and usage["cpu"] == 0
    assert off.fits(usage, {t: float("inf") for t in off.TIERS})


def test_tier_bandwidth_is_bandwidth_centric():
    """What one GPU of an 8-GPU node sees: parameters from HBM, over NVLink at stage 3, or N links' worth
    from an offload tier (capped by NVLink); optimizer states N links' worth from stage 1 on."""
    tiers, n = off.NODE_TIERS, 8
    assert off.tier_bandwidth("gpu", n, 2, for_params=True) == tiers["gpu"].bandwidth
    assert off.tier_bandwidth("gpu", n, 3, for_params=True) == off.NVLINK_BANDWIDTH
    assert off.tier_bandwidth("nvme", n, 3, for_params=True) == n * tiers["nvme"].bandwidth
    assert off.tier_bandwidth("cpu", 64, 3, for_params=True) == off.NVLINK_BANDWIDTH
    assert off.tier_bandwidth("cpu", n, 0, for_params=False) == tiers["cpu"].bandwidth
    assert off.tier_bandwidth("cpu", n, 1, for_params=False) == n * tiers["cpu"].bandwidth


def test_which_tier_can_hold_a_trillion_parameters():
    """1T parameters (16 TB of model states) on one 8-GPU node: not in GPU memory, not in host memory,
    on NVMe yes (ZeRO-Infinity's single-node trillion-parameter claim)."""
    cap = {t: tier.capacity for t, tier in off.NODE_TIERS.items()}
    on = {tier: off.tier_bytes(10**12, 8, 3, param_tier=tier, optimizer_tier=tier) for tier in off.TIERS}
    assert not off.fits(on["gpu"], cap) and not off.fits(on["cpu"], cap) and off.fits(on["nvme"], cap)
    with pytest.raises(ValueError, match="param_tier='cpu' needs stage 3"):
        off.tier_bytes(10**9, 8, 2, param_tier="cpu")


# --- input checks --------------------------------------------------------------------------


def test_input_checks(tmp_path):
    with pytest.raises(ValueError, match="tinygpt_layers: model must have tie_embeddings=False"):
        off.tinygpt_layers(make_model(tie_embeddings=True))
    with pytest.raises(TypeError, match="tinygpt_layers: model must be a TinyGPT"):
        off.tinygpt_layers(nn.Linear(2, 2))
    layers = off.tinygpt_layers(make_model())
    with pytest.raises(ValueError, match=r"OffloadedModel: param_tier must be one of \('gpu', 'cpu', 'nvme'\)"):
        off.OffloadedModel(**layers, param_tier="ssd")
    with pytest.raises(TypeError, match="OffloadedModel: prefetch must be a bool"):
        off.OffloadedModel(**layers, prefetch=1)
    with pytest.raises(TypeError, match="optimizer_cls must be a torch.optim.Optimizer subclass"):
        off.OffloadedModel(**layers, optimizer_cls="adam")
    with pytest.raises(ValueError, match="layer 0 has dropout p=0.1"):
        off.OffloadedModel(**off.tinygpt_layers(make_model(dropout=0.1)))
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="a parameter is shared by layers 0 and 1"):
        off.OffloadedModel([shared, nn.Sequential(shared)], nn.functional.mse_loss)
    with pytest.raises(ValueError, match=r"prefixes must have one entry per layer \(2\), got 1"):
        off.OffloadedModel([nn.Linear(2, 2), nn.Linear(2, 2)], nn.functional.mse_loss, prefixes=["a."])
    with pytest.raises(ValueError, match="layer 0 has no parameters"):
        off.OffloadedModel([nn.Tanh()], nn.functional.mse_loss)
    with pytest.raises(ValueError, match=r"efficiency: peak_flops must be in \(0, inf\)"):
        off.efficiency(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"required_bandwidth: target must be in \[0, 1\)"):
        off.required_bandwidth(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="ait_params_grads: seq must be an int >= 1, got 0"):
        off.ait_params_grads(0, 1)
    with pytest.raises(ValueError, match="tier_bandwidth: tier must be one of"):
        off.tier_bandwidth("ssd", 8, 3, for_params=True)
    with pytest.raises(ValueError, match="tier_bandwidth: stage must be one of"):
        off.tier_bandwidth("cpu", 8, 4, for_params=True)


# --- on a GPU: pinned host buffers, a copy stream, the optimizer on either side ----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("param_tier,optimizer_tier", [("cpu", "cpu"), ("nvme", "nvme"), ("nvme", "gpu"),
                                                       ("gpu", "cpu")])
def test_offloaded_training_on_a_gpu_matches_in_memory(param_tier, optimizer_tier):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(64, 256), nn.GELU()), nn.Sequential(nn.Linear(256, 256), nn.GELU()),
              nn.Linear(256, 8)]
    ref = nn.Sequential(*copy.deepcopy(layers)).cuda()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 64, generator=g), torch.randn(32, 8, generator=g)) for _ in range(5)]
    with off.OffloadedModel(layers, nn.functional.mse_loss, param_tier=param_tier, optimizer_tier=optimizer_tier,
                            device="cuda", lr=1e-3) as om:
        for x, y in data:
            loss = nn.functional.mse_loss(ref(x.cuda()), y.cuda())
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert om.step(x, y) == pytest.approx(loss.item(), rel=1e-5)
        got = om.full_parameters()
        assert om.resident_bytes == 0 or param_tier == "gpu"
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.detach().cpu(), rtol=1e-4, atol=1e-6)
    if param_tier != "gpu":
        assert got and all(s["end"] >= s["start"] for s in om.timeline)


@pytest.mark.gpu
def test_measure_bandwidth_on_a_gpu_includes_host_device_copies():
    bw = off.measure_bandwidth(nbytes=1 << 24, repeats=1)
    assert bw["h2d"] > 0 and bw["d2h"] > 0
