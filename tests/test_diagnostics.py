"""pyroflows.diagnostics: ArviZ data from guide draws, PSIS k̂, importance-weighted ELBO, approximate-posterior
LOO, comparison with a reference; every log-density checked against a hand computation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyroflows import _arviz_compat as compat
from pyroflows import diagnostics as D
from pyroflows.infer import fit

az = compat.az
Y = torch.tensor([0.3, -0.4, 1.1, 0.8, 0.2])
SIGMA, PRIOR_SD = 0.7, 2.0


# --- a conjugate model with an exact posterior, evidence and LOO ----------------------------------------------


def normal_model(y=Y):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", len(Y)):
        pyro.sample("y", dist.Normal(mu, SIGMA), obs=y)


def posterior(y=Y):
    """Exact posterior mean/sd of mu, and log p(y)."""
    prec = 1 / PRIOR_SD**2 + len(y) / SIGMA**2
    mean = float(y.sum()) / SIGMA**2 / prec
    cov = PRIOR_SD**2 * torch.ones(len(y), len(y)) + SIGMA**2 * torch.eye(len(y))
    log_z = float(dist.MultivariateNormal(torch.zeros(len(y)), cov).log_prob(y))
    return mean, prec**-0.5, log_z


def gaussian_guide(loc, scale):
    """A fixed (parameter-free) Normal guide for ``mu``."""

    def guide(y=Y):
        pyro.sample("mu", dist.Normal(loc, scale))

    return guide


def exact_loo(y=Y):
    total = 0.0
    for i in range(len(y)):
        rest = torch.cat([y[:i], y[i + 1 :]])
        m, s, _ = posterior(rest)
        total += float(dist.Normal(m, math.sqrt(s**2 + SIGMA**2)).log_prob(y[i]))
    return total


# --- log p and log q per draw, against hand computations ---------------------------------------------------


def scale_model_plate(y=Y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(Y)):
        pyro.sample("y", dist.Normal(mu, s), obs=y)


def scale_model_event(y=Y):  # no plate at all: max_plate_nesting = 0
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    pyro.sample("y", dist.Normal(mu[..., None] * torch.ones(len(Y)), s[..., None]).to_event(1), obs=y)


@pytest.mark.parametrize("model", [scale_model_plate, scale_model_event], ids=["plate", "no-plate"])
def test_log_p_log_q_and_log_lik_per_draw_match_hand_computation(model):
    pyro.clear_param_store()
    guide = AutoNormal(model, init_scale=0.3)
    fit(model, guide, 30, lr=0.05, progress=False, seed=0)
    idata = D.to_inference_data(model, guide, num_samples=50)
    mu = torch.as_tensor(idata.posterior["mu"].values.reshape(-1), dtype=torch.float64)
    s = torch.as_tensor(idata.posterior["s"].values.reshape(-1), dtype=torch.float64)
    loc_mu, sc_mu = guide._get_loc_and_scale("mu")
    loc_s, sc_s = guide._get_loc_and_scale("s")
    d64 = {k: v.detach().double() for k, v in dict(lm=loc_mu, sm=sc_mu, ls=loc_s, ss=sc_s).items()}
    log_q = (
        dist.Normal(d64["lm"], d64["sm"]).log_prob(mu) + dist.Normal(d64["ls"], d64["ss"]).log_prob(s.log()) - s.log()
    )
    ll = dist.Normal(mu[:, None], s[:, None]).log_prob(Y.double())
    log_p = dist.Normal(0.0, 2.0).log_prob(mu) + dist.LogNormal(0.0, 1.0).log_prob(s) + ll.sum(-1)
    stats = idata.sample_stats
    assert np.ptp(stats["log_q"].values) > 0.1  # the draws differ (a per-draw sum, not one total broadcast)
    np.testing.assert_allclose(stats["log_q"].values.reshape(-1), log_q.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["log_p"].values.reshape(-1), log_p.numpy(), rtol=1e-5, atol=1e-4)
    if model is scale_model_plate:  # pointwise only where the model declares the observations independent
        np.testing.assert_allclose(idata.log_likelihood["y"].values.reshape(50, 5), ll.numpy(), rtol=1e-5, atol=1e-4)
    else:
        assert idata.log_likelihood["y"].shape == (1, 50)  # one joint term per draw


def test_log_q_is_exact_for_a_residual_flow_guide():
    """In training mode a residual flow estimates its log-det stochastically; the diagnostics must not."""
    from functools import partial

    from pyro.infer.autoguide import AutoNormalizingFlow

    import pyroflows

    def model():
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])).to_event(1))

    pyro.clear_param_store()
    guide = AutoNormalizingFlow(model, partial(pyroflows.residual_flow, num_layers=2, hidden=(16,)))
    fit(model, guide, 30, num_particles=4, progress=False, seed=0)
    assert guide.training
    idata = D.to_inference_data(model, guide, num_samples=20)
    assert guide.training  # restored
    z = torch.as_tensor(idata.posterior["z"].values.reshape(20, 2))
    guide.eval()
    with torch.no_grad():  # log q by inverting the flow (fixed point) and its exact log-det
        expected = guide.get_posterior().log_prob(z)
    np.testing.assert_allclose(idata.sample_stats["log_q"].values.reshape(-1), expected.numpy(), atol=2e-4)


def test_inference_data_groups_shapes_coords_and_az_functions():
    def model(y=Y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("data", len(Y)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            theta = pyro.deterministic("theta", mu + tau * z)
            pyro.sample("y", dist.Normal(theta, SIGMA), obs=y)

    pyro.clear_param_store()
    guide = AutoNormal(model)
    fit(model, guide, 20, progress=False, seed=0)
    labels = ["a", "b", "c", "d", "e"]
    dims = {"z": ["unit"], "theta": ["unit"], "y": ["unit"]}
    idata = D.to_inference_data(model, guide, num_samples=100, chains=2, coords={"unit": labels}, dims=dims)
    assert set(compat.group_names(idata)) >= {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    post = idata.posterior
    assert post["mu"].shape == (2, 100) and post["tau"].shape == (2, 100)
    assert post["theta"].dims == ("chain", "draw", "unit") and list(post["unit"].values) == labels
    assert "mu_dim_0" not in post.dims  # global sites are scalars per draw
    assert (post["tau"].values > 0).all()
    np.testing.assert_allclose(post["theta"], post["mu"] + post["tau"] * post["z"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idata.observed_data["y"].values, Y.numpy())
    assert idata.posterior_predictive["y"].shape == (2, 100, 5)
    assert idata.log_likelihood["y"].shape == (2, 100, 5)
    assert idata.sample_stats["log_p"].shape == (2, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = az.loo(idata)
        assert np.isfinite(result.elpd if compat.ARVIZ_1 else result.elpd_loo)  # 1.x renamed it
        assert az.summary(idata, var_names=["mu", "tau"]).shape[0] == 2


# --- PSIS -------------------------------------------------------------------------------------------------------


def test_khat_small_for_the_exact_posterior_large_for_a_narrow_guide():
    m, s, log_z = posterior()
    pyro.set_rng_seed(0)
    good = D.psis_khat(normal_model, gaussian_guide(m, 1.1 * s), num_samples=4000)
    narrow = D.psis_khat(normal_model, gaussian_guide(m, 0.4 * s), num_samples=4000)
    assert good.khat < 0.5 and good.ok and good.ess > 3000
    assert narrow.khat > 0.7 and not narrow.ok and narrow.ess < good.ess
    # ELBO <= IW-ELBO <= log Z (+ Monte Carlo slack of a near-exact guide)
    assert good.elbo <= good.iw_elbo <= log_z + 0.01
    assert abs(good.iw_elbo - log_z) < 0.01
    assert good.threshold == pytest.approx(0.7)


def test_psis_corrects_the_mean_of_an_offset_guide():
    m, s, _ = posterior()
    pyro.set_rng_seed(1)
    res = D.psis_khat(normal_model, gaussian_guide(m - 0.5 * s, 1.3 * s), num_samples=8000)
    raw_error, corrected_error = 0.5 * s, abs(float(res.means["mu"]) - m)
    # the weighted mean has a Monte Carlo sd of about 1.3 s / sqrt(ESS) ~ 0.02 s: 5 standard errors
    assert res.khat < 0.7 and corrected_error < 5 * 1.3 * s / math.sqrt(res.ess) < raw_error / 5
    np.testing.assert_allclose(np.exp(res.log_weights).sum(), 1.0, rtol=1e-9)


def test_min_log_ratio_is_the_worst_draw_of_the_exact_log_ratio():
    """For a Gaussian posterior N(m, s^2) and guide N(m, 1.5 s): log p(y, mu) - log q(mu) = log Z + log N(mu; m, s)
    - log N(mu; m, 1.5 s), computed by hand at every draw of ``to_inference_data``; ``min_log_ratio`` is its minimum
    (the draw furthest from m), below the ELBO."""
    m, s, log_z = posterior()
    pyro.set_rng_seed(5)
    idata = D.to_inference_data(normal_model, gaussian_guide(m, 1.5 * s), num_samples=3000)
    res = D.psis_khat(idata=idata)
    mu = torch.as_tensor(np.asarray(idata.posterior["mu"]).reshape(-1), dtype=torch.float64)
    exact = log_z + dist.Normal(m, s).log_prob(mu) - dist.Normal(m, 1.5 * s).log_prob(mu)
    assert res.min_log_ratio == pytest.approx(float(exact.min()), abs=1e-4)
    assert res.min_log_ratio < res.elbo - 1.0  # 3000 draws reach ~3.4 guide sds: 0.5 (1/1 - 1/2.25) 3.4^2 = 3.2 nats


def test_psis_log_weights_stay_finite_when_most_weights_underflow():
    """A guide far from the posterior: most normalised weights underflow to 0 in linear space; the log weights are
    normalised in log space (log(0) once raised a RuntimeWarning and returned -inf)."""
    m, s, _ = posterior()
    pyro.set_rng_seed(2)
    res = D.psis_khat(normal_model, gaussian_guide(m + 60 * s, 3 * s), num_samples=2000)
    assert np.all(np.isfinite(res.log_weights)) and res.log_weights.min() < -750  # exp underflows below -745
    np.testing.assert_allclose(np.exp(res.log_weights).sum(), 1.0, rtol=1e-9)


def test_psislw_smooths_the_right_tail_of_the_log_ratios():
    """Pins the sign convention (0.x smooths exp(+x); 1.x is called with -x): a heavy right tail of log p - log q
    (q misses mass) gives a large k̂, a heavy left tail alone does not."""
    rng = np.random.default_rng(0)
    right = 1.2 * rng.exponential(size=4000)  # exp(right) is Pareto with shape k = 1.2
    assert compat.psislw(right)[1] == pytest.approx(1.2, abs=0.2)
    assert compat.psislw(-right)[1] < 0.5  # exp(-right) is bounded by 1


def test_importance_weighted_elbo_tightens_towards_log_evidence():
    m, s, log_z = posterior()
    pyro.set_rng_seed(2)
    guide = gaussian_guide(m + 0.3 * s, 1.5 * s)
    elbo = D.psis_khat(normal_model, guide, num_samples=4000).elbo
    iw = D.importance_weighted_elbo(normal_model, guide, num_samples=4000)
    assert elbo < iw <= log_z + 0.02 and log_z - iw < 0.05 < log_z - elbo


def test_loo_matches_exact_leave_one_out_for_an_exact_guide():
    m, s, _ = posterior()
    pyro.set_rng_seed(3)
    idata = D.to_inference_data(normal_model, gaussian_guide(m, s), num_samples=4000)
    res = D.loo(idata)
    assert abs(res.elpd_loo - exact_loo()) < 0.05
    assert res.pareto_k.max() < 0.7 and res.n_bad_k == 0 and res.elpd_i.shape == (5,)
    assert "elpd_loo=" in repr(res)


def test_a_reparameterised_model_keeps_its_latents_out_of_the_data():
    """poutine.reparam turns mu into a value computed from mu_decentered, which Pyro marks observed (a Delta): the
    ArviZ data must give it as a posterior variable, not as data with a log-likelihood, and the exact guide of the
    reparameterised model must still give the exact evidence and leave-one-out."""
    from pyro import poutine
    from pyro.infer.reparam import LocScaleReparam

    m, s, log_z = posterior()
    noncentred = poutine.reparam(normal_model, config={"mu": LocScaleReparam(0.0)})  # mu = PRIOR_SD * mu_decentered

    def guide(y=Y):  # the exact posterior of mu_decentered
        pyro.sample("mu_decentered", dist.Normal(m / PRIOR_SD, s / PRIOR_SD))

    pyro.set_rng_seed(5)
    idata = D.to_inference_data(noncentred, guide, num_samples=4000)
    assert set(idata.posterior.data_vars) == {"mu", "mu_decentered"}
    assert set(idata.observed_data.data_vars) == set(idata.log_likelihood.data_vars) == {"y"}
    assert set(idata.posterior_predictive.data_vars) == {"y"}
    np.testing.assert_allclose(idata.posterior["mu"].values, PRIOR_SD * idata.posterior["mu_decentered"].values)
    assert abs(D.loo(idata).elpd_loo - exact_loo()) < 0.05
    result = D.psis_khat(noncentred, guide, num_samples=2000)
    assert result.elbo == pytest.approx(log_z, abs=1e-4) and result.iw_elbo == pytest.approx(log_z, abs=1e-4)
    assert result.means["mu"] == pytest.approx(m, abs=0.05)


def test_loo_flags_a_guide_that_plain_az_loo_trusts():
    """A too-narrow guide: the approximate-posterior correction raises k̂ of every observation."""
    m, s, _ = posterior()
    pyro.set_rng_seed(4)
    idata = D.to_inference_data(normal_model, gaussian_guide(m, 0.3 * s), num_samples=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = az.loo(idata, pointwise=True).pareto_k.values
    corrected = D.loo(idata).pareto_k
    assert plain.max() < 0.7 < corrected.min()


# --- comparison with a reference --------------------------------------------------------------------------------


def _posterior(**arrays):
    return compat.from_dict({"posterior": arrays}, coords={"unit": ["a", "b"]}, dims={"theta": ["unit"]})


def test_compare_to_reference_units_and_labels():
    rng = np.random.default_rng(0)
    ref = _posterior(mu=rng.normal(0, 2, (1, 4000)), theta=rng.normal(0, 1, (1, 4000, 2)))
    same = D.compare_to_reference(ref, ref)
    assert list(same.index) == ["mu", "theta[a]", "theta[b]"]
    np.testing.assert_allclose(same["mean_error"], 0, atol=1e-12)
    np.testing.assert_allclose(same["sd_ratio"], 1, atol=1e-12)
    np.testing.assert_allclose(same["wasserstein"], 0, atol=1e-12)
    post = ref.posterior
    shifted = _posterior(mu=post["mu"].values + 1.0, theta=post["theta"].values * 2.0)
    table = D.compare_to_reference(shifted, ref, ["mu", "theta"])
    assert table.loc["mu", "mean_error"] == pytest.approx(1 / post["mu"].values.std())
    assert table.loc["mu", "wasserstein"] == pytest.approx(1.0)  # a shift moves every quantile by 1
    np.testing.assert_allclose(table.loc[["theta[a]", "theta[b]"], "sd_ratio"], 2.0)
    uniform = D.compare_to_reference(shifted, ref, weights=np.ones(4000))
    np.testing.assert_allclose(uniform.values, table.values)
    bare = D.compare_to_reference(shifted.posterior, ref.posterior, ["mu", "theta"])  # xarray Datasets
    np.testing.assert_allclose(bare.values, table.values)


def test_scatter_matrix_has_one_row_per_component():
    """The pair plot used with ArviZ 1.x (exercised here under 0.x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    post = _posterior(mu=rng.normal(size=(1, 50)), theta=rng.normal(size=(1, 50, 2))).posterior
    fig = compat.scatter_matrix(post, ["mu", "theta"])
    axes = np.asarray(fig.axes).reshape(3, 3)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["mu", "theta[a]", "theta[b]"]
    plt.close(fig)


def test_compare_to_reference_errors():
    a = _posterior(mu=np.zeros((1, 10)), theta=np.zeros((1, 10, 2)))
    b = compat.from_dict({"posterior": {"mu": np.zeros((1, 10)), "theta": np.zeros((1, 10, 3))}})
    with pytest.raises(ValueError, match="not in both posteriors"):
        D.compare_to_reference(a, a, ["sigma"])
    with pytest.raises(ValueError, match="'theta' has components"):
        D.compare_to_reference(a, b, ["theta"])
    with pytest.raises(ValueError, match="3 weights for 10 draws"):
        D.compare_to_reference(a, a, weights=np.ones(3))


# --- bad input --------------------------------------------------------------------------------------------------


def test_discrete_latent_site_is_an_error():
    def model():
        k = pyro.sample("k", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(k, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match=r"discrete latent site\(s\) \['k'\]"):
        D.to_inference_data(model, guide, num_samples=10)


def test_unfitted_guide_is_an_error():
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="never fitted"):
        D.to_inference_data(normal_model, AutoNormal(normal_model), num_samples=10)
    with pytest.raises(ValueError, match="never fitted"):
        D.psis_khat(normal_model, AutoNormal(normal_model))


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "10"])
def test_num_samples_must_be_a_positive_int(n):
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        D.to_inference_data(normal_model, gaussian_guide(0.0, 1.0), num_samples=n)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        D.importance_weighted_elbo(normal_model, gaussian_guide(0.0, 1.0), num_samples=n)


@pytest.mark.parametrize(
    "coords, dims, match",
    [
        (None, {"y": ["obs", "extra"]}, r"names 2 dims, but 'y' has shape \(5,\)"),
        ({"obs": list("abcd")}, {"y": ["obs"]}, "has 4 labels, but dim 'obs' of 'y' has size 5"),
        (None, {"sigma": ["obs"]}, "'sigma' is not a site of the model"),
        ({"school": list("abcde")}, {"y": ["obs"]}, "'school' is not used by any entry of dims"),
    ],
)
def test_mismatched_coords_and_dims_are_errors(coords, dims, match):
    with pytest.raises(ValueError, match=match):
        D.to_inference_data(normal_model, gaussian_guide(0.0, 1.0), num_samples=5, coords=coords, dims=dims)


def test_chains_must_be_a_positive_int():
    with pytest.raises(ValueError, match="chains must be a positive int, got 0"):
        D.to_inference_data(normal_model, gaussian_guide(0.0, 1.0), num_samples=5, chains=0)


def test_psis_needs_model_and_guide_or_idata():
    with pytest.raises(ValueError, match="give model and guide, or idata"):
        D.psis_khat()
    with pytest.raises(ValueError, match="sample_stats log_p / log_q"):
        D.psis_khat(idata=_posterior(mu=np.zeros((1, 10)), theta=np.zeros((1, 10, 2))))


def test_khat_threshold_rule():
    assert D.khat_threshold(100) == pytest.approx(0.5)
    assert D.khat_threshold(10_000) == pytest.approx(0.7)


def test_posterior_data_round_trips_and_a_constant_reference_is_an_error():
    rng = np.random.default_rng(1)
    data = D.posterior_data({"mu": rng.normal(size=(2, 30)), "theta": torch.randn(2, 30, 2)},
                            coords={"unit": ["a", "b"]}, dims={"theta": ["unit"]})  # fmt: skip
    post = compat.group(data, "posterior")
    assert post["mu"].shape == (2, 30) and post["theta"].dims == ("chain", "draw", "unit")
    constant = D.posterior_data({"mu": np.ones((1, 30)), "theta": np.ones((1, 30, 2))},
                                coords={"unit": ["a", "b"]}, dims={"theta": ["unit"]})  # fmt: skip
    with pytest.raises(ValueError, match="reference draws of 'mu' do not vary"):
        D.compare_to_reference(data, constant)
    with pytest.raises(ValueError, match=r"posterior_data: 'mu' needs leading \(chain, draw\) dims"):
        D.posterior_data({"mu": np.ones(30)})


def test_fit_and_the_diagnostics_do_not_import_arviz_until_it_is_used():
    """ArviZ (with SciPy, xarray, matplotlib) takes seconds to import: fit and the numeric diagnostics must not pay
    for it; it is imported when an ArviZ object or PSIS is first needed."""
    import subprocess
    import sys

    code = (
        "import sys, torch, pyro, pyro.distributions as dist, pyroflows\n"
        "from pyroflows import diagnostics, infer, start\n"
        "def model():\n"
        "    pyro.sample('x', dist.Normal(0.0, 1.0))\n"
        "infer.fit(model, pyro.infer.autoguide.AutoNormal(model), 3, progress=False, report=False)\n"
        "names = ('arviz', 'arviz_base', 'arviz_stats')  # 1.x's PSIS is arviz_stats'\n"
        "before = any(n in sys.modules for n in names)\n"
        "diagnostics.compat.psislw(torch.randn(100).double().numpy())\n"
        "print(before, any(n in sys.modules for n in names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["False", "True"]
