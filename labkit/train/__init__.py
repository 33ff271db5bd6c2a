"""Stable training (Part III).

    clip_grad_norm_ (global / local)        labkit.train.clipping    chapter 07
    loss-spike detection and provocation    labkit.train.spikes      chapter 07
    GhostBatchNorm                          labkit.train.ghost_bn    chapter 08
    shuffle orders, batch correlation       labkit.train.shuffling   chapter 09
    difficulty, pacing, sequence warm-up    labkit.train.curriculum  chapter 09
    scaling-law fits, compute-optimal N, D  labkit.train.scaling     chapter 10
    crash-safe (async) checkpoints, resume  labkit.train.checkpoint  chapter 11
"""

from labkit.train import checkpoint, clipping, curriculum, ghost_bn, scaling, shuffling, spikes
from labkit.train.clipping import clip_grad_norm_
from labkit.train.ghost_bn import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, convert_to_ghost_batchnorm
from labkit.train.spikes import GradNormRecorder, SpikeDetector

__all__ = [
    "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GradNormRecorder", "SpikeDetector", "checkpoint",
    "clip_grad_norm_", "clipping", "convert_to_ghost_batchnorm", "curriculum", "ghost_bn", "scaling", "shuffling",
    "spikes",
]
