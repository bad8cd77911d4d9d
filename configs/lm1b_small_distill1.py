"""FMLM distillation stage 1 of the LM1B small teacher (configs/lm1b_small.py).

As the released script (scripts/train_lm1b_flm_distill.sh with configs/model/small.yaml
and configs/algo/flm_semigroup_distill.yaml): global batch 512, L = 128, AdamW lr 3e-4
constant after 2500 warmup steps, clip 1.0, EMA 0.9999, bf16, up to 1M steps, boundary
(s, t) = (0, 1) with probability 1/64, learned loss weighting of s only
(distill.weighting="s"; theirs is built with is_flow=True, so its t input is ignored),
student dropout 0.1, also in the student's two no-grad target forwards
(distill.target_dropout=True, as their student runs in train mode), samples at 1, 2, 4
and 32 steps. The backbone (12 x 768, soft-cap 50, raw-t time embedding) comes from
the teacher checkpoint; only model.dropout is the student's own.

Deviations we keep are those of configs/owt_small_distill1.py (see its docstring and
docs/fidelity.md): Fourier features of s in the weighting MLP, only the output
projection zeroed at init, interval lengths spread with one shared offset.

    torchrun --nproc_per_node 8 run/train.py --config configs/lm1b_small_distill1.py \
        --distill.teacher=runs/lm1b_small/checkpoints/step_01000000
"""

from flm.config import Config, DataConfig, DistConfig, DistillConfig, ModelConfig, OptimConfig

config = Config(
    objective="fmlm_stage1",
    out_dir="runs/lm1b_small_distill1",
    steps=1_000_000,
    batch_size=512,
    log_every=50,
    eval_every=5000,
    eval_batches=16,
    sample_every=5000,
    sample_steps=[1, 2, 4, 32],
    ckpt_every=5000,
    keep_checkpoints=3,
    # dim=768, n_layers=12, attn_softcap, time_scale: taken from the teacher
    model=ModelConfig(vocab_size=30522, seq_len=128, dropout=0.1),
    data=DataConfig(path="data/lm1b/tokens", num_workers=4),
    optim=OptimConfig(lr=3e-4, warmup_steps=2500, schedule="constant", grad_clip=1.0, ema_decay=0.9999),
    distill=DistillConfig(teacher="runs/lm1b_small/checkpoints/step_01000000",
                          boundary_prob=64, weighting="s", target_dropout=True),
    dist=DistConfig(replicate=1, activation_checkpointing="off", mixed_precision="bf16"),
)
