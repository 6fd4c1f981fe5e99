"""FlowDensity: exact log-likelihood, bits/dim bookkeeping, sampling, Pyro integration and bad input."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import pyroflows
from pyroflows import FlowDensity
from pyroflows.transforms import ActNorm, AffineCoupling


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    flow = pyroflows.glow((1, 4, 4), levels=2, num_layers=2, hidden=8, **kwargs)
    model = FlowDensity(flow, (1, 4, 4)).double()
    model.log_prob(torch.rand(32, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05)  # data-dependent init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_first_training_call_initialises_every_actnorm():
    torch.manual_seed(0)
    model = FlowDensity(pyroflows.glow((1, 4, 4), levels=2, num_layers=2, hidden=8), (1, 4, 4))
    actnorms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert actnorms and not any(bool(a.initialized) for a in actnorms)
    model.log_prob(torch.rand(16, 1, 4, 4))
    assert all(bool(a.initialized) for a in actnorms)


def test_log_prob_is_base_plus_log_det_and_matches_the_pyro_distribution():
    model = _model()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    z = model.flow(x)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((-1, -2, -3)) + model.flow.log_abs_det_jacobian(
        x, z
    )
    assert torch.allclose(model.log_prob(x), expected, atol=1e-10)
    assert torch.allclose(model.distribution.log_prob(x), expected, atol=1e-8)

    def pyro_model(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", model.distribution, obs=data)

    trace = pyro.poutine.trace(pyro_model).get_trace(x)
    assert math.isclose(float(trace.log_prob_sum().detach()), float(expected.sum().detach()), rel_tol=1e-8)


@pytest.mark.parametrize("builder", ["glow", "realnvp", "residual_flow"])
def test_log_prob_keeps_no_graph_alive_once_its_result_is_dropped(builder):
    """A log_prob with gradients whose result is dropped without a backward (a monitoring call, the data-dependent
    init) frees its autograd graph: no remembered pair of the flow holds the latent, whose graph would otherwise keep
    every saved activation alive until the next call (a Glow step's peak memory grew by a third). The activations
    watched are the inputs of the networks' linear maps, which autograd saves for the backward."""
    import gc
    import weakref

    torch.manual_seed(0)
    kwargs = {"levels": 2} if builder == "glow" else {}
    model = FlowDensity(getattr(pyroflows, builder)((1, 4, 4), num_layers=2, hidden=8, **kwargs), (1, 4, 4))
    x = torch.rand(8, 1, 4, 4)
    model.log_prob(x)  # initialised
    watched = []

    def watch(module, inputs):
        if inputs[0] is not x:
            watched.append(weakref.ref(inputs[0]))

    kinds = (torch.nn.Conv2d, torch.nn.Linear, pyroflows.nn.SpectralConv2d, pyroflows.nn.SpectralLinear)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    handles = [m.register_forward_pre_hook(watch) for m in layers]
    log_p = model.log_prob(x)
    for h in handles:
        h.remove()
    assert log_p.requires_grad and watched
    del log_p
    gc.collect()
    alive = sum(r() is not None for r in watched)
    assert alive == 0, f"{alive} of {len(watched)} saved activations still alive"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_bits_per_dim_bookkeeping(dtype):
    model = _model()
    pixels = torch.randint(0, 17, (6, 1, 4, 4)).to(dtype)
    bpd = model.bits_per_dim(pixels, n_bins=17, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = (pixels.double() + noise) / 17
    d = 16
    expected = -(model.log_prob(x) - d * math.log(17)) / (d * math.log(2))
    assert torch.allclose(bpd, expected, atol=1e-10)


def test_temperature_zero_samples_the_mode_path():
    model = _model()
    samples = model.sample(4, temperature=0.0)
    z0 = torch.zeros((1,) + model.latent_shape, dtype=torch.float64)
    with torch.no_grad():
        expected = model.flow.inv(z0)
    assert torch.allclose(samples, expected.expand_as(samples), atol=1e-10)
    assert model.training  # sample() restores the mode it found
    wide = model.sample(2000, temperature=3.0)
    assert float(wide.min()) >= 0.0 and float(wide.max()) <= 1.0  # clamped to the data range [0, 1]
    unclamped = model.sample(2000, temperature=3.0, clamp=False)
    assert float(unclamped.min()) < 0.0 or float(unclamped.max()) > 1.0
    varied = model.sample(4, temperature=0.7)
    assert varied.shape == (4, 1, 4, 4) and not torch.allclose(varied[0], varied[1])


def test_bad_input_is_named():
    model = _model()
    with pytest.raises(ValueError, match="integer-valued"):
        model.bits_per_dim(torch.full((2, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match=r"pixels in \[0, 255\]"):
        model.bits_per_dim(torch.full((2, 1, 4, 4), 256))
    with pytest.raises(ValueError, match="expects data of shape"):
        model.log_prob(torch.rand(2, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="domain"):
        model.log_prob(torch.full((2, 1, 4, 4), 1.2, dtype=torch.float64))
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0)


def test_non_finite_log_prob_names_the_layer():
    model = _model()
    coupling = next(m for m in model.modules() if isinstance(m, AffineCoupling))
    with torch.no_grad():
        coupling.conditioner.net[-1].bias.fill_(float("nan"))
    with pytest.raises(RuntimeError, match=r"AffineCoupling \(part \d+ of \d+ in Compose.forward\)"):
        model.log_prob(torch.rand(2, 1, 4, 4, dtype=torch.float64))


def test_vector_density_and_dtype_moves():
    torch.manual_seed(0)
    model = FlowDensity(pyroflows.realnvp(2, num_layers=2, hidden=(8,)), (2,))
    model.log_prob(torch.randn(10, 2))
    model = model.double()  # buffers and parameters follow .to()
    assert model.log_prob(torch.randn(3, 2, dtype=torch.float64)).dtype == torch.float64
    assert model.sample(5).dtype == torch.float64


@pytest.mark.parametrize("builder", ["glow", "realnvp", "residual"])
def test_the_distribution_samples_inside_its_support_and_scores_every_draw(builder):
    """``FlowDensity.distribution`` of an image model (trained-like: perturbed parameters, eval mode): its draws
    lie in its support, and log_prob accepts them all with finite values; many lie outside [0, 1]."""
    torch.manual_seed(0)
    shape = (1, 4, 4)
    flows = {
        "glow": lambda: pyroflows.glow(shape, levels=2, num_layers=1, hidden=8),
        "realnvp": lambda: pyroflows.realnvp(shape, num_layers=1, hidden=8, levels=2),
        "residual": lambda: pyroflows.residual_flow(shape, num_layers=1, hidden=8, levels=2),
    }
    model = pyroflows.FlowDensity(flows[builder](), shape).double()
    model.log_prob(torch.rand((16,) + shape, dtype=torch.float64))  # ActNorm's data-dependent init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    d = model.distribution
    with torch.no_grad():
        x = d.sample((200,))
        assert bool(d.support.check(x).all())
        log_p = d.log_prob(x.clone())  # a copy: scored through the flow, not the remembered pair
    assert torch.isfinite(log_p).all()
    outside = float(((x < 0) | (x > 1)).any(-1).any(-1).any(-1).double().mean())
    assert outside > 0.05, "the check is only meaningful if some draws leave [0, 1]"
