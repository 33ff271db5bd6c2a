"""LISA: train a few randomly sampled transformer blocks at a time, re-sampled every K steps.

R. Pan, X. Liu, S. Diao, R. Pi, J. Zhang, C. Han, T. Zhang. "LISA: Layerwise Importance
Sampling for Memory-Efficient Large Language Model Fine-Tuning." NeurIPS 2024, arXiv:2403.17919.
(Reference implementation: LMFlow's DynamicLayerActivationCallback.)

The observation behind it: in LoRA fine-tuning the weight-norm changes are very skewed across
layers; the embedding and the output head change far more than the blocks in between. LISA
therefore always trains the embedding and the head, and of the N_L blocks in between trains
only gamma at a time, chosen uniformly at random (probability gamma / N_L each) and re-drawn
every K steps:

    for i in 0 .. T/K - 1:
        freeze every block (requires_grad = False)
        sample gamma of the N_L blocks without replacement; unfreeze them
        run the optimizer (AdamW) for K steps

Only the active parameters get gradients, so gradients and optimizer state exist for
embedding + head + gamma blocks instead of the whole model: for LLaMA-2-7B with gamma = 2 that
is about 10% of the parameters. When a block is frozen its optimizer state is dropped (a
block that comes back later starts with fresh moments), which is what frees the memory; the
weights themselves, and the activations the backward pass needs to reach the lowest active
block, stay.

Usage: build the optimizer over all parameters and attach it; LISA then counts the optimizer's
steps itself (a step post-hook) and re-samples every `interval` of them:

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lisa = LISA(model, n_active=2, interval=20, seed=0, optimizer=opt)
    labkit.models.train(model, batches, steps, optimizer=opt)      # or any loop calling opt.step()

Without an attached optimizer (or with `attach(opt, hook=False)`), call `lisa.step()` after
every optimizer step, like an LR scheduler.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from labkit import _checks

CATEGORIES = ("embeddings", "head", "norms", "other")
_NAME = "LISA"
_LAYER_ATTRS = ("blocks", "layers", "h", "model.layers", "transformer.h", "gpt_neox.layers")


# --------------------------------------------------------------------------- finding the blocks


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: TinyGPT's `blocks`, or `layers`, `h`, `model.layers`, ..."""
    for path in _LAYER_ATTRS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"LISA: model_or_layers must have a ModuleList of blocks at one of {_LAYER_ATTRS} "
                     f"(or be a list of blocks), got a {type(model).__name__} without one")


def category(module: nn.Module) -> str:
    """What a module outside the blocks is, for `always_trainable`: embeddings, head, norms or other."""
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, nn.Linear):
        return "head"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "norm" in type(module).__name__.lower():
        return "norms"
    return "other"


# --------------------------------------------------------------------------- the sampler


class LISA:
    """Keep `n_active` of the model's blocks trainable, re-sampled every `interval` steps.

    model_or_layers: a model with a list of blocks (see `find_blocks`), or the blocks themselves
    (then only they are managed). always_trainable: which parameters outside the blocks keep
    training, among CATEGORIES; the others are frozen for good. seed: the sampler's own RNG
    (torch's and Python's global RNGs are not touched). optimizer: whose state is dropped for
    frozen parameters (or `attach` one later). Parameters that were already frozen when LISA
    was built are left alone.
    """

    def __init__(self, model_or_layers: nn.Module | Sequence[nn.Module], n_active: int, interval: int, *,
                 always_trainable: Iterable[str] = ("embeddings", "head", "norms"), seed: int = 0,
                 optimizer: torch.optim.Optimizer | None = None):
        if isinstance(model_or_layers, nn.ModuleList) or (
                isinstance(model_or_layers, (list, tuple)) and model_or_layers
                and all(isinstance(m, nn.Module) for m in model_or_layers)):
            model, blocks = None, list(model_or_layers)
        elif isinstance(model_or_layers, nn.Module):
            model, blocks = model_or_layers, list(find_blocks(model_or_layers))
        else:
            raise TypeError(f"LISA: model_or_layers must be an nn.Module or a non-empty list of blocks, "
                            f"got {type(model_or_layers).__name__}")
        if not blocks:
            raise ValueError("LISA: model_or_layers must hold at least one block, got none")
        self.n_active = _checks.integer(_NAME, "n_active", n_active, low=0)
        if self.n_active > len(blocks):
            raise ValueError(f"LISA: n_active must be <= the number of blocks ({len(blocks)}), got {n_active}")
        self.interval = _checks.integer(_NAME, "interval", interval, low=1)
        if isinstance(always_trainable, str):
            always_trainable = (always_trainable,)
        self.always_trainable = tuple(_checks.choice(_NAME, "always_trainable", c, CATEGORIES)
                                      for c in always_trainable)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"LISA: seed must be an int, got {type(seed).__name__} {seed!r}")

        # Which parameters LISA switches: those trainable now (the user's frozen ones stay frozen).
        self.layer_params: list[list[nn.Parameter]] = [
            [p for p in block.parameters() if p.requires_grad] for block in blocks]
        in_blocks = {id(p) for params in self.layer_params for p in params}
        self.always: list[nn.Parameter] = []
        self.never: list[nn.Parameter] = []
        if model is not None:
            cats: dict[int, set[str]] = {}
            params: dict[int, nn.Parameter] = {}
            block_ids = {id(b) for b in blocks}
            for module in _modules_outside(model, block_ids):
                for p in module.parameters(recurse=False):
                    if p.requires_grad and id(p) not in in_blocks:
                        cats.setdefault(id(p), set()).add(category(module))  # a tied weight has two
                        params[id(p)] = p
            for pid, p in params.items():
                (self.always if cats[pid] & set(self.always_trainable) else self.never).append(p)

        self.optimizer = None
        self._hook = None
        self.seed = seed
        self._rng = random.Random(seed)
        self.steps = 0
        self.switches = 0
        self.active: tuple[int, ...] = ()
        self.history: list[tuple[int, tuple[int, ...]]] = []  # (step, active blocks) at every re-sampling
        if optimizer is not None:
            self.attach(optimizer)
        for p in self.never:
            self._freeze(p)
        self.resample()

    # -- the schedule -----------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layer_params)

    def attach(self, optimizer: torch.optim.Optimizer, *, hook: bool = True) -> LISA:
        """Drop `optimizer`'s state for the parameters LISA freezes; with hook, call `self.step()`
        after every `optimizer.step()` (a step post-hook), so a plain training loop drives LISA."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"LISA: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(hook, bool):
            raise TypeError(f"LISA: hook must be a bool, got {type(hook).__name__} {hook!r}")
        self.detach()
        self.optimizer = optimizer
        if hook:
            self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        if self.active or self.switches:
            for p in self.frozen_parameters():
                optimizer.state.pop(p, None)
        return self

    def detach(self) -> None:
        """Forget the attached optimizer (and remove its step hook)."""
        if self._hook is not None:
            self._hook.remove()
        self.optimizer, self._hook = None, None

    def resample(self) -> tuple[int, ...]:
        """Draw a new set of active blocks now; freeze the rest and drop their optimizer state."""
        self._activate(tuple(sorted(self._rng.sample(range(self.n_layers), self.n_active))))
        self.switches += 1
        self.history.append((self.steps, self.active))
        return self.active

    def step(self) -> tuple[int, ...]:
        """Count one training step; every `interval` steps, re-sample. Returns the active blocks."""
        self.steps += 1
        if self.steps % self.interval == 0:
            self.resample()
        return self.active

    def _activate(self, active: tuple[int, ...]) -> None:
        """Make exactly the blocks in `active` trainable; freeze the others (dropping their state)."""
        for i, params in enumerate(self.layer_params):
            for p in params:
                if i in active:
                    p.requires_grad_(True)
                else:
                    self._freeze(p)
        self.active = active

    def _freeze(self, p: nn.Parameter) -> None:
        p.requires_grad_(False)
        p.grad = None
        if self.optimizer is not None:
            self.optimizer.state.pop(p, None)  # AdamW's moments of a frozen block: gone

    # -- what is trainable ------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train now: always-trainable ones + the active blocks'."""
        return self.always + [p for i in self.active for p in self.layer_params[i]]

    def frozen_parameters(self) -> list[nn.Parameter]:
        active = set(self.active)
        return self.never + [p for i, ps in enumerate(self.layer_params) if i not in active for p in ps]

    def n_trainable(self) -> int:
        """Number of trainable scalars now (a tied weight counted once)."""
        return sum(p.numel() for p in self.trainable_parameters())

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"steps": self.steps, "switches": self.switches, "active": list(self.active),
                "rng": self._rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule (and re-apply its active set to the model)."""
        missing = {"steps", "switches", "active", "rng"} - set(state)
        if missing:
            raise ValueError(f"LISA.load_state_dict: state is missing {sorted(missing)}")
        active = tuple(int(i) for i in state["active"])
        if len(active) != self.n_active or any(not 0 <= i < self.n_layers for i in active):
            raise ValueError(f"LISA.load_state_dict: active must be {self.n_active} block indices in "
                             f"[0, {self.n_layers}), got {list(state['active'])}")
        self.steps, self.switches = int(state["steps"]), int(state["switches"])
        rng = state["rng"]
        self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))  # a JSON round trip turns tuples to lists
        self._activate(active)

    def __repr__(self) -> str:
        return (f"LISA(n_active={self.n_active}/{self.n_layers}, interval={self.interval}, "
                f"active={list(self.active)}, step={self.steps})")


def _modules_outside(model: nn.Module, block_ids: set[int]) -> list[nn.Module]:
    """Modules of `model` that are not a block and not inside one."""
    out = []

    def walk(module: nn.Module) -> None:
        if id(module) in block_ids:
            return
        out.append(module)
        for child in module.children():
            walk(child)

    walk(model)
    return out


__all__ = ["CATEGORIES", "LISA", "category", "find_blocks"]
