"""FlowMixture and AutoFlowMixture: the mixture's density against the closed form, stratified draws (counts, and
unbiased means by statistics), the sticking-the-landing gradient through the whole mixture (zero per draw where the
guide is the posterior), the components' start, errors, saving, and fit reaching two separated modes."""

from __future__ import annotations

import math
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyroflows
from pyroflows import AutoFlowMixture, FlowMixture
from pyroflows.elbo import TraceIW_ELBO, TraceSTL_ELBO, fixed_log_prob
from pyroflows.infer import fit, load_guide, save_guide, sync_param_store
from pyroflows.start import flow_output_affine, gaussian_start
from pyroflows.transforms import ActNorm, inverse

pytestmark = pytest.mark.filterwarnings("ignore:ActNorm. the first training batch:UserWarning")


def _affine(dim: int, loc, log_scale=0.0, dtype=torch.float64):
    """pyroflows' output affine map y = x * exp(s) + b with b = loc, s = log_scale: a component N(loc, exp(2s))."""
    act = ActNorm(dim).to(dtype)
    act.mark_initialized()
    with torch.no_grad():
        act.bias.copy_(torch.as_tensor(loc, dtype=dtype).expand(dim))
        act.log_scale.fill_(log_scale)
    return inverse(act)


def _gaussian_mixture(dim=2):
    locs = [torch.full((dim,), -2.0, dtype=torch.float64), torch.full((dim,), 1.5, dtype=torch.float64)]
    scales = [0.5, 1.3]
    flows = [_affine(dim, loc, math.log(s)) for loc, s in zip(locs, scales)]
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    return FlowMixture(base, flows), locs, scales


def test_log_prob_is_the_mixture_density_in_closed_form():
    q, locs, scales = _gaussian_mixture(dim=3)
    z = torch.randn(50, 3, dtype=torch.float64) * 3
    exact = torch.logsumexp(
        torch.stack([dist.Normal(m, s).log_prob(z).sum(-1) for m, s in zip(locs, scales)]), 0
    ) - math.log(2)
    torch.testing.assert_close(q.log_prob(z), exact, rtol=0, atol=1e-12)


def test_draws_are_stratified_over_the_components():
    q, _, _ = _gaussian_mixture()
    torch.manual_seed(0)
    firsts = set()
    for n in (1, 2, 5, 8):
        for _ in range(20):
            which = q.component_indices(n)
            counts = torch.bincount(which, minlength=2)
            assert int(counts.max() - counts.min()) <= 1
            firsts.add(int(which[0]))
    assert firsts == {0, 1}  # the first component is drawn at random
    # and the draws are the components' own: far-apart components show which drew each point
    apart = [_affine(1, -50.0, 0, torch.float32), _affine(1, 50.0, 0, torch.float32)]
    far = FlowMixture(dist.Normal(torch.zeros(1), 1.0).to_event(1), apart)
    z = far.rsample((3, 4))
    assert z.shape == (3, 4, 1)
    assert int((z > 0).sum()) == 6


def test_stratified_mean_is_unbiased_with_a_draw_count_that_is_not_a_multiple():
    # three components, five draws per estimate: the random first component keeps the mean unbiased
    dim = 1
    locs = [-4.0, 0.5, 6.0]
    flows = [_affine(dim, m) for m in locs]
    q = FlowMixture(dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1), flows)
    torch.manual_seed(1)
    with torch.no_grad():
        estimates = torch.stack([q.rsample((5,)).mean() for _ in range(6000)])
    se = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - sum(locs) / 3) < 4 * se


def test_gradients_reach_every_component_through_the_draws():
    q, _, _ = _gaussian_mixture()
    params = [p for flow in q.flows for p in flow.parameters()]
    q.rsample((4,)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_expand_and_fixed_log_prob():
    q, _, _ = _gaussian_mixture()
    e = q.expand(torch.Size([5]))
    assert e.batch_shape == (5,) and e.rsample().shape == (5, 2)
    z = e.rsample().detach().requires_grad_(True)
    held = fixed_log_prob(e, z)
    torch.testing.assert_close(held, q.log_prob(z), rtol=0, atol=1e-12)
    held.sum().backward()
    assert z.grad is not None and all(p.grad is None for flow in q.flows for p in flow.parameters())


def _two_mode_model(dim=2):
    mix = dist.MixtureSameFamily(
        dist.Categorical(torch.ones(2)),
        dist.Normal(torch.stack([torch.full((dim,), -2.0), torch.full((dim,), 3.0)]), 1.0).to_event(1),
    )

    def model():  # the posterior is exactly the mixture
        prior = dist.Normal(torch.zeros(dim), 1.0).to_event(1)
        z = pyro.sample("z", prior)
        pyro.factor("mixture", mix.log_prob(z) - prior.log_prob(z))

    return model


def test_stl_gradient_is_zero_per_draw_where_the_mixture_is_the_posterior():
    pyro.clear_param_store()
    model = _two_mode_model()

    def one_affine(dim):
        return _affine(dim, 0.0, dtype=torch.float32)

    guide = AutoFlowMixture(model, one_affine, components=2, spread=0.0)
    guide.double()
    sync_param_store(guide)
    flows = guide.transform
    with torch.no_grad():  # place the components on the posterior's two components
        for flow, loc in zip(flows, (-2.0, 3.0)):
            flow.base.bias.fill_(loc)
    elbo = TraceSTL_ELBO(num_particles=1)
    for _ in range(6):
        guide.flow_params.grad = None
        elbo.loss_and_grads(model, guide)
        assert float(guide.flow_params.grad.abs().max()) < 1e-6  # (the model computes log p in float32)
    assert not elbo.fallback_sites and not elbo.inexact_steps
    # and not zero elsewhere (the test can fail)
    with torch.no_grad():
        flows[0].base.bias.fill_(-1.0)
        flows[1].base.bias.fill_(1.0)
    guide.flow_params.grad = None
    elbo.loss_and_grads(model, guide)
    assert float(guide.flow_params.grad.abs().max()) > 1e-3


def test_components_start_apart_and_reproducibly():
    model = _two_mode_model(dim=4)

    def biases(seed, **kwargs):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoFlowMixture(model, partial(pyroflows.realnvp, num_layers=2), components=3, **kwargs)
        sync_param_store(guide)
        return torch.stack([flow_output_affine(f, 4).bias.detach() for f in guide.transform])

    b = biases(0)
    assert b.shape == (3, 4) and float(torch.cdist(b, b).sum()) > 0
    assert 0.3 < float(b.std()) < 2.5  # draws of N(0, I)
    torch.testing.assert_close(biases(0), b, rtol=0, atol=0)
    assert float(biases(0, spread=3.0).std()) > 2 * float(b.std()) * 0.5
    assert float(biases(0, spread=0.0).abs().max()) == 0.0


def test_errors_name_the_problem():
    model = _two_mode_model()
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="components must be an integer"):
            AutoFlowMixture(model, pyroflows.realnvp, components=bad)
    for bad in (-1.0, math.inf, math.nan, None):
        with pytest.raises(ValueError, match="spread must be a finite number"):
            AutoFlowMixture(model, pyroflows.realnvp, spread=bad)
    pyro.clear_param_store()

    def pyro_iaf(dim):
        return dist.transforms.AffineAutoregressive(pyro.nn.AutoRegressiveNN(dim, [8]))

    with pytest.raises(ValueError, match="output affine map"):
        AutoFlowMixture(model, pyro_iaf)()
    pyro.clear_param_store()
    assert AutoFlowMixture(model, pyro_iaf, spread=0.0)()["z"].shape == (2,)  # Pyro's layers, started as built
    pyro.clear_param_store()
    unbiased = partial(pyroflows.residual_flow, num_layers=1, hidden=(8,), logdet="unbiased")
    with pytest.raises(ValueError, match="estimates its log-det at random"):
        AutoFlowMixture(model, unbiased)()
    pyro.clear_param_store()
    assert AutoFlowMixture(model, partial(pyroflows.residual_flow, num_layers=1, hidden=(8,)))()["z"].shape == (2,)
    with pytest.raises(ValueError, match="one event dimension"):
        FlowMixture(dist.Normal(0.0, 1.0), [_affine(1, 0.0)])
    with pytest.raises(ValueError, match="at least one flow"):
        FlowMixture(dist.Normal(torch.zeros(2), 1.0).to_event(1), [])


def test_save_load_and_the_gaussian_start_leaves_it_as_built(tmp_path):
    model = _two_mode_model()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowMixture(model, partial(pyroflows.spline_flow, num_layers=1, hidden=(8,)))
    sync_param_store(guide)
    before = guide.flow_params.detach().clone()
    info = gaussian_start(model, guide)
    assert not info["used"] and "within" in info["reason"]  # considered, and not worth it here
    torch.testing.assert_close(guide.flow_params.detach(), before, rtol=0, atol=0)
    path = tmp_path / "mix.pt"
    save_guide(guide, path)
    pyro.clear_param_store()
    fresh = AutoFlowMixture(model, partial(pyroflows.spline_flow, num_layers=1, hidden=(8,)))
    load_guide(fresh, path)
    z = torch.randn(7, 2)
    torch.testing.assert_close(fresh.get_posterior().log_prob(z), guide.get_posterior().log_prob(z))


@pytest.mark.parametrize("components", [1, 2])
def test_fit_finds_both_separated_modes_with_two_components(components):
    """Modes at (-2, -2) and (3, 3), one standard deviation wide, far apart: one flow takes one of them (KL log 2),
    two components take both."""
    model = _two_mode_model()
    pyro.clear_param_store()
    guide = AutoFlowMixture(model, partial(pyroflows.realnvp, num_layers=2, hidden=(16,)), components=components)
    fit(model, guide, 600, num_particles=4, seed=3, progress=False, report=False)
    with torch.no_grad():
        z = guide.get_posterior().sample((4000,)).double()
        kl = float((guide.get_posterior().log_prob(z.float()).double() - _log_target(z)).mean())
    upper = float((z.sum(-1) > 1).double().mean())
    print(f"components={components}: share above the midpoint {upper:.3f}, KL {kl:.3f}")
    if components == 2:
        assert 0.4 < upper < 0.6 and kl < 0.2
    else:
        assert kl > 0.3  # one flow does not fit both: the two-component case is not trivial


def _log_target(z):
    return torch.logsumexp(torch.stack([dist.Normal(m, 1.0).log_prob(z).sum(-1) for m in (-2.0, 3.0)]), 0) - math.log(2)


def _unequal_model():
    """A 1-D posterior, 0.8 N(-2, 0.6²) + 0.2 N(1.5, 0.8²) (float64), and its log-density."""
    locs, scales, weights = (-2.0, 1.5), (0.6, 0.8), (0.8, 0.2)

    def log_p(z):
        terms = [math.log(w) + dist.Normal(m, s).log_prob(z) for m, s, w in zip(locs, scales, weights)]
        return torch.logsumexp(torch.stack(terms), 0)

    def model():
        prior = dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0).to_event(1)
        z = pyro.sample("z", prior)
        pyro.factor("target", log_p(z[..., 0]) - prior.log_prob(z))

    return model, log_p


@pytest.mark.parametrize("elbo_class", [TraceSTL_ELBO, Trace_ELBO])
def test_the_weights_gradient_is_unbiased(elbo_class):
    """The logits' gradient, averaged over steps, against the exact gradient of the ELBO (by quadrature in 1-D, the
    components held where they are): within 4 standard errors, both estimators."""
    model, log_p = _unequal_model()
    pyro.clear_param_store()
    guide = AutoFlowMixture(model, lambda d: _affine(d, 0.0, dtype=torch.float32), components=2, spread=0.0)
    guide.double()
    sync_param_store(guide)
    locs, log_scales, logits = (-1.5, 1.0), (math.log(0.7), math.log(1.0)), (0.4, -0.1)
    with torch.no_grad():
        for flow, m, s in zip(guide.transform, locs, log_scales):
            flow.base.bias.fill_(m)
            flow.base.log_scale.fill_(s)
        guide.transform.logits.copy_(torch.tensor(logits))
    # the exact gradient
    a = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    grid = torch.linspace(-14, 14, 40001, dtype=torch.float64)
    comps = torch.stack([dist.Normal(m, math.exp(s)).log_prob(grid) for m, s in zip(locs, log_scales)])
    log_q = torch.logsumexp(comps + torch.log_softmax(a, 0)[:, None], 0)
    elbo_exact = torch.trapezoid(log_q.exp() * (log_p(grid) - log_q), grid)
    (exact,) = torch.autograd.grad(elbo_exact, a)
    torch.manual_seed(0)
    elbo = elbo_class(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    grads = []
    for _ in range(1500):
        guide.flow_params.grad = None
        elbo.loss_and_grads(model, guide)
        grads.append(-guide.flow_params.grad[:2].clone())  # the loss is -ELBO
    grads = torch.stack(grads)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert float(exact.abs().max()) > 0.02  # a gradient to find
    assert torch.all((mean - exact).abs() < 4 * se + 1e-4), (mean, exact, se)


@pytest.mark.parametrize("learn_weights", [True, False])
def test_fit_learns_unequal_weights(learn_weights):
    """Modes of mass 0.8 and 0.2: learned weights reach them (KL near zero), equal ones cannot (KL of the mass
    mismatch, 0.8 log 1.6 + 0.2 log 0.4 = 0.193, at best)."""
    model, log_p = _unequal_model()
    pyro.clear_param_store()
    guide = AutoFlowMixture(
        model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)), spread=2.0, learn_weights=learn_weights
    )
    guide.double()
    fit(model, guide, 800, seed=0, progress=False, report=False)
    with torch.no_grad():
        q = guide.get_posterior()
        z = q.sample((8000,))
        kl = float((q.log_prob(z) - log_p(z[:, 0])).mean())
        weights = torch.softmax(guide.transform.logits, 0)
    print(f"learn_weights={learn_weights}: weights {weights.tolist()}, KL {kl:.3f}")
    if learn_weights:
        assert sorted(weights.tolist()) == pytest.approx([0.2, 0.8], abs=0.05)
        assert kl < 0.05
    else:
        assert weights.tolist() == [0.5, 0.5] and not guide.transform.logits.requires_grad
        assert guide.flow_params.numel() == sum(p.numel() for p in guide.transform.parameters()) - 2  # not trained
        assert kl > 0.15


def test_the_multi_sample_bounds_leave_the_weights_as_they_are():
    model, _ = _unequal_model()
    pyro.clear_param_store()
    guide = AutoFlowMixture(model, partial(pyroflows.realnvp, num_layers=1, hidden=(8,)))
    guide.double()
    sync_param_store(guide)
    names = [n for n, _ in guide.transform.named_parameters()]
    assert names[0] == "logits"  # first in flow_params
    for elbo in (TraceIW_ELBO, TraceSTL_ELBO):
        guide.flow_params.grad = None
        elbo(num_particles=8, vectorize_particles=True, max_plate_nesting=0).loss_and_grads(model, guide)
        grad = guide.flow_params.grad
        assert float(grad[2:].abs().max()) > 0
        assert (float(grad[:2].abs().max()) == 0) == (elbo is TraceIW_ELBO)


def test_diagnostics_and_predictive_take_the_mixture_guide():
    from pyro.infer import Predictive

    from pyroflows.diagnostics import psis_khat

    model = _two_mode_model()
    pyro.clear_param_store()
    guide = AutoFlowMixture(model, partial(pyroflows.realnvp, num_layers=1, hidden=(8,)), components=3)
    sync_param_store(guide)
    result = psis_khat(model, guide, num_samples=300, seed=0)
    assert math.isfinite(result.khat) and math.isfinite(result.elbo)
    draws = Predictive(model, guide=guide, num_samples=50)()["z"]
    assert draws.shape == (50, 2) and torch.isfinite(draws).all()


def test_the_gaussian_start_places_every_component_around_its_candidate():
    """A posterior near 500 with standard deviation 0.1, out of reach from N(0, I): every component's map gets the
    candidate's scale and the location z + sd * offset (its start offset in units of the candidate's sd)."""

    def model(y):
        a = pyro.sample("a", dist.Normal(0.0, 1000.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(a, 1.0), obs=y)

    y = 500.0 + torch.randn(100, generator=torch.Generator().manual_seed(0))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowMixture(model, partial(pyroflows.realnvp, num_layers=1, hidden=(8,)), components=3)
    sync_param_store(guide, y)
    offsets = guide.transform.offsets.clone()
    assert offsets.shape == (3, 1) and offsets.abs().sum() > 0
    assert gaussian_start(model, guide, y)["used"]
    sd = 1.0 / math.sqrt(100 + 1e-6)  # the exact posterior's, prior nearly flat
    mean = float(y.mean())
    for flow, offset in zip(guide.transform, offsets):
        affine = flow_output_affine(flow, 1)
        assert float(affine.bias.detach()) == pytest.approx(mean + sd * float(offset), abs=1e-3)
        assert float(affine.log_scale.detach().exp()) == pytest.approx(sd, rel=1e-3)
    assert torch.equal(guide.transform.offsets, offsets)
    assert not gaussian_start(model, guide, y)["used"]  # placed: no longer at its start
