"""Muon: momentum orthogonalized by Newton-Schulz, for the 2-D weights of hidden layers.

K. Jordan, Y. Jin, V. Boza, J. You, F. Cesista, L. Newhouse, J. Bernstein. "Muon: An optimizer
for hidden layers in neural networks", 2024 (kellerjordan.github.io/posts/muon; reference code
github.com/KellerJordan/Muon). J. Liu et al. (Moonshot AI), "Muon is Scalable for LLM Training",
arXiv:2502.16982, 2025 (decoupled weight decay, the 0.2·sqrt(max(A, B)) learning-rate match
with AdamW). J. Bernstein, L. Newhouse, "Old Optimizer, New Norm: An Anthology",
arXiv:2409.20325, 2024 (why: steepest descent under the spectral norm).

For a weight W of shape (A, B) (PyTorch's (out_features, in_features)) with gradient G_t:

    M_t = mu M_{t-1} + (1 - mu) G_t                       momentum (an EMA; M_0 = 0)
    N_t = (1 - mu) G_t + mu M_t   (nesterov)   or   M_t
    O_t = NS_k(N_t)  ~  U V^T     where N_t = U S V^T (thin SVD): the polar factor
    W_t = (1 - lr wd) W_{t-1} - lr * s(A, B) * O_t

    s(A, B) = max(1, A / B) ** 0.5        adjust_lr="original" (Jordan)
            = 0.2 * max(A, B) ** 0.5      adjust_lr="match_rms_adamw" (Moonshot: update RMS 0.2)

The momentum's scale does not matter: NS_k normalizes its input first, so the EMA form above
and the "sum" form M_t = mu M_{t-1} + G_t give the same update. NS_k is k steps of the
quintic Newton-Schulz iteration

    X_0 = N / max(||N||_F, eps),   X_{j+1} = a X_j + (b A_j + c A_j^2) X_j,   A_j = X_j X_j^T,

run on the wide orientation (a tall N is transposed, so A_j is the smaller Gram matrix). The
normalization is torch.optim.Muon's; Jordan's reference divides by ||N||_F + eps, which is the
same number unless the momentum's norm is within a few hundred eps of zero. If
X_j = U S V^T then X_{j+1} = U p(S) V^T with p(x) = a x + b x^3 + c x^5: the iteration maps
every singular value through the same odd polynomial and leaves the singular vectors alone.
Jordan's coefficients (3.4445, -4.7750, 2.0315) make p steep at 0 (p'(0) = a), so five steps
lift even tiny singular values into a band around 0.7-1.2 instead of converging exactly to 1;
the classic cubic (1.5, -0.5, 0) converges to 1 but needs many more steps.

Dtype: the iteration runs in bfloat16 on CUDA, as in the reference and torch.optim.Muon
(tensor cores; the band above is far wider than bf16's rounding), and in float32 (float64 for
float64 input) elsewhere, since many CPUs have no fast bf16 matmul and float32 keeps the
chapter's pictures exact. Pass `dtype=` (newton_schulz) or `ns_dtype=` (Muon) to choose;
`ns_dtype=torch.bfloat16` reproduces torch.optim.Muon exactly. The result is returned in the
input's dtype.

Muon is for the 2-D weights of hidden layers only: embeddings, the output head, norms and
biases go to AdamW (`split_muon_params`, `MuonWithAdamW`).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from labkit import _checks
from labkit.optim.adamw import adamw_step_, check_adam_hparams

JORDAN_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024: tuned quintic
CUBIC_COEFFICIENTS = (1.5, -0.5, 0.0)  # the classic cubic Newton-Schulz iteration
ADJUST_LR = ("original", "match_rms_adamw")
EPS = 1e-7

# --------------------------------------------------------------------------- validation


def _coefficients(owner: str, value, name: str = "coefficients") -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{owner}: {name} must be a tuple (a, b, c) of 3 numbers, got {value!r}")
    return tuple(_checks.number(owner, f"{name}[{i}]", v) for i, v in enumerate(value))


def _dtype(owner: str, name: str, value) -> torch.dtype | None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"{owner}: {name} must be None or a floating torch.dtype, got {value!r}")
    return value


def default_ns_dtype(G: torch.Tensor) -> torch.dtype:
    """bfloat16 on CUDA (as the reference); float32 elsewhere (float64 stays float64)."""
    if G.is_cuda:
        return torch.bfloat16
    return torch.promote_types(G.dtype, torch.float32)


# --------------------------------------------------------------------------- Newton-Schulz


def ns_polynomial(x, coefficients=JORDAN_COEFFICIENTS):
    """p(x) = a x + b x^3 + c x^5: what one iteration does to every singular value."""
    a, b, c = coefficients
    return a * x + b * x**3 + c * x**5


def ns_singular_value_map(x, steps: int = 5, coefficients=JORDAN_COEFFICIENTS):
    """p applied `steps` times: where NS_k sends a (normalized) singular value x."""
    for _ in range(steps):
        x = ns_polynomial(x, coefficients)
    return x


def _ns_iterates(G: torch.Tensor, steps: int, coefficients, eps: float, dtype: torch.dtype | None):
    """Yield X_0 (normalized), X_1, ..., X_steps in G's orientation and the iteration dtype."""
    owner = "newton_schulz"
    if not isinstance(G, torch.Tensor) or G.dim() < 2:
        raise ValueError(f"{owner}: G must be a tensor of shape (..., m, n), got "
                         f"{type(G).__name__} {tuple(getattr(G, 'shape', ()))}")
    if not G.is_floating_point():
        raise TypeError(f"{owner}: G must be a floating-point tensor, got {G.dtype}")
    steps = _checks.integer(owner, "steps", steps, low=0)
    a, b, c = _coefficients(owner, coefficients)
    eps = _checks.number(owner, "eps", eps, low=0.0, low_open=True)
    dtype = _dtype(owner, "dtype", dtype) or default_ns_dtype(G)

    *batch, m, n = G.shape
    tall = m > n
    X = G.to(dtype)
    if tall:
        X = X.mT  # (..., n, m): iterate on the wide side, Gram matrix min(m, n)^2
    if X.dim() == 2:
        X = X / X.norm().clamp(min=eps)  # ||X||_2 <= ||X||_F: every singular value now in [0, 1]
        mm = lambda inp, P, Q, beta, alpha: torch.addmm(inp, P, Q, beta=beta, alpha=alpha)  # noqa: E731
    else:
        X = X.reshape(-1, *X.shape[-2:])  # (batch, s, l): one matrix per leading index
        X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        mm = lambda inp, P, Q, beta, alpha: torch.baddbmm(inp, P, Q, beta=beta, alpha=alpha)  # noqa: E731

    def out(Y: torch.Tensor) -> torch.Tensor:
        Y = Y.reshape(*batch, *Y.shape[-2:]) if batch else Y
        return Y.mT if tall else Y

    yield out(X)
    for _ in range(steps):
        A = X @ X.mT  # (s, s) Gram matrix, s = min(m, n)
        B = mm(A, A, A, b, c)  # b A + c A^2
        X = mm(X, B, X, a, 1.0)  # a X + B X: (s, l)
        yield out(X)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients=JORDAN_COEFFICIENTS, eps: float = EPS,
                  *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate the polar factor U V^T of G (..., m, n) with `steps` Newton-Schulz iterations.

    X_0 = G / max(||G||_F, eps), X <- a X + (b A + c A^2) X with A = X X^T; tall matrices are
    transposed so A is min(m, n)^2. Batched input is orthogonalized matrix by matrix. Runs in
    `dtype` (default: bfloat16 on CUDA, float32 elsewhere) and returns G's dtype.
    """
    X = None
    for X in _ns_iterates(G, steps, coefficients, eps, dtype):
        pass
    return X.to(G.dtype)


def newton_schulz_iterates(G: torch.Tensor, steps: int = 5, coefficients=JORDAN_COEFFICIENTS,
                           eps: float = EPS, *, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """[X_0, X_1, ..., X_steps] of newton_schulz (X_0 is the normalized input), in G's dtype."""
    return [X.to(G.dtype) for X in _ns_iterates(G, steps, coefficients, eps, dtype)]


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    """The exact polar factor U V^T of G (..., m, n) from a thin SVD (what NS approximates).

    Singular directions with zero singular value are dropped (they are not defined).
    """
    if not isinstance(G, torch.Tensor) or G.dim() < 2:
        raise ValueError(f"polar_factor: G must be a tensor of shape (..., m, n), got {tuple(getattr(G, 'shape', ()))}")
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)  # (..., m, r), (..., r), (..., r, n)
    tol = S.amax(dim=-1, keepdim=True) * max(G.shape[-2:]) * torch.finfo(work.dtype).eps
    keep = (S > tol).to(work.dtype)  # rank mask
    return ((U * keep.unsqueeze(-2)) @ Vh).to(G.dtype)


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> int:
    """Matmul FLOPs of newton_schulz on one (m, n) matrix (2 per multiply-add).

    With s = min(m, n), l = max(m, n), each step does A = X X^T (2 s^2 l), A @ A (2 s^3) and
    B @ X (2 s^2 l): steps * (4 s^2 l + 2 s^3). The O(s l) scalings and additions are left out.
    """
    m = _checks.integer("newton_schulz_flops", "m", m, low=0)
    n = _checks.integer("newton_schulz_flops", "n", n, low=0)
    steps = _checks.integer("newton_schulz_flops", "steps", steps, low=0)
    s, l = min(m, n), max(m, n)
    return steps * (4 * s * s * l + 2 * s**3)


def ns_flop_overhead(shapes: Iterable[tuple[int, int]], tokens_per_step: int, steps: int = 5) -> float:
    """NS FLOPs of one Muon step over these weight shapes / their 6 * params * tokens training FLOPs.

    For a square d x d weight this is steps * d / tokens_per_step (Jordan et al.: T m / B).
    """
    shapes = [tuple(s) for s in shapes]
    if not shapes:
        raise ValueError("ns_flop_overhead: shapes must hold at least one (m, n), got none")
    tokens = _checks.integer("ns_flop_overhead", "tokens_per_step", tokens_per_step, low=1)
    ns = sum(newton_schulz_flops(m, n, steps) for m, n in shapes)
    train = sum(6 * m * n * tokens for m, n in shapes)
    return ns / train


# --------------------------------------------------------------------------- the update


def adjust_lr_factor(shape, adjust_lr: str = "original") -> float:
    """The scale s(A, B) Muon multiplies lr by for a weight of shape (A, B).

    "original": max(1, A/B) ** 0.5; "match_rms_adamw": 0.2 * max(A, B) ** 0.5. An exact
    polar factor of an (A, B) matrix has RMS 1/sqrt(max(A, B)), so the second one gives every
    update an RMS of 0.2, about AdamW's, and lets Muon reuse AdamW's lr and weight decay.
    """
    _checks.choice("adjust_lr_factor", "adjust_lr", adjust_lr, ADJUST_LR)
    if len(shape) < 2:
        raise ValueError(f"adjust_lr_factor: shape must have 2 dimensions (A, B), got {tuple(shape)}")
    A, B = int(shape[0]), int(shape[1])
    if adjust_lr == "original":
        return math.sqrt(max(1.0, A / B)) if B > 0 else 1.0
    return 0.2 * math.sqrt(max(A, B))


def muon_update(grad: torch.Tensor, buf: torch.Tensor, *, momentum: float, nesterov: bool,
                ns_steps: int, coefficients, eps: float, ns_dtype: torch.dtype | None) -> torch.Tensor:
    """Advance the momentum buffer in place and return the orthogonalized direction O_t."""
    buf.lerp_(grad, 1 - momentum)  # M_t = mu M_{t-1} + (1 - mu) G_t
    direction = grad.lerp(buf, momentum) if nesterov else buf  # (1 - mu) G_t + mu M_t
    return newton_schulz(direction, ns_steps, coefficients, eps, dtype=ns_dtype)


def _muon_group_step(group: dict, state) -> None:
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("Muon: sparse gradients are not supported")
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # (A, B)
        O = muon_update(p.grad, st["momentum_buffer"], momentum=group["momentum"],
                        nesterov=group["nesterov"], ns_steps=group["ns_steps"],
                        coefficients=group["ns_coefficients"], eps=group["eps"],
                        ns_dtype=group["ns_dtype"])  # (A, B), ~ U V^T
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay (with the unscaled lr)
        p.add_(O, alpha=-lr * adjust_lr_factor(p.shape, group["adjust_lr"]))


def _validate_muon_group(owner: str, group: dict) -> None:
    group["lr"] = _checks.number(owner, "lr", group["lr"], low=0.0)
    group["momentum"] = _checks.number(owner, "momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    if not isinstance(group["nesterov"], bool):
        raise TypeError(f"{owner}: nesterov must be a bool, got {type(group['nesterov']).__name__} "
                        f"{group['nesterov']!r}")
    group["ns_steps"] = _checks.integer(owner, "ns_steps", group["ns_steps"], low=1)
    group["weight_decay"] = _checks.number(owner, "weight_decay", group["weight_decay"], low=0.0)
    _checks.choice(owner, "adjust_lr", group["adjust_lr"], ADJUST_LR)
    group["ns_coefficients"] = _coefficients(owner, group["ns_coefficients"], "ns_coefficients")
    group["eps"] = _checks.number(owner, "eps", group["eps"], low=0.0, low_open=True)
    _dtype(owner, "ns_dtype", group["ns_dtype"])


def _check_matrices(owner: str, group: dict, index: int) -> None:
    for i, p in enumerate(group["params"]):
        if p.dim() != 2:
            raise ValueError(f"{owner}: Muon only updates 2-D weight matrices, but parameter {i} of param group "
                             f"{index} has shape {tuple(p.shape)}; give embeddings, the output head, norms and "
                             f"biases to AdamW (see labkit.optim.muon.split_muon_params)")
        if not p.is_floating_point():
            raise TypeError(f"{owner}: parameter {i} of param group {index} must be floating point, got {p.dtype}")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: momentum -> Newton-Schulz orthogonalization -> scaled step.

    Matches torch.optim.Muon(lr, weight_decay, momentum, nesterov, ns_coefficients, eps,
    ns_steps, adjust_lr_fn=adjust_lr) exactly with ns_dtype=torch.bfloat16 (its iteration
    dtype); with the default ns_dtype it iterates in float32 on a CPU (see the module docstring).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, adjust_lr: str = "original", *,
                 ns_coefficients=JORDAN_COEFFICIENTS, eps: float = EPS, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        adjust_lr=adjust_lr, ns_coefficients=ns_coefficients, eps=eps, ns_dtype=ns_dtype)
        _validate_muon_group("Muon", defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_muon_group("Muon", group)
        _check_matrices("Muon", group, len(self.param_groups) - 1)

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step on every parameter with a gradient; returns closure()'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _muon_group_step(group, self.state)
        return loss


# --------------------------------------------------------------------------- Muon + AdamW


def _adamw_group_step(group: dict, state) -> None:
    """AdamW (Loshchilov & Hutter 2019) on one group: labkit.optim.adamw's update, torch.optim.AdamW's bits."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("MuonWithAdamW: sparse gradients are not supported")
        adamw_step_(p, p.grad, state[p], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"])


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden 2-D weights, AdamW for everything else, as one optimizer.

    Two param groups: {"use_muon": True, ...Muon hyperparameters} and {"use_muon": False, lr=adamw_lr,
    betas, eps, weight_decay=adamw_weight_decay}. An lr scheduler scales both groups' lr.
    Build it from a model with `MuonWithAdamW.from_model(model, ...)`.
    """

    def __init__(self, muon_params, adamw_params, *, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0, adjust_lr: str = "original",
                 ns_coefficients=JORDAN_COEFFICIENTS, eps: float = EPS, ns_dtype: torch.dtype | None = None,
                 adamw_lr: float = 3e-3, adamw_betas=(0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0):
        owner = "MuonWithAdamW"
        muon_group = dict(params=list(muon_params), use_muon=True, lr=lr, momentum=momentum, nesterov=nesterov,
                          ns_steps=ns_steps, weight_decay=weight_decay, adjust_lr=adjust_lr,
                          ns_coefficients=ns_coefficients, eps=eps, ns_dtype=ns_dtype)
        adamw_group = dict(params=list(adamw_params), use_muon=False, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps,
                           weight_decay=adamw_weight_decay)
        check_adam_hparams(owner, adamw_group, prefix="adamw_")
        _validate_muon_group(owner, {k: v for k, v in muon_group.items() if k != "params"})
        # what add_param_group fills in for a group that leaves a hyperparameter out
        self._group_defaults = {flag: {k: v for k, v in g.items() if k != "params"}
                                for flag, g in ((True, muon_group), (False, adamw_group))}
        groups = [g for g in (muon_group, adamw_group) if g["params"]]
        if not groups:
            raise ValueError(f"{owner}: got no parameters (both muon_params and adamw_params are empty)")
        super().__init__(groups, {})

    @classmethod
    def from_model(cls, model: nn.Module, *, head_names=("lm_head",), **kwargs) -> "MuonWithAdamW":
        """Split `model` with split_muon_params and build the optimizer (kwargs as __init__)."""
        muon_params, adamw_params = split_muon_params(model, head_names=head_names)
        return cls(muon_params, adamw_params, **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        owner = "MuonWithAdamW"
        if not isinstance(param_group, dict) or not isinstance(param_group.get("use_muon"), bool):
            raise ValueError(f"{owner}: every param group needs use_muon=True or False, got "
                             f"{param_group.get('use_muon') if isinstance(param_group, dict) else param_group!r}")
        for key, value in self._group_defaults[param_group["use_muon"]].items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        if group["use_muon"]:
            _validate_muon_group(owner, group)
            _check_matrices(owner, group, index)
        else:
            check_adam_hparams(owner, group)

    @torch.no_grad()
    def step(self, closure=None):
        """One step: Muon on the use_muon groups, AdamW on the others; returns closure()'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                _muon_group_step(group, self.state)
            else:
                _adamw_group_step(group, self.state)
        return loss


# --------------------------------------------------------------------------- which weights get Muon


def split_muon_named_params(model: nn.Module, *, head_names=("lm_head",)):
    """([(name, p)] for Muon, [(name, p)] for AdamW) over model's trainable parameters.

    Muon: 2-D weights of hidden layers. AdamW: every parameter of an nn.Embedding, of a module
    whose name's last part is in `head_names` (the output head), and every parameter that is
    not 2-D (norm gains, biases). Tied weights appear once, under their first name, and go to
    AdamW if any module sharing them is an embedding or a head.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"split_muon_params: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(head_names, str) or not all(isinstance(h, str) for h in head_names):
        raise TypeError(f"split_muon_params: head_names must be a tuple of str, got {head_names!r}")
    not_hidden: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Embedding) or name.rsplit(".", 1)[-1] in head_names:
            not_hidden.update(id(p) for p in module.parameters())
    muon, adamw = [], []
    for name, p in model.named_parameters():  # shared parameters once
        if not p.requires_grad:
            continue
        (muon if p.dim() == 2 and id(p) not in not_hidden else adamw).append((name, p))
    return muon, adamw


def split_muon_params(model: nn.Module, *, head_names=("lm_head",)) -> tuple[list, list]:
    """(muon_params, adamw_params): see split_muon_named_params."""
    muon, adamw = split_muon_named_params(model, head_names=head_names)
    return [p for _, p in muon], [p for _, p in adamw]


__all__ = [
    "ADJUST_LR", "CUBIC_COEFFICIENTS", "JORDAN_COEFFICIENTS", "Muon", "MuonWithAdamW", "adjust_lr_factor",
    "default_ns_dtype", "muon_update", "newton_schulz", "newton_schulz_flops", "newton_schulz_iterates",
    "ns_flop_overhead", "ns_polynomial", "ns_singular_value_map", "polar_factor",
    "split_muon_named_params", "split_muon_params",
]
