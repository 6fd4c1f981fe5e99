"""What every bijection must satisfy, checked once for every registered layer and builder (tests/registry.py).

Tolerances: round trips and log-dets are compared in float64 to 1e-8 absolute (the maps are O(1) and the
only iterative solver, Planar's inverse, converges to ~1e-15); the grid integral of a 2-D density to 1e-2.
"""

from __future__ import annotations

import copy
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim import Adam
from registry import CASES, build

import pyroflows

ATOL = 1e-8
BATCH_SHAPES = [(), (5,), (3, 4)]
VECTOR_CASES = [name for name, case in CASES.items() if case.vector]


def _randn(batch_shape, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(batch_shape) + tuple(shape), generator=g, dtype=torch.float64)


def _latent(case_name, t, batch_shape, shape, seed):
    """Inverse-direction inputs: standard normal, or (for bounded codomains) the image of domain draws."""
    if CASES[case_name].latent_from_data:
        with torch.no_grad():
            return t.forward_and_log_det(_draw(case_name, batch_shape, shape, seed))[0].clone()
    return _randn(batch_shape, _out_shape(t, shape), seed)


def _draw(case_name, batch_shape, shape, seed=1):
    """Inputs from the case's domain (standard normal, or the unit interval for Logit)."""
    g = torch.Generator().manual_seed(seed)
    return CASES[case_name].draw(tuple(batch_shape) + tuple(shape), g)


def _out_shape(t, shape):
    return tuple(t.forward_shape(shape))


@pytest.fixture(params=sorted(CASES))
def case_name(request):
    return request.param


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
def test_round_trips(case_name, batch_shape):
    t, shape = build(CASES[case_name])
    x = _draw(case_name, batch_shape, shape)
    y = t(x)
    assert torch.allclose(t.inv(y.clone()), x, atol=ATOL, rtol=0), "inverse(forward(x)) != x"
    y0 = _latent(case_name, t, batch_shape, shape, seed=2)
    x0 = t.inv(y0)
    assert torch.allclose(t(x0.clone()), y0, atol=ATOL, rtol=0), "forward(inverse(y)) != y"


def _jacobian_log_det(fn, point, in_shape):
    flat = point.reshape(-1).clone()
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(in_shape)).reshape(-1), flat)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0, "singular Jacobian"
    return logabsdet


def test_log_det_matches_autograd_jacobian(case_name):
    t, shape = build(CASES[case_name])
    for seed in range(3):
        x = _draw(case_name, (), shape, seed=10 + seed)
        expected = _jacobian_log_det(lambda v: t(v), x, shape)
        y = t(x)
        assert torch.allclose(t.log_abs_det_jacobian(x, y), expected, atol=ATOL, rtol=0)
        # the inverse direction: log|det dx/dy| at y
        y = _latent(case_name, t, (), shape, seed=20 + seed)
        expected_inv = _jacobian_log_det(lambda v: t.inv(v), y, _out_shape(t, shape))
        x = t.inv(y)
        assert torch.allclose(-t.log_abs_det_jacobian(x, y), expected_inv, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
def test_batch_shapes(case_name, batch_shape):
    t, shape = build(CASES[case_name])
    x = _draw(case_name, batch_shape, shape)
    y = t(x)
    log_det = t.log_abs_det_jacobian(x, y)
    assert y.shape == tuple(batch_shape) + _out_shape(t, shape)
    assert log_det.shape == tuple(batch_shape)
    # Each batch element equals the same computation done alone.
    flat_x = x.reshape((-1,) + shape)
    for i in range(flat_x.shape[0]):
        xi = flat_x[i].clone()
        yi = t(xi)
        assert torch.allclose(yi, y.reshape((-1,) + yi.shape)[i], atol=ATOL, rtol=0)
        assert torch.allclose(t.log_abs_det_jacobian(xi, yi), log_det.reshape(-1)[i], atol=ATOL, rtol=0)


def test_remembered_log_det_equals_fresh(case_name):
    t, shape = build(CASES[case_name])
    x = _draw(case_name, (4,), shape)
    y = t(x)
    remembered = t.log_abs_det_jacobian(x, y)
    assert t.log_abs_det_jacobian(x, y) is remembered, "log-det of the last pair was recomputed"
    fresh = t.log_abs_det_jacobian(x.clone(), y.clone())
    assert fresh is not remembered
    assert torch.allclose(remembered, fresh, atol=ATOL, rtol=0)
    # The inverse direction remembers too: log|det dy/dx| at the pair it produced.
    y2 = _latent(case_name, t, (4,), shape, seed=3)
    x2 = t.inv(y2)
    assert t.inv(y2) is x2, "inverse of the last output was recomputed"
    assert torch.allclose(t.log_abs_det_jacobian(x2, y2), t.log_abs_det_jacobian(x2.clone(), y2.clone()), atol=ATOL)


def test_parameters_visible_to_pyro_and_optimisers(case_name):
    t, shape = build(CASES[case_name])
    params = list(t.parameters())
    # Pyro's param store registers .contiguous() of each parameter: a non-contiguous one is silently copied
    # and SVI then trains the copy, never the layer.
    assert all(p.is_contiguous() for p in params), "non-contiguous parameter: Pyro would train a copy"
    pyro.clear_param_store()
    pyro.module("flow", t)
    assert len(pyro.get_param_store()) == len(params)
    inv = pyroflows.inverse(t)
    assert {id(p) for p in inv.parameters()} == {id(p) for p in params}
    pyro.module("inverse_flow", inv)  # registers without error; same tensors
    if not params:
        return
    x = _draw(case_name, (8,), shape)
    y = inv.inv(x)  # the inverse of the inverse: t's forward, through the module wrapper
    loss = (y**2).sum() - t.log_abs_det_jacobian(x, y).sum()
    loss.backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(inv.parameters(), lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "optimiser over inverse(t) moved nothing"


@pytest.mark.parametrize("case_name", VECTOR_CASES)
def test_transformed_distribution_integrates_to_one(case_name):
    t, shape = build(CASES[case_name], shape=(2,))
    t.eval()
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, t)
    n, half_width = 481, 12.0
    grid = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        log_p = d.log_prob(zz)
    cell = (grid[1] - grid[0]) ** 2
    total = float(torch.logsumexp(log_p, 0).exp() * cell)
    assert math.isclose(total, 1.0, abs_tol=1e-2), f"density integrates to {total}"


@pytest.mark.parametrize("case_name", VECTOR_CASES)
def test_auto_normalizing_flow_svi(case_name):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = torch.tensor([0.5, 1.5, 1.0])

    def model():
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.sample("obs", dist.Normal(loc.sum(), scale), obs=data)

    guide = AutoNormalizingFlow(model, lambda dim: CASES[case_name].make((dim,)))
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step() for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    params = dict(pyro.get_param_store().items())
    flow_params = list(guide.transform.parameters())
    # (Pyro also files its prototype tensor, an alias of the first flow parameter, under its own name.)
    assert {id(p) for p in flow_params} <= {id(v) for v in params.values()}, "flow parameters not in the store"
    if flow_params:
        before = {k: v.detach().clone() for k, v in params.items()}
        svi.step()
        assert any(not torch.equal(before[k], v) for k, v in pyro.get_param_store().items())


def test_cache_size_zero_and_one(case_name):
    t, shape = build(CASES[case_name])
    cached = t.with_cache(1)
    assert t.with_cache(0) is t
    assert {id(p) for p in cached.parameters()} == {id(p) for p in t.parameters()}
    x = _draw(case_name, (4,), shape)
    y = cached(x)
    again = cached(x)  # a forward call always computes (torch's cache would return y, stale after a step)
    assert again is not y and torch.allclose(again, y, atol=ATOL, rtol=0)
    y = cached(x)
    assert cached.inv(y) is x
    assert torch.allclose(cached.log_abs_det_jacobian(x, y), t.log_abs_det_jacobian(x.clone(), t(x.clone())))
    assert cached.with_cache(0)(x) is not y


def test_state_dict_and_copies(case_name):
    t, shape = build(CASES[case_name])
    x = _draw(case_name, (4,), shape)
    y = t(x)
    t.log_abs_det_jacobian(x, y)
    fresh = CASES[case_name].make(shape).to(torch.float64)
    fresh.load_state_dict(t.state_dict())
    assert torch.allclose(fresh(x.clone()), y, atol=ATOL), "state_dict does not determine the map"
    for clone in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert torch.allclose(clone(x.clone()), y, atol=ATOL)


def test_bad_input_is_named(case_name):
    t, shape = build(CASES[case_name])
    if t.event_shape is not None and any(n is not None for n in t.event_shape):
        wrong = (shape[0] + 1,) + shape[1:]
        with pytest.raises(ValueError, match="event shape"):
            t(_draw(case_name, (2,), wrong))
    with pytest.raises(ValueError, match="at least"):
        t(_draw(case_name, (), shape[1:]))  # one event dim short
    x = _draw(case_name, (2,), shape)
    x[1, ...] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        t(x)
    x[1, ...] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        t.inv(x.reshape((2,) + _out_shape(t, shape)))
    with pytest.raises(TypeError, match="floating"):
        t(torch.zeros((2,) + shape, dtype=torch.long))
    if any(True for _ in t.parameters()):
        with pytest.raises(TypeError, match="dtype"):
            t(_draw(case_name, (2,), shape).float())
