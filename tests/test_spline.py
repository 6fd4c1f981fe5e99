"""Rational-quadratic splines: the elementwise spline against the paper's interpolation conditions and autograd,
the coupling layer, the spline_flow builder as a guide, and argument checks."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim import Adam

from pyroflows import spline_flow
from pyroflows.transforms import ActNorm, Compose, Inverse, Permute, SplineCoupling, rational_quadratic_spline

BOUND = 3.0
K = 5
MIN = 1e-3  # the default minimum bin width, bin height and derivative


def _params(n, num_bins=K, scale=1.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(n, num_bins, generator=g, dtype=dtype)
    h = scale * torch.randn(n, num_bins, generator=g, dtype=dtype)
    d = scale * torch.randn(n, num_bins - 1, generator=g, dtype=dtype)
    return w, h, d


def _knots(raw, bound=BOUND, minimum=MIN):
    """The knots, computed here from the definition: each bin is MIN of 2B plus its softmax share of the rest."""
    fractions = minimum + (1 - minimum * raw.shape[-1]) * torch.softmax(raw, -1)
    cum = torch.cat([torch.zeros_like(fractions[..., :1]), torch.cumsum(fractions, -1)], -1)
    return -bound + 2 * bound * cum


def _knot_derivatives(raw):
    inner = MIN + F.softplus(raw + math.log(math.expm1(1 - MIN)))
    ones = torch.ones_like(inner[..., :1])
    return torch.cat([ones, inner, ones], -1)


def _autograd_log_derivative(x, w, h, d, inverse=False):
    x = x.clone().requires_grad_(True)
    y, _ = rational_quadratic_spline(x, w, h, d, BOUND, inverse=inverse)
    (grad,) = torch.autograd.grad(y.sum(), [x])
    return grad.log()


# ------------------------------------------------------------------------------------------ the spline function
def test_spline_is_monotone_on_the_whole_line():
    w, h, d = _params(6, scale=2.0)
    x = torch.linspace(-2 * BOUND, 2 * BOUND, 2001, dtype=torch.float64)[:, None].expand(-1, 6)
    y, log_d = rational_quadratic_spline(x, w, h, d, BOUND)
    assert bool((y.diff(dim=0) > 0).all())
    assert bool(torch.isfinite(log_d).all())


def test_spline_interpolates_the_knots_with_their_derivatives():
    """g(x_k) = y_k and g'(x_k) = delta_k: the conditions the rational quadratic is built to satisfy."""
    w, h, d = _params(4)
    x_knots, y_knots, derivatives = _knots(w), _knots(h), _knot_derivatives(d)
    y, log_d = rational_quadratic_spline(x_knots, w[:, None], h[:, None], d[:, None], BOUND)
    assert torch.allclose(y, y_knots, atol=1e-12, rtol=0)
    assert torch.allclose(log_d, derivatives.log(), atol=1e-10, rtol=0)
    # other minimum bin widths and heights (the knots of x and y then differ even for equal raw sizes)
    y, _ = rational_quadratic_spline(
        _knots(w, minimum=0.05), w[:, None], h[:, None], d[:, None], BOUND, min_bin_width=0.05, min_bin_height=0.1
    )
    assert torch.allclose(y, _knots(h, minimum=0.1), atol=1e-12, rtol=0)
    # parameters of different batch shapes broadcast (one set of widths for every row)
    y, _ = rational_quadratic_spline(x_knots[:1].expand(4, -1), w[:1], h[:, None], d[:, None], BOUND)
    assert torch.allclose(y, _knots(h), atol=1e-12, rtol=0)


def test_spline_inverse_round_trips_in_the_tails_and_at_the_knots():
    w, h, d = _params(8, seed=1)
    g = torch.Generator().manual_seed(2)
    inner = (2 * BOUND * torch.rand(8, 40, generator=g, dtype=torch.float64) - BOUND).sort(-1).values
    tails = torch.tensor([-50.0, -BOUND - 1e-9, BOUND + 1e-9, 7.5, 1e3], dtype=torch.float64).expand(8, -1)
    x = torch.cat([inner, tails, _knots(w)], -1)  # the knots include exactly -B and B
    y, log_d = rational_quadratic_spline(x, w[:, None], h[:, None], d[:, None], BOUND)
    x_back, inv_log_d = rational_quadratic_spline(y, w[:, None], h[:, None], d[:, None], BOUND, inverse=True)
    assert torch.allclose(x_back, x, atol=1e-10, rtol=0)
    assert torch.allclose(inv_log_d, -log_d, atol=1e-10, rtol=0)
    # forward of the inverse, from y = the y-knots and points beyond them
    y0 = torch.cat([_knots(h), tails], -1)
    x0, _ = rational_quadratic_spline(y0, w[:, None], h[:, None], d[:, None], BOUND, inverse=True)
    assert torch.allclose(rational_quadratic_spline(x0, w[:, None], h[:, None], d[:, None], BOUND)[0], y0, atol=1e-10)


def test_spline_log_derivative_matches_autograd():
    w, h, d = _params(5, seed=3)
    g = torch.Generator().manual_seed(4)
    x = 1.4 * BOUND * (2 * torch.rand(5, 30, generator=g, dtype=torch.float64) - 1)  # some beyond the bound
    _, log_d = rational_quadratic_spline(x, w[:, None], h[:, None], d[:, None], BOUND)
    assert torch.allclose(log_d, _autograd_log_derivative(x, w[:, None], h[:, None], d[:, None]), atol=1e-10)
    y = 1.4 * BOUND * (2 * torch.rand(5, 30, generator=g, dtype=torch.float64) - 1)
    _, inv_log_d = rational_quadratic_spline(y, w[:, None], h[:, None], d[:, None], BOUND, inverse=True)
    expected = _autograd_log_derivative(y, w[:, None], h[:, None], d[:, None], inverse=True)
    assert torch.allclose(inv_log_d, expected, atol=1e-10)


@pytest.mark.parametrize("shape", [(8,), (40, 8), (300, 8), (16, 32, 5)], ids=["1d", "few-rows", "many-rows", "3d"])
def test_bin_softmax_equals_torch_softmax(shape):
    """The bins' softmax (transposed for many rows on CPU, for speed) gives torch.softmax's values and gradients."""
    from pyroflows.transforms.spline import _softmax_last

    raw = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(shape, dtype=torch.float64)
    ours = _softmax_last(raw)
    (grad,) = torch.autograd.grad((ours * weights).sum(), [raw])
    theirs = torch.softmax(raw, -1)
    (expected,) = torch.autograd.grad((theirs * weights).sum(), [raw])
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-15)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_spline_gradients_match_finite_differences(inverse):
    """The map's and the log-derivative's gradients in the input and in the raw widths, heights and derivatives
    (the ones a training step uses) agree with central differences in float64 (``torch.autograd.gradcheck``),
    with points inside the interval in several bins and beyond the bound (gradient zero in the parameters)."""
    w, h, d = (t[:, None].clone().requires_grad_(True) for t in _params(4, seed=5))
    g = torch.Generator().manual_seed(6)
    x = 1.3 * BOUND * (2 * torch.rand(4, 7, generator=g, dtype=torch.float64) - 1)
    x[:, 0] = 1.5 * BOUND  # one point beyond the bound per row
    x.requires_grad_(True)

    def f(x, w, h, d):
        return rational_quadratic_spline(x, w, h, d, BOUND, inverse=inverse)

    assert torch.autograd.gradcheck(f, (x, w, h, d), eps=1e-6, atol=1e-6)
    y, log_d = f(x, w, h, d)
    grads = torch.autograd.grad((y + log_d)[:, 0].sum(), [w, h, d])
    assert all(grad.abs().max() == 0 for grad in grads)  # beyond the bound: the identity, whatever the spline


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-13), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_zero_parameters_give_the_identity(dtype, atol):
    x = torch.linspace(-2 * BOUND, 2 * BOUND, 301, dtype=dtype)
    zeros = torch.zeros(K, dtype=dtype)
    for inverse in (False, True):
        y, log_d = rational_quadratic_spline(x, zeros, zeros, zeros[:-1], BOUND, inverse=inverse)
        assert torch.allclose(y, x, atol=atol, rtol=0)
        assert torch.allclose(log_d, torch.zeros_like(x), atol=atol, rtol=0)


def test_value_and_derivative_are_continuous_at_the_bound():
    """At +-B the spline meets the identity tails with value +-B and slope 1 (boundary derivatives fixed at 1)."""
    w, h, d = _params(3, scale=2.0, seed=5)
    w, h, d = w[:, None], h[:, None], d[:, None]
    for edge in (-BOUND, BOUND):
        inside = -1.0 if edge > 0 else 1.0  # the direction into the interval
        at = torch.full((3, 1), edge, dtype=torch.float64)
        y, log_d = rational_quadratic_spline(at, w, h, d, BOUND)
        assert torch.equal(y, at) and torch.equal(log_d, torch.zeros_like(at))
        assert torch.allclose(_autograd_log_derivative(at, w, h, d), log_d, atol=1e-12)
        gaps = []
        for eps in (1e-5, 1e-8):
            x = at + inside * eps
            y, log_d = rational_quadratic_spline(x, w, h, d, BOUND)
            assert torch.allclose(y, at, atol=2 * eps, rtol=0)  # the value approaches +-B (slope about 1)
            gaps.append(log_d.abs())
        # the log-slope tends to 0 linearly: a thousandth of the step leaves about a thousandth of the gap
        assert bool((gaps[1] <= 2e-3 * gaps[0] + 1e-12).all()), gaps
        assert bool((gaps[1] < 1e-3).all())


def test_spline_broadcasts_parameters():
    w, h, d = _params(1, seed=6)
    x = torch.randn(4, 3, dtype=torch.float64)
    y, log_d = rational_quadratic_spline(x, w[0], h[0], d[0], BOUND)
    y_full, log_d_full = rational_quadratic_spline(
        x, w[0].expand(4, 3, K), h[0].expand(4, 3, K), d[0].expand(4, 3, K - 1), BOUND
    )
    assert y.shape == log_d.shape == (4, 3)
    assert torch.equal(y, y_full) and torch.equal(log_d, log_d_full)


def test_spline_rejects_bad_arguments():
    w, h, d = _params(2)
    with pytest.raises(ValueError, match="at least 2 bins"):
        rational_quadratic_spline(torch.zeros(2), w[:, :1], h[:, :1], d[:, :0], BOUND)
    with pytest.raises(ValueError, match="derivatives K - 1"):
        rational_quadratic_spline(torch.zeros(2), w, h, w, BOUND)
    with pytest.raises(ValueError, match="bound"):
        rational_quadratic_spline(torch.zeros(2), w, h, d, 0.0)
    with pytest.raises(ValueError, match="min_bin_width"):
        rational_quadratic_spline(torch.zeros(2), w, h, d, BOUND, min_bin_width=0.5)
    with pytest.raises(ValueError, match="min_derivative"):
        rational_quadratic_spline(torch.zeros(2), w, h, d, BOUND, min_derivative=1.0)


# ------------------------------------------------------------------------------------------ the coupling layer
def _perturbed(layer, scale=0.3, seed=0):
    torch.manual_seed(seed)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("mask", ["half", "alternate", torch.tensor([False, True, True, False, True])])
def test_coupling_is_identity_at_init_and_keeps_the_conditioning_coordinates(mask):
    t = SplineCoupling(5, mask=mask, hidden=(8,))
    x = 2.0 * torch.randn(7, 5)
    y, log_det = t.forward_and_log_det(x)
    assert torch.allclose(y, x, atol=1e-5, rtol=0)
    assert torch.allclose(log_det, torch.zeros(7), atol=1e-5)
    t = _perturbed(t)
    x = x.double()
    y = t(x)
    assert torch.equal(y[:, t.mask], x[:, t.mask])
    assert not torch.allclose(y[:, ~t.mask], x[:, ~t.mask])


def test_coupling_log_det_matches_the_autograd_jacobian():
    t = _perturbed(SplineCoupling(4, mask="alternate", num_bins=6, bound=2.5, hidden=(16,)))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = 1.5 * torch.randn(4, generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: t.forward_and_log_det(v)[0], x)
        assert torch.allclose(t.forward_and_log_det(x)[1], torch.linalg.slogdet(jac)[1], atol=1e-10)
        y = t.forward_and_log_det(x)[0].detach()
        jac_inv = torch.autograd.functional.jacobian(lambda v: t.inverse_and_log_det(v)[0], y)
        assert torch.allclose(t.inverse_and_log_det(y)[1], torch.linalg.slogdet(jac_inv)[1], atol=1e-10)


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)], ids=str)
def test_coupling_round_trips(batch_shape):
    t = _perturbed(SplineCoupling(3, flip=True, hidden=8))
    x = 2.0 * torch.randn(batch_shape + (3,), dtype=torch.float64)  # some beyond the bound
    y, log_det = t.forward_and_log_det(x)
    x_back, inv_log_det = t.inverse_and_log_det(y)
    assert y.shape == x.shape and log_det.shape == batch_shape
    assert torch.allclose(x_back, x, atol=1e-10, rtol=0)
    assert torch.allclose(inv_log_det, -log_det, atol=1e-10, rtol=0)


def test_coupling_is_the_identity_beyond_the_bound():
    t = _perturbed(SplineCoupling(2, bound=1.0, hidden=(8,)), scale=1.0)
    x = torch.tensor([[0.3, 4.0], [-2.0, -1.5], [0.0, 0.5]], dtype=torch.float64)
    y, log_det = t.forward_and_log_det(x)
    assert torch.equal(y[:2], x[:2]) and torch.equal(log_det[:2], torch.zeros(2, dtype=torch.float64))
    assert y[2, 1] != x[2, 1]


def test_one_dimensional_event_learns_constant_spline_parameters():
    t = SplineCoupling(1, num_bins=4, hidden=(8,))
    assert t.conditioner.in_features == 0 and t.conditioner.out_features == 11
    with torch.no_grad():
        t.conditioner.net.layers[-1].bias.copy_(torch.linspace(-1.0, 1.0, 11))
    x = torch.linspace(-4.0, 4.0, 9)[:, None]
    y = t(x)
    bias = torch.linspace(-1.0, 1.0, 11)
    expected, _ = rational_quadratic_spline(x[:, 0], bias[:4], bias[4:8], bias[8:], 5.0)
    assert torch.allclose(y[:, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="none is transformed"):
        SplineCoupling(1, flip=True)


def test_coupling_repr_names_its_shape():
    text = repr(SplineCoupling((3,), num_bins=4, bound=2.0, hidden=4))
    assert "shape=(3,)" in text and "num_bins=4" in text and "bound=2.0" in text


# ------------------------------------------------------------------------------------------ the builder
def test_spline_flow_layout_and_fixed_permutations():
    flow = spline_flow(4, num_layers=5, hidden=(8,), num_bins=3)
    kinds = [type(p).__name__ for p in flow]
    assert kinds == ["ActNorm", "SplineCoupling"] * 2 + ["Permute"] + ["ActNorm", "SplineCoupling"] * 2 + [
        "Permute"
    ] + ["ActNorm", "SplineCoupling", "Inverse"]
    assert isinstance(flow, Compose) and isinstance(flow[-1], Inverse) and isinstance(flow[-1].base, ActNorm)
    couplings = [p for p in flow if isinstance(p, SplineCoupling)]
    assert [c.mask.tolist() for c in couplings[:2]] == [[True, True, False, False], [False, False, True, True]]
    torch.manual_seed(123)
    again = spline_flow(4, num_layers=5, hidden=(8,), num_bins=3)
    perms = [p.permutation for p in flow if isinstance(p, Permute)]
    assert all(torch.equal(a, b) for a, b in zip(perms, [p.permutation for p in again if isinstance(p, Permute)]))
    assert not any(isinstance(p, Permute) for p in spline_flow(2, num_layers=4, hidden=4))
    one = spline_flow(1, num_layers=2, hidden=4)  # nothing to condition on: no flip
    assert len(one) == 5


def test_spline_flow_guide_fits_a_banana():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.5 * a**2 - 1.0, 0.5))

    guide = AutoNormalizingFlow(model, lambda dim: spline_flow(dim, num_layers=4, hidden=(16,), bound=4.0))
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), elbo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and steady beside other processes
    try:
        # The model is normalised, so the loss is KL(q || p) >= 0; for the fresh (identity) guide it is about 2.3.
        initial = sum(svi.evaluate_loss() for _ in range(20)) / 20
        losses = [svi.step() for _ in range(300)]
    finally:
        torch.set_num_threads(threads)
    assert all(math.isfinite(v) for v in losses)
    final = sum(losses[-50:]) / 50
    assert initial > 1.5 and final < 0.6 and final < initial / 3, (initial, final)


# ------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "build,name",
    [
        (lambda: SplineCoupling(3, num_bins=1), "num_bins"),
        (lambda: SplineCoupling(3, num_bins=2.5), "num_bins"),
        (lambda: SplineCoupling(3, bound=0.0), "bound"),
        (lambda: SplineCoupling(3, bound=-1.0), "bound"),
        (lambda: SplineCoupling(3, bound=float("inf")), "bound"),
        (lambda: SplineCoupling((2, 4, 4)), "shape"),
        (lambda: SplineCoupling((2, None, None)), "shape"),
        (lambda: SplineCoupling(0), "shape"),
        (lambda: SplineCoupling(3, hidden=(0,)), "hidden"),
        (lambda: SplineCoupling(3, mask="checkerboard"), "mask"),
        (lambda: spline_flow(3, num_layers=0), "num_layers"),
        (lambda: spline_flow(3, num_layers=2.0), "num_layers"),
        (lambda: spline_flow((1, 4, 4)), "shape"),
        (lambda: spline_flow(3, num_bins=1), "num_bins"),
        (lambda: spline_flow(3, bound=-2.0), "bound"),
        (lambda: spline_flow(3, hidden=()), "hidden"),
    ],
)
def test_bad_arguments_are_named(build, name):
    with pytest.raises(ValueError, match=name):
        build()
