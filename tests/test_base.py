"""FlowTransform's contract: what it remembers, when it forgets, Compose's single pass, Inverse, validation."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim.clipped_adam import ClippedAdam

import pyroflows
from pyroflows.transforms import ActNorm, Compose, FlowTransform, Inverse, Planar


class CountingPlanar(Planar):
    """Planar that counts calls to its two methods."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"forward": 0, "inverse": 0}
        with torch.no_grad():
            self.u.normal_()

    def forward_and_log_det(self, x):
        self.calls["forward"] += 1
        return super().forward_and_log_det(x)

    def inverse_and_log_det(self, y):
        self.calls["inverse"] += 1
        return super().inverse_and_log_det(y)


def test_types_and_constraints():
    t = Planar(3)
    assert isinstance(t, TransformModule) and t.bijective
    assert t.domain.event_dim == t.codomain.event_dim == t.event_dim == 1
    c = Compose([Planar(3), ActNorm(3)])
    assert isinstance(c, FlowTransform) and isinstance(c, ComposeTransformModule)
    assert c.domain.event_dim == 1 and len(c) == 2 and isinstance(c[1], ActNorm)
    image = ActNorm(2, event_dim=3)
    assert image.domain.event_dim == 3 and image.event_shape == (2, None, None)
    assert hash(t) != hash(Planar(3))  # TransformModule's identity hash, usable in sets and dicts


def test_log_det_is_not_recomputed_for_the_last_pair():
    t = CountingPlanar(3)
    x = torch.randn(4, 3)
    y = t(x)
    t.log_abs_det_jacobian(x, y)
    t.inv(y)
    assert t.calls == {"forward": 1, "inverse": 0}
    t.log_abs_det_jacobian(x.clone(), y)  # not the remembered pair: computed afresh
    assert t.calls["forward"] == 2


def test_memo_forgets_after_in_place_edit_optimiser_step_and_mode_switch():
    t = CountingPlanar(3)
    x = torch.randn(4, 3)
    y = t(x)
    x.add_(1.0)  # in place: the remembered pair no longer describes x
    t.log_abs_det_jacobian(x, y)
    assert t.calls["forward"] == 2
    y = t(x)
    t.log_abs_det_jacobian(x, y)  # the pair just computed: remembered
    assert t.calls["forward"] == 3
    y.sum().backward()
    torch.optim.SGD(t.parameters(), lr=0.1).step()
    t.log_abs_det_jacobian(x, y)
    assert t.calls["forward"] == 4, "memo survived an optimiser step"
    y = t(x)
    t.eval()
    t.log_abs_det_jacobian(x, y)
    assert t.calls["forward"] == 6, "memo survived a switch to eval mode"


def test_forward_calls_always_compute_even_after_data_updates():
    """Pyro's ClippedAdam writes through .data, invisible to version counters: a training loop on a fixed
    batch must still see the current parameters."""
    t = CountingPlanar(3)
    x = torch.randn(4, 3)
    y = t(x)
    t.u.data.add_(1.0)
    y2 = t(x)
    assert t.calls["forward"] == 2 and not torch.allclose(y, y2)


def test_memo_notices_updates_through_data():
    """A stored sample's log q after an update written through .data (Pyro's ClippedAdam) is recomputed."""
    flow = pyroflows.planar_flow(2, num_layers=2)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_()
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    with torch.no_grad():
        z = q.rsample((4,))
        for p in flow.parameters():
            p.data.add_(0.5)
        assert torch.allclose(q.log_prob(z), q.log_prob(z.clone()), atol=1e-5)


def test_training_on_a_fixed_batch_with_clipped_adam_makes_progress():
    flow = pyroflows.realnvp(2, num_layers=2, hidden=(8,))
    opt = ClippedAdam(flow.parameters(), lr=0.05)  # Pyro's optimiser: updates through .data
    x = torch.randn(64, 2) * 3 + 1
    losses = []
    for _ in range(30):
        z = flow(x)
        loss = (0.5 * z**2).sum(-1).mean() - flow.log_abs_det_jacobian(x, z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05  # a stale forward would give a constant loss (or a backward error)


def test_memo_forgets_across_grad_mode():
    t = CountingPlanar(3)
    x = torch.randn(4, 3)
    with torch.no_grad():
        y = t(x)
    assert not y.requires_grad
    y2 = t(x)  # grad enabled now: must be recomputed with a graph, not served from the no-grad memo
    assert y2.requires_grad


def test_compose_runs_each_part_once_and_sums_log_dets():
    parts = [CountingPlanar(3) for _ in range(3)]
    flow = Compose(parts)
    x = torch.randn(5, 3)
    y = flow(x)
    ld = flow.log_abs_det_jacobian(x, y)
    flow.inv(y)
    assert [p.calls["forward"] for p in parts] == [1, 1, 1]
    assert [p.calls["inverse"] for p in parts] == [0, 0, 0]
    h, expected = x, torch.zeros(5)
    for p in parts:
        h, l = p.forward_and_log_det(h)
        expected = expected + l
    assert torch.allclose(ld, expected, atol=1e-6)


def test_guide_log_q_needs_no_inverse():
    """In an AutoNormalizingFlow guide, log q(z) of a sample comes from the remembered log-det."""
    parts = [CountingPlanar(2) for _ in range(2)]

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoNormalizingFlow(model, lambda dim: Compose(parts))
    guide()
    posterior = guide.get_posterior()
    z = posterior.rsample()
    posterior.log_prob(z)
    assert all(p.calls["inverse"] == 0 for p in parts)


def test_non_finite_output_names_the_layer():
    bad = Planar(2)
    flow = Compose([Planar(2), bad, ActNorm(2)])
    with torch.no_grad():
        bad.b.fill_(float("nan"))
    with pytest.raises(RuntimeError, match=r"Planar \(part 1 of 3 in Compose.forward\)"):
        flow(torch.randn(3, 2))


def test_validation_can_be_turned_off():
    t = Planar(2)
    pyroflows.enable_validation(False)
    assert not pyroflows.is_validation_enabled()
    y = t(torch.full((2,), float("nan")))  # no check: NaN propagates silently when the user asks for speed
    assert torch.isnan(y).all()
    pyroflows.enable_validation(None)
    assert pyroflows.is_validation_enabled() == torch.distributions.Distribution._validate_args


def test_inverse_is_a_module_and_round_trips():
    t = Planar(3)
    inv = pyroflows.inverse(t)
    assert isinstance(inv, Inverse) and isinstance(inv, torch.nn.Module)
    assert pyroflows.inverse(inv) is t
    assert inv.domain is t.codomain or inv.domain.event_dim == t.codomain.event_dim
    ml = torch.nn.ModuleList([inv])  # usable where torch's t.inv is not
    assert len(list(ml.parameters())) == 3


def test_compose_accepts_only_transforms():
    with pytest.raises(TypeError, match="part 1"):
        Compose([Planar(2), torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="cache_size"):
        Planar(2).with_cache(2)


def test_empty_compose_is_identity():
    flow = Compose([])
    x = torch.randn(4, 3)
    assert flow(x) is x or torch.equal(flow(x), x)


def test_memo_notices_replaced_parameters_and_buffers_anywhere_in_the_tree():
    flow = Compose([CountingPlanar(3), ActNorm(3)])
    x = torch.randn(4, 3)
    y = flow(x)
    assert flow.inv(y) is x
    flow[0].u = torch.nn.Parameter(torch.ones(3))  # a part's parameter replaced, not edited in place
    assert flow.inv(y) is not x
    y2 = flow(x)
    flow[1].initialized = torch.tensor(True)  # a buffer replaced by assignment
    assert flow.inv(y2) is not x
    flow.double()
    xd = x.double()
    assert torch.allclose(flow(xd), flow.forward_and_log_det(xd)[0])


def test_a_pyro_densenn_forward_leaves_the_watched_tensors_cached():
    """Pyro's DenseNN slices its ModuleList on every forward, building and filling a fresh container; that must not
    make every FlowTransform rebuild its list of watched tensors once per call."""
    from pyroflows.transforms import base

    flow = pyroflows.realnvp(4, num_layers=2, hidden=(8,))
    x = torch.randn(5, 4)
    flow(x)
    generation = base._GENERATION[0]
    cached = flow.__dict__["_watched_cache"]
    for _ in range(3):
        flow.log_abs_det_jacobian(x, flow(x)).sum().backward()
    assert base._GENERATION[0] == generation
    assert flow.__dict__["_watched_cache"] is cached


def test_containers_inside_a_flow_still_invalidate_the_watched_tensors():
    class Stack(FlowTransform):
        def __init__(self):
            super().__init__(event_dim=1, event_shape=(2,))
            self.shifts = torch.nn.ModuleList()  # filled after it was attached

        def forward_and_log_det(self, x):
            for m in self.shifts:
                x = m(x)
            return x, x.new_zeros(x.shape[:-1])

    t = Stack()
    layer = torch.nn.Linear(2, 2)  # built first: building registers parameters, which alone would invalidate
    x = torch.randn(3, 2)
    y = t(x)
    assert t._recall(y=y) is not None and len(t._watched()) == 0
    t.shifts.append(layer)  # registered in a container that lives in the flow
    assert len(t._watched()) == 2
    y = t(x)
    assert t._recall(y=y) is not None
    t.shifts[0].weight = torch.nn.Parameter(torch.eye(2))  # replaced inside the attached container
    assert t._recall(y=y) is None
    detached = torch.nn.ModuleList([t.shifts[0]])  # a detached container holding flow modules: the flow unchanged
    assert len(detached) == 1 and len(t._watched()) == 2
    compose = Compose([Planar(2)])
    compose.append(Planar(2))  # Compose is a container and a FlowTransform: always watched
    assert len(compose._watched()) == 2 * len(list(Planar(2).parameters()))


def test_a_copied_flow_notices_modules_added_to_its_containers():
    import copy

    flow = Compose([Planar(2)])
    holder = torch.nn.Module()
    holder.flow = flow
    flow.extra = torch.nn.ModuleList()
    for clone in (copy.deepcopy(flow), copy.deepcopy(holder).flow):
        layer = torch.nn.Linear(2, 2)  # built before the watched list (building registers, which would bump)
        n = len(clone._watched())
        clone.extra.append(layer)
        assert len(clone._watched()) == n + 2


def test_all_finite_is_exact_even_where_the_sum_overflows():
    from pyroflows.transforms.base import all_finite

    big = torch.full((8,), 3e38)  # finite elements whose sum is inf
    assert all_finite(big) and all_finite(big.to(torch.bfloat16)) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(5, 4)
        x[3, 2] = bad
        assert not all_finite(x)
    x = torch.zeros(6)
    x[0], x[1] = float("inf"), -float("inf")  # sums to NaN
    assert not all_finite(x)
    w = torch.randn(3, requires_grad=True)
    assert all_finite(w * 2) and w.grad is None
