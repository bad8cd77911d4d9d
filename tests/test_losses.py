"""flm.model.losses (chunked linear + cross entropy) and the FLM loss built on it.

The FLM loss is checked against the code it replaced (float64 Gram and
``torch.linalg.cholesky``, per-example ``randn`` + ``stack``, dense logits and
``F.cross_entropy``), kept here as the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flm.config import ModelConfig
from flm.flow import get_tau, interpolate
from flm.methods.flm import flm_loss
from flm.model import DiT
from flm.model.losses import chunk_tokens, linear_cross_entropy
from flm.rng import example_generators, example_normal, example_uniform


def _problem(dtype: torch.dtype, n: int = 300, d: int = 32, vocab: int = 1000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    w = (0.2 * torch.randn(vocab, d, generator=gen)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(vocab, generator=gen)).to(dtype).requires_grad_()
    return h, w, b, torch.randint(0, vocab, (n,), generator=gen)


# (dtype, tolerance on every gradient relative to its largest entry): float32 and
# float64 agree to rounding; bf16 differs by where the weight gradient is rounded
# (the unfused path rounds one bf16 matmul, the chunks accumulate in float32).
# (bf16 matmuls are slow on CPU: no one-token chunks there.)
@pytest.mark.parametrize("dtype,tol,chunk", [(dtype, tol, chunk)
                                             for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5),
                                                                (torch.bfloat16, 2e-2))
                                             for chunk in (1, 77, 300, 1000) if chunk > 1 or dtype != torch.bfloat16])
def test_linear_cross_entropy_matches_the_unfused_path(dtype, tol, chunk) -> None:
    h, w, b, y = _problem(dtype)
    reference = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="none")
    (0.7 * reference.sum()).backward()  # an upstream gradient other than 1
    expected = [p.grad.clone() for p in (h, w, b)]
    for p in (h, w, b):
        p.grad = None
    out = linear_cross_entropy(h, w, b, y, chunk=chunk)
    assert out.per_token.dtype == torch.float32 and not out.per_token.requires_grad
    torch.testing.assert_close(out.per_token, reference.detach(), rtol=1e-5, atol=1e-5)
    (0.7 * out.sum).backward()
    for name, p, e in zip("hwb", (h, w, b), expected):
        assert p.grad.dtype == dtype, name
        err = (p.grad.double() - e.double()).abs().max() / e.double().abs().max()
        assert err < tol, (name, err.item())


def test_linear_cross_entropy_shapes_no_bias_and_no_grad() -> None:
    h, w, _, y = _problem(torch.float32, n=24)
    h3, y3 = h.detach().view(2, 12, -1), y.view(2, 12)
    reference = F.cross_entropy(F.linear(h3, w).float().flatten(0, 1), y, reduction="none").view(2, 12)
    with torch.no_grad():
        out = linear_cross_entropy(h3, w, None, y3, chunk=5)
    assert out.per_token.shape == (2, 12) and not out.sum.requires_grad
    torch.testing.assert_close(out.per_token, reference.detach())
    torch.testing.assert_close(out.sum, reference.sum().detach())
    # only the weight needs a gradient (h is a leaf without grad)
    out = linear_cross_entropy(h3, w, None, y3, chunk=5)
    out.sum.backward()
    torch.testing.assert_close(w.grad, torch.autograd.grad(reference.sum(), w)[0])
    assert chunk_tokens(32000) == 524 and chunk_tokens(50257, "cuda") == 5341
    assert chunk_tokens(10**9) == 1 and chunk_tokens(1000, chunk_bytes=4000) == 1
    with pytest.raises(ValueError):
        linear_cross_entropy(h3, w, None, y3[:, :5])


def test_example_noise_is_drawn_in_place_with_the_same_values() -> None:
    """Same values as the per-example randn + stack it replaced, exactly, for any shape."""
    dev = torch.device("cpu")
    for shape in [(3,), (17,), (5, 7), (256, 32)]:
        new = example_normal(shape, example_generators(1, 2, torch.arange(5), dev), dev)
        old = torch.stack([torch.randn(shape, generator=g) for g in example_generators(1, 2, torch.arange(5), dev)])
        assert torch.equal(new, old), shape
        new = example_uniform(shape, example_generators(1, 2, torch.arange(5), dev), dev)
        old = torch.stack([torch.rand(shape, generator=g) for g in example_generators(1, 2, torch.arange(5), dev)])
        assert torch.equal(new, old), shape


def _reference_flm_loss(model: DiT, ids, t, tau, gens, low_rank: bool):
    """flm_loss as it was before the fused loss, the float32 Gram and the in-place noise."""
    g = tau(t)
    if low_rank:
        dim = model.tok_emb.embedding_dim
        z = torch.stack([torch.randn((ids.shape[1], dim), generator=gen) for gen in gens])
        w = model.tok_emb.weight
        w64 = w.to(torch.float64)
        gram = w64.mT @ w64
        eye = torch.eye(dim, dtype=gram.dtype)
        r = torch.linalg.cholesky(gram + 1e-12 * gram.diagonal().mean().detach() * eye).mT.float()
        gw = g.float()[:, None, None]
        h = ((1.0 - gw) * (z @ r) + gw * w[ids].float()).to(w.dtype)
        logits = model.forward_embedded(h, t)
    else:
        eps = torch.stack([torch.randn((ids.shape[1], model.tok_emb.num_embeddings), generator=gen) for gen in gens])
        logits = model(interpolate(ids, eps, g), t)
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    return ce.sum(), ce.detach().mean(1)


@pytest.mark.parametrize("low_rank", [True, False])
def test_flm_loss_and_gradients_agree_with_the_previous_code(low_rank: bool) -> None:
    """Loss within 1e-5 relative, every parameter's gradient within 1e-4 of its largest entry."""
    cfg = ModelConfig(vocab_size=500, seq_len=16, dim=32, n_layers=2, n_heads=2, cond_dim=16)
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():  # non-zero output and adaLN layers, so that every parameter gets gradient
        for layer in [block.adaLN for block in model.blocks] + [model.final.adaLN, model.final.linear]:
            torch.nn.init.normal_(layer.weight, std=0.1)
            torch.nn.init.normal_(layer.bias, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    tau = get_tau(cfg.vocab_size)
    gens = lambda: example_generators(0, 3, torch.arange(4), torch.device("cpu"))  # noqa: E731

    results = []
    for fn in (_reference_flm_loss, flm_loss):
        model.zero_grad(set_to_none=True)
        total, per_example = fn(model, ids, t, tau, gens(), low_rank)
        (total / ids.numel()).backward()
        results.append((total.detach(), per_example, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_total, ref_per, ref_grads), (total, per, grads) = results
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
    torch.testing.assert_close(per, ref_per, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, name
        err = (grads[name] - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, (name, err.item())
