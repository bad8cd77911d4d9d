"""FMLM distillation stage 2 of the LM1B small teacher (method.md section 2).

The one-network FMLM h(x, s, t) learns the frozen stage-1 map
(configs/lm1b_small_distill1.py). As the released script
(scripts/train_lm1b_flm_distill_second.sh, configs/algo/flm_distill_double.yaml):
global batch 512 (as stage 1 on LM1B), boundary probability 1/128, and no learned
weighting (distill.weighting="none"; their script sets learnable_loss_weighting=True
but FLM_distill_double.loss never applies it): the loss is
r^2 sum_V (c_{s,t} - softmax h)^2, r = Delta / (1 - G_s), which emphasises long jumps
up to the one-step interval (0, 1). lr 3e-4 after 2500 warmup steps, up to 1M steps,
EMA 0.9999, student dropout 0.1, as stage 1.

The released code does not say which stage-1 checkpoint stage 2 read; we point at the
last one (override distill.stage1 to use an earlier one).

    torchrun --nproc_per_node 8 run/train.py --config configs/lm1b_small_distill2.py \
        --distill.teacher=runs/lm1b_small/checkpoints/step_01000000 \
        --distill.stage1=runs/lm1b_small_distill1/checkpoints/step_01000000
"""

from pathlib import Path

from flm.config import apply_overrides, load_config

config = apply_overrides(load_config(Path(__file__).with_name("lm1b_small_distill1.py")), {
    "objective": "fmlm_stage2",
    "out_dir": "runs/lm1b_small_distill2",
    "distill.stage1": "runs/lm1b_small_distill1/checkpoints/step_01000000",
    "distill.boundary_prob": 128,
    "distill.weighting": "none",
})
