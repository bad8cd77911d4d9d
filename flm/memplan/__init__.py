"""Per-GPU memory of a training config, computed by running its real step on fake tensors.

:func:`plan` builds what ``run/train.py`` builds -- the method (with its frozen
networks), the DiT on the meta device, activation checkpointing, FSDP2
``fully_shard`` over a mesh of the configured world size, AdamW, the EMA -- and
runs one training step (every micro-batch's loss and backward, gradient clipping,
the optimizer step, the EMA update) under ``FakeTensorMode``: tensors have shapes,
dtypes and devices but no data, so a 1.5B-parameter model at full batch and
sequence length costs seconds of CPU and no memory. The process group is torch's
fake backend (``FakeStore``, ``backend="fake"``) with the configured world size,
seen from rank 0: collectives are no-ops, shapes and shards are real. Memory is
counted by torch's ``MemTracker`` (a dispatch mode that follows every tensor
storage from allocation to free; :mod:`flm.memplan.tracker`), so the peak is that of the allocations the step
makes, in the order it makes them.

The device is the CPU: FSDP2 needs a CUDA build to put a mesh on "cuda", so the
fake tensors live on "cpu". Sizes do not depend on it: bf16 comes from the mixed
precision policy (FSDP gathers bf16 weights, the model computes in bf16), and on
CPU torch's SDPA is its flash kernel, which keeps what xformers/flash keep on GPU
(the output and a float32 log-sum-exp per query). What the count leaves out is the
CUDA side: the caching allocator's rounding and fragmentation, the CUDA context,
NCCL's buffers -- hence a budget below the card's size (:data:`BUDGET_GIB`).

Frozen networks of distillation come from checkpoints that need not exist: their
configs are the checkpoint's own if it exists, else the config file of
``configs/`` whose ``out_dir`` holds the checkpoint path; they are built on fake
tensors and placed exactly as :func:`flm.loading.frozen_skeleton` places them in
training (through the ``frozen_loader`` seam of the distillation methods' ``build``;
:mod:`flm.memplan.frozen`).

The step (:func:`_step`) is run/train.py's step written out again, since the loop
there is one function: a change to what the loop does per step belongs here too. :func:`measure` runs the same step on real tensors (2 CPU processes,
gloo) and reads the allocator's peak from the profiler: the test that the two
agree is ``tests/test_memplan.py``. ``tools/memplan.py`` is the command line.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flm.config import Config, load_config
from flm.distributed import (DistInfo, apply_activation_checkpointing, build_mesh, local_tensor, materialize,
                             shard_model)
from flm.methods import METHODS, Batch
from flm.methods.base import loss_by_bucket
from flm.model import DiT
from flm.optim import EMA, build_optimizer, clip_grad_norm
from flm.memplan.frozen import ConfigResolver, SkeletonLoader, takes_frozen_loader, trained_model
from flm.memplan.tracker import Mem, StepTracker, peak_bytes
from flm.rng import example_generators, step_generator

__all__ = ["BUDGET_GIB", "GIB", "ConfigResolver", "Mem", "Plan", "StepTracker", "largest_fitting", "intended_layout",
           "measure", "measure_world", "peak_bytes", "plan", "trained_model"]

GIB = 2**30
# What a plan may use of an "80 GB" H100/A100 (79.6 GiB): ~10 GiB are left for the CUDA
# context, NCCL's buffers and the caching allocator's fragmentation, which are not counted.
BUDGET_GIB = 70.0


@dataclass
class Plan:
    """Memory of one rank (rank 0) for one training step of a config; bytes."""

    config: str
    objective: str
    nodes: int
    gpus_per_node: int
    shard_size: int  # ranks a parameter is sharded over (a node under HSDP)
    micro_batch: int
    grad_accum: int
    activation_checkpointing: str
    frozen_placement: str  # "" without frozen networks
    params: int  # trained parameters (count)
    peak: int
    at_peak: dict[str, int]  # Mem value -> bytes live at the peak
    persistent: dict[str, int]  # params, optimizer, ema, frozen: live before the step
    grads: int  # fp32 gradient shards after backward
    peak_phase: str
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def fits(self, budget_gib: float = BUDGET_GIB) -> bool:
        return self.peak_gib <= budget_gib

    def report(self) -> str:
        """A human-readable breakdown."""
        g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
        lines = [f"{self.config}: {self.objective}, {self.nodes} node(s) x {self.gpus_per_node} GPUs "
                 f"(parameters sharded over {self.shard_size}), micro-batch {self.micro_batch} x "
                 f"{self.grad_accum} accumulation, activation checkpointing {self.activation_checkpointing}"
                 + (f", frozen networks {self.frozen_placement}" if self.frozen_placement else ""),
                 f"  trained parameters: {self.params / 1e6:.1f}M",
                 "  before the step (per GPU):"]
        for k in (Mem.PARAM, Mem.OPT, Mem.EMA, Mem.FROZEN):
            if self.persistent.get(k.value):
                lines.append(f"    {k.value:12s} {g(self.persistent[k.value])}")
        lines.append(f"  gradient shards after backward: {g(self.grads)}")
        lines.append(f"  peak {g(self.peak)} in {self.peak_phase}; live at the peak:")
        for k in Mem:
            if self.at_peak.get(k.value):
                lines.append(f"    {k.value:12s} {g(self.at_peak[k.value])}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def summary(self, budget_gib: float = BUDGET_GIB, largest: Plan | None = None) -> str:
        """A few lines for a config's docstring."""
        f = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        state = ", ".join(f"{k} {f(v)}" for k, v in self.persistent.items())
        live = ", ".join(f"{k} {f(v)}" for k, v in self.at_peak.items()
                         if k not in self.persistent and v >= GIB // 100)
        lines = [f"Memory per GPU, GiB (tools/memplan.py): {self.nodes} node(s) x {self.gpus_per_node} GPUs, "
                 f"micro-batch {self.micro_batch} x {self.grad_accum},",
                 f"  checkpointing {self.activation_checkpointing}"
                 + (f", frozen nets {self.frozen_placement}" if self.frozen_placement else "") + ":",
                 f"  before the step: {state}",
                 f"  peak {f(self.peak)} (budget {budget_gib:g}) in {self.peak_phase}: the above + {live}"]
        if largest is not None:
            lines.append(f"  largest micro-batch within {budget_gib:g}: {largest.micro_batch}"
                         + (" (all of the per-GPU batch)" if largest.grad_accum == 1 else "")
                         + f", peak {f(largest.peak)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"peak_gib": round(self.peak_gib, 3)}


# ---------------------------------------------------------------- the step

@contextlib.contextmanager
def fake_world(world_size: int):
    """A process group of ``world_size`` ranks seen from rank 0, backed by torch's fake backend."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("flm.memplan needs a process without a process group (it makes a fake one)")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _layout(cfg: Config, world: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro-batch, grad_accum) from the config or for a given micro-batch."""
    if micro_batch is None:
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by world_size * grad_accum = "
                             f"{world} * {cfg.grad_accum}")
        return cfg.batch_size // (world * cfg.grad_accum), cfg.grad_accum
    if cfg.batch_size % (world * micro_batch):
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by world_size * micro_batch = "
                         f"{world} * {micro_batch}")
    return micro_batch, cfg.batch_size // (world * micro_batch)


@dataclass
class _Built:
    cfg: Config
    method: Any
    model: nn.Module
    trainable: nn.ModuleDict
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: EMA
    frozen: list[nn.Module]


def _build(cfg: Config, mesh, device: torch.device, resolve: ConfigResolver, fake: bool) -> _Built:
    """What run/train.py builds, in its order (the compile step is left out: the plan is eager's)."""
    loader = SkeletonLoader(resolve, fake)
    method_cls = METHODS[cfg.objective]
    kwargs = {"frozen_loader": loader} if takes_frozen_loader(method_cls) else {}
    method = method_cls.build(cfg, mesh, device, **kwargs)
    with torch.device("meta"):
        model = DiT(cfg.model)
    apply_activation_checkpointing(model, cfg.dist.activation_checkpointing)
    shard_model(model, mesh, cfg.dist.mixed_precision)
    if fake:
        model.to_empty(device=device)
    else:
        materialize(model, device, reference=lambda: DiT(cfg.model))
    method.init_model(model)
    trainable = nn.ModuleDict({"model": model, **method.extra_modules})
    params = list(trainable.parameters())
    optimizer = build_optimizer(params, cfg.optim)
    ema = EMA(model, cfg.optim.ema_decay)
    # AdamW's moments exist from the first step on; they are made here as its first step makes
    # them (a state the tracked step does not find is made, and counted, by that step).
    for p in params:
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    return _Built(cfg, method, model, trainable, params, optimizer, ema, loader.built)


def _step(b: _Built, micro: int, accum: int, world: int, rank: int, device: torch.device,
          tracker: StepTracker | None) -> int:
    """One optimizer step as run/train.py runs it; returns the gradient-shard bytes.

    With accumulation, two micro-batches stand for all of them: one that accumulates
    (FSDP keeps unsharded gradients between them) and the last, which reduces."""
    cfg = b.cfg

    def phase(name: str) -> None:
        if tracker is not None:
            tracker.phase = name

    b.model.train()
    tokens_per_step = cfg.batch_size * cfg.model.seq_len
    shared = step_generator(cfg.seed, 0, -1, device)
    stats = torch.zeros(2, 10, dtype=torch.float64, device=device)
    loss_acc = torch.zeros(2, dtype=torch.float64, device=device)
    ids = torch.randint(0, cfg.model.vocab_size, (micro, cfg.model.seq_len), device=device)
    grads = 0
    for m in ([0, accum - 1] if accum > 1 else [0]):
        sync = m == accum - 1
        for module in b.trainable.values():
            module.set_requires_gradient_sync(sync)
        first = (m * world + rank) * micro
        rows = range(first, first + micro)
        index = torch.arange(first, first + micro, device=device)
        phase(f"micro-batch {m + 1}/{accum}")
        out = b.method.loss(b.model, Batch(ids, index, cfg.batch_size, shared,
                                           example_generators(cfg.seed, 0, rows, device)))
        (out.objective * world / tokens_per_step).backward()
        loss_acc += torch.stack([out.objective.detach(), out.loss.detach()]).double()
        stats += loss_by_bucket(out.bucket, out.per_item)
        del out
    with_grad = [p.grad for p in b.params if p.grad is not None]
    grads = sum(local_tensor(g).numel() * g.element_size() for g in with_grad)
    if tracker is not None:
        tracker.label(with_grad, Mem.GRAD)
    phase("optimizer step")
    clip_grad_norm(b.params, cfg.optim.grad_clip)
    b.optimizer.step()
    b.optimizer.zero_grad(set_to_none=True)
    phase("EMA update")
    b.ema.update()
    return grads


def _prepare(cfg: Config, configs_dir: Path | None, activation_checkpointing: str | None,
             frozen_placement: str | None) -> tuple[Config, ConfigResolver, list[str]]:
    cfg = copy.deepcopy(cfg)
    if activation_checkpointing is not None:
        cfg.dist.activation_checkpointing = activation_checkpointing
    if frozen_placement is not None:
        cfg.distill.frozen_placement = frozen_placement
    resolve = ConfigResolver(configs_dir)
    notes = []
    for role in ("teacher", "stage1"):
        path = getattr(cfg.distill, role)
        if not path or not takes_frozen_loader(METHODS[cfg.objective]):
            continue
        if resolve(path) is None:  # the teacher is the backbone the config names; a stage-1 map is its student
            teacher_cfg = resolve(cfg.distill.teacher) if role == "stage1" else None
            model = dataclasses.asdict(cfg.model) if teacher_cfg is None else dict(teacher_cfg["model"])
            model["two_times"] = role == "stage1"
            resolve.cache[path] = {"objective": "flm" if role == "teacher" else "fmlm_stage1", "model": model}
            resolve.sources[path] = "assumed: the config's own model.* (no checkpoint, no config with that out_dir)"
        notes.append(f"distill.{role} {path}: {resolve.sources[path]}")
    if cfg.dist.compile:
        notes.append("dist.compile is on; the plan is of the eager step (compiled blocks usually keep less)")
    # tau tables and the like are built on real tensors once, before any fake tensor exists
    trained_model(cfg, resolve)
    from flm.flow import get_tau
    get_tau(cfg.model.vocab_size)
    return cfg, resolve, notes


@contextlib.contextmanager
def _fused_softcap_attention():
    """Plan soft-capped attention as the GPU runs it. On CUDA it is torch's flex_attention,
    a fused kernel that keeps the output and a log-sum-exp like SDPA's flash kernel; the CPU
    path the fake step would take (``attention._explicit``) holds the (B, H, L, L) scores and
    probabilities instead (at owt_small: 59 instead of 15 GiB). The cap is elementwise, so
    the fused kernel's memory is SDPA's: count that."""
    from flm.model import attention as attention_module

    explicit = attention_module._explicit

    def fused(q, k, v, dropout_p, causal, softcap):
        return attention_module._sdpa(q, k, v, dropout_p, causal)

    attention_module._explicit = fused
    try:
        yield
    finally:
        attention_module._explicit = explicit


def plan(cfg: Config, nodes: int = 1, gpus_per_node: int = 8, micro_batch: int | None = None,
         activation_checkpointing: str | None = None, frozen_placement: str | None = None,
         configs_dir: str | Path | None = None, name: str = "") -> Plan:
    """The per-GPU memory of one training step of ``cfg`` on ``nodes`` x ``gpus_per_node`` ranks
    (rank 0's view), at the config's micro-batch or at ``micro_batch`` (grad_accum follows)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    world = nodes * gpus_per_node
    micro, accum = _layout(cfg, world, micro_batch)
    cfg, resolve, notes = _prepare(cfg, Path(configs_dir) if configs_dir else None, activation_checkpointing,
                                   frozen_placement)
    device = torch.device("cpu")
    if cfg.model.attn_softcap > 0:
        notes.append("soft-capped attention counted as a fused kernel (flex_attention on GPU), not the CPU "
                     "path that holds the (B, H, L, L) scores")
    with warnings.catch_warnings(), fake_world(world), _fused_softcap_attention():
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = build_mesh(DistInfo(0, world, 0, gpus_per_node, device), cfg.dist.replicate)
        with FakeTensorMode(allow_non_fake_inputs=True):
            b = _build(cfg, mesh, device, resolve, fake=True)
            tracker = StepTracker(cfg.model.vocab_size, cfg.model.seq_len)
            tracker.label(b.params, Mem.PARAM)
            tracker.label([t for net in b.frozen for t in net.parameters()], Mem.FROZEN)
            tracker.label(b.ema.shadow.values(), Mem.EMA)
            tracker.label([v for s in b.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)],
                          Mem.OPT)
            before = next(iter(tracker.get_tracker_snapshot().values()), {})
            with tracker:
                grads = _step(b, micro, accum, world, 0, device, tracker)
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return Plan(config=name or cfg.out_dir, objective=cfg.objective, nodes=nodes, gpus_per_node=gpus_per_node,
                shard_size=mesh.size(-1), micro_batch=micro, grad_accum=accum,
                activation_checkpointing=cfg.dist.activation_checkpointing,
                frozen_placement=cfg.distill.frozen_placement if b.frozen else "",
                params=sum(p.numel() for p in b.params), peak=int(peak["Total"]),
                at_peak={k.value: int(v) for k, v in peak.items() if isinstance(k, Mem) and v},
                persistent={k.value: int(v) for k, v in before.items() if isinstance(k, Mem) and v},
                grads=int(grads), peak_phase=tracker.peak_phase, notes=notes)


def micro_batches(cfg: Config, world: int) -> list[int]:
    """Micro-batches the global batch splits into on ``world`` ranks, largest first."""
    per_rank = cfg.batch_size // world if cfg.batch_size % world == 0 else 0
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def largest_fitting(cfg: Config, nodes: int = 1, gpus_per_node: int = 8, budget_gib: float = BUDGET_GIB,
                    **kwargs: Any) -> Plan | None:
    """The plan of the largest micro-batch whose peak is within ``budget_gib`` (binary search over
    the micro-batches that divide the per-rank batch; the peak grows with the micro-batch)."""
    sizes = sorted(micro_batches(cfg, nodes * gpus_per_node))
    best, lo, hi = None, 0, len(sizes) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        p = plan(cfg, nodes, gpus_per_node, micro_batch=sizes[mid], **kwargs)
        if p.fits(budget_gib):
            best, lo = p, mid + 1
        else:
            hi = mid - 1
    return best


def intended_layout(config_file: str | Path) -> tuple[int, int]:
    """(nodes, GPUs per node) a config file documents in its ``torchrun`` line
    (``--nnodes``, ``--nproc_per_node``); a config run with plain ``python`` is (1, 1)."""
    text = Path(config_file).read_text()
    line = next((ln for ln in text.splitlines() if "torchrun" in ln), None)
    if line is None:
        return 1, 1
    nodes = re.search(r"--nnodes[ =](\d+)", line)
    procs = re.search(r"--nproc_per_node[ =](\d+)", line)
    return int(nodes.group(1)) if nodes else 1, int(procs.group(1)) if procs else 1


# ---------------------------------------------------------------- real measurement (validation)

def measure(cfg: Config, rank: int, world_size: int, micro_batch: int | None = None,
            configs_dir: str | Path | None = None) -> dict[str, int]:
    """Rank ``rank``'s peak of allocated CPU memory during one real training step, in bytes,
    in a process group that the caller has initialised (gloo, ``world_size`` ranks, one
    node). Everything is built under torch's profiler with ``profile_memory``, which sees
    every allocation and free of the CPU allocator: the peak is the maximum of their running
    sum over the step, counted from before the model was built (so parameters, optimizer
    state, EMA and frozen networks are included). Comparable to :func:`plan`'s peak: both
    count tensor bytes, neither the allocator's caching nor the process's other memory."""
    from torch.profiler import ProfilerActivity, profile

    micro, accum = _layout(cfg, world_size, micro_batch)
    cfg, resolve, _ = _prepare(cfg, Path(configs_dir) if configs_dir else None, None, None)
    device = torch.device("cpu")
    with warnings.catch_warnings(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = build_mesh(DistInfo(rank, world_size, rank, world_size, device), cfg.dist.replicate)
        b = _build(cfg, mesh, device, resolve, fake=False)
        with torch.profiler.record_function("memplan.step"):
            _step(b, micro, accum, world_size, rank, device, None)
    events = prof.profiler.kineto_results.events()
    span = next(e for e in events if e.name() == "memplan.step")
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events
                         if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    total, peak, before = 0, 0, 0
    for when, nbytes in allocations:
        if when < span.start_ns():
            before = total + nbytes
        total += nbytes
        if span.start_ns() <= when <= span.end_ns():
            peak = max(peak, total)
    return {"peak": peak, "before_step": before}


def _measure_worker(rank: int, world_size: int, init_file: str, jobs: list[tuple[str, dict[str, Any]]],
                    configs_dir: str | None, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = [measure(load_config(path, **overrides), rank, world_size, configs_dir=configs_dir)
                   for path, overrides in jobs]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def measure_world(jobs: list[tuple[str, dict[str, Any]]], world_size: int = 2,
                  configs_dir: str | Path | None = None) -> list[dict[str, int]]:
    """:func:`measure` of each (config file, overrides) job on ``world_size`` real CPU processes
    (gloo, spawned here); rank 0's numbers."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.json")
        mp.spawn(_measure_worker, args=(world_size, str(Path(tmp) / "init"), jobs,
                                        str(configs_dir) if configs_dir else None, out), nprocs=world_size)
        return json.loads(Path(out).read_text())
