#!/usr/bin/env python
"""Benchmarks (not tests): ``python tools/bench.py <command> [--flags]``.

    reader        random seq_len windows from compressed shards vs an uncompressed np.memmap
    pretokenize   pretokenize throughput and shard compression ratio on the embedded corpus
    teacher_step  FLM training step vs the token-lookup step (same output + loss) and the dense path
    compile_step  FLM training step with dist.compile (torch.compile per block) vs eager
    distill_step  FMLM distillation steps (both stages) vs their plain-autograd form (tools/distill_reference.py)

Each command is a function registered in ``COMMANDS``; the training-step ones live in
``tools/bench_steps.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

try:
    import flm.data  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire
import numpy as np
import torch

from flm.data import TokenDataset, WindowDataset, tokenizer_path, write_dataset
from flm.data.shards import (DEFAULT_CACHE_BYTES, DEFAULT_DICT_BYTES, DEFAULT_FRAME_TOKENS, DEFAULT_LEVEL,
                             DICT_SAMPLE_FRAMES, token_dtype)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: bench_steps (its workers run in spawned processes)
from bench_steps import compile_step, distill_step, teacher_step  # noqa: E402

CORPUS_TEXT = Path("data/shakespeare/text")
CORPUS_TOKENS = Path("data/shakespeare/tokens")


def _seconds(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``; CPU time is robust to other load."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _rates(num_tokens: int, fn: Callable[[], object]) -> tuple[float, float]:
    """Millions of tokens per wall second and per CPU second."""
    wall, cpu = _seconds(fn)
    return num_tokens / wall / 1e6, num_tokens / cpu / 1e6


def _bench_tokens(data: Path, num_tokens: int, seed: int, scratch: Path,
                  held_out: int = 0) -> tuple[np.ndarray, Path, int, int, str]:
    """(tokens, tokenizer file, vocab_size, eos_id, description) of ``num_tokens`` benchmark tokens.

    A real dataset is tiled to ``num_tokens``; its first ``held_out`` tokens (where the
    writer trains its zstd dictionary), at most half of it, come once and only the rest
    is tiled, so the dictionary is measured mostly on text it was not trained on.
    """
    if (data / "manifest.json").is_file():
        real = TokenDataset(data, "train")
        stream = real.read(0, real.num_tokens)
        once = min(held_out, real.num_tokens // 2)
        tokens = np.concatenate([stream[:once], np.resize(stream[once:], num_tokens - once)])
        note = f", its first {once:,} once" if once else ""
        return (tokens, tokenizer_path(data), real.vocab_size, real.eos_id,
                f"{data} train split ({real.num_tokens:,} tokens) tiled{note}")
    vocab_size, eos_id = 8192, 2
    placeholder = scratch / "no-tokenizer.model"
    placeholder.write_text("synthetic benchmark tokens; no tokenizer\n")
    ranks = np.random.default_rng(seed).zipf(1.1, num_tokens)
    tokens = np.minimum(ranks + eos_id, vocab_size - 1)
    return tokens, placeholder, vocab_size, eos_id, "i.i.d. Zipf(1.1) ids over a vocabulary of 8192"


def reader(data: str = str(CORPUS_TOKENS), tokens: int = 50_000_000, seq_len: int = 1024,
           windows: int = 50_000, frame_tokens: int = DEFAULT_FRAME_TOKENS,
           cache_bytes: int = DEFAULT_CACHE_BYTES, dict_bytes: int = DEFAULT_DICT_BYTES, repeats: int = 5,
           other_level: int | None = None, seed: int = 0) -> None:
    """Tokens/s of random (WindowDataset-aligned) windows: compressed shards vs uncompressed memmap.

    All read the same ``tokens`` ids (the real dataset at ``data`` tiled, else Zipf
    noise) and return int64 tensors, as ``WindowDataset`` does; one process, one core.
    The shards are written three times: at the default level with a zstd dictionary of
    ``dict_bytes`` (the default format), without one (the frames of format_version 1),
    and at ``other_level`` with the dictionary (default: 3 if the default level is not,
    else -1; what a user could choose with ``pretokenize --level`` to trade read speed
    against size). Each reader runs ``repeats``
    times, interleaved with the others; speeds are per CPU second (robust to other load
    on the machine), medians over the repeats, each ratio against the memmap's median.
    """
    import statistics

    other_level = (3 if DEFAULT_LEVEL != 3 else -1) if other_level is None else int(other_level)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        stream, tokenizer, vocab_size, eos_id, description = _bench_tokens(
            Path(data), tokens, seed, scratch, held_out=DICT_SAMPLE_FRAMES * frame_tokens)
        documents = np.array_split(stream, max(1, tokens // 1_000_000))
        variants = {f"zstd{DEFAULT_LEVEL} dict": (DEFAULT_LEVEL, dict_bytes), f"zstd{DEFAULT_LEVEL}": (DEFAULT_LEVEL, 0),
                    f"zstd{other_level} dict": (other_level, dict_bytes)}
        stored = {}
        for name, (level, nbytes) in variants.items():
            manifest = write_dataset(scratch / name, {"train": documents}, tokenizer, vocab_size, eos_id,
                                     frame_tokens=frame_tokens, level=level, dict_bytes=nbytes)
            stored[name] = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
        written = TokenDataset(scratch / next(iter(variants)), "train")
        np.save(scratch / "raw.npy", written.read(0, written.num_tokens))
        raw = np.load(scratch / "raw.npy", mmap_mode="r")
        picks = np.random.default_rng(seed).integers(0, written.num_tokens // seq_len, windows).tolist()

        def read_raw() -> None:
            for i in picks:
                torch.from_numpy(raw[i * seq_len:(i + 1) * seq_len].astype(np.int64))

        def read_compressed(name: str, cache: int) -> Callable[[], None]:
            def run() -> None:
                dataset = TokenDataset(scratch / name, "train", cache)  # cold cache every run
                window_dataset = WindowDataset(dataset, seq_len)
                for i in picks:
                    window_dataset[i]
                hit_rates[name, cache] = dataset.cache_hits / (dataset.cache_hits + dataset.cache_misses)
            return run

        hit_rates: dict[tuple[str, int], float] = {}
        readers = {"uncompressed": read_raw}
        for name in variants:
            readers[f"{name} cached"] = read_compressed(name, cache_bytes)
            readers[f"{name} no cache"] = read_compressed(name, 0)
        for run in readers.values():  # warm the page cache for every file
            run()
        rates: dict[str, list[float]] = {name: [] for name in readers}
        names = list(readers)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rates[name].append(_rates(windows * seq_len, readers[name])[1])
        med = {name: statistics.median(v) for name, v in rates.items()}
        itemsize = token_dtype(vocab_size).itemsize
        raw_bytes = written.num_tokens * itemsize
        print(f"tokens:        {written.num_tokens:,} ({description})")
        print(f"shards:        frame_tokens={frame_tokens}, raw {raw_bytes / 1e6:.1f} MB; "
              + ", ".join(f"{name} {stored[name] / 1e6:.1f} MB (ratio {raw_bytes / stored[name]:.2f})"
                          for name in variants) + f"; dictionary {dict_bytes >> 10} KiB")
        print(f"workload:      {windows:,} random windows of seq_len={seq_len} (fixed seed {seed}), int64 tensors; "
              f"{repeats} interleaved runs each, medians")
        print("M tokens per CPU-s:         median   ratio    runs")
        for name in names:
            ratio = "" if name == "uncompressed" else f"{med[name] / med['uncompressed']:5.2f}x"
            note = "np.memmap" if name == "uncompressed" else (
                f"LRU cache {cache_bytes >> 20} MiB, hit rate {hit_rates[name[:-7], cache_bytes]:.1%}"
                if name.endswith("cached") else "every window decompresses its frame")
            each = " ".join(f"{v:.0f}" for v in rates[name])
            print(f"{name:24s} {med[name]:9.1f}  {ratio:>6s}   {each}   {note}")


def pretokenize(text_dir: str = str(CORPUS_TEXT), vocab_size: int = 8192, workers: int | None = None,
                frame_sizes: tuple[int, ...] = (1024, 2048, 4096, 16384, 65536)) -> None:
    """Pretokenize the corpus at ``text_dir`` (train/ and validation/) into a scratch dir and report
    throughput (MB of text/s/worker) and the compression ratio of the shards for several frame sizes."""
    from pretokenize import pretokenize as run_pretokenize  # tools/pretokenize.py

    text = Path(text_dir)
    if not (text / "train").is_dir():
        sys.exit(f"bench: {text}/train not found; run `python tools/fetch_corpus.py` first")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tokens"
        summary = run_pretokenize(inputs=str(text / "train"), val_inputs=str(text / "validation"), out=str(out),
                                  vocab_size=vocab_size, workers=workers)
        dataset = TokenDataset(out, "train")
        stream = dataset.read(0, dataset.num_tokens)
        raw_mb = stream.nbytes / 1e6
        print(f"\npretokenize:   {summary['mb_per_s_per_worker']:.2f} MB text/s/worker "
              f"({summary['text_mb']:.1f} MB in {summary['tokenize_seconds']:.1f} s)")
        print(f"compression of the train split ({dataset.num_tokens:,} tokens, {raw_mb:.2f} MB as {stream.dtype}):")
        print(f"  (dictionary: {DEFAULT_DICT_BYTES >> 10} KiB, trained on the first {DICT_SAMPLE_FRAMES} frames, "
              "which are part of what is measured)")
        for frame_tokens in frame_sizes:
            line = f"  frame_tokens={frame_tokens:>6}:"
            for dict_bytes in (DEFAULT_DICT_BYTES, 0):
                manifest = write_dataset(Path(tmp) / f"f{frame_tokens}-{dict_bytes}", {"train": [stream]},
                                         out / "tokenizer.model", dataset.vocab_size, dataset.eos_id,
                                         frame_tokens=frame_tokens, dict_bytes=dict_bytes)
                stored = manifest["splits"]["train"]["shards"][0]["bytes"]
                line += (f"  {'with' if dict_bytes else 'without'} dictionary {stored / 1e6:6.2f} MB, "
                         f"ratio {raw_mb * 1e6 / stored:.2f}")
            print(line + ("  (default)" if frame_tokens == DEFAULT_FRAME_TOKENS else ""))


COMMANDS: dict[str, Callable[..., None]] = {"reader": reader, "pretokenize": pretokenize,
                                            "teacher_step": teacher_step, "compile_step": compile_step,
                                            "distill_step": distill_step}

if __name__ == "__main__":
    fire.Fire(COMMANDS)
