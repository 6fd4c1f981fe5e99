"""The code shown in the documentation runs: the new-layer how-to (docs/examples/sinh_arcsinh.py) satisfies what
every layer must, and the quick-start scripts run end to end with few steps."""

from __future__ import annotations

import importlib.util
import math
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyroflows
import pyroflows.infer
from pyroflows import _arviz_compat as compat

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def SinhArcsinh():
    return _load("sinh_arcsinh").SinhArcsinh


def _perturbed(SinhArcsinh, dim=3):
    t = SinhArcsinh(dim).double()
    with torch.no_grad():
        t.skew.copy_(torch.linspace(-0.8, 0.8, dim, dtype=torch.float64))
        t.log_tail.copy_(torch.linspace(-0.5, 0.4, dim, dtype=torch.float64))
    return t


def test_new_layer_is_identity_at_init(SinhArcsinh):
    t = SinhArcsinh(4)
    x = torch.randn(5, 4)
    y, log_det = t.forward_and_log_det(x)
    assert torch.allclose(y, x, atol=1e-6)
    assert torch.allclose(log_det, torch.zeros(5), atol=1e-6)


@pytest.mark.parametrize("batch_shape", [(), (7,), (2, 3)], ids=str)
def test_new_layer_round_trip_and_shapes(SinhArcsinh, batch_shape):
    t = _perturbed(SinhArcsinh)
    x = 2.0 * torch.randn(batch_shape + (3,), dtype=torch.float64)
    y = t(x)
    x_back, inv_log_det = t.inverse_and_log_det(y.clone())  # a fresh tensor: no remembered pair, a real inverse
    assert y.shape == x.shape
    assert torch.allclose(x_back, x, atol=1e-10)
    fwd_log_det = t.log_abs_det_jacobian(x, y)
    assert fwd_log_det.shape == batch_shape
    assert torch.allclose(inv_log_det, -fwd_log_det, atol=1e-10)


def test_new_layer_log_det_matches_autograd_jacobian(SinhArcsinh):
    t = _perturbed(SinhArcsinh)
    x = 2.0 * torch.randn(6, 3, dtype=torch.float64)
    _, log_det = t.forward_and_log_det(x)
    y = t(x).detach()
    _, inv_log_det = t.inverse_and_log_det(y)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: t.forward_and_log_det(v)[0], x[i])
        assert torch.allclose(log_det[i], torch.linalg.slogdet(jac)[1], atol=1e-10)
        jac_inv = torch.autograd.functional.jacobian(lambda v: t.inverse_and_log_det(v)[0], y[i])
        assert torch.allclose(inv_log_det[i], torch.linalg.slogdet(jac_inv)[1], atol=1e-10)


def test_new_layer_log_det_stays_finite_in_the_tails(SinhArcsinh):
    t = _perturbed(SinhArcsinh)
    x = torch.tensor([[-1e6, 0.0, 1e6], [1e3, -1e3, 1e-3]], dtype=torch.float64)
    _, log_det = t.forward_and_log_det(x)
    assert bool(torch.isfinite(log_det).all())


def test_new_layer_trains_as_a_guide(SinhArcsinh):
    """The how-to's layer composes with a builder and trains in AutoNormalizingFlow: it fits a skewed target."""

    def model():
        pyro.sample("z", dist.Gumbel(torch.zeros(2), torch.ones(2)).to_event(1))

    def flow(dim):
        return pyroflows.Compose([SinhArcsinh(dim), pyroflows.realnvp(dim, num_layers=2, hidden=(16,))])

    guide = AutoNormalizingFlow(model, flow)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), Trace_ELBO(num_particles=16, vectorize_particles=True))
    losses = [svi.step() for _ in range(60)]
    params = dict(pyro.get_param_store().named_parameters())
    assert any(name.endswith("skew") for name in params), sorted(params)
    assert sum(losses[-15:]) / 15 < sum(losses[:15]) / 15


def test_new_layer_in_a_density_model(SinhArcsinh):
    model = pyroflows.FlowDensity(pyroflows.Compose([SinhArcsinh(2), pyroflows.realnvp(2, num_layers=2)]), (2,))
    x = torch.randn(10, 2)
    assert model.log_prob(x).shape == (10,)
    assert model.sample(4).shape == (4, 2)


def test_quickstart_guide_runs():
    quickstart = _load("quickstart_guide")
    guide, posterior = quickstart.main(num_steps=5)
    assert posterior["a"].numel() == posterior["b"].numel() == 2000
    assert isinstance(guide.transform, pyroflows.Compose)


def test_quickstart_guide_save_and_load(tmp_path):
    """The guide page's saving/loading note: load_guide into a freshly built guide gives the same guide."""
    quickstart = _load("quickstart_guide")
    guide, _ = quickstart.main(num_steps=3)
    pyroflows.infer.save_guide(guide, tmp_path / "guide.pt")
    y = torch.ones(20)

    def draws(g):
        torch.manual_seed(0)
        with torch.no_grad():
            return [g(y) for _ in range(3)]

    expected = draws(guide)
    pyro.clear_param_store()
    fresh = pyroflows.AutoFlow(quickstart.model, partial(pyroflows.realnvp, num_layers=8))
    pyroflows.infer.load_guide(fresh, tmp_path / "guide.pt", y)
    for a, b in zip(expected, draws(fresh)):
        for site in a:
            torch.testing.assert_close(a[site], b[site], rtol=0, atol=0)


def test_quickstart_diagnostics_runs():
    quickstart = _load("quickstart_diagnostics")
    results = quickstart.main(num_steps=10, num_samples=100)
    assert list(results) == ["AutoNormal", "RealNVP flow"]
    for r in results.values():
        psis = r["psis"]
        assert psis.num_samples == 100 and math.isfinite(psis.khat) and 1 <= psis.ess <= 100
        assert math.isfinite(psis.elbo) and psis.iw_elbo >= psis.elbo
        table = r["table"]
        assert list(table.index) == ["mu", "tau"] + [f"theta[{school}]" for school in quickstart.SCHOOLS]
        assert np.isfinite(table.to_numpy(dtype=float)).all()
        assert math.isfinite(r["loo"].elpd_loo) and math.isfinite(r["az_loo"]["elpd_loo"])
        posterior = compat.group(r["idata"], "posterior")
        assert posterior["theta"].dims == ("chain", "draw", "school")
        stats = compat.group(r["idata"], "sample_stats")
        assert stats["log_p"].shape == stats["log_q"].shape == (1, 100)


def test_quickstart_density_runs(tmp_path):
    quickstart = _load("quickstart_density")
    result = quickstart.main(steps=2, out=str(tmp_path / "run"))
    assert result.step == 2
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert (tmp_path / "run" / "my_samples.png").is_file()


def test_conditional_sbi_example_runs_and_its_likelihood_is_exact():
    """docs/examples/conditional_sbi.py with a few steps; its exact two-moons likelihood integrates to one over x
    (quadrature on a fine grid around the moon, tolerance 2e-2) and the simulator's draws have finite likelihood."""
    sbi = _load("conditional_sbi")
    result = sbi.main(steps=20, n_train=2000, n_obs=2)
    assert set(result) == {"test_nll", "tv_mean", "coverage_90"} and 0 <= result["tv_mean"] <= 1
    theta = torch.tensor([0.3, -0.5], dtype=torch.float64)
    centre = sbi.shift(theta) + torch.tensor([0.25, 0.0], dtype=torch.float64)
    n, half = 801, 0.2
    axis = torch.linspace(-half, half, n, dtype=torch.float64)
    xs = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2) + centre
    total = float(sbi.log_likelihood(xs, theta).exp().sum() * (axis[1] - axis[0]) ** 2)
    assert math.isclose(total, 1.0, abs_tol=2e-2), total
    t, x = sbi.simulate(100, torch.Generator().manual_seed(0))
    assert torch.isfinite(sbi.log_likelihood(x.double(), t.double())).all()


def test_conditional_vae_example_runs():
    """docs/examples/conditional_vae.py with a few steps: both VAEs train, the flow guide's parameters are in Pyro's
    param store, and the importance-weighted bound is at least the ELBO (same draws: log-mean-exp >= mean)."""
    vae = _load("conditional_vae")
    rows = vae.main(steps=3)
    assert [r["flow_layers"] for r in rows] == [0, 4] and rows[1]["params"] > rows[0]["params"]
    for r in rows:
        assert math.isfinite(r["test_elbo"]) and r["test_iw100"] >= r["test_elbo"] - 1e-4
    assert any(name.startswith("flow$$$") for name in pyro.get_param_store().keys())
