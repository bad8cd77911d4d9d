"""FMLM distillation stage 2 of the large OWT teacher on 4 x 8 GPUs (see owt_large_distill1.py).

As configs/owt_small_distill2.py (batch 512, boundary 1/128, no learned weighting).

Memory per GPU, GiB (tools/memplan.py): 4 node(s) x 8 GPUs, micro-batch 16 x 1,
  checkpointing selective, frozen nets replicated:
  before the step: params 0.69, optimizer 1.39, ema 0.69, frozen 5.55
  peak 30.88 (budget 70) in micro-batch 1/1 (backward): the above + (B,L,V) 4.60, activations 17.17, temporaries 0.78
  largest micro-batch within 70: 16 (all of the per-GPU batch), peak 30.88
Checkpointing off / full: 53.4 / 16.0 GiB.

    torchrun --nnodes 4 --nproc_per_node 8 ... run/train.py --config configs/owt_large_distill2.py
"""

from pathlib import Path

from flm.config import apply_overrides, load_config

config = apply_overrides(load_config(Path(__file__).with_name("owt_small_distill2.py")), {
    "out_dir": "runs/owt_large_distill2",
    "distill.teacher": "runs/owt_large/checkpoints/step_00500000",
    "distill.stage1": "runs/owt_large_distill1/checkpoints/step_01000000",
    "dist.replicate": -1,
    "grad_accum": 1,  # 16 sequences per GPU in one micro-batch
})
