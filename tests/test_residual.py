"""Residual flows: the Lipschitz bound, estimator statistics, Neumann gradients, the two backward paths,
and the fixed-point inverse. Statistical checks fix their seeds and state tolerances in standard errors."""

from __future__ import annotations

import copy
import math

import pyro
import pytest
import torch
from pyro.optim.clipped_adam import ClippedAdam

import pyroflows
from pyroflows.logdet import exact_log_det, roulette_coefficients
from pyroflows.nn import LearnableNorm, LipSwish, SpectralConv2d, SpectralLinear, lipschitz_mlp
from pyroflows.transforms import ResidualBlock


def _block(dim=4, coeff=0.9, seed=0, linear=False, **kwargs):
    """A perturbed block; ``linear=True`` makes g a single spectral-normalised linear map, whose Jacobian
    norm sits at the bound, so that the higher-order series terms matter."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(SpectralLinear(dim, dim, coeff)) if linear else None
    block = ResidualBlock(dim, hidden=(16, 16), coeff=coeff, net=net, **kwargs).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_((3.0 if linear else 0.5) * torch.randn_like(p))
    return block


def _exact(block, x):
    """The exact log-det of the block's current function (normalisation brought up to date first)."""
    mode = block.logdet
    block.logdet = "exact"
    try:
        return block.forward_and_log_det(x)[1]
    finally:
        block.logdet = mode


def _max_jacobian_norm(net, x):
    with torch.no_grad():
        net(x)  # bring the normalisation up to date, then differentiate the frozen function
    with pyroflows.nn.frozen_power_iteration():
        jac = torch.func.vmap(torch.func.jacrev(net))(x)
    return float(torch.linalg.matrix_norm(jac.reshape(x.shape[0], x[0].numel(), -1), 2).max().detach())


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("optimiser", ["torch", "pyro_clipped_adam"])
def test_lipschitz_bound_holds_also_after_optimiser_steps(train, optimiser):
    """No user call keeps the bound; also under Pyro's ClippedAdam, which writes through .data."""
    block = _block(coeff=0.9)
    optimiser_class = torch.optim.Adam if optimiser == "torch" else ClippedAdam
    step = optimiser_class(block.parameters(), lr=0.05).step
    x = torch.randn(64, 4, dtype=torch.float64)
    for _ in range(30):  # push the weights up: the loss rewards a large residual branch
        loss = -(block.net(x) ** 2).sum()
        block.zero_grad()
        loss.backward()
        step()
        block.train(train)
        assert _max_jacobian_norm(block.net, 3 * torch.randn(32, 4, dtype=torch.float64)) <= 0.9 * (1 + 1e-3)
        block.train()


def test_induced_mixed_norms_and_learnable_orders():
    torch.manual_seed(0)
    layer = SpectralLinear(5, 7, coeff=0.9, domain=1.5, codomain=3.0).double().eval()
    with torch.no_grad():
        layer.weight.mul_(5)
    w = layer.normalized_weight().detach()
    xs = torch.randn(200000, 5, dtype=torch.float64)
    xs = xs / xs.abs().pow(1.5).sum(-1, keepdim=True).pow(1 / 1.5)  # unit vectors of the 1.5-norm
    brute = float((xs @ w.T).abs().pow(3).sum(-1).pow(1 / 3).max())
    assert brute <= 0.9 * (1 + 1e-4) and brute >= 0.85  # the p->q bound holds and is nearly attained
    block = ResidualBlock(3, hidden=(16, 16), coeff=0.9, learn_p=True).double()
    orders = [m for m in block.modules() if isinstance(m, LearnableNorm)]
    assert len(orders) == 2
    start = [float(m().detach()) for m in orders]
    opt = torch.optim.Adam(block.parameters(), lr=0.05)
    x = torch.randn(64, 3, dtype=torch.float64)
    for _ in range(20):
        loss = -(block.net(x) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(abs(float(m().detach()) - s0) > 0.05 for m, s0 in zip(orders, start)), "orders did not learn"
    assert _max_jacobian_norm(block.net, 3 * torch.randn(32, 3, dtype=torch.float64)) <= 0.9 * (1 + 1e-3)


def test_spectral_norm_shortcut_equals_the_general_power_method(monkeypatch):
    """The 2-norm layers (the default) iterate with plain normalisations; the general p -> q method, which the
    shortcut replaces, gives the same normalised weight (float64, 1e-10) and the same vectors (1e-6)."""
    from pyroflows.nn import SpectralLinear

    def run(shortcut):
        if not shortcut:
            monkeypatch.setattr(SpectralLinear, "_spectral", property(lambda self: False))
        torch.manual_seed(0)
        layer = SpectralLinear(6, 9, coeff=0.9).double()
        with torch.no_grad():
            layer.weight.mul_(4)
        outs = [layer.normalized_weight()]
        layer.eval()
        outs.append(layer.normalized_weight())  # eval: iterated to convergence
        monkeypatch.undo()
        return outs, layer.u, layer.v, layer.sigma

    fast, general = run(True), run(False)
    for a, b in zip(fast[0], general[0]):  # the normalised weights, training and eval
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    for a, b in zip(fast[1:], general[1:]):  # u, v (rounding moves their unconverged directions a little), sigma
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    w = fast[0][1].detach()
    assert abs(float(torch.linalg.matrix_norm(w, 2)) - 0.9) < 1e-6


def test_conv_bound_is_on_the_true_operator():
    torch.manual_seed(0)
    conv = SpectralConv2d(2, 3, 3, coeff=0.8).double().eval()
    with torch.no_grad():
        conv.weight.mul_(10)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    conv(x)
    weight = conv.normalized_weight().detach()
    jac = torch.autograd.functional.jacobian(
        lambda v: torch.nn.functional.conv2d(v.reshape(1, 2, 5, 5), weight, padding=1).reshape(-1), x.reshape(-1)
    )
    assert float(torch.linalg.matrix_norm(jac, 2)) == pytest.approx(0.8, rel=1e-4)


def test_conv_eval_convergence_is_the_generic_loop_with_each_convolution_once():
    """SpectralConv2d's eval-mode convergence (W v reused as the next u and as the estimate) takes the very steps of
    the generic loop (iterate once, re-estimate): the same vectors, iterations and norm, in float64."""
    from pyroflows.nn.lipschitz import _PowerIteration

    torch.manual_seed(0)
    conv = SpectralConv2d(3, 4, 3, coeff=0.9, max_eval_iterations=40).double()
    conv(torch.randn(1, 3, 6, 6, dtype=torch.float64))  # vectors for 6x6
    with torch.no_grad():
        conv.weight.add_(0.3 * torch.randn_like(conv.weight))  # the training vectors are now stale
    twin = copy.deepcopy(conv)
    calls = {"fused": 0, "generic": 0}
    for layer, name, converge in (
        (conv, "fused", conv._converge),
        (twin, "generic", lambda: _PowerIteration._converge(twin)),
    ):
        original = layer._converged

        def counting(previous, current, original=original, name=name):
            calls[name] += 1
            return original(previous, current)

        layer._converged = counting
        converge()
    assert calls["fused"] == calls["generic"] > 1
    torch.testing.assert_close(conv.v, twin.v, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.u, twin.u, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv._sigma(), twin._sigma(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("train", [True, False])
def test_an_image_block_is_one_function_at_every_size_between_two_steps(train):
    """The spectral-norm vectors are kept per spatial size: a call at another size does not change the function
    at the first one, and an earlier output still inverts (in training, between two optimiser steps)."""
    torch.manual_seed(0)
    block = ResidualBlock((2, None, None), hidden=4, coeff=0.9, logdet="exact").double().train(train)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = block(x).detach()
    for size in (6, 5, 4, 6):
        block(torch.randn(2, 2, size, size, dtype=torch.float64))
    torch.testing.assert_close(block(x).detach(), y, rtol=0, atol=0)
    torch.testing.assert_close(block.inv(y.clone()).detach(), x, rtol=0, atol=1e-10)
    block.float()  # .to() converts the vectors of every size (a float64 one left behind would fail in conv2d)
    y32 = block(x.float()).detach()
    block(torch.randn(2, 2, 6, 6))
    torch.testing.assert_close(block(x.float()).detach(), y32, rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False])
def test_frozen_power_iteration_freezes_a_residual_block(train):
    torch.manual_seed(0)
    for block in (ResidualBlock(3, hidden=(8,), coeff=0.9), ResidualBlock((2, 4, 4), hidden=4, coeff=0.9)):
        block.train(train)
        x = torch.randn((2,) + tuple(block.event_shape))
        block(x)
        with torch.no_grad():
            for p in block.parameters():
                p.mul_(1.5)
        buffers = {k: v.clone() for k, v in block.named_buffers()}
        with pyroflows.nn.frozen_power_iteration():
            block(x)
            block.inv(torch.randn_like(x))
        for k, v in block.named_buffers():  # (a never-trained layer's fingerprint is NaN: equal_nan)
            torch.testing.assert_close(v, buffers[k], rtol=0, atol=0, equal_nan=True, msg=f"{k} moved while frozen")
        block(x)  # outside the context the weight change is seen
        assert any(not torch.equal(buffers[k], v) for k, v in block.named_buffers() if k.endswith((".u", ".v")))


def _lipswish_reference(x, raw_beta):
    return x * torch.sigmoid(torch.nn.functional.softplus(raw_beta) * x) / 1.1


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward-AD setup
def test_lipswish_derivatives_first_second_forward_and_batched():
    """LipSwish's own backward (its derivative computed once per forward) against autograd of the plain formula,
    float64: repeated vector-Jacobian products through one graph, in x alone, then in beta too (the kept
    derivative must gain the beta part), gradcheck and gradgradcheck (create_graph recomputes), forward-mode AD
    and torch.func's vmap of jacrev (exact_log_det's batched route). The module uses it only within
    input_gradients_only, where its slope gets no gradient."""
    from pyroflows.nn import input_gradients_only
    from pyroflows.nn.lipschitz import _LipSwishFunction

    torch.manual_seed(0)
    act = LipSwish(1.3).double()
    raw = act.raw_beta
    fn = _LipSwishFunction.apply
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y, y_ref = fn(x, raw), _lipswish_reference(x, raw)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-15)
    for wrt in [(x,), (x,), (x, raw), (raw,), (x, raw)]:
        v = torch.randn_like(y)
        got = torch.autograd.grad(y, wrt, v, retain_graph=True)
        want = torch.autograd.grad(y_ref, wrt, v, retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (x, raw)) and torch.autograd.gradgradcheck(fn, (x, raw))
    forward_only = dict(check_backward_ad=False, check_undefined_grad=False, check_batched_grad=False)
    assert torch.autograd.gradcheck(fn, (x.detach().requires_grad_(), raw), check_forward_ad=True, **forward_only)
    rows = x.detach()[:3]
    got = torch.func.vmap(torch.func.jacrev(lambda r: fn(r, raw)))(rows)
    want = torch.func.vmap(torch.func.jacrev(lambda r: _lipswish_reference(r, raw)))(rows)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(lambda r: fn(r, raw))(rows[0]), want[0], rtol=1e-12, atol=1e-12)
    with input_gradients_only():
        y = act(x)
    assert isinstance(y.grad_fn, _LipSwishFunction._backward_cls)
    v = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, v)[0], torch.autograd.grad(y_ref, x, v)[0])
    assert torch.autograd.grad(act(x).sum(), raw)[0] != 0  # outside the context the slope trains


def test_a_residual_block_log_det_is_unchanged_by_lipswish_s_backward():
    """The same draws give the same eval-mode estimate (and training gradient) with LipSwish's own backward as
    with autograd of the plain formula (float64, an image block, the unbiased series)."""
    prototype = ResidualBlock((2, 5, 5), hidden=8, logdet="unbiased", eval_logdet="unbiased").double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    out = {}
    for name, plain in (("own", False), ("plain", True)):
        block = copy.deepcopy(prototype)
        original = LipSwish.forward
        if plain:
            LipSwish.forward = lambda self, h: _lipswish_reference(h, self.raw_beta)
        try:
            block.eval()
            torch.manual_seed(1)
            _, eval_ld = block.forward_and_log_det(x)
            block.train()
            block.zero_grad()
            torch.manual_seed(2)
            _, ld = block.forward_and_log_det(x)
            ld.sum().backward()
            out[name] = (eval_ld, [p.grad.clone() for p in block.parameters() if p.grad is not None])
        finally:
            LipSwish.forward = original
    torch.testing.assert_close(out["own"][0], out["plain"][0], rtol=1e-12, atol=1e-12)
    assert len(out["own"][1]) == len(out["plain"][1]) > 0
    for a, b in zip(out["own"][1], out["plain"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_coefficient_of_one_or_more_is_rejected():
    for make in (
        lambda: ResidualBlock(2, coeff=1.0),
        lambda: SpectralLinear(2, 2, coeff=1.2),
        lambda: lipschitz_mlp(2, coeff=1),
    ):
        with pytest.raises(ValueError, match="coeff must lie in"):
            make()


def test_unbiased_estimator_matches_the_exact_log_det_in_mean():
    block = _block(dim=3, linear=True, logdet="unbiased", n_exact_terms=1, geom_p=0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    exact = _exact(block, x).detach()
    pyro.set_rng_seed(1)
    with torch.no_grad():
        draws = torch.stack([block.forward_and_log_det(x)[1] for _ in range(3000)])
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    assert torch.all((mean - exact).abs() <= 4 * se), (mean, exact, se)


def test_poisson_roulette_and_rademacher_probes_are_unbiased_too():
    block = _block(dim=3, linear=True, logdet="unbiased", roulette="poisson", poisson_lam=1.5, probe="rademacher")
    x = torch.randn(2, 3, dtype=torch.float64)
    exact = _exact(block, x).detach()
    pyro.set_rng_seed(2)
    with torch.no_grad():
        draws = torch.stack([block.forward_and_log_det(x)[1] for _ in range(3000)])
    assert torch.all((draws.mean(0) - exact).abs() <= 4 * draws.std(0) / 3000**0.5)


def test_series_bias_shrinks_with_more_terms():
    """With g linear, v^T J^k v has expectation tr(J^k) exactly: the bias is the truncated tail of the series."""
    block = _block(dim=3, coeff=0.95, linear=True)
    with torch.no_grad():  # J = W close to -0.6 I: the one-term series misses ~30% of the log-det
        block.net[0].weight.copy_(-0.6 * torch.eye(3) + 0.05 * torch.randn(3, 3, dtype=torch.float64))
    x = torch.randn(8, 3, dtype=torch.float64)
    exact = _exact(block, x).detach()
    biases = []
    for n_terms in (1, 2, 4, 8, 16):
        block.logdet, block.n_terms = "series", n_terms
        pyro.set_rng_seed(3)
        with torch.no_grad():
            draws = torch.stack([block.forward_and_log_det(x)[1] for _ in range(900)])
        mean, se = draws.mean(0), draws.std(0) / 30
        biases.append((float((mean - exact).abs().mean()), float(se.mean())))
    assert biases[0][0] > 4 * biases[0][1], "the one-term series should be visibly biased"
    assert biases[-1][0] < 4 * biases[-1][1], biases  # 16 terms: no bias detectable
    assert biases[-1][0] < 0.25 * biases[0][0], biases


def test_roulette_weights_are_inverse_tail_probabilities():
    pyro.set_rng_seed(0)
    for _ in range(20):
        coeffs = roulette_coefficients(2, "geometric", 0.5)
        assert coeffs[:2] == [1.0, 1.0]
        assert coeffs[2:] == [2.0**m for m in range(1, len(coeffs) - 1)]


def _param_grads(block, x, weights, seed):
    block.zero_grad()
    pyro.set_rng_seed(seed)
    y, log_det = block.forward_and_log_det(x)
    ((weights * log_det).sum() + (y**2).sum()).backward()
    return [p.grad.clone() for p in block.parameters()], log_det.detach()


def test_neumann_gradient_matches_the_exact_gradient_in_expectation():
    block = _block(dim=3, logdet="unbiased")
    x = torch.randn(6, 3, dtype=torch.float64)
    block.zero_grad()
    _exact(block, x).sum().backward()

    def flat_grad():
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in block.net.parameters()]
        )

    exact = flat_grad()
    draws = []
    for seed in range(400):
        block.zero_grad()
        pyro.set_rng_seed(seed)
        block.forward_and_log_det(x)[1].sum().backward()
        draws.append(flat_grad())
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    active = se > 0
    assert torch.all((mean - exact).abs()[active] <= 4.5 * se[active] + 1e-10)


@pytest.mark.parametrize("logdet", ["unbiased", "series"])
def test_memory_efficient_and_plain_paths_agree_for_per_sample_weights(logdet):
    """Same draws -> same value and gradients, for a loss that weights samples differently (scale/masks)."""
    plain = _block(dim=4, logdet=logdet, memory_efficient=False, n_samples=2)
    efficient = copy.deepcopy(plain)
    efficient.memory_efficient = True
    x = torch.randn(5, 4, dtype=torch.float64)
    weights = torch.tensor([3.0, -1.0, 0.0, 0.5, 10.0], dtype=torch.float64)
    g_plain, v_plain = _param_grads(plain, x, weights, seed=7)
    g_eff, v_eff = _param_grads(efficient, x, weights, seed=7)
    assert torch.allclose(v_plain, v_eff, atol=1e-12)
    for a, b in zip(g_plain, g_eff):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)
    # and through the input
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    for block, xx in ((plain, xa), (efficient, xb)):
        pyro.set_rng_seed(9)
        y, ld = block.forward_and_log_det(xx)
        ((weights * ld).sum() + y.sum()).backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-10)


def test_training_value_is_the_estimate_not_the_surrogate():
    block = _block(dim=3, logdet="unbiased", memory_efficient=False)
    x = torch.randn(4, 3, dtype=torch.float64)
    pyro.set_rng_seed(5)
    _, with_grad = block.forward_and_log_det(x)
    pyro.set_rng_seed(5)
    with torch.no_grad():
        _, without = block.forward_and_log_det(x)
    assert torch.allclose(with_grad.detach(), without, atol=1e-12)


def test_seeded_runs_repeat():
    block = _block(dim=3, logdet="unbiased")
    x = torch.randn(4, 3, dtype=torch.float64)
    pyro.set_rng_seed(11)
    a = block.forward_and_log_det(x)[1]
    pyro.set_rng_seed(11)
    b = block.forward_and_log_det(x)[1]
    assert torch.equal(a, b)


def test_eval_mode_is_exact_and_deterministic_for_small_dimensions():
    block = _block(dim=5, logdet="unbiased").eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    a = block.log_abs_det_jacobian(x, block(x))
    b = block.log_abs_det_jacobian(x.clone(), block(x.clone()))
    assert torch.equal(a, b)
    assert torch.allclose(a, exact_log_det(block.net, x, 1), atol=1e-12)  # eval normalisation is current


def test_fixed_point_inverse_reaches_tolerance_and_reports_failure():
    block = _block(dim=4, coeff=0.97, atol=1e-10, rtol=1e-10)
    y = 3 * torch.randn(16, 4, dtype=torch.float64)
    x = block.inv(y)
    assert float((x + block.net(x) - y).abs().max()) < 1e-8
    block.max_iter = 1
    block.clear_memo()  # a solve from the default start (the remembered input would be the answer for y)
    with pytest.raises(RuntimeError, match=r"did not converge in max_iter=1 .* max residual"):
        block.inv(y.clone())
    block.on_fail = "warn"
    block.clear_memo()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        block.inv(y.clone())


def test_inverse_gradients_match_finite_differences():
    block = _block(dim=3, coeff=0.9, logdet="exact")
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    # clone: gradcheck perturbs its input through .data, which no version counter (hence no memo) can see
    assert torch.autograd.gradcheck(lambda v: block.inv(v.clone()), (y,), eps=1e-6, atol=1e-6)


def test_residual_flow_builder_checks_and_guides():
    with pytest.raises(ValueError, match="num_layers"):
        pyroflows.residual_flow(2, num_layers=0)
    with pytest.raises(ValueError, match="coeff"):
        pyroflows.residual_flow(2, coeff=1.5)
    flow = pyroflows.residual_flow(3, num_layers=2, hidden=(8,), n_exact_terms=3, memory_efficient=False)
    blocks = [m for m in flow.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 2 and all(b.n_exact_terms == 3 and not b.memory_efficient for b in blocks)


def _count_log_dets(monkeypatch):
    """Count the calls of ResidualBlock.forward_and_log_det (every log-det of a block goes through it)."""
    calls = []
    original = ResidualBlock.forward_and_log_det

    def counted(self, x, context=None):
        calls.append(x.shape)
        return original(self, x, context)

    monkeypatch.setattr(ResidualBlock, "forward_and_log_det", counted)
    return calls


def test_sampling_without_gradients_skips_the_log_det_until_asked(monkeypatch):
    """Guide direction: ``TransformedDistribution.sample`` (no grad) computes only x + g(x); a later log_prob of
    those draws computes the log-det once from the remembered x and equals the eager value."""
    import pyro.distributions as dist

    torch.manual_seed(0)
    flow = pyroflows.residual_flow(3, num_layers=2, hidden=(16,)).double().eval()
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(3).double(), 1.0).to_event(1), flow)
    calls = _count_log_dets(monkeypatch)
    y = q.sample((50,))
    assert calls == []  # no Jacobian for drawing
    with torch.no_grad():
        lazy = q.log_prob(y)
    assert len(calls) == 2  # once per block, from the remembered base draw (no inverse)
    with torch.no_grad():  # asked again: the remembered value, no new Jacobian
        torch.testing.assert_close(q.log_prob(y), lazy, rtol=0, atol=0)
    assert len(calls) == 2
    x = flow._memo.x
    _, eager = flow.forward_and_log_det(x)
    base = dist.Normal(torch.zeros(3).double(), 1.0).to_event(1).log_prob(x)
    torch.testing.assert_close(lazy, base - eager, rtol=0, atol=1e-12)


def test_calls_with_gradients_compute_the_log_det_once(monkeypatch):
    torch.manual_seed(0)
    flow = pyroflows.residual_flow(3, num_layers=2, hidden=(16,))
    calls = _count_log_dets(monkeypatch)
    x = torch.randn(8, 3)
    y = flow(x)
    assert len(calls) == 2
    flow.log_abs_det_jacobian(x, y).sum().backward()
    assert len(calls) == 2  # the training path keeps one pass for both


def test_density_sample_runs_the_fixed_point_inverse_without_log_dets(monkeypatch):
    torch.manual_seed(0)
    model = pyroflows.FlowDensity(pyroflows.residual_flow(4, num_layers=2, hidden=(16,)), (4,)).double()
    calls = _count_log_dets(monkeypatch)
    torch.manual_seed(1)
    x = model.sample(20)
    assert calls == []
    torch.manual_seed(1)
    z = model.base_dist(1.0).sample((20,))
    x_ref, _ = pyroflows.transforms.inverse_and_log_det(model.flow.eval(), z)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-12)
    y_round, _ = pyroflows.transforms.forward_and_log_det(model.flow, x)
    torch.testing.assert_close(y_round, z, rtol=0, atol=1e-9)


def test_lazy_log_det_reaches_compositions_and_inverses():
    block = ResidualBlock(3, hidden=(8,))
    planar = pyroflows.transforms.Planar(3)
    assert pyroflows.transforms.Compose([planar, block]).lazy_log_det
    assert not pyroflows.transforms.Compose([planar, pyroflows.transforms.ActNorm(3)]).lazy_log_det
    inv = pyroflows.inverse(block).eval()
    assert inv.lazy_log_det
    y = torch.randn(5, 3)
    with torch.no_grad():
        x = inv(y)
        lazy = inv.log_abs_det_jacobian(y, x)
    eager_x, eager = inv.forward_and_log_det(y)
    torch.testing.assert_close(x, eager_x)
    torch.testing.assert_close(lazy, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_memo_serves_a_never_trained_residual_flow_in_eval(grad):
    """The power iteration marks "never iterated in training" with a NaN buffer; NaN != NaN once made every
    memo lookup of such a flow miss, so log_prob after a draw re-ran the fixed-point inverse."""
    flow = pyroflows.residual_flow(3, num_layers=2, hidden=(8,)).eval()
    x = torch.randn(4, 3)
    with torch.set_grad_enabled(grad):
        y = flow(x)
        assert flow.inv(y) is x


def test_density_log_prob_without_gradients_is_one_pass(monkeypatch):
    """FlowDensity.log_prob wants the log-det anyway: without gradients it must not run x + g(x) and then the
    log-det pass again (each block's forward_and_log_det exactly once), and it equals the value with gradients."""
    torch.manual_seed(0)
    model = pyroflows.FlowDensity(pyroflows.residual_flow(3, num_layers=2, hidden=(16,)), (3,)).double().eval()
    x = torch.randn(10, 3, dtype=torch.float64)
    with_grad = model.log_prob(x)
    calls = _count_log_dets(monkeypatch)
    calls.clear()
    with torch.no_grad():
        without = model.log_prob(x)
    assert len(calls) == 2
    forward_only_calls = []
    monkeypatch.setattr(ResidualBlock, "forward_only", lambda self, v: forward_only_calls.append(1))
    with torch.no_grad():
        model.log_prob(x)
    assert forward_only_calls == []
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["vjp", "vmap"])  # "auto" takes vjp on CPU, vmap on accelerators
@pytest.mark.parametrize("shape", [(3,), (1, 2, 2)])
def test_exact_log_det_and_its_gradients_match_a_dense_jacobian(shape, method):
    """exact_log_det (D vector-Jacobian products) against torch.autograd.functional.jacobian + slogdet, float64:
    values, and gradients with respect to the input and the parameters (training with logdet="exact")."""
    torch.manual_seed(0)
    block = ResidualBlock(shape if len(shape) == 3 else shape[0], hidden=4 if len(shape) == 3 else (8,), coeff=0.9)
    block = block.double()
    with torch.no_grad():
        block.net(torch.zeros((1,) + shape, dtype=torch.float64))  # normalisation up to date, then frozen below
    x = torch.randn((5,) + shape, dtype=torch.float64, requires_grad=True)
    params = [p for p in block.net.parameters() if p.requires_grad]
    with pyroflows.nn.frozen_power_iteration():
        ours = exact_log_det(block.net, x, len(shape), method=method)
        dim = math.prod(shape)
        ref = []
        for k in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(
                lambda v: block.net(v.reshape((1,) + shape)).reshape(dim), x[k].reshape(dim), create_graph=True
            )
            ref.append(torch.linalg.slogdet(torch.eye(dim, dtype=x.dtype) + jac)[1])
        ref = torch.stack(ref)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    w = torch.randn(5, dtype=torch.float64)
    g_ours = torch.autograd.grad((w * ours).sum(), [x, *params], allow_unused=True)
    g_ref = torch.autograd.grad((w * ref).sum(), [x, *params], allow_unused=True)  # an output bias is unused
    assert [a is None for a in g_ours] == [b is None for b in g_ref] and g_ours[0] is not None
    for a, b in zip(g_ours, g_ref):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    with torch.no_grad():  # without gradients (sampling): the same values, no graph
        again = exact_log_det(block.net, x.detach(), len(shape), method=method)
    assert not again.requires_grad
    torch.testing.assert_close(again, ref.detach(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="method"):
        exact_log_det(block.net, x, len(shape), method="dense")


def test_exact_log_det_without_a_graph_uses_the_input_gradients_only_backward(monkeypatch):
    """Without gradients (evaluation, sampling) the D products of the vjp route take input gradients only, so
    LipSwish keeps its derivative across them; with gradients the parameters' graph is kept and it does not. The
    values of both routes agree with the dense reference (test above)."""
    from pyroflows.nn.lipschitz import _LipSwishFunction

    calls = []
    original = _LipSwishFunction.forward
    monkeypatch.setattr(_LipSwishFunction, "forward", staticmethod(lambda *a: calls.append(1) or original(*a)))
    torch.manual_seed(0)
    block = ResidualBlock(3, hidden=(8,), coeff=0.9).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with_grad = exact_log_det(block.net, x.requires_grad_(), 1, method="vjp")
    assert calls == [] and with_grad.requires_grad
    with torch.no_grad():
        without = exact_log_det(block.net, x.detach(), 1, method="vjp")
    # every LipSwish of the branch, once each: one forward graph serves the D products
    assert len(calls) == sum(isinstance(m, pyroflows.nn.LipSwish) for m in block.net.modules()) > 0
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lipswish_without_a_graph_is_bitwise_the_graph_formula(dtype):
    """Under no_grad LipSwish works in place on one fresh tensor: the same numbers, bit for bit, the input
    untouched, and under vmap the same as row by row."""
    torch.manual_seed(0)
    act = pyroflows.nn.LipSwish(beta_init=0.7).to(dtype)
    x = 3 * torch.randn(16, 33, dtype=dtype)
    kept = x.clone()
    with_graph = act(x)
    with torch.no_grad():
        without = act(x)
        mapped = torch.func.vmap(act)(x)
    assert with_graph.requires_grad and not without.requires_grad
    assert torch.equal(without, with_graph.detach()) and torch.equal(mapped, without)
    assert torch.equal(x, kept)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_power_iteration_skipped_on_cpu_while_the_weight_is_unchanged(layer, monkeypatch):
    """Training mode on the CPU: one power iteration per change of the weight, not per call (a second call in the
    same step reads the flag instead of iterating and discarding); outputs and vectors are bit for bit those of the
    sync-free path (which iterates every call and keeps the result only when the weight changed)."""
    from pyroflows.nn import SpectralConv2d, SpectralLinear, lipschitz

    def run(skip):
        monkeypatch.setattr(lipschitz, "_SKIP_UNCHANGED_ON_CPU", skip)
        torch.manual_seed(0)
        if layer == "linear":
            net, x = SpectralLinear(4, 8, coeff=0.9), torch.randn(5, 4)
        else:
            net, x = SpectralConv2d(2, 3, 3, coeff=0.9), torch.randn(2, 2, 5, 5)
        calls = []
        original = type(net)._iterate
        monkeypatch.setattr(type(net), "_iterate", lambda self, n: (calls.append(n), original(self, n))[1])
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        outs = []
        for _ in range(3):  # three optimiser steps, three calls each
            for _ in range(3):
                outs.append(net(x))
            opt.zero_grad()
            outs[-1].square().sum().backward()
            opt.step()
        monkeypatch.setattr(type(net), "_iterate", original)
        return outs, net.u.clone(), net.v.clone(), len(calls)

    fast, slow = run(True), run(False)
    # once per weight (a convolution iterates once more on its first input size), against once per call
    assert slow[3] - fast[3] == 6 and fast[3] <= 4
    for a, b in zip(fast[0], slow[0]):
        assert torch.equal(a, b)
    assert torch.equal(fast[1], slow[1]) and torch.equal(fast[2], slow[2])


def _mlp(sizes, dim, seed=0):
    """A float64 Lipschitz MLP with perturbed weights, biases and slopes (nothing at its initial value)."""
    torch.manual_seed(seed)
    net = lipschitz_mlp(dim, hidden=sizes, coeff=0.9).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
        net(torch.zeros(1, dim, dtype=torch.float64))  # normalisation up to date, then frozen below
    return net


@pytest.mark.parametrize("batch", [(5,), (2, 3), (64,)])  # 64 samples take the outer-product route at D = 3
@pytest.mark.parametrize("sizes", [(7,), (6, 5)])
def test_closed_form_jacobian_matches_autograd(sizes, batch):
    """mlp_value_and_jacobian against torch.func's jacrev in float64: values, Jacobians, and the gradients of a
    log-det built from them (in x, in every parameter, in a shift), for one and two hidden layers."""
    from pyroflows.nn import mlp_value_and_jacobian

    net = _mlp(sizes, 3)
    x = torch.randn(batch + (3,), dtype=torch.float64, requires_grad=True)
    shift = torch.randn(batch + (sizes[0],), dtype=torch.float64, requires_grad=True)
    params = list(net.parameters())
    eye = torch.eye(3, dtype=torch.float64)
    w = torch.randn(batch, dtype=torch.float64)

    def shifted(v, s):
        h = net[0](v) + s
        for layer in net[1:]:
            h = layer(h)
        return h

    with pyroflows.nn.frozen_power_iteration():
        gx, jac = mlp_value_and_jacobian(net, x, shift)
        flat_x, flat_s = x.reshape(-1, 3), shift.reshape(-1, sizes[0])
        ref_jac = torch.func.vmap(torch.func.jacrev(shifted), in_dims=(0, 0))(flat_x, flat_s).reshape(jac.shape)
        ref_gx = shifted(x, shift)
        torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-14)
        torch.testing.assert_close(jac, ref_jac, rtol=0, atol=1e-13)
        ours = (w * torch.linalg.slogdet(eye + jac).logabsdet).sum() + (gx * gx).sum()
        ref = (w * torch.linalg.slogdet(eye + ref_jac).logabsdet).sum() + (ref_gx * ref_gx).sum()
        for a, b in zip(torch.autograd.grad(ours, [x, shift, *params]), torch.autograd.grad(ref, [x, shift, *params])):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        plain, plain_jac = mlp_value_and_jacobian(net, x)
        torch.testing.assert_close(plain, net(x), rtol=0, atol=1e-14)


def test_closed_form_jacobian_declines_networks_it_does_not_know():
    from pyroflows.nn import has_closed_form_jacobian, lipschitz_cnn, mlp_value_and_jacobian

    x = torch.randn(4, 3)
    assert has_closed_form_jacobian(lipschitz_mlp(3, hidden=(8, 8)))
    assert has_closed_form_jacobian(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    for net in (
        lipschitz_cnn(3, 4),
        torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)),  # unknown activation
        torch.nn.Sequential(LipSwish(), torch.nn.Linear(3, 3)),  # starts with an activation
        torch.nn.Linear(3, 3),  # not a Sequential
        torch.nn.Sequential(),
    ):
        assert not has_closed_form_jacobian(net) and mlp_value_and_jacobian(net, x) is None

    class Scaled(SpectralLinear):  # a subclass may compute something else: not taken for a SpectralLinear
        def forward(self, x):
            return 0.5 * super().forward(x)

    assert not has_closed_form_jacobian(torch.nn.Sequential(Scaled(3, 3)))
    linear = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3))  # no activation: one shared matrix
    gx, jac = mlp_value_and_jacobian(linear, x)
    assert jac.shape == (4, 3, 3)
    torch.testing.assert_close(jac[2], linear[1].weight @ linear[0].weight)


def test_training_log_det_auto_is_exact_where_the_jacobian_is_small():
    """logdet="auto" (the default): exact in training for vectors of D <= 16 with the default network (the same
    values as logdet="exact", no randomness), and up to exact_max_dim for batches with n * D**2 <= 2**15; the
    unbiased estimator beyond, for custom networks and for images."""
    from pyroflows.transforms.residual import TRAIN_EXACT_MAX_DIM

    small = _block(dim=TRAIN_EXACT_MAX_DIM)
    assert small.logdet == "auto" and not small.random_log_det
    x = torch.randn(6, TRAIN_EXACT_MAX_DIM, dtype=torch.float64)
    y, a = small.forward_and_log_det(x)
    torch.testing.assert_close(a, exact_log_det(small.net, x, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(small.forward_and_log_det(x)[1], a, rtol=0, atol=0)  # no draws: the same value
    big = _block(dim=32)
    assert big.random_log_det and not big.eval().random_log_det  # eval's "auto": exact up to exact_max_dim
    big.train()
    few, many = torch.randn(32, 32, dtype=torch.float64), torch.randn(33, 32, dtype=torch.float64)  # 32 * 32**2 = 2**15
    torch.testing.assert_close(big.forward_and_log_det(few)[1], exact_log_det(big.net, few, 1), rtol=0, atol=1e-12)
    assert not torch.equal(big.forward_and_log_det(many)[1], big.forward_and_log_det(many)[1])  # two estimates
    assert ResidualBlock(65, hidden=(8,))._train_mode(1) == "unbiased"  # beyond exact_max_dim: never
    custom = ResidualBlock(2, net=torch.nn.Sequential(SpectralLinear(2, 8), torch.nn.Tanh(), SpectralLinear(8, 2)))
    assert custom.random_log_det
    assert ResidualBlock((1, 4, 4), hidden=2).random_log_det
    assert not ResidualBlock(2, logdet="exact").random_log_det and ResidualBlock(2, logdet="unbiased").random_log_det
    with pytest.raises(ValueError, match="logdet must be 'auto' or one of"):
        ResidualBlock(2, logdet="closed")


def _invert_then_with_fixed_point(block, inner, y):
    """``(x, iterations)`` of ``block.inv(y)`` as configured, then with ``inner.inverse = "fixed_point"``: solves from
    the default start (the remembered pair forgotten first, whose input would be a warm start for ``y``)."""
    out = []
    with torch.no_grad():
        for mode in (inner.inverse, "fixed_point"):
            inner.inverse = mode
            for t in {id(block): block, id(inner): inner}.values():
                t.clear_memo()
            out.append((block.inv(y.clone()), inner.last_inverse_iterations))
    return out


@pytest.mark.parametrize("context", [False, True])
def test_newton_inverse_matches_the_fixed_point_in_fewer_iterations(context):
    """The Newton inverse (inverse="newton") reaches the same x as the fixed-point iteration, to tolerance, in fewer
    iterations; also for a conditional block."""
    torch.manual_seed(0)
    kwargs = dict(coeff=0.97, atol=1e-11, rtol=1e-11, inverse="newton")
    if context:
        conditional = pyroflows.transforms.ConditionalResidualBlock(4, 2, **kwargs).double()
        inner = conditional.layer
        torch.nn.init.normal_(inner.context_net.weight)
        block = conditional.condition(torch.randn(32, 2, dtype=torch.float64))
    else:
        block = inner = _block(dim=4, **kwargs)
    with torch.no_grad():
        for p in inner.net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = 2 * torch.randn(32, 4, dtype=torch.float64)
    (newton, n_newton), (fixed, n_fixed) = _invert_then_with_fixed_point(block, inner, block(x))
    torch.testing.assert_close(newton, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(newton, fixed, rtol=0, atol=1e-9)
    assert n_newton < n_fixed and n_newton <= 8, (n_newton, n_fixed)


def test_auto_inverse_hands_over_to_newton_only_when_the_contraction_is_slow():
    """inverse="auto": where the fixed-point iteration contracts fast it runs alone (the same x, bit for bit, and the
    same iterations as inverse="fixed_point"); where it contracts slowly (a branch near its Lipschitz bound) it hands
    over to Newton's method and converges in far fewer iterations, to the same x."""
    fast = _block(dim=3, coeff=0.5, atol=1e-12, rtol=1e-12)
    (a, n_auto), (b, n_plain) = _invert_then_with_fixed_point(fast, fast, torch.randn(64, 3, dtype=torch.float64))
    assert torch.equal(a, b) and n_auto == n_plain
    slow = _block(dim=3, coeff=0.99, linear=True, atol=1e-12, rtol=1e-12)  # g linear at its bound: rate about 0.99
    x = 3 * torch.randn(64, 3, dtype=torch.float64)
    (auto, n_auto), (plain, n_plain) = _invert_then_with_fixed_point(slow, slow, slow(x))
    torch.testing.assert_close(auto, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(plain, x, rtol=0, atol=1e-9)
    assert n_plain > 30 and n_auto < n_plain / 3, (n_auto, n_plain)


@pytest.mark.parametrize("inverse", ["newton", "fixed_point"])
def test_inverse_gradients_match_finite_differences_both_solvers(inverse):
    """Gradients through the inverse (implicit-function theorem) in x and in the parameters, float64: by a direct
    solve with the closed-form Jacobian (Newton) and by the vector-Jacobian iteration (fixed point)."""
    block = _block(dim=3, coeff=0.9, inverse=inverse, atol=1e-13, rtol=1e-13)
    weight = block.net[0].weight
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def inv(v, w):
        with torch.no_grad():
            weight.copy_(w)
        return block.inv(v.clone())

    assert torch.autograd.gradcheck(lambda v: block.inv(v.clone()), (y,), eps=1e-6, atol=1e-6)
    x = block.inv(y.clone())
    (x * torch.arange(12.0, dtype=torch.float64).reshape(4, 3)).sum().backward()
    # finite differences in one weight entry, the normalisation held fixed (the frozen map the gradient is of)
    analytic = float(weight.grad[1, 2])
    with pyroflows.nn.frozen_power_iteration(), torch.no_grad():
        base = weight.detach().clone()
        values = []
        for sign in (1, -1):
            w = base.clone()
            w[1, 2] += sign * 1e-6
            values.append((inv(y.detach(), w) * torch.arange(12.0, dtype=torch.float64).reshape(4, 3)).sum())
        weight.copy_(base)
    assert abs(analytic - float(values[0] - values[1]) / 2e-6) < 1e-5


def test_newton_inverse_is_safeguarded_by_fixed_point_steps(monkeypatch):
    """A Newton step that does not reduce the residual (here: a wrong Jacobian) is replaced by the fixed-point step,
    which reduces it by Lip(g) < 1: the inverse still converges to the same x."""
    block = _block(dim=4, coeff=0.95, atol=1e-11, rtol=1e-11)
    x = 2 * torch.randn(16, 4, dtype=torch.float64)
    y = block(x).detach()
    true = ResidualBlock._value_and_jacobian

    def wrong(self, v, g):
        gv, jac = true(self, v, g)
        return gv, -3.0 * jac  # I + J then points the step the wrong way

    monkeypatch.setattr(ResidualBlock, "_value_and_jacobian", wrong)
    with torch.no_grad():
        found = block.inv(y.clone())
    torch.testing.assert_close(found, x, rtol=0, atol=1e-8)


def test_inverse_option_is_checked():
    with pytest.raises(ValueError, match="inverse must be"):
        ResidualBlock(2, inverse="bisection")
    with pytest.raises(ValueError, match="closed-form Jacobian"):
        ResidualBlock((1, 4, 4), hidden=2, inverse="newton")
    with pytest.raises(ValueError, match="closed-form Jacobian"):
        ResidualBlock(2, net=torch.nn.Sequential(SpectralLinear(2, 2), torch.nn.Tanh(), SpectralLinear(2, 2)),
                      inverse="newton")  # fmt: skip


def test_the_inverse_of_a_remembered_output_starts_from_its_input_inside_a_composition():
    """A Compose remembers its residual blocks' pairs: the held-fixed log q of sticking the landing (a copy of the
    draw, inverted with frozen parameters) then solves each block in one iteration, with the value and the draw's
    gradient of a cold solve. A point other than the remembered output starts from ``y - g(y)`` as before (a
    remembered input of another point is no start), and still solves."""
    import pyro.distributions as dist
    from conformance import held_fixed_log_q

    from pyroflows.transforms import Compose

    blocks = [_block(6, seed=s, logdet="exact", inverse="fixed_point") for s in (1, 2)]
    flow = Compose(blocks)
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(6, dtype=torch.float64), 1.0).to_event(1), [flow])
    z = q.rsample((5,))

    def held_fixed(value):
        return (*held_fixed_log_q(q, value), [b.last_inverse_iterations for b in blocks])

    warm = held_fixed(z)
    assert warm[2] == [1, 1], warm[2]
    for b in blocks:
        b.clear_memo()
    cold = held_fixed(z)
    assert min(cold[2]) > 1, cold[2]
    assert torch.allclose(warm[0], q.log_prob(z).detach(), atol=1e-9)
    assert torch.allclose(warm[0], cold[0], atol=1e-9) and torch.allclose(warm[1], cold[1], atol=1e-7)

    block = blocks[0]
    x = torch.randn(5, 6, dtype=torch.float64)
    y = block(x)
    other = y + 0.5  # not the remembered output: the default start
    assert block._warm_start(other) is None and block._warm_start(y.clone()) is not None
    assert torch.allclose(block.inv(other) + block.net(block.inv(other)), other, atol=1e-9)

    # image blocks (density models: their inverse draws new points) keep no pair inside a composition, nor does any
    # block in a pass without gradients
    image = ResidualBlock((2, 4, 4), hidden=4, coeff=0.9).double()
    Compose([image]).forward_and_log_det(torch.randn(3, 2, 4, 4, dtype=torch.float64))
    assert not image.warm_start_inverse and image._memo is None
    fresh = _block(6, seed=3, logdet="exact")
    with torch.no_grad():
        Compose([fresh]).forward_and_log_det(torch.randn(3, 6, dtype=torch.float64))
    assert fresh.warm_start_inverse and fresh._memo is None


@pytest.mark.parametrize("event_shape", [(3,), (2, 4, 4)])
@pytest.mark.parametrize("call", ["forward_and_log_det", "forward_only", "inverse_only"])
def test_a_block_checks_each_lipschitz_layer_once_per_call(event_shape, call, monkeypatch):
    """A residual block brings its Lipschitz layers up to date once per call, then evaluates its map, Jacobian or
    fixed-point solve without fingerprinting the weights again (once per layer and call, not per evaluation); a
    weight changed through ``.data`` (as Pyro's ClippedAdam writes) is still seen at the next call; and the outputs
    are bit for bit those of a block that checks at every evaluation."""
    import contextlib

    from pyroflows.nn.lipschitz import _PowerIteration
    from pyroflows.transforms import residual

    torch.manual_seed(0)
    block = ResidualBlock(event_shape, hidden=(8,) if len(event_shape) == 1 else 4)
    x = 0.5 * torch.randn((5,) + event_shape)
    layers = [m for m in block.modules() if isinstance(m, _PowerIteration)]
    cls = type(layers[0])
    fingerprints = []
    original = cls._fingerprint
    monkeypatch.setattr(cls, "_fingerprint", lambda self: (fingerprints.append(self), original(self))[1])

    def run(block):
        fingerprints.clear()
        torch.manual_seed(1)  # the same probes for a series log-det
        out = getattr(block, call)(x)
        return out if isinstance(out, tuple) else (out,)

    run(block)
    assert len(fingerprints) == len(layers)
    with torch.no_grad():
        for m in layers:
            m.weight.data.mul_(0.9)  # behind the version counter's back
    twin = copy.deepcopy(block)
    u_before = [m.u.clone() for m in layers]
    skipped = run(block)
    assert len(fingerprints) == len(layers)
    assert all(not torch.equal(m.u, u) for m, u in zip(layers, u_before)), "the changed weight was not seen"
    monkeypatch.setattr(residual, "_checked", contextlib.nullcontext)
    checked = run(twin)
    # each evaluation of the map checked again (the inverse's solve is frozen anyway: one check per layer)
    assert len(fingerprints) == (1 if call == "inverse_only" else 2) * len(layers)
    for a, b in zip(skipped, checked):
        assert torch.equal(a, b)
