"""Train any method of ``flm.methods`` (FLM teacher, FMLM stages, MDLM, AR), on one CPU or many GPUs.

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_small.py
    python run/train.py --config configs/tiny.py --steps=200 --optim.lr=1e-3

The whole step is in ``train`` below, top to bottom: data -> the method's loss ->
backward -> clip -> AdamW -> EMA -> metrics -> checkpoint. Everything it calls
is a small module of ``flm``; what differs between methods is behind
``method`` (see ``flm/methods/base.py``), so nothing here branches on it.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import fire
import torch

from flm import checkpoint as ckpt
from flm.config import Config, load_config
from flm.data import Tokenizer, build_loader
from flm.distributed import (all_reduce_sum, apply_activation_checkpointing, build_mesh, compile_blocks,
                             init_distributed, materialize, shard_model)
from flm.methods import METHODS, Batch
from flm.methods.base import loss_by_bucket
from flm.metrics import Logger, Throughput, peak_memory_gib, setup_logging
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
    info = init_distributed()
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
    state = ckpt.TrainState(out_dir, trainable, optimizer, scheduler, ema, loader, cfg.to_json(),
                            method.provenance)
    start = state.restore(ckpt.resolve_resume(cfg.resume, out_dir))

    logger = Logger(out_dir / "tb", enabled=info.is_main, jsonl=out_dir / "metrics.jsonl")
    throughput = Throughput(model.flops_per_token(dense_input=method.dense_input) * method.cost, world, device)
    data_iter = iter(loader)
    stats = torch.zeros(2, 10, dtype=torch.float64, device=device)
    # (optimised, reported) loss sums of this rank since the last log line; reduced when logged
    loss_acc = torch.zeros(2, dtype=torch.float64, device=device)
    n_acc, t_start = 0, time.perf_counter()

    for step in range(start, cfg.steps):
        model.train()
        torch.manual_seed(derive_seed(cfg.seed, step, info.rank, 99))  # dropout
        shared = step_generator(cfg.seed, step, -1, device)
        num_global = cfg.batch_size
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
            # FSDP averages gradients over ranks, so scale the local sum by
            # world / global tokens: the gradient is that of the global token mean.
            (out.objective * world / tokens_per_step).backward()
            loss_acc += torch.stack([out.objective.detach(), out.loss.detach()]).double()  # this rank's sums
            stats += loss_by_bucket(out.bucket, out.per_item)
        grad_norm = clip_grad_norm(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update()
        throughput.add(tokens_per_step)
        n_acc += 1
        done = step + 1

        if done % cfg.log_every == 0 or done == cfg.steps:
            sums = all_reduce_sum(loss_acc, device).cpu() / (tokens_per_step * n_acc)
            values = {"loss": sums[1].item()}
            if method.weighted:  # optimise the weighted loss, report the raw one too
                values["weighted_loss"] = sums[0].item()
            values |= {"lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
               **throughput.read(), "peak_mem_gib": peak_memory_gib(device)}
            logger.scalars(done, values, "train/")
            logger.console(done, values)
            buckets = all_reduce_sum(stats, device)
            logger.scalars(done, {f"{method.bucket_label}{b / 10:.1f}": buckets[0, b].item() / buckets[1, b].item()
                                  for b in range(10) if buckets[1, b] > 0})
            logger.scalars(done, method.scalars(device))
            stats.zero_()
            loss_acc.zero_()
            n_acc = 0
        side_start = time.perf_counter()  # evaluation, sampling, saving: not training throughput
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
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            path = state.save(done, cfg.keep_checkpoints)
            log.info("checkpoint: %s", path)
        throughput.exclude(time.perf_counter() - side_start)
        logger.flush()
    logger.close()
    log.info("done: %d steps in %.1fs", cfg.steps - start, time.perf_counter() - t_start)
    torch.distributed.destroy_process_group()


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
