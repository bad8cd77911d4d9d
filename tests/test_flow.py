"""flm.flow: the time map tau, interpolant/velocity conventions, the low-rank noise embedding."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from flm.flow import (
    Tau,
    decoding_accuracy,
    embed_dense_noisy_tokens,
    embed_noisy_tokens,
    get_tau,
    interpolate,
    noise_factor,
    velocity,
)

# ---------------------------------------------------------------------------- tau


@pytest.mark.parametrize("vocab,expected", [(50257, 0.809), (32000, 0.805), (1000, 0.764), (8, 0.604)])
def test_tau_reference_values(vocab: int, expected: float) -> None:
    assert abs(get_tau(vocab)(torch.tensor(0.5)).item() - expected) < 0.005


@pytest.mark.parametrize("vocab", [2, 8, 1000, 50257])
def test_tau_endpoints_monotone_and_inverse(vocab: int) -> None:
    tau = get_tau(vocab)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        ends = tau(torch.tensor([0.0, 1.0], dtype=dtype))
        assert ends.dtype == dtype and ends.tolist() == [0.0, 1.0]
        assert tau.alpha(torch.tensor([0.0, 1.0], dtype=dtype)).tolist() == [0.0, 1.0]
    t = torch.linspace(0, 1, 200001, dtype=torch.float64)
    g = tau(t)
    assert torch.all(g[1:] > g[:-1])
    torch.testing.assert_close(tau.alpha(g), t, atol=1e-9, rtol=0)
    # the table interpolates the quadrature: alpha(tau(t)) = t up to interpolation error
    inner = t[1:-1:97]
    alpha = vocab / (vocab - 1) * (decoding_accuracy(tau(inner), vocab) - 1 / vocab)
    torch.testing.assert_close(alpha, inner, atol=3e-5, rtol=0)
    shaped = torch.rand(4, 5)
    assert tau(shaped).shape == (4, 5) and tau(shaped).dtype == torch.float32


def test_tau_identity_and_cache() -> None:
    ident = Tau.identity()
    t = torch.rand(1000, dtype=torch.float64)
    assert torch.equal(ident(t), t) and torch.equal(ident.alpha(t), t)
    assert get_tau(123) is get_tau(123)
    start = time.perf_counter()
    Tau.for_vocab(4567)
    assert time.perf_counter() - start < 0.5  # typically ~20 ms


@pytest.mark.parametrize("vocab,draws", [(8, 40000), (100, 20000), (1000, 4000)])
def test_decoding_accuracy_matches_monte_carlo(vocab: int, draws: int) -> None:
    """q(g) = P[argmax_v x_g,v = true token], x_g = (1-g) eps + g e(x), token 0 the true one."""
    gen = torch.Generator().manual_seed(vocab)
    g = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    q = decoding_accuracy(g, vocab)
    for gi, qi in zip(g.tolist(), q.tolist()):
        x1 = torch.zeros(draws, vocab)
        x1[:, 0] = 1.0
        x_g = interpolate(x1, torch.randn(draws, vocab, generator=gen), torch.full((draws,), gi))
        q_mc = (x_g.argmax(-1) == 0).double().mean().item()
        assert abs(q_mc - qi) < 4.5 * math.sqrt(qi * (1 - qi) / draws) + 1e-4, (gi, q_mc, qi)


def test_decoding_accuracy_quadrature_converged_at_large_vocab() -> None:
    """Against a dense trapezoid rule for int phi(y - m) Phi(y)^(V-1) dy at V = 50257."""
    vocab = 50257
    g = torch.tensor([0.0, 0.3, 0.6, 0.75, 0.8, 0.85, 0.9], dtype=torch.float64)
    m = g / (1 - g)
    y = torch.linspace(-12.0, 40.0, 400001, dtype=torch.float64)
    density = torch.exp(-0.5 * (y - m[:, None]) ** 2) / math.sqrt(2 * math.pi)
    reference = torch.trapezoid(density * torch.exp((vocab - 1) * torch.special.log_ndtr(y)), y, dim=1)
    torch.testing.assert_close(decoding_accuracy(g, vocab), reference, atol=2e-6, rtol=0)
    assert abs(decoding_accuracy(torch.zeros(1), vocab).item() - 1 / vocab) < 2e-6


# --------------------------------------------------------------- interpolant, velocity


def test_interpolate_and_velocity_conventions() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (3, 5), generator=gen)
    eps = torch.randn(3, 5, 10, generator=gen)
    one_hot = F.one_hot(ids, 10).float()
    g = torch.tensor([0.0, 0.3, 1.0])
    x_g = interpolate(ids, eps, g)
    assert torch.equal(x_g, interpolate(one_hot, eps, g))
    assert torch.equal(x_g[0], eps[0]) and torch.equal(x_g[2], one_hot[2])  # g=0 noise, g=1 data
    torch.testing.assert_close(x_g[1], 0.7 * eps[1] + 0.3 * one_hot[1])
    # a perfect denoiser gives the straight-line velocity v = e(x) - eps = d x_g / d g
    g = torch.tensor([0.1, 0.5, 0.9])
    x_g = interpolate(ids, eps, g)
    logits = (1e4 * one_hot).bfloat16()
    v = velocity(logits, x_g, g)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, one_hot - eps, atol=1e-5, rtol=1e-5)
    # one Euler step g -> g' lands on the interpolant at g'
    g2 = torch.tensor([0.3, 0.6, 1.0])
    stepped = x_g + (g2 - g)[:, None, None] * v
    torch.testing.assert_close(stepped, interpolate(ids, eps, g2), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(velocity(logits, x_g, torch.ones(3))).all()  # 1 - g is clamped


# -------------------------------------------------------------- low-rank noise embedding

VOCAB, DIM = 64, 8


def _w_in(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, DIM, generator=gen, dtype=torch.float64).float() / math.sqrt(DIM)


def test_noise_factor_squares_to_gram() -> None:
    w = _w_in()
    r = noise_factor(w)
    assert r.shape == (DIM, DIM) and torch.equal(r, r.triu())
    torch.testing.assert_close(r.T @ r, w.T @ w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", [embed_noisy_tokens, embed_dense_noisy_tokens])
def test_embedding_paths_have_the_interpolant_law(path) -> None:
    """x_g @ W_in ~ N(g W_in[x], (1-g)^2 W_in^T W_in) per position, for both paths."""
    w, n = _w_in(), 40000
    g = torch.tensor([0.0, 0.4, 0.9])
    ids = torch.full((3, n), 5)
    h = path(w, ids, g, torch.Generator().manual_seed(1))
    assert h.shape == (3, n, DIM) and h.dtype == torch.float32
    h = h.double()
    sigma = (w.T @ w).double()
    var = sigma.diagonal()
    for row, gi in enumerate(g.tolist()):
        mean = h[row].mean(0)
        se_mean = (1 - gi) * torch.sqrt(var / n)
        assert ((mean - gi * w[5].double()).abs() < 5 * se_mean + 1e-7).all()
        cov = torch.cov(h[row].T)
        target = (1 - gi) ** 2 * sigma
        se_cov = (1 - gi) ** 2 * torch.sqrt((var[:, None] * var[None, :] + sigma**2) / n)
        assert ((cov - target).abs() < 5 * se_cov).all(), (gi, (cov - target).abs().max())


def _grad_draws(path, w: torch.Tensor, groups: int, detach_noise: bool = False) -> torch.Tensor:
    """Gradients d CE(h @ head) / d W_in, h the embedded noisy tokens, one per group.

    Each group averages the loss over 16 independent noise draws of the same 4 x 16
    tokens (the batch is tiled), so the groups are i.i.d. gradient estimates.
    """
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (4, 16), generator=gen).repeat(16, 1)
    head = torch.randn(DIM, VOCAB, generator=gen)
    g = torch.tensor([0.1, 0.4, 0.6, 0.8]).repeat(16)
    out = []
    for _ in range(groups):
        w_leaf = w.clone().requires_grad_()
        h = path(w_leaf.detach() if detach_noise else w_leaf, ids, g, gen)
        if detach_noise:  # keep only the signal part's gradient: g W_in[x]
            h = h + g[:, None, None] * (w_leaf[ids] - w_leaf[ids].detach())
        loss = F.cross_entropy((h @ head).flatten(0, 1), ids.flatten())
        out.append(torch.autograd.grad(loss, w_leaf)[0])
    return torch.stack(out).double()


def _z_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    se = torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
    return (a.mean(0) - b.mean(0)).abs() / (se + 1e-12)


def test_embedding_paths_gradients_agree_in_expectation() -> None:
    w, groups = _w_in(), 50
    dense = _grad_draws(embed_dense_noisy_tokens, w, groups)
    assert _z_scores(_grad_draws(embed_noisy_tokens, w, groups), dense).max() < 5.0
    # the test has power: dropping the gradient through the noise term is detected
    signal_only = _grad_draws(embed_noisy_tokens, w, groups, detach_noise=True)
    assert _z_scores(signal_only, dense).max() > 8.0


def test_small_vocab_falls_back_to_dense_noise() -> None:
    w = torch.randn(4, 8)
    h = embed_noisy_tokens(w, torch.tensor([[0, 3]]), torch.tensor([0.5]), torch.Generator().manual_seed(0))
    assert h.shape == (1, 2, 8) and torch.isfinite(h).all()


def test_shortcut_gradient_is_run_to_run_identical_with_threads():
    """W_in's gradient through the low-rank shortcut is bitwise the same on every call with
    2 threads: W_in[x] accumulated its backward with atomic adds across threads (FLM runs
    were not reproducible while MDLM and AR were); F.embedding's backward is ordered."""
    from flm.flow import embed_noisy_tokens

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(256, 32, generator=gen, requires_grad=True)
        ids = torch.randint(0, 256, (64, 64), generator=gen)  # many repeated ids
        g, z = torch.rand(64, generator=gen), torch.randn(64, 64, 32, generator=gen)
        grads = []
        for _ in range(5):
            w.grad = None
            embed_noisy_tokens(w, ids, g, z=z).square().sum().backward()
            grads.append(w.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
