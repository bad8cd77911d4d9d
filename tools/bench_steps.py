"""The training-step benchmarks of ``tools/bench.py`` (teacher_step, compile_step, distill_step).

Each variant runs in a fresh spawned process (``_*_worker``), interleaved with its
baselines, and reports tokens per CPU second, tokens per wall second and memory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    import flm  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch


def _timed_steps(step: Callable[[int], None], steps: int, tokens_per_step: int) -> dict[str, float]:
    """Run ``step(0..steps-1)``: tokens per CPU second and per wall second, and the
    process's peak RSS so far (the worker processes' measurement)."""
    import resource

    wall, cpu_s = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(i)
    wall, cpu_s = time.perf_counter() - wall, time.process_time() - cpu_s
    tokens = steps * tokens_per_step
    return {"tokens_per_cpu_s": tokens / cpu_s, "tokens_per_s": tokens / wall,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


TEACHER_PATHS = ("lookup", "low-rank", "dense", "lookup-logits")


def _teacher_step_worker(path: str, vocab_size: int, seq_len: int, batch: int, dim: int, layers: int,
                         steps: int, threads: int, queue) -> None:
    """One path in a fresh process, so that its peak RSS is its own.

    lookup         token ids embedded by lookup, loss from ``model(..., targets=ids)``: the cost
                   of an MDLM step with the same V-way output and loss (the floor)
    low-rank       the FLM teacher step, ``flm_loss`` (low-rank noise, chunked output + CE)
    dense          the dense reference: eps (B, L, V), x_g formed, x_g @ W_in, (B, L, V) logits
                   and ``F.cross_entropy`` (the teacher step before issue 10 without the shortcut)
    lookup-logits  token lookup with (B, L, V) logits and ``F.cross_entropy`` (MDLM's loss today)
    """
    import torch.nn.functional as F

    from flm.config import ModelConfig
    from flm.flow import get_tau, interpolate
    from flm.methods.flm import flm_loss
    from flm.model import DiT
    from flm.rng import example_generators, example_normal

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, seq_len=seq_len, dim=dim, n_layers=layers, n_heads=max(1, dim // 64),
                      cond_dim=128)
    model = DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tau = get_tau(vocab_size)
    ids = torch.randint(0, vocab_size, (batch, seq_len))
    index = torch.arange(batch)
    cpu = torch.device("cpu")

    def loss_of(i: int) -> torch.Tensor:
        t = (index + 0.5) / batch
        gens = example_generators(0, i, index, cpu)
        if path == "low-rank":
            return flm_loss(model, ids, t, tau, gens, low_rank_noise=True)[0]
        if path == "lookup":
            return model(ids, t, targets=ids).sum
        if path == "dense":
            eps = example_normal((seq_len, vocab_size), gens, cpu)
            logits = model(interpolate(ids, eps, tau(t)), t)
        else:  # lookup-logits
            logits = model(ids, t)
        return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="sum")

    def step(i: int) -> None:
        (loss_of(i) / ids.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(-1)  # warm-up: allocator, optimizer state
    queue.put({**_timed_steps(step, steps, batch * seq_len), "params_m": model.num_params() / 1e6})


def teacher_step(vocab_size: int = 32000, seq_len: int = 256, batch: int = 8, dim: int = 256, layers: int = 4,
                 steps: int = 3, repeats: int = 3, threads: int = 1, paths: tuple[str, ...] = TEACHER_PATHS) -> None:
    """Tokens/s and peak memory of the FLM training step (fwd + bwd + AdamW) against its baselines, CPU.

    Every path (see ``_teacher_step_worker``) runs ``repeats`` times, each time in a fresh
    process, interleaved (the order rotates every round) so that load from other jobs
    falls on all paths alike; each run times ``steps`` steps after one warm-up step.
    Speed is tokens per CPU second of the process (``time.process_time``, robust to a
    shared machine; ``threads`` torch threads, 1 by default so that no CPU time is spent
    spinning), memory the process's peak RSS (model, optimizer and activations
    included). Medians over the repeats; the ratios are of medians.
    """
    import multiprocessing as mp
    import statistics

    paths = tuple(p.strip() for p in paths.split(",")) if isinstance(paths, str) else tuple(paths)
    unknown = set(paths) - set(TEACHER_PATHS)
    if unknown or "low-rank" not in paths:
        sys.exit(f"bench: paths must include low-rank and be among {TEACHER_PATHS}, got {paths}")
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for r in range(repeats):
        for name in paths[r % len(paths):] + paths[:r % len(paths)]:
            queue = ctx.Queue()
            proc = ctx.Process(target=_teacher_step_worker,
                               args=(name, vocab_size, seq_len, batch, dim, layers, steps, threads, queue))
            proc.start()
            runs[name].append(queue.get())
            proc.join()
    med = {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"DiT {dim}x{layers} ({med['low-rank']['params_m']:.1f}M params), V={vocab_size}, L={seq_len}, "
          f"batch {batch}, {steps} timed steps x {repeats} interleaved runs per path, {threads} thread(s); medians")
    print("path           tokens/CPU-s  tokens/s (wall)  peak RSS GiB   runs (tokens/CPU-s)")
    for name, m in med.items():
        each = " ".join(f"{run['tokens_per_cpu_s']:.0f}" for run in runs[name])
        print(f"{name:14s} {m['tokens_per_cpu_s']:12.0f}  {m['tokens_per_s']:15.0f}  {m['peak_rss_gib']:12.2f}   {each}")
    r = med["low-rank"]
    for name, what in (("lookup", "token-lookup step, same output + loss (target >= 0.91x)"),
                       ("dense", "dense (B, L, V) path (memory target <= 0.5x)"),
                       ("lookup-logits", "token lookup with (B, L, V) logits + F.cross_entropy")):
        if name in med:
            b = med[name]
            print(f"low-rank / {name}: {r['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x tokens/CPU-s, "
                  f"{r['peak_rss_gib'] / b['peak_rss_gib']:.2f}x peak memory   [{what}]")


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


def _distill_step_worker(impl: str, stage: int, vocab_size: int, seq_len: int, batch: int, dim: int, layers: int,
                         steps: int, threads: int, queue) -> None:
    """One implementation of one distillation stage in a fresh process (its peak RSS is its own)."""
    import copy
    import dataclasses

    from flm.config import ModelConfig
    from flm.flow import get_tau
    from flm.flow_map import LossWeighting, sample_intervals
    from flm.memplan import peak_bytes
    from flm.model import DiT
    from flm.rng import example_generators

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl == "reference":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import distill_reference as losses
    else:
        import flm.flow_map as losses
    cfg = ModelConfig(vocab_size=vocab_size, seq_len=seq_len, dim=dim, n_layers=layers, n_heads=max(1, dim // 64),
                      cond_dim=128)
    teacher = DiT(cfg).eval().requires_grad_(False)
    student = DiT(dataclasses.replace(cfg, two_times=True))
    frozen_g = copy.deepcopy(student).eval().requires_grad_(False)
    weighting = LossWeighting("s")
    opt = torch.optim.AdamW([*student.parameters(), *weighting.parameters()], lr=1e-5)
    tau = get_tau(vocab_size)
    ids = torch.randint(0, vocab_size, (batch, seq_len))
    index, cpu = torch.arange(batch), torch.device("cpu")

    def loss_backward(i: int) -> None:
        s, t = sample_intervals(batch, slice(None), torch.Generator().manual_seed(i), 64)
        gens = example_generators(0, i, index, cpu)
        if stage == 1:
            loss = losses.fmlm_stage1_loss(student, teacher, ids, s, t, tau, gens, weighting)[0]
        else:
            loss = losses.fmlm_stage2_loss(student, teacher, frozen_g, ids, s, t, tau, gens, weighting)[0]
        (loss / batch).backward()

    def step(i: int) -> None:
        loss_backward(i)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(-1)  # warm-up: allocator, optimizer state
    # the forward + backward's peak, less the weights of the three networks and the
    # student's gradients, which the tracker also counts once the step touches them
    nets = (teacher, student, frozen_g, weighting)
    weights = sum(p.numel() * p.element_size() for net in nets for p in net.parameters())
    grads = sum(p.numel() * p.element_size() for net in (student, weighting) for p in net.parameters())
    tracked = peak_bytes(lambda: loss_backward(-2), vocab_size, seq_len) - weights - grads
    opt.zero_grad(set_to_none=True)
    queue.put({**_timed_steps(step, steps, batch * seq_len), "tracked_gib": tracked / 2**30})


def distill_step(vocab_size: int = 32000, seq_len: int = 256, batch: int = 8, dim: int = 256, layers: int = 4,
                 steps: int = 2, repeats: int = 3, threads: int = 1, stages: tuple[int, ...] = (1, 2)) -> None:
    """Peak memory and tokens/s of the FMLM distillation steps against their pre-issue-10 form, CPU.

    ``reference`` is ``tools/distill_reference.py`` (plain autograd, every (B, L, V)
    intermediate in float32), ``lean`` is :mod:`flm.flow_map` (in-place dense states,
    quarter-batch targets, chunked output layer and squared error). Each (stage,
    implementation) runs ``repeats`` times in a fresh process, interleaved. Memory: the
    peak of the tensors of one forward + backward as the memory plans count them
    (:func:`flm.memplan.peak_bytes`) less the networks' weights and the gradients, i.e.
    the dense states, targets, outputs and activations that the issue's target is about
    (at full size they dominate: 37 of 50 GiB per GPU at owt_small); and the process's
    peak RSS (weights, optimizer state and the Python process included). Speed: tokens
    per CPU second (``threads`` torch threads). Medians over the repeats.
    """
    import multiprocessing as mp
    import statistics

    ctx = mp.get_context("spawn")
    print(f"DiT {dim}x{layers}, V={vocab_size}, L={seq_len}, batch {batch}, {steps} timed steps x {repeats} "
          f"interleaved runs, {threads} thread(s); medians; one (B, L, V) float32 tensor = "
          f"{batch * seq_len * vocab_size * 4 / 2**30:.3f} GiB")
    for stage in tuple(stages) if isinstance(stages, (tuple, list)) else (int(stages),):
        runs: dict[str, list[dict]] = {"reference": [], "lean": []}
        for r in range(repeats):
            for impl in (("reference", "lean") if r % 2 == 0 else ("lean", "reference")):
                queue = ctx.Queue()
                proc = ctx.Process(target=_distill_step_worker, args=(impl, stage, vocab_size, seq_len, batch, dim,
                                                                      layers, steps, threads, queue))
                proc.start()
                runs[impl].append(queue.get())
                proc.join()
        med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
        print(f"stage {stage}: impl        tokens/CPU-s  tokens/s (wall)  activations GiB  peak RSS GiB")
        for impl, m in med.items():
            print(f"         {impl:10s} {m['tokens_per_cpu_s']:12.0f}  {m['tokens_per_s']:15.0f}  "
                  f"{m['tracked_gib']:15.3f}  {m['peak_rss_gib']:12.2f}")
        a, b = med["lean"], med["reference"]
        print(f"stage {stage}: lean / reference: {a['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}x tokens/CPU-s, "
              f"{a['tracked_gib'] / b['tracked_gib']:.2f}x activation peak (target <= 0.5x), "
              f"{a['peak_rss_gib'] / b['peak_rss_gib']:.2f}x peak RSS")
