"""pyroflows.diagnostics.invertibility: exact singular values on affine maps, residual blocks' bounds and
fixed-point iterations, a numerically non-invertible map flagged, bad input refused, the flow left untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyro.distributions.transforms import LowerCholeskyAffine
from torch.distributions.transforms import AffineTransform

from pyroflows import autoregressive_flow
from pyroflows.diagnostics import invertibility
from pyroflows.transforms import ResidualBlock


def test_affine_map_singular_values_are_exact():
    g = torch.Generator().manual_seed(0)
    tril = torch.tril(torch.randn(4, 4, generator=g)) + 3 * torch.eye(4)
    sv = torch.linalg.svdvals(tril)
    report = invertibility(LowerCholeskyAffine(torch.zeros(4), tril), torch.randn(16, 4, generator=g), num_iters=200)
    np.testing.assert_allclose(report.lipschitz, float(sv.max()), rtol=1e-3)
    np.testing.assert_allclose(report.inverse_lipschitz, 1 / float(sv.min()), rtol=1e-3)
    np.testing.assert_allclose(report.condition, float(sv.max() / sv.min()), rtol=2e-3)
    assert report.invertible and report.error32.max() < 1e-5 and report.error64.max() < 1e-12
    assert report.fixed_point_iterations == {}
    assert set(report.summary()) >= {"error32_max", "lipschitz_q90", "condition_q99"}


@pytest.mark.parametrize("coeff", [0.5, 0.9])
def test_residual_block_is_bi_lipschitz_within_its_coefficient(coeff):
    torch.manual_seed(0)
    block = ResidualBlock(3, hidden=(16,), coeff=coeff, logdet="exact")
    x = torch.randn(32, 3)
    report = invertibility(block, x)
    assert report.lipschitz.max() <= 1 + coeff + 1e-4  # Lip(x + g) <= 1 + Lip(g)
    assert report.inverse_lipschitz.max() <= 1 / (1 - coeff) + 1e-3  # Lip((x + g)^-1) <= 1 / (1 - Lip(g))
    assert report.invertible and report.fixed_point_iterations["flow"] >= 1


def test_autoregressive_layers_report_their_jacobi_passes():
    """The report names each autoregressive layer of a composition with the passes its inverse took (between 1 and
    D; here the layers are off their identity init, so more than one)."""
    torch.manual_seed(0)
    flow = autoregressive_flow(6, num_layers=2, hidden=(16,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    report = invertibility(flow, torch.randn(32, 6))
    assert report.invertible and len(report.fixed_point_iterations) == 2
    assert all(1 < n <= 6 for n in report.fixed_point_iterations.values()), report.fixed_point_iterations


def test_a_numerically_non_invertible_map_is_flagged():
    """y = 1e4 + 1e-6 x: invertible in exact arithmetic, but float32 keeps none of x's bits beside 1e4."""
    f = AffineTransform(torch.tensor(1e4), torch.tensor(1e-6))
    with pytest.warns(UserWarning, match="numerically non-invertible on 8 of 8 inputs"):
        report = invertibility(f, torch.randn(8, 1) + 2.0)
    assert not report.invertible
    assert report.error64.max() < 1e-6 < report.error32.min()  # float64 still resolves it
    np.testing.assert_allclose(report.inverse_lipschitz, 1e6, rtol=1e-3)


def test_the_flow_is_left_as_it_was():
    block = ResidualBlock(2, hidden=(8,)).double().train()
    invertibility(block, torch.randn(4, 2, dtype=torch.float64))
    assert block.training and next(block.parameters()).dtype == torch.float64
    assert all(p.requires_grad for p in block.parameters())


@pytest.mark.parametrize(
    "x, kwargs, message",
    [
        (torch.tensor([[float("nan"), 0.0]]), {}, "x contains NaN or inf"),
        (torch.zeros(2), {}, "non-empty batch dim"),
        (torch.zeros(0, 2), {}, "non-empty batch dim"),
        (torch.zeros(3, 2), {"num_iters": 0}, "num_iters must be a positive int"),
        (torch.zeros(3, 2), {"tolerance": -1.0}, "tolerance must be a finite number > 0"),
        (torch.zeros(3, 2, dtype=torch.long), {}, "floating-point tensor"),
    ],
)
def test_bad_input(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        invertibility(ResidualBlock(2, hidden=(8,)), x, **kwargs)


def test_fit_records_invertibility_at_each_evaluation(tmp_path, capfd):
    import json

    from pyroflows.data import load_digits
    from pyroflows.train import build_density, fit

    torch.manual_seed(0)
    model = build_density("realnvp", (1, 8, 8), levels=1, num_layers=1, hidden=4)
    data = load_digits("train"), load_digits("test")
    result = fit(model, *data, num_steps=4, eval_every=2, batch_size=32, device="cpu", progress=False,
                 out=tmp_path, check_invertibility=True)  # fmt: skip
    assert [e["step"] for e in result.evals] == [2, 4]
    for record in result.evals:
        assert record["inv_error32_max"] < 1e-3 and record["inv_error64_max"] < 1e-9
        assert record["inv_condition_max"] >= 1.0 and record["inv_lipschitz_max"] > 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("inv_condition_max" in line for line in lines) == 2
    assert "round trip " in capfd.readouterr().err


def test_a_slow_fixed_point_is_reported_not_raised():
    """coeff near 1 converges like coeff**k: with max_iter=3 the inverse stops early; the report says so."""
    torch.manual_seed(0)
    block = ResidualBlock(2, hidden=(8,), coeff=0.99, max_iter=3)
    with pytest.warns(UserWarning, match="fixed-point inverse stopped at max_iter"):
        report = invertibility(block, 3 * torch.randn(6, 2))
    assert not report.inverse_converged and report.fixed_point_iterations == {"flow": 3}
    assert block.on_fail == "raise"  # the caller's block is unchanged
