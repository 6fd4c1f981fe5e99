"""The Gaussian start of a flow guide (pyroflows.start.gaussian_start, fit's start=): the Laplace approximation
against the exact posterior of a linear-Gaussian model, the guide moved only when it is far out of reach, seeded
runs unchanged otherwise, and guides it cannot or must not move left alone."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

import pyroflows
from pyroflows import start as S
from pyroflows.infer import fit, sync_param_store

X = torch.linspace(0.0, 10.0, 40)
Y_FAR = 1000.0 + 3.0 * X + torch.randn(40, generator=torch.Generator().manual_seed(0))
PRIOR_SD = torch.tensor([100.0, 10.0])


def regression(x, y):
    """Known noise: the posterior of (a, b) is Gaussian, and far from the origin for ``Y_FAR``."""
    a = pyro.sample("a", dist.Normal(x.new_zeros(()), PRIOR_SD[0].to(x)))  # in x's dtype
    b = pyro.sample("b", dist.Normal(x.new_zeros(()), PRIOR_SD[1].to(x)))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)


def exact_posterior(x, y):
    """Mean and covariance of (a, b): precision = prior precision + design' design (unit noise)."""
    design = torch.stack([torch.ones_like(x), x], -1).double()
    precision = torch.diag(PRIOR_SD.double() ** -2) + design.T @ design
    cov = torch.linalg.inv(precision)
    return cov @ design.T @ y.double(), cov


WELL_Y = torch.tensor([0.3, -0.4, 1.1])
PRODUCT_Y = torch.tensor(2.0)


def well_scaled(y=WELL_Y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def flow_guide(model, **kw):
    return pyroflows.AutoFlow(model, partial(pyroflows.realnvp, num_layers=2, hidden=(16,)), **kw)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_the_gaussian_start_is_the_exact_posterior_of_a_linear_gaussian_model(float64):
    # log p is quadratic: the first Newton step lands on the mode, and -H^-1 is the posterior covariance
    y = Y_FAR.double()
    guide = flow_guide(regression)
    sync_param_store(guide, X.double(), y)
    mean, cov = exact_posterior(X, y)
    sd = cov.diagonal().sqrt()
    f = S._log_joint(regression, guide._unpack_latent, (X.double(), y), {})
    z, z_cov = S._newton(f, torch.zeros(2), 10)[-1]
    torch.testing.assert_close(z, mean, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(z_cov, cov, rtol=1e-9, atol=1e-12)
    # gaussian_start keeps the candidate of the highest importance-weighted bound: the mode here
    info = S.gaussian_start(regression, guide, X.double(), y, mode="gaussian")
    affine = S.output_affine(guide)
    assert info["used"]
    torch.testing.assert_close(affine.bias.detach(), mean, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(affine.log_scale.detach().exp(), sd, rtol=1e-9, atol=0)
    # the guide now draws from that Gaussian (the couplings start as the identity): its draws' mean and sd agree
    draws = torch.stack([guide.get_posterior().sample() for _ in range(4000)])
    assert ((draws.mean(0) - mean).abs() < 4 * sd / 4000**0.5).all()
    assert ((draws.std(0) / sd - 1).abs() < 0.05).all()


def test_fit_starts_a_far_posterior_where_it_is_and_says_so():
    mean, cov = exact_posterior(X, Y_FAR)
    runs = {}
    for start in ("identity", "auto"):
        pyro.clear_param_store()
        guide = flow_guide(regression)
        result = fit(regression, guide, 100, model_args=(X, Y_FAR), progress=False, report=False, seed=0, start=start)
        draws = torch.stack([guide.get_posterior().sample() for _ in range(2000)]).double()
        runs[start] = (result, draws.mean(0))
    result, auto_mean = runs["auto"]
    assert result.start["used"] and result.start["bound_gaussian"] - result.start["bound_identity"] > 10 * 2
    assert "started from a Gaussian approximation" in result.summary()
    # 100 Adam steps of about lr each cannot carry the identity start to a ~ 1000; the Gaussian start is there
    assert abs(float(runs["identity"][1][0] - mean[0])) > 100
    assert runs["identity"][0].start is None
    assert ((auto_mean - mean).abs() < 5 * cov.diagonal().sqrt()).all()
    # Pyro's AutoNormal, through fit, likewise
    pyro.clear_param_store()
    normal = AutoNormal(regression)
    result = fit(regression, normal, 100, model_args=(X, Y_FAR), progress=False, report=False, seed=0)
    assert result.start["used"] and abs(float(normal.locs.a.detach()) - float(mean[0])) < 5 * float(cov[0, 0]) ** 0.5


def test_auto_leaves_a_well_scaled_guide_as_built_and_a_seeded_run_unchanged():
    losses = {}
    for start in ("identity", "auto"):
        pyro.clear_param_store()
        result = fit(well_scaled, flow_guide(well_scaled), 20, progress=False, report=False, seed=3, start=start)
        losses[start] = result.losses
    np.testing.assert_array_equal(losses["identity"], losses["auto"])
    assert not result.start["used"] and "within 10 nats per coordinate" in result.start["reason"]
    assert np.isfinite([result.start["bound_identity"], result.start["bound_gaussian"]]).all()


def test_the_random_state_is_left_as_it_was():
    guide = flow_guide(regression)
    torch.manual_seed(5)
    S.gaussian_start(regression, guide, X, Y_FAR)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def test_a_trained_guide_is_not_moved():
    guide = flow_guide(regression)
    fit(regression, guide, 5, model_args=(X, Y_FAR), progress=False, report=False, seed=0, start="identity")
    before = [p.detach().clone() for p in guide.parameters()]
    info = S.gaussian_start(regression, guide, X, Y_FAR, mode="gaussian")
    assert not info["used"] and "not at its start" in info["reason"]
    assert all(torch.equal(a, b) for a, b in zip(before, guide.parameters()))
    again = fit(regression, guide, 5, model_args=(X, Y_FAR), progress=False, report=False, seed=0)
    assert not again.start["used"]


@pytest.mark.parametrize("kind", ["pyro IAF", "function"])
def test_a_guide_of_another_kind_is_left_alone_or_refused(kind):
    if kind == "pyro IAF":
        from pyro.distributions.transforms import iterated

        iaf = pyro.distributions.transforms.affine_autoregressive
        guide = AutoNormalizingFlow(regression, partial(iterated, 2, iaf))
    else:

        def guide(x, y):
            pyro.sample("a", dist.Normal(pyro.param("a_loc", torch.tensor(0.0)), 1.0))
            pyro.sample("b", dist.Normal(0.0, 1.0))

    info = S.gaussian_start(regression, guide, X, Y_FAR)
    assert not info["used"] and "output affine" in info["reason"]
    with pytest.raises(ValueError, match="gaussian_start: the guide is neither a flow .or a mixture of flows. ending"):
        S.gaussian_start(regression, guide, X, Y_FAR, mode="gaussian")


@pytest.mark.parametrize(
    "kind",
    [
        AutoNormal,
        AutoDiagonalNormal,
        AutoMultivariateNormal,
        partial(AutoLowRankMultivariateNormal, rank=1),
        partial(AutoLowRankMultivariateNormal, rank=3),  # more factors than needed: the spare ones start at zero
    ],
)
def test_pyros_gaussian_guides_are_placed_on_the_exact_posterior(kind, float64):
    # the linear-Gaussian posterior again: AutoNormal and AutoDiagonalNormal get its means and marginal sds,
    # AutoMultivariateNormal its whole covariance, and AutoLowRankMultivariateNormal of rank >= 1 too (probabilistic
    # PCA of a 2-D correlation matrix with one factor is exact); the param store holds the same values (fit trains
    # those)
    full = kind is AutoMultivariateNormal or isinstance(kind, partial)
    name = kind.func.__name__ if isinstance(kind, partial) else kind.__name__
    y = Y_FAR.double()
    mean, cov = exact_posterior(X, y)
    guide = kind(regression)
    info = S.gaussian_start(regression, guide, X.double(), y)
    assert info["used"], info
    if kind is AutoNormal:
        loc = torch.stack([guide.locs.a, guide.locs.b]).detach()
        scale = torch.stack([guide.scales.a, guide.scales.b]).detach()
        store = pyro.get_param_store()
        assert float(store["AutoNormal.locs.a"].detach()) == pytest.approx(float(mean[0]), rel=1e-9)
    else:
        loc, scale = guide.loc.detach(), guide.scale.detach()
        assert torch.equal(pyro.get_param_store()[f"{name}.loc"].detach(), loc)
    torch.testing.assert_close(loc, mean, rtol=1e-9, atol=1e-9)
    if full:
        torch.testing.assert_close(guide.get_posterior().covariance_matrix.detach(), cov, rtol=1e-7, atol=1e-12)
    else:
        torch.testing.assert_close(scale, cov.diagonal().sqrt(), rtol=1e-7, atol=0)
    # trained (or with another init_scale than its own) it is left alone
    again = S.gaussian_start(regression, guide, X.double(), y, mode="gaussian")
    assert not again["used"] and "not at its start" in again["reason"]


def test_a_pyro_guide_that_needs_no_start_is_restored_bit_for_bit():
    guide = AutoMultivariateNormal(well_scaled)
    guide()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    info = S.gaussian_start(well_scaled, guide)
    assert not info["used"] and info["bound_gaussian"] > -np.inf
    assert all(torch.equal(v, before[k]) for k, v in guide.state_dict().items())


def test_an_autonormal_with_a_latent_in_a_subsampled_plate_is_left_alone():
    def local(y=WELL_Y):
        with pyro.plate("data", len(y), subsample_size=2) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y[i])

    info = S.gaussian_start(local, AutoNormal(local))
    assert not info["used"] and "subsampled plate" in info["reason"]


def test_heavy_tails_and_every_vector_builder_have_the_output_affine():
    for builder in ("planar_flow", "realnvp", "autoregressive_flow", "spline_flow", "residual_flow"):
        pyro.clear_param_store()
        guide = pyroflows.AutoFlow(regression, partial(getattr(pyroflows, builder), num_layers=2), heavy_tails=True)
        sync_param_store(guide, X, Y_FAR)
        assert S.output_affine(guide) is not None, builder


def test_auto_leaves_guides_beyond_the_dimension_cap(monkeypatch):
    monkeypatch.setattr(S, "START_MAX_DIM", 1)
    info = S.gaussian_start(regression, flow_guide(regression), X, Y_FAR)
    assert not info["used"] and "START_MAX_DIM=1" in info["reason"]
    assert S.gaussian_start(regression, flow_guide(regression), X, Y_FAR, mode="gaussian")["used"]


def test_a_density_without_a_concave_point_gives_no_candidate():
    def product(y=PRODUCT_Y):  # y = x1 * x2: two ridges, the origin a saddle with zero gradient
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(x[..., 0] * x[..., 1], 0.1), obs=y)

    guide = flow_guide(product)
    info = S.gaussian_start(product, guide, mode="gaussian")
    assert not info["used"] and "no Gaussian approximation" in info["reason"]
    assert info["bound_gaussian"] == -np.inf and np.isfinite(info["bound_identity"])
    affine = S.output_affine(guide)
    assert not affine.bias.detach().any() and not affine.log_scale.detach().any()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda g: S.gaussian_start(regression, g, X, Y_FAR, mode="laplace"), "gaussian_start: mode"),
        (lambda g: S.gaussian_start(regression, g, X, Y_FAR, margin=-1.0), "gaussian_start: margin"),
        (lambda g: fit(regression, g, 2, model_args=(X, Y_FAR), progress=False, start="newton"), "fit: start"),
    ],
)
def test_bad_settings_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(flow_guide(regression))


def _curved(z):
    """A non-quadratic log density with coupled coordinates, for the Hessian check."""
    return -(z**4).sum() / 4 - (z[:-1] * z[1:]).exp().sum() + torch.sin(z).prod()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_the_batched_hessian_matches_autograds(chunk):
    z = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g, h = S._grad_and_hessian(_curved, z, chunk=chunk)
    torch.testing.assert_close(h, torch.autograd.functional.hessian(_curved, z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, torch.func.grad(_curved)(z), rtol=1e-12, atol=1e-12)


def test_the_hessian_falls_back_to_one_backward_pass_per_coordinate(monkeypatch):
    grad = torch.autograd.grad

    def unbatchable(*args, is_grads_batched=False, **kwargs):  # as for an operation without a batching rule
        if is_grads_batched:
            raise RuntimeError("vmap: no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", unbatchable)
    z = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, h = S._grad_and_hessian(_curved, z)
    torch.testing.assert_close(h, torch.autograd.functional.hessian(_curved, z), rtol=1e-12, atol=1e-12)


def test_the_hessian_of_a_linear_log_density_is_zero():
    g, h = S._grad_and_hessian(lambda z: (z * torch.arange(3.0)).sum(), torch.ones(3))
    assert torch.equal(g, torch.arange(3.0, dtype=torch.float64)) and not h.any()


NEEDLE_Y = torch.tensor(0.5)


def needle(y=NEEDLE_Y):
    """A posterior 1e-9 wide around 0.5: resolvable in float64, not in float32 (whose spacing there is 6e-8)."""
    a = pyro.sample("a", dist.Normal(y.new_zeros(()), 1.0))
    pyro.sample("y", dist.Normal(a, 1e-9), obs=y)


@pytest.mark.parametrize("kind", ["flow", "AutoMultivariateNormal"])
def test_a_candidate_too_narrow_for_the_dtype_is_not_scored(kind):
    make = flow_guide if kind == "flow" else AutoMultivariateNormal
    info = S.gaussian_start(needle, make(needle), mode="gaussian")
    assert not info["used"] and "too narrow to draw from in torch.float32" in info["reason"]
    assert info["bound_gaussian"] == -np.inf


def test_the_same_narrow_candidate_is_used_in_float64(float64):
    info = S.gaussian_start(needle, AutoMultivariateNormal(needle), torch.tensor(0.5), mode="gaussian")
    log_z = -0.5 * math.log(2 * math.pi) - 0.5 * 0.5**2  # y ~ N(0, 1 + 1e-18): the exact posterior, bound = log Z
    assert info["used"] and abs(info["bound_gaussian"] - log_z) < 1e-6


def test_a_low_rank_guide_keeps_the_marginals_and_the_leading_correlations(float64):
    # a 6-D Gaussian posterior (y ~ N(A z, I), z ~ N(0, 100² I)) placed on an AutoLowRankMultivariateNormal of rank 2:
    # the covariance it gets is probabilistic PCA's of the exact correlation matrix, checked against a direct
    # computation, and its two leading correlation directions are the exact ones
    a_mat = torch.randn(30, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a_mat[:, 1] += 3.0 * a_mat[:, 0]  # strongly correlated coordinates
    eps = torch.randn(30, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = a_mat @ (500.0 + torch.arange(6.0, dtype=torch.float64)) + eps

    def linear(y=y):
        z = pyro.sample("z", dist.Normal(torch.zeros(6), 100.0).to_event(1))
        with pyro.plate("data", 30):
            pyro.sample("y", dist.Normal(z @ a_mat.T, 1.0), obs=y)

    precision = torch.eye(6, dtype=torch.float64) / 100.0**2 + a_mat.T @ a_mat
    cov = torch.linalg.inv(precision)
    guide = AutoLowRankMultivariateNormal(linear, rank=2)
    assert S.gaussian_start(linear, guide, mode="gaussian")["used"]
    torch.testing.assert_close(guide.loc.detach(), cov @ a_mat.T @ y, rtol=1e-8, atol=1e-8)
    sd = cov.diagonal().sqrt()
    ev, vec = torch.linalg.eigh(cov / sd[:, None] / sd)
    noise = ev[:4].mean()
    ppca = vec[:, 4:] @ torch.diag(ev[4:] - noise) @ vec[:, 4:].T + noise * torch.eye(6, dtype=torch.float64)
    placed = guide.get_posterior().covariance_matrix.detach()
    torch.testing.assert_close(placed, sd[:, None] * ppca * sd, rtol=1e-8, atol=1e-12)
    top = torch.linalg.eigh(placed / sd[:, None] / sd).eigenvectors[:, 4:]
    torch.testing.assert_close((top.T @ vec[:, 4:]).abs(), torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-8)
