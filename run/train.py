"""Train any method of ``flm.methods`` (FLM teacher, FMLM stages, MDLM, AR), on one CPU or many GPUs.

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_small.py
    python run/train.py --config configs/tiny.py --steps=200 --optim.lr=1e-3

The whole step is in ``train`` below, top to bottom: data -> the method's loss ->
backward -> clip -> agree (skip a non-finite step? stop for a signal?) -> AdamW ->
EMA -> metrics -> checkpoint. Everything it calls is a small module of ``flm``;
what differs between methods is behind ``method`` (see ``flm/methods/base.py``),
so nothing here branches on it. Faults (kills, signals, full disks, NaNs, hangs)
and what the loop does about them: ``docs/reliability.md``.

Exit codes: 0 done; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint
(relaunch to continue); 76 ``max_bad_steps`` non-finite steps in a row; 1 any error.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import fire
import torch

from flm import checkpoint as ckpt
from flm import faults
from flm.config import Config, load_config
from flm.data import Tokenizer, build_loader
from flm.distributed import (all_reduce_sum, apply_activation_checkpointing, build_mesh, compile_blocks,
                             init_distributed, materialize, shard_model)
from flm.guard import EXIT_PREEMPTED, StepGuard
from flm.methods import METHODS, Batch
from flm.methods.base import loss_by_bucket
from flm.metrics import Logger, LossWindow, Throughput, peak_memory_gib, setup_logging
from flm.model import DiT, select_backend
from flm.optim import EMA, build_optimizer, build_scheduler, clip_grad_norm
from flm.rng import derive_seed, example_generators, step_generator

log = logging.getLogger("flm")
# FSDP2 warns that the root returns a view (the logits); no caller modifies them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
# On CPU meshes DTensor's RNG tracker is off; flm.distributed.materialize handles init there.
warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")


def train(config: str | None = None, **overrides) -> None:
    cfg: Config = load_config(config, **overrides)
    info = init_distributed(cfg.dist.timeout_s)
    setup_logging(info.rank)
    device, world = info.device, info.world_size
    out_dir = Path(cfg.out_dir)

    # ---- batch layout: global batch = world * grad_accum * micro_batch ----
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by world_size * grad_accum "
                         f"= {world} * {cfg.grad_accum}")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    tokens_per_step = cfg.batch_size * cfg.model.seq_len

    # ---- data ----
    loader = build_loader(cfg.data.path, cfg.data.train_split, cfg.model.seq_len, micro, info.rank,
                          world, cfg.seed, num_workers=cfg.data.num_workers,
                          vocab_size=cfg.model.vocab_size)
    tokenizer = Tokenizer.load(cfg.data.path)  # the dataset's, checked against its manifest

    # ---- model: meta -> activation checkpointing -> compile -> fully_shard -> materialise -> init ----
    mesh = build_mesh(info, cfg.dist.replicate)
    select_backend(device)  # before any forward: never probe inside a checkpointed block
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.objective].build(cfg, mesh, device)  # frozen networks; sets cfg.model
    if info.is_main:  # after build, which fixes the trained backbone
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(cfg.to_json())
    with torch.device("meta"):
        model = DiT(cfg.model)
    apply_activation_checkpointing(model, cfg.dist.activation_checkpointing)
    compile_blocks(model, cfg.dist.compile, device)
    shard_model(model, mesh, cfg.dist.mixed_precision)
    materialize(model, device, reference=lambda: DiT(cfg.model))
    method.init_model(model)
    trainable = torch.nn.ModuleDict({"model": model, **method.extra_modules})
    params = [p for p in trainable.parameters()]
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    ema = EMA(model, cfg.optim.ema_decay)
    log.info("model: %.2fM parameters, %d ranks, mesh %s, micro-batch %d x %d accumulation",
             model.num_params() / 1e6, world, tuple(mesh.shape), micro, cfg.grad_accum)

    # ---- resume: one DCP load restores everything the step loop depends on ----
    guard = StepGuard(cfg.max_bad_steps, cfg.dist.timeout_s, info.rank, device, out_dir)  # signals, NaNs, hangs
    window = LossWindow(device)  # loss sums of the steps since the last log line
    state = ckpt.TrainState(out_dir, trainable, optimizer, scheduler, ema, loader, cfg.to_json(),
                            method.provenance, dataset=ckpt.dataset_identity(cfg.data.path),
                            counters={"guard": guard, "window": window})
    start = state.restore(ckpt.resolve_resume(cfg.resume, out_dir))  # rank 0 picks, every rank loads

    logger = Logger(out_dir / "tb", enabled=info.is_main, jsonl=out_dir / "metrics.jsonl", start=start)
    throughput = Throughput(model.flops_per_token(dense_input=method.dense_input) * method.cost, world, device)
    data_iter = iter(loader)
    # (optimised, reported) loss sums and per-bucket sums of this rank for the current step
    step_loss = torch.zeros(2, dtype=torch.float64, device=device)
    step_stats = torch.zeros(2, 10, dtype=torch.float64, device=device)
    t_start, done = time.perf_counter(), start

    with guard:  # a failed or stuck collective is reported with its rank, step and operation
        for step in range(start, cfg.steps):
            done = step + 1
            guard.at(done, "forward/backward")
            model.train()
            torch.manual_seed(derive_seed(cfg.seed, step, info.rank, 99))  # dropout
            shared = step_generator(cfg.seed, step, -1, device)
            num_global = cfg.batch_size
            step_loss.zero_()
            step_stats.zero_()
            for m in range(cfg.grad_accum):
                ids = next(data_iter).to(device, non_blocking=True)
                first = (m * world + info.rank) * micro  # global index of this micro-batch's first example
                rows = range(first, first + micro)
                index = torch.arange(first, first + micro, device=device)
                sync = m == cfg.grad_accum - 1
                for module in trainable.values():
                    module.set_requires_gradient_sync(sync)
                gens = example_generators(cfg.seed, step, rows, device)  # noise, whatever the world size
                out = method.loss(model, Batch(ids, index, num_global, shared, gens))
                objective = faults.poison("loss", done, out.objective)  # test-only hook: FLM_FAULT=nan@loss
                # FSDP averages gradients over ranks, so scale the local sum by
                # world / global tokens: the gradient is that of the global token mean.
                (objective * world / tokens_per_step).backward()
                step_loss += torch.stack([objective.detach(), out.loss.detach()]).double()  # this rank's sums
                step_stats += loss_by_bucket(out.bucket, out.per_item)
            grad_norm = clip_grad_norm(params, cfg.optim.grad_clip)  # global norm, the same on every rank
            if guard.check(done, grad_norm, step_loss):  # every rank skips a non-finite step, or none does
                optimizer.step()
                scheduler.step()  # the schedule and the EMA count applied updates
                ema.update()
                window.add(step_loss, step_stats)
            optimizer.zero_grad(set_to_none=True)
            throughput.add(tokens_per_step)

            if done % cfg.log_every == 0 or done == cfg.steps:
                guard.at(done, "logging")
                sums, buckets, n = window.read()  # over all ranks, since the last log line
                values = {"loss": sums[1].item() / (tokens_per_step * n)} if n else {}
                if method.weighted and n:  # optimise the weighted loss, report the raw one too
                    values["weighted_loss"] = sums[0].item() / (tokens_per_step * n)
                values |= {"lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                           "skipped_steps": guard.skipped, **throughput.read(), "peak_mem_gib": peak_memory_gib(device)}
                logger.scalars(done, values, "train/")
                logger.console(done, values)
                logger.scalars(done, {f"{method.bucket_label}{b / 10:.1f}": buckets[0, b].item() / buckets[1, b].item()
                                      for b in range(10) if buckets[1, b] > 0})
                logger.scalars(done, method.scalars(device))
            side_start = time.perf_counter()  # evaluation, sampling, saving: not training throughput
            guard.at(done, "evaluation and sampling")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val = validate(cfg, model, method, info, device)
                logger.scalars(done, {"loss": val}, "val/")
                logger.console(done, {"val_loss": val})
            if done % cfg.sample_every == 0 or done == cfg.steps:
                with ema.averaged(model):
                    for steps_n, text in generate(cfg, model, method, tokenizer, device):
                        logger.text(done, f"samples/{steps_n}_steps", text)
                        if info.is_main:
                            log.info("sample (%d steps, EMA): %s", steps_n, text[:300].replace("\n", " / "))
            logger.flush()  # before the checkpoint: the rows of a saved step are on disk
            if done % cfg.ckpt_every == 0 or done == cfg.steps or guard.stop:
                guard.at(done, "checkpoint save")
                path = state.save(done, cfg.keep_checkpoints)
                log.info("checkpoint: %s", path)
            throughput.exclude(time.perf_counter() - side_start)
            if guard.stop:  # every rank agreed: a signal asked the run to stop, and it is saved
                break
    logger.close()
    guard.close()
    log.info("done: %d steps in %.1fs", done - start, time.perf_counter() - t_start)
    torch.distributed.destroy_process_group()
    if done < cfg.steps:
        log.warning("stopped by %s after step %d; relaunch the same command to continue (exit code %d)",
                    guard.signal or "a signal on another rank", done, EXIT_PREEMPTED)
        raise SystemExit(EXIT_PREEMPTED)


@torch.no_grad()
def validate(cfg: Config, model, method, info, device) -> float:
    """The method's reported loss per token (FLM cross-entropy, MDLM NELBO, the raw
    flow-map squared error, ...) over a fixed set of windows, times and noises."""
    model.eval()
    micro = max(1, cfg.batch_size // (info.world_size * cfg.grad_accum))
    loader = build_loader(cfg.data.path, cfg.data.val_split, cfg.model.seq_len, micro, info.rank,
                          info.world_size, cfg.seed, num_workers=0, shuffle=False, infinite=False)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    num_global = micro * info.world_size
    for i, ids in zip(range(cfg.eval_batches), loader):
        ids = ids.to(device)
        rows = range(info.rank * micro, (info.rank + 1) * micro)
        index = torch.arange(rows.start, rows.stop, device=device)
        batch = Batch(ids, index, num_global, step_generator(cfg.seed, i, -1, device, stream=1),
                      example_generators(cfg.seed, i, rows, device, stream=1))
        loss_sum = method.loss(model, batch).loss
        total += torch.stack([loss_sum.double(), torch.tensor(ids.numel(), dtype=torch.float64, device=device)])
    total = all_reduce_sum(total, device)
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def generate(cfg: Config, model, method, tokenizer, device):
    """Decoded samples at each of ``cfg.sample_steps`` (every rank runs the forwards)."""
    model.eval()
    for steps_n in cfg.sample_steps if method.any_steps else [cfg.model.seq_len]:
        gen = step_generator(cfg.seed, steps_n, 0, device, stream=2)
        ids, _ = method.sample(model, cfg.num_samples, steps_n, gen)
        texts = [tokenizer.decode(row.tolist()) for row in ids.cpu()]
        yield steps_n, "\n\n---\n\n".join(texts)


if __name__ == "__main__":
    fire.Fire(train)
