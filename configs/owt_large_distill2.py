"""FMLM distillation stage 2 of the large OWT teacher on 4 x 8 GPUs (see owt_large_distill1.py).

As configs/owt_small_distill2.py (batch 512, boundary 1/128, no learned weighting).

    torchrun --nnodes 4 --nproc_per_node 8 ... run/train.py --config configs/owt_large_distill2.py
"""

from pathlib import Path

from flm.config import apply_overrides, load_config

config = apply_overrides(load_config(Path(__file__).with_name("owt_small_distill2.py")), {
    "out_dir": "runs/owt_large_distill2",
    "distill.teacher": "runs/owt_large/checkpoints/step_00500000",
    "distill.stage1": "runs/owt_large_distill1/checkpoints/step_01000000",
    "dist.replicate": -1,
    "dist.activation_checkpointing": "full",
})
