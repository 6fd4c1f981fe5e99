"""The importance-weighted bound with the doubly reparameterised gradient (TraceIW_ELBO): its value is Pyro's
IWAE bound (RenyiELBO at alpha = 0) draw for draw, its gradient is unbiased for the bound's (by statistics with
stated tolerances), it is STL's gradient at K = 1 and zero per draw at the posterior, what it cannot do is
refused, and fit's option trains with it. The same for the Rényi bound of any order (TraceRenyi_ELBO), whose ends
are the IW bound's and the ELBO's STL gradient."""

from __future__ import annotations

import math
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow

import pyroflows
from pyroflows.elbo import TraceIW_ELBO, TraceRenyi_ELBO, TraceSTL_ELBO
from pyroflows.infer import fit

_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def _schools():
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, _SIGMA), obs=_Y)


def _grads(elbo, model, guide, params) -> torch.Tensor:
    for p in params:
        p.grad = None
    elbo.loss_and_grads(model, guide)
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("kind", ["normal", "flow"])
def test_bound_equals_pyro_renyi_bound(kind, vectorize, alpha):
    """A plated model (particles in their own plate dim): the value of loss and loss_and_grads is exactly Pyro's
    RenyiELBO(alpha) loss from the same draws (TraceIW_ELBO at alpha = 0, TraceRenyi_ELBO otherwise)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = (
        AutoNormal(_schools)
        if kind == "normal"
        else AutoNormalizingFlow(_schools, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    )
    guide()
    options = dict(num_particles=8, vectorize_particles=vectorize, max_plate_nesting=1)
    values = []
    ours = partial(TraceIW_ELBO, **options) if alpha == 0 else partial(TraceRenyi_ELBO, alpha=alpha, **options)
    for elbo, method in ((ours(), "loss"), (ours(), "loss_and_grads"), (RenyiELBO(alpha=alpha, **options), "loss")):
        pyro.set_rng_seed(3)
        values.append(getattr(elbo, method)(_schools, guide))
    assert values[0] == pytest.approx(values[2], rel=1e-6, abs=1e-6)
    assert values[1] == pytest.approx(values[2], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_gradient_is_unbiased_for_the_bound(alpha):
    """q = N(m, s) against a two-component mixture, K = 4: the mean doubly reparameterised gradient over 2,000
    estimates matches the mean reparameterised gradient of the K = 4 bound of order alpha (200,000 vectorised
    estimates) within 4 standard errors of the difference, in float64."""
    k, beta = 4, 1.0 - alpha
    mix = dist.MixtureSameFamily(
        dist.Categorical(torch.ones(2, dtype=torch.float64)), dist.Normal(torch.tensor([-2.0, 2.0]).double(), 1.0)
    )
    m0, s0 = 0.3, 1.2
    torch.manual_seed(0)
    reps = 200_000
    m = torch.full((reps, 1), m0, dtype=torch.float64, requires_grad=True)
    s = torch.full((reps, 1), s0, dtype=torch.float64, requires_grad=True)
    z = m + s * torch.randn(reps, k, dtype=torch.float64)
    log_w = mix.log_prob(z) - dist.Normal(m, s).log_prob(z)
    bound = (torch.logsumexp(beta * log_w, 1) - math.log(k)) / beta
    ref = torch.cat(torch.autograd.grad(bound.sum(), [m, s]), 1)

    prior = dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0)

    def model():
        zz = pyro.sample("z", prior)
        pyro.factor("target", mix.log_prob(zz) - prior.log_prob(zz))

    mm = torch.tensor(m0, dtype=torch.float64, requires_grad=True)
    ss = torch.tensor(s0, dtype=torch.float64, requires_grad=True)

    def guide():
        pyro.sample("z", dist.Normal(mm, ss))

    elbo = TraceRenyi_ELBO(alpha, num_particles=k, vectorize_particles=True, max_plate_nesting=0)
    draws = torch.stack([-_grads(elbo, model, guide, [mm, ss]) for _ in range(2000)])
    se = (draws.var(0) / len(draws) + ref.var(0) / reps).sqrt()
    assert torch.all((draws.mean(0) - ref.mean(0)).abs() < 4 * se), (draws.mean(0), ref.mean(0), se)


def _gaussian_model():
    pyro.sample("z", dist.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])).to_event(1))


def _gaussian_guide():
    loc, scale = pyro.param("m", torch.tensor([0.3, 0.0])), pyro.param("s", torch.tensor([1.0, 1.5]))
    pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def _gaussian_problem():
    """A 2-D Gaussian posterior and a mean-field guide off it, with the guide's parameters built in a clear store."""
    pyro.clear_param_store()
    _gaussian_guide()
    return _gaussian_model, _gaussian_guide


def _two_means():
    """The posterior the fit tests train on: N((1, -1), 0.5² I), log Z = 0."""
    pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 0.5).to_event(1))


def _fit_flow(num_steps: int, **options):
    """A 2-layer realnvp guide trained on :func:`_two_means` by fit (lr 1e-2, seed 0), in a clear param store."""
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(_two_means, partial(pyroflows.realnvp, num_layers=2, hidden=(16,)))
    result = fit(_two_means, guide, num_steps=num_steps, lr=1e-2, seed=0, progress=False, **options)
    return result, guide


def test_one_particle_is_stl_and_zero_at_the_posterior():
    """K = 1: exactly the STL gradient from the same draw. q = p: zero gradient for every draw at K = 8."""

    model, guide = _gaussian_problem()
    m, s = pyro.param("m"), pyro.param("s")  # no constraint: the store's leaf tensors themselves

    for seed in range(3):
        pyro.set_rng_seed(seed)
        a = _grads(TraceIW_ELBO(num_particles=1, max_plate_nesting=0), model, guide, [m, s])
        pyro.set_rng_seed(seed)
        b = _grads(TraceSTL_ELBO(num_particles=1, max_plate_nesting=0), model, guide, [m, s])
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    with torch.no_grad():
        m.copy_(torch.tensor([1.0, -2.0]))
        s.copy_(torch.tensor([0.5, 2.0]))
    elbo = TraceIW_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    for _ in range(5):
        assert _grads(elbo, model, guide, [m, s]).abs().max() < 1e-5


def test_refusals():
    """A model parameter, a subsampled plate, a non-reparameterised guide site and a guide site whose parameters
    depend on an earlier sample are each refused, naming the problem."""
    elbo = TraceIW_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)

    def with_param():
        loc = pyro.param("model_loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="the model has the parameter 'model_loc'"):
        elbo.loss_and_grads(with_param, AutoNormal(with_param))

    def subsampled():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 8, subsample_size=4) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=_Y[idx])

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="model site 'y' is scaled"):
        elbo.loss_and_grads(subsampled, AutoNormal(subsampled))

    def discrete():
        pyro.sample("b", dist.Bernoulli(0.3))

    p = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(NotImplementedError, match="guide site 'b' is not reparameterised"):
        elbo.loss_and_grads(discrete, lambda: pyro.sample("b", dist.Bernoulli(p)))

    def chain():
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        pyro.sample("z2", dist.Normal(z1, 0.5))

    w = torch.tensor([0.2, 0.8, 0.7, 0.3, 0.6], requires_grad=True)

    def structured():
        z1 = pyro.sample("z1", dist.Normal(w[0], w[1]))
        pyro.sample("z2", dist.Normal(w[2] * z1 + w[3], w[4]))

    with pytest.raises(NotImplementedError, match="site 'z2' cannot be held fixed"):
        TraceIW_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0).loss_and_grads(chain, structured)


@pytest.mark.parametrize("options", [{"estimator": "iw"}, {"estimator": "renyi", "alpha": 0.5}])
def test_fit_with_a_bound(options):
    """fit(estimator="iw") and fit(estimator="renyi", alpha=0.5) fit a Gaussian posterior with a flow guide; the
    losses are the bound's, which at K = 8 sit between the ELBO and log Z (= 0 here), and the draws have the
    posterior's moments."""
    result, guide = _fit_flow(300, report=False, **options)
    assert abs(result.final_elbo(50)) < 0.02
    z = guide.get_posterior().sample((4000,))
    assert torch.allclose(z.mean(0), torch.tensor([1.0, -1.0]), atol=0.05), z.mean(0)
    assert torch.allclose(z.std(0), torch.tensor([0.5, 0.5]), atol=0.05), z.std(0)


def test_renyi_ends_and_posterior():
    """Order 0 is TraceIW_ELBO's gradient and order 1 STL's ELBO gradient over the same K = 8 draws (its value the
    ELBO's estimate); at the posterior the gradient is zero for every draw at order 0.5; an order outside [0, 1] is
    refused."""

    model, guide = _gaussian_problem()
    m, s = pyro.param("m"), pyro.param("s")
    options = dict(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    for ours, ref in ((TraceRenyi_ELBO(0.0, **options), TraceIW_ELBO(**options)),
                      (TraceRenyi_ELBO(1.0, **options), TraceSTL_ELBO(**options))):  # fmt: skip
        for seed in range(3):
            pyro.set_rng_seed(seed)
            a = _grads(ours, model, guide, [m, s])
            pyro.set_rng_seed(seed)
            b = _grads(ref, model, guide, [m, s])
            assert torch.allclose(a, b, atol=1e-6), (ours.alpha, a, b)
    pyro.set_rng_seed(0)
    value = TraceRenyi_ELBO(1.0, **options).loss(model, guide)
    pyro.set_rng_seed(0)
    assert value == pytest.approx(pyro.infer.Trace_ELBO(**options).loss(model, guide), rel=1e-5)
    with torch.no_grad():
        m.copy_(torch.tensor([1.0, -2.0]))
        s.copy_(torch.tensor([0.5, 2.0]))
    elbo = TraceRenyi_ELBO(0.5, **options)
    for _ in range(5):
        assert _grads(elbo, model, guide, [m, s]).abs().max() < 1e-5
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\]"):
            TraceRenyi_ELBO(bad, **options)


def test_fit_refuses_a_misplaced_alpha():
    """alpha with another estimator than "renyi", or outside [0, 1], is refused."""
    pyro.clear_param_store()
    model = _two_means
    guide = AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=2, hidden=(16,)))
    with pytest.raises(ValueError, match="alpha is the order of estimator='renyi', not of 'stl'"):
        fit(model, guide, num_steps=2, alpha=0.5, progress=False, report=False)
    with pytest.raises(ValueError, match="alpha must be"):
        fit(model, guide, num_steps=2, estimator="renyi", alpha=1.5, progress=False, report=False)


def test_fit_report_names_the_bound(capsys):
    """After a multi-sample bound, fit's report names it (not "ELBO"), gives the ELBO of fresh draws and the lower
    bound on KL(q||p) it implies; after STL the report is the ELBO's, with draws_elbo near the run's final ELBO."""

    results = {}
    for estimator, extra in (("renyi", {"alpha": 0.5}), ("iw", {}), ("stl", {})):
        results[estimator] = _fit_flow(200, estimator=estimator, **extra)[0]
        results[estimator].text = capsys.readouterr().err
    assert results["renyi"].objective == "Rényi bound (alpha=0.5)"
    assert results["iw"].objective == "IW bound"
    assert results["stl"].objective == "ELBO"
    for name in ("renyi", "iw"):
        r = results[name]
        assert f"; {r.objective} " in r.text and "from fresh draws, so KL(q||p) is at least about" in r.text, r.text
        assert math.isfinite(r.draws_elbo) and r.draws_elbo < 0.05  # log Z = 0
    r = results["stl"]
    assert "; ELBO " in r.text and "fresh draws" not in r.text, r.text
    assert abs(r.draws_elbo - r.final_elbo(50)) < 0.05


def test_renyi_mixed_with_the_elbo():
    """elbo_weight = lam: from the same draws, the value is lam * (the ELBO's estimate) + (1 - lam) * (the bound's)
    and the gradient lam * STL's + (1 - lam) * the bound's; fit with such a loss names the mixture and trains."""
    model, guide = _gaussian_problem()
    m, s = pyro.param("m"), pyro.param("s")
    options = dict(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    lam = 0.3
    for alpha in (0.0, 0.5):
        parts = {}
        losses = {
            "mix": TraceRenyi_ELBO(alpha, elbo_weight=lam, **options),
            "stl": TraceSTL_ELBO(**options),
            "bound": TraceRenyi_ELBO(alpha, **options),
        }
        for name, elbo in losses.items():
            pyro.set_rng_seed(4)
            value = elbo.loss(model, guide)
            pyro.set_rng_seed(4)
            parts[name] = (value, _grads(elbo, model, guide, [m, s]))
        assert parts["mix"][0] == pytest.approx(lam * parts["stl"][0] + (1 - lam) * parts["bound"][0], rel=1e-5)
        expected = lam * parts["stl"][1] + (1 - lam) * parts["bound"][1]
        assert torch.allclose(parts["mix"][1], expected, atol=1e-6), (parts["mix"][1], expected)
    for bad in (-0.5, 1.5, False):
        with pytest.raises(ValueError, match="elbo_weight must be in \\[0, 1\\]"):
            TraceRenyi_ELBO(0.0, elbo_weight=bad, **options)

    loss = TraceRenyi_ELBO(0.0, elbo_weight=0.5, num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    result = _fit_flow(300, loss=loss, report=False)[0]
    assert result.objective == "IW bound mixed with the ELBO (weight 0.5)"
    assert abs(result.final_elbo(50)) < 0.02
