"""BatchNorm as a flow layer: the training-mode map (batch statistics), the running averages, eval mode, guides.

Eval mode is a fixed affine map and joins the generic and conformance suites through tests/registry.py
(``batchnorm``, ``batchnorm_image``, ``realnvp_batchnorm``, ``realnvp_image_batchnorm``): round trips, log-dets
against autograd Jacobians in float64, batch shapes, state_dict, copies, ``.to()``, a 2-D density that
integrates to one. Here: what the registry cannot check because a training-mode call couples a batch's samples.
Values are compared in float64 to 1e-10 (closed-form affine maps).
"""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim import Adam

import pyroflows
from pyroflows.transforms import BatchNorm

ATOL = 1e-10
SHAPES = {"vector": ((3,), (3,)), "image": ((2, None, None), (2, 3, 4))}


def _layer(kind, seed=0):
    torch.manual_seed(seed)
    t = BatchNorm(SHAPES[kind][0]).double()
    with torch.no_grad():
        t.log_gamma.normal_(0.0, 0.3)
        t.beta.normal_(0.0, 0.3)
    return t


def _data(kind, batch=(6,), seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(batch) + SHAPES[kind][1]
    return 1.5 + 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)


def _reduce(kind, x, event_dim):
    dims = tuple(range(x.dim() - event_dim)) + ((x.dim() - 2, x.dim() - 1) if kind == "image" else ())
    return dims


def _frozen_copy(t, mean, var):
    """An eval-mode copy of ``t`` whose running averages are ``(mean, var)``: the fixed affine map with those
    statistics (the registry checks eval mode's log-det against autograd)."""
    frozen = copy.deepcopy(t).eval()
    with torch.no_grad():
        frozen.running_mean.copy_(mean)
        frozen.running_var.copy_(var)
    return frozen


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("batch", [(6,), (2, 3)], ids=str)
def test_training_mode_is_the_affine_map_of_the_batch_statistics(kind, batch):
    t = _layer(kind)
    x = _data(kind, batch)
    event_dim = len(SHAPES[kind][1])
    dims = _reduce(kind, x, event_dim)
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert log_det.shape == batch
    # the output has the learned mean and scale per feature
    assert torch.allclose(y.mean(dims), t.beta.reshape(-1), atol=ATOL)
    expected_std = torch.exp(t.log_gamma.reshape(-1)) * torch.sqrt(var / (var + t.eps))
    assert torch.allclose(y.std(dims, unbiased=False), expected_std, atol=ATOL)
    # map and log-det are those of the fixed affine map with the batch's statistics
    frozen = _frozen_copy(t, mean, var)
    y_frozen, log_det_frozen = frozen.forward_and_log_det(x)
    assert torch.allclose(y, y_frozen, atol=ATOL) and torch.allclose(log_det, log_det_frozen, atol=ATOL)
    # ... whose log-det is the autograd one (one sample's Jacobian, the statistics held fixed)
    x0 = x.reshape((-1,) + SHAPES[kind][1])[0]
    jac = torch.autograd.functional.jacobian(lambda v: frozen(v.reshape(x0.shape)).reshape(-1), x0.reshape(-1))
    assert math.isclose(float(torch.linalg.slogdet(jac)[1]), float(log_det.detach().reshape(-1)[0]), abs_tol=1e-10)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_training_mode_round_trip_uses_the_last_batch(kind):
    t = _layer(kind)
    x = _data(kind)
    y = t(x)
    x_back = t.inv(y.clone())  # a fresh inverse (no remembered pair): the map of the last training batch
    assert torch.allclose(x_back, x, atol=ATOL)
    x_back, inv_log_det = t.inverse_and_log_det(y.clone())
    assert torch.allclose(inv_log_det, -t.log_abs_det_jacobian(x, y), atol=ATOL)
    # before any training batch, the training-mode inverse is the running-average map (as in eval mode)
    fresh = _layer(kind)
    z = _data(kind, seed=3)
    assert torch.allclose(fresh.inv(z), copy.deepcopy(fresh).eval().inv(z.clone()), atol=ATOL)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_running_averages(kind):
    t = _layer(kind)
    t.momentum = 0.25
    event_dim = len(SHAPES[kind][1])
    expected_mean, expected_var = torch.zeros(2 if kind == "image" else 3).double(), None
    expected_var = torch.ones_like(expected_mean)
    for seed in range(3):
        x = _data(kind, seed=seed)
        dims = _reduce(kind, x, event_dim)
        expected_mean = 0.75 * expected_mean + 0.25 * x.mean(dims)
        expected_var = 0.75 * expected_var + 0.25 * x.var(dims, unbiased=True)
        t(x)
    assert torch.allclose(t.running_mean, expected_mean, atol=ATOL)
    assert torch.allclose(t.running_var, expected_var, atol=ATOL)
    # eval mode: the running averages, no update
    t.eval()
    x = _data(kind, seed=9)
    y = t(x)
    assert torch.equal(t.running_mean, expected_mean)
    frozen = _frozen_copy(t, expected_mean, expected_var)
    assert torch.allclose(y, frozen(x.clone()), atol=ATOL)
    # the running averages are saved, the last batch's statistics are not
    state = t.state_dict()
    assert {"running_mean", "running_var", "log_gamma", "beta"} <= set(state)
    assert "batch_mean" not in state and "batch_var" not in state
    loaded = BatchNorm(SHAPES[kind][0]).double()
    loaded.load_state_dict(state)
    assert torch.allclose(loaded.eval()(x.clone()), y, atol=ATOL)
    # .to() carries every buffer, the held batch statistics included
    moved = copy.deepcopy(t).float()
    assert moved.running_mean.dtype == moved.batch_mean.dtype == torch.float32


def test_gradients_flow_through_the_batch_statistics():
    """Σ_batch y is N·β whatever x is in training mode (the batch mean is subtracted), so its gradient in x is 0;
    in eval mode the map is affine in x with a non-zero gradient."""
    t = _layer("vector")
    x = _data("vector").requires_grad_()
    (grad,) = torch.autograd.grad(t(x).sum(), x)
    assert grad.abs().max() < 1e-12
    (grad_eval,) = torch.autograd.grad(t.eval()(x).sum(), x)
    assert grad_eval.abs().min() > 0.1


def test_single_sample_uses_running_averages():
    t = _layer("vector")
    x = _data("vector", batch=())
    y = t(x)
    assert torch.equal(t.running_mean, torch.zeros(3, dtype=torch.float64)), "a single sample updated the averages"
    assert torch.allclose(y, copy.deepcopy(t).eval()(x.clone()), atol=ATOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=0.0), "momentum"),
        (dict(eps=0.0), "eps"),
        (dict(eps=float("nan")), "eps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchNorm(3, **kwargs)


def test_wrong_channel_count_is_named():
    with pytest.raises(ValueError, match=r"event shape \(2, \*, \*\)"):
        BatchNorm((2, None, None))(torch.randn(4, 3, 2, 2))


def _coupling_followers(flow):
    """For every coupling that is a part of one of ``flow``'s Composes: the type name of the part after it."""
    followers = []
    for module in flow.modules():
        if isinstance(module, pyroflows.transforms.Compose):
            parts = list(module.parts)
            followers += [
                type(parts[i + 1]).__name__ for i, p in enumerate(parts) if type(p).__name__ == "AffineCoupling"
            ]
    return followers


def test_realnvp_batch_norm_places_it_after_every_coupling():
    vector = pyroflows.realnvp(4, num_layers=3, hidden=(8,), batch_norm=True)
    image = pyroflows.realnvp((1, 4, 4), num_layers=1, hidden=4, levels=2, batch_norm=True)
    for flow, actnorms in ((vector, 1), (image, 0)):  # the vector flow's output affine map is an inverted ActNorm
        followers = _coupling_followers(flow)
        assert len(followers) >= 3 and set(followers) == {"BatchNorm"}
        assert sum(type(m).__name__ == "ActNorm" for m in flow.modules()) == actnorms
    assert "BatchNorm" not in {type(m).__name__ for m in pyroflows.realnvp(4, num_layers=3).modules()}


def test_eval_mode_density_model_is_normalised_after_training():
    """A RealNVP with BatchNorm trained by maximum likelihood on 2-D data: its eval-mode density integrates to one
    on a grid (tolerance 1e-2: the grid's quadrature error) and has a finite, improved likelihood."""
    torch.manual_seed(0)
    data = torch.randn(512, 2) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]]) + torch.tensor([2.0, -1.0])
    flow = pyroflows.realnvp(2, num_layers=4, hidden=(16,), batch_norm=True)
    model = pyroflows.FlowDensity(flow, (2,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.eval()
    with torch.no_grad():
        before = float(model.log_prob(data).mean())
    model.train()
    for _ in range(150):
        batch = data[torch.randint(0, 512, (64,))]
        loss = -model.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    n, half = 401, 10.0
    grid = torch.linspace(-half, half, n)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2) + torch.tensor([2.0, -1.0])
    with torch.no_grad():
        log_p = model.log_prob(zz)
        after = float(model.log_prob(data).mean())
    total = float(torch.logsumexp(log_p, 0).exp() * (grid[1] - grid[0]) ** 2)
    assert math.isclose(total, 1.0, abs_tol=1e-2), total
    assert after > before + 0.5, (before, after)


def test_guide_with_batch_norm_fits_a_gaussian_posterior():
    """A conjugate model with a known posterior: a RealNVP guide with BatchNorm, trained on vectorised particles
    (the batch statistics are over particles), in eval mode recovers the posterior mean and scale (tolerance 0.05,
    about 5 Monte Carlo standard errors of 4000 draws plus the fit's error), and its log q of its own draws is a
    normalised density: the importance-weighted evidence estimate matches the exact one to 0.05 nats."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    y = torch.tensor([[1.2, -0.4], [2.0, 0.1], [1.1, -0.3], [0.9, 0.2]])
    prior_scale, noise = 2.0, 1.0

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), prior_scale).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, noise).to_event(1), obs=y)

    guide = AutoNormalizingFlow(model, lambda d: pyroflows.realnvp(d, num_layers=2, hidden=(16,), batch_norm=True))
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO(num_particles=16, vectorize_particles=True))
    for _ in range(500):
        svi.step()
    guide.eval()
    with torch.no_grad():
        draws = torch.stack([guide()["mu"] for _ in range(4000)])
    precision = 1 / prior_scale**2 + len(y) / noise**2
    mean, sd = y.sum(0) / noise**2 / precision, precision**-0.5
    assert torch.allclose(draws.mean(0), mean, atol=0.05), (draws.mean(0), mean)
    assert torch.allclose(draws.std(0), torch.full((2,), sd), atol=0.05), (draws.std(0), sd)
    # evidence by importance weights from the eval-mode guide
    log_w = []
    with torch.no_grad():
        for _ in range(2000):
            guide_trace = pyro.poutine.trace(guide).get_trace()
            model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace()
            log_w.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
    log_evidence = float(torch.logsumexp(torch.stack(log_w), 0) - math.log(len(log_w)))
    # each coordinate: y_j ~ N(0, σ² I + s² 11ᵀ) over the 4 observations
    marginal_cov = noise**2 * torch.eye(len(y)) + prior_scale**2 * torch.ones(len(y), len(y))
    exact = float(dist.MultivariateNormal(torch.zeros(len(y)), marginal_cov).log_prob(y.T).sum())
    assert abs(log_evidence - exact) < 0.05, (log_evidence, exact)
