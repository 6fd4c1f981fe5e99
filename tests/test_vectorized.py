"""Models under vectorised draws: pyroflows.diagnostics.check_vectorized, fit's check before training with
vectorised particles, and the diagnostics' one-draw-at-a-time fallback, every log density against a hand
computation."""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyroflows
from pyroflows import diagnostics as D
from pyroflows.infer import fit

Y = torch.tensor([0.3, -0.4, 1.1, 0.8, 0.2])


def branching(y=Y):
    """Python control flow on a sampled value: runs on one draw, fails on a batch of them."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    loc = mu if mu > 0 else -mu
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


def mixing(y=Y):
    """``mu.sum()`` sums over the draws too: runs vectorised, with a wrong log density."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu.sum(), 1.0), obs=y)


def mixing_log_p(mu: torch.Tensor, y=Y) -> torch.Tensor:
    """log p(y, mu) of :func:`mixing` for draws ``mu`` of shape ``(S, 2)``, each on its own."""
    prior = dist.Normal(0.0, 1.0).log_prob(mu).sum(-1)
    return prior + dist.Normal(mu.sum(-1, keepdim=True), 1.0).log_prob(y).sum(-1)


def sound(y=Y):
    """Every kind of site the check has to carry draw by draw: a global, a plate with subsampling, a
    deterministic site, a factor and a parameter."""
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.deterministic("total", mu.sum(-1))
    pyro.factor("soft", -0.5 * mu.square().sum(-1))
    with pyro.plate("data", len(y), subsample_size=3) as idx:
        pyro.sample("y", dist.Normal(mu[..., 0], scale), obs=y[idx])


def fixed_guide(y=Y):
    """A guide without parameters, vectorisable, for :func:`mixing`."""
    pyro.sample("mu", dist.Normal(torch.tensor([0.2, -0.1]), 0.8).to_event(1))


# --- check_vectorized --------------------------------------------------------------------------------------


def test_a_model_that_keeps_its_draws_apart_passes():
    pyro.clear_param_store()
    D.check_vectorized(sound)
    D.check_vectorized(sound, y=Y[:4])  # its arguments are passed on


def test_a_model_that_fails_vectorised_is_named_with_its_cause():
    with pytest.raises(ValueError, match="fails when its draws are vectorised.*Boolean value of Tensor"):
        D.check_vectorized(branching)


def test_a_model_that_mixes_its_draws_is_caught():
    with pytest.raises(ValueError, match="wrong log densities when its draws are vectorised.*draw 0"):
        D.check_vectorized(mixing)


def test_one_failed_vectorised_draw_is_drawn_again():
    """A vectorised run can fail on an unlucky prior draw (a scale that underflows); only a failure on every
    attempt is the model's."""
    calls = []

    def unlucky_once():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        calls.append(z.dim())
        if z.dim() and calls.count(z.dim()) == 1:
            raise ValueError("Expected parameter scale to satisfy the constraint GreaterThan(lower_bound=0.0)")

    D.check_vectorized(unlucky_once)
    assert calls.count(1) == 2  # failed once, then ran

    def always_fails():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if z.dim():
            raise ValueError("a batch of draws")

    with pytest.raises(ValueError, match="fails when its draws are vectorised.*a batch of draws"):
        D.check_vectorized(always_fails)


def test_the_check_leaves_the_random_streams_alone():
    pyro.set_rng_seed(3)
    expected = torch.randn(4), np.random.rand(2)
    pyro.set_rng_seed(3)
    with pytest.raises(ValueError):
        D.check_vectorized(mixing)
    D.check_vectorized(sound)
    torch.testing.assert_close(torch.randn(4), expected[0])
    np.testing.assert_array_equal(np.random.rand(2), expected[1])


def test_a_model_random_given_its_draws_is_not_called_mixing():
    """Dropout in a network, say: the same draw rerun alone gives another density, so nothing can be compared."""

    def noisy(y=Y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu.sum(-1) + torch.randn(len(y)), 1.0), obs=y)

    D.check_vectorized(noisy)


def test_a_model_without_a_proper_prior_is_not_checked():
    def improper():
        pyro.sample("z", dist.ImproperUniform(dist.constraints.real, (), ()))

    D.check_vectorized(improper)  # nothing to draw from: no claim either way


# --- fit -----------------------------------------------------------------------------------------------------


def _flow_guide(model):
    pyro.clear_param_store()
    return pyroflows.AutoFlow(model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))


def test_fit_refuses_before_training_and_names_the_fix():
    guide = _flow_guide(branching)
    with pytest.raises(ValueError, match="fit: the model fails when its particles are vectorised.*vectorize_partic"):
        fit(branching, guide, 5, model_args=(Y,), progress=False, report=False)
    assert guide.flow_params.grad is None  # no step was taken
    guide = _flow_guide(mixing)
    with pytest.raises(ValueError, match="fit: the model gives wrong log densities.*vectorize_particles=False to fit"):
        fit(mixing, guide, 5, model_args=(Y,), progress=False, report=False)
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    with pytest.raises(ValueError, match="build the loss with vectorize_particles=False"):
        fit(mixing, _flow_guide(mixing), 5, model_args=(Y,), loss=loss, progress=False, report=False)


def test_fit_names_a_guide_that_fails_vectorised_and_passes_other_first_step_errors_on():
    def model(y=Y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def branching_guide(y=Y):
        loc = pyro.param("loc", torch.tensor(0.5))
        u = pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        pyro.sample("mu", dist.Normal(loc, 1.0 if u > 0 else 2.0))

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="fit: the guide fails when its particles are vectorised.*Boolean value"):
        fit(model, branching_guide, 5, progress=False, report=False)
    pyro.clear_param_store()
    result = fit(model, branching_guide, 5, vectorize_particles=False, progress=False, report=False)
    assert np.isfinite(result.losses).all()

    def model_with_a_parameter(y=Y):  # refused by the IW bound at its first step: that error is not renamed
        shift = pyro.param("shift", torch.tensor(0.0))
        mu = pyro.sample("mu", dist.Normal(shift, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    pyro.clear_param_store()
    guide = pyroflows.AutoFlow(model_with_a_parameter, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    with pytest.raises(Exception) as info:
        fit(model_with_a_parameter, guide, 5, estimator="iw", progress=False, report=False)
    assert "vectorised" not in str(info.value)


@pytest.mark.parametrize("options", [{"vectorize_particles": False}, {"num_particles": 1}])
def test_fit_trains_such_a_model_one_particle_at_a_time(options):
    result = fit(branching, _flow_guide(branching), 5, model_args=(Y,), progress=False, report=False, **options)
    assert np.isfinite(result.losses).all()


def test_the_check_does_not_change_a_seeded_run(monkeypatch):
    def run():
        return fit(sound, _flow_guide(sound), 20, model_args=(Y,), progress=False, report=False, seed=1).losses

    checked = run()
    monkeypatch.setattr(D, "_check_vectorized", lambda *a, **k: None)
    np.testing.assert_array_equal(run(), checked)


# --- the diagnostics' fallback -------------------------------------------------------------------------------


def test_diagnostics_draw_one_at_a_time_where_vectorised_draws_would_be_wrong():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = D.to_inference_data(mixing, fixed_guide, num_samples=40, model_args=(Y,))
    (w,) = [w for w in caught if "one at a time" in str(w.message)]
    assert issubclass(w.category, UserWarning) and w.filename == __file__  # said at the caller's line
    assert "the log density of draw 0" in str(w.message)
    mu = torch.as_tensor(idata.posterior["mu"].values.reshape(40, 2))
    assert mu.std(0).min() > 0.3  # 40 different draws, not one repeated
    log_q = dist.Normal(torch.tensor([0.2, -0.1]).double(), 0.8).log_prob(mu).sum(-1)
    np.testing.assert_allclose(idata.sample_stats["log_p"].values.reshape(-1), mixing_log_p(mu), rtol=1e-5)
    np.testing.assert_allclose(idata.sample_stats["log_q"].values.reshape(-1), log_q, rtol=1e-5)
    ll = dist.Normal(mu.sum(-1, keepdim=True), 1.0).log_prob(Y.double())
    np.testing.assert_allclose(idata.log_likelihood["y"].values.reshape(40, 5), ll, rtol=1e-5, atol=1e-6)
    assert idata.posterior_predictive["y"].shape == (1, 40, 5)


def test_psis_of_a_branching_model_uses_each_draws_own_density():
    def guide(y=Y):
        pyro.sample("mu", dist.Normal(0.5, 0.6))

    with pytest.warns(UserWarning, match="Boolean value of Tensor"):
        idata = D.to_inference_data(branching, guide, num_samples=60, seed=4)
    mu = torch.as_tensor(idata.posterior["mu"].values.reshape(-1))
    assert (mu < 0).any() and (mu > 0).any()  # both branches taken
    log_p = dist.Normal(0.0, 2.0).log_prob(mu) + dist.Normal(mu.abs()[:, None], 1.0).log_prob(Y.double()).sum(-1)
    np.testing.assert_allclose(idata.sample_stats["log_p"].values.reshape(-1), log_p, rtol=1e-5)
    with pytest.warns(UserWarning, match="one at a time"):
        result = D.psis_khat(branching, guide, num_samples=60, seed=4)
    assert result.log_weights.shape == (60,) and np.isfinite(result.elbo)


def test_diagnostics_warn_that_a_subsampled_model_is_seen_through_one_minibatch():
    def subsampled(y=Y, subsample_size=2):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y), subsample_size=subsample_size) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    def guide(y=Y, subsample_size=2):
        pyro.sample("mu", dist.Normal(0.3, 0.5))

    with pytest.warns(UserWarning, match="subsamples its plate.*'data' \\(2 of 5\\)") as caught:
        D.psis_khat(subsampled, guide, num_samples=50, seed=0)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole data: nothing to say
        D.psis_khat(subsampled, guide, num_samples=50, model_kwargs={"subsample_size": None}, seed=0)
