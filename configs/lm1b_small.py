"""FLM teacher, DiT-small on LM1B (method.md section 4; the paper's setting).

V = 30522, bert-base-uncased as released: pretokenize with
`--tokenizer <bert-base-uncased>/tokenizer.json --framing sentences` (each sentence
[CLS] ... [SEP]; the released loader instead wraps sentences into L-token rows with
[CLS]/[SEP] per row, see docs/fidelity.md); without that file, a sentencepiece model
of the same size (`--vocab_size 30522`) stands in,
L = 128, global batch 512, otherwise as configs/owt_small.py: the released model
(their configs/model/small.yaml, models/dit.py) with dropout 0.1 on the residual
branches, attention logits soft-capped at 50 and raw t into the time embedding
(model.time_scale=1). See docs/fidelity.md for every difference to the release.

    torchrun --nproc_per_node 8 run/train.py --config configs/lm1b_small.py

Memory per GPU, GiB (tools/memplan.py): 1 node(s) x 8 GPUs, micro-batch 64 x 1,
  checkpointing off:
  before the step: params 0.06, optimizer 0.13, ema 0.06
  peak 4.43 (budget 70) in micro-batch 1/1 (backward): the above + activations 4.01, temporaries 0.16
  largest micro-batch within 70: 64 (all of the per-GPU batch), peak 4.43
"""

from flm.config import Config, DataConfig, DistConfig, ModelConfig, OptimConfig

config = Config(
    objective="flm",
    out_dir="runs/lm1b_small",
    steps=1_000_000,
    batch_size=512,
    log_every=50,
    eval_every=5000,
    eval_batches=16,
    sample_every=10000,
    sample_steps=[8, 64, 1024],
    ckpt_every=5000,
    model=ModelConfig(vocab_size=30522, seq_len=128, dim=768, n_layers=12, n_heads=12, cond_dim=128,
                      dropout=0.1, attn_softcap=50.0, time_scale=1.0),
    data=DataConfig(path="data/lm1b/tokens", num_workers=4),
    optim=OptimConfig(lr=3e-4, warmup_steps=2500, schedule="constant", grad_clip=1.0, ema_decay=0.9999),
    dist=DistConfig(activation_checkpointing="off", mixed_precision="bf16"),
)
