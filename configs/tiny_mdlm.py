"""The tiny MDLM (masked discrete diffusion) baseline on the embedded corpus: configs/tiny.py's backbone,
data, batch, schedule and step budget, with objective="mdlm", so its rows in
run/eval.py compare with the tiny FLM at an equal budget.

    python run/train.py --config configs/tiny_mdlm.py
"""

import dataclasses
import runpy
from pathlib import Path

base = runpy.run_path(str(Path(__file__).with_name("tiny.py")))["config"]
config = dataclasses.replace(base, objective="mdlm", out_dir="runs/tiny_mdlm",
                             sample_steps=[1, 8, 64, 256])
