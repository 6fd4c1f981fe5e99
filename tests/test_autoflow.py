"""AutoFlow: the same guide as AutoNormalizingFlow (same draws, same updates, step for step), with one parameter
site, and its layers' parameters kept as views of that one tensor through conversion, copying and loading."""

from __future__ import annotations

import copy
import os
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyroflows
from pyroflows import AutoFlow
from pyroflows.infer import fit, load_guide, save_guide, sync_param_store
from pyroflows.transforms import ActNorm, HeavyTails

# a guide's first call (building it) shows ActNorm one draw; the layer keeps the identity, as it should for N(0, I)
pytestmark = pytest.mark.filterwarnings("ignore:ActNorm. the first training batch:UserWarning")

BUILDERS = {
    "planar": partial(pyroflows.planar_flow, num_layers=3),
    "realnvp": partial(pyroflows.realnvp, num_layers=3, hidden=(16,)),
    "residual": partial(pyroflows.residual_flow, num_layers=2, hidden=(16,)),
    "autoregressive": partial(pyroflows.autoregressive_flow, num_layers=2, hidden=(16,)),
    "spline": partial(pyroflows.spline_flow, num_layers=2, hidden=(16,)),
}


def model():
    """A 3-D posterior with a constrained site (a LogNormal scale) and a funnel-like dependence."""
    tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5))
    pyro.sample("theta", dist.Normal(torch.zeros(2), tau.unsqueeze(-1)).to_event(1))
    pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))


def _kept_identity(builder):
    """``builder`` with its ActNorm layers marked initialised, as AutoFlow builds them: AutoNormalizingFlow would
    otherwise initialise them from its first vectorised draws of the base noise."""

    def build(dim):
        flow = builder(dim)
        for module in flow.modules():
            if isinstance(module, ActNorm):
                module.mark_initialized()
        return flow

    return build


def _flow_params(guide) -> list[torch.Tensor]:
    return [p.detach().clone() for p in guide.transform.parameters()]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_same_draws_and_updates_as_autonormalizingflow(name):
    """Float64, the same seed: 15 SVI steps with ClippedAdam give the same losses (within 1e-9, the residual
    flow's stochastic log-det sums in another order), the same layer parameters and the same draws."""
    out = {}
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            for cls in (AutoNormalizingFlow, AutoFlow):
                pyro.clear_param_store()
                pyro.set_rng_seed(0)
                guide = cls(model, _kept_identity(BUILDERS[name]) if cls is AutoNormalizingFlow else BUILDERS[name])
                elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0)
                svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.02}), elbo)
                losses = [svi.step() for _ in range(15)]
                pyro.set_rng_seed(7)
                out[cls] = (losses, guide()["theta"], _flow_params(guide))
        finally:
            torch.set_default_dtype(torch.float32)
    (la, da, pa), (lb, db, pb) = out[AutoNormalizingFlow], out[AutoFlow]
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-9)
    assert la[0] != la[-1]  # it trained
    torch.testing.assert_close(db, da, rtol=0, atol=1e-10)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("error:ActNorm:UserWarning")
@pytest.mark.parametrize("particles", [1, 8])
def test_the_flows_actnorm_layers_keep_the_identity_without_a_warning(particles):
    """Under Pyro's SVI (whose first, unvectorised guide call guesses the plate nesting) the flow's ActNorm layers
    see base noise, not data: AutoFlow keeps them at the identity and says nothing (AutoNormalizingFlow warns)."""
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"])
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(particles, vectorize_particles=particles > 1))
    svi.step()  # raises if an ActNorm warns
    norms = [m for m in guide.transform.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 4 and all(bool(m.initialized) for m in norms)
    # one Adam step from the identity: each entry moved by at most about lr, not to the noise draws' statistics
    with torch.no_grad():
        assert all(float(m.bias.abs().max()) < 0.02 and float(m.log_scale.abs().max()) < 0.02 for m in norms)


def test_one_param_site_and_gradients_collected_in_the_flat_tensor():
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"])
    with pyro.poutine.trace(param_only=True) as tr:
        loss = Trace_ELBO().differentiable_loss(model, guide)
    assert list(tr.trace.nodes) == ["AutoFlow.flow_params"]
    flat = guide.flow_params
    assert tr.trace.nodes["AutoFlow.flow_params"]["value"] is flat
    layers = [p for p in guide.transform.parameters()]
    # every layer parameter is a view of the flat tensor, in order
    assert flat.numel() == sum(p.numel() for p in layers)
    assert flat.untyped_storage().data_ptr() == layers[0].untyped_storage().data_ptr()
    expected = torch.autograd.grad(loss, layers, retain_graph=True)
    loss.backward()
    assert all(p.grad is None for p in layers)  # moved into the flat tensor's gradient
    torch.testing.assert_close(flat.grad, torch.cat([g.reshape(-1) for g in expected]))
    assert flat.grad.abs().sum() > 0
    before = [p.detach().clone() for p in layers]
    with torch.no_grad():
        flat.add_(1.0)  # an update of the flat tensor is an update of the flow
    assert all(torch.equal(p, b + 1.0) for p, b in zip(layers, before))


def test_gradients_are_added_when_each_backward_pass_ends():
    """The layers' gradients reach ``flow_params.grad`` in one addition at the end of each backward pass: two passes
    accumulate, a pass that reaches only some layers adds only theirs, and what a pass that raised before its end
    had collected is added at the next pass (as it was when every gradient was added as it came)."""
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"])
    loss = Trace_ELBO().differentiable_loss(model, guide)
    layers = list(guide.transform.parameters())
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, layers, retain_graph=True)])
    flat = guide.flow_params
    loss.backward(retain_graph=True)
    torch.testing.assert_close(flat.grad, expected)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(flat.grad, 2 * expected)
    assert all(p.grad is None for p in layers)

    # only the last layer parameter: the others' slices stay as they were
    flat.grad = None
    last, start, end = guide._slots[-1]
    (last * 3.0).sum().backward()
    want = torch.zeros_like(flat)
    want[start:end] = 3.0
    torch.testing.assert_close(flat.grad, want)

    # a pass that raised after the first parameter's gradient was accumulated
    flat.grad = None
    first = guide._slots[0][0]

    def fail(grad):
        raise RuntimeError("stop here")

    other = torch.ones((), requires_grad=True)
    other.register_hook(fail)
    late = other * 1.0  # made first, so autograd reaches it after the flow's branch
    with pytest.raises(RuntimeError, match="stop here"):
        (late + (first * 2.0).sum()).backward()
    assert guide._pending  # the pass collected the first parameter's gradient, then raised
    (last * 3.0).sum().backward()
    torch.testing.assert_close(flat.grad[start:end], torch.full((end - start,), 3.0))
    torch.testing.assert_close(flat.grad[: first.numel()], torch.full((first.numel(),), 2.0))


def test_gradients_without_the_autograd_pass_id(monkeypatch):
    """With a torch that lacks the autograd pass id, each gradient is added as it comes: the same sums."""
    import pyroflows.autoguide as autoguide

    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"])
    loss = Trace_ELBO().differentiable_loss(model, guide)
    layers = list(guide.transform.parameters())
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, layers, retain_graph=True)])
    monkeypatch.setattr(autoguide, "_graph_task_id", None)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(guide.flow_params.grad, 2 * expected)
    assert all(p.grad is None for p in layers)


def _trains_through_flat(guide) -> None:
    """One SVI step moves the flow: the optimiser steps the store's flat tensor, which is the guide's, and the
    layers' parameters are views of it."""
    before = _flow_params(guide)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    svi.step()
    flat = guide.flow_params
    assert pyro.get_param_store()["AutoFlow.flow_params"] is flat
    assert any(not torch.equal(a, b) for a, b in zip(before, _flow_params(guide)))
    assert all(torch.equal(p.reshape(-1), flat[start:end]) for p, start, end in guide._slots)
    assert all(p.grad is None for p in guide.transform.parameters())


def test_conversion_and_copies_stay_linked():
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"])
    guide()
    guide.double()  # every parameter converted: the layers become views of the converted flat tensor again
    assert guide.flow_params.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in guide.transform.parameters())
    _trains_through_flat(guide)
    twin = copy.deepcopy(guide)  # deepcopy gives fresh parameters: linked and hooked again
    assert twin.flow_params is not guide.flow_params
    pyro.clear_param_store()
    _trains_through_flat(twin)


def test_param_store_values_are_adopted(tmp_path):
    """Values saved from the param store and loaded in another "process" are what a fresh guide computes with, and
    the store and the guide then train one tensor."""
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"])
    fit(model, guide, 30, progress=False, seed=0)
    pyro.get_param_store().save(os.fspath(tmp_path / "params.pt"))
    pyro.set_rng_seed(3)
    expected = guide()["theta"]

    pyro.clear_param_store()
    pyro.get_param_store().load(os.fspath(tmp_path / "params.pt"))
    fresh = AutoFlow(model, BUILDERS["realnvp"])
    fresh()  # the first call builds the guide (drawing from the prior) and adopts the stored values
    pyro.set_rng_seed(3)
    torch.testing.assert_close(fresh()["theta"], expected)
    store_value = pyro.get_param_store()["AutoFlow.flow_params"]
    assert store_value is fresh.flow_params
    saved = store_value.detach().clone()
    _trains_through_flat(fresh)

    pyro.clear_param_store()
    pyro.get_param_store().load(os.fspath(tmp_path / "params.pt"))
    synced = AutoFlow(model, BUILDERS["realnvp"])
    sync_param_store(synced)  # builds the guide, which adopts the stored values
    assert pyro.get_param_store()["AutoFlow.flow_params"] is synced.flow_params
    torch.testing.assert_close(synced.flow_params.detach(), saved)


def test_fit_checkpoint_and_save_load(tmp_path):
    """fit trains AutoFlow exactly as it trains AutoNormalizingFlow (same seed: same losses); save_guide /
    load_guide restore it draw for draw."""
    results = {}
    for cls in (AutoNormalizingFlow, AutoFlow):
        pyro.clear_param_store()
        guide = cls(model, BUILDERS["realnvp"])
        results[cls] = fit(model, guide, 25, num_particles=4, progress=False, seed=2, out=tmp_path / str(len(results)))
    np.testing.assert_allclose(results[AutoFlow].losses, results[AutoNormalizingFlow].losses, rtol=1e-5, atol=1e-5)
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"], heavy_tails=True)  # with the tail layer
    fit(model, guide, 25, num_particles=4, progress=False, seed=2)
    save_guide(guide, tmp_path / "guide.pt")
    pyro.clear_param_store()
    loaded = load_guide(AutoFlow(model, BUILDERS["realnvp"], heavy_tails=True), tmp_path / "guide.pt")
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        a = guide()["theta"]
        pyro.set_rng_seed(seed)
        assert torch.equal(a, loaded()["theta"])
    assert pyro.get_param_store()["AutoFlow.flow_params"] is loaded.flow_params
    _trains_through_flat(loaded)


def test_errors_name_the_problem():
    pyro.clear_param_store()
    AutoFlow(model, BUILDERS["planar"])()
    other = AutoFlow(model, BUILDERS["realnvp"])  # the store holds the planar flow's values under the same name
    with pytest.raises(ValueError, match="flow_params must be a vector of .* call pyro.clear_param_store"):
        other()

    def mixed(dim):
        flow = pyroflows.realnvp(dim, num_layers=2)
        next(m for m in flow.modules() if list(m.parameters(recurse=False))).double()
        return flow

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="share one dtype and device"):
        AutoFlow(model, mixed)()


def test_converting_the_flow_apart_from_the_guide_is_refused():
    """guide.transform.double() gives the layers new tensors that the optimiser would never step: the next call
    says so instead of training nothing."""
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"])
    guide()
    guide.transform.double()
    with pytest.raises(RuntimeError, match="no longer share the guide's flow_params.*guide.to"):
        guide()


def test_transform_without_parameters():
    """A flow with nothing to train (a fixed permutation) builds and samples; no parameter site."""
    from pyro.distributions.transforms import Permute

    pyro.clear_param_store()
    guide = AutoFlow(model, lambda dim: Permute(torch.arange(dim).flip(0)))
    with pyro.poutine.trace(param_only=True) as tr:
        assert guide()["theta"].shape == (2,)
    assert list(tr.trace.nodes) == [] and "flow_params" not in dict(guide.named_parameters())


def test_heavy_tails_layer_on_the_base_noise():
    """With heavy_tails=True the flow is Compose([HeavyTails(latent_dim), builder's flow]) in the builder's dtype,
    trained through flow_params with the rest; by default the builder's flow is left alone; anything but a bool is
    refused."""
    pyro.clear_param_store()
    guide = AutoFlow(model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)), heavy_tails=True)
    guide()
    first, rest = list(guide.transform.parts)
    assert isinstance(first, HeavyTails) and first.dim == 3
    assert isinstance(rest, pyroflows.transforms.Compose)
    assert guide.flow_params.numel() == first.raw.numel() + sum(p.numel() for p in rest.parameters())
    before = first.raw.detach().clone()
    _trains_through_flat(guide)
    assert not torch.equal(first.raw, before)

    pyro.clear_param_store()
    plain = AutoFlow(model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    plain()
    assert not any(isinstance(m, HeavyTails) for m in plain.transform.modules())

    pyro.clear_param_store()
    double = AutoFlow(model, lambda d: pyroflows.planar_flow(d, num_layers=2).double(), heavy_tails=True)
    double()
    assert guide.transform.parts[0].raw.dtype == torch.float32 and double.transform.parts[0].raw.dtype == torch.float64
    with pytest.raises(ValueError, match="heavy_tails must be True or False, got 'yes'"):
        AutoFlow(model, BUILDERS["planar"], heavy_tails="yes")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_one_dimensional_latent_trains(name):
    """One latent value: realnvp's couplings then condition on nothing (empty weight matrices), which hold no
    values to link into the flat tensor; every builder still trains there, and its loss falls."""

    def one_site():
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.tensor([2.0, 2.5, 1.5]))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(one_site, BUILDERS[name])
    # anneal=0: the losses of a tempered start are those of another target, not comparable with the last ones
    result = fit(one_site, guide, 100, lr=0.02, num_particles=4, anneal=0, progress=False, report=False)
    assert result.losses[-20:].mean() < result.losses[:20].mean()
    assert all(torch.isfinite(p).all() for p in guide.parameters())


# ------------------------------------------------------------------------------------------------ median, quantiles
def shapes_model(y):
    """Sites of several supports and shapes: a positive scalar, a plate of reals, a simplex, a 2x2 Cholesky factor of a
    correlation matrix."""
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("g", 3):
        theta = pyro.sample("theta", dist.Normal(0.0, s))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(4)))
    pyro.sample("L", dist.LKJCholesky(2, 1.0))
    pyro.sample("y", dist.Normal(theta.sum(-1) + p[..., 0], 1.0), obs=y)


def test_quantiles_are_the_marginal_quantiles_of_the_guides_draws_in_the_constrained_space():
    """For a fresh guide (N(0, I) in the unconstrained space): the positive site's quantiles are exp of the normal
    quantiles (within 4 standard errors at 10,000 draws); every site's quantiles, a simplex's and a Cholesky factor's
    included, agree with the empirical quantiles of 100,000 draws of the guide taken independently (transforming
    quantiles of the unconstrained coordinates would not: for the simplex they differ by far more); shapes are
    (levels,) + the site's shape, the median is the 0.5 row, the model's data is needed only before the first call."""
    y = torch.tensor(0.5)
    pyro.clear_param_store()
    guide = AutoFlow(shapes_model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    q = guide.quantiles(levels, y)
    assert {k: tuple(v.shape) for k, v in q.items()} == {"s": (5,), "theta": (5, 3), "p": (5, 4), "L": (5, 2, 2)}
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(levels))
    se = (torch.tensor(levels) * (1 - torch.tensor(levels)) / 10000).sqrt() / torch.distributions.Normal(
        0.0, 1.0
    ).log_prob(z).exp()
    assert (q["s"].log() - z).abs().le(4 * se).all()
    assert (q["theta"] - z[:, None]).abs().le(4 * se[:, None]).all()  # a real site: N(0, 1) itself
    assert torch.equal(guide.median()["p"], q["p"][2])
    # independent draws of the guide, through the model's own sites
    with torch.no_grad(), pyro.plate("draws", 100_000, dim=-2):
        draws = guide(y)
    for name in ("s", "theta", "p", "L"):
        flat = draws[name].reshape(100_000, -1)
        reference = torch.quantile(flat.double(), torch.tensor(levels, dtype=torch.float64), dim=0)
        torch.testing.assert_close(q[name].reshape(5, -1).double(), reference, atol=0.03, rtol=0.05)
    assert ((q["p"] >= 0) & (q["p"] <= 1)).all()
    # the simplex's marginal medians are not the simplex point of the unconstrained medians (0): that differs by
    # about 0.048, ten times the estimates' error
    transformed = torch.distributions.biject_to(dist.constraints.simplex)(torch.zeros(3))
    assert (transformed - q["p"][2]).abs().max() > 0.03


def test_quantiles_repeat_leave_the_random_streams_alone_and_name_bad_arguments():
    pyro.clear_param_store()
    guide = AutoFlow(model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    guide()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = guide.quantiles([0.2, 0.8], num_samples=500)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream did not move
    second = guide.quantiles([0.2, 0.8], num_samples=500)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = guide.quantiles([0.2, 0.8], num_samples=500, seed=None)
    assert not torch.equal(first["theta"], other["theta"])
    for bad in ([1.5], [-0.1], []):
        with pytest.raises(ValueError, match="levels must lie in"):
            guide.quantiles(bad)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
            guide.median(num_samples=bad)


def test_a_fitted_guides_quantiles_are_the_posteriors():
    """A conjugate model: z ~ N(0, 1), y_i ~ N(z, 1) for 4 observations, posterior N(sum y / 5, 1/5). After fitting,
    the guide's quantiles are the exact ones within 0.05 posterior standard deviations plus the draws' error; the
    fitted guide's median is its 0.5 quantile."""

    def conjugate(y):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    y = torch.tensor([0.3, 1.1, 0.8, 1.6])
    pyro.clear_param_store()
    guide = AutoFlow(conjugate, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    fit(conjugate, guide, 400, model_args=(y,), seed=0, report=False, progress=False)
    levels = torch.tensor([0.1, 0.5, 0.9])
    exact = torch.distributions.Normal(y.sum() / 5, 5**-0.5).icdf(levels)
    q = guide.quantiles(levels, y)["z"]
    assert (q - exact).abs().max() < 0.1 * 5**-0.5, (q, exact)
    assert guide.median(y)["z"] == q[1]


def test_a_mixture_guides_quantiles_are_those_of_its_draws():
    """AutoFlowMixture inherits median and quantiles: those of the mixture's draws (its components spread apart)."""
    from pyroflows import AutoFlowMixture

    def two_d():
        pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlowMixture(two_d, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)), components=2)
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    q = guide.quantiles(levels)["a"]
    with torch.no_grad(), pyro.plate("draws", 100_000, dim=-1):
        draws = guide()["a"]
    torch.testing.assert_close(q.double(), torch.quantile(draws.double(), levels, dim=0), atol=0.05, rtol=0.02)
    assert torch.equal(guide.median()["a"], q[1])


# ------------------------------------------------------------------------------------------------ NeuTra
MVN_LOC = torch.tensor([1.0, -2.0], dtype=torch.float64)
MVN_COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)


def mvn_model():
    pyro.sample("z", dist.MultivariateNormal(MVN_LOC, MVN_COV))


@pytest.mark.parametrize("name", ["realnvp", "autoregressive", "spline", "planar", "residual"])
def test_neutra_reparam_with_an_autoflow_has_the_flows_density(name):
    """Pyro's NeuTraReparam (HMC in the flow's base space) takes an AutoFlow guide: the reparameterised model's log
    density at a base point u is log p(T(u)) + log|det dT/du| with the determinant of the autograd Jacobian (float64,
    to 1e-8), so HMC there samples the model's posterior."""
    from pyro import poutine
    from pyro.infer.reparam import NeuTraReparam

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(mvn_model, BUILDERS[name])
    guide()
    guide = guide.double()
    with torch.no_grad():  # a flow away from the identity
        guide.flow_params.add_(0.2 * torch.randn_like(guide.flow_params))
    guide.requires_grad_(False)
    neutra = NeuTraReparam(guide)
    reparam_model = poutine.reparam(mvn_model, config=lambda _: neutra)
    flow = guide.get_transform()
    for _ in range(3):
        u = torch.randn(2, dtype=torch.float64)
        trace = poutine.trace(poutine.condition(reparam_model, {"z_shared_latent": u})).get_trace()
        x = flow(u)
        jac = torch.autograd.functional.jacobian(lambda v: flow(v), u)
        expected = dist.MultivariateNormal(MVN_LOC, MVN_COV).log_prob(x) + torch.linalg.slogdet(jac)[1]
        assert float(trace.log_prob_sum()) == pytest.approx(float(expected), abs=1e-8)
        torch.testing.assert_close(neutra.transform_sample(u[None])["z"][0], x)


def test_nuts_on_an_autoflow_neutra_reparam_recovers_the_posterior():
    """A short fit, then NUTS on the NeuTra-reparameterised model of a correlated Gaussian: the transformed draws'
    mean and sd are the posterior's (0.3 for 300 draws of a chain whose ESS is in the hundreds: 4 standard
    errors)."""
    from pyro import poutine
    from pyro.infer import MCMC, NUTS
    from pyro.infer.reparam import NeuTraReparam

    def model():
        pyro.sample("z", dist.MultivariateNormal(MVN_LOC.float(), MVN_COV.float()))

    pyro.clear_param_store()
    guide = AutoFlow(model, partial(pyroflows.realnvp, num_layers=2, hidden=(16,)))
    fit(model, guide, 300, seed=0, report=False, progress=False)
    neutra = guide.neutra_reparam()
    assert isinstance(neutra, NeuTraReparam) and not guide.training
    assert not any(p.requires_grad for p in guide.parameters())
    pyro.set_rng_seed(1)
    mcmc = MCMC(NUTS(poutine.reparam(model, config=lambda _: neutra)), num_samples=300, warmup_steps=150)
    mcmc.run()
    z = neutra.transform_sample(mcmc.get_samples()["z_shared_latent"])["z"]
    assert z.shape == (300, 2)
    assert (z.mean(0) - MVN_LOC.float()).abs().max() < 0.3, z.mean(0)
    assert (z.std(0) - 1.0).abs().max() < 0.3, z.std(0)


def test_neutra_reparam_refuses_a_random_log_det_and_a_mixture():
    """HMC's potential includes the flow's log-det: a residual guide whose evaluation log-det is an estimate (D above
    its exact_max_dim) is refused, one built with eval_logdet="exact" is not; a mixture of flows has no single
    transform (refused by the method and, when the model runs, by Pyro's NeuTraReparam with its own error)."""
    from pyro import poutine
    from pyro.infer.reparam import NeuTraReparam

    from pyroflows import AutoFlowMixture

    def wide():
        pyro.sample("z", dist.Normal(torch.zeros(80), 1.0).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlow(wide, partial(pyroflows.residual_flow, num_layers=1, hidden=(16,)))
    with pytest.raises(ValueError, match="random estimate even in evaluation mode"):
        guide.neutra_reparam()
    pyro.clear_param_store()
    exact = AutoFlow(wide, partial(pyroflows.residual_flow, num_layers=1, hidden=(16,), eval_logdet="exact"))
    assert isinstance(exact.neutra_reparam(), NeuTraReparam)
    pyro.clear_param_store()
    mixture = AutoFlowMixture(mvn_model, partial(pyroflows.realnvp, num_layers=1, hidden=(8,)), components=2)
    mixture()
    with pytest.raises(NotImplementedError, match="no single transform"):
        mixture.neutra_reparam()
    with pytest.raises(ValueError, match="NeuTraReparam only supports guides that implement `get_transform`"):
        poutine.trace(poutine.reparam(mvn_model, config=lambda _: NeuTraReparam(mixture))).get_trace()


def test_neutra_transform_sample_takes_mcmcs_draws_for_a_model_with_plates():
    """The draws as MCMC returns them, (n, D), map to (n,) + site shape per site of a model with a plate (Pyro's own
    transform_sample wants the draws' dimension left of the plates), with the values of the flow's forward map."""
    y = torch.tensor(0.5)
    pyro.clear_param_store()
    guide = AutoFlow(shapes_model, partial(pyroflows.realnvp, num_layers=2, hidden=(8,)))
    guide(y)
    with torch.no_grad():
        guide.flow_params.add_(0.1 * torch.randn_like(guide.flow_params))
    reparam = guide.neutra_reparam(y)
    u = torch.randn(7, guide.latent_dim)
    out = reparam.transform_sample(u)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"s": (7,), "theta": (7, 3), "p": (7, 4), "L": (7, 2, 2)}
    x = guide.get_transform()(u[2])
    torch.testing.assert_close(out["s"][2], x[0].exp())
    torch.testing.assert_close(out["theta"][2], x[1:4])
    torch.testing.assert_close(reparam.transform_sample(u[2])["theta"], out["theta"][2])  # one draw, unbatched
