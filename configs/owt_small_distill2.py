"""FMLM distillation stage 2 of the OWT small teacher (method.md section 2).

The one-network FMLM h(x, s, t) learns the frozen stage-1 map
(configs/owt_small_distill1.py). As the released script
(scripts/train_owt_flm_distill_second.sh, configs/algo/flm_distill_double.yaml):
global batch 512, boundary probability 1/128, and no learned weighting
(distill.weighting="none"): the loss is r^2 sum_V (c_{s,t} - softmax h)^2,
r = Delta / (1 - G_s), which emphasises long jumps up to the one-step interval (0, 1).
(Their script sets learnable_loss_weighting=True, but FLM_distill_double.loss never
applies it.) Everything else as in stage 1: lr 3e-4 after 2500 warmup steps, up to 1M
steps, EMA 0.9999, student dropout 0.1; the student starts from the teacher's weights
with emb'(t)'s last layer zeroed, as theirs.

The released code does not say which stage-1 checkpoint stage 2 read; we point at the
last one (override distill.stage1 to use an earlier one).

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_small_distill2.py \
        --distill.teacher=runs/owt_small/checkpoints/step_01000000 \
        --distill.stage1=runs/owt_small_distill1/checkpoints/step_01000000

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
    "distill.stage1": "runs/owt_small_distill1/checkpoints/step_01000000",
    "distill.boundary_prob": 128,
    "distill.weighting": "none",
})
