"""The memory tracker of the plans: torch's ``MemTracker`` with this project's categories.

:class:`StepTracker` follows every tensor storage a step allocates (real or fake
tensors) and labels it by what it is (:class:`Mem`); :func:`peak_bytes` is the
peak of one call, which ``tools/bench.py`` and the distillation memory test use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _RefType

from flm.distributed import local_tensor


class Mem(_RefType):
    """What each tracked byte is (the categories of a plan)."""

    PARAM = "params"  # trained parameters, fp32 shards
    OPT = "optimizer"  # AdamW moments (and its step's temporaries)
    EMA = "ema"  # fp32 shadow of the parameters' shards
    FROZEN = "frozen"  # teacher / stage-1 map weights (replicated or shards)
    GRAD = "grads"  # fp32 gradient shards once backward is done
    VOCAB = "(B,L,V)"  # any (..., L, V)-shaped tensor: logits, probabilities, dense states, their gradients
    ACT = "activations"  # other forward tensors: block activations, gathered weights
    TEMP = "temporaries"  # other backward tensors: activation gradients, unsharded gradients


_FROM_TORCH = {_MemRefType.OPT: Mem.OPT, _MemRefType.TEMP: Mem.TEMP, _MemRefType.ACT: Mem.ACT}


class StepTracker(MemTracker):
    """torch's MemTracker with this project's categories and no per-module statistics.

    Module statistics are not needed and assume each module runs once per step, while a
    distillation step calls the student three times and the teacher twice. Every new
    storage is labelled by when it is made (forward, backward, optimizer step), except
    tensors whose last dimension is the vocabulary and that hold at least L x V
    elements, which are counted apart (:attr:`Mem.VOCAB`).
    """

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self._ref_class = Mem
        self.vocab_size, self.min_numel = vocab_size, vocab_size * seq_len
        self.phase, self.peak_phase, self._peak_total = "setup", "", 0
        self._propagating = 0

    def __enter__(self):
        # DTensor computes each op's output shape by running it on global-shape tensors in the
        # active fake mode -- ours -- so those metadata-only tensors would count as memory.
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._orig_propagate = original = ShardingPropagator._propagate_tensor_meta_non_cached

        def propagate(prop, op_schema):
            self._propagating += 1
            try:
                return original(prop, op_schema)
            finally:
                self._propagating -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate
        return super().__enter__()

    def __exit__(self, *args):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        ShardingPropagator._propagate_tensor_meta_non_cached = self._orig_propagate
        return super().__exit__(*args)

    def _pre_fw_hook(self, module, inputs) -> None:
        pass

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    def _update_and_maybe_create_winfos(self, t, reftype, update_existing=False):
        return super()._update_and_maybe_create_winfos(t, _FROM_TORCH.get(reftype, reftype), update_existing)

    def label(self, tensors, kind: Mem) -> None:
        for t in tensors:
            self._update_and_maybe_create_winfos(local_tensor(t), kind)

    def _track(self, reftype, t: torch.Tensor) -> None:
        if self._propagating:
            return
        kind = _FROM_TORCH.get(reftype, reftype)
        if kind is not Mem.OPT and t.dim() >= 2 and t.shape[-1] >= self.vocab_size and t.numel() >= self.min_numel:
            kind = Mem.VOCAB
        super()._track(kind, t)

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        total = sum(self._peak_mem.values())
        if total > self._peak_total:
            self._peak_total = total
            self.peak_phase = self.phase + (" (backward)" if self._mod_tracker.is_bw else "")


def peak_bytes(fn: Callable[[], Any], vocab_size: int, seq_len: int) -> int:
    """Peak bytes of the tensors ``fn()`` creates or touches, by the tracker of the plans
    (real or fake tensors; tools/bench.py and the distillation memory test use it)."""
    tracker = StepTracker(vocab_size, seq_len)
    with tracker:
        fn()
    return int(tracker._peak_total)
