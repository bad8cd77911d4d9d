"""The flow over one-hot encodings (method.md section 1).

Notation: V vocabulary size, d model width, e(x) the one-hot encoding of tokens x,
t in [0, 1] the time the network is conditioned on (0 = noise, 1 = data) and
g = tau(t) the interpolation weight.

* Time map:      q(g) = E_{z~N(0,1)}[ Phi(z + g/(1-g))^(V-1) ],
                 alpha(g) = V/(V-1) (q(g) - 1/V),     tau = alpha^-1.
* Interpolant:   x_g = (1 - g) eps + g e(x),          eps ~ N(0, I_V).
* Velocity:      v(x, t) = (softmax(D(x, t)) - x) / (1 - g).
* Input shortcut: x_g @ W_in = (1 - g) eps @ W_in + g W_in[x], with
                 eps @ W_in ~ N(0, W_in^T W_in) drawn as z @ R, z ~ N(0, I_d), R^T R = W_in^T W_in.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

_HERMITE_NODES = 200  # error in q below 1e-6 at V = 50257 (100 nodes: ~7e-5)
_GRID_POINTS = 2049  # g grid for the table, cosine-spaced (dense near both ends)
MIN_ONE_MINUS_G = 1e-6  # 1 - g is clamped here wherever it divides (velocity, flow-map steps)


@functools.lru_cache(maxsize=None)
def _hermite_rule(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes z_i and weights w_i with E_{z~N(0,1)}[f(z)] ~ sum_i w_i f(z_i) (float64).

    From Gauss-Hermite (int e^{-x^2} f(x) dx ~ sum a_i f(x_i)): z_i = sqrt(2) x_i,
    w_i = a_i / sqrt(pi). Nodes whose weight is below 1e-20 are dropped (the
    integrand is bounded by 1), and the weights renormalised to sum to 1.
    """
    x, a = np.polynomial.hermite.hermgauss(n)
    keep = a > 1e-20
    w = a[keep] / a[keep].sum()
    return torch.from_numpy(math.sqrt(2.0) * x[keep]), torch.from_numpy(w)


def decoding_accuracy(g: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """q(g) = P[argmax_v x_g,v = true token] = E_z[Phi(z + g/(1-g))^(V-1)], float64.

    The true coordinate of x_g is (1-g) z + g, the V-1 others (1-g) eps_v; the true one
    wins iff every eps_v < z + g/(1-g). The power is taken in log space,
    exp((V-1) log Phi(.)), and the expectation by Gauss-Hermite quadrature.
    ``g`` must lie in [0, 1); q(0) = 1/V.
    """
    z, w = _hermite_rule(_HERMITE_NODES)
    g = g.to(torch.float64).cpu()
    m = g / (1.0 - g)
    log_phi = torch.special.log_ndtr(z + m.unsqueeze(-1))
    return torch.exp((vocab_size - 1) * log_phi) @ w


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through knots (xp, fp), xp strictly increasing; x clamped to [xp_0, xp_-1].

    Evaluated in float64, returned in x's dtype. Knot values are hit exactly at the
    ends: f(xp_0) = fp_0, f(xp_-1) = fp_-1.
    """
    x64 = x.to(torch.float64).clamp(xp[0], xp[-1]).contiguous()
    i = torch.searchsorted(xp, x64, right=True).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return (f0 + (x64 - x0) / (x1 - x0) * (f1 - f0)).to(x.dtype)


class Tau:
    """The time map g = tau(t) = alpha^-1(t) as a monotone piecewise-linear table.

    ``tau(t)`` maps the network's time to the interpolation weight g and ``tau.alpha(g)``
    maps back; both take tensors of any shape, device and floating dtype and return the
    same. The knots hold (alpha, g) pairs from (0, 0) to (1, 1), so tau(0) = 0 and
    tau(1) = 1 exactly. The tables live in float64 and are copied to each device once.
    """

    def __init__(self, alphas: torch.Tensor, gs: torch.Tensor) -> None:
        if not (torch.all(alphas[1:] > alphas[:-1]) and torch.all(gs[1:] > gs[:-1])):
            raise ValueError("Tau knots must be strictly increasing")
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {
            alphas.device: (alphas.to(torch.float64), gs.to(torch.float64))
        }

    @classmethod
    def for_vocab(cls, vocab_size: int) -> Tau:
        """Tabulate alpha(g) on a cosine-spaced grid of g in [0, 1) and close it with (1, 1).

        Monotonicity is enforced by a running maximum; knots that do not increase alpha
        strictly, and those where alpha has saturated to 1 in float64, are dropped.
        """
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        u = torch.linspace(0.0, 1.0, _GRID_POINTS, dtype=torch.float64)[:-1]
        g = 0.5 - 0.5 * torch.cos(math.pi * u)
        q = decoding_accuracy(g, vocab_size)
        alpha = (vocab_size / (vocab_size - 1) * (q - 1.0 / vocab_size)).clamp(0.0, 1.0)
        alpha[0] = 0.0  # q(0) = 1/V exactly: E[Phi(z)^(V-1)] = 1/V
        alpha = torch.cummax(alpha, dim=0).values
        keep = torch.cat([torch.tensor([True]), alpha[1:] > alpha[:-1]]) & (alpha < 1.0)
        one = torch.ones(1, dtype=torch.float64)
        return cls(torch.cat([alpha[keep], one]), torch.cat([g[keep], one]))

    @classmethod
    def identity(cls) -> Tau:
        """g = t (the ablation without the time map)."""
        knots = torch.tensor([0.0, 1.0], dtype=torch.float64)
        return cls(knots, knots.clone())

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            alphas, gs = next(iter(self._tables.values()))
            self._tables[device] = (alphas.to(device), gs.to(device))
        return self._tables[device]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """g = tau(t)."""
        alphas, gs = self._table(t.device)
        return _interp(t, alphas, gs)

    def alpha(self, g: torch.Tensor) -> torch.Tensor:
        """t = alpha(g) = tau^-1(g)."""
        alphas, gs = self._table(g.device)
        return _interp(g, gs, alphas)


@functools.lru_cache(maxsize=None)
def get_tau(vocab_size: int) -> Tau:
    """The time map for vocabulary size V, built once per process (a few tens of ms)."""
    return Tau.for_vocab(vocab_size)


def _per_example(g: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append singleton dims so g of shape (B,) (or (B, L)) broadcasts over (B, L, V)."""
    return g.reshape(g.shape + (1,) * (ndim - g.dim()))


def interpolate(x1: torch.Tensor, eps: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x_g = (1 - g) eps + g e(x), shape (B, L, V).

    ``x1`` is the clean state e(x) (B, L, V) or token ids (B, L) (one-hot encoded
    here with V = eps.shape[-1]); ``g`` is (B,) and broadcasts over positions.
    """
    if not x1.is_floating_point():
        x1 = F.one_hot(x1, eps.shape[-1]).to(eps.dtype)
    g = _per_example(g, eps.dim()).to(eps.dtype)
    return (1.0 - g) * eps + g * x1


def velocity(logits: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """v = (softmax(D(x, t)) - x) / (1 - g), in float32.

    ``logits`` and ``x`` are (B, L, V), ``g`` = tau(t) is (B,); 1 - g is clamped to at
    least 1e-6 (the samplers never evaluate at g = 1).
    """
    g = _per_example(g.float(), x.dim())
    p = torch.softmax(logits.float(), dim=-1)
    return (p - x.float()) / (1.0 - g).clamp_min(MIN_ONE_MINUS_G)


class _Gram(torch.autograd.Function):
    """G = W^T W with the one-matmul backward dL/dW = W (dL/dG + dL/dG^T).

    Autograd's own backward of ``w.mT @ w`` is two V x d x d matmuls (one per operand);
    this is one, so the Gram costs two instead of three.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        return w.mT @ w

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return w @ (grad + grad.mT)


def noise_factor(w_in: torch.Tensor) -> torch.Tensor:
    """A differentiable R (d x d, upper triangular) with R^T R = W_in^T W_in, float32.

    The Gram matrix W_in^T W_in (the one V d^2 product of the shortcut, forward and
    backward) is formed in float32 from W_in's values (bf16 weights are exact in
    float32, so only the accumulation rounds: a covariance error of about
    sqrt(V) 2^-24 relative to |W_in^T W_in|, below bf16's resolution); only the d x d
    factorisation runs in float64, where the Gram's squared condition number is
    harmless. R = chol(W_in^T W_in + delta I)^T with delta = 1e-12 mean(diag).
    ``torch.linalg.cholesky_ex`` does not check its result on the host, so there is
    no device sync per step; a Gram that is not positive definite (V < d, or a
    collapsed W_in) gives an R of NaN, which the loss and gradient norm then show. Requires
    V >= d (W_in of full column rank).
    """
    gram = _Gram.apply(w_in.float()).double()
    jitter = 1e-12 * gram.diagonal().mean().detach()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
    factor = torch.where(info == 0, factor, torch.nan)  # a failed factorisation as NaN, without a sync
    return factor.mT.to(torch.float32)


def _normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal float32 drawn on the generator's device, moved to ``device``."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on).to(device)


def embed_noisy_tokens(
    w_in: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, generator: torch.Generator | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_g @ W_in without the (B, L, V) noise: (1 - g) z @ R + g W_in[x], z ~ N(0, I_d).

    eps @ W_in ~ N(0, W_in^T W_in) per position and so is z @ R (R^T R = W_in^T W_in),
    so the result has the law of the dense path :func:`embed_dense_noisy_tokens`, and
    gradients w.r.t. W_in agree in expectation (both are reparameterisations of the
    same Gaussian). ``ids`` (B, L), ``g`` (B,); ``z`` (B, L, d) may be given instead of
    ``generator``. Returns (B, L, d) in W_in's dtype.
    """
    vocab_size, dim = w_in.shape
    if vocab_size <= dim:  # no saving, and W_in^T W_in would be singular
        return embed_dense_noisy_tokens(w_in, ids, g, generator)
    if z is None:
        z = _normal((*ids.shape, dim), generator, w_in.device)
    g = _per_example(g.float(), 3)
    # F.embedding, not w_in[ids]: the backward of advanced indexing accumulates with
    # atomic adds across threads on CPU (run-to-run different), embedding's does not.
    h = (1.0 - g) * (z @ noise_factor(w_in)) + g * F.embedding(ids, w_in).float()
    return h.to(w_in.dtype)


def embed_dense_noisy_tokens(
    w_in: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The reference dense path: eps ~ N(0, I_V) of shape (B, L, V), x_g = interpolate, x_g @ W_in."""
    eps = _normal((*ids.shape, w_in.shape[0]), generator, w_in.device)
    x_g = interpolate(ids, eps, g.float())
    return (x_g @ w_in.float()).to(w_in.dtype)
