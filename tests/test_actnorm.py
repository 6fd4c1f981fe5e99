"""ActNorm: data-dependent init, its state in state_dict, and never re-initialising a used map."""

from __future__ import annotations

import warnings

import pytest
import torch

from pyroflows.transforms import ActNorm


@pytest.mark.parametrize("event_dim,shape", [(1, (3,)), (3, (2, 4, 5))])
def test_init_gives_zero_mean_unit_variance(event_dim, shape):
    torch.manual_seed(0)
    t = ActNorm(shape if event_dim == 3 else shape[0])
    x = 4.0 + 3.0 * torch.randn((256,) + shape) * torch.arange(1, shape[0] + 1).reshape(
        (shape[0],) + (1,) * (event_dim - 1)
    )
    y = t(x)
    dims = [0] + list(range(2, 1 + event_dim))
    assert torch.allclose(y.mean(dims), torch.zeros(shape[0]), atol=1e-5)
    assert torch.allclose(y.var(dims, unbiased=False), torch.ones(shape[0]), atol=1e-4)
    assert bool(t.initialized)


def test_init_happens_once_and_survives_state_dict():
    t = ActNorm(2)
    t(torch.randn(100, 2) * 5)
    params = [p.detach().clone() for p in t.parameters()]
    t(torch.randn(100, 2) + 10)  # a second batch does not re-initialise
    assert all(torch.equal(a, b) for a, b in zip(params, t.parameters()))
    assert "initialized" in t.state_dict()
    fresh = ActNorm(2)
    fresh.load_state_dict(t.state_dict())
    fresh(torch.randn(100, 2) + 10)
    assert all(torch.equal(a, b) for a, b in zip(params, fresh.parameters()))


def test_no_init_in_eval_mode_or_after_an_inverse_call():
    t = ActNorm(2).eval()
    x = torch.randn(50, 2) * 3
    assert torch.equal(t(x), x) and not bool(t.initialized)
    t.train()
    t.inv(torch.randn(50, 2))  # the map has been used: it must not change under a later forward
    t(x)
    assert bool(t.initialized) and torch.equal(t.bias.detach(), torch.zeros(2))


def test_single_sample_keeps_identity():
    t = ActNorm(3)
    x = torch.randn(3)
    with pytest.warns(UserWarning, match="one value per feature, too few for the data-dependent init"):
        assert torch.equal(t(x), x) and bool(t.initialized)


def test_a_single_row_inside_a_pyro_guide_keeps_the_identity_without_a_warning():
    """Pyro's ELBO runs an AutoNormalizingFlow guide once unvectorised (to count plates) before the vectorised
    particles: the flow's ActNorms see one noise draw, keep the identity (the start a guide wants) and say nothing,
    since the advice to initialise from a larger batch does not apply; outside Pyro a single row still warns (above)."""
    from functools import partial

    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormalizingFlow

    import pyroflows

    def model():
        pyro.sample("z", dist.Normal(torch.full((3,), 2.0), 0.5).to_event(1))

    pyro.clear_param_store()
    guide = AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=2))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.0}), Trace_ELBO(4, vectorize_particles=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step()
    norms = [m for m in guide.modules() if isinstance(m, ActNorm)]
    assert norms and all(bool(m.initialized) for m in norms)
    for m in norms:  # lr 0: what the first call left is what the layer holds
        assert torch.equal(m.bias.detach(), torch.zeros_like(m.bias)) and torch.equal(
            m.log_scale.detach(), torch.zeros_like(m.log_scale)
        )


def test_constant_features_are_centred_not_blown_up():
    """A feature that never varies in the init batch would be scaled by 1/eps; it is only centred, with a warning."""
    t = ActNorm(3)
    x = torch.randn(100, 3)
    x[:, 1] = 5.1
    with pytest.warns(UserWarning, match="1 of 3 features are constant"):
        y = t(x)
    assert t.log_scale[1] == 0 and torch.allclose(y[:, 1], torch.zeros(100), atol=1e-6)
    assert (y[:, [0, 2]].std(0, unbiased=False) - 1).abs().max() < 1e-4


@pytest.mark.parametrize("validate", [True, False])
def test_wrong_feature_count_is_named(validate):
    """With validation on, the generic event-shape check names it; off, ActNorm's own (shape-only, sync-free)."""
    from pyroflows.transforms import enable_validation

    enable_validation(validate)
    try:
        with pytest.raises(ValueError, match=r"ActNorm.* expect.*4.*got .*shape \(2, 3, 8, 8\)"):
            ActNorm((4, None, None))(torch.randn(2, 3, 8, 8))
        with pytest.raises(ValueError, match=r"ActNorm.* expect.*3.*got .*shape \(5, 2\)"):
            ActNorm(3).inv(torch.randn(5, 2))
    finally:
        enable_validation(None)


@pytest.mark.parametrize("eps", [0, -1.0, float("nan")])
def test_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="ActNorm: eps must be a finite number in \\(0"):
        ActNorm(3, eps=eps)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape must be a positive int"):
        ActNorm(0)
    with pytest.raises(ValueError, match="shape must be"):
        ActNorm((3, 4))
    with pytest.raises(ValueError, match="event_dim"):
        ActNorm(3, event_dim=2)
