"""The sticking-the-landing estimator: unbiased (its mean gradient is the ELBO's, by statistics with stated
tolerances), exactly zero per draw where the guide is the posterior, the same ELBO value, and fit's option."""

from __future__ import annotations

import math
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyroflows
from pyroflows.elbo import TraceSTL_ELBO, fixed_log_prob
from pyroflows.infer import fit


def _gauss_model():
    pyro.sample("z", dist.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])).to_event(1))


def _banana():
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.5))
    pyro.sample("z2", dist.Normal(0.5 * z1**2 - 1.0, 0.5))


def _grads(elbo, model, guide, params) -> torch.Tensor:
    loss = elbo.differentiable_loss(model, guide)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_gaussian_guide_gradient_is_unbiased():
    """q = N(m, s), p = N(mu, sigma): the exact gradients of the ELBO are -(m - mu)/sigma^2 in m and
    1/s - s/sigma^2 in s; the STL mean over 40 estimates of 2,000 particles each matches them within 4 standard
    errors."""
    pyro.clear_param_store()

    def model():
        pyro.sample("z", dist.Normal(1.0, 0.5))

    m = torch.tensor(0.3, requires_grad=True)
    s = torch.tensor(1.2, requires_grad=True)

    def guide():
        pyro.sample("z", dist.Normal(m, s))

    torch.manual_seed(0)
    elbo = TraceSTL_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=0)
    draws = torch.stack([-_grads(elbo, model, guide, [m, s]) for _ in range(40)])
    exact = torch.tensor([-(0.3 - 1.0) / 0.25, 1 / 1.2 - 1.2 / 0.25])
    se = draws.std(0) / math.sqrt(len(draws))
    assert torch.all((draws.mean(0) - exact).abs() < 4 * se + 1e-6), (draws.mean(0), exact, se)


def test_flow_guide_gradient_matches_trace_elbo_in_expectation():
    """A RealNVP guide with non-trivial weights on the banana: the mean STL and reparameterised gradients agree
    within 4 standard errors of their difference, coordinate by coordinate (60 estimates of 1,000 particles)."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    guide = AutoNormalizingFlow(_banana, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    guide()  # build
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = list(guide.parameters())
    stl = TraceSTL_ELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=0)
    plain = Trace_ELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=0)
    diffs = []
    for _ in range(60):
        diffs.append(_grads(stl, _banana, guide, params) - _grads(plain, _banana, guide, params))
    d = torch.stack(diffs)
    z = d.mean(0) / (d.std(0) / math.sqrt(len(d)) + 1e-12)
    assert z.abs().max() < 4.5, z.abs().max()  # about 150 coordinates: |z| < 4.5 for all, at 1e-5 each


def test_zero_gradient_per_draw_at_the_posterior():
    """Where q equals p, STL's gradient is zero for every single draw, while the reparameterised gradient is not."""

    def model():
        pyro.sample("z", dist.Normal(1.0, 0.5).expand([3]).to_event(1))

    m = torch.ones(3, requires_grad=True)
    s = torch.full((3,), 0.5, requires_grad=True)

    def guide():
        pyro.sample("z", dist.Normal(m, s).to_event(1))

    one = dict(num_particles=1, max_plate_nesting=0)
    torch.manual_seed(0)
    for _ in range(5):
        assert _grads(TraceSTL_ELBO(**one), model, guide, [m, s]).abs().max() < 1e-6
    assert max(float(_grads(Trace_ELBO(**one), model, guide, [m, s]).abs().max()) for _ in range(5)) > 1e-2


def test_a_low_rank_gaussian_guide_has_a_zero_gradient_per_draw_at_its_posterior():
    """Pyro's AutoLowRankMultivariateNormal (a LowRankMultivariateNormal) placed on its exact posterior: STL's
    gradient is zero for every draw (the parameters are held fixed whole, not only the location)."""
    cov_factor = torch.tensor([[1.0], [0.5], [-0.3]])
    cov_diag = torch.tensor([0.4, 0.2, 0.3])
    loc = torch.tensor([0.5, -1.0, 2.0])

    def model():
        pyro.sample("z", dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag))

    params = [loc.clone().requires_grad_(), cov_factor.clone().requires_grad_(), cov_diag.clone().requires_grad_()]

    def guide():
        pyro.sample("z", dist.LowRankMultivariateNormal(*params))

    one = dict(num_particles=1, max_plate_nesting=0)
    torch.manual_seed(0)
    for _ in range(5):
        assert _grads(TraceSTL_ELBO(**one), model, guide, params).abs().max() < 1e-5
    assert max(float(_grads(Trace_ELBO(**one), model, guide, params).abs().max()) for _ in range(5)) > 1e-2


def test_same_elbo_value_and_fixed_log_prob():
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(_gauss_model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    guide()
    d = guide.get_posterior()
    z = d.rsample((16,))
    assert torch.allclose(fixed_log_prob(d, z), d.log_prob(z), atol=1e-5)
    torch.manual_seed(3)
    a = TraceSTL_ELBO(num_particles=16, vectorize_particles=True).loss(_gauss_model, guide)
    torch.manual_seed(3)
    b = Trace_ELBO(num_particles=16, vectorize_particles=True).loss(_gauss_model, guide)
    assert a == pytest.approx(b, rel=1e-6)
    # fixed parameters: no gradient reaches the flow, the sample gets one
    zz = z.detach().requires_grad_()
    fixed_log_prob(d, zz).sum().backward()
    assert zz.grad is not None and all(p.grad is None for p in guide.parameters())
    conc = torch.ones(3, requires_grad=True)
    with pytest.raises(NotImplementedError, match="cannot hold the parameters of a Dirichlet fixed"):
        fixed_log_prob(dist.Dirichlet(conc), torch.tensor([0.2, 0.3, 0.5]))


def test_fit_with_stl(tmp_path):
    """fit's default estimator (STL) fits a Gaussian posterior (KL = -ELBO here: log Z = 0), and its checkpoints
    remember the estimator."""
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(_gauss_model, partial(pyroflows.realnvp, num_layers=2, hidden=(16,)))
    result = fit(_gauss_model, guide, num_steps=400, lr=1e-2, seed=0, progress=False, report=False,
                 out=tmp_path / "run")  # fmt: skip
    assert isinstance(result, pyroflows.infer.SVIResult)
    assert abs(result.final_elbo(50)) < 0.05
    with pytest.raises(ValueError, match="estimator must be one of"):
        fit(_gauss_model, guide, num_steps=1, estimator="dreg", progress=False, report=False)
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(_gauss_model, partial(pyroflows.realnvp, num_layers=2, hidden=(16,)))
    with pytest.raises(pyroflows.train.CheckpointError, match="estimator: saved 'stl', now 'reparam'"):
        fit(_gauss_model, guide, num_steps=800, lr=1e-2, seed=0, progress=False, report=False, out=tmp_path / "run",
            resume=True, estimator="reparam")  # fmt: skip


def test_structured_guide_falls_back_where_parameters_depend_on_samples():
    """z2's location is computed from the sample z1: STL cannot detach it, so z2 keeps the reparameterised term
    (named once in a warning) while z1 gets STL; the mean gradient still matches Trace_ELBO's (4.5 standard
    errors, 60 estimates of 500 particles)."""

    def model():
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        pyro.sample("z2", dist.Normal(z1, 0.5))

    w = torch.tensor([0.2, 0.8, 0.7, 0.3, 0.6], requires_grad=True)

    def guide():
        z1 = pyro.sample("z1", dist.Normal(w[0], w[1]))
        pyro.sample("z2", dist.Normal(w[2] * z1 + w[3], w[4]))

    stl = TraceSTL_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=0)
    plain = Trace_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=0)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="site 'z2' keeps the reparameterised gradient"):
        _grads(stl, model, guide, [w])
    assert list(stl.fallback_sites) == ["z2"]
    d = torch.stack([_grads(stl, model, guide, [w]) - _grads(plain, model, guide, [w]) for _ in range(60)])
    z = d.mean(0) / (d.std(0) / math.sqrt(len(d)) + 1e-12)
    assert z.abs().max() < 4.5, z


def test_an_inexact_inverse_falls_back_to_the_reparameterised_gradient():
    """STL evaluates log q through the flow's inverse; where that does not reproduce the draw's log-density (an
    inverse that misses), the step keeps the reparameterised gradient (named once in a warning, counted per site),
    so the inverse's error cannot bias the gradient: it equals Trace_ELBO's from the same draws."""
    from pyro.distributions.torch_transform import TransformModule
    from torch.distributions import constraints

    class OffInverse(TransformModule):
        domain = constraints.real_vector
        codomain = constraints.real_vector
        bijective = True

        def __init__(self):
            super().__init__(cache_size=1)
            self.loc = torch.nn.Parameter(torch.tensor([0.3, -0.2]))

        def _call(self, x):
            return x + self.loc

        def _inverse(self, y):
            return y - self.loc + 0.5  # misses by 0.5

        def log_abs_det_jacobian(self, x, y):
            return torch.zeros(x.shape[:-1])

    pyro.clear_param_store()
    guide = AutoNormalizingFlow(_gauss_model, lambda dim: OffInverse())
    guide()
    params = list(guide.parameters())
    stl = TraceSTL_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=0)
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="differs from the draw's"):
        a = _grads(stl, _gauss_model, guide, params)
    pyro.set_rng_seed(0)
    b = _grads(Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=0), _gauss_model, guide, params)
    assert torch.allclose(a, b) and sum(stl.inexact_steps.values()) == 1


@pytest.mark.filterwarnings("ignore:ActNorm. the first training batch:UserWarning")
def test_a_random_log_det_keeps_the_path_derivative():
    """A residual flow in training mode estimates its log-det at random, so the held-fixed log q (another draw of
    the estimate) cannot equal the draw's: those steps are not counted as inexact and keep STL's path derivative
    (the held-fixed term is the surrogate's entropy term). In eval mode with an exact log-det they are compared."""
    from pyroflows.transforms import ResidualBlock

    block = ResidualBlock(2, hidden=(8,), logdet="unbiased")
    assert block.random_log_det and not block.eval().random_log_det  # "auto" in eval: exact at D = 2
    assert not ResidualBlock(2, hidden=(8,)).random_log_det  # "auto" in training: exact at D = 2 too
    assert ResidualBlock(2, hidden=(8,), logdet="exact").random_log_det is False
    assert ResidualBlock((1, None, None), hidden=2).eval().random_log_det  # unknown size: the unbiased estimate

    pyro.clear_param_store()
    guide = AutoNormalizingFlow(
        _gauss_model, partial(pyroflows.residual_flow, num_layers=2, hidden=(8,), logdet="unbiased")
    )
    guide()
    stl = TraceSTL_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    for _ in range(5):
        _, guide_trace = stl._get_trace(_gauss_model, guide, (), {})
        parts = guide_trace.nodes["_AutoNormalizingFlow_latent"]["score_parts"]
        assert parts.entropy_term is not parts.log_prob  # the held-fixed log q: the path derivative
        assert not torch.equal(parts.entropy_term, parts.log_prob)  # two draws of the random estimate
    assert stl.inexact_steps == {}


def test_autoregressive_guide_stl_gradient_through_the_converging_inverse(monkeypatch):
    """STL's gradient for an autoregressive guide of 12 dimensions (above ``SEQUENTIAL_MAX_DIM``: the held-fixed
    log q goes through the Jacobi solve and its implicit gradient) equals the one through the coordinate-by-coordinate
    solve, after the flow has moved off its identity initialisation; every step agrees with the draw's log q."""
    from pyroflows.transforms import AffineAutoregressive

    def model():
        v = pyro.sample("v", dist.Normal(0.0, 1.5))
        pyro.sample("x", dist.Normal(torch.zeros(11), torch.exp(v / 2).unsqueeze(-1)).to_event(1))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(model, partial(pyroflows.autoregressive_flow, num_layers=2, hidden=(32,)))
    fit(model, guide, num_steps=60, lr=1e-2, seed=0, progress=False, report=False)  # off the identity
    params = [p for p in guide.parameters() if p.requires_grad]
    grads = {}
    for name, limit in (("implicit", 0), ("sequential", 100)):
        monkeypatch.setattr(AffineAutoregressive, "SEQUENTIAL_MAX_DIM", limit)
        elbo = TraceSTL_ELBO(num_particles=8, vectorize_particles=True)  # fresh: its plate-nesting guess draws
        pyro.set_rng_seed(1)
        grads[name] = _grads(elbo, model, guide, params)
        assert not elbo.inexact_steps
    assert torch.allclose(grads["implicit"], grads["sequential"], atol=1e-5, rtol=1e-4)
    assert grads["implicit"].abs().sum() > 0
