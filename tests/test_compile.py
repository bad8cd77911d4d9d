"""dist.compile: torch.compile per block, composed with activation checkpointing and FSDP2."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch._dynamo.utils import counters

from flm.config import ModelConfig
from flm.distributed import apply_activation_checkpointing, clean_fqn, compile_blocks, materialize, shard_model
from flm.flow import get_tau
from flm.methods.flm import flm_loss
from flm.model import DiT
from flm.rng import example_generators

CFG = ModelConfig(vocab_size=256, seq_len=32, dim=64, n_layers=2, n_heads=2, cond_dim=32)

pytestmark = [pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]




def _model(mesh, compiled: bool) -> torch.nn.Module:
    """run/train.py's order: meta -> checkpointing -> compile -> fully_shard -> materialise."""
    with torch.device("meta"):
        model = DiT(CFG)
    apply_activation_checkpointing(model, "selective")
    compile_blocks(model, compiled, torch.device("cpu"))  # inductor, as dist.compile=true runs it
    shard_model(model, mesh, "fp32")
    materialize(model, torch.device("cpu"), reference=lambda: DiT(CFG))
    gen = torch.Generator().manual_seed(0)  # every weight non-zero, so the blocks shape the loss
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().copy_(torch.randn(p.to_local().shape, generator=gen) * 0.05)
    return model


def _steps(model, n: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len), generator=torch.Generator().manual_seed(1))
    t = (torch.arange(4) + 0.5) / 4
    losses, grads = [], {}
    for step in range(n):
        loss, _ = flm_loss(model, ids, t, get_tau(CFG.vocab_size), example_generators(0, step, range(4),
                                                                                       torch.device("cpu")))
        (loss / ids.numel()).backward()
        if step == 0:
            grads = {clean_fqn(n): p.grad.full_tensor() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / ids.numel())
    return losses, grads


def test_compiled_step_equals_eager(mesh):
    eager = _model(mesh, False)
    eager_losses, eager_grads = _steps(eager)
    compiled = _model(mesh, True)
    assert isinstance(compiled.blocks[0], torch._dynamo.eval_frame.OptimizedModule)
    # checkpoints do not see the wrappers: the same state-dict keys as the eager model
    assert set(get_model_state_dict(compiled)) == set(get_model_state_dict(eager))
    counters.clear()
    losses, grads = _steps(compiled)
    # compiled for real: one graph shared by the blocks, no graph break (which inside the
    # checkpointed region would silently leave a block eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
