"""FMLM distillation stage 1 of the OWT small teacher (method.md section 2).

Stage 1 trains the residual flow map g against the frozen teacher's two-half-step
target; stage 2 (configs/owt_small_distill2.py) trains the one-network FMLM h against
the frozen stage-1 map. The backbone (12 x 768, soft-cap, time scale) comes from the
teacher checkpoint; only model.dropout is the student's own.

As the released script (scripts/train_owt_flm_distill.sh with configs/model/small.yaml
and configs/algo/flm_semigroup_distill.yaml): global batch 128, AdamW lr 3e-4 constant
after 2500 warmup steps (their constant_warmup.yaml), clip 1.0, EMA 0.9999, bf16, up to
1M steps, boundary (s, t) = (0, 1) with probability 1/64, learned loss weighting of s
only (their LearnableLossWeighting is built with is_flow=True: its t input is ignored),
student dropout 0.1 (also active in the student's two no-grad target forwards:
distill.target_dropout=True), samples at 1, 2, 4 and 32 steps.

Deviations we keep (docs/fidelity.md): the weighting MLP reads Fourier features of s
(sin/cos(pi 2^k s)) rather than their sinusoidal timestep embedder -- the same kind of
smooth function of s, and the parametrisation our checkpoints already use; only the
student's output projection is zeroed at init (they zero the final layer's adaLN too;
the initial map is the teacher's Euler step either way); the interval lengths d are
spread over the global batch with one shared offset, d_i = 1 - (i + u)/N (theirs: one
uniform per stratum, permuted, then split over processes) -- both give d ~ U(0, 1] per
example and s ~ U[0, 1 - d].

    torchrun --nproc_per_node 8 run/train.py --config configs/owt_small_distill1.py \
        --distill.teacher=runs/owt_small/checkpoints/step_01000000

Memory per GPU, GiB (tools/memplan.py): 1 node(s) x 8 GPUs, micro-batch 16 x 1,
  checkpointing selective, frozen nets replicated:
  before the step: params 0.08, optimizer 0.16, ema 0.08, frozen 0.32
  peak 12.90 (budget 70) in micro-batch 1/1: the above + (B,L,V) 12.27
  largest micro-batch within 70: 16 (all of the per-GPU batch), peak 12.90
The peak is in the no-gradient target (dense (B, L, V) states and teacher/student
outputs, a quarter of the batch at a time), so checkpointing barely matters (off / full:
13.1 / 12.9 GiB); FSDP-sharded frozen nets (distill.frozen_placement=sharded) would save
at most their 0.3 GiB.
"""

from flm.config import Config, DataConfig, DistConfig, DistillConfig, ModelConfig, OptimConfig

config = Config(
    objective="fmlm_stage1",
    out_dir="runs/owt_small_distill1",
    steps=1_000_000,
    batch_size=128,
    log_every=50,
    eval_every=5000,
    eval_batches=8,
    sample_every=5000,
    sample_steps=[1, 2, 4, 32],
    ckpt_every=2500,
    # dim=768, n_layers=12, attn_softcap, time_scale: taken from the teacher
    model=ModelConfig(vocab_size=50258, seq_len=1024, dropout=0.1),
    data=DataConfig(path="data/owt/tokens", num_workers=4),
    optim=OptimConfig(lr=3e-4, warmup_steps=2500, schedule="constant", grad_clip=1.0, ema_decay=0.9999),
    distill=DistillConfig(teacher="runs/owt_small/checkpoints/step_01000000",
                          boundary_prob=64, weighting="s", target_dropout=True),
    dist=DistConfig(replicate=1, activation_checkpointing="selective", mixed_precision="bf16"),
)
