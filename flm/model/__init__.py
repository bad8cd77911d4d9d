"""The denoiser backbone: DiT blocks and the attention backend."""

from flm.model.attention import attention_backend, select_backend
from flm.model.dit import DiT, DiTBlock, FinalLayer, TimeEmbedding, rotary

__all__ = ["DiT", "DiTBlock", "FinalLayer", "TimeEmbedding", "attention_backend", "rotary", "select_backend"]
