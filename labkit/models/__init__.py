"""Small models shared by the chapters: a configurable TinyGPT and a minimal training loop."""

from labkit.models.gpt import MLP, Block, CausalSelfAttention, GPTConfig, RMSNorm, TinyGPT
from labkit.models.train import TrainLog, evaluate, train

__all__ = [
    "GPTConfig",
    "TinyGPT",
    "Block",
    "CausalSelfAttention",
    "MLP",
    "RMSNorm",
    "TrainLog",
    "train",
    "evaluate",
]
