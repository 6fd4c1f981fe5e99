"""Out-of-distribution scores: exact values on small cases, the score directions, a flow fooled by constant images
and typicality catching them, and errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch

import pyroflows
from pyroflows.ood import nll_scores, roc_auc, roc_curve, typicality_scores


def test_roc_auc_exact_values():
    assert roc_auc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5  # all ties
    assert math.isclose(roc_auc([0.1, 0.2, 0.3], [0.25, 0.4]), 5 / 6)  # 5 of 6 pairs ordered
    fpr, tpr = roc_curve([0.1, 0.2, 0.3], [0.25, 0.4])
    area = float(torch.trapezoid(tpr, fpr))
    assert math.isclose(area, 5 / 6)  # the curve's area is the statistic (no ties)
    g = torch.Generator().manual_seed(0)
    same = [roc_auc(torch.randn(50, generator=g), torch.randn(50, generator=g)) for _ in range(200)]
    assert abs(sum(same) / 200 - 0.5) < 0.02  # chance: 0.5 ± 4 standard errors (sd 0.058 / √200)


def test_typicality_exact_values_and_batches():
    nll = torch.tensor([1.0, 3.0, 2.5, 2.5, 9.0])
    assert torch.allclose(typicality_scores(nll, 2.0), torch.tensor([1.0, 1.0, 0.5, 0.5, 7.0], dtype=torch.float64))
    assert torch.allclose(typicality_scores(nll, 2.0, batch_size=2), torch.tensor([0.0, 0.5], dtype=torch.float64))


def test_constant_images_fool_the_likelihood_but_not_typicality():
    """A RealNVP fitted to 2-D data from N(0, diag(1, 0.01)) gives the single point at the mode a likelihood above
    every training point: by NLL the mode looks *more* in-distribution than the data (AUROC below 0.5), while its
    typicality score (distance of the NLL from the entropy) flags it (AUROC near 1)."""
    torch.manual_seed(0)
    train = torch.randn(4000, 2) * torch.tensor([1.0, 0.1])
    test = torch.randn(500, 2) * torch.tensor([1.0, 0.1])
    model = pyroflows.FlowDensity(pyroflows.realnvp(2, num_layers=2, hidden=(16,)), (2,))
    pyroflows.train.fit(model, train, num_steps=300, batch_size=256, lr=1e-2, device="cpu", progress=False)
    constant = torch.zeros(200, 2) + 0.01 * torch.randn(200, 2) * torch.tensor([1.0, 0.1])  # near the mode
    entropy = float(nll_scores(model, train[:2000]).mean())
    nll_in, nll_out = nll_scores(model, test), nll_scores(model, constant)
    assert roc_auc(nll_in, nll_out) < 0.3
    assert roc_auc(typicality_scores(nll_in, entropy), typicality_scores(nll_out, entropy)) > 0.8


def test_nll_scores_match_bits_per_dim_for_pixels():
    from pyroflows.data import load_digits

    model = pyroflows.FlowDensity(pyroflows.glow((1, 8, 8), levels=1, num_layers=1, hidden=4), (1, 8, 8))
    test = load_digits("test")
    scores = nll_scores(model, test, batch_size=64, seed=3)
    assert scores.shape == (len(test),)
    expected = pyroflows.train.evaluate(model, test, seed=3, batch_size=64)
    assert math.isclose(float(scores.mean()), expected, rel_tol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: roc_auc([], [1.0]), "no scores"),
        (lambda: roc_auc([float("nan")], [1.0]), "NaN"),
        (lambda: typicality_scores([1.0], 1.0, batch_size=2), "no batch"),
        (lambda: typicality_scores([1.0], 1.0, batch_size=0), "batch_size"),
        (
            lambda: nll_scores(pyroflows.FlowDensity(pyroflows.realnvp(2), (2,)), torch.zeros(3, 2, dtype=torch.long)),
            "n_bins",
        ),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plot_roc_writes_a_png(tmp_path):
    from PIL import Image

    from pyroflows.plots import plot_roc

    path = tmp_path / "roc.png"
    plot_roc({"nll": ([0.1, 0.2], [0.3, 0.4]), "typicality": ([0.3, 0.1], [0.2, 0.5])}, path)
    assert Image.open(path).size[0] > 100
