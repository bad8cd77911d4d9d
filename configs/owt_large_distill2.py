"""FMLM distillation stage 2 of the OWT large teacher (method.md section 2).

Stage 1 trains the residual flow map g against the frozen teacher's two-half-step
target (batch 128); stage 2 trains the one-network FMLM h against the frozen
stage-1 map (batch 512). The backbone comes from the teacher checkpoint.
method.md does not fix the distillation learning rate or length: 1e-4 constant
after 1000 warmup steps and 100k steps are our defaults. Point distill.teacher
at the teacher's last checkpoint (the EMA weights are used).

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_large_distill2.py \
        --distill.teacher=runs/owt_large/checkpoints/step_00500000
"""

from flm.config import Config, DataConfig, DistConfig, DistillConfig, ModelConfig, OptimConfig

config = Config(
    objective="fmlm_stage2",
    out_dir="runs/owt_large_distill2",
    steps=100_000,
    batch_size=512,
    log_every=50,
    eval_every=5000,
    eval_batches=8,
    sample_every=5000,
    sample_steps=[1, 2, 4, 8],
    ckpt_every=2500,
    model=ModelConfig(vocab_size=50257, seq_len=1024),  # dim=2048, n_layers=24: taken from the teacher
    data=DataConfig(path="data/owt/tokens", num_workers=4),
    optim=OptimConfig(lr=1e-4, warmup_steps=1000, schedule="constant", grad_clip=1.0, ema_decay=0.9999),
    distill=DistillConfig(teacher="runs/owt_large/checkpoints/step_00500000",
                          stage1="runs/owt_large_distill1/checkpoints/step_00100000",
                          boundary_prob=128, learn_weighting=True),
    dist=DistConfig(replicate=-1, activation_checkpointing="full", mixed_precision="bf16"),
)
