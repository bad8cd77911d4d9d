"""Training methods: one file each, one registry.

``METHODS`` is the one list of them: the config's ``objective``, ``run/sample.py``,
``run/eval.py`` and the tools read it. Adding a method is a new file with a
class that has the members of :class:`flm.methods.base.Method` and one line here.
"""

from __future__ import annotations

from flm.methods.ar import AR
from flm.methods.base import Batch, LossOutput, Method
from flm.methods.flm import FLM
from flm.methods.fmlm import FMLMStage1, FMLMStage2
from flm.methods.mdlm import MDLM
from flm.methods.sdtt import SDTT

METHODS: dict[str, type[Method]] = {
    "flm": FLM,
    "fmlm_stage1": FMLMStage1,
    "fmlm_stage2": FMLMStage2,
    "mdlm": MDLM,
    "ar": AR,
    "sdtt": SDTT,
}


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a clear error listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method (objective) {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Batch", "LossOutput", "Method", "get_method"]
