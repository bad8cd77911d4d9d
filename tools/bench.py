#!/usr/bin/env python
"""Benchmarks (not tests): ``python tools/bench.py <command> [--flags]``.

    reader        random seq_len windows from compressed shards vs an uncompressed np.memmap
    pretokenize   pretokenize throughput and shard compression ratio on the embedded corpus
    teacher_step  FLM training step: low-rank noise embedding vs the dense (B, L, V) path
    compile_step  FLM training step with dist.compile (torch.compile per block) vs eager

Each command is a function registered in ``COMMANDS``.
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

from flm.data import TokenDataset, WindowDataset, write_dataset
from flm.data.shards import DEFAULT_CACHE_BYTES, DEFAULT_FRAME_TOKENS, token_dtype

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


def _bench_tokens(data: Path, num_tokens: int, seed: int, scratch: Path) -> tuple[np.ndarray, Path, int, int, str]:
    """(tokens, tokenizer file, vocab_size, eos_id, description) of ``num_tokens`` benchmark tokens."""
    if (data / "manifest.json").is_file():
        real = TokenDataset(data, "train")
        tokens = np.resize(real.read(0, real.num_tokens), num_tokens)
        return (tokens, data / "tokenizer.model", real.vocab_size, real.eos_id,
                f"{data} train split ({real.num_tokens:,} tokens) tiled")
    vocab_size, eos_id = 8192, 2
    placeholder = scratch / "no-tokenizer.model"
    placeholder.write_text("synthetic benchmark tokens; no tokenizer\n")
    ranks = np.random.default_rng(seed).zipf(1.1, num_tokens)
    tokens = np.minimum(ranks + eos_id, vocab_size - 1)
    return tokens, placeholder, vocab_size, eos_id, "i.i.d. Zipf(1.1) ids over a vocabulary of 8192"


def reader(data: str = str(CORPUS_TOKENS), tokens: int = 50_000_000, seq_len: int = 1024,
           windows: int = 50_000, frame_tokens: int = DEFAULT_FRAME_TOKENS,
           cache_bytes: int = DEFAULT_CACHE_BYTES, seed: int = 0) -> None:
    """Tokens/s of random (WindowDataset-aligned) windows: compressed shards vs uncompressed memmap.

    Both read the same ``tokens`` ids (the real dataset at ``data`` tiled, else Zipf
    noise) and return int64 tensors, as ``WindowDataset`` does; one process, one core.
    """
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        stream, tokenizer, vocab_size, eos_id, description = _bench_tokens(Path(data), tokens, seed, scratch)
        documents = np.array_split(stream, max(1, tokens // 1_000_000))
        write_dataset(scratch / "tokens", {"train": documents}, tokenizer, vocab_size, eos_id,
                      frame_tokens=frame_tokens)
        written = TokenDataset(scratch / "tokens", "train")
        np.save(scratch / "raw.npy", written.read(0, written.num_tokens))
        raw = np.load(scratch / "raw.npy", mmap_mode="r")
        stored = sum(s["bytes"] for s in written.manifest["splits"]["train"]["shards"])
        picks = np.random.default_rng(seed).integers(0, written.num_tokens // seq_len, windows).tolist()

        def read_raw() -> None:
            for i in picks:
                torch.from_numpy(raw[i * seq_len:(i + 1) * seq_len].astype(np.int64))

        def read_compressed(dataset: TokenDataset) -> Callable[[], None]:
            def run() -> None:
                window_dataset = WindowDataset(dataset, seq_len)
                for i in picks:
                    window_dataset[i]
            return run

        read_raw()  # warm the page cache for both files
        read_compressed(TokenDataset(scratch / "tokens", "train", 0))()
        raw_rate = _rates(windows * seq_len, read_raw)
        compressed = TokenDataset(scratch / "tokens", "train", cache_bytes)  # cold cache
        z_rate = _rates(windows * seq_len, read_compressed(compressed))
        uncached = TokenDataset(scratch / "tokens", "train", cache_bytes=0)
        uncached_rate = _rates(windows * seq_len, read_compressed(uncached))
        lookups = compressed.cache_hits + compressed.cache_misses
        itemsize = token_dtype(vocab_size).itemsize
        print(f"tokens:        {written.num_tokens:,} ({description})")
        print(f"shards:        frame_tokens={frame_tokens}, {stored / 1e6:.1f} MB zstd vs "
              f"{written.num_tokens * itemsize / 1e6:.1f} MB raw (ratio "
              f"{written.num_tokens * itemsize / stored:.2f})")
        print(f"workload:      {windows:,} random windows of seq_len={seq_len} (fixed seed {seed}), int64 tensors")
        print("M tokens/s:      wall   per CPU-s   ratio (CPU)")
        print(f"uncompressed:  {raw_rate[0]:6.1f}   {raw_rate[1]:9.1f}           np.memmap")
        for name, rate, note in (("compressed:  ", z_rate, f"LRU cache {cache_bytes >> 20} MiB, hit rate "
                                  f"{compressed.cache_hits / lookups:.1%}"),
                                 ("  no cache:  ", uncached_rate, "every window decompresses its frame")):
            print(f"{name}  {rate[0]:6.1f}   {rate[1]:9.1f}   {rate[1] / raw_rate[1]:5.2f}x   {note}")


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
        for frame_tokens in frame_sizes:
            manifest = write_dataset(Path(tmp) / f"f{frame_tokens}", {"train": [stream]}, out / "tokenizer.model",
                                     dataset.vocab_size, dataset.eos_id, frame_tokens=frame_tokens)
            stored = manifest["splits"]["train"]["shards"][0]["bytes"]
            default = "  (default)" if frame_tokens == DEFAULT_FRAME_TOKENS else ""
            ratio = raw_mb * 1e6 / stored
            print(f"  frame_tokens={frame_tokens:>6}: {stored / 1e6:6.2f} MB, ratio {ratio:.2f}{default}")


def _teacher_step_worker(low_rank: bool, vocab_size: int, seq_len: int, batch: int, dim: int, layers: int,
                         steps: int, queue) -> None:
    """One path in a fresh process, so that its peak RSS is its own."""
    import resource

    from flm.config import ModelConfig
    from flm.flow import get_tau
    from flm.model import DiT
    from flm.methods.flm import flm_loss
    from flm.rng import example_generators

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, seq_len=seq_len, dim=dim, n_layers=layers, n_heads=max(1, dim // 64),
                      cond_dim=128)
    model = DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tau = get_tau(vocab_size)
    ids = torch.randint(0, vocab_size, (batch, seq_len))
    index = torch.arange(batch)

    def step(i: int) -> None:
        t = (index + 0.5) / batch
        loss, _ = flm_loss(model, ids, t, tau, example_generators(0, i, index, torch.device("cpu")), low_rank)
        (loss / ids.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(-1)  # warm-up: allocator, optimizer state
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"tokens_per_s": steps * batch * seq_len / seconds, "peak_rss_gib": peak / 2**20,
               "step_s": seconds / steps, "params_m": model.num_params() / 1e6, "base_rss_gib": base / 2**20})


def teacher_step(vocab_size: int = 32000, seq_len: int = 256, batch: int = 8, dim: int = 256, layers: int = 4,
                 steps: int = 5) -> None:
    """Tokens/s and peak memory of the FLM training step (fwd + bwd + AdamW), CPU.

    "low-rank": x_g W_in = (1 - g) z R + g W_in[x] with z ~ N(0, I_d) per token (the
    (B, L, V) noise is never built); "dense": eps ~ N(0, I) of shape (B, L, V), x_g
    formed, x_g @ W_in. Each path runs in its own process; peak memory is that
    process's max RSS (model, optimizer and activations included).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = {}
    for name, low_rank in (("dense", False), ("low-rank", True)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_teacher_step_worker,
                           args=(low_rank, vocab_size, seq_len, batch, dim, layers, steps, queue))
        proc.start()
        results[name] = queue.get()
        proc.join()
    d, r = results["dense"], results["low-rank"]
    print(f"DiT {dim}x{layers} ({d['params_m']:.1f}M params), V={vocab_size}, L={seq_len}, batch {batch}, "
          f"{steps} timed steps, {torch.get_num_threads()} threads")
    print("path        tokens/s   step s   peak RSS GiB")
    for name, x in results.items():
        print(f"{name:10s} {x['tokens_per_s']:9.0f}  {x['step_s']:7.3f}   {x['peak_rss_gib']:8.2f}")
    print(f"low-rank / dense: {r['tokens_per_s'] / d['tokens_per_s']:.2f}x tokens/s, "
          f"{r['peak_rss_gib'] / d['peak_rss_gib']:.2f}x peak memory")


def _compile_step_worker(vocab_size: int, seq_len: int, dim: int, layers: int, batch: int, steps: int, ac: str,
                         precision: str, queue) -> None:
    """Eager and compiled models side by side, built as run/train.py builds them (meta ->
    checkpointing -> compile -> FSDP2 -> materialise), their steps timed alternately."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from flm.config import ModelConfig
    from flm.distributed import apply_activation_checkpointing, compile_blocks, materialize, shard_model
    from flm.flow import get_tau
    from flm.methods.flm import flm_loss
    from flm.model import DiT
    from flm.rng import example_generators

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    cfg = ModelConfig(vocab_size=vocab_size, seq_len=seq_len, dim=dim, n_layers=layers, n_heads=max(1, dim // 32),
                      cond_dim=64)
    tau, ids = get_tau(vocab_size), torch.randint(0, vocab_size, (batch, seq_len))
    t = (torch.arange(batch) + 0.5) / batch

    def build(compiled: bool):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = DiT(cfg)
        apply_activation_checkpointing(model, ac)
        compile_blocks(model, compiled, torch.device("cpu"))
        shard_model(model, mesh, precision)
        materialize(model, torch.device("cpu"), reference=lambda: DiT(cfg))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(model, opt, i: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        loss, _ = flm_loss(model, ids, t, tau, example_generators(0, i, range(batch), torch.device("cpu")))
        (loss / ids.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - wall, time.process_time() - cpu

    variants = {"eager": build(False), "compiled": build(True)}
    warmup = {name: sum(step(*v, i)[0] for i in range(2)) for name, v in variants.items()}  # compilation here
    times = {name: [] for name in variants}
    for i in range(steps):  # alternate, so that other load on the machine hits both alike
        for name, v in variants.items():
            times[name].append(step(*v, i))
    dist.destroy_process_group()
    queue.put({name: {"warmup_s": warmup[name], "wall_s": float(np.median([w for w, _ in ts])),
                      "cpu_s": float(np.median([c for _, c in ts]))} for name, ts in times.items()})


def compile_step(vocab_size: int = 1024, seq_len: int = 64, dim: int = 128, layers: int = 4, batch: int = 64,
                 steps: int = 20, ac: str = "off", precision: str = "fp32") -> None:
    """Eager vs ``dist.compile`` (inductor, per block) for the FLM step of configs/tiny.py's model on CPU.

    One process holds both models and times their steps alternately after 2 warm-up
    steps each (where compilation happens); medians of wall time and of the process's
    CPU time (which other processes on the machine do not inflate).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_compile_step_worker,
                       args=(vocab_size, seq_len, dim, layers, batch, steps, ac, precision, queue))
    proc.start()
    results = queue.get()
    proc.join()
    print(f"DiT {dim}x{layers}, V={vocab_size}, L={seq_len}, batch {batch}, checkpointing {ac}, {precision}, "
          f"{torch.get_num_threads()} threads, medians of {steps} alternating steps")
    print("variant     warm-up s   wall s/step   CPU s/step   tokens/CPU-s")
    for name, x in results.items():
        print(f"{name:10s} {x['warmup_s']:9.1f}  {x['wall_s']:11.3f}  {x['cpu_s']:11.3f}  "
              f"{batch * seq_len / x['cpu_s']:12.0f}")
    e, c = results["eager"], results["compiled"]
    print(f"compiled / eager: {e['cpu_s'] / c['cpu_s']:.2f}x tokens per CPU-second "
          f"({e['wall_s'] / c['wall_s']:.2f}x by wall time), {c['warmup_s'] - e['warmup_s']:.0f} s of compilation")


COMMANDS: dict[str, Callable[..., None]] = {"reader": reader, "pretokenize": pretokenize,
                                            "teacher_step": teacher_step, "compile_step": compile_step}

if __name__ == "__main__":
    fire.Fire(COMMANDS)
