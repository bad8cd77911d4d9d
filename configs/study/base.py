"""The small-scale study's shared run settings (tools/study.py fills in the method, the
budget and the scale): every teacher of the study -- FLM with tau, FLM with g = t,
MDLM, AR -- uses this backbone, tokenizer, data order (seed), batch and token budget;
the distillation runs (FMLM stages, SDTT rounds) take their backbone from their teacher.

The "cpu" scale is the tiny quickstart backbone (configs/tiny.py) trained longer;
``--scale gpu`` swaps in the DiT-small backbone of configs/lm1b_small.py at a
shortened budget (flm/study.py, SCALES).
"""

from flm.config import Config, DataConfig, DistConfig, ModelConfig, OptimConfig

config = Config(
    objective="flm",
    out_dir="runs/study/flm",
    seed=0,
    steps=1500,
    batch_size=64,
    log_every=25,
    eval_every=500,
    eval_batches=4,
    sample_every=100000,  # no in-training samples: the study evaluates at the end
    sample_steps=[1],
    num_samples=1,
    ckpt_every=250,
    keep_checkpoints=1,
    model=ModelConfig(vocab_size=1024, seq_len=64, dim=128, n_layers=4, n_heads=4, cond_dim=64),
    data=DataConfig(path="data/shakespeare/tokens", num_workers=1),
    optim=OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0,
                      ema_decay=0.995),
    dist=DistConfig(activation_checkpointing="off", mixed_precision="fp32"),
)
