#!/usr/bin/env bash
# The README's main job on the embedded corpus, on CPU in about 10 minutes:
#   fetch Shakespeare -> pretokenize -> train a tiny FLM -> sample at 1, 8, 64, 256 steps
#   -> distil it into a flow map (stage 1) and an FMLM (stage 2) -> 1-step samples
#   -> one prompt completed by the teacher (256 steps) and the FMLM (1 and 4 steps), side by side.
# Re-running skips finished work (cached corpus and dataset, auto-resume).
set -euo pipefail
cd "$(dirname "$0")/.."

python tools/fetch_corpus.py --out_dir data/shakespeare/text
if [ ! -f data/shakespeare/tokens/manifest.json ]; then
  python tools/pretokenize.py data/shakespeare/text/train data/shakespeare/tokens \
      --val_inputs data/shakespeare/text/validation --vocab_size 1024
fi
python run/train.py --config configs/tiny.py
teacher=$(ls -d runs/tiny/checkpoints/step_* | tail -n 1)
python run/sample.py "$teacher" --steps 1,8,64,256 --num 2 --out runs/tiny/samples.jsonl

python run/train.py --config configs/tiny_distill1.py
python run/train.py --config configs/tiny_distill2.py
fmlm=$(ls -d runs/tiny_distill2/checkpoints/step_* | tail -n 1)
python run/sample.py "$fmlm" --steps 1,2,4 --num 2 --out runs/tiny_distill2/samples.jsonl

python tools/side_by_side.py "$teacher:256" "$fmlm:1,4" --prompt "KING HENRY:" --num 2
