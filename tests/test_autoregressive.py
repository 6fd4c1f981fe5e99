"""AffineAutoregressive, its MADE conditioner and the autoregressive_flow builder: the triangular Jacobian, the
sequential inverse (exact and differentiable), MADE's masks, identity at init, a fit as an AutoNormalizingFlow
guide, and argument errors. The generic suites (round trips, log-dets, conformance) run on the registry cases."""

from __future__ import annotations

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.optim import Adam

from pyroflows import autoregressive_flow
from pyroflows.nn import MADE
from pyroflows.transforms import ActNorm, AffineAutoregressive, Compose, Inverse

ORDER5 = [3, 0, 4, 1, 2]


def _perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its (identity) initialisation, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _layer(dim, order=None, hidden=(16, 16), seed=0, **kwargs):
    return _perturb(AffineAutoregressive(dim, hidden=hidden, order=order, **kwargs).double(), seed=seed)


def _randn(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ (a) the Jacobian
@pytest.mark.parametrize("order", [None, ORDER5, [4, 3, 2, 1, 0]], ids=["identity", "mixed", "reversed"])
def test_jacobian_is_triangular_in_the_order_and_log_det_is_slogdet(order):
    t = _layer(5, order=order)
    x = _randn(5)
    jac = torch.autograd.functional.jacobian(lambda v: t.forward_and_log_det(v)[0], x)
    perm = torch.argsort(t.order)  # perm[k]: the coordinate that is k-th in the order
    permuted = jac[perm][:, perm]
    assert torch.equal(permuted, torch.tril(permuted)), "not lower-triangular in the autoregressive order"
    assert (permuted.tril(-1) != 0).any(), "no coordinate depends on another: the test would prove nothing"
    _, log_det = t.forward_and_log_det(x)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign > 0
    assert torch.allclose(log_det, logabsdet, atol=1e-12, rtol=0)
    # the inverse's Jacobian is the inverse matrix, its log-det the negative
    y = t.forward_and_log_det(x)[0].detach()
    inv_jac = torch.autograd.functional.jacobian(lambda v: t.inverse_and_log_det(v)[0], y)
    assert torch.allclose(inv_jac, torch.linalg.inv(jac), atol=1e-10, rtol=0)
    assert torch.allclose(t.inverse_and_log_det(y)[1], -logabsdet, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ (b) round trips
@pytest.mark.parametrize("dim", [1, 2, 5])
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)], ids=str)
def test_round_trips_float64(dim, batch_shape):
    order = ORDER5 if dim == 5 else None
    t = _layer(dim, order=order, seed=dim)
    x = _randn(*batch_shape, dim)
    y, log_det = t.forward_and_log_det(x)
    x_back, inv_log_det = t.inverse_and_log_det(y.clone())
    assert x_back.shape == x.shape and log_det.shape == inv_log_det.shape == batch_shape
    assert torch.allclose(x_back, x, atol=1e-10, rtol=0)
    assert torch.allclose(inv_log_det, -log_det, atol=1e-10, rtol=0)
    y0 = _randn(*batch_shape, dim, seed=2)
    x0, _ = t.inverse_and_log_det(y0)
    assert torch.allclose(t.forward_and_log_det(x0.clone())[0], y0, atol=1e-10, rtol=0)
    # through the torch protocol, with clones so that the remembered pair cannot answer
    assert torch.allclose(t.inv(t(x).clone()), x, atol=1e-10, rtol=0)


def test_builder_round_trip_float64():
    flow = _perturb(autoregressive_flow(4, num_layers=3, hidden=(16,)).double())
    x = _randn(6, 4)
    y = flow(x)
    assert torch.allclose(flow.inv(y.clone()), x, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ (c) identity at init
@pytest.mark.parametrize("dim", [1, 4])
def test_identity_at_init(dim):
    t = AffineAutoregressive(dim, hidden=(8,), order=torch.arange(dim).flip(0))
    x = torch.randn(7, dim)
    y, log_det = t.forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(7))
    x_back, inv_log_det = t.inverse_and_log_det(x)
    assert torch.equal(x_back, x) and torch.equal(inv_log_det, torch.zeros(7))
    flow = autoregressive_flow(dim, num_layers=2, hidden=(8,)).eval()  # eval: no ActNorm data init
    assert torch.allclose(flow(x), x)


# ------------------------------------------------------------------------------------------------ (d) MADE
@pytest.mark.parametrize("order", [None, ORDER5])
@pytest.mark.parametrize("hidden", [(3,), (16, 16), ()], ids=["narrow", "two-layer", "linear"])
def test_made_is_autoregressive(order, hidden):
    net = _perturb(MADE(5, hidden=hidden, num_outputs=3, order=order).double())
    ranks = net.order
    x = _randn(5)
    out = net(x)
    assert out.shape == (3, 5)
    seen = torch.zeros(5, 5, dtype=torch.bool)  # seen[i, j]: an output of coordinate i moved with x_j
    for j in range(5):
        x2 = x.clone()
        x2[j] += 1.5
        changed = (net(x2) != out).any(0)
        seen[:, j] = changed
        for i in range(5):
            if ranks[j] >= ranks[i]:
                assert not changed[i], f"output {i} depends on input {j} (order {ranks[i]} <= {ranks[j]})"
    allowed = ranks[None, :] < ranks[:, None]
    assert not (seen & ~allowed).any()
    assert torch.equal(net.connectivity().bool() & ~allowed, torch.zeros(5, 5, dtype=torch.bool))
    if hidden != (3,):  # wide enough (>= D - 1 units) that every allowed dependency is wired
        assert torch.equal(net.connectivity().bool(), allowed)
        assert torch.equal(seen, allowed)


def test_made_masks_are_deterministic_zero_gradient_and_follow_to():
    torch.manual_seed(0)
    a = MADE(4, hidden=(6, 5), order=[1, 3, 0, 2])
    torch.manual_seed(1)
    b = MADE(4, hidden=(6, 5), order=[1, 3, 0, 2])
    assert all(torch.equal(ma, mb) for ma, mb in zip(a.masks(), b.masks()))
    assert set(a.state_dict()) >= {"order", "mask_0", "mask_1", "mask_2"}
    _perturb(a)
    a(torch.randn(3, 4)).sum().backward()
    for layer, mask in zip(a.layers, a.masks()):
        assert torch.equal(layer.weight.grad * (1 - mask), torch.zeros_like(layer.weight))
    a = a.double()
    assert all(m.dtype == torch.float64 for m in a.masks()) and a.order.dtype == torch.long
    assert torch.equal(MADE(3, hidden=4)(torch.randn(2, 3)), torch.zeros(2, 2, 3))  # zero last layer


def test_made_one_dimension_is_constant():
    net = _perturb(MADE(1, hidden=(8,), activation=torch.nn.ELU()).double())
    out = net(_randn(10, 1))
    assert out.shape == (10, 2, 1)
    assert torch.allclose(out, out[:1].expand_as(out), atol=0, rtol=0)
    assert (out != 0).any()


def test_conditioner_argument_and_order_buffer():
    made = MADE(3, hidden=(8,), order=[2, 1, 0])
    t = AffineAutoregressive(3, conditioner=made)
    assert t.conditioner is made and t.order.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="order"):
        AffineAutoregressive(3, conditioner=made, order=[0, 1, 2])
    fresh = AffineAutoregressive(3, hidden=(8,))
    fresh.load_state_dict(_perturb(AffineAutoregressive(3, hidden=(8,), order=[1, 2, 0])).state_dict())
    assert fresh.order.tolist() == [1, 2, 0] and fresh.conditioner.order.tolist() == [1, 2, 0]
    x = torch.randn(4, 3)
    assert torch.allclose(fresh.inv(fresh(x).clone()), x, atol=1e-5)
    assert "shape=(3,)" in repr(t)


# ------------------------------------------------------------------------------------------------ the builder
def test_builder_layout():
    flow = autoregressive_flow(3, num_layers=3, hidden=5)
    assert isinstance(flow, Compose) and len(flow) == 7
    layers = [p for p in flow if isinstance(p, AffineAutoregressive)]
    assert [p.order.tolist() for p in layers] == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]
    assert all(isinstance(p, ActNorm) for p in flow.parts[0:6:2])
    assert isinstance(flow[-1], Inverse) and isinstance(flow[-1].base, ActNorm)
    assert layers[0].conditioner.hidden == (5,)
    assert autoregressive_flow((20,), num_layers=1)[1].conditioner.hidden == (80, 80)
    assert autoregressive_flow(2, num_layers=1)[1].conditioner.hidden == (64, 64)


def test_a_guide_draw_needs_no_inverse(monkeypatch):
    """IAF direction: a draw and its log-density come from the forward pass (the remembered pair)."""
    flow = _perturb(autoregressive_flow(3, num_layers=2, hidden=(8,)))

    def fail(self, y):
        raise AssertionError("the sequential inverse was computed")

    monkeypatch.setattr(AffineAutoregressive, "inverse_and_log_det", fail)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [flow])
    z = d.rsample((4,))
    assert torch.isfinite(d.log_prob(z)).all()


# ------------------------------------------------------------------------------------------------ (e) SVI
def test_autoregressive_flow_guide_fits_a_correlated_gaussian():
    pyro.set_rng_seed(0)
    loc = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]])

    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, cov))

    guide = AutoNormalizingFlow(model, partial(autoregressive_flow, num_layers=2, hidden=(16,)))
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO(num_particles=8, vectorize_particles=True))
    losses = [svi.step() for _ in range(300)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    with torch.no_grad():
        draws = torch.stack([guide()["z"] for _ in range(1000)])
    # The model is normalised, so the loss estimates KL(q || p) >= 0. Over seeds 0-4 this setting ended with
    # KL 0.01-0.10, a mean off by at most 0.2 per coordinate and a correlation 0.77-0.86; the tolerances below
    # leave room for that spread (the Monte Carlo error of 1000 draws is ~0.03 on the mean).
    assert last < 0.3, f"KL(q || p) estimate {last:.3f}"
    assert torch.allclose(draws.mean(0), loc, atol=0.3), f"guide mean {draws.mean(0).tolist()}"
    assert torch.corrcoef(draws.T)[0, 1] > 0.6, "the guide missed the correlation"


# ------------------------------------------------------------------------------------------------ (f) gradients
def test_gradients_flow_through_the_inverse():
    t = _layer(3, order=[1, 2, 0], hidden=(6,), seed=3)
    y = _randn(2, 3, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(t.inverse_and_log_det, (y,), eps=1e-6, atol=1e-6, rtol=1e-4)
    x, log_det = t.inverse_and_log_det(y)
    (x.sum() + log_det.sum()).backward()
    grads = [p.grad for p in t.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _sequential_inverse(t, y, context=None):
    """The reference: coordinate by coordinate in the order, one MADE pass each, differentiated by autograd through
    all the passes."""
    x = torch.zeros_like(y)
    for k in range(t.dim):
        shift, log_scale = t._shift_and_log_scale(x, context)
        x = torch.where(t.order == k, (y - shift) * torch.exp(-log_scale), x)
    return x, -log_scale.sum(-1)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "context"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("adjoint", ["closed", "iterated", "softplus"])
def test_iterative_inverse_and_implicit_gradient_equal_the_sequential_ones(conditional, frozen, adjoint, monkeypatch):
    """The Jacobi solve with its implicit-function gradient (the path above ``SEQUENTIAL_MAX_DIM``, forced here at
    D = 6) gives the sequential inverse's values and the gradients of a loss of ``(x, log_det)`` in ``y``, the
    context and (unless frozen, as STL holds them) every parameter, in float64, for a strongly coupled layer
    (weights far from init: the solve needs all D passes) and a weakly coupled one (it settles early); with the
    adjoint system solved through the MADE's closed-form Jacobian, by iterated vector-Jacobian products (the cost
    limit at 0), and for an activation without a closed-form slope (which iterates)."""
    from pyroflows.transforms import autoregressive

    monkeypatch.setattr(AffineAutoregressive, "SEQUENTIAL_MAX_DIM", 0)
    monkeypatch.setattr(AffineAutoregressive, "SEQUENTIAL_MAX_DIM_ITERATED", 0)
    if adjoint == "iterated":
        monkeypatch.setattr(AffineAutoregressive, "CLOSED_FORM_GRADIENT_MAX_MACS", 0)
    closed = []
    for function, is_closed in (
        (autoregressive._ImplicitAdjoint, True),
        (autoregressive._AutoregressiveInverse, False),
    ):
        apply = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, apply=apply, c=is_closed: (closed.append(c), apply(*a))[1])
    for scale, settles_early in ((0.5, False), (1e-4, True)):
        kwargs = {"context_dim": 2} if conditional else {}
        if adjoint == "softplus":
            kwargs["conditioner"] = MADE(
                6,
                (16,),
                order=[2, 5, 0, 3, 1, 4],
                activation=torch.nn.Softplus(),
                context_dim=kwargs.get("context_dim", 0),
            )
        t = _perturb(AffineAutoregressive(6, hidden=(16,), order=[2, 5, 0, 3, 1, 4], **kwargs).double(), scale)
        y = _randn(4, 6, seed=5).requires_grad_(True)
        c = _randn(4, 2, seed=6).requires_grad_(True) if conditional else None
        passes = t._solve(y.detach(), c)[2]
        assert (passes < 6) == settles_early, passes
        w = _randn(4, 6, seed=7)
        inputs = [y] + ([c] if conditional else []) + ([] if frozen else list(t.parameters()))

        def loss(inverse, y=y, c=c, w=w):
            x, log_det = inverse(y, c) if conditional else inverse(y)
            return (x * w).sum() + (log_det * torch.arange(1.0, 5.0, dtype=torch.float64)).sum(), x, log_det

        for p in t.parameters():
            p.requires_grad_(not frozen)
        new, x, log_det = loss(t.inverse_and_log_det)
        for p in t.parameters():
            p.requires_grad_(True)  # as fixed_log_prob leaves them before the backward runs
        ref, x_ref, log_det_ref = loss(partial(_sequential_inverse, t))
        assert torch.allclose(x, x_ref, atol=1e-12, rtol=0) and torch.allclose(log_det, log_det_ref, atol=1e-12)
        got = torch.autograd.grad(new, inputs)
        want = torch.autograd.grad(ref, inputs)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-8), (a - b).abs().max()
        if frozen:
            assert all(p.grad is None for p in t.parameters())
    assert closed and all(c == (adjoint == "closed") for c in closed), closed


@pytest.mark.parametrize("activation", [None, torch.nn.Softplus()], ids=["relu", "softplus"])
def test_differentiable_inverse_takes_the_implicit_gradient_above_its_size_limit(activation, monkeypatch):
    """At D = 6 a differentiable inverse goes through the Jacobi solve and its implicit gradient when the adjoint
    has a closed form (above ``SEQUENTIAL_MAX_DIM``), and through the plain solve under autograd when it would be
    iterated (up to ``SEQUENTIAL_MAX_DIM_ITERATED``); both give the sequential inverse."""
    from pyroflows.transforms import autoregressive

    made = MADE(6, (8,), order=[2, 5, 0, 3, 1, 4], activation=activation)
    t = _perturb(AffineAutoregressive(6, order=[2, 5, 0, 3, 1, 4], conditioner=made).double(), 0.4)
    calls = []
    for function in (autoregressive._ImplicitAdjoint, autoregressive._AutoregressiveInverse):
        apply = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, apply=apply: (calls.append(1), apply(*a))[1])
    y = _randn(4, 6, seed=3).requires_grad_(True)
    x, log_det = t.inverse_and_log_det(y)
    assert len(calls) == (1 if activation is None else 0)
    x_ref, log_det_ref = _sequential_inverse(t, y)
    assert torch.allclose(x, x_ref, atol=1e-12) and torch.allclose(log_det, log_det_ref, atol=1e-12)


@pytest.mark.parametrize("activation", ["default", "relu", "elu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("hidden", [(), (7,), (9, 5)], ids=["linear", "one", "two"])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_made_closed_form_jacobian_equals_autograd(activation, hidden, context_dim):
    """MADE's closed-form input Jacobian equals ``jacrev``'s in float64 (and the outputs are the forward's bits),
    for every activation it knows, with and without hidden layers and a context; it is zero outside the order's
    connectivity; an activation of unknown slope gives ``None``. (The default is a ReLU in place.)"""
    acts = {
        "default": None,
        "relu": torch.nn.ReLU(),
        "elu": torch.nn.ELU(0.7),
        "leaky_relu": torch.nn.LeakyReLU(0.2),
        "tanh": torch.nn.Tanh(),
    }
    net = _perturb(MADE(5, hidden, order=ORDER5, activation=acts[activation], context_dim=context_dim).double(), 0.7)
    x, c = _randn(3, 4, 5, seed=3), (_randn(3, 4, context_dim, seed=4) if context_dim else None)
    out, jac = net.value_and_input_jacobian(x, c)
    assert torch.equal(out, net(x, c)) and jac.shape == (3, 4, 2, 5, 5)
    auto = torch.autograd.functional.jacobian(lambda v: net(v, c).sum((0, 1)), x).permute(2, 3, 0, 1, 4)
    assert torch.allclose(jac, auto, atol=1e-12, rtol=0)
    assert not jac[..., net.connectivity() == 0].any()
    assert MADE(5, (4,), activation=torch.nn.Softplus()).value_and_input_jacobian(x.float()) is None


def test_iterative_inverse_starts_from_the_remembered_pair():
    """Inverting a copy of the layer's own last output (what STL does with a draw) starts from the remembered input and
    settles after one pass; a stale or ill-shaped remembered pair only costs passes: the solution is the same."""
    order = [3, 1, 0, 2, 11, 7, 5, 9, 4, 10, 6, 8]
    t = _perturb(AffineAutoregressive(12, hidden=(8,), order=order).double(), 0.4, seed=2)
    x = _randn(5, 12, seed=10)
    y = t(x)
    assert t._solve(y.clone(), None)[2] == 1
    assert torch.allclose(t._solve(y.clone(), None)[0], x, atol=1e-12)
    other = _randn(5, 12, seed=11)
    assert torch.allclose(t._solve(other, None)[0], _sequential_inverse(t, other)[0], atol=1e-12)  # stale pair
    t(_randn(3, 12, seed=12))  # a pair of another batch shape: the solve starts from zeros
    assert torch.allclose(t._solve(y, None)[0], x, atol=1e-12)
    t.clear_memo()
    assert t._solve(y.clone(), None)[2] > 1


def test_a_composition_remembers_its_autoregressive_parts_so_sticking_the_landing_inverts_in_one_pass():
    """Inside a Compose (every builder's flow) an autoregressive part remembers its pair on each forward pass, as a
    call of the part would: the held-fixed log q of sticking the landing (a copy of the draw, inverted with the
    parameters frozen) then takes one Jacobi pass per layer instead of the dependence chain's length, and gives the
    same value and the same gradient in the draw as a cold start. Other parts keep no reference to intermediates."""
    from conformance import held_fixed_log_q

    order = [3, 1, 0, 2, 11, 7, 5, 9, 4, 10, 6, 8]
    layers = [
        _perturb(AffineAutoregressive(12, hidden=(8,), order=o).double(), 0.4, seed=i)
        for i, o in enumerate([order, order[::-1]])
    ]
    flow = Compose([layers[0], ActNorm(12).double(), layers[1]])
    base = dist.Normal(torch.zeros(12, dtype=torch.float64), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    z = q.rsample((5,))
    assert flow.parts[1]._memo is None  # not an iterative inverse: nothing remembered inside the composition

    warm = held_fixed_log_q(q, z)
    passes = [layer.last_inverse_iterations for layer in layers]
    assert passes == [1, 1], passes
    for layer in layers:
        layer.clear_memo()
    cold = held_fixed_log_q(q, z)
    passes = [layer.last_inverse_iterations for layer in layers]
    assert min(passes) > 1, passes
    assert torch.allclose(warm[0], q.log_prob(z).detach(), atol=1e-10)
    assert torch.allclose(warm[0], cold[0], atol=1e-10) and torch.allclose(warm[1], cold[1], atol=1e-8)


def test_iterative_inverse_under_no_grad_and_its_gradcheck_with_a_context():
    """Without a graph the solve runs alone (sampling a MAF), its log-det that of the recovered point; gradcheck passes
    through the implicit backward in ``y`` and the context together (D = 12, above ``SEQUENTIAL_MAX_DIM``)."""
    assert AffineAutoregressive.SEQUENTIAL_MAX_DIM < 12
    order = [3, 1, 0, 2, 11, 7, 5, 9, 4, 10, 6, 8]
    t = _perturb(AffineAutoregressive(12, hidden=(8,), order=order, context_dim=3).double(), 0.4, seed=2)
    y, c = _randn(3, 12, seed=8).requires_grad_(True), _randn(3, 3, seed=9).requires_grad_(True)
    with torch.no_grad():
        x, log_det = t.inverse_and_log_det(y, c)
        y_back, forward_log_det = t.forward_and_log_det(x, c)
    assert x.grad_fn is None and torch.allclose(y_back, y, atol=1e-12)
    assert torch.allclose(log_det, -forward_log_det, atol=1e-12)
    assert torch.allclose(x, _sequential_inverse(t, y, c)[0], atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: t.inverse_and_log_det(a, b), (y, c), eps=1e-6, atol=1e-6)
    # a second derivative through the solve is refused by name, not silently wrong
    (grad,) = torch.autograd.grad(t.inverse_and_log_det(y, c)[0].square().sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


# ------------------------------------------------------------------------------------------------ (g) bad arguments
@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: AffineAutoregressive((2, 4, 4)), "shape"),
        (lambda: AffineAutoregressive((2, None, None)), "shape"),
        (lambda: AffineAutoregressive(0), "shape"),
        (lambda: AffineAutoregressive(3, scale_bound=0.0), "scale_bound"),
        (lambda: AffineAutoregressive(3, scale_bound=-1.0), "scale_bound"),
        (lambda: AffineAutoregressive(3, order=[0, 0, 1]), "order"),
        (lambda: AffineAutoregressive(3, order=[1, 2, 3]), "order"),
        (lambda: AffineAutoregressive(3, order=[0, 1]), "order"),
        (lambda: AffineAutoregressive(3, order=[0.0, 1.0, 2.0]), "order"),
        (lambda: AffineAutoregressive(3, hidden=(0,)), "hidden"),
        (lambda: MADE(3, order=[2, 2, 0]), "order"),
        (lambda: MADE(0), "dim"),
        (lambda: MADE(3, num_outputs=0), "num_outputs"),
        (lambda: autoregressive_flow((1, 4, 4)), "shape"),
        (lambda: autoregressive_flow(3, num_layers=0), "num_layers"),
        (lambda: autoregressive_flow(3, num_layers=2.0), "num_layers"),
        (lambda: autoregressive_flow(3, scale_bound=0.0), "scale_bound"),
        (lambda: autoregressive_flow(3, hidden=()), "hidden"),
    ],
)
def test_bad_arguments_are_named(make, name):
    with pytest.raises(ValueError, match=name):
        make()
