"""Continuously indexed flows: the model is a normalised density, the importance-weighted estimate converges to its
exact log-likelihood, the ELBO is below it, samples follow it; training through train.fit and the CLI.

The exact marginal ``p(x) = ∫ p(x, u) du`` of a 1-D model with one indexed layer and a 1-D ``u`` is computed by
quadrature in float64 (trapezoid on 4001 points over [-40, 40]; the bounded log-scales keep p(u|z) within a scale
of e³ ≈ 20): it is the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import pyroflows
from pyroflows.cif import CIFDensity, CIFFlow, CIFLayer, cif
from pyroflows.transforms import AffineCoupling, ResidualBlock


def _random_model(seed=0, scale=0.3):
    """A 1-D CIF density with one indexed layer (u_dim 1), every parameter perturbed so p, q, s, t are non-trivial."""
    torch.manual_seed(seed)
    flow = cif(1, num_layers=1, hidden=(8,), u_dim=1, cif_hidden=(8,))
    model = CIFDensity(flow, (1,), num_samples=16).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def _exact_log_prob(model, x, n=4001, width=40.0):
    """log ∫ p(x, u) du by the trapezoid rule over u, for a flow [ordinary..., CIFLayer, ordinary...] with u_dim 1."""
    parts = list(model.flow.parts)
    i = next(j for j, p in enumerate(parts) if isinstance(p, CIFLayer))
    out = []
    for xi in x.reshape(-1, 1):
        v, log_det = xi, torch.zeros((), dtype=torch.float64)
        for p in parts[:i]:
            v, ld = pyroflows.transforms.forward_and_log_det(p, v)
            log_det = log_det + ld
        grid = torch.linspace(-width, width, n, dtype=torch.float64).unsqueeze(-1)
        terms = parts[i].terms(v.expand(n, 1), u=grid)
        z, ld_u = terms["z"], log_det + terms["log_det"]
        for p in parts[i + 1 :]:
            z, ld = pyroflows.transforms.forward_and_log_det(p, z)
            ld_u = ld_u + ld
        log_joint = model.base_dist().log_prob(z) + ld_u + terms["log_p"]
        du = float(grid[1, 0] - grid[0, 0])
        weights = torch.full((n,), du, dtype=torch.float64)
        weights[0] = weights[-1] = du / 2
        out.append(torch.logsumexp(log_joint + weights.log(), 0))
    return torch.stack(out)


@torch.no_grad()
def test_exact_marginal_is_normalised():
    model = _random_model()
    xs = torch.linspace(-15, 15, 1201, dtype=torch.float64).unsqueeze(-1)
    log_p = _exact_log_prob(model, xs, n=2001)
    total = float(torch.trapezoid(log_p.exp(), xs[:, 0]))
    assert math.isclose(total, 1.0, abs_tol=2e-4), total


@torch.no_grad()
def test_importance_weighted_estimate_converges_to_the_exact_log_likelihood():
    """E[IW_K] increases with K and reaches log p(x) (Burda et al.): K=1 (the ELBO) is below the exact value by
    more than its noise, K=4096 is within 0.02 nats of it."""
    model = _random_model(seed=0)
    x = torch.tensor([[-1.0], [0.3], [2.0]], dtype=torch.float64)
    exact = _exact_log_prob(model, x)
    torch.manual_seed(0)
    elbo = torch.stack([model.elbo(x) for _ in range(400)]).mean(0)
    iw_16 = torch.stack([model.log_prob(x, num_samples=16) for _ in range(100)]).mean(0)
    iw_big = model.log_prob(x, num_samples=4096)
    assert (elbo < iw_16).all() and (iw_16 <= exact + 0.01).all(), (elbo, iw_16, exact)
    assert (exact - elbo > 0.01).all(), "the ELBO should be strictly below log p(x) for a non-trivial model"
    assert torch.allclose(iw_big, exact, atol=0.02), (iw_big, exact)


@torch.no_grad()
def test_single_draw_weight_is_unbiased_for_the_likelihood():
    """E_q[exp(log-weight)] = p(x): the mean of 20000 weights matches the quadrature value within 4 standard
    errors."""
    model = _random_model(seed=2)
    x = torch.tensor([[0.7]], dtype=torch.float64)
    exact = float(_exact_log_prob(model, x).exp())
    torch.manual_seed(1)
    weights = model._log_weights(x.expand(20000, 1), 1).exp().reshape(-1)
    mean, se = float(weights.mean()), float(weights.std() / math.sqrt(weights.numel()))
    assert abs(mean - exact) < 4 * se + 1e-12, (mean, exact, se)


@torch.no_grad()
def test_samples_follow_the_model_density():
    """The mean and variance of 40000 samples match the quadrature moments of the exact density (tolerance: 5
    standard errors)."""
    model = _random_model(seed=2)
    xs = torch.linspace(-15, 15, 1201, dtype=torch.float64).unsqueeze(-1)
    p = _exact_log_prob(model, xs, n=2001).exp()
    assert math.isclose(float(torch.trapezoid(p, xs[:, 0])), 1.0, abs_tol=1e-4), "mass outside the grid"
    mean = float(torch.trapezoid(p * xs[:, 0], xs[:, 0]))
    var = float(torch.trapezoid(p * (xs[:, 0] - mean) ** 2, xs[:, 0]))
    torch.manual_seed(2)
    s = model.sample(40000)[:, 0]
    n = s.numel()
    assert abs(float(s.mean()) - mean) < 5 * math.sqrt(var / n), (float(s.mean()), mean)
    assert abs(float(s.var()) - var) < 5 * var * math.sqrt(2 / n) * 2, (float(s.var()), var)


def test_fresh_cif_layer_is_its_bijection():
    """All last layers start at zero: u ~ N(0, 1) under p and q, s = t = 0, so log-weight = the bijection's log-det."""
    torch.manual_seed(0)
    coupling = AffineCoupling(3, hidden=(8,))
    with torch.no_grad():
        for p in coupling.parameters():
            p.add_(0.3 * torch.randn_like(p))
    layer = CIFLayer(coupling, (3,), u_dim=2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    z, log_weight = layer(x)
    y, log_det = pyroflows.transforms.forward_and_log_det(coupling, x)
    assert torch.allclose(z, y) and torch.allclose(log_weight, log_det)


def test_cif_layer_log_det_against_autograd():
    """For a fixed u, log|det dz/dx| equals the autograd Jacobian's (float64, 1e-10), vectors and images."""
    torch.manual_seed(0)
    for shape, bijection in (
        ((3,), AffineCoupling(3, hidden=(8,))),
        ((2, 3, 3), ResidualBlock((2, None, None), hidden=4, coeff=0.9, logdet="exact")),
    ):
        event = shape if len(shape) == 1 else (shape[0], None, None)
        layer = CIFLayer(bijection, event, u_dim=1, hidden=(8,) if len(shape) == 1 else 4).double().eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.2 * torch.randn_like(p))
        x = torch.randn(shape, dtype=torch.float64)
        u = layer.terms(x)["u"].detach()
        log_det = layer.terms(x, u=u)["log_det"]

        def z_of(v, layer=layer, shape=shape, u=u):
            return layer.terms(v.reshape(shape), u=u)["z"].reshape(-1)

        jac = torch.autograd.functional.jacobian(z_of, x.reshape(-1))
        assert math.isclose(float(torch.linalg.slogdet(jac)[1]), float(log_det), abs_tol=1e-10)
        # generate inverts forward for the same u: z -> x
        z = layer.terms(x, u=u)["z"]
        shift, log_scale = layer._affine(u)
        back = pyroflows.transforms.inverse_only(bijection, z * log_scale.exp() + shift)
        assert torch.allclose(back, x, atol=1e-8)


def test_cif_builder_wraps_every_coupling_and_block():
    for flow, n in (
        (cif(3, num_layers=4, hidden=(8,)), 4),
        (cif(3, num_layers=2, hidden=(8,), base="residual"), 2),
        (cif((1, 4, 4), num_layers=1, hidden=4), 2),  # realnvp images, levels=1: num_layers + 1 couplings
        (cif((1, 4, 4), num_layers=1, hidden=4, base="residual", levels=2), 2),
    ):
        assert flow.num_indexed == n
        assert not any(isinstance(p, (AffineCoupling, ResidualBlock)) for p in flow.parts)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: cif((1, 8, 8), levels=2), "levels=1"),
        (lambda: cif(3, base="glow"), "unknown base"),
        (lambda: cif(3, u_dim=0), "u_dim"),
        (lambda: CIFDensity(pyroflows.realnvp(2), (2,)), "CIFFlow"),
        (lambda: CIFDensity(cif(2), (2,), num_samples=0), "num_samples"),
        (lambda: CIFLayer(AffineCoupling(2), (3, None, None)), "event_dim"),
        (lambda: CIFFlow([]), "at least one"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_distribution_is_refused_with_a_reason():
    with pytest.raises(TypeError, match="no exact density"):
        _ = CIFDensity(cif(2), (2,)).distribution


def test_training_raises_the_likelihood_and_the_bound_holds():
    """train.fit on two separated blobs: the importance-weighted test log-likelihood improves by more than 1 nat,
    and on average the ELBO is below the K=64 estimate (the bound; 4 standard errors of the mean difference)."""
    from pyroflows.train import evaluate, fit

    torch.manual_seed(0)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    data = centres[torch.randint(0, 2, (2048,))] + 0.4 * torch.randn(2048, 2)
    test = centres[torch.randint(0, 2, (512,))] + 0.4 * torch.randn(512, 2)
    model = CIFDensity(cif(2, num_layers=2, hidden=(16,), cif_hidden=(8,)), (2,), num_samples=16)
    before = evaluate(model, test)
    result = fit(model, data, test, num_steps=150, batch_size=128, lr=1e-2, device="cpu", progress=False)
    assert result.evals[-1]["test_nll"] < before - 1.0, (before, result.evals)
    model.eval()
    with torch.no_grad():
        gap = model.log_prob(test, num_samples=64) - model.elbo(test)
    assert float(gap.mean()) > -4 * float(gap.std()) / math.sqrt(gap.numel())


def test_build_density_checkpoint_and_cli(tmp_path, capsys):
    """``cif-realnvp`` by name: fit writes a checkpoint that load_density rebuilds as a CIFDensity; the CLI trains
    it on the digits, and fit refuses check_invertibility for it with a reason."""
    from pyroflows.cli import main
    from pyroflows.data import load_digits
    from pyroflows.train import build_density, fit, load_density

    torch.manual_seed(0)
    model = build_density("cif-realnvp", (1, 8, 8), levels=1, num_layers=1, hidden=4)
    assert isinstance(model, CIFDensity) and model.flow.num_indexed == 2
    result = fit(model, load_digits("train"), num_steps=2, out=tmp_path / "run", device="cpu", progress=False)
    loaded = load_density(result.checkpoint)
    assert isinstance(loaded, CIFDensity) and loaded.sample(2).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="continuously indexed"):
        fit(model, load_digits("train"), num_steps=1, device="cpu", progress=False, check_invertibility=True)
    argv = [
        "fit",
        "--data",
        "digits",
        "--flow",
        "cif-realnvp",
        "--num-steps",
        "2",
        "--num-layers",
        "1",
        "--levels",
        "1",
    ]
    assert main([*argv, "--hidden", "4", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert "cif-realnvp" in capsys.readouterr().err
    assert isinstance(load_density(tmp_path / "cli" / "checkpoint.pt"), CIFDensity)
