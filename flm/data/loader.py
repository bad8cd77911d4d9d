"""Resumable, rank-sharded batches of fixed-length token windows.

Sample ``i`` of a split is the window ``tokens[i*seq_len : (i+1)*seq_len]``
(non-overlapping, the remainder dropped). ``GlobalBatchSampler`` orders samples
as one global stream shared by all ranks:

* Stream: epoch ``e`` contributes a permutation of all N samples, drawn with
  ``numpy.random.Generator(PCG64(SeedSequence([seed, e])))`` (or ``0..N-1`` when
  ``shuffle=False``); epochs follow each other.
* Global batch ``k`` is stream positions ``[k*G, (k+1)*G)`` with ``G = batch_size *
  world_size``; rank ``r`` takes the contiguous slice ``[r*B, (r+1)*B)`` of it.
  Infinite mode (training) carries over across epoch ends, so a global batch may
  hold samples from two epochs and no sample is ever skipped. Finite mode
  (evaluation) is one pass per ``iter()`` over the ``N // G`` complete global
  batches of an epoch; the tail of fewer than G samples is skipped.
* State is global: ``samples_consumed`` (stream position) plus the settings that
  define the stream. Restoring into a different ``world_size`` with the same G
  continues with exactly the next unseen samples; restoring with a different G,
  seed, dataset size or mode raises ``ValueError``.

``build_loader`` wraps this in a ``torchdata`` ``StatefulDataLoader``, which
serialises the batch sampler's ``state_dict()``. With worker processes, it
snapshots the sampler state when a batch's indices are sent to a worker and
reports the snapshot of the last batch *yielded*, so a restored loader continues
after the last batch the training loop saw, whatever was prefetched. Its state can
only be loaded into a loader with the same ``num_workers`` (a torchdata limit).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from flm.data.shards import DEFAULT_CACHE_BYTES, TokenDataset, check_compatible


class WindowDataset(Dataset):
    """Map-style dataset of non-overlapping ``seq_len`` windows as int64 tensors."""

    def __init__(self, tokens: TokenDataset, seq_len: int) -> None:
        check_compatible(tokens, None, seq_len)
        self.tokens, self.seq_len = tokens, seq_len
        self._len = tokens.num_tokens // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} is outside [0, {self._len})")
        return torch.from_numpy(self.tokens.read(index * self.seq_len, self.seq_len, np.int64))


class GlobalBatchSampler:
    """Deterministic, resumable batch sampler over a global sample stream (see module docstring)."""

    _STREAM_KEYS = ("seed", "global_batch_size", "num_samples", "shuffle", "infinite")

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, infinite: bool = True) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size > 0 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if num_samples < batch_size * world_size:
            raise ValueError(f"global batch of {batch_size * world_size} samples (batch_size {batch_size} x "
                             f"world_size {world_size}) exceeds the {num_samples} windows of the split; "
                             "lower the batch size or data.seq_len, or use more data")
        self.num_samples, self.batch_size, self.rank = num_samples, batch_size, rank
        self.global_batch_size = batch_size * world_size
        self.seed, self.shuffle, self.infinite = seed, shuffle, infinite
        self.samples_consumed = 0
        self._epoch, self._permutation = -1, np.empty(0, np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._epoch, self._permutation = epoch, rng.permutation(self.num_samples)
        return self._permutation

    def _stream(self, start: int, count: int) -> list[int]:
        """Sample indices at global stream positions ``[start, start + count)``."""
        indices: list[int] = []
        while count:
            epoch, offset = divmod(start, self.num_samples)
            n = min(count, self.num_samples - offset)
            indices.extend(self._order(epoch)[offset:offset + n].tolist() if self.shuffle
                           else range(offset, offset + n))
            start, count = start + n, count - n
        return indices

    def _next_batch(self) -> list[int]:
        batch = self._stream(self.samples_consumed + self.rank * self.batch_size, self.batch_size)
        self.samples_consumed += self.global_batch_size
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.infinite:
            while True:
                yield self._next_batch()
        epoch, offset = divmod(self.samples_consumed, self.num_samples)
        if offset + self.global_batch_size > self.num_samples:  # previous pass complete: next epoch
            epoch += 1
            self.samples_consumed = epoch * self.num_samples
        end = epoch * self.num_samples + self.num_samples // self.global_batch_size * self.global_batch_size
        while self.samples_consumed < end:
            yield self._next_batch()

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite GlobalBatchSampler has no length")
        return self.num_samples // self.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"samples_consumed": self.samples_consumed,
                **{key: getattr(self, key) for key in self._STREAM_KEYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self._STREAM_KEYS:
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data order: the checkpoint has {key}={state[key]!r} "
                                 f"but this run has {key}={getattr(self, key)!r} (global batch size = "
                                 "batch_size x world_size must stay the same when changing world size)")
        self.samples_consumed = int(state["samples_consumed"])


def build_loader(data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0,
                 vocab_size: int | None = None, shuffle: bool = True, infinite: bool = True,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> StatefulDataLoader:
    """A resumable loader of int64 ``(batch_size, seq_len)`` batches for ``rank`` of ``world_size``.

    Training: the defaults (shuffled, infinite). Evaluation: ``shuffle=False,
    infinite=False`` gives one deterministic pass over the split per ``iter()``,
    sharded across ranks. ``vocab_size`` (the model's) is checked against the data.
    """
    tokens = TokenDataset(data_dir, split, cache_bytes=cache_bytes)
    check_compatible(tokens, vocab_size, seq_len)
    windows = WindowDataset(tokens, seq_len)
    sampler = GlobalBatchSampler(len(windows), batch_size, rank, world_size, seed, shuffle, infinite)
    with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API on construction
        warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")
        return StatefulDataLoader(windows, batch_sampler=sampler, num_workers=num_workers)
