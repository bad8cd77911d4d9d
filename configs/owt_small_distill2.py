"""FMLM distillation stage 2 of the OWT small teacher (method.md section 2).

The one-network FMLM h(x, s, t) learns the frozen stage-1 map
(configs/owt_small_distill1.py) with batch 512 and boundary probability 1/128;
everything else as in stage 1.

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_small_distill2.py \
        --distill.teacher=runs/owt_small/checkpoints/step_01000000 \
        --distill.stage1=runs/owt_small_distill1/checkpoints/step_00100000

Two micro-batches of 32 per GPU (grad_accum=2): one micro-batch of 64 peaks at
81.2 GiB (tools/memplan.py; 67.5 GiB of it (B, L, V) tensors), over an 80 GB card.
Memory per GPU, GiB (tools/memplan.py): 1 node(s) x 8 GPUs, micro-batch 32 x 2,
  checkpointing selective, frozen nets replicated:
  before the step: params 0.08, optimizer 0.16, ema 0.08, frozen 0.63
  peak 41.72 (budget 70) in micro-batch 2/2 (backward): the above + (B,L,V) 33.74, activations 6.40, temporaries 0.63
  largest micro-batch within 70: 32, peak 41.72
"""

from pathlib import Path

from flm.config import apply_overrides, load_config

config = apply_overrides(load_config(Path(__file__).with_name("owt_small_distill1.py")), {
    "objective": "fmlm_stage2",
    "out_dir": "runs/owt_small_distill2",
    "batch_size": 512,
    "grad_accum": 2,
    "distill.stage1": "runs/owt_small_distill1/checkpoints/step_00100000",
    "distill.boundary_prob": 128,
})
