import torch
from torch import nn

from flm.flow import Tau, get_tau
from flm.methods.flm import euler_sample


class _Fixed(nn.Module):
    """D(x, t) = fixed logits, recording the times it is called at."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.times = logits, []

    def forward(self, x, t):
        self.times.append(t[0].item())
        return self.logits.expand(x.shape[0], -1, -1)


def test_euler_follows_the_ode_to_the_target():
    vocab = 6
    target = torch.full((1, 3, vocab), -30.0)
    target[0, torch.arange(3), torch.tensor([1, 4, 2])] = 30.0  # posterior = a point mass
    model = _Fixed(target)
    gen = torch.Generator().manual_seed(0)
    ids = euler_sample(model, get_tau(vocab), 2, 3, vocab, 4, gen, torch.device("cpu"))
    assert ids.tolist() == [[1, 4, 2]] * 2
    assert model.times == [0.0, 0.25, 0.5, 0.75]


def test_euler_step_matches_the_formula():
    """One step from eps with p fixed: x1 = eps + (g1 - g0)/(1 - g0) (p - eps)."""
    vocab, tau = 5, Tau.identity()
    logits = torch.randn(1, 2, vocab)
    seen = []

    class Recorder(_Fixed):
        def forward(self, x, t):
            seen.append(x.clone())
            return super().forward(x, t)

    gen = torch.Generator().manual_seed(1)
    euler_sample(Recorder(logits), tau, 1, 2, vocab, 2, gen, torch.device("cpu"))
    eps = torch.randn(1, 2, vocab, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits, -1)
    assert torch.allclose(seen[0], eps)
    assert torch.allclose(seen[1], eps + 0.5 * (p - eps), atol=1e-6)
