"""HeavyTails: its tails are the documented power laws, it is the identity in the limit, it stays finite in float32
over the base's range, and a guide with it learns its tail weights from the posterior (the generic suite checks the
inverse, the log-det against autograd and the normalisation through the registry's ``heavy_tails`` cases)."""

from __future__ import annotations

import math
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows import AutoFlow
from pyroflows.infer import fit
from pyroflows.transforms import HeavyTails


def _with_weights(right: float, left: float, dim: int = 1, dtype=torch.float64) -> HeavyTails:
    t = HeavyTails(dim, init=0.1, max_weight=0.5).to(dtype)
    with torch.no_grad():
        for row, h in enumerate((right, left)):
            p = h / t.max_weight
            t.raw[row] = math.log(p / (1 - p))
    return t


@pytest.mark.parametrize("h", [0.1, 0.25, 0.45])
def test_tails_are_power_laws_of_index_one_over_h(h):
    """P(y > t) = P(x > x(t)) exactly (the map is increasing), and its log-log slope tends to -1/h: for N(0, 1)
    input the output's tail is a Student-t's with 1/h degrees of freedom. The other side keeps its own weight."""
    t = _with_weights(h, 0.05)
    ys = torch.tensor([1e3, 1e6, 1e12], dtype=torch.float64)
    with torch.no_grad():
        x = t.inv(ys.unsqueeze(-1)).squeeze(-1)
    log_surv = torch.special.log_ndtr(-x)
    slopes = (log_surv[1:] - log_surv[:-1]) / (ys[1:].log() - ys[:-1].log())
    assert slopes[-1].item() == pytest.approx(-1 / h, rel=0.03)
    assert abs(slopes[-1] + 1 / h) < abs(slopes[0] + 1 / h)  # converging
    with torch.no_grad():
        left = t.inv(torch.tensor([[-1e12]], dtype=torch.float64))
    assert left.item() == pytest.approx(-math.sqrt(math.log1p(0.05 * 1e24) / 0.05), rel=1e-12)


def test_empirical_tail_matches_the_closed_form():
    """Draws of y = T(x), x ~ N(0, 1): the fraction beyond each threshold agrees with Φ(-T⁻¹(t)) within 4 standard
    errors (200,000 draws)."""
    gen = torch.Generator().manual_seed(0)
    t = _with_weights(0.3, 0.15)
    with torch.no_grad():
        y = t(torch.randn(200_000, 1, generator=gen, dtype=torch.float64)).squeeze(-1)
        for thr in (2.0, 5.0, 20.0, -2.0, -5.0):
            x = t.inv(torch.tensor([[thr]], dtype=torch.float64)).item()
            p = 0.5 * math.erfc(abs(x) / math.sqrt(2))
            frac = float((y > thr).double().mean() if thr > 0 else (y < thr).double().mean())
            assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / y.numel()), (thr, frac, p)


def test_small_weights_are_the_identity_to_first_order():
    """y = x + h x³/4 + 5h²x⁵/96 + ..., and the log-det 3h x²/4 - h²x⁴/48 + ... (|x| <= 4: the second-order terms
    are at most 53 h² and 5.3 h²)."""
    x = torch.linspace(-4, 4, 41, dtype=torch.float64).unsqueeze(-1)
    for h in (1e-3, 1e-5):
        t = _with_weights(h, h)
        with torch.no_grad():
            y, ld = t.forward_and_log_det(x)
        assert (y - x - h * x**3 / 4).abs().max() < 60 * h**2
        assert (ld - 3 * h * x.squeeze(-1) ** 2 / 4).abs().max() < 6 * h**2


def test_float32_stays_finite_over_the_base_range():
    """At the largest weight, float32 values, log-dets and gradients are finite for |x| up to 18 (base draws never
    reach it), and the inverse of values up to float32's largest finite number is finite."""
    t = HeavyTails(1, init=0.4999, max_weight=0.5)
    x = torch.linspace(-18, 18, 721).unsqueeze(-1).requires_grad_(True)
    y, ld = t.forward_and_log_det(x)
    (y.sum() + ld.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(ld).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(t.raw.grad).all()
    big = torch.tensor([[3e38], [-3e38], [1e-30], [0.0]])
    xb, ldb = t.inverse_and_log_det(big)
    assert torch.isfinite(xb).all() and torch.isfinite(ldb).all() and xb[3].item() == 0.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"HeavyTails: max_weight must be a finite number in \(0.0, "):
        HeavyTails(2, max_weight=1.5)
    with pytest.raises(ValueError, match=r"HeavyTails: init must be a finite number in \(0.0, 0.2\), got 0.2"):
        HeavyTails(2, init=0.2)
    with pytest.raises(ValueError, match="HeavyTails: works on vectors"):
        HeavyTails((1, 2, 2))
    t = HeavyTails(3)
    with pytest.raises(ValueError, match="HeavyTails"):
        t(torch.zeros(4, 2))  # wrong event size, named by the layer's input check


def _student_model():
    pyro.sample("z", dist.StudentT(2.5, torch.zeros(2), torch.ones(2)).to_event(1))


def _gaussian_model():
    pyro.sample("z", dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1))


@pytest.mark.parametrize("model, low, high", [(_student_model, 0.1, 0.2), (_gaussian_model, 0.0, 0.015)])
def test_a_guide_learns_the_posteriors_tail_weights(model, low, high):
    """AutoFlow(heavy_tails=True) moves every tail weight from 0.02 towards the posterior's: up on a Student-t with
    2.5 degrees of freedom (weight 0.4, beyond the default cap 0.2), down on a standard normal (weight 0). One seed,
    600 steps at lr 0.02; seen at seeds 0 and 1: 0.14-0.17, and 0.007-0.012."""
    pyro.clear_param_store()
    guide = AutoFlow(model, partial(pyroflows.realnvp, num_layers=2, hidden=(16,)), heavy_tails=True)
    fit(model, guide, 600, lr=0.02, progress=False, report=False, seed=0)
    weights = guide.transform.parts[0].tail_weights()
    assert ((weights > low) & (weights < high)).all(), weights
