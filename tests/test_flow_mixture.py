"""FlowMixture and AutoFlowMixture: the mixture's density against the closed form, stratified draws (counts, and
unbiased means by statistics), the sticking-the-landing gradient through the whole mixture (zero per draw where the
guide is the posterior), the components' start, errors, saving, and fit reaching two separated modes."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
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
    result = fit(model, guide, 800, seed=0, progress=False, report=False)
    with torch.no_grad():
        q = guide.get_posterior()
        z = q.sample((8000,))
        kl = float((q.log_prob(z) - log_p(z[:, 0])).mean())
        weights = torch.softmax(guide.transform.logits, 0)
    print(f"learn_weights={learn_weights}: weights {weights.tolist()}, KL {kl:.3f}, {result.final_weights}")
    if learn_weights:
        assert sorted(weights.tolist()) == pytest.approx([0.2, 0.8], abs=0.05)
        assert kl < 0.05
        refit = result.final_weights  # set to their best after the last step: the ELBO does not fall
        assert refit["after"] == pytest.approx(weights.tolist(), abs=1e-6)
        assert refit["elbo_after"] >= refit["elbo_before"] - 1e-9
    else:
        assert weights.tolist() == [0.5, 0.5] and not guide.transform.logits.requires_grad
        assert result.final_weights is None
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
    # and fit on the IW bound leaves them where they are at the end too
    with torch.no_grad():
        guide.transform.logits.copy_(torch.tensor([0.3, -0.3]))
    result = fit(model, guide, 3, estimator="iw", seed=0, progress=False, report=False)
    assert result.final_weights is None and guide.transform.logits.tolist() == pytest.approx([0.3, -0.3])


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


class _Refuses(dist.torch_transform.TransformModule):
    """A component that must never run (a pruned one)."""

    domain = codomain = dist.constraints.real_vector
    bijective = True

    def _call(self, x):
        raise AssertionError("a component of weight zero was evaluated")

    def _inverse(self, y):
        raise AssertionError("a component of weight zero was evaluated")


def test_a_component_of_weight_zero_is_never_drawn_nor_evaluated():
    locs, scales = (-2.0, 1.5), (0.5, 1.3)
    flows = [_affine(2, locs[0], math.log(scales[0])), _Refuses(), _affine(2, locs[1], math.log(scales[1]))]
    logits = torch.tensor([0.3, -math.inf, -0.2], dtype=torch.float64, requires_grad=True)
    q = FlowMixture(dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1), flows, logits)
    assert q.active == [0, 2] and q.expand(torch.Size([3])).active == [0, 2]
    z = torch.randn(40, 2, dtype=torch.float64) * 3
    w = torch.softmax(torch.tensor([0.3, -0.2], dtype=torch.float64), 0)
    exact = torch.logsumexp(
        torch.stack(
            [
                dist.Normal(torch.tensor(m).double(), s).log_prob(z).sum(-1) + wk.log()
                for m, s, wk in zip(locs, scales, w)
            ]
        ),
        0,
    )
    torch.testing.assert_close(q.log_prob(z), exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(fixed_log_prob(q, z), exact, rtol=0, atol=1e-12)
    torch.manual_seed(0)
    x = q.rsample((500,))
    counts = torch.bincount(q._drawn[1].reshape(-1), minlength=3)
    assert counts[1] == 0 and abs(int(counts[0]) - 500 * float(w[0])) <= 1
    (q.log_prob(x).sum() + q.score_parts(x).score_function.sum()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1] == 0
    with pytest.raises(ValueError, match="every component has weight zero"):
        _ = FlowMixture(q.base_dist, flows, torch.full((3,), -math.inf)).active


def _three_on_two_modes():
    """An AutoFlowMixture of three exact Gaussian components for :func:`_two_mode_model`'s posterior (an equal
    mixture of N((-2, -2), I) and N((3, 3), I)): two on the first mode, one on the second."""
    model = _two_mode_model()
    pyro.clear_param_store()

    def one_affine(dim):
        return _affine(dim, 0.0, dtype=torch.float32)

    guide = AutoFlowMixture(model, one_affine, components=3, spread=0.0)
    guide.double()
    sync_param_store(guide)
    with torch.no_grad():
        for flow, loc in zip(guide.transform, (-2.0, -2.0, 3.0)):
            flow.base.bias.fill_(loc)
    return model, guide


def test_select_components_removes_a_duplicate_and_keeps_separate_modes():
    model, guide = _three_on_two_modes()
    state = torch.get_rng_state()
    report = guide.select_components(num_draws=3000)
    assert torch.equal(torch.get_rng_state(), state)  # the random state left as it was
    # weights 1/3 each: q = 2/3 N(a) + 1/3 N(b), off the posterior; the two duplicates with weights 1/4 each, or
    # one of them with 1/2, make it the posterior: the duplicate adds nothing
    (first, loss, se), *rest = report["removed"]
    assert first in (0, 1) and not rest and abs(loss) < 1e-6
    assert sorted(report["kept"]) == [1 - first, 2]
    assert report["elbo"] < -0.02 and abs(report["elbo_kept"]) < 1e-5  # log Z = 0: the ELBO of the exact guide
    logits = guide.transform.logits.detach()
    assert logits[first] == -math.inf and torch.allclose(
        logits[report["kept"]].exp().double(), torch.tensor(0.5).double()
    )
    # the next draws never come from the removed component, and log q is the posterior's
    with torch.no_grad():
        q = guide.get_posterior()
        z = q.rsample((1000,))
        assert int((q._drawn[1] == first).sum()) == 0
        torch.testing.assert_close(q.log_prob(z), _log_target(z), rtol=0, atol=1e-5)
    # removing either mode now costs about log 2 (the figure is estimated: within 4 standard errors)
    kept, removed = pyroflows.autoguide.prune_components(*guide._component_draws(3000, (), {})[:4], min_gain=math.inf)
    assert len(kept) == 1 and len(removed) == 1
    _, loss, se = removed[0]
    assert abs(loss - math.log(2)) < 4 * se + 1e-3, (loss, se)
    # with the default threshold both modes stay
    assert guide.select_components(num_draws=2000)["removed"] == []


def test_select_components_errors_name_the_problem():
    model = _two_mode_model()
    for bad in (1.0, -0.1, math.nan, "0.5"):
        with pytest.raises(ValueError, match="select_after"):
            AutoFlowMixture(model, pyroflows.realnvp, select_after=bad)
    for bad in (-0.1, math.inf, None):
        with pytest.raises(ValueError, match="min_gain"):
            AutoFlowMixture(model, pyroflows.realnvp, min_gain=bad)
    pyro.clear_param_store()
    guide = AutoFlowMixture(model, pyroflows.realnvp)
    with pytest.raises(ValueError, match="num_draws"):
        guide.select_components(num_draws=1)
    with pytest.raises(ValueError, match="min_gain"):
        guide.select_components(min_gain=-1.0)


def _gaussian_model():
    pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0, 0.5]), 0.5).to_event(1))


def test_fit_keeps_one_component_on_a_unimodal_posterior():
    pyro.clear_param_store()
    flow = partial(pyroflows.realnvp, num_layers=2, hidden=(16,))
    guide = AutoFlowMixture(_gaussian_model, flow, components=3, select_after=0.25)
    result = fit(_gaussian_model, guide, 120, seed=0, progress=False, report=False)
    selection = result.selection
    assert selection["step"] == 30  # a quarter of the steps (no annealing without data)
    assert len(selection["kept"]) == 1 and len(selection["removed"]) == 2
    assert all(loss < guide.min_gain for _, loss, _ in selection["removed"])
    assert int(torch.isfinite(guide.transform.logits).sum()) == 1
    assert "kept mixture component(s)" in result.summary()
    pyro.clear_param_store()
    everything = AutoFlowMixture(_gaussian_model, partial(pyroflows.realnvp, num_layers=2))  # selects nothing
    assert fit(_gaussian_model, everything, 20, seed=0, progress=False, report=False).selection is None
    assert int(torch.isfinite(everything.transform.logits).sum()) == 2


def test_resume_across_the_selection_repeats_the_uninterrupted_run(tmp_path):
    def _interrupt_after(n):
        def callback(step, loss):
            if step == n:
                raise KeyboardInterrupt  # the process dies after step n (the checkpoint before it survives)

        return callback

    kwargs = dict(num_particles=4, seed=3, progress=False, report=False, checkpoint_every=5)

    def run(path, **extra):
        pyro.clear_param_store()
        flow = partial(pyroflows.realnvp, num_layers=1, hidden=(8,))
        guide = AutoFlowMixture(_gaussian_model, flow, components=3, select_after=0.25)
        return fit(_gaussian_model, guide, 40, out=path, **kwargs, **extra), guide

    full, full_guide = run(tmp_path / "full")
    assert full.selection["step"] == 10 and full.selection["removed"]
    for cut in (7, 13):  # before the selection, and after it
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / f"cut{cut}", callback=_interrupt_after(cut))
        resumed, guide = run(tmp_path / f"cut{cut}", resume=True)
        np.testing.assert_array_equal(resumed.losses, full.losses)
        assert resumed.selection == full.selection
        for (k, a), b in zip(full_guide.state_dict().items(), guide.state_dict().values()):
            assert torch.equal(a, b), k


def test_the_selection_estimates_the_elbo_of_a_plated_model_with_constrained_latents():
    """The per-draw log p of the unconstrained latent (the model in a plate of draws, with the constraining maps'
    log-Jacobians): the mixture's ELBO from :func:`subset_elbo` agrees with psis_khat's from independent draws."""
    from pyroflows.autoguide import subset_elbo
    from pyroflows.diagnostics import psis_khat

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, sigma), obs=y)

    y = torch.tensor([0.3, -1.2, 2.0, 0.8, 1.1])
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowMixture(model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)), components=3)
    fit(model, guide, 100, model_args=(y,), seed=0, progress=False, report=False)
    n = 20000
    log_target, log_q, which, weights, active, _ = guide._component_draws(n, (y,), {})
    assert log_q.shape == (len(active), n) and which.shape == (n,) and log_target.dtype == torch.float64
    elbo, per_draw = subset_elbo(log_target, log_q, which, weights, list(range(len(active))))
    reference = psis_khat(model, guide, num_samples=n, model_args=(y,), seed=1)
    se = math.sqrt(2) * float(per_draw.std()) / math.sqrt(n)
    assert abs(elbo - reference.elbo) < 4 * se + 1e-3, (elbo, reference.elbo, se)


def test_optimal_weights_maximise_the_elbo_over_the_weights():
    """Two overlapping 1-D components under a two-mode target: the exponentiated-gradient fixed point against a
    fine grid over the weight, on the same draws."""
    from pyroflows.autoguide import optimal_weights, subset_elbo

    torch.manual_seed(0)
    n = 4000
    comps = [dist.Normal(torch.tensor(-1.0).double(), 1.0), dist.Normal(torch.tensor(1.5).double(), 0.7)]
    z = torch.cat([comps[0].sample((n,)), comps[1].sample((n,))])
    which = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    log_q = torch.stack([c.log_prob(z) for c in comps])
    target = dist.Normal(torch.tensor([-1.2, 1.3]).double(), torch.tensor([0.9, 0.6]).double())
    log_target = torch.logsumexp(target.log_prob(z[:, None]) + torch.tensor([0.3, 0.7]).double().log(), -1)
    best = optimal_weights(log_target, log_q, which, [0, 1])
    assert float(best.sum()) == pytest.approx(1.0, abs=1e-12)
    grid = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    elbos = [subset_elbo(log_target, log_q, which, torch.stack([1 - p, p]), [0, 1])[0] for p in grid]
    top = int(torch.tensor(elbos).argmax())
    # the fixed point uses E_q[q_k / q] = 1 exactly where the grid's estimate has it only on average: the two
    # optima differ by that sampling error (the ELBO is flat there)
    assert subset_elbo(log_target, log_q, which, best, [0, 1])[0] >= elbos[top] - 1e-3
    assert abs(float(best[1]) - float(grid[top])) < 0.03, (best, grid[top])
    assert 0.6 < float(best[1]) < 0.8  # near the target's 0.7


def test_fit_weights_sets_the_weights_of_exact_components_to_the_masses():
    model, _ = _unequal_model()
    pyro.clear_param_store()
    guide = AutoFlowMixture(model, lambda d: _affine(d, 0.0, dtype=torch.float32), components=2, spread=0.0)
    guide.double()
    sync_param_store(guide)
    with torch.no_grad():  # the components on the target's, the weights wrong
        for flow, m, s in zip(guide.transform, (-2.0, 1.5), (0.6, 0.8)):
            flow.base.bias.fill_(m)
            flow.base.log_scale.fill_(math.log(s))
        guide.transform.logits.copy_(torch.tensor([-0.5, 0.5]))
    report = guide.fit_weights(num_draws=4000)
    assert report["before"] == pytest.approx([0.269, 0.731], abs=1e-3)
    assert report["after"] == pytest.approx([0.8, 0.2], abs=0.01)
    assert abs(report["elbo_after"]) < 1e-3 < -report["elbo_before"]  # log Z = 0: exact after
    weights = torch.softmax(guide.transform.logits.detach().double(), 0)
    torch.testing.assert_close(weights, torch.tensor(report["after"]).double(), rtol=0, atol=1e-6)


def test_the_selection_draws_one_at_a_time_where_the_model_mixes_vectorised_draws():
    """A model that runs vectorised with a wrong density (a sum over the draws too): the draws are made one at a
    time, with a warning, and every draw's log p is the model's on that draw alone."""
    y = torch.tensor([0.3, -0.4, 1.1, 0.8, 0.2])

    def mixing(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu.sum(), 1.0), obs=y)

    pyro.clear_param_store()
    guide = AutoFlowMixture(mixing, partial(pyroflows.realnvp, num_layers=1, hidden=(8,)))
    sync_param_store(guide, y)
    with pytest.warns(UserWarning, match="one at a time"):
        log_target, log_q, which, _, _, z = guide._component_draws(30, (y,), {})
    exact = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(z.sum(-1, keepdim=True), 1.0).log_prob(y).sum(-1)
    torch.testing.assert_close(log_target, exact, rtol=1e-5, atol=1e-4)
    assert log_q.shape == (2, 30) and set(which.tolist()) == {0, 1}
    components = guide.get_posterior().component_distributions()
    torch.testing.assert_close(log_q[0], components[0].log_prob(z.float()).double(), rtol=1e-5, atol=1e-5)


def test_fit_goes_on_when_the_weights_cannot_be_set(monkeypatch):
    pyro.clear_param_store()
    guide = AutoFlowMixture(_gaussian_model, partial(pyroflows.realnvp, num_layers=1, hidden=(8,)))

    def fails(*args, **kwargs):
        raise RuntimeError("no draws today")

    monkeypatch.setattr(guide, "fit_weights", fails)
    with pytest.warns(UserWarning, match="after step 10 the mixture guide's weights stay as trained .*no draws today"):
        result = fit(_gaussian_model, guide, 10, seed=0, progress=False, report=False)
    assert result.final_weights is None and result.losses.shape == (10,)  # the run ended, its losses kept
