"""Builders: every coordinate moves, the flow can shift and scale, and guides fit simple posteriors."""

from __future__ import annotations

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim import ClippedAdam

import pyroflows
from pyroflows.transforms import Compose


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_realnvp_moves_every_coordinate(dim):
    torch.manual_seed(0)
    flow = pyroflows.realnvp(dim, num_layers=4, hidden=(8,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(dim)
    jac = torch.autograd.functional.jacobian(flow, x)
    for i in range(dim):
        assert not torch.allclose(jac[i], torch.eye(dim)[i]), f"coordinate {i} is never transformed"


@pytest.mark.parametrize("builder", [pyroflows.planar_flow, pyroflows.realnvp])
def test_builders_return_a_compose_of_modules(builder):
    flow = builder(3)
    assert isinstance(flow, Compose) and len(list(flow.parameters())) > 0


def test_builders_reject_bad_sizes():
    with pytest.raises(ValueError, match="positive int"):
        pyroflows.realnvp(0)
    with pytest.raises(ValueError, match="num_layers"):
        pyroflows.planar_flow(2, num_layers=0)
    with pytest.raises(ValueError, match="divisible by 16 for levels=4; the largest levels this size allows is 3"):
        pyroflows.glow((1, 8, 8), levels=4)
    with pytest.raises(ValueError, match="H=6, W=6 must be divisible by 4"):
        pyroflows.realnvp((1, 6, 6), levels=3)
    with pytest.raises(ValueError, match=r"image shape \(C, H, W\)"):
        pyroflows.glow((8, 8))
    with pytest.raises(ValueError, match="steps"):
        pyroflows.glow((1, 8, 8), steps=0)


@pytest.mark.parametrize(
    "init_fn,lr",
    [
        (partial(pyroflows.realnvp, num_layers=2, hidden=(16,)), 2e-2),
        (partial(pyroflows.planar_flow, num_layers=2), 5e-2),
    ],
    ids=["realnvp", "planar_flow"],
)
def test_guide_fits_a_shifted_narrow_gaussian(init_fn, lr):
    """AutoNormalizingFlow's base is a fixed N(0, I): the builder itself must shift and scale."""
    pyro.set_rng_seed(0)
    loc, scale = torch.tensor([3.0, -2.0]), torch.tensor([0.2, 0.5])

    def model():
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    guide = AutoNormalizingFlow(model, init_fn)
    steps = 800
    optim = ClippedAdam({"lr": lr, "lrd": 0.05 ** (1 / steps)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=16, vectorize_particles=True))
    for _ in range(steps):
        svi.step()
    with torch.no_grad():
        z = guide.get_posterior().sample((20000,))
    assert torch.allclose(z.mean(0), loc, atol=0.05)
    assert torch.allclose(z.std(0), scale, rtol=0.15)
