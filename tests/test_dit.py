"""flm.model.dit: input paths, meta-device init, zero-init output, two-time conditioning,
time scale, attention soft-capping, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from flm.config import ModelConfig
from flm.flow import embed_noisy_tokens
from flm.model import DiT
from flm.model.dit import TimeEmbedding, _apply_rotary, rotary

CFG = ModelConfig(vocab_size=50, seq_len=12, dim=32, n_layers=2, n_heads=4, cond_dim=16)
B = 3


def _inputs(cfg: ModelConfig = CFG, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=gen), torch.rand(B, generator=gen)


@torch.no_grad()
def _randomize_zero_layers(model: DiT) -> DiT:
    """Give the zero-initialised layers (adaLN, output) non-zero weights so every path matters."""
    layers = [block.adaLN for block in model.blocks] + [model.final.adaLN, model.final.linear]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.1)
        torch.nn.init.normal_(layer.bias, std=0.1)
    return model


def _model(cfg: ModelConfig = CFG, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return _randomize_zero_layers(DiT(cfg))


def test_input_paths_agree() -> None:
    model = _model()
    ids, t = _inputs()
    logits = model(ids, t)
    assert logits.shape == (B, CFG.seq_len, CFG.vocab_size) and logits.abs().max() > 0
    one_hot = F.one_hot(ids, CFG.vocab_size).float()
    assert torch.equal(model(one_hot, t), logits)  # e(x) @ W_in is the lookup, exactly
    assert torch.equal(model.forward_embedded(model.tok_emb(ids), t), logits)


def test_noisy_forward_is_the_low_rank_shortcut() -> None:
    model = _model()
    ids, t = _inputs()
    g = torch.tensor([0.0, 0.5, 0.9])
    out = model(ids, t, g=g, generator=torch.Generator().manual_seed(7))
    h = embed_noisy_tokens(model.tok_emb.weight, ids, g, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, model.forward_embedded(h, t), rtol=0, atol=0)


def test_fresh_model_predicts_zero_logits() -> None:
    for cfg in (CFG, dataclasses.replace(CFG, two_times=True)):
        model = DiT(cfg)
        ids, t = _inputs(cfg)
        out = model(ids, t, t.flip(0)) if cfg.two_times else model(ids, t)
        assert torch.equal(out, torch.zeros_like(out))


def test_meta_construction_then_init_matches_direct_init() -> None:
    with torch.device("meta"):
        meta = DiT(CFG)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    direct = DiT(CFG)
    torch.manual_seed(3)
    direct.init_weights()
    for (name, p), q in zip(meta.named_parameters(), direct.parameters()):
        assert torch.equal(p, q), name
    # init statistics: N(0, 0.02^2) weights, zero biases, zero adaLN and output layer
    assert abs(meta.tok_emb.weight.std().item() - 0.02) < 0.001
    assert abs(meta.blocks[0].mlp[0].weight.std().item() - 0.02) < 0.001
    assert abs(meta.blocks[1].qkv.weight.mean().item()) < 0.001
    for name, p in meta.named_parameters():
        if name.endswith("bias") or "adaLN" in name or name.startswith("final.linear"):
            assert torch.count_nonzero(p) == 0, name
    ids, t = _inputs()
    out = _randomize_zero_layers(meta)(ids, t)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_two_times_uses_second_embedder_only_when_nonzero() -> None:
    two = _model(dataclasses.replace(CFG, two_times=True))
    ids, s = _inputs()
    t2 = torch.tensor([0.1, 0.6, 1.0])
    assert not torch.allclose(two(ids, s, t2), two(ids, s, t2.flip(0)))
    with torch.no_grad():
        torch.nn.init.zeros_(two.time_emb2.mlp[-1].weight)
        torch.nn.init.zeros_(two.time_emb2.mlp[-1].bias)
    one = DiT(CFG)
    missing, unexpected = one.load_state_dict(two.state_dict(), strict=False)
    assert not missing and all(k.startswith("time_emb2.") for k in unexpected)
    torch.testing.assert_close(two(ids, s, t2), one(ids, s), rtol=0, atol=0)
    torch.testing.assert_close(two(ids, s, t2.flip(0)), one(ids, s), rtol=0, atol=0)
    with pytest.raises(ValueError):
        two(ids, s)
    with pytest.raises(ValueError):
        one(ids, s, t2)


def test_gradients_flow() -> None:
    ids, t = _inputs()
    fresh = DiT(CFG)  # zero output layer: only it receives gradient at the first step
    F.cross_entropy(fresh(ids, t).flatten(0, 1), ids.flatten()).backward()
    for name, p in fresh.named_parameters():
        assert (p.grad.abs().sum() > 0) == name.startswith("final.linear"), name
    model = _model(dataclasses.replace(CFG, two_times=True))
    dense = F.one_hot(ids, CFG.vocab_size).float().requires_grad_()
    F.cross_entropy(model(dense, t, t.flip(0)).flatten(0, 1), ids.flatten()).backward()
    assert dense.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_dropout_only_in_training() -> None:
    model = _model(dataclasses.replace(CFG, dropout=0.5))
    ids, t = _inputs()
    assert not torch.equal(model(ids, t), model(ids, t))
    model.eval()
    assert torch.equal(model(ids, t), model(ids, t))


def test_time_scale_multiplies_t_before_the_frequencies() -> None:
    raw, scaled = TimeEmbedding(16, scale=1.0), TimeEmbedding(16)
    assert scaled.scale == 1000.0  # the default: this project's original conditioning
    scaled.load_state_dict(raw.state_dict())
    t = torch.tensor([0.0, 0.3, 1.0])
    torch.testing.assert_close(raw(t), scaled(t / 1000.0))
    assert not torch.allclose(raw(t), scaled(t))
    # the model reads cfg.time_scale (both embeddings of a two-time model)
    cfg = dataclasses.replace(CFG, two_times=True)
    old, new = _model(cfg), _model(dataclasses.replace(cfg, time_scale=1.0))
    assert old.time_emb.scale == old.time_emb2.scale == 1000.0
    assert new.time_emb.scale == new.time_emb2.scale == 1.0
    ids, t = _inputs()
    assert not torch.allclose(old(ids, t, t.flip(0)), new(ids, t, t.flip(0)))


def test_blocks_pass_attn_softcap(monkeypatch: pytest.MonkeyPatch) -> None:
    import flm.model.dit as dit

    seen = []
    real = dit.attention
    monkeypatch.setattr(dit, "attention", lambda *a, **kw: seen.append(kw.get("softcap")) or real(*a, **kw))
    ids, t = _inputs()
    plain = _model()
    for block in plain.blocks:  # large attention logits, so a cap of 1 changes them
        with torch.no_grad():
            block.qkv.weight.mul_(30.0)
    out = plain(ids, t)
    capped = DiT(dataclasses.replace(CFG, attn_softcap=1.0))
    capped.load_state_dict(plain.state_dict())
    assert not torch.allclose(capped(ids, t), out, atol=1e-3)
    huge = DiT(dataclasses.replace(CFG, attn_softcap=1e6))  # c tanh(z / c) -> z
    huge.load_state_dict(plain.state_dict())
    torch.testing.assert_close(huge(ids, t), out, atol=1e-4, rtol=1e-4)
    assert seen == [0.0] * CFG.n_layers + [1.0] * CFG.n_layers + [1e6] * CFG.n_layers


def test_rotary_depends_on_relative_position_only() -> None:
    rope = rotary(16, 8, 10000.0, torch.device("cpu"))
    q, k = torch.randn(2, 8, dtype=torch.float64).float().unbind(0)
    qr = _apply_rotary(q.expand(1, 16, 1, 8), rope)[0, :, 0]
    kr = _apply_rotary(k.expand(1, 16, 1, 8), rope)[0, :, 0]
    scores = qr @ kr.T  # scores[p, r] = <R_p q, R_r k> depends on r - p only
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(16), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0, 1], scores[0, 2])


def test_num_params_and_flops_per_token() -> None:
    cfg = ModelConfig(vocab_size=50257, seq_len=1024, dim=768, n_layers=12, n_heads=12, cond_dim=128)
    with torch.device("meta"):
        model = DiT(cfg)
    n_all, n_body = model.num_params(), model.num_params(exclude_embedding=True)
    assert n_all - n_body == 50257 * 768
    body = 12 * (4 * 768**2 + 2 * 768 * 3072)
    flops = model.flops_per_token(1024)
    assert flops == 6 * (body + 768 * 50257) + 12 * 12 * 768 * 1024
    assert model.flops_per_token(1024, dense_input=True) - flops == 6 * 50257 * 768
    assert model.flops_per_token() == flops  # seq_len defaults to cfg.seq_len
    # the per-token matmul weights are most of the non-embedding parameters (adaLN, biases aside)
    assert 0.75 < (body + 768 * 50257) / n_body < 1.0


def test_bfloat16_weights() -> None:
    model = _model()
    ids, t = _inputs()
    reference = model(ids, t)
    model.to(torch.bfloat16)
    dense = F.one_hot(ids, CFG.vocab_size).float()
    for out in (model(ids, t), model(dense, t), model(ids, t, g=torch.rand(B), generator=torch.Generator())):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(model(ids, t).float(), reference, atol=0.05, rtol=0.05)
