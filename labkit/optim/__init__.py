"""Optimizers of Part II, each a torch.optim.Optimizer, and the tools the chapters use with them.

    AdamW (+ the epsilon trap)   labkit.optim.adamw       chapter 03
    schedules, Amos-style rules  labkit.optim.schedules   chapter 03
    Lion, Tiger                  labkit.optim.lion/tiger  chapter 04
    Muon                         labkit.optim.muon        chapter 05
    GaLoreAdamW, LISA            labkit.optim.galore/lisa chapter 06
    optimizer-state accounting   labkit.optim.memory      chapter 06
"""

from labkit.optim import memory
from labkit.optim.adamw import AdamW
from labkit.optim.galore import GaLoreAdamW, galore_param_groups
from labkit.optim.lion import Lion
from labkit.optim.lisa import LISA
from labkit.optim.muon import Muon, MuonWithAdamW, newton_schulz, split_muon_params
from labkit.optim.schedules import ConstantWithWarmup, InverseTime, WarmupCosine, WarmupStableDecay, lambda_lr
from labkit.optim.tiger import Tiger

__all__ = [
    "AdamW", "ConstantWithWarmup", "GaLoreAdamW", "InverseTime", "LISA", "Lion", "Muon", "MuonWithAdamW", "Tiger",
    "WarmupCosine", "WarmupStableDecay", "galore_param_groups", "lambda_lr", "memory", "newton_schulz",
    "split_muon_params",
]
