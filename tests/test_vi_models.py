"""Tests of the example models of ``examples/vi_models.py`` and their exact reference posteriors.

Statistical checks use n = 20000 independent exact draws with a fixed seed and a tolerance of 4 standard errors
(the standard error of a sample variance from the sample fourth central moment).
"""

import math
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import site_is_subsample

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import vi_models as vm  # noqa: E402

N_DRAWS = 20000
NUM_SE = 4.0


@pytest.fixture(scope="module")
def es_moments():
    return vm.eight_schools_exact_moments()


@pytest.fixture(scope="module")
def es_draws():
    return vm.eight_schools_exact_draws(N_DRAWS, seed=0)


def assert_mean_sd(draws: np.ndarray, mean, sd, name: str) -> None:
    """Sample mean and variance of ``draws`` (axis 0) match ``mean`` and ``sd**2`` within NUM_SE standard errors."""
    n = draws.shape[0]
    m = draws.mean(0)
    c = draws - m
    var = (c**2).mean(0)
    se_mean = np.sqrt(var / n)
    se_var = np.sqrt(((c**4).mean(0) - var**2) / n)
    assert np.all(np.abs(m - mean) < NUM_SE * se_mean), f"{name} mean {m} vs {mean} (se {se_mean})"
    assert np.all(np.abs(var - np.square(sd)) < NUM_SE * se_var), f"{name} var {var} vs {np.square(sd)} (se {se_var})"


# --- eight schools: data and models -------------------------------------------------------------------------------


def test_eight_schools_data_matches_arviz():
    idata = az.load_arviz_data("non_centered_eight")
    assert [str(s) for s in idata.posterior.coords["school"].values] == vm.SCHOOLS
    np.testing.assert_array_equal(idata.observed_data["obs"].values, vm.Y.numpy())
    assert vm.EIGHT_SCHOOLS_COORDS == {"school": vm.SCHOOLS}


@pytest.mark.parametrize("model", [vm.eight_schools_centered, vm.eight_schools_noncentered])
def test_eight_schools_trace(model):
    tr = poutine.trace(model).get_trace()
    sites = {name: s for name, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    latent = {"theta"} if model is vm.eight_schools_centered else {"theta_t"}
    assert set(sites) == {"mu", "tau", "obs", "theta"} | latent
    assert sites["mu"]["value"].shape == sites["tau"]["value"].shape == ()
    for name in latent | {"theta", "obs"}:
        assert sites[name]["value"].shape == (8,)
    assert sites["obs"]["is_observed"]
    torch.testing.assert_close(sites["obs"]["value"], vm.Y)
    assert [f.name for f in sites["obs"]["cond_indep_stack"]] == ["school"]
    assert set(vm.EIGHT_SCHOOLS_DIMS) >= latent | {"theta", "obs"}


def test_eight_schools_predictive_obs():
    tr = poutine.trace(vm.eight_schools_noncentered).get_trace(None)
    assert not tr.nodes["obs"]["is_observed"]
    assert tr.nodes["obs"]["value"].shape == (8,)


# --- eight schools: quadrature ------------------------------------------------------------------------------------


def test_quadrature_matches_design(es_moments):
    # docs/design.md (section 11) quotes 3 decimals (theta: 2); agreement to half a unit of the last digit quoted.
    m = es_moments
    assert m["log_evidence"] == pytest.approx(-31.311, abs=5e-4)
    assert m["mu_mean"] == pytest.approx(4.397, abs=5e-4)
    assert m["mu_sd"] == pytest.approx(3.318, abs=5e-4)
    assert m["tau_mean"] == pytest.approx(3.598, abs=5e-4)
    assert m["tau_sd"] == pytest.approx(3.220, abs=5e-4)
    np.testing.assert_allclose(m["theta_mean"], [6.21, 4.94, 3.93, 4.76, 3.62, 4.04, 6.30, 4.85], atol=5e-3)


def test_quadrature_converged(es_moments):
    # A coarser grid over a wider range gives the same numbers: the trapezoid rule on this smooth, decaying
    # integrand is converged, and the truncation of the log-tau range is negligible.
    g = vm.eight_schools_tau_grid(4001, -35.0, 20.0)
    assert np.all(g["log_joint"][[0, -1]] - g["log_joint"].max() < -20)
    coarse = vm.eight_schools_exact_moments(num_points=2001)
    for key, value in es_moments.items():
        np.testing.assert_allclose(coarse[key], value, rtol=1e-9, err_msg=key)


def test_quadrature_independent_2d():
    # Evidence and mu moments by brute-force 2-D quadrature over (mu, log tau), theta integrated out per school:
    # checks the determinant-lemma / Sherman-Morrison marginal of the 1-D rule.
    mu = np.linspace(-40.0, 50.0, 1201)
    u = np.linspace(-20.0, 12.0, 801)
    tau = np.exp(u)
    y, sigma = vm.Y.double().numpy(), vm.SIGMA.double().numpy()
    s2 = sigma**2 + tau[:, None] ** 2  # (U, J)
    ll = -0.5 * (np.log(2 * np.pi * s2)[:, None, :] + (y - mu[None, :, None]) ** 2 / s2[:, None, :]).sum(-1)
    lp_mu = -0.5 * np.log(2 * np.pi * 25.0) - mu**2 / 50.0
    lp_u = np.log(2 / (5 * np.pi)) - np.log1p((tau / 5) ** 2) + u
    lj = ll + lp_mu[None, :] + lp_u[:, None]  # (U, M)
    c = lj.max()
    f = np.exp(lj - c)
    z = np.trapezoid(np.trapezoid(f, mu, axis=1), u)
    exact = vm.eight_schools_exact_moments()
    assert c + math.log(z) == pytest.approx(exact["log_evidence"], abs=1e-8)
    p_mu = np.trapezoid(f, u, axis=0) / z
    mu_mean = np.trapezoid(p_mu * mu, mu)
    mu_sd = math.sqrt(np.trapezoid(p_mu * mu**2, mu) - mu_mean**2)
    assert mu_mean == pytest.approx(exact["mu_mean"], rel=1e-8)
    assert mu_sd == pytest.approx(exact["mu_sd"], rel=1e-8)


# --- eight schools: exact draws -----------------------------------------------------------------------------------


def test_sample_piecewise_linear_exact():
    r = np.linspace(0.0, 1.0, 11)
    # density 2x on [0, 1]: CDF x^2, inverse sqrt(r)
    np.testing.assert_allclose(vm._sample_piecewise_linear(np.array([0.0, 1.0]), np.array([0.0, 2.0]), r), np.sqrt(r))
    # flat density on [0, 2] over two cells: uniform
    x = vm._sample_piecewise_linear(np.array([0.0, 1.0, 2.0]), np.ones(3), r)
    np.testing.assert_allclose(x, 2 * r, atol=1e-12)


def test_exact_draws_layout(es_draws):
    post = es_draws.posterior
    assert post["mu"].dims == post["tau"].dims == ("chain", "draw")
    assert post["theta"].dims == post["theta_t"].dims == ("chain", "draw", "school")
    assert post["theta"].shape == (1, N_DRAWS, 8)
    assert list(post.coords["school"].values) == vm.SCHOOLS
    # tau draws are continuous (within-cell interpolation): no repeated values
    assert np.unique(post["tau"].values).size == N_DRAWS
    # same seed, same draws (the draws' own generator, whatever the global RNG state)
    head = vm.eight_schools_exact_draws(50, seed=0).posterior
    np.testing.assert_array_equal(head["tau"].values, post["tau"].values[:, :50])


def test_exact_draws_moments(es_draws, es_moments):
    post = es_draws.posterior
    m = es_moments
    assert_mean_sd(post["mu"].values[0], m["mu_mean"], m["mu_sd"], "mu")
    assert_mean_sd(post["tau"].values[0], m["tau_mean"], m["tau_sd"], "tau")
    assert_mean_sd(post["theta"].values[0], m["theta_mean"], m["theta_sd"], "theta")


def test_exact_draws_theta_t_consistent(es_draws):
    post = es_draws.posterior
    mu, tau = post["mu"].values[0], post["tau"].values[0]
    theta, theta_t = post["theta"].values[0], post["theta_t"].values[0]
    np.testing.assert_allclose(mu[:, None] + tau[:, None] * theta_t, theta, rtol=1e-10, atol=1e-9)
    assert np.all(np.isfinite(theta_t))


def test_noncentered_log_joint_matches_centered_up_to_jacobian(es_draws):
    # theta = mu + tau * theta_t, so p_nc(mu, tau, theta_t, y) = p_c(mu, tau, theta, y) * tau^8.
    post = es_draws.posterior
    y, sigma = vm.Y.double(), vm.SIGMA.double()
    for i in range(0, N_DRAWS, N_DRAWS // 10):
        val = {k: torch.as_tensor(post[k].values[0, i]) for k in ("mu", "tau", "theta", "theta_t")}
        lp_c = poutine.trace(poutine.condition(vm.eight_schools_centered, val)).get_trace(y, sigma).log_prob_sum()
        nc = {k: val[k] for k in ("mu", "tau", "theta_t")}
        lp_nc = poutine.trace(poutine.condition(vm.eight_schools_noncentered, nc)).get_trace(y, sigma).log_prob_sum()
        torch.testing.assert_close(lp_nc, lp_c + 8 * torch.log(val["tau"]), rtol=1e-9, atol=1e-9)


# --- funnel -------------------------------------------------------------------------------------------------------


def test_funnel_trace():
    tr = poutine.trace(vm.funnel).get_trace()
    assert tr.nodes["v"]["value"].shape == ()
    assert tr.nodes["x"]["value"].shape == (9,)
    assert tr.nodes["x"]["fn"].event_shape == (9,)
    assert poutine.trace(vm.funnel).get_trace(dim=3).nodes["x"]["value"].shape == (2,)
    with pytest.raises(ValueError, match="dim"):
        vm.funnel(1)


def test_funnel_exact_draws():
    idata = vm.funnel_exact_draws(N_DRAWS, dim=10, seed=0)
    post = idata.posterior
    assert post["x"].dims == ("chain", "draw", "coordinate")
    assert post["x"].shape == (1, N_DRAWS, 9)
    assert list(post.coords["coordinate"].values) == list(range(1, 10))
    m = vm.funnel_exact_moments(10)
    assert m["x_sd"][0] == pytest.approx(math.exp(9 / 4))
    v, x = post["v"].values[0], post["x"].values[0]
    assert_mean_sd(v, m["v_mean"], m["v_sd"], "v")
    # Raw sd of x is hopeless (kurtosis ~ 3 e^9); check x given v and log|x| instead.
    assert_mean_sd(x / np.exp(v / 2)[:, None], 0.0, 1.0, "x / exp(v/2)")
    assert_mean_sd(np.log(np.abs(x)), m["log_abs_x_mean"], m["log_abs_x_sd"], "log|x|")
    assert np.all(np.abs(x.mean(0)) < NUM_SE * x.std(0) / math.sqrt(N_DRAWS))


# --- logistic regression ------------------------------------------------------------------------------------------


def test_breast_cancer_data_and_trace():
    X, y, names = vm.load_breast_cancer_data()
    assert X.shape == (569, 30) and X.dtype == torch.float32
    assert y.shape == (569,) and set(y.unique().tolist()) == {0.0, 1.0}
    assert len(names) == 30
    torch.testing.assert_close(X.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(X.std(0, unbiased=False), torch.ones(30), atol=1e-5, rtol=0)
    tr = poutine.trace(vm.logistic_regression).get_trace(X, y)
    assert tr.nodes["w"]["value"].shape == (30,) and tr.nodes["w"]["fn"].event_shape == (30,)
    assert tr.nodes["b"]["value"].shape == ()
    assert tr.nodes["obs"]["value"].shape == (569,) and tr.nodes["obs"]["is_observed"]
    assert [f.name for f in tr.nodes["obs"]["cond_indep_stack"]] == ["data"]
    assert not poutine.trace(vm.logistic_regression).get_trace(X).nodes["obs"]["is_observed"]
    coords = vm.logistic_regression_coords(X, names)
    assert coords["feature"] == names and len(coords["obs_id"]) == 569
    assert set(vm.LOGISTIC_DIMS) == {"w", "obs"}


@pytest.mark.slow
def test_logistic_regression_reference():
    start = time.perf_counter()
    idata = vm.logistic_regression_reference(num_samples=1000, warmup=500, seed=0)
    elapsed = time.perf_counter() - start
    print(f"logistic_regression_reference: {elapsed:.1f} s")
    assert idata.groups() == ["posterior"]
    post = idata.posterior
    assert post["w"].dims == ("chain", "draw", "feature") and post["w"].shape == (1, 1000, 30)
    assert post["b"].shape == (1, 1000)
    assert float(az.ess(post)["b"]) > 200
    # The posterior-mean classifier separates the data well (the data are nearly separable).
    X, y, _ = vm.load_breast_cancer_data()
    w = torch.as_tensor(post["w"].values.mean((0, 1)), dtype=torch.float32)
    b = float(post["b"].values.mean())
    acc = ((X @ w + b > 0).float() == y).float().mean()
    assert acc > 0.95
    pyro.clear_param_store()


def _mc_log_evidence(log_lik: torch.Tensor) -> tuple[float, float]:
    """``log mean exp(log_lik)`` over prior draws, and its delta-method standard error."""
    w = torch.exp(log_lik - log_lik.max())
    return float(log_lik.max() + torch.log(w.mean())), float(w.std() / (w.mean() * math.sqrt(len(w))))


@pytest.mark.parametrize("name", ["horseshoe", "local_level", "bimodal"])
def test_log_evidence_matches_prior_monte_carlo(name):
    """The quadrature log Z of each new guide-benchmark posterior equals a Monte Carlo estimate over 400,000 prior
    draws (the likelihood averaged under the prior) within 4 standard errors; the model itself runs with a finite
    joint density."""
    g = torch.Generator().manual_seed(0)
    n = 400_000
    d = torch.distributions
    if name == "horseshoe":
        y = vm.HORSESHOE_Y.double()
        exact = vm.horseshoe_log_evidence()
        lam = torch.tan(torch.rand(n, len(y), generator=g, dtype=torch.float64) * math.pi / 2)  # HalfCauchy(1)
        log_lik = d.Normal(0.0, torch.sqrt(1 + lam**2)).log_prob(y)  # theta integrated out, per mean
        est = [_mc_log_evidence(log_lik[:, i]) for i in range(len(y))]  # the means are independent
        value, se = sum(e[0] for e in est), math.sqrt(sum(e[1] ** 2 for e in est))
    elif name == "local_level":
        y = vm.LOCAL_LEVEL_Y.double()
        exact = vm.local_level_log_evidence()
        s = torch.randn(n, generator=g, dtype=torch.float64).abs()
        lower = torch.tril(torch.ones(len(y), len(y), dtype=torch.float64))
        cov = s[:, None, None] ** 2 * (lower @ lower.T) + 0.25 * torch.eye(len(y), dtype=torch.float64)
        value, se = _mc_log_evidence(d.MultivariateNormal(torch.zeros(len(y), dtype=torch.float64), cov).log_prob(y))
    else:
        exact = vm.bimodal_log_evidence()
        z = 2.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        value, se = _mc_log_evidence(d.Normal(z[:, 0] * z[:, 1], 0.5).log_prob(torch.tensor(2.0)))
    assert abs(value - exact) < 4 * se + 1e-4, (value, exact, se)
    model = {"horseshoe": vm.horseshoe_means, "local_level": vm.local_level, "bimodal": vm.bimodal_product}[name]
    trace = poutine.trace(model).get_trace()
    assert math.isfinite(float(trace.log_prob_sum()))


def test_local_level_data_and_a_longer_series_evidence():
    """``local_level_data()`` is the default series, and for a 40-step series (the guide benchmark's
    ``local_level40``) the quadrature log Z still equals a Monte Carlo estimate over prior draws of the scale (the
    path integrated out exactly) within 4 standard errors."""
    assert torch.equal(vm.local_level_data(), vm.LOCAL_LEVEL_Y)
    y = vm.local_level_data(40).double()
    assert y.shape == (40,) and not torch.equal(y[:12], vm.LOCAL_LEVEL_Y.double())  # a new draw, not an extension
    g = torch.Generator().manual_seed(1)
    s = torch.randn(100_000, generator=g, dtype=torch.float64).abs()
    lower = torch.tril(torch.ones(40, 40, dtype=torch.float64))
    cov = s[:, None, None] ** 2 * (lower @ lower.T) + 0.25 * torch.eye(40, dtype=torch.float64)
    prior_predictive = torch.distributions.MultivariateNormal(torch.zeros(40, dtype=torch.float64), cov)
    value, se = _mc_log_evidence(prior_predictive.log_prob(y))
    exact = vm.local_level_log_evidence(y)
    assert abs(value - exact) < 4 * se + 1e-4, (value, exact, se)


def test_trend_regression_evidence_by_the_posterior_identity():
    """The quadrature log Z of ``trend_regression`` equals a Monte Carlo estimate over 200,000 prior draws of
    sigma, each draw's evidence given sigma computed another way than the quadrature's marginal Gaussian: by the
    identity p(y | s) = p(y | beta, s) p(beta) / p(beta | y, s) at the conditional posterior mean (4 standard
    errors); the model runs with a finite joint density at the readings."""
    x, y = vm.TREND_X.double(), vm.TREND_Y.double()
    g = torch.Generator().manual_seed(2)
    s = 10.0 * torch.randn(200_000, generator=g, dtype=torch.float64).abs()  # HalfNormal(10)
    design = torch.stack([torch.ones_like(x), x], -1)
    prior_prec = torch.diag(torch.tensor([1000.0**-2, 10.0**-2], dtype=torch.float64))
    prec = prior_prec + design.T @ design / s[:, None, None] ** 2  # (n, 2, 2)
    cov = torch.linalg.inv(prec)
    mean = cov @ (design.T @ y) / s[:, None] ** 2
    d = torch.distributions
    log_lik = d.Normal(mean @ design.T, s[:, None]).log_prob(y).sum(-1)
    log_prior = d.Normal(0.0, torch.tensor([1000.0, 10.0], dtype=torch.float64)).log_prob(mean).sum(-1)
    log_post = d.MultivariateNormal(mean, covariance_matrix=cov).log_prob(mean)
    value, se = _mc_log_evidence(log_lik + log_prior - log_post)
    exact = vm.trend_regression_log_evidence()
    assert abs(value - exact) < 4 * se + 1e-4, (value, exact, se)
    truth = {k: torch.tensor(v) for k, v in {"a": 1000.0, "b": 3.0, "sigma": 2.0}.items()}
    conditioned = poutine.condition(vm.trend_regression, truth)
    assert math.isfinite(float(poutine.trace(conditioned).get_trace().log_prob_sum()))
