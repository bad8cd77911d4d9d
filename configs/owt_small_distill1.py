"""FMLM distillation stage 1 of the OWT small teacher (method.md section 2).

Stage 1 trains the residual flow map g against the frozen teacher's two-half-step
target (batch 128); stage 2 trains the one-network FMLM h against the frozen
stage-1 map (batch 512). The backbone comes from the teacher checkpoint.
method.md does not fix the distillation learning rate or length: 1e-4 constant
after 1000 warmup steps and 100k steps are our defaults. Point distill.teacher
at the teacher's last checkpoint (the EMA weights are used).

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_small_distill1.py \
        --distill.teacher=runs/owt_small/checkpoints/step_01000000

Memory per GPU, GiB (tools/memplan.py): 1 node(s) x 8 GPUs, micro-batch 16 x 1,
  checkpointing selective, frozen nets replicated:
  before the step: params 0.08, optimizer 0.16, ema 0.08, frozen 0.32
  peak 25.17 (budget 70) in micro-batch 1/1: the above + (B,L,V) 24.54
  largest micro-batch within 70: 16 (all of the per-GPU batch), peak 25.17
The peak is in the no-gradient target (dense (B, L, V) states and teacher/student
outputs), so checkpointing barely matters (off / full: 27.4 / 25.2 GiB); FSDP-sharded
frozen nets (distill.frozen_placement=sharded) would save 0.3 GiB.
"""

from flm.config import Config, DataConfig, DistConfig, DistillConfig, ModelConfig, OptimConfig

config = Config(
    objective="fmlm_stage1",
    out_dir="runs/owt_small_distill1",
    steps=100_000,
    batch_size=128,
    log_every=50,
    eval_every=5000,
    eval_batches=8,
    sample_every=5000,
    sample_steps=[1, 2, 4, 8],
    ckpt_every=2500,
    model=ModelConfig(vocab_size=50257, seq_len=1024),  # dim=768, n_layers=12: taken from the teacher
    data=DataConfig(path="data/owt/tokens", num_workers=4),
    optim=OptimConfig(lr=1e-4, warmup_steps=1000, schedule="constant", grad_clip=1.0, ema_decay=0.9999),
    distill=DistillConfig(teacher="runs/owt_small/checkpoints/step_01000000",
                          boundary_prob=64, learn_weighting=True),
    dist=DistConfig(replicate=1, activation_checkpointing="selective", mixed_precision="bf16"),
)
