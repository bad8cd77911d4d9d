"""Windows, the global batch order and exact resumption of StatefulDataLoader state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import DATA_TINY_VOCAB, packed_stream, random_documents

from flm.data import DataFormatError, GlobalBatchSampler, TokenDataset, WindowDataset, build_loader

SEQ_LEN, BATCH = 8, 3


@pytest.fixture
def data_dir(make_tiny_dataset):
    """~3.8K train tokens = 477 windows of 8; frames of 16 and shards of 256 tokens."""
    return make_tiny_dataset(train_docs=60, validation_docs=12)


def take(loader, steps: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(loader), steps))


def global_batches(data_dir, steps: int, world_size: int, num_workers: int = 0, state=None) -> list[torch.Tensor]:
    """``steps`` global batches assembled from per-rank loaders (rank slices concatenated)."""
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(data_dir, "train", SEQ_LEN, BATCH, rank, world_size, seed=7, num_workers=num_workers)
        if state is not None:
            loader.load_state_dict(state)
        per_rank.append(take(loader, steps))
    return [torch.cat(parts) for parts in zip(*per_rank)]


def reference(data_dir, steps: int, global_batch: int) -> list[torch.Tensor]:
    """The uninterrupted global order: one rank with the whole global batch."""
    loader = build_loader(data_dir, "train", SEQ_LEN, global_batch, 0, 1, seed=7)
    return take(loader, steps)


def assert_batches_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"global batch {step} differs"


def test_windows_are_non_overlapping_int64(data_dir):
    tokens = TokenDataset(data_dir, "train")
    windows = WindowDataset(tokens, SEQ_LEN)
    stream = packed_stream(random_documents(0, 60))
    assert len(windows) == stream.size // SEQ_LEN
    for i in (0, 1, len(windows) - 1):
        window = windows[i]
        assert window.dtype == torch.int64 and window.shape == (SEQ_LEN,)
        np.testing.assert_array_equal(window.numpy(), stream[i * SEQ_LEN:(i + 1) * SEQ_LEN])
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_sampler_permutes_each_epoch_and_partitions_ranks():
    n, batch, world = 50, 4, 2
    ranks = [GlobalBatchSampler(n, batch, r, world, seed=3) for r in range(world)]
    iterators = [iter(s) for s in ranks]
    stream = [i for _ in range(25) for it in iterators for i in next(it)]  # 25 global batches = 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]
    again = GlobalBatchSampler(n, batch * world, 0, 1, seed=3)
    assert list(itertools.chain.from_iterable(itertools.islice(iter(again), 25))) == stream
    assert ranks[0].state_dict()["samples_consumed"] == 25 * batch * world


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_exactly(data_dir, world_size):
    expected = reference(data_dir, 10, BATCH * world_size)
    loaders = [build_loader(data_dir, "train", SEQ_LEN, BATCH, r, world_size, seed=7) for r in range(world_size)]
    first = [take(loader, 4) for loader in loaders]
    states = [loader.state_dict() for loader in loaders]
    resumed = []
    for rank, state in enumerate(states):
        loader = build_loader(data_dir, "train", SEQ_LEN, BATCH, rank, world_size, seed=7)
        loader.load_state_dict(state)
        resumed.append(take(loader, 6))
    actual = [torch.cat(parts) for parts in zip(*[f + r for f, r in zip(first, resumed)])]
    assert_batches_equal(actual, expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_into_different_world_size(data_dir, num_workers):
    """Rank 0's state of a 2-rank run, loaded into 1 rank with the same global batch."""
    expected = reference(data_dir, 7, 2 * BATCH)
    loader = build_loader(data_dir, "train", SEQ_LEN, BATCH, 0, 2, seed=7, num_workers=num_workers)
    head = global_batches(data_dir, 3, world_size=2, num_workers=num_workers)
    take(loader, 3)
    single = build_loader(data_dir, "train", SEQ_LEN, 2 * BATCH, 0, 1, seed=7, num_workers=num_workers)
    single.load_state_dict(loader.state_dict())
    assert_batches_equal(head + take(single, 4), expected)


def test_resume_with_prefetching_workers_counts_yielded_batches(data_dir):
    expected = reference(data_dir, 9, BATCH)
    loader = build_loader(data_dir, "train", SEQ_LEN, BATCH, 0, 1, seed=7, num_workers=2)
    iterator = iter(loader)
    head = [next(iterator) for _ in range(3)]
    assert loader.batch_sampler.samples_consumed > 3 * BATCH  # the sampler ran ahead for prefetching
    state = loader.state_dict()
    assert state["_snapshot"]["_main_snapshot"]["_index_sampler_state"]["samples_consumed"] == 3 * BATCH
    head.append(next(iterator))  # the original keeps going; the state must not move
    restored = build_loader(data_dir, "train", SEQ_LEN, BATCH, 0, 1, seed=7, num_workers=2)
    restored.load_state_dict(state)
    assert_batches_equal(head[:3] + take(restored, 6), expected)
    assert torch.equal(head[3], expected[3])


def test_restore_with_other_global_batch_is_refused(data_dir):
    loader = build_loader(data_dir, "train", SEQ_LEN, BATCH, 0, 2, seed=7)
    take(loader, 2)
    other = build_loader(data_dir, "train", SEQ_LEN, BATCH, 0, 1, seed=7)
    other.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match=r"checkpoint has global_batch_size=6 but this run has global_batch_size=3"):
        next(iter(other))


def test_validation_pass_is_finite_in_order_and_sharded(data_dir):
    tokens = TokenDataset(data_dir, "validation")
    windows = tokens.num_tokens // SEQ_LEN
    loaders = [build_loader(data_dir, "validation", SEQ_LEN, 2, r, 2, shuffle=False, infinite=False)
               for r in range(2)]
    assert len(loaders[0]) == windows // 4
    for _ in range(2):  # every pass is the same
        passes = [list(loader) for loader in loaders]
        covered = torch.cat([torch.cat(parts) for parts in zip(*passes)])
        expected = tokens.read(0, windows // 4 * 4 * SEQ_LEN, np.int64).reshape(-1, SEQ_LEN)
        assert torch.equal(covered, torch.from_numpy(expected))


def test_loader_checks_config_against_data(data_dir):
    with pytest.raises(DataFormatError, match="model.vocab_size=512"):
        build_loader(data_dir, "train", SEQ_LEN, BATCH, vocab_size=512)
    build_loader(data_dir, "train", SEQ_LEN, BATCH, vocab_size=DATA_TINY_VOCAB)
    with pytest.raises(DataFormatError, match="data.seq_len=100000"):
        build_loader(data_dir, "train", 100_000, BATCH)
    with pytest.raises(ValueError, match="global batch of 2000 samples"):
        build_loader(data_dir, "train", SEQ_LEN, 1000, 0, 2)
