import torch

from flm.config import ModelConfig
from flm.flow import Tau, get_tau
from flm.model import DiT
from flm.methods.base import loss_by_bucket, stratified_times
from flm.methods.flm import flm_loss
from flm.rng import example_generators, example_normal


def test_stratified_times_cover_the_global_batch_and_split_over_ranks():
    n = 8
    shared = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - same seed on every "rank"
    whole = stratified_times(n, torch.arange(n), shared())
    ranks = torch.cat([stratified_times(n, torch.arange(r * 4, r * 4 + 4), shared()) for r in range(2)])
    assert torch.equal(whole, ranks)
    assert torch.equal((whole * n).floor().long(), torch.arange(n))  # one t per stratum


def test_example_noise_does_not_depend_on_the_split():
    dev = torch.device("cpu")
    full = example_normal((5, 3), example_generators(0, 7, torch.arange(4), dev), dev)
    part = example_normal((5, 3), example_generators(0, 7, torch.arange(2, 4), dev), dev)
    assert torch.equal(full[2:], part)
    other_step = example_normal((5, 3), example_generators(0, 8, torch.arange(4), dev), dev)
    assert not torch.equal(full, other_step)


def test_flm_loss_starts_at_log_v_and_both_noise_paths_train():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, seq_len=8, dim=16, n_layers=1, n_heads=2, cond_dim=8)
    model = DiT(cfg)
    ids = torch.randint(0, 64, (4, 8))
    t = torch.rand(4)
    gens = lambda: example_generators(0, 0, torch.arange(4), torch.device("cpu"))  # noqa: E731
    for low_rank in (True, False):
        total, per_example = flm_loss(model, ids, t, get_tau(64), gens(), low_rank)
        # zero-initialised output layer: uniform prediction, loss = log V per token
        assert torch.allclose(total / ids.numel(), torch.log(torch.tensor(64.0)), atol=1e-5)
        assert per_example.shape == (4,) and not per_example.requires_grad
        total.backward()
        assert model.final.linear.weight.grad.abs().sum() > 0
        model.zero_grad()


def test_identity_time_map_is_the_ablation():
    t = torch.linspace(0, 1, 5)
    assert torch.allclose(Tau.identity()(t), t)
    assert (get_tau(1000)(t[1:-1]) > t[1:-1]).all()


def test_loss_by_bucket():
    t = torch.tensor([0.05, 0.07, 0.95, 1.0])
    out = loss_by_bucket(t, torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert out[0, 0] == 4 and out[1, 0] == 2 and out[0, 9] == 12 and out[1, 9] == 2
