"""Stage-1 flow-map distillation of the tiny teacher (configs/tiny.py) on CPU.

    python run/train.py --config configs/tiny_distill1.py

The student (teacher backbone + second time embedding, output layer zeroed)
learns the residual g(x, s, t) of X_{s,t} = x + Delta v(x, s) + 0.5 Delta^2 g
against the frozen teacher's two-half-step target (method.md section 2).

The released choices, as the study's headline FMLM (tools/study.py, "fmlm_s1"/"fmlm"):
a learned weighting w(s) here (distill.weighting="s") and none in stage 2, boundary
intervals (0, 1) with probability 1/64 here and 1/128 in stage 2; 300 steps of batch 32
per stage. The study's ablations (docs/results/ablations.md) score the other weightings
and no boundary intervals against the same teacher.
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
    optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="constant", grad_clip=1.0, ema_decay=0.995),
    distill=DistillConfig(teacher="runs/tiny/checkpoints/step_00001500", boundary_prob=64, weighting="s"),
    dist=DistConfig(mixed_precision="fp32"),
)
