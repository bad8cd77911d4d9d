"""Stage 2: the one-network FMLM h(x, s, t), distilled from the tiny teacher and
the stage-1 map of configs/tiny_distill1.py, sampled in 1 to a few steps.
No learned weighting, as released: the loss r^2 sum_V (c - softmax h)^2 emphasises long
jumps up to the one-step interval (0, 1).

    python run/train.py --config configs/tiny_distill2.py
"""

from pathlib import Path

from flm.config import apply_overrides, load_config

config = apply_overrides(load_config(Path(__file__).with_name("tiny_distill1.py")), {
    "objective": "fmlm_stage2",
    "out_dir": "runs/tiny_distill2",
    "distill.stage1": "runs/tiny_distill1/checkpoints/step_00000300",
    "distill.boundary_prob": 128,
    "distill.weighting": "none",
})
