"""flm: flow-based language models (FLM) and flow-map distillation (FMLM).

    import flm
    lm = flm.load("runs/tiny/checkpoints/step_00001500")
    print(lm.generate(num=2, steps=64, prompt="ROMEO:").texts)

See :mod:`flm.api`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "LanguageModel", "Generation"]


def __getattr__(name: str) -> Any:
    """``flm.load`` and friends, imported on first use (``import flm.config`` stays light)."""
    if name in __all__:
        from flm import api

        return getattr(api, name)
    raise AttributeError(f"module 'flm' has no attribute {name!r}")
