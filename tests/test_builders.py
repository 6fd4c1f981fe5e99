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
    with pytest.raises(ValueError, match="num_layers"):
        pyroflows.glow((1, 8, 8), num_layers=0)
    with pytest.raises(ValueError, match="hidden"):
        pyroflows.realnvp(4, hidden=(8, 0))
    with pytest.raises(ValueError, match=r"realnvp: hidden must be an int >= 1, got \(8, 8\)"):
        pyroflows.realnvp((1, 8, 8), hidden=(8, 8))


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


def test_an_int_hidden_is_one_hidden_layer_for_vectors():
    """realnvp(64, hidden=128) used to raise "'int' object is not iterable" although the signature takes an int."""
    flow = pyroflows.realnvp(6, num_layers=2, hidden=16)
    reference = pyroflows.realnvp(6, num_layers=2, hidden=(16,))
    assert [tuple(p.shape) for p in flow.parameters()] == [tuple(p.shape) for p in reference.parameters()]


@pytest.mark.parametrize(
    "build,old,new",
    [
        (pyroflows.glow, dict(steps=2, hidden_channels=8), dict(num_layers=2, hidden=8)),
        (pyroflows.residual_flow, dict(num_blocks=2), dict(num_layers=2)),
        (pyroflows.realnvp, dict(input_dim_or_shape=(1, 8, 8)), dict(shape=(1, 8, 8))),
        (pyroflows.planar_flow, dict(input_dim=3), dict(shape=3)),
    ],
    ids=["glow", "residual_flow", "realnvp", "planar_flow"],
)
def test_renamed_builder_arguments_warn_and_build_the_same_flow(build, old, new):
    first = ((1, 8, 8),) if build in (pyroflows.glow, pyroflows.residual_flow) else ()
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="is renamed"):
        legacy = build(*first, **old)
    torch.manual_seed(0)
    current = build(*first, **new)
    assert repr(legacy) == repr(current)
    for a, b in zip(legacy.state_dict().values(), current.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(TypeError, match="got both"):
        build(*first, **old, **new)


def test_renamed_layer_arguments_warn_and_build_the_same_layer():
    from pyroflows.transforms import ActNorm, AffineCoupling, Invertible1x1Conv, MultiScale, Permute, Planar, Squeeze

    cases = [
        (lambda: Planar(input_dim=3), lambda: Planar(3)),
        (lambda: Permute(input_dim=3), lambda: Permute(shape=3)),
        (lambda: ActNorm(num_features=2), lambda: ActNorm(2)),
        (lambda: ActNorm(2, event_dim=3), lambda: ActNorm((2, None, None))),
        (lambda: Invertible1x1Conv(2), lambda: Invertible1x1Conv((2, None, None))),
        (lambda: Invertible1x1Conv(2, event_dim=1), lambda: Invertible1x1Conv((2,))),
        (lambda: AffineCoupling(2, mask="channel"), lambda: AffineCoupling((2, None, None), mask="channel")),
        (lambda: AffineCoupling(num_features=4), lambda: AffineCoupling(4)),
        (
            lambda: MultiScale(4, Squeeze(), hidden_channels=8),
            lambda: MultiScale((4, None, None), Squeeze(), hidden=8),
        ),
    ]
    for legacy, current in cases:
        torch.manual_seed(0)
        with pytest.warns(FutureWarning):
            old = legacy()
        torch.manual_seed(0)
        new = current()
        assert old.event_shape == new.event_shape and repr(old) == repr(new)
        assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pyroflows.realnvp(True), "realnvp: shape must be a positive int"),
        (lambda: pyroflows.planar_flow(2.5), "planar_flow: shape must be a positive int"),
        (lambda: pyroflows.planar_flow(2, num_layers=2.5), "planar_flow: num_layers must be an int >= 1, got 2.5"),
        (lambda: pyroflows.planar_flow(2, num_layers=True), "planar_flow: num_layers must be an int >= 1, got True"),
        (lambda: pyroflows.glow((1, 8, 8), levels=0), "glow: levels must be an int >= 1, got 0"),
        (lambda: pyroflows.glow((1, 8, 8), levels=2.5), "glow: levels must be an int >= 1, got 2.5"),
        (lambda: pyroflows.glow((1, 8.5, 8)), "glow: shape must be a positive int"),
        (lambda: pyroflows.realnvp((1, 8, 8), num_layers=0), "realnvp: num_layers must be an int >= 1, got 0"),
        (lambda: pyroflows.realnvp((1, 8, 8), hidden=0), "realnvp: hidden must be an int >= 1, got 0"),
        (lambda: pyroflows.residual_flow(4, hidden=(-3,)), "hidden must be an int or a sequence of ints >= 1"),
        (lambda: pyroflows.residual_flow(4, hidden=0), "hidden must be an int or a sequence of ints >= 1"),
        (lambda: pyroflows.residual_flow((1, 8, 8), hidden=-3), "hidden \\(channels\\) must be an int >= 1, got -3"),
        (lambda: pyroflows.residual_flow((1, 8, 8), hidden=0), "hidden \\(channels\\) must be an int >= 1, got 0"),
        (lambda: pyroflows.residual_flow(2, atol=-1.0), "atol must be a finite number in \\[0"),
        (lambda: pyroflows.residual_flow(2, geom_p=1.5), "geom_p must be a finite number in \\(0"),
        (lambda: pyroflows.residual_flow(2, n_samples=0), "n_samples must be an int >= 1"),
        (lambda: pyroflows.autoregressive_flow(3, num_layers=-1), "autoregressive_flow: num_layers must be an int"),
    ],
)
def test_builder_arguments_are_checked_in_one_place(call, message):
    """Every builder takes its sizes through the same checks: a clear ValueError naming the argument and value,
    never a torch error from deep inside a layer, nor a silently substituted default."""
    with pytest.raises(ValueError, match=message):
        call()
