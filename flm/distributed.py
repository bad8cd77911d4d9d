"""Process group, device mesh, activation checkpointing and FSDP2 sharding.

The order matters and is the one torchtitan uses: build the model on the meta
device, wrap blocks for activation checkpointing, ``fully_shard`` each block
and then the root, and only then materialise (``to_empty``) and initialise.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import socket
from dataclasses import dataclass
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import distributed_c10d as c10d
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

log = logging.getLogger("flm")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800) -> DistInfo:
    """Join the process group described by torchrun's environment.

    Run without torchrun, the process forms a group of one, so the training
    code has a single path. NCCL on GPU, gloo on CPU. ``timeout_s`` bounds every
    collective (``dist.timeout_s``): of the default group and of the groups made
    later (the device mesh's, which would otherwise get torch's default).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # new_group / split_group (DeviceMesh dimensions) take torch's default when given
    # no timeout, not the default group's: make the configured one the default.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        # Leave the group while the interpreter is alive, also when an exception ends the run:
        # otherwise gloo's threads often abort the exit ("terminate called without an active
        # exception", SIGABRT) and the exit code no longer says what happened.
        atexit.register(_leave)
    return DistInfo(rank, world, local_rank, local_world, device)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    # FSDP modules reference their process groups through reference cycles; free them now,
    # not during interpreter teardown, where destroying a gloo group can abort the exit.
    gc.collect()


def build_mesh(info: DistInfo, replicate: int) -> DeviceMesh:
    """A 1-D ``("shard",)`` mesh, or 2-D ``("replicate", "shard")`` for HSDP.

    ``replicate`` is the number of model replicas (typically nodes); within a
    replica, parameters are sharded. -1 means one replica per node.
    """
    if replicate == -1:
        replicate = info.world_size // info.local_world_size
    if replicate < 1 or info.world_size % replicate:
        raise ValueError(f"dist.replicate={replicate} must divide the world size {info.world_size}")
    if replicate == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(info.device.type, (replicate, info.world_size // replicate),
                            mesh_dim_names=("replicate", "shard"))


def _selective_policy():
    """Save matmul and attention outputs, recompute cheap pointwise ops and norms."""
    from torch.utils.checkpoint import CheckpointPolicy

    save = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_cudnn_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

    def policy(ctx, op, *args, **kwargs):
        # xformers registers its kernels as custom ops (e.g. xformers_flash::flash_fwd)
        if op in save or str(op).startswith("xformers"):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every ``model.blocks[i]``: "full" recomputes the whole block in the
    backward pass, "selective" keeps matmul/attention outputs and recomputes the rest."""
    if mode == "off":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if mode == "full":
        wrap = partial(checkpoint_wrapper, preserve_rng_state=True)
    elif mode == "selective":
        ctx = partial(create_selective_checkpoint_contexts, _selective_policy())
        wrap = partial(checkpoint_wrapper, context_fn=ctx, preserve_rng_state=True)
    else:
        raise ValueError(f"dist.activation_checkpointing={mode!r}: expected off, full or selective")
    for i, block in enumerate(model.blocks):
        model.blocks[i] = wrap(block)


def compile_blocks(model: nn.Module, enabled: bool, device: torch.device, backend: str = "inductor") -> None:
    """``torch.compile`` every ``model.blocks[i]`` (``dist.compile``), whole-graph.

    torchtitan's order: after activation checkpointing (the checkpointed block is traced
    whole, checkpoint region included) and before ``fully_shard``, so FSDP's hooks --
    all-gather before a block, reshard after -- stay outside the compiled graphs, and
    every block, having the same structure, reuses one compiled graph. Parameter names
    gain ``_orig_mod.``, which :func:`clean_fqn` and DCP's state-dict helpers remove.

    The attention kernel for ``device`` is chosen here, outside any graph: choosing it
    is a graph break, and a graph break inside a checkpointed region would leave the
    whole block uncompiled (``fullgraph=True`` makes that an error instead).
    """
    if not enabled:
        return
    from flm.model.attention import attention_backend

    attention_backend(device)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend=backend, fullgraph=True)


def mixed_precision(mode: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 master weights and fp32 gradient reduction.

    Forward inputs are not cast: times t and noise levels g lose too much in
    bf16 (1 - g near g = 1), and so do the RoPE tables handed to each block;
    the model casts its activations itself (they come out of the bf16 input
    and time layers in bf16).
    """
    if mode not in ("bf16", "fp32"):
        raise ValueError(f"dist.mixed_precision={mode!r}: expected bf16 or fp32")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(model: nn.Module, mesh: DeviceMesh, precision: str,
                reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each block, then the root (embeddings, time MLPs, output)."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mixed_precision(precision),
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision(precision),
                reshard_after_forward=reshard_after_forward)
    return model


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes, as in an unwrapped model."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor is its own shard)."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum float64 values over all ranks (losses, token counts)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, reference: Callable[[], nn.Module]) -> None:
    """Allocate a meta-built, sharded model on ``device`` and initialise it.

    On CUDA, DTensor's RNG tracker gives every shard its own slice of one random
    stream, so ``init_weights`` runs directly on the shards. On CPU it does not
    (each shard would draw the *same* numbers), so a full reference model is
    initialised on the host and each rank keeps its slice: the result equals
    the single-process initialisation for any world size.
    """
    model.to_empty(device=device)
    if device.type == "cuda":
        model.init_weights()
        return
    full = dict(reference().named_parameters())
    for name, p in model.named_parameters():
        src = full[clean_fqn(name)].to(device)
        if isinstance(p, DTensor):
            src = distribute_tensor(src, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p = p.to_local()
        p.copy_(src)
