"""FlowTransform's contract: what it remembers, when it forgets, Compose's single pass, Inverse, validation."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.torch_transform import TransformModule
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim.clipped_adam import ClippedAdam
from torch.distributions import AffineTransform, ExpTransform

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
    assert isinstance(c, FlowTransform) and isinstance(c, torch.nn.Module)
    assert c.domain.event_dim == 1 and len(c) == 2 and isinstance(c[1], ActNorm)
    image = ActNorm((2, None, None))
    assert image.domain.event_dim == 3 and image.event_shape == (2, None, None)
    assert hash(t) != hash(Planar(3))  # TransformModule's identity hash, usable in sets and dicts


def test_compose_indexes_its_parts_plain_torch_transforms_included():
    parts = [Planar(2), ExpTransform(), Planar(2)]
    c = Compose(parts)
    assert len(c) == len(c.parts) == 3
    assert all(c[i] is c.parts[i] is parts[i] for i in range(3)) and list(c) == parts
    assert len(list(c.parameters())) == 2 * len(list(Planar(2).parameters()))
    sub = c[1:]
    assert isinstance(sub, Compose) and sub.parts == tuple(parts[1:])
    x = torch.randn(4, 2)
    y, log_det = c.forward_and_log_det(x)
    h, expected = x, torch.zeros(4)
    for part in parts:
        h_next = part(h)
        expected = expected + torch.distributions.utils._sum_rightmost(
            part.log_abs_det_jacobian(h, h_next), 1 - part.domain.event_dim
        )
        h = h_next
    assert torch.allclose(y, h) and torch.allclose(log_det, expected, atol=1e-6)


def test_sign_of_compositions_and_inverses_follows_torch():
    flip = AffineTransform(0.0, -2.0)
    assert Compose([flip]).sign == -1 and Compose([flip, flip]).sign == 1
    assert pyroflows.inverse(flip).sign == -1 and ActNorm(2).sign == 1
    normal = dist.Normal(0.0, 1.0)
    value = torch.tensor([-1.0, 0.3, 2.0])
    ours = dist.TransformedDistribution(normal, [Compose([flip])]).cdf(value)
    assert torch.allclose(ours, dist.Normal(0.0, 2.0).cdf(value))  # y = -2x ~ N(0, 2²)
    assert torch.allclose(ours, dist.TransformedDistribution(normal, [flip]).cdf(value))
    assert torch.allclose(
        dist.TransformedDistribution(normal, [pyroflows.inverse(flip)]).cdf(value),
        dist.TransformedDistribution(normal, [flip.inv]).cdf(value),
    )
    with pytest.raises(NotImplementedError):  # a multivariate map has no elementwise sign, as in torch
        _ = Compose([Planar(2)]).sign


def test_log_det_is_not_recomputed_for_the_last_pair():
    t = CountingPlanar(3)
    x = torch.randn(4, 3)
    y = t(x)
    t.log_abs_det_jacobian(x, y)
    t.inv(y)
    assert t.calls == {"forward": 1, "inverse": 0}
    t.log_abs_det_jacobian(x.clone(), y)  # not the remembered pair: computed afresh
    assert t.calls["forward"] == 2


def test_memo_forgets_after_in_place_edit_and_mode_switch_and_keeps_the_pair_across_a_step():
    t = CountingPlanar(3)
    x = torch.randn(4, 3)
    y = t(x)
    x.add_(1.0)  # in place: the remembered pair no longer describes x
    t.log_abs_det_jacobian(x, y)
    assert t.calls["forward"] == 2
    y = t(x)
    before = t.log_abs_det_jacobian(x, y)  # the pair just computed: remembered
    assert t.calls["forward"] == 3
    y.sum().backward()
    torch.optim.SGD(t.parameters(), lr=0.1).step()
    # The pair (x, y) was computed by the map before the step: its log-det is the one computed with it.
    assert t.log_abs_det_jacobian(x, y) is before and t.calls["forward"] == 3
    fresh = t.log_abs_det_jacobian(x.clone(), y.clone())  # another pair: the current map
    assert t.calls["forward"] == 4 and not torch.allclose(fresh, before)
    y = t(x)
    t.eval()
    t.log_abs_det_jacobian(x, y)
    assert t.calls["forward"] == 6, "memo survived a switch to eval mode"


def test_with_cache_view_computes_every_forward_call():
    t = Planar(3)
    with torch.no_grad():
        t.u.normal_()
    cached = t.with_cache(1)
    x = torch.randn(4, 3)
    y = cached(x)
    assert cached.inv(y) is x
    with torch.no_grad():
        t.w.add_(0.5)  # the view shares the parameter
    y2 = cached(x)
    assert not torch.allclose(y, y2), "with_cache(1) returned a stale y after a parameter change"
    assert torch.allclose(y2, t(x)) and cached.with_cache(0)._cache_size == 0


def test_importing_pyroflows_installs_no_process_wide_module_hooks():
    from torch.nn.modules import module

    for name in (
        "_global_parameter_registration_hooks",
        "_global_buffer_registration_hooks",
        "_global_module_registration_hooks",
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
    ):
        assert not getattr(module, name), name


def test_forward_calls_always_compute_even_after_data_updates():
    """Pyro's ClippedAdam writes through .data, invisible to version counters: a training loop on a fixed
    batch must still see the current parameters."""
    t = CountingPlanar(3)
    x = torch.randn(4, 3)
    y = t(x)
    t.u.data.add_(1.0)
    y2 = t(x)
    assert t.calls["forward"] == 2 and not torch.allclose(y, y2)


def test_a_sample_keeps_the_log_q_of_the_map_that_drew_it():
    """After an update (here through .data, as Pyro's ClippedAdam writes), log q of a sample drawn before is that
    of the map that drew it; a copy of the sample is evaluated under the current map."""
    flow = pyroflows.planar_flow(2, num_layers=2)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_()
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    with torch.no_grad():
        z = q.rsample((4,))
        before = q.log_prob(z)
        for p in flow.parameters():
            p.data.add_(0.5)
        assert torch.allclose(q.log_prob(z), before, atol=1e-5)
        after = q.log_prob(z.clone())
        flow.clear_memo()
        assert torch.allclose(q.log_prob(z), after, atol=1e-6) and not torch.allclose(after, before, atol=1e-3)


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


def test_a_converted_flow_computes_in_its_new_dtype():
    flow = Compose([CountingPlanar(3), ActNorm(3)])
    x = torch.randn(4, 3)
    flow(x)
    flow.double()
    xd = x.double()
    assert torch.allclose(flow(xd), flow.forward_and_log_det(xd)[0])


def test_inverse_of_an_inverse_is_itself_and_inverses_compare_equal():
    t = Planar(3)
    built = Inverse(t)  # built directly, not through pyroflows.inverse
    assert pyroflows.inverse(pyroflows.inverse(built)) is built
    assert pyroflows.inverse(t) is built and pyroflows.inverse(t) == pyroflows.inverse(t)
    assert pyroflows.inverse(pyroflows.inverse(t)) is t


def test_all_finite_is_exact_even_where_the_sum_overflows():
    from pyroflows.transforms.validation import all_finite

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


def test_value_checks_stay_out_of_a_compiled_graph():
    """Inside torch.compile the layer checks keep their static part (shape, dtype) and leave out the value checks
    (a device sync each, which would split the graph): no graph break, the result equals eager,
    and a wrong shape is still refused while a NaN passes through to the loss (whose check stops the update)."""
    from pyroflows.transforms.validation import check_input, check_output

    layer = Planar(3)

    def checked(x):
        check_input(layer, x, "forward")
        y, log_det = layer.forward_and_log_det(x)
        check_output(layer, x, y, log_det, "forward")
        return y, log_det

    x = torch.randn(5, 3)
    torch._dynamo.reset()  # no frames compiled by earlier tests
    assert torch._dynamo.explain(checked)(x).graph_break_count == 0  # eager checks: one break per value check
    compiled = torch.compile(checked, backend="eager")
    for a, b in zip(compiled(x), checked(x)):
        assert torch.allclose(a, b)
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(compiled(bad)[0][0]).any()
    with pytest.raises(Exception, match=r"event shape \(3,\)"):
        compiled(torch.randn(5, 4))
    with pytest.raises(ValueError, match="non-finite"):
        checked(bad)  # eager: refused at the layer


def test_a_flow_guide_loss_compiles_to_one_graph():
    """Draw and log-density through the remembered pair: one graph under torch.compile (the pair is matched by
    identity there, as torch's transform cache does; comparing version counters split the graph), with the eager
    loss's value. Counted in a fresh interpreter, so that no other test's compiled frames or settings interfere."""
    import subprocess
    import sys

    script = """
import torch, torch._dynamo, pyro.distributions as dist, pyroflows
torch.manual_seed(0)
flow = pyroflows.realnvp(3, num_layers=2, hidden=(8,))
q = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), flow)
q.log_prob(q.rsample((64,)))  # ActNorm's data-dependent initialisation, outside the compiled function

def loss(eps):
    z = flow(eps)
    return (q.log_prob(z) + 0.5 * (z * z).sum(-1)).mean()

eps = torch.randn(64, 3)
eager = loss(eps)
print(torch._dynamo.explain(loss)(eps).graph_break_count, bool(torch.allclose(torch.compile(loss)(eps), eager)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["0", "True"], out.stdout
