"""Exercises of chapter 08-ghost-bn (registered on import; graded by labkit.check).

    ghost_bn.ghost_normalize  fn(x, ghost_batch_size, eps) -> x normalized per ghost batch and channel
    ghost_bn.running_stats    fn(running_mean, running_var, x, ghost_batch_size, momentum) -> (mean, var) after
                              one training-mode forward pass
    ghost_bn.stat_std         fn(sigma, batch_size, excess_kurtosis) -> (std of the batch mean, std of the
                              biased batch variance)

The cases never leave a last ghost batch with a single value per channel, so a plain
`x.split(ghost_batch_size)` is the split everywhere (GhostBatchNorm merges such a one-value
remainder into the ghost batch before it).
"""

from __future__ import annotations

import torch

from labkit.exercises import Exercise, register
from labkit.train import ghost_bn as gbn


def _shape(rng, n: int, c: int) -> tuple[int, ...]:
    """(N, C), (N, C, L) or (N, C, H, W) with N = n."""
    kind = rng.choice(["2d", "2d", "3d", "4d"])
    if kind == "2d":
        return (n, c)
    if kind == "3d":
        return (n, c, rng.randint(1, 6))
    return (n, c, rng.randint(1, 4), rng.randint(1, 4))


def _ok_split(shape: tuple[int, ...], g: int) -> bool:
    """True when x.split(g) leaves no ghost batch with one value per channel."""
    n, s = shape[0], 1
    for d in shape[2:]:
        s *= d
    sizes = [min(g, n - i) for i in range(0, n, g)]
    return all(k * s > 1 for k in sizes)


def _random_split(rng, max_n: int, max_g: int, max_c: int) -> tuple[tuple[int, ...], int]:
    """A random input shape and ghost batch size whose x.split leaves >= 2 values per channel everywhere."""
    while True:
        shape, g = _shape(rng, rng.randint(2, max_n), rng.randint(1, max_c)), rng.randint(1, max_g)
        if _ok_split(shape, g):
            return shape, g


def _tensor(gen: torch.Generator, shape, loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return loc + scale * torch.randn(*shape, generator=gen)


# --- ghost_bn.ghost_normalize -------------------------------------------------------------


def ghost_normalize(x: torch.Tensor, ghost_batch_size: int, eps: float) -> torch.Tensor:
    """Reference: training-mode ghost batch norm without gamma, beta or running statistics."""
    return gbn.ghost_batch_norm(x, ghost_batch_size, eps=eps)


def _normalize_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    yield dict(x=_tensor(gen, (8, 3)), ghost_batch_size=4, eps=1e-5)  # two ghost batches of 4
    yield dict(x=_tensor(gen, (8, 3)), ghost_batch_size=8, eps=1e-5)  # one ghost batch: plain batch norm
    yield dict(x=_tensor(gen, (6, 2)), ghost_batch_size=16, eps=1e-5)  # G > N: plain batch norm
    yield dict(x=_tensor(gen, (10, 3)), ghost_batch_size=4, eps=1e-5)  # 4 + 4 + 2: a smaller last ghost batch
    yield dict(x=_tensor(gen, (12, 4, 3, 3), 5.0, 3.0), ghost_batch_size=3, eps=1e-5)  # images: stats over (G, H, W)
    yield dict(x=_tensor(gen, (5, 2, 2, 2)), ghost_batch_size=1, eps=1e-5)  # G = 1 on images: instance norm
    yield dict(x=_tensor(gen, (16, 3), 0.0, 1e-3), ghost_batch_size=4, eps=1e-2)  # eps matters here
    for _ in range(14):
        shape, g = _random_split(rng, 64, 24, 8)
        yield dict(x=_tensor(gen, shape, rng.uniform(-3, 3), rng.uniform(0.1, 4)), ghost_batch_size=g, eps=1e-5)


register(Exercise(
    name="ghost_bn.ghost_normalize",
    reference=ghost_normalize,
    cases=_normalize_cases,
    rtol=1e-4, atol=1e-4,
    hint="Split x along dim 0 with x.split(ghost_batch_size). For each chunk, per channel: the mean and the "
         "biased variance (correction=0 / unbiased=False) over every dim except 1 (the samples and any H, W), "
         "then (chunk - mean) / sqrt(var + eps). Concatenate the chunks back in order.",
))

# --- ghost_bn.running_stats ---------------------------------------------------------------


def running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, x: torch.Tensor, ghost_batch_size: int,
                  momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the running mean and variance after one training-mode GhostBatchNorm forward on x."""
    mean, var = running_mean.clone(), running_var.clone()
    gbn.ghost_batch_norm(x, ghost_batch_size, mean, var, training=True, momentum=momentum)
    return mean, var


def _running_cases(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def buffers(c):
        return torch.randn(c, generator=gen), 0.5 + torch.rand(c, generator=gen)

    yield dict(running_mean=torch.zeros(3), running_var=torch.ones(3), x=_tensor(gen, (8, 3)), ghost_batch_size=8,
               momentum=0.1)  # one ghost batch: nn.BatchNorm1d's update
    yield dict(running_mean=torch.zeros(3), running_var=torch.ones(3), x=_tensor(gen, (8, 3), 2.0, 3.0),
               ghost_batch_size=4, momentum=0.1)  # two updates, in order
    yield dict(running_mean=torch.zeros(2), running_var=torch.ones(2), x=_tensor(gen, (4, 2)), ghost_batch_size=2,
               momentum=0.5)  # unbiased variance of 2 samples: twice the biased one
    yield dict(running_mean=torch.zeros(2), running_var=torch.ones(2), x=_tensor(gen, (10, 2), 1.0, 2.0),
               ghost_batch_size=4, momentum=0.2)  # 4 + 4 + 2
    rm, rv = buffers(4)
    yield dict(running_mean=rm, running_var=rv, x=_tensor(gen, (6, 4, 3, 3), -1.0, 2.0), ghost_batch_size=2,
               momentum=0.1)  # images: n = G * H * W values per channel
    yield dict(running_mean=torch.zeros(2), running_var=torch.ones(2), x=_tensor(gen, (12, 2)), ghost_batch_size=3,
               momentum=1.0)  # momentum 1: only the last ghost batch survives
    for _ in range(14):
        shape, g = _random_split(rng, 48, 16, 6)
        rm, rv = buffers(shape[1])
        yield dict(running_mean=rm, running_var=rv, x=_tensor(gen, shape, rng.uniform(-2, 2), rng.uniform(0.2, 3)),
                   ghost_batch_size=g, momentum=rng.choice([0.01, 0.1, 0.3, 0.9]))


register(Exercise(
    name="ghost_bn.running_stats",
    reference=running_stats,
    cases=_running_cases,
    rtol=1e-4, atol=1e-5,
    hint="One update per ghost batch, in order (x.split(ghost_batch_size)): r_mean = (1 - m) r_mean + m mean_k, "
         "r_var = (1 - m) r_var + m var_k * n_k / (n_k - 1), where var_k is the biased variance and n_k the number "
         "of values per channel in ghost batch k (its samples times H times W). Do not change the inputs in place.",
))

# --- ghost_bn.stat_std --------------------------------------------------------------------


def stat_std(sigma: float, batch_size: int, excess_kurtosis: float) -> tuple[float, float]:
    """Reference: (std of the batch mean, std of the biased batch variance) of batch_size iid samples."""
    return gbn.mean_std(batch_size, sigma), gbn.var_std(batch_size, sigma, excess_kurtosis)


def _std_cases(rng):
    yield dict(sigma=1.0, batch_size=2, excess_kurtosis=0.0)
    yield dict(sigma=1.0, batch_size=32, excess_kurtosis=0.0)  # a Gaussian, a typical ghost batch
    yield dict(sigma=2.0, batch_size=32, excess_kurtosis=0.0)  # the variance's std scales with sigma^2
    yield dict(sigma=1.0, batch_size=4096, excess_kurtosis=0.0)  # a large batch
    yield dict(sigma=1.0, batch_size=16, excess_kurtosis=6.0)  # exponential: heavy right tail
    yield dict(sigma=0.5, batch_size=8, excess_kurtosis=-1.2)  # uniform: light tails
    yield dict(sigma=1.0, batch_size=64, excess_kurtosis=3.0)  # Laplace
    for _ in range(14):
        yield dict(sigma=10 ** rng.uniform(-2, 2),
                   batch_size=rng.choice([2, 3, 4, 8, 16, 32, 64, 128, 256, 1024, 8192]),
                   excess_kurtosis=rng.choice([0.0, -1.2, 1.0, 3.0, 6.0, rng.uniform(-1.5, 10)]))


register(Exercise(
    name="ghost_bn.stat_std",
    reference=stat_std,
    cases=_std_cases,
    rtol=1e-6, atol=0.0,
    hint="The mean: sigma / sqrt(B). The unbiased variance s^2 has Var(s^2) = sigma^4 (g / B + 2 / (B - 1)) for "
         "excess kurtosis g; batch norm uses the biased one, v = (B - 1) / B * s^2.",
))

__all__ = ["ghost_normalize", "running_stats", "stat_std"]
