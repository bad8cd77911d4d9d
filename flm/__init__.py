"""flm: flow-based language models (FLM) and flow-map distillation (FMLM)."""

__version__ = "0.1.0"
