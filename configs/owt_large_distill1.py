"""FMLM distillation stage 1 of the large OWT teacher (configs/owt_large.py) on 4 x 8 GPUs.

As configs/owt_small_distill1.py (the released stage-1 settings: batch 128, lr 3e-4,
2500 warmup steps, up to 1M steps, boundary 1/64, weighting of s only, dropout 0.1);
the backbone (24 x 2048) comes from the teacher checkpoint, HSDP across nodes and
selective activation checkpointing (full was the guess before the plan below: 11.7 GiB,
and checkpointing off would fit too at 19.6 GiB). The released code has no model of this size; its settings
are carried over unchanged.

Memory per GPU, GiB (tools/memplan.py): 4 node(s) x 8 GPUs, micro-batch 4 x 1,
  checkpointing selective, frozen nets replicated:
  before the step: params 0.69, optimizer 1.39, ema 0.69, frozen 2.78
  peak 12.00 (budget 70) in micro-batch 1/1 (backward): the above + (B,L,V) 1.15, activations 4.58, temporaries 0.71
  largest micro-batch within 70: 4 (all of the per-GPU batch), peak 12.00

    torchrun --nnodes 4 --nproc_per_node 8 ... run/train.py --config configs/owt_large_distill1.py
"""

from pathlib import Path

from flm.config import apply_overrides, load_config

config = apply_overrides(load_config(Path(__file__).with_name("owt_small_distill1.py")), {
    "out_dir": "runs/owt_large_distill1",
    "distill.teacher": "runs/owt_large/checkpoints/step_00500000",
    "dist.replicate": -1,
})
