"""Planar-specific properties: the invertibility constraint, the inverse's accuracy, gradients and failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyroflows.transforms import Planar


def test_identity_at_init():
    t = Planar(4)
    x = torch.randn(6, 4)
    assert torch.equal(t(x), x)
    assert torch.equal(t.log_abs_det_jacobian(x, t(x)), torch.zeros(6))


@pytest.mark.parametrize("seed", range(5))
def test_constraint_holds_for_adversarial_parameters(seed):
    torch.manual_seed(seed)
    t = Planar(3).double()
    with torch.no_grad():
        t.w.normal_(0, 3)
        t.u.copy_(-20 * t.w)  # w·u very negative: unconstrained planar would be non-invertible
    assert float((t.w @ t.u_hat()).detach()) >= -1 + t.margin * 0.999
    x = torch.randn(100, 3, dtype=torch.float64) * 3
    y = t(x)
    assert torch.isfinite(t.log_abs_det_jacobian(x, y)).all()
    assert torch.allclose(t.inv(y.clone()), x, atol=1e-8)


class _InverseOnly(torch.nn.Module):
    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, y):
        return self.t.inverse_and_log_det(y)


def test_inverse_gradients_match_finite_differences():
    """The root is found without a graph; one differentiable Newton step gives implicit-function gradients."""
    torch.manual_seed(0)
    t = Planar(3).double()
    with torch.no_grad():
        t.u.normal_()
        t.b.fill_(0.3)
    wrapper = _InverseOnly(t)

    def inverse(y, u, w, b):
        return torch.func.functional_call(wrapper, {"t.u": u, "t.w": w, "t.b": b}, (y,))

    inputs = (torch.randn(4, 3, dtype=torch.float64),) + tuple(p.detach().clone() for p in (t.u, t.w, t.b))
    inputs = tuple(v.requires_grad_() for v in inputs)
    assert torch.autograd.gradcheck(inverse, inputs, eps=1e-6, atol=1e-6)


def test_inverse_reports_non_convergence():
    torch.manual_seed(0)
    t = Planar(2, max_iter=1).double()
    with torch.no_grad():
        t.w.copy_(torch.tensor([3.0, 0.0]))
        t.u.copy_(torch.tensor([-50.0, 0.0]))  # w·u_hat close to -1: a flat, hard root
    y = torch.linspace(-3, 3, 50, dtype=torch.float64)[:, None] * torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="did not converge.*max residual"):
        t.inv(y)
    t.max_iter = 100
    x = t.inv(y)
    assert torch.allclose(t(x.clone()), y, atol=1e-10)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape must be a positive int"):
        Planar(0)
    with pytest.raises(ValueError, match="works on vectors"):
        Planar((2, 3, 3))
    with pytest.raises(ValueError, match="max_iter"):
        Planar(2, max_iter=-1)


@settings(max_examples=60, deadline=None)
# found by hypothesis: with w·û ≈ 4 plain Newton bounces between the flanks of tanh for 100+ iterations
@example(w=np.full(3, 2.9375), u=np.array([1.5625, 0.0, 0.0]), b=0.0, scale=0.25)
@given(
    w=arrays(np.float64, (3,), elements=st.floats(-4, 4)),
    u=arrays(np.float64, (3,), elements=st.floats(-30, 30)),
    b=st.floats(-5, 5),
    scale=st.floats(0.1, 50),
)
def test_inverse_round_trip_property(w, u, b, scale):
    """For any parameters with w != 0, inverse(forward(x)) recovers x to float64 precision."""
    assume(np.linalg.norm(w) > 1e-2)
    t = Planar(3).double()
    with torch.no_grad():
        t.w.copy_(torch.from_numpy(w)), t.u.copy_(torch.from_numpy(u)), t.b.fill_(b)
    x = scale * torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = t(x)
    assert torch.allclose(t.inv(y.clone()), x, atol=1e-9 * (1 + scale + np.abs(u).sum()), rtol=0)


def test_a_composition_of_planar_layers_inverts_its_own_draws_from_the_remembered_inputs():
    """Inside a Compose each planar layer remembers its pair, so the held-fixed log q of sticking the landing (a copy
    of the draw, inverted with frozen parameters) starts each scalar solve at ``w·x + b`` of the remembered input,
    the root: the same value and draw-gradient as a cold solve, with no Newton iteration. A point that is not the
    remembered output (nor within rounding of it) starts as before."""
    import pyro.distributions as dist
    from conformance import held_fixed_log_q

    from pyroflows.transforms import Compose

    torch.manual_seed(0)
    layers = [Planar(4).double() for _ in range(3)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
    flow = Compose(layers)
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(4, dtype=torch.float64), 1.0).to_event(1), [flow])
    z = q.rsample((6,))

    starts = []
    solve = Planar._solve

    def recording(self, target, c, start=None):
        starts.append(start is not None)
        return solve(self, target, c, start)

    Planar._solve = recording
    try:
        warm = held_fixed_log_q(q, z)
        assert starts == [True, True, True], starts
        for layer in layers:
            layer.clear_memo()
        starts.clear()
        cold = held_fixed_log_q(q, z)
        assert starts == [False, False, False], starts
    finally:
        Planar._solve = solve
    assert torch.allclose(warm[0], q.log_prob(z).detach(), atol=1e-10)
    assert torch.allclose(warm[0], cold[0], atol=1e-10) and torch.allclose(warm[1], cold[1], atol=1e-8)
    layer = layers[0]
    y = layer(torch.randn(6, 4, dtype=torch.float64))
    assert layer._warm_start(y.clone()) is not None and layer._warm_start(y + 1e-3) is None
