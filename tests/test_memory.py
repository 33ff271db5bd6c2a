"""Tests of labkit.optim.memory: optimizer-state formulas against the state optimizers really allocate,
and the 7B accounting on paper."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from labkit.models import GPTConfig, TinyGPT
from labkit.optim import memory as mem


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)


def tinygpt(**kw):
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=8, vocab_size=40, **kw))


def one_step(model, opt):
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    opt.zero_grad(set_to_none=True)
    model(x, x)[1].backward()
    opt.step()


def labkit_class(module: str, name: str):
    try:
        return getattr(importlib.import_module(f"labkit.optim.{module}"), name)
    except (ImportError, AttributeError):
        return None


def _factories():
    """(id, factory(model) -> optimizer) for every optimizer class with a formula that exists now."""
    out = [
        ("torch.SGD(momentum)", lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)),
        ("torch.SGD(no momentum)", lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
        ("torch.AdamW", lambda m: torch.optim.AdamW(m.parameters())),
        ("torch.Adam(amsgrad)", lambda m: torch.optim.Adam(m.parameters(), amsgrad=True)),
        ("torch.Adafactor", lambda m: torch.optim.Adafactor(m.parameters())),
    ]
    if hasattr(torch.optim, "Muon"):
        out.append(("torch.Muon", lambda m: torch.optim.Muon([p for p in m.parameters() if p.dim() == 2])))
    AdamW = labkit_class("adamw", "AdamW")
    if AdamW is not None:
        out += [("labkit.AdamW", lambda m: AdamW(m.parameters())),
                ("labkit.AdamW(bf16 states)", lambda m: AdamW(m.parameters(), state_dtype=torch.bfloat16))]
    for module, name in (("lion", "Lion"), ("tiger", "Tiger")):
        cls = labkit_class(module, name)
        if cls is not None:
            out.append((f"labkit.{name}", lambda m, cls=cls: cls(m.parameters())))
    Muon, MuonWithAdamW = labkit_class("muon", "Muon"), labkit_class("muon", "MuonWithAdamW")
    if Muon is not None:
        out.append(("labkit.Muon", lambda m: Muon([p for p in m.parameters() if p.dim() == 2])))
    if MuonWithAdamW is not None:
        out.append(("labkit.MuonWithAdamW", lambda m: MuonWithAdamW.from_model(m)))
    from labkit.optim.galore import GaLoreAdamW, galore_param_groups

    for proj_type in ("std", "reverse_std", "left", "right", "full"):
        out.append((f"labkit.GaLoreAdamW({proj_type})", lambda m, pt=proj_type: GaLoreAdamW(
            galore_param_groups(m, rank=4, proj_type=pt), rank=None, update_proj_gap=10, scale=0.25)))
    out.append(("labkit.GaLoreAdamW(all 2-D, rank > dims)",
                lambda m: GaLoreAdamW(m.parameters(), rank=64, update_proj_gap=10, scale=0.25)))
    return out


FACTORIES = _factories()


@pytest.mark.parametrize("factory", [f for _, f in FACTORIES], ids=[i for i, _ in FACTORIES])
def test_formula_matches_the_allocated_state(factory):
    model = tinygpt()
    opt = factory(model)
    assert mem.state_bytes(opt) == 0
    one_step(model, opt)
    assert mem.state_bytes(opt) == mem.predicted_state_bytes(opt)


def test_every_part_ii_optimizer_has_a_formula():
    """The Part II optimizers of labkit.optim that exist are all covered above."""
    ids = " ".join(i for i, _ in FACTORIES)
    for module, name in (("adamw", "AdamW"), ("lion", "Lion"), ("tiger", "Tiger"), ("muon", "Muon"),
                         ("galore", "GaLoreAdamW")):
        if labkit_class(module, name) is not None:
            assert f"labkit.{name}" in ids


@given(m=st.integers(0, 40), n=st.integers(0, 40), rank=st.integers(1, 48),
       proj_type=st.sampled_from(mem.PROJ_TYPES), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_galore_formula_property(m, n, rank, proj_type, dtype):
    from labkit.optim.galore import GaLoreAdamW

    p = torch.nn.Parameter(torch.randn(m, n, dtype=dtype))
    opt = GaLoreAdamW([p], rank=rank, update_proj_gap=3, scale=1.0, proj_type=proj_type)
    p.grad = torch.randn(m, n, dtype=dtype)
    opt.step()
    assert mem.state_bytes(opt) == mem.predicted_state_bytes(opt)
    expected = 2 * m * n if m * n == 0 else mem.galore_state_numel(m, n, rank, proj_type)
    assert mem.state_bytes(opt) == expected * p.element_size()


@given(shape=st.lists(st.integers(0, 6), min_size=1, max_size=4))
def test_elementwise_and_adafactor_formulas_property(shape):
    p = torch.nn.Parameter(torch.randn(shape))
    optimizers = [(torch.optim.AdamW([p]), "adamw"), (torch.optim.SGD([p], lr=0.1, momentum=0.5), "sgd")]
    if p.numel():  # torch's Adafactor divides by numel
        optimizers.append((torch.optim.Adafactor([p]), "adafactor"))
    for opt, kind in optimizers:
        p.grad = torch.randn(shape)
        opt.step()
        assert mem.state_bytes(opt) == mem.param_state_bytes(shape, kind)


def test_galore_state_numel_by_hand():
    assert mem.galore_state_numel(4096, 4096, 1024) == 1024 * 4096 * 3
    assert mem.galore_state_numel(4096, 11008, 1024) == 4096 * 1024 + 2 * 1024 * 11008  # P on the short side
    assert mem.galore_state_numel(11008, 4096, 1024) == 1024 * 4096 + 2 * 11008 * 1024
    assert mem.galore_state_numel(4096, 11008, 1024, "reverse_std") == 11008 * 1024 + 2 * 4096 * 1024
    assert mem.galore_state_numel(10, 20, 50, "full") == 10 * 10 + 10 * 20 + 2 * 10 * 10  # r = min(m, n)
    assert mem.state_numel((3, 4), "muon") == 12 and mem.state_numel((4,), "muon") == 8  # AdamW for vectors
    assert mem.state_numel((2, 3, 5), "adafactor") == 2 * 3 + 2 * 5
    assert mem.state_numel((7,), "sgd", momentum=False) == 0
    assert mem.bytes_per_param("adamw") == 8 and mem.bytes_per_param("lion", state_dtype="bf16") == 2
    assert mem.bytes_per_param("adamw", state_dtype="8bit") == pytest.approx(2 * (1 + 4 / 2048))


def test_bytes_per_value():
    assert mem.bytes_per_value(torch.bfloat16) == 2 and mem.bytes_per_value("torch.float32") == 4
    assert mem.bytes_per_value("fp8") == 1 and mem.bytes_per_value(0.5) == 0.5
    with pytest.raises(ValueError, match="bytes_per_value: dtype must be a torch.dtype, a number or one of"):
        mem.bytes_per_value("fp12")
    with pytest.raises(TypeError, match="bytes_per_value: dtype must be"):
        mem.bytes_per_value(None)


def test_state_bytes_counts_storages_once_and_skips_scalars():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn(4, 4)
    opt.step()
    assert mem.state_bytes(opt) == 2 * 16 * 4
    assert mem.state_bytes(opt, include_scalars=True) == 2 * 16 * 4 + 4  # the float32 step counter
    big = torch.zeros(100)
    opt.state[p]["view"] = big[:10]  # a view keeps its whole storage alive
    opt.state[p]["again"] = big[10:20]
    assert mem.state_bytes(opt) == 2 * 16 * 4 + 400
    with pytest.raises(TypeError, match="state_bytes: optimizer must be a torch.optim.Optimizer"):
        mem.state_bytes("adam")


def test_grad_bytes_counts_the_gradients_held_now():
    a, b = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = torch.optim.SGD([a, b], lr=0.1)
    assert mem.grad_bytes(opt) == 0  # no gradient yet
    a.grad = torch.ones(4, 3)
    assert mem.grad_bytes(opt) == 4 * 3 * 4
    b.grad = torch.ones(5, dtype=torch.float64)
    assert mem.grad_bytes(opt) == 4 * 3 * 4 + 5 * 8
    opt.zero_grad(set_to_none=True)
    assert mem.grad_bytes(opt) == 0
    with pytest.raises(TypeError, match="grad_bytes: optimizer must be a torch.optim.Optimizer"):
        mem.grad_bytes([a, b])


def test_predicted_state_bytes_unknown_class():
    class Mine(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    with pytest.raises(ValueError, match="predicted_state_bytes: no formula for optimizer class Mine"):
        mem.predicted_state_bytes(Mine([torch.nn.Parameter(torch.zeros(2))]))


# --- models on paper -------------------------------------------------------------------------------


def test_llama_7b_parameter_count():
    specs = mem.llama_params("7B")
    assert sum(s.numel for s in specs) == 6_738_415_616  # LLaMA(-2)-7B
    assert sum(s.kind == "matrix" for s in specs) == 32 * 7
    assert {s.layer for s in specs if s.kind == "matrix"} == set(range(32))


def test_model_params_of_tinygpt():
    for tie in (True, False):
        model = tinygpt(tie_embeddings=tie)
        specs = mem.model_params(model)
        assert sum(s.numel for s in specs) == model.num_params()
        kinds = {s.name: s.kind for s in specs}
        assert kinds["tok_emb.weight"] == "embedding" and kinds["blocks.0.attn.q_proj.weight"] == "matrix"
        assert kinds["blocks.1.norm2.weight"] == "norm" and kinds["norm_f.weight"] == "norm"
        assert ("lm_head.weight" in kinds) == (not tie) and kinds.get("lm_head.weight", "head") == "head"
    specs = {s.name: s for s in mem.transformer_params(2, 32, vocab_size=40, mlp="gelu", norm="layernorm",
                                                      max_positions=8, tie_embeddings=True)}
    assert sum(s.numel for s in specs.values()) == tinygpt().num_params()  # the same model on paper


def test_7b_accounting_matches_the_papers():
    acts = mem.activation_bytes(32, 4096, 32, seq_len=256, batch=1)
    adam = mem.training_memory("7B", activations=acts)  # GaLore's all-bf16 baseline
    gb = adam.gb()
    assert gb["weights"] == pytest.approx(13.48, abs=0.01) and gb["gradients"] == gb["weights"]
    assert gb["optimizer states"] == pytest.approx(2 * gb["weights"])
    assert 1 < gb["activations"] < 2 and 50 < gb["total"] < 58  # "58 GB: 14 + 42 + 2" in the paper, rounded up
    galore = mem.training_memory("7B", optimizer="galore_adamw", rank=1024)
    assert 1 - galore.optimizer / adam.optimizer == pytest.approx(0.655, abs=0.01)  # "up to 65.5%"
    galore8 = mem.training_memory("7B", optimizer="galore_adamw", rank=1024, state_dtype="8bit",
                                  layerwise_grads=True)
    assert 1 - galore8.optimizer / adam.optimizer == pytest.approx(0.825, abs=0.005)  # "82.5%"
    assert galore8.total + acts < 24e9  # fits an RTX 4090
    mixed = mem.training_memory(6_738_415_616, master_weights=True, state_dtype="fp32")
    assert (mixed.total - mixed.activations) / 6_738_415_616 == 16  # ZeRO's 2 + 2 + 12 bytes
    lisa = mem.training_memory("7B", lisa_layers=2)
    trainable = 2 * 32000 * 4096 + 4096 + 2 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
    assert lisa.grads == trainable * 2 and lisa.optimizer == trainable * 4 and lisa.weights == adam.weights


def test_training_memory_options():
    model = tinygpt()
    full = mem.training_memory(model, weight_dtype="fp32")
    assert full.weights == model.num_params() * 4 and full.optimizer == 2 * full.weights
    muon = mem.training_memory(model, optimizer="muon", weight_dtype="fp32")
    matrices = sum(s.numel for s in mem.model_params(model) if s.kind == "matrix")
    assert muon.optimizer == full.optimizer - matrices * 4
    assert mem.training_memory(model, optimizer="none").optimizer == 0
    with pytest.raises(TypeError, match="training_memory: rank must be an int"):
        mem.training_memory(model, optimizer="galore_adamw")
    with pytest.raises(ValueError, match="training_memory: optimizer must be one of"):
        mem.training_memory(model, optimizer="adam")
    with pytest.raises(TypeError, match="training_memory: params must be a parameter count"):
        mem.training_memory(3.5)
    with pytest.raises(ValueError, match="training_memory: params must be >= 0"):
        mem.training_memory(-1)


def test_activation_bytes_formula():
    assert mem.activation_bytes(1, 64, 4, 16, 2) == 16 * 2 * 64 * (34 + 5 * 4 * 16 / 64)
    assert mem.activation_bytes(2, 64, 4, 16, flash_attention=True) == 2 * 16 * 64 * 34
    with pytest.raises(ValueError, match="activation_bytes: seq_len must be an int >= 1"):
        mem.activation_bytes(1, 64, 4, 0)


def test_svd_overhead_shrinks_with_the_gap():
    a = mem.galore_svd_overhead("7B", 50, 131072)
    b = mem.galore_svd_overhead("7B", 200, 131072)
    assert a == pytest.approx(4 * b) and b < 1e-3
    assert mem.svd_flops(4096, 11008) == mem.svd_flops(11008, 4096) == 6 * 11008 * 4096**2 + 20 * 4096**3


@given(n=st.integers(0, 10**10), opt=st.sampled_from(["sgd", "adamw", "lion", "tiger"]),
       w=st.sampled_from(["fp32", "bf16"]), s=st.sampled_from(["fp32", "bf16", "8bit"]), master=st.booleans())
def test_training_memory_is_linear_in_a_count(n, opt, w, s, master):
    b = mem.training_memory(n, optimizer=opt, weight_dtype=w, state_dtype=s, master_weights=master)
    per = mem.bytes_per_value(w) * 2 + (4 if master else 0) + mem.bytes_per_param(opt, (1,), state_dtype=s)
    assert math.isclose(b.total, n * per, rel_tol=1e-12)
