"""The methods registry and the discrete baselines' maths: MDLM (SUBS, NELBO, ancestral
sampling) and AR (causal loss, KV-cache sampling)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flm.config import Config, ModelConfig
from flm.methods import METHODS, get_method
from flm.methods.ar import AR, ar_loss, ar_sample, next_token, shift_right
from flm.methods.base import Batch
from flm.methods.mdlm import MDLM, mask_tokens, mdlm_loss, mdlm_sample, subs_log_probs
from flm.model import DiT
from flm.rng import example_generators

# ---------------------------------------------------------------- registry


def test_registry_lists_every_method_with_the_interface():
    assert sorted(METHODS) == ["ar", "flm", "fmlm_stage1", "fmlm_stage2", "mdlm", "sdtt"]
    for name, cls in METHODS.items():
        assert cls.name == name
        for member in ("build", "for_generation", "init_model", "loss", "sample", "scalars",
                       "bucket_label", "any_steps"):
            assert hasattr(cls, member), (name, member)
    with pytest.raises(ValueError, match="unknown method .*'gan'.*expected one of"):
        get_method("gan")


def test_build_fixes_the_backbone_of_each_method():
    for name, (causal, extra) in {"flm": (False, 0), "mdlm": (False, 1), "ar": (True, 1)}.items():
        cfg = Config(objective=name, model=ModelConfig(vocab_size=16, seq_len=8, dim=16, n_layers=1, n_heads=2,
                                                       cond_dim=8, causal=not causal, extra_input_ids=3))
        METHODS[name].build(cfg, None, torch.device("cpu"))
        assert (cfg.model.causal, cfg.model.extra_input_ids) == (causal, extra)
        model = DiT(cfg.model)
        assert model.tok_emb.num_embeddings == 16 + extra and model.final.linear.out_features == 16


# ---------------------------------------------------------------- MDLM

V, L = 8, 2
PAIRS = torch.tensor([[0, 4], [1, 5], [2, 6], [3, 7]])  # the correlated-modes toy: 4 valid pairs over V = 8


class ExactPairs(nn.Module):
    """The exact SUBS posterior of the pairs toy (uniform over PAIRS) as logits over V.

    A masked position whose partner is visible is its pair's other token; with the
    partner masked too it is uniform over the 4 tokens that occur at that position."""

    mask_id = V

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*z.shape, V), -1e4)
        for pos in range(L):
            other = z[:, 1 - pos]
            visible = other != self.mask_id
            partner = PAIRS[:, pos][(other % 4).clamp(max=3)]  # token paired with `other`
            logits[:, pos] = torch.where(visible[:, None],
                                         torch.where(torch.arange(V) == partner[:, None], 0.0, -1e4),
                                         torch.where(torch.isin(torch.arange(V), PAIRS[:, pos]), 0.0, -1e4))
        return logits


def _pairs(n: int, gen: torch.Generator) -> torch.Tensor:
    return PAIRS[torch.randint(0, 4, (n,), generator=gen)]


def _valid_rate(ids: torch.Tensor) -> float:
    return (ids[:, 1] == ids[:, 0] + 4).float().mean().item()


def test_subs_never_predicts_the_mask_and_carries_unmasked_tokens():
    logits = torch.randn(3, 5, V)
    z = torch.tensor([[V, 1, V, 7, 0]] * 3)
    logp = subs_log_probs(logits, z, V)
    assert logp.shape[-1] == V  # no mask column: the mask can never be predicted
    masked = z == V
    torch.testing.assert_close(logp[masked], torch.log_softmax(logits, -1)[masked])
    kept = logp[~masked]
    assert torch.equal(kept.exp(), torch.nn.functional.one_hot(z[~masked], V).float())

    # Unmasked positions contribute nothing to the loss.
    model = DiT(ModelConfig(vocab_size=V, seq_len=5, dim=16, n_layers=1, n_heads=2, cond_dim=8, extra_input_ids=1))
    ids = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(0))
    t = torch.ones(4)  # nothing masked
    loss, per_example = mdlm_loss(model, ids, t, example_generators(0, 0, range(4), torch.device("cpu")), V)
    assert loss.item() == 0.0 and torch.equal(per_example, torch.zeros(4))


def test_masking_rate_is_one_minus_t():
    gens = example_generators(0, 0, range(4), torch.device("cpu"))
    ids = torch.zeros(4, 4000, dtype=torch.long)
    z = mask_tokens(ids, torch.tensor([0.0, 0.25, 0.5, 0.9]), gens, V)
    rate = (z == V).float().mean(1)
    torch.testing.assert_close(rate, torch.tensor([1.0, 0.75, 0.5, 0.1]), atol=0.03, rtol=0)


def test_nelbo_of_the_exact_model_is_the_data_entropy():
    """The continuous-time NELBO is tight for the exact posterior: E[NELBO] = H(x) = log 4
    nats per pair, log(4) / 2 per token, within Monte-Carlo error."""
    gen = torch.Generator().manual_seed(0)
    n = 20000
    ids = _pairs(n, gen)
    t = torch.rand(n, generator=gen) * (1 - 1e-3)
    gens = example_generators(1, 0, range(n), torch.device("cpu"))
    _, per_example = mdlm_loss(ExactPairs(), ids, t, gens, V)
    mean, stderr = per_example.mean().item(), per_example.std().item() / math.sqrt(n)
    assert abs(mean - math.log(4) / 2) < 4 * stderr, (mean, stderr)
    assert stderr < 0.02


def test_ancestral_sampler_reveals_everything_and_never_changes_a_revealed_token():
    seen = []

    class Recorder(ExactPairs):
        def forward(self, z, t):
            seen.append((z.clone(), t.clone()))
            return super().forward(z, t)

    gen = torch.Generator().manual_seed(0)
    ids = mdlm_sample(Recorder(), 64, L, V, 5, gen)
    assert len(seen) == 5 and (ids != V).all()
    assert [round(t[0].item(), 3) for _, t in seen] == [0.0, 0.2, 0.4, 0.6, 0.8]
    states = [z for z, _ in seen] + [ids]
    for before, after in zip(states, states[1:]):
        revealed = before != V
        assert torch.equal(after[revealed], before[revealed])
    # Each step reveals (t_{i+1} - t_i) / (1 - t_i) of the remaining masks: 1/5 of all tokens per step.
    remaining = [(z == V).float().mean().item() for z, _ in seen]
    assert remaining == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], abs=0.08)


def test_one_step_mdlm_makes_factorised_mixtures():
    """The factorisation error of few-step discrete diffusion (the paper's Figure 3).

    With the *exact* denoiser (the best any MDLM can learn), one ancestral step from
    all-masks draws both tokens independently from their marginals: about 25% of the
    pairs are valid, the rest invalid mixtures. Many steps reveal the pair one token at
    a time and recover it. Side by side, one-step sampling on the same toy:

        exact MDLM, 1 step                   ~0.25 valid (this test)
        factorised teacher marginals         0.252 / 0.257 / 0.270 valid (tests/test_flow_map.py)
        FMLM (one network evaluation)        0.968 / 0.970 / 0.969 valid (tests/test_flow_map.py)
    """
    gen = torch.Generator().manual_seed(0)
    one_step = _valid_rate(mdlm_sample(ExactPairs(), 4000, L, V, 1, gen))
    many = _valid_rate(mdlm_sample(ExactPairs(), 4000, L, V, 64, gen))
    assert 0.22 < one_step < 0.28
    assert many > 0.97


def test_mdlm_method_loss_and_sampler_through_the_interface():
    cfg = Config(objective="mdlm", model=ModelConfig(vocab_size=V, seq_len=6, dim=16, n_layers=1, n_heads=2,
                                                    cond_dim=8))
    method = MDLM.build(cfg, None, torch.device("cpu"))
    model = DiT(cfg.model)
    ids = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(1))
    batch = Batch(ids, torch.arange(4), 4, torch.Generator().manual_seed(2),
                  example_generators(0, 0, range(4), torch.device("cpu")))
    out = method.loss(model, batch)
    assert out.objective is out.loss and out.per_item.shape == (4,) and out.bucket.shape == (4,)
    assert out.bucket.max() < 1 - 1e-3 + 1e-6
    # A fresh model predicts uniform logits: the NELBO is log V per token in expectation.
    assert out.loss.item() / ids.numel() == pytest.approx(math.log(V), rel=0.5)
    samples, nfe = method.sample(model, 3, 4, torch.Generator().manual_seed(0))
    assert nfe == 4 and samples.shape == (3, 6) and int(samples.max()) < V


# ---------------------------------------------------------------- AR


def _ar_model(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(ModelConfig(vocab_size=V, seq_len=10, dim=32, n_layers=2, n_heads=4, cond_dim=8, causal=True,
                            extra_input_ids=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def test_ar_attention_is_causal_and_the_loss_is_next_token_cross_entropy():
    model = _ar_model()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))
    inp = shift_right(ids, V)
    assert torch.equal(inp[:, 0], torch.full((2,), V)) and torch.equal(inp[:, 1:], ids[:, :-1])
    t = torch.zeros(2)
    changed = inp.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % V
    a, b = model(inp, t), model(changed, t)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # the future does not leak
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    loss, per_token = ar_loss(model, ids, V)
    expected = torch.nn.functional.cross_entropy(a.flatten(0, 1), ids.flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert per_token.shape == (2, 10)


def test_kv_cache_sampling_gives_the_same_tokens_as_recomputing_the_prefix():
    model = _ar_model(1)
    cached, nfe = ar_sample(model, 4, 10, V, torch.Generator().manual_seed(3))
    full, _ = ar_sample(model, 4, 10, V, torch.Generator().manual_seed(3), use_cache=False)
    assert cached.shape == (4, 10) and torch.equal(cached, full) and nfe == 10
    nucleus, _ = ar_sample(model, 4, 10, V, torch.Generator().manual_seed(3), top_p=0.5)
    assert torch.equal(nucleus, ar_sample(model, 4, 10, V, torch.Generator().manual_seed(3), top_p=0.5,
                                          use_cache=False)[0])


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([next_token(logits, gen, top_p=0.7) for _ in range(2000)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    full = torch.cat([next_token(logits, gen) for _ in range(4000)]).flatten()
    assert (full == 3).float().mean().item() == pytest.approx(0.05, abs=0.015)


def test_ar_method_samples_its_own_length():
    cfg = Config(objective="ar", model=ModelConfig(vocab_size=V, seq_len=7, dim=16, n_layers=1, n_heads=2,
                                                  cond_dim=8))
    method = AR.build(cfg, None, torch.device("cpu"))
    ids, nfe = method.sample(DiT(cfg.model), 2, 1, torch.Generator().manual_seed(0))
    assert ids.shape == (2, 7) and nfe == 7 and not method.any_steps
    with pytest.raises(ValueError, match="top_p"):
        AR.for_generation({"model": {"seq_len": 7, "vocab_size": V}}, torch.device("cpu"), top_p=1.5)
    with pytest.raises(ValueError, match="takes no options"):
        MDLM.for_generation({"model": {"seq_len": 7, "vocab_size": V}}, torch.device("cpu"), top_p=0.9)


# ---------------------------------------------------------------- SDTT


def _mdlm_dit(seed: int, vocab: int = V, seq_len: int = 6) -> DiT:
    torch.manual_seed(seed)
    model = DiT(ModelConfig(vocab_size=vocab, seq_len=seq_len, dim=16, n_layers=1, n_heads=2, cond_dim=8,
                            extra_input_ids=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def test_sdtt_target_is_two_teacher_steps():
    """A direct transcription: from z_t, two ancestral teacher steps of size dt; each token
    revealed on the way keeps the teacher's distribution of the step that revealed it, the
    rest that of the second step."""
    from flm.methods.sdtt import two_step_target

    teacher = _mdlm_dit(0)
    B, Lq, dt = 5, 6, 0.2
    ids = torch.randint(0, V, (B, Lq), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.55])
    z = mask_tokens(ids, t, example_generators(0, 0, range(B), torch.device("cpu")), V)
    got = two_step_target(teacher, z, t, dt, V, example_generators(0, 1, range(B), torch.device("cpu")))

    gens = example_generators(0, 1, range(B), torch.device("cpu"))
    for b in range(B):
        zb, tb = z[b:b + 1].clone(), float(t[b])
        chosen = {}
        for step in range(2):
            with torch.no_grad():
                logp = torch.log_softmax(teacher(zb, torch.tensor([tb])).float(), -1)[0]
            draw = torch.multinomial(logp.exp().double(), 1, generator=gens[b]).squeeze(-1)
            u = torch.rand(Lq, generator=gens[b], dtype=torch.float64)
            for pos in range(Lq):
                if zb[0, pos] == V and u[pos] < min(1.0, dt / (1.0 - tb)):
                    chosen[pos] = logp[pos]
                    zb[0, pos] = draw[pos]
            tb += dt
        for pos in range(Lq):
            if z[b, pos] != V:
                continue
            expected = chosen.get(pos, logp[pos])
            torch.testing.assert_close(got[b, pos], expected, rtol=1e-4, atol=1e-4)  # batched vs single forward


def test_sdtt_student_starts_as_the_teacher_and_its_loss_is_zero_there():
    from flm.methods.sdtt import SDTT, sdtt_loss

    teacher = _mdlm_dit(0)
    method = SDTT(6, V, teacher, 8, {})
    student = DiT(teacher.cfg).eval()
    method.init_model(student)
    a, _ = method.sample(student, 4, 3, torch.Generator().manual_seed(2))
    b = mdlm_sample(teacher, 4, 6, V, 3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    ids = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(3))
    gens = example_generators(0, 0, range(4), torch.device("cpu"))
    # dt = 0: both teacher steps are at t and reveal nothing, so the target is the teacher's own
    # prediction and the KL of a student equal to the teacher vanishes.
    loss, _ = sdtt_loss(student, teacher, ids, torch.full((4,), 0.3), 0.0, V, gens)
    assert abs(loss.item()) < 1e-5
    loss, _ = sdtt_loss(_mdlm_dit(9), teacher, ids, torch.full((4,), 0.3), 0.1, V, gens)
    assert loss.item() > 0


def test_sdtt_one_step_still_factorises():
    """Whatever an SDTT student learns, its one step from all-masks draws the positions
    independently: with the exact denoiser about 25% valid pairs (FMLM: ~0.97)."""
    from flm.methods.sdtt import SDTT

    ids, nfe = SDTT(L, V, None, 2, {}).sample(ExactPairs(), 4000, 1, torch.Generator().manual_seed(0))
    assert nfe == 1 and 0.22 < _valid_rate(ids) < 0.28
