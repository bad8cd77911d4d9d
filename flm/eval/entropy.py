"""Diversity metrics over token sequences: unigram entropy and distinct-n.

Both work on any sequences of hashable tokens (token ids, or words from
``text.split()``). The paper's entropy is computed on the *generator's* token
ids, so pass the sampled ids, not text. A plain ``str`` is rejected, because
iterating it would silently measure characters.

These functions need only the standard library; no eval extra is required.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

Tokens = Sequence[Hashable]


def _as_tokens(sample: object) -> list[Hashable]:
    """A sample as a list of tokens; accepts lists, tuples, numpy arrays and tensors."""
    if isinstance(sample, (str, bytes)):
        raise TypeError("expected a sequence of tokens, got a string: tokenise it first (e.g. text.split())")
    tolist = getattr(sample, "tolist", None)  # numpy arrays and torch tensors
    tokens = tolist() if callable(tolist) else list(sample)  # type: ignore[call-overload]
    if tokens and isinstance(tokens[0], list):
        raise TypeError("expected one 1-D sample; use mean_entropy / distinct_n for a batch")
    return tokens


def _as_samples(samples: Iterable[Tokens]) -> list[list[Hashable]]:
    """A batch as a list of token lists; a 2-D array or tensor counts as one sample per row."""
    if isinstance(samples, (str, bytes)):
        raise TypeError("expected a batch of token sequences, got a string")
    tolist = getattr(samples, "tolist", None)
    rows = tolist() if callable(tolist) else samples
    return [_as_tokens(row) for row in rows]


def sample_entropy(tokens: Tokens) -> float:
    """Unigram entropy, in nats, of one sample's empirical token distribution.

    With c_v the count of token v among the sample's n tokens,
    H = -sum_v (c_v / n) log(c_v / n). A sample repeating one token has H = 0; a
    sample using k distinct tokens equally often has H = log k, the maximum for k
    distinct tokens. Raises ValueError on an empty sample, for which H is undefined.
    """
    counts = Counter(_as_tokens(tokens))
    n = sum(counts.values())
    if n == 0:
        raise ValueError("entropy of an empty sample is undefined")
    # H = log n - (1/n) sum_v c_v log c_v: one log per distinct token, no tiny ratios.
    return max(0.0, math.log(n) - sum(c * math.log(c) for c in counts.values()) / n)


def mean_entropy(samples: Iterable[Tokens]) -> float:
    """Per-sample unigram entropy (see :func:`sample_entropy`), averaged over samples.

    This is the paper's "Entropy" column (about 4.3 nats on LM1B data and 5.4 on
    OWT at their sequence lengths). Samples of different lengths count equally.
    """
    rows = _as_samples(samples)
    if not rows:
        raise ValueError("mean entropy of no samples is undefined")
    return sum(sample_entropy(row) for row in rows) / len(rows)


def distinct_n(samples: Iterable[Tokens], n: int) -> float:
    """Fraction of distinct n-grams among all n-grams of all samples.

    distinct-n = |set of n-grams| / (number of n-gram occurrences), where n-grams
    are contiguous windows inside one sample (none spans two samples) and the set
    is pooled over samples, so the same phrase repeated across samples lowers it.
    It lies in (0, 1]; 1 means no n-gram occurs twice. Raises ValueError when no
    sample has n tokens.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[Hashable, ...]] = set()
    total = 0
    for row in _as_samples(samples):
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        seen.update(grams)
        total += len(grams)
    if total == 0:
        raise ValueError(f"no sample has {n} tokens, so distinct-{n} is undefined")
    return len(seen) / total
