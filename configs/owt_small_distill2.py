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

One micro-batch of 64 per GPU. Before the memory-lean distillation losses it peaked at
81.2 GiB there (over an 80 GB card; 67.5 GiB of (B, L, V) tensors) and ran as 2 x 32.
Memory per GPU, GiB (tools/memplan.py): 1 node(s) x 8 GPUs, micro-batch 64 x 1,
  checkpointing selective, frozen nets replicated:
  before the step: params 0.08, optimizer 0.16, ema 0.08, frozen 0.63
  peak 32.69 (budget 70) in micro-batch 1/1: the above + (B,L,V) 18.41, activations 13.34
  largest micro-batch within 70: 64 (all of the per-GPU batch), peak 32.69
"""

from pathlib import Path

from flm.config import apply_overrides, load_config

config = apply_overrides(load_config(Path(__file__).with_name("owt_small_distill1.py")), {
    "objective": "fmlm_stage2",
    "out_dir": "runs/owt_small_distill2",
    "batch_size": 512,
    "grad_accum": 1,  # 64 sequences per GPU in one micro-batch (32.7 GiB)
    "distill.stage1": "runs/owt_small_distill1/checkpoints/step_01000000",
    "distill.boundary_prob": 128,
    "distill.weighting": "none",
})
