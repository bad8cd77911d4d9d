"""Conditional generation: prompts, suffixes and infilling for every method, and the
Python API's argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flm.api import LanguageModel
from flm.config import FlowConfig, ModelConfig
from flm.flow import get_tau
from flm.methods.ar import AR
from flm.methods.base import Fixed
from flm.methods.flm import FLM
from flm.methods.fmlm import FMLMStage1, FMLMStage2
from flm.methods.mdlm import MDLM, mdlm_sample
from flm.model import DiT

V, L = 8, 2
PAIRS = torch.tensor([[0, 4], [1, 5], [2, 6], [3, 7]])  # the correlated-modes toy


def _random_dit(seed: int, vocab: int = 16, seq_len: int = 10, **kw) -> DiT:
    torch.manual_seed(seed)
    model = DiT(ModelConfig(vocab_size=vocab, seq_len=seq_len, dim=16, n_layers=1, n_heads=2, cond_dim=8, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def _fixed(num: int, seq_len: int, given: dict[int, int]) -> Fixed:
    ids, known = torch.zeros(num, seq_len, dtype=torch.long), torch.zeros(num, seq_len, dtype=torch.bool)
    for pos, tok in given.items():
        ids[:, pos], known[:, pos] = tok, True
    return Fixed(ids, known)


def test_every_method_returns_the_fixed_tokens_unchanged():
    given = {0: 3, 1: 7, 5: 1, 9: 12}  # a prefix, a middle token and the last position
    fixed = _fixed(4, 10, given)
    flm = FLM(FlowConfig(), 10, 16)
    stage1 = FMLMStage1(FlowConfig(), 10, 16, _random_dit(0), None, None, 0, {})
    stage2 = FMLMStage2(FlowConfig(), 10, 16, None, None, None, 0, {})
    cases = [(flm, _random_dit(1)), (stage1, _random_dit(2, two_times=True)), (stage2, _random_dit(3, two_times=True)),
             (MDLM(10, 16), _random_dit(4, extra_input_ids=1))]
    for method, model in cases:
        for steps in (1, 3):
            ids, _ = method.sample(model, 4, steps, torch.Generator().manual_seed(0), fixed=fixed)
            assert all(torch.equal(ids[:, p], torch.full((4,), t)) for p, t in given.items()), method.name
    ar_model = _random_dit(5, causal=True, extra_input_ids=1)
    prompt = _fixed(4, 10, {0: 3, 1: 7, 2: 2})
    ids, nfe = AR(10, 16).sample(ar_model, 4, 1, torch.Generator().manual_seed(0), fixed=prompt)
    assert torch.equal(ids[:, :3], prompt.ids[:, :3]) and nfe == 10 - 3
    with pytest.raises(ValueError, match="prompt prefix only"):
        AR(10, 16).sample(ar_model, 4, 1, torch.Generator().manual_seed(0), fixed=fixed)


def test_one_step_flow_map_ignores_the_prompt():
    """What a one-step FMLM does with a prompt: its map starts at s = 0, where the clean
    path of the fixed tokens, (1 - G_0) eps + G_0 e(x) with G_0 = 0, is pure noise. The
    free positions are exactly the unconditional sample's; two steps let the prompt in."""
    stage2, model = FMLMStage2(FlowConfig(), 10, 16, None, None, None, 0, {}), _random_dit(3, two_times=True)
    free = torch.arange(10) >= 3
    uncond, _ = stage2.sample(model, 6, 1, torch.Generator().manual_seed(1))
    for prompt in ({0: 3, 1: 7, 2: 2}, {0: 9, 1: 9, 2: 9}):
        cond, _ = stage2.sample(model, 6, 1, torch.Generator().manual_seed(1), fixed=_fixed(6, 10, prompt))
        assert torch.equal(cond[:, free], uncond[:, free])
    a, _ = stage2.sample(model, 6, 2, torch.Generator().manual_seed(1), fixed=_fixed(6, 10, {0: 3, 1: 7, 2: 2}))
    b, _ = stage2.sample(model, 6, 2, torch.Generator().manual_seed(1), fixed=_fixed(6, 10, {0: 9, 1: 9, 2: 9}))
    assert not torch.equal(a[:, free], b[:, free])


class ExactFlowPairs(nn.Module):
    """The exact FLM denoiser of the pairs toy: the posterior over the 4 pairs given x_g,
    p(k | x) ~ exp(g / (1 - g)^2 <x, e(pair_k)>), as logits of its per-position marginals."""

    def __init__(self, tau) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = self.tau(t.double()).clamp(max=1 - 1e-6)
        score = x.double()[:, 0, PAIRS[:, 0]] + x.double()[:, 1, PAIRS[:, 1]]  # (B, 4)
        log_w = torch.log_softmax((g / (1 - g) ** 2)[:, None] * score, dim=-1)
        logits = torch.full((x.shape[0], L, V), -1e4, dtype=torch.float64)
        logits[:, 0, PAIRS[:, 0]] = log_w
        logits[:, 1, PAIRS[:, 1]] = log_w
        return logits.float()


class ExactMaskedPairs(nn.Module):
    """The exact SUBS posterior of the pairs toy for MDLM (mask id V)."""

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*z.shape, V), -1e4)
        for pos in range(L):
            other = z[:, 1 - pos]
            visible = other != V
            partner = PAIRS[:, pos][(other % 4).clamp(max=3)]
            logits[:, pos] = torch.where(visible[:, None],
                                         torch.where(torch.arange(V) == partner[:, None], 0.0, -1e4),
                                         torch.where(torch.isin(torch.arange(V), PAIRS[:, pos]), 0.0, -1e4))
        return logits


def _valid_rate(ids: torch.Tensor) -> float:
    return (ids[:, 1] == ids[:, 0] + 4).float().mean().item()


def test_fixing_the_first_token_gives_valid_completions():
    """Fix the first token of a pair. MDLM (any steps) completes only valid pairs: the
    revealed token makes its exact posterior a point mass.

    FLM does *not* reach "only valid" by holding the token on its clean path: with the
    exact denoiser (the best a teacher can learn), 400 pairs, seed 0, valid completions
    measured here were

        Euler steps                               16     64     256    1024
        held at (1-g) eps + g e(x), one eps      0.66   0.68   0.69   0.69
        ... with fresh eps each step (ours)      0.84   0.90   0.92   0.95
        ... held at the clean one-hot e(x)       0.96   0.96   0.96   --

    against 1.00 unconditionally at 64 steps. The deterministic ODE lets the free token
    commit while the fixed one is still mostly noise, partly on its own noise; the
    conditional velocity would need a denoiser that knows which positions are clean. We
    hold with fresh noise (in-distribution inputs for a trained network; improves with
    steps) and assert its measured level, so a regression shows.
    """
    n = 400
    first = torch.arange(n) % 4
    fixed = Fixed(torch.stack([first, torch.zeros_like(first)], 1), torch.tensor([[True, False]]).expand(n, -1))
    flm = FLM(FlowConfig(), L, V)
    exact = ExactFlowPairs(get_tau(V))
    ids, _ = flm.sample(exact, n, 256, torch.Generator().manual_seed(0), fixed=fixed)
    assert torch.equal(ids[:, 0], first) and 0.88 < _valid_rate(ids) < 0.99
    free, _ = flm.sample(exact, n, 64, torch.Generator().manual_seed(0))
    assert _valid_rate(free) > 0.97
    for steps in (1, 8):
        ids = mdlm_sample(ExactMaskedPairs(), n, L, V, steps, torch.Generator().manual_seed(0), fixed=fixed)
        assert torch.equal(ids[:, 0], first) and _valid_rate(ids) == 1.0


class _Tok:
    """A stand-in tokenizer: one id per character 'a'.. (vocabulary 16)."""

    vocab_size, path, eos_id = 16, "fake", 15

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + ord("a")) for i in ids)


def _lm(method, model) -> LanguageModel:
    from flm.sampling import Sampler

    config = {"model": {"seq_len": 10, "vocab_size": 16}}
    return LanguageModel(Sampler(method.name, config, method, model, torch.device("cpu")), _Tok())


def test_api_generates_with_prompt_suffix_and_mask():
    lm = _lm(MDLM(10, 16), _random_dit(4, extra_input_ids=1))
    out = lm.generate(num=3, steps=4, seed=0, prompt="abc", suffix="jj")
    assert out.ids.shape == (3, 10) and out.nfe == 4 and out.seconds > 0
    assert all(text.startswith("abc") and text.endswith("jj") for text in out.texts)
    out = lm.generate(num=2, steps=2, mask=[-1, -1, 5, -1, -1, -1, 6, -1, -1, -1])
    assert out.ids[:, 2].tolist() == [5, 5] and out.ids[:, 6].tolist() == [6, 6]
    again = lm.generate(num=2, steps=2, mask=[-1, -1, 5, -1, -1, -1, 6, -1, -1, -1])
    assert torch.equal(out.ids, again.ids)  # seeded


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "abcdefghijk"}, "prompt: 11 tokens; expected 1 to 10"),
    ({"prompt": "abc", "suffix": "abcdefgh"}, "suffix overlaps"),
    ({"mask": [1, 2, 3]}, "mask: expected 10 entries"),
    ({"prompt": [3, 99]}, r"prompt: ids \[99\] are outside the vocabulary"),
])
def test_api_names_bad_conditions(kwargs, message):
    lm = _lm(MDLM(10, 16), _random_dit(4, extra_input_ids=1))
    with pytest.raises(ValueError, match=message):
        lm.generate(num=1, steps=1, **kwargs)


def test_api_ar_takes_a_prompt_only():
    lm = _lm(AR(10, 16), _random_dit(5, causal=True, extra_input_ids=1))
    out = lm.generate(num=2, prompt="abcd")
    assert all(text.startswith("abcd") for text in out.texts) and out.nfe == 6
    with pytest.raises(ValueError, match="prompt prefix only"):
        lm.generate(num=2, suffix="ab")
