"""Hybrid models (a flow and a classifier on its latent): exact relations between the heads' figures, training on
the weighted objective, checkpoints and resume, evaluation, the open-set rule, the CLI and errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch

import pyroflows
from pyroflows import HybridDensity
from pyroflows.cli import main
from pyroflows.data import ImageDataset, load_digits
from pyroflows.ood import likelihood_threshold, open_set_predict
from pyroflows.train import build_density, evaluate, evaluate_hybrid, fit, load_density


def _blobs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separated 2-D Gaussian classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    return centres[y] + 0.7 * torch.randn(n, 2, generator=g), y


def _trained_head(model: HybridDensity) -> HybridDensity:
    """Random (non-zero) head weights, so the class figures are not all uniform."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_()
    return model


@pytest.mark.parametrize("head", ["linear", "pooled", "mlp"])
def test_figures_are_consistent(head):
    torch.manual_seed(0)
    flow = pyroflows.realnvp((1, 8, 8), levels=1, num_layers=1, hidden=8)
    model = _trained_head(HybridDensity(flow, (1, 8, 8), num_classes=4, lam=0.25, head=head)).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    y = torch.tensor([0, 1, 2, 3, 1])
    log_py = model.class_log_prob(x)
    assert log_py.shape == (5, 4)
    assert torch.allclose(log_py.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    log_px = model.log_prob(x)
    plain = pyroflows.FlowDensity(model.flow, (1, 8, 8)).double().log_prob(x)
    assert torch.allclose(log_px, plain)  # the density is the flow's, whatever the head
    picked = log_py.gather(-1, y[:, None]).squeeze(-1)
    assert torch.allclose(model.class_log_prob(x, y), picked)
    assert torch.allclose(model.joint_log_prob(x, y), log_px + picked)
    assert torch.allclose(model.objective(x, y), 0.25 * log_px + picked)
    assert torch.allclose(model(x, y), model.objective(x, y))
    assert torch.allclose(model(x), log_px)
    assert torch.equal(model.predict(x), log_py.argmax(-1))
    # the logits act on the exact latent: the head of encode(x)
    assert torch.allclose(model.logits(model.encode(x)).log_softmax(-1), log_py)
    features = model.head[0].in_features if head == "mlp" else model.head.in_features
    expected = model.latent_shape[0] if head == "pooled" else math.prod(model.latent_shape)
    assert features == expected


def test_fresh_head_is_uniform():
    model = HybridDensity(pyroflows.realnvp(2, num_layers=2), (2,), num_classes=5)
    x = torch.randn(7, 2)
    assert torch.allclose(model.class_log_prob(x), torch.full((7, 5), -math.log(5)))


def test_bad_arguments_are_refused():
    flow = pyroflows.realnvp(2, num_layers=1)
    for lam in (-0.1, math.nan, math.inf, True, "1/D"):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            HybridDensity(flow, (2,), num_classes=3, lam=lam)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        HybridDensity(flow, (2,), num_classes=1)
    with pytest.raises(ValueError, match="head must be one of"):
        HybridDensity(flow, (2,), num_classes=3, head="conv")
    with pytest.raises(ValueError, match="hidden= is the size of the 'mlp' head"):
        HybridDensity(flow, (2,), num_classes=3, hidden=8)
    model = HybridDensity(flow, (2,), num_classes=3)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values from 0 to 3"):
        model.joint_log_prob(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        model.objective(x, torch.tensor([-1, 0, 0, 0]))
    with pytest.raises(ValueError, match="labels must be integers"):
        model.class_log_prob(x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) for inputs of batch shape \(4,\)"):
        model.class_log_prob(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="expects data of shape"):
        model.class_log_prob(torch.randn(4, 3))
    with pytest.raises(ValueError, match="a hybrid model needs an unconditional bijective flow"):
        build_density("cif-realnvp", (2,), hybrid={"num_classes": 3, "lam": 1.0})
    with pytest.raises(ValueError, match="bad hybrid options"):
        build_density("realnvp", (2,), hybrid={"classes": 3})


def test_fit_learns_both_tasks_and_lam_zero_is_a_classifier(tmp_path):
    """λ = 1: the classifier reaches high accuracy and the likelihood improves on the untrained flow; λ = 0 trains
    the classifier alone (the objective's gradient is that of log p(y|x))."""
    x, y = _blobs(1200)
    xt, yt = _blobs(400, seed=1)
    torch.manual_seed(0)
    model = build_density("realnvp", (2,), num_layers=4, hidden=(32, 32), hybrid={"num_classes": 3, "lam": 1.0})
    before = evaluate_hybrid(model, (xt, yt))
    result = fit(model, (x, y), (xt, yt), num_steps=300, lr=3e-3, device="cpu", progress=False, report=False)
    after = result.evals[-1]
    assert set(after) == {"step", "test_nll", "test_accuracy", "test_class_nll"}
    assert after["test_accuracy"] > 0.9  # the Bayes classifier gets about 0.96
    assert after["test_nll"] < before["nll"] - 0.5
    assert after["test_class_nll"] < before["class_nll"] / 1.5  # from log 3 (uniform)
    zero = HybridDensity(pyroflows.realnvp(2, num_layers=2), (2,), num_classes=3, lam=0.0)
    zero = _trained_head(zero)
    loss = zero.objective(x[:32], y[:32])
    assert torch.allclose(loss, zero.class_log_prob(x[:32], y[:32]))
    params = list(zero.parameters())
    g1 = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(zero.class_log_prob(x[:32], y[:32]).sum(), params, allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b)


def test_evaluate_hybrid_matches_the_model():
    x, y = _blobs(300)
    model = _trained_head(HybridDensity(pyroflows.realnvp(2, num_layers=2), (2,), num_classes=3))
    figures = evaluate_hybrid(model, (x, y), batch_size=64)
    model.eval()
    with torch.no_grad():
        assert math.isclose(figures["nll"], float(-model.log_prob(x).double().mean()), rel_tol=1e-5)
        assert math.isclose(figures["accuracy"], float((model.predict(x) == y).double().mean()))
        assert math.isclose(figures["class_nll"], float(-model.class_log_prob(x, y).double().mean()), rel_tol=1e-5)
    assert math.isclose(evaluate(model, x), figures["nll"], rel_tol=1e-9)
    with pytest.raises(TypeError, match="must be a pyroflows.HybridDensity"):
        evaluate_hybrid(pyroflows.FlowDensity(pyroflows.realnvp(2, num_layers=1), (2,)), (x, y))
    with pytest.raises(ValueError, match="give evaluation data as a \\(data, labels\\) pair"):
        evaluate_hybrid(model, x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        evaluate_hybrid(model, (x, y + 1))
    with pytest.raises(ValueError, match="has 300 items but labels of shape"):
        evaluate_hybrid(model, (x, y[:10]))


def test_images_checkpoint_resume_and_reload(tmp_path):
    """A digits hybrid: the labels come from the ImageDataset, the checkpoint rebuilds the hybrid, and a resumed run
    repeats the uninterrupted one."""
    train, test = load_digits("train"), load_digits("test")
    spec = dict(levels=1, num_layers=1, hidden=8, hybrid={"num_classes": 10, "lam": 1 / 64, "head": "pooled"})
    common = dict(batch_size=32, device="cpu", progress=False, report=False)
    torch.manual_seed(0)
    full = fit(build_density("glow", (1, 8, 8), **spec), train, test, num_steps=6, out=tmp_path / "a", **common)
    torch.manual_seed(0)
    fit(build_density("glow", (1, 8, 8), **spec), train, test, num_steps=3, out=tmp_path / "b", **common)
    torch.manual_seed(1)
    resumed = fit(
        build_density("glow", (1, 8, 8), **spec), train, test, num_steps=6, out=tmp_path / "b", resume=True, **common
    )
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    model = load_density(full.checkpoint)
    assert isinstance(model, HybridDensity) and model.head_kind == "pooled" and model.lam == 1 / 64
    figures = evaluate_hybrid(model, test)
    assert figures["bpd"] == pytest.approx(full.evals[-1]["test_bpd"], rel=1e-6)
    assert figures["accuracy"] == pytest.approx(full.evals[-1]["test_accuracy"])
    unlabelled = ImageDataset(train.images, train.n_bins)
    with pytest.raises(ValueError, match="is a classifier too"):
        fit(build_density("glow", (1, 8, 8), **spec), unlabelled, num_steps=1, **common)
    wrong = ImageDataset(train.images, train.n_bins, train.labels + 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        fit(build_density("glow", (1, 8, 8), **spec), wrong, num_steps=1, **common)


def test_open_set_rule():
    """τ from a quantile rejects that share of the data it came from; predictions are the class or K, by the rule."""
    x, y = _blobs(2000)
    model = _trained_head(HybridDensity(pyroflows.realnvp(2, num_layers=2), (2,), num_classes=3))
    for q in (0.05, 0.2):
        tau = likelihood_threshold(model, x, quantile=q)
        nll = -model.eval().log_prob(x).detach().double()
        assert abs(float((nll > tau).double().mean()) - q) < 0.002
    tau = likelihood_threshold(model, x, quantile=0.1)
    pred = open_set_predict(model, x, tau)
    with torch.no_grad():
        nll = -model.log_prob(x).double()
        expected = torch.where(nll > tau, 3, model.predict(x))
    assert torch.equal(pred, expected)
    assert set(pred.unique().tolist()) <= {0, 1, 2, 3} and int((pred == 3).sum()) > 0
    far = torch.full((4, 2), 50.0)
    assert torch.equal(open_set_predict(model, far, tau), torch.full((4,), 3))
    for q in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"quantile must lie in \(0, 1\)"):
            likelihood_threshold(model, x, quantile=q)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        open_set_predict(model, x, math.nan)
    with pytest.raises(TypeError, match="must be a pyroflows.HybridDensity"):
        open_set_predict(pyroflows.FlowDensity(pyroflows.realnvp(2, num_layers=1), (2,)), x, tau)


def test_cli_hybrid(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["fit", "--flow", "realnvp", "--levels", "1", "--num-layers", "1", "--hidden", "8", "--num-steps", "4"]
    assert main([*argv, "--hybrid", "--lam", "1/D", "--head", "mlp", "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "hybrid: 10 classes, lam 0.015625, mlp head" in out.err
    assert "test accuracy" in out.out
    model = load_density(run / "checkpoint.pt")
    assert isinstance(model, HybridDensity) and model.head_kind == "mlp"
    assert main(["eval", str(run / "checkpoint.pt")]) == 0
    assert "accuracy" in capsys.readouterr().out
    for extra, message in (
        (["--hybrid", "--lam", "-1"], "lam must be a finite number >= 0"),
        (["--hybrid", "--lam", "half"], "--lam must be a number >= 0 or 1/D"),
        (["--hybrid", "--conditional"], "choose one"),
        (["--lam", "1"], "apply to --hybrid models only"),
    ):
        assert main([*argv, *extra, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
