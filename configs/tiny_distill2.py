"""Stage 2: the one-network FMLM h(x, s, t), distilled from the tiny teacher and
the stage-1 map (configs/tiny_distill1.py), sampled in 1 to a few steps.

    python run/train.py --config configs/tiny_distill2.py
"""

from flm.config import Config, DataConfig, DistConfig, DistillConfig, ModelConfig, OptimConfig

config = Config(
    objective="fmlm_stage2",
    out_dir="runs/tiny_distill2",
    steps=150,
    batch_size=16,
    log_every=10,
    eval_every=150,
    eval_batches=2,
    sample_every=150,
    sample_steps=[1, 2, 4],
    num_samples=2,
    ckpt_every=50,
    keep_checkpoints=1,
    model=ModelConfig(vocab_size=2048, seq_len=128),
    data=DataConfig(path="data/shakespeare/tokens", num_workers=1),
    optim=OptimConfig(lr=3e-4, warmup_steps=10, schedule="constant", grad_clip=1.0, ema_decay=0.99),
    distill=DistillConfig(teacher="runs/tiny/checkpoints/step_00000300",
                          stage1="runs/tiny_distill1/checkpoints/step_00000150", boundary_prob=128),
    dist=DistConfig(mixed_precision="fp32"),
)
