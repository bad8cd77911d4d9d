"""Stage-1 flow-map distillation of the tiny teacher (configs/tiny.py) on CPU.

    python run/train.py --config configs/tiny_distill1.py

The student (teacher backbone + second time embedding, output layer zeroed)
learns the residual g(x, s, t) of X_{s,t} = x + Delta v(x, s) + 0.5 Delta^2 g
against the frozen teacher's two-half-step target (method.md section 2).

Loss weighting w(s, t) (distill.weighting="st", here and in tiny_distill2.py), not the
released w(s) / none of the paper configs: the README's tiny evaluation table and
figures were made with it (it was the only weighting then), and keeping it keeps them
reproducible. Switch with --distill.weighting=s (stage 1) / none (stage 2) for the
released choice.
"""

from flm.config import Config, DataConfig, DistConfig, DistillConfig, ModelConfig, OptimConfig

config = Config(
    objective="fmlm_stage1",
    out_dir="runs/tiny_distill1",
    steps=300,
    batch_size=32,
    log_every=10,
    eval_every=300,
    eval_batches=2,
    sample_every=300,
    sample_steps=[1, 2, 4],
    num_samples=2,
    ckpt_every=100,
    keep_checkpoints=1,
    model=ModelConfig(vocab_size=1024, seq_len=64),  # the rest comes from the teacher
    data=DataConfig(path="data/shakespeare/tokens", num_workers=1),
    optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="constant", grad_clip=1.0, ema_decay=0.99),
    distill=DistillConfig(teacher="runs/tiny/checkpoints/step_00001500", boundary_prob=64, weighting="st"),
    dist=DistConfig(mixed_precision="fp32"),
)
