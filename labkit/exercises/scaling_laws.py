"""Exercises of chapter 10-scaling-laws (registered on import; graded by labkit.check).

    scaling-laws.chinchilla_loss   fn(N, D, E, A, B, alpha, beta) -> E + A/N^alpha + B/D^beta
    scaling-laws.training_budget   fn(N, D) -> (FLOPs 6ND, tokens per parameter D/N)
    scaling-laws.compute_optimal   fn(flops, A, B, alpha, beta) -> (N_opt, D_opt) with 6 N D = flops
    scaling-laws.tokens_to_reach   fn(loss, N, E, A, B, alpha, beta) -> tokens D with L(N, D) = loss (inf if never)
"""

from __future__ import annotations

from labkit.exercises import Exercise, register
from labkit.train import scaling as sc

_LAWS = (sc.CHINCHILLA, sc.BESIROGLU)


def _law_kwargs(law: sc.ScalingLaw, with_E: bool = True) -> dict:
    kw = dict(A=law.A, B=law.B, alpha=law.alpha, beta=law.beta)
    if with_E:
        kw = dict(E=law.E, **kw)
    return kw


def _random_law(rng) -> sc.ScalingLaw:
    return sc.ScalingLaw(E=rng.uniform(0.0, 3.0), A=10 ** rng.uniform(0.5, 4.0), B=10 ** rng.uniform(0.5, 4.0),
                         alpha=rng.uniform(0.1, 0.8), beta=rng.uniform(0.1, 0.8))


# --- scaling-laws.chinchilla_loss --------------------------------------------------------------


def chinchilla_loss(N: float, D: float, E: float, A: float, B: float, alpha: float, beta: float) -> float:
    """Reference: L(N, D) = E + A / N^alpha + B / D^beta."""
    return sc.ScalingLaw(E=E, A=A, B=B, alpha=alpha, beta=beta).loss(N, D)


def _loss_cases(rng):
    yield dict(N=1.0, D=1.0, **_law_kwargs(sc.CHINCHILLA))  # E + A + B
    yield dict(N=70e9, D=1.4e12, **_law_kwargs(sc.CHINCHILLA))  # Chinchilla itself
    yield dict(N=sc.TINYLLAMA_PARAMS, D=sc.TINYLLAMA_TOKENS, **_law_kwargs(sc.BESIROGLU))  # TinyLlama
    yield dict(N=1e4, D=1e6, E=0.0, A=50.0, B=80.0, alpha=0.5, beta=0.25)  # no irreducible term
    for _ in range(16):
        yield dict(N=10 ** rng.uniform(3, 12), D=10 ** rng.uniform(5, 14), **_law_kwargs(_random_law(rng)))


register(Exercise(
    name="scaling-laws.chinchilla_loss",
    reference=chinchilla_loss,
    cases=_loss_cases,
    rtol=1e-9, atol=0.0,
    hint="Three terms: the irreducible E, the model-size term A / N**alpha and the data term B / D**beta.",
))

# --- scaling-laws.training_budget ---------------------------------------------------------------


def training_budget(N: float, D: float) -> tuple[float, float]:
    """Reference: (6 N D, D / N)."""
    return sc.training_flops(N, D), sc.tokens_per_param(N, D)


def _budget_cases(rng):
    yield dict(N=1.0, D=1.0)
    yield dict(N=70e9, D=1.4e12)  # Chinchilla: 5.88e23 FLOPs, 20 tokens per parameter
    yield dict(N=sc.TINYLLAMA_PARAMS, D=sc.TINYLLAMA_TOKENS)  # TinyLlama: ~2,700 tokens per parameter
    yield dict(N=175e9, D=300e9)  # GPT-3: under 2 tokens per parameter
    for _ in range(12):
        yield dict(N=10 ** rng.uniform(3, 12), D=10 ** rng.uniform(5, 14))


register(Exercise(
    name="scaling-laws.training_budget",
    reference=training_budget,
    cases=_budget_cases,
    rtol=1e-12, atol=0.0,
    hint="Each parameter costs 2 FLOPs per token forward and 4 backward. Return a tuple (flops, D / N).",
))

# --- scaling-laws.compute_optimal ---------------------------------------------------------------


def compute_optimal(flops: float, A: float, B: float, alpha: float, beta: float) -> tuple[float, float]:
    """Reference: the closed-form minimizer of A/N^alpha + B/D^beta subject to 6 N D = flops."""
    law = sc.ScalingLaw(E=0.0, A=A, B=B, alpha=alpha, beta=beta)
    return sc.compute_optimal(flops, law)


def _optimal_cases(rng):
    yield dict(flops=6.0, A=1.0, B=1.0, alpha=0.5, beta=0.5)  # symmetric: N = D = 1
    yield dict(flops=5.76e23, **_law_kwargs(sc.CHINCHILLA, with_E=False))  # Gopher's budget
    yield dict(flops=5.76e23, **_law_kwargs(sc.BESIROGLU, with_E=False))
    yield dict(flops=sc.training_flops(sc.TINYLLAMA_PARAMS, sc.TINYLLAMA_TOKENS),
               **_law_kwargs(sc.CHINCHILLA, with_E=False))
    yield dict(flops=1e20, A=400.0, B=400.0, alpha=0.3, beta=0.6)  # unequal exponents
    for _ in range(12):
        yield dict(flops=10 ** rng.uniform(10, 26), **_law_kwargs(_random_law(rng), with_E=False))


register(Exercise(
    name="scaling-laws.compute_optimal",
    reference=compute_optimal,
    cases=_optimal_cases,
    rtol=1e-7, atol=0.0,
    hint="Substitute D = flops / (6 N), set dL/dN = 0: alpha A N^-alpha = beta B D^-beta. "
         "G = (alpha A / (beta B))^(1 / (alpha + beta)); N = G (flops / 6)^(beta / (alpha + beta)); D = flops / (6 N).",
))

# --- scaling-laws.tokens_to_reach ---------------------------------------------------------------


def tokens_to_reach(loss: float, N: float, E: float, A: float, B: float, alpha: float, beta: float) -> float:
    """Reference: D with L(N, D) = loss, or math.inf when N is too small to ever get there."""
    law = sc.ScalingLaw(E=E, A=A, B=B, alpha=alpha, beta=beta)
    return sc.tokens_to_reach(loss, N, law)


def _reach_cases(rng):
    tiny = sc.overtraining(sc.TINYLLAMA_PARAMS, sc.TINYLLAMA_TOKENS, sc.CHINCHILLA)
    yield dict(loss=tiny.loss, N=sc.TINYLLAMA_PARAMS, **_law_kwargs(sc.CHINCHILLA))  # back to 3T tokens
    yield dict(loss=tiny.loss, N=tiny.same_loss_N, **_law_kwargs(sc.CHINCHILLA))  # the compute-optimal one
    yield dict(loss=2.0, N=1e8, **_law_kwargs(sc.CHINCHILLA))  # 100M parameters can never reach 2.0 nats
    yield dict(loss=1.7, N=1e15, **_law_kwargs(sc.CHINCHILLA))  # just above E: a huge but finite D
    for _ in range(14):
        law = _random_law(rng)
        N = 10 ** rng.uniform(3, 12)
        floor = law.E + law.A * N ** -law.alpha  # the loss with infinite data
        loss = floor + (law.B * (10 ** rng.uniform(5, 14)) ** -law.beta if rng.random() < 0.8 else -0.01 * floor)
        yield dict(loss=max(loss, 1e-3), N=N, **_law_kwargs(law))


register(Exercise(
    name="scaling-laws.tokens_to_reach",
    reference=tokens_to_reach,
    cases=_reach_cases,
    rtol=1e-7, atol=0.0,
    hint="Solve E + A/N^alpha + B/D^beta = loss for D. What is left for the data term is "
         "loss - E - A/N^alpha; if that is <= 0, no amount of data is enough: return math.inf.",
))

__all__ = ["chinchilla_loss", "training_budget", "compute_optimal", "tokens_to_reach"]
