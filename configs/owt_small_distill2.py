"""FMLM distillation stage 2 of the OWT small teacher (method.md section 2).

The one-network FMLM h(x, s, t) learns the frozen stage-1 map
(configs/owt_small_distill1.py) with batch 512 and boundary probability 1/128;
everything else as in stage 1.

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_small_distill2.py \
        --distill.teacher=runs/owt_small/checkpoints/step_01000000 \
        --distill.stage1=runs/owt_small_distill1/checkpoints/step_00100000
"""

from pathlib import Path

from flm.config import apply_overrides, load_config

config = apply_overrides(load_config(Path(__file__).with_name("owt_small_distill1.py")), {
    "objective": "fmlm_stage2",
    "out_dir": "runs/owt_small_distill2",
    "batch_size": 512,
    "distill.stage1": "runs/owt_small_distill1/checkpoints/step_00100000",
    "distill.boundary_prob": 128,
})
