r"""Ghost batch normalization: normalize a large batch by the statistics of small virtual batches.

Batch normalization (Ioffe & Szegedy 2015) normalizes every channel by the mean and variance
of the current batch. Those batch statistics are estimates, and their noise shrinks as the
batch grows: the batch mean of B samples has standard deviation sigma / sqrt(B). Small-batch
training therefore injects a little noise into every normalized activation, which acts as a
regularizer; a large batch removes most of it. Hoffer, Hubara & Soudry (2017, "Train longer,
generalize better: closing the generalization gap in large batch training of neural
networks", Algorithm 1) keep the large batch for the gradient but split it into "ghost"
(virtual) batches of a fixed small size for the normalization statistics: the noise of the
statistics is then that of the small batch, whatever the batch size. Keskar et al. (2017)
measured the large-batch generalization gap this is one of the remedies for.

The maths. A training batch x of shape (N, C, *) (S = prod(*) values per sample and channel)
is split along the batch into K consecutive ghost batches B_1, ..., B_K of G samples each
(G = ghost_batch_size); ghost batch k holds n_k = |B_k| * S values per channel, and

    mu_k  = 1/n_k  sum_{i in B_k} x_i                    (per channel; C values)
    v_k   = 1/n_k  sum_{i in B_k} (x_i - mu_k)^2          (biased: what normalization uses)
    y_i   = gamma * (x_i - mu_k) / sqrt(v_k + eps) + beta  for every i in B_k.

Running statistics (used in eval mode) take one momentum step per ghost batch, in order,
with the unbiased variance, exactly as nn.BatchNorm would if it were called on B_1, ..., B_K
one after the other (the paper's Algorithm 1):

    r_mean <- (1 - m) r_mean + m mu_k,     r_var <- (1 - m) r_var + m v_k n_k / (n_k - 1),

so one forward pass of K ghost batches multiplies the old running value by (1 - m)^K, and
ghost batch k enters with weight m (1 - m)^(K - k). With momentum=None every ghost batch
counts once in a cumulative average (m = 1 / num_batches_tracked, which counts ghost batches).

The split. Ghost batches are torch.split's chunks: K - 1 (or K) full ghost batches of G
samples, then the remainder N mod G as a last, smaller ghost batch. A remainder holding a
single value per channel (N mod G = 1 and S = 1) cannot be normalized (its variance is 0
and its unbiased variance undefined), so it joins the ghost batch before it (G + 1 samples).
With G >= N there is one ghost batch and the layer is exactly nn.BatchNorm (it calls the
same F.batch_norm). In eval mode the running statistics are used, as in nn.BatchNorm.

Implementation: plain PyTorch ops, differentiated by autograd. The K full ghost batches are
folded into the channel axis (ghost batch k's channel c becomes channel k*C + c of a
(G, K*C, S) tensor) and normalized by a single F.batch_norm call, so the cost barely grows
with the number of ghost batches; with momentum 1 that call's running buffers receive each
ghost batch's mean and unbiased variance for the running-statistics update.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from labkit import _checks

# --- the split ----------------------------------------------------------------------------


def ghost_batch_sizes(n: int, ghost_batch_size: int, values_per_sample: int = 1) -> list[int]:
    """Sizes of the consecutive ghost batches a batch of `n` samples is split into.

    Full ghost batches of `ghost_batch_size`, then the remainder; a remainder with a single
    value per channel (1 sample and values_per_sample == 1) joins the previous ghost batch.
    """
    n = _checks.integer("ghost_batch_sizes", "n", n, low=0)
    g = _checks.integer("ghost_batch_sizes", "ghost_batch_size", ghost_batch_size, low=1)
    s = _checks.integer("ghost_batch_sizes", "values_per_sample", values_per_sample, low=1)
    if n <= g:
        return [n]
    full, rest = divmod(n, g)
    sizes = [g] * full + ([rest] if rest else [])
    if rest and rest * s == 1:  # a one-value ghost batch cannot be normalized: merge it
        last = sizes.pop()
        sizes[-1] += last
    return sizes


def momentum_weights(k: int, momentum: float | None, num_batches_tracked: int = 0) -> tuple[float, list[float]]:
    """(weight of the old running value, weights of ghost batches 1..k) after k sequential updates.

    r <- (1 - m_j) r + m_j s_j for j = 1..k gives r_k = P r_0 + sum_j w_j s_j with
    P = prod_j (1 - m_j) and w_j = m_j prod_{l > j} (1 - m_l); m_j = momentum, or
    1 / (num_batches_tracked + j) for a cumulative average (momentum=None).
    """
    k = _checks.integer("momentum_weights", "k", k, low=0)
    t0 = _checks.integer("momentum_weights", "num_batches_tracked", num_batches_tracked, low=0)
    if momentum is not None:
        momentum = _checks.number("momentum_weights", "momentum", momentum, low=0.0, high=1.0)
    factors = [momentum if momentum is not None else 1.0 / (t0 + j) for j in range(1, k + 1)]
    keep, weights = 1.0, [0.0] * k
    for j in range(k - 1, -1, -1):  # from the newest ghost batch back
        weights[j] = factors[j] * keep
        keep *= 1.0 - factors[j]
    return keep, weights


# --- the technique ------------------------------------------------------------------------


def _fold_normalize(chunks: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    stats_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Normalize K ghost batches of equal size at once: chunks (K, G, C, S) -> (K, G, C, S).

    Ghost batch k's channel c becomes channel k*C + c of a (G, K*C, S) tensor, which one
    F.batch_norm call normalizes per channel: per ghost batch and channel. With momentum 1 its
    running buffers receive each ghost batch's mean and unbiased variance, (K, C) each
    (skipped when stats_dtype is None).
    """
    K, G, C, S = chunks.shape
    folded = chunks.transpose(0, 1).reshape(G, K * C, S)  # (G, K*C, S)
    mean = var = None
    if stats_dtype is not None:
        mean = torch.zeros(K * C, device=chunks.device, dtype=stats_dtype)  # (K*C,)
        var = torch.ones(K * C, device=chunks.device, dtype=stats_dtype)  # (K*C,)
    w = weight.repeat(K) if weight is not None else None  # (K*C,): the same gamma for every ghost batch
    b = bias.repeat(K) if bias is not None else None
    y = F.batch_norm(folded, mean, var, w, b, True, 1.0, eps)  # (G, K*C, S)
    y = y.reshape(G, K, C, S).transpose(0, 1)  # (K, G, C, S)
    if stats_dtype is None:
        return y, None, None
    return y, mean.reshape(K, C), var.reshape(K, C)


def ghost_batch_norm(x: torch.Tensor, ghost_batch_size: int, running_mean: torch.Tensor | None = None,
                     running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, *, training: bool = True, momentum: float | None = 0.1,
                     eps: float = 1e-5, num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """Ghost batch normalization of x (N, C, *), the functional form (like F.batch_norm).

    training=True normalizes each ghost batch by its own statistics and, if running_mean and
    running_var are given, updates them in place with one momentum step per ghost batch (and
    adds the number of ghost batches to num_batches_tracked, if given). training=False
    normalizes by the running statistics. momentum=None needs num_batches_tracked.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ghost_batch_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"ghost_batch_norm: x must have shape (N, C, *), got shape {tuple(x.shape)}")
    g = _checks.integer("ghost_batch_norm", "ghost_batch_size", ghost_batch_size, low=1)
    eps = _checks.number("ghost_batch_norm", "eps", eps, low=0.0, low_open=True)
    if momentum is not None:
        momentum = _checks.number("ghost_batch_norm", "momentum", momentum, low=0.0, high=1.0)
    if (running_mean is None) != (running_var is None):
        raise ValueError("ghost_batch_norm: running_mean and running_var must be given together")
    tracked = training and running_mean is not None
    if tracked and momentum is None and num_batches_tracked is None:
        raise ValueError("ghost_batch_norm: momentum=None (a cumulative average) needs num_batches_tracked")
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])  # values per sample and channel
    sizes = ghost_batch_sizes(N, g, max(S, 1))
    # ghost batches seen before this call: only a cumulative average needs it (reading it syncs a GPU)
    t0 = int(num_batches_tracked) if momentum is None and num_batches_tracked is not None else 0
    if num_batches_tracked is not None and tracked:
        num_batches_tracked.add_(len(sizes))

    if not training or len(sizes) == 1:  # eval, or one ghost batch: exactly nn.BatchNorm
        factor = 0.0
        if tracked:
            factor = momentum if momentum is not None else 1.0 / (t0 + 1)
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, factor, eps)
    if S == 0 or (S == 1 and g == 1):
        raise ValueError(f"ghost_batch_norm: ghost_batch_size={g} leaves one value per channel in a ghost batch "
                         f"of x with shape {tuple(x.shape)}; use ghost_batch_size >= 2")

    xs = x.reshape(N, C, S)  # (N, C, S)
    stats_dtype = running_mean.dtype if tracked else None
    k_full = sum(1 for s in sizes if s == g)  # the full ghost batches come first
    y, mean, var = _fold_normalize(xs[: k_full * g].reshape(k_full, g, C, S), weight, bias, eps, stats_dtype)
    ys, means, variances = [y.reshape(k_full * g, C, S)], [mean], [var]
    if k_full < len(sizes):  # the last, smaller ghost batch (or the merged one of G + 1)
        r = sizes[-1]
        y, mean, var = _fold_normalize(xs[k_full * g:].reshape(1, r, C, S), weight, bias, eps, stats_dtype)
        ys.append(y.reshape(r, C, S))
        means.append(mean)
        variances.append(var)
    y = torch.cat(ys) if len(ys) > 1 else ys[0]  # (N, C, S)

    if tracked:  # one momentum step per ghost batch, in order, in closed form
        with torch.no_grad():
            keep, w = momentum_weights(len(sizes), momentum, t0)
            w = torch.tensor(w, dtype=torch.float64, device=running_mean.device)  # (K,)
            running_mean.copy_(keep * running_mean.double() + w @ torch.cat(means).double())  # (C,)
            running_var.copy_(keep * running_var.double() + w @ torch.cat(variances).double())  # (C,)
    return y.reshape(x.shape)


class GhostBatchNorm(_BatchNorm):
    """Batch norm over ghost batches of `ghost_batch_size` samples, for inputs (N, C, *).

    Same parameters, buffers and state_dict as nn.BatchNorm1d/2d/3d (a BatchNorm checkpoint
    loads into it). Training mode: each ghost batch is normalized by its own statistics and
    the running statistics take one momentum step per ghost batch, in order (as if
    nn.BatchNorm were called on each ghost batch in turn); with ghost_batch_size >= N it *is*
    nn.BatchNorm. num_batches_tracked counts ghost batches. Eval mode: the running
    statistics. `ghost_batch_size` may be changed between calls.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:
        owner = type(self).__name__
        num_features = _checks.integer(owner, "num_features", num_features, low=1)
        eps = _checks.number(owner, "eps", eps, low=0.0, low_open=True)
        if momentum is not None:
            momentum = _checks.number(owner, "momentum", momentum, low=0.0, high=1.0)
        for name, flag in (("affine", affine), ("track_running_stats", track_running_stats)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.ghost_batch_size = ghost_batch_size

    @property
    def ghost_batch_size(self) -> int:
        return self._ghost_batch_size

    @ghost_batch_size.setter
    def ghost_batch_size(self, value: int) -> None:
        self._ghost_batch_size = _checks.integer(type(self).__name__, "ghost_batch_size", value, low=1)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"{type(self).__name__}: input must have shape (N, C, *), got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: input must have {self.num_features} channels (dim 1), "
                             f"got shape {tuple(input.shape)}")
        use_buffers = not self.training or self.track_running_stats  # as nn.BatchNorm: eval, or tracked training
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        return ghost_batch_norm(
            input, self.ghost_batch_size,
            self.running_mean if use_buffers else None, self.running_var if use_buffers else None,
            self.weight, self.bias, training=bn_training, momentum=self.momentum, eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if self.training and self.track_running_stats else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class GhostBatchNorm1d(GhostBatchNorm):
    """GhostBatchNorm for (N, C) or (N, C, L) inputs: nn.BatchNorm1d when ghost_batch_size >= N."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"GhostBatchNorm1d: input must be 2-D (N, C) or 3-D (N, C, L), "
                             f"got shape {tuple(input.shape)}")


class GhostBatchNorm2d(GhostBatchNorm):
    """GhostBatchNorm for (N, C, H, W) inputs: nn.BatchNorm2d when ghost_batch_size >= N."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"GhostBatchNorm2d: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")


def convert_to_ghost_batchnorm(module: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d inside `module` by its ghost version, keeping its
    parameters, buffers, momentum, eps and train/eval mode. Returns the converted module
    (a new one if `module` itself is a BatchNorm; its children are replaced in place)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_to_ghost_batchnorm: module must be an nn.Module, got {type(module).__name__}")
    _checks.integer("convert_to_ghost_batchnorm", "ghost_batch_size", ghost_batch_size, low=1)
    kinds = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm}
    out = module
    if type(module) in kinds:
        ref = module.running_mean if module.running_mean is not None else module.weight
        out = kinds[type(module)](module.num_features, ghost_batch_size, module.eps, module.momentum,
                                  module.affine, module.track_running_stats,
                                  device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            for name in ("weight", "bias"):
                if getattr(module, name, None) is not None and getattr(out, name, None) is not None:
                    getattr(out, name).copy_(getattr(module, name))
                    getattr(out, name).requires_grad_(getattr(module, name).requires_grad)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        new = convert_to_ghost_batchnorm(child, ghost_batch_size)
        if new is not child:
            setattr(out, name, new)
    return out


# --- the noise of batch statistics --------------------------------------------------------


def mean_std(batch_size: int, sigma: float = 1.0, population: int | None = None) -> float:
    """Standard deviation of the mean of `batch_size` samples with std `sigma`: sigma / sqrt(B),
    times sqrt((P - B) / (P - 1)) when drawn without replacement from a population of P values."""
    b = _checks.integer("mean_std", "batch_size", batch_size, low=1)
    sigma = _checks.number("mean_std", "sigma", sigma, low=0.0)
    out = sigma / math.sqrt(b)
    if population is not None:
        p = _checks.integer("mean_std", "population", population, low=1)
        if b > p:
            raise ValueError(f"mean_std: batch_size must be <= population, got {b} > {p}")
        out *= math.sqrt((p - b) / (p - 1)) if p > 1 else 0.0
    return out


def var_std(batch_size: int, sigma: float = 1.0, excess_kurtosis: float = 0.0) -> float:
    """Standard deviation of the biased batch variance v = 1/B sum (x - mean)^2 of B iid samples
    with std `sigma` and excess kurtosis g (0 for a Gaussian):
    Var(v) = ((B - 1) / B)^2 sigma^4 (g / B + 2 / (B - 1)); a Gaussian gives sigma^2 sqrt(2 (B - 1)) / B."""
    b = _checks.integer("var_std", "batch_size", batch_size, low=2)
    sigma = _checks.number("var_std", "sigma", sigma, low=0.0)
    g = _checks.number("var_std", "excess_kurtosis", excess_kurtosis, low=-2.0)
    unbiased = sigma**4 * (g / b + 2.0 / (b - 1))  # Var of the unbiased sample variance
    return ((b - 1) / b) * math.sqrt(max(unbiased, 0.0))


def batch_statistics(x: torch.Tensor, batch_size: int, *, epochs: int = 1,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and biased variances of the batches a data loader would draw from x (P, C).

    Each epoch shuffles the P rows once and cuts them into P // batch_size consecutive batches
    (without replacement, the last partial batch dropped). Returns (means, variances), both
    (epochs * (P // batch_size), C).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"batch_statistics: x must be a (P, C) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    P = x.shape[0]
    b = _checks.integer("batch_statistics", "batch_size", batch_size, low=1)
    if b > P:
        raise ValueError(f"batch_statistics: batch_size must be <= the number of rows of x ({P}), got {b}")
    epochs = _checks.integer("batch_statistics", "epochs", epochs, low=1)
    per_epoch = P // b
    means, variances = [], []
    for _ in range(epochs):
        perm = torch.randperm(P, generator=generator, device="cpu").to(x.device)
        batches = x[perm[: per_epoch * b]].reshape(per_epoch, b, x.shape[1])  # (P // B, B, C)
        m = batches.mean(1)  # (P // B, C)
        means.append(m)
        variances.append((batches - m[:, None]).square().mean(1))  # (P // B, C), biased
    return torch.cat(means), torch.cat(variances)


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis E[(x - mu)^4] / sigma^4 - 3 of each column of x (P, C): (C,)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"excess_kurtosis: x must be a (P, C) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    c = x - x.mean(0)
    return (c**4).mean(0) / (c**2).mean(0) ** 2 - 3.0


__all__ = [
    "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "batch_statistics", "convert_to_ghost_batchnorm",
    "excess_kurtosis", "ghost_batch_norm", "ghost_batch_sizes", "mean_std", "momentum_weights", "var_std",
]
