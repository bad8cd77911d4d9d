"""One row of the results table, for generated samples or for held-out data.

Tables need the data's own row: the same metrics on held-out reference text cut
into samples of the generator's length. :func:`chunk_token_ids` makes those
samples from a token stream (:func:`spread_windows` from a whole split), and
:func:`score_samples` computes every metric for any set of token-id samples,
generated or reference, so both rows are computed the same way.
:func:`split_at_eos` cuts a sample into its documents before decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from flm.eval.entropy import distinct_n, mean_entropy

if TYPE_CHECKING:
    import numpy as np

    from flm.eval.genppl import Scorer


class TokenSplit(Protocol):
    """What :func:`spread_windows` needs of a split (``flm.data.TokenDataset`` has it)."""

    num_tokens: int

    def read(self, start: int, length: int) -> np.ndarray: ...


def chunk_token_ids(
    token_ids: Iterable[int], length: int, num_samples: int | None = None
) -> list[list[int]]:
    """Consecutive, non-overlapping samples of exactly ``length`` tokens from a token stream.

    A trailing piece shorter than ``length`` is dropped; at most ``num_samples``
    samples are returned (all if None). Feed it the concatenated held-out split
    (with the data pipeline's document separators) to mimic packed training samples.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    samples: list[list[int]] = []
    current: list[int] = []
    for token in token_ids:
        current.append(int(token))
        if len(current) == length:
            samples.append(current)
            current = []
            if num_samples is not None and len(samples) >= num_samples:
                break
    return samples


def spread_windows(split: TokenSplit, length: int, count: int) -> list[list[int]]:
    """Up to ``count`` non-overlapping windows of ``length`` tokens spread evenly over a split.

    Window i starts at i * (num_tokens // count), so a split stored document by
    document is sampled from beginning to end rather than only its first
    documents. When the split holds fewer than ``count * length`` tokens, as many
    windows as fit are returned (none if not even one fits).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    count = min(count, split.num_tokens // length)
    if count < 1:
        return []
    stride = split.num_tokens // count  # >= length, so windows never overlap
    return [[int(t) for t in split.read(i * stride, length)] for i in range(count)]


def split_at_eos(token_ids: Iterable[int], eos_id: int) -> list[list[int]]:
    """The documents of a sample: its ids cut at every EOS, EOS and empty pieces dropped.

    >>> split_at_eos([5, 6, 2, 2, 7, 2], eos_id=2)
    [[5, 6], [7]]
    """
    documents: list[list[int]] = [[]]
    for token in token_ids:
        if int(token) == eos_id:
            documents.append([])
        else:
            documents[-1].append(int(token))
    return [doc for doc in documents if doc]


def score_samples(
    samples: Sequence[Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    scorer: Scorer | None = None,
    reference_texts: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    gen_ppl_protocol: str = "flm",
    gen_ppl_max_length: int | None = None,
    mauve_clusters: int | str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """All metrics for token-id ``samples`` of the generator's tokenizer.

    ``decode`` turns one sample into text (e.g. ``tokenizer.decode``). Entropy and
    distinct-n use the ids themselves; Gen PPL (if ``scorer`` is given) and MAUVE
    against ``reference_texts`` (if given) use the decoded text. For the data's own
    row, pass reference chunks as ``samples`` and a *disjoint* reference set as
    ``reference_texts``. ``gen_ppl_protocol`` and ``gen_ppl_max_length`` go to
    ``Scorer.gen_ppl`` as ``protocol`` and ``max_length``; for "paper", ``decode``
    must keep special tokens (``Tokenizer.decode_with_special_tokens``). Keys:
    entropy, distinct_1, distinct_2, distinct_3, num_samples, and gen_ppl, gen_nll,
    gen_ppl_tokens, gen_ppl_protocol, scorer, mauve, mauve_clusters, embedder when
    computed.
    """
    row: dict[str, Any] = {
        "num_samples": len(samples),
        "entropy": mean_entropy(samples),
        **{f"distinct_{n}": distinct_n(samples, n) for n in (1, 2, 3)},
    }
    if scorer is None and reference_texts is None:
        return row
    texts = [decode(sample) for sample in samples]
    if scorer is not None:
        ppl = scorer.gen_ppl(texts, batch_size=batch_size, max_length=gen_ppl_max_length, progress=progress,
                             protocol=gen_ppl_protocol)
        row.update(gen_ppl=ppl["ppl"], gen_nll=ppl["nll"], gen_ppl_tokens=ppl["tokens"],
                   gen_ppl_protocol=ppl["protocol"], scorer=ppl["scorer"])
    if reference_texts is not None:
        from flm.eval.mauve_score import mauve

        result = mauve(reference_texts, texts, num_clusters=mauve_clusters, seed=seed)
        row.update(mauve=result["mauve"], mauve_clusters=result["num_clusters"], embedder=result["embedder"])
    return row
