"""The tiny autoregressive baseline on the embedded corpus: configs/tiny.py's backbone,
data, batch, schedule and step budget, with objective="ar", so its rows in
run/eval.py compare with the tiny FLM at an equal budget. Its in-training samples
take L = 64 steps (one per token) whatever sample_steps says.

    python run/train.py --config configs/tiny_ar.py
"""

import dataclasses
import runpy
from pathlib import Path

base = runpy.run_path(str(Path(__file__).with_name("tiny.py")))["config"]
config = dataclasses.replace(base, objective="ar", out_dir="runs/tiny_ar")
