"""Latent-space tools: encode/decode round trips for every image family, interpolation paths, attribute
manipulation, and the errors for bad input. Round trips in float64: 1e-8 (glow, realnvp; residual to its
fixed-point tolerance, 1e-8 with atol 1e-12)."""

from __future__ import annotations

import pytest
import torch

import pyroflows
from pyroflows.latent import attribute_direction, interpolate_latents

SHAPE = (1, 8, 8)


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "glow":
        flow = pyroflows.glow(SHAPE, levels=2, num_layers=2, hidden=8)
    elif kind == "realnvp":
        flow = pyroflows.realnvp(SHAPE, num_layers=1, hidden=8, levels=2)
    else:
        flow = pyroflows.residual_flow(SHAPE, num_layers=1, hidden=8, levels=2, logdet="exact", atol=1e-12, rtol=1e-12)
    model = pyroflows.FlowDensity(flow, SHAPE).double()
    model.log_prob(torch.rand(16, *SHAPE, dtype=torch.float64) * 0.9 + 0.05)  # ActNorm's data-dependent init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", ["glow", "realnvp", "residual"])
def test_encode_decode_round_trip(kind):
    model = _model(kind)
    x = torch.rand(4, *SHAPE, dtype=torch.float64) * 0.9 + 0.05
    z = model.encode(x)
    assert z.shape == (4, *model.latent_shape)
    assert torch.allclose(model.decode(z), x, atol=1e-8)
    # integer pixels: the bits_per_dim dequantisation, and decode with n_bins gives the pixels back
    pixels = torch.randint(0, 17, (4, *SHAPE))
    z = model.encode(pixels, n_bins=17, generator=torch.Generator().manual_seed(0))
    back = model.decode(z, n_bins=17)
    assert back.dtype == torch.long and torch.equal(back, pixels)
    # the latent is the flow's: log p(x) = log N(z) + log|det|
    log_det = model.flow.log_abs_det_jacobian(x, model.flow(x))
    expected = model.base_dist().log_prob(model.encode(x)) + log_det
    assert torch.allclose(model.log_prob(x), expected, atol=1e-8)


def test_interpolation_paths():
    model = _model("glow")
    x0, x1 = (torch.rand(*SHAPE, dtype=torch.float64) * 0.9 + 0.05 for _ in range(2))
    for path in ("linear", "slerp"):
        images = model.interpolate(x0, x1, num=5, path=path)
        assert images.shape == (5, *SHAPE)
        assert torch.allclose(images[0], x0, atol=1e-8) and torch.allclose(images[-1], x1, atol=1e-8)
    z0, z1 = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    z1 = z1 * z0.norm() / z1.norm()  # equal norms: slerp stays on the sphere, linear cuts inside it
    slerp = interpolate_latents(z0, z1, 7, "slerp")
    assert torch.allclose(slerp.norm(dim=-1), z0.norm().expand(7), atol=1e-10)
    assert interpolate_latents(z0, z1, 7, "linear").norm(dim=-1)[3] < z0.norm()


def test_attribute_direction_and_manipulation():
    """The direction between two groups is the difference of their mean latents; manipulating by α moves the latent
    by α · direction (checked for a small α, whose images stay inside the data range, so no clipping); α = 0 gives
    the input back."""
    model = _model("realnvp")
    x = torch.rand(12, *SHAPE, dtype=torch.float64) * 0.9 + 0.05
    flags = torch.arange(12) % 3 == 0
    direction = attribute_direction(model, x, flags)
    z = model.encode(x)
    assert torch.allclose(direction, z[flags].mean(0) - z[~flags].mean(0))
    out = model.manipulate(x[:2], direction, [0.0, 0.02, 1.0])
    assert out.shape == (3, 2, *SHAPE)
    assert torch.allclose(out[0], x[:2], atol=1e-8)
    low, high = model._data_range()
    assert bool(((out[1] > low) & (out[1] < high)).all())
    assert torch.allclose(model.encode(out[1]), z[:2] + 0.02 * direction, atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.decode(torch.zeros(2, 16, 2, 2)), "another architecture"),
        (lambda m: m.encode(torch.zeros(2, 1, 4, 4)), "shape"),
        (lambda m: m.encode(torch.full((2, *SHAPE), 20)), r"\[0, 17\)"),
        (lambda m: m.interpolate(torch.rand(*SHAPE), torch.rand(*SHAPE), num=1), "num must be"),
        (lambda m: m.interpolate(torch.rand(*SHAPE), torch.rand(*SHAPE), path="cubic"), "path must be"),
        (lambda m: m.interpolate(torch.rand(2, *SHAPE), torch.rand(*SHAPE)), "one example"),
        (lambda m: m.manipulate(torch.rand(*SHAPE), torch.zeros(3), [1.0]), "latent shape"),
        (lambda m: attribute_direction(m, torch.rand(4, *SHAPE), torch.ones(4, dtype=torch.bool)), "with and without"),
        (lambda m: attribute_direction(m, torch.rand(4, *SHAPE), torch.tensor([0, 1, 2, 0])), "0/1"),
        (lambda m: attribute_direction(m, torch.rand(4, *SHAPE), torch.ones(3, dtype=torch.bool)), r"shape \(4,\)"),
    ],
)
def test_bad_input_is_named(call, match):
    model = pyroflows.FlowDensity(pyroflows.glow(SHAPE, levels=2, num_layers=1, hidden=4), SHAPE).eval()
    kwargs = {"n_bins": 17} if "full" in match or "0, 17" in match else {}
    with pytest.raises(ValueError, match=match):
        if kwargs:
            model.encode(torch.full((2, *SHAPE), 20), **kwargs)
        else:
            call(model)


def test_cif_has_no_deterministic_latent():
    model = pyroflows.CIFDensity(pyroflows.cif(2, num_layers=1, hidden=(4,)), (2,))
    with pytest.raises(TypeError, match="no deterministic latent"):
        model.encode(torch.zeros(3, 2))


def test_cli_interpolate_and_manipulate(tmp_path, capsys):
    """``pyroflows interpolate`` and ``pyroflows manipulate`` on a digits checkpoint write grids of the stated size;
    bad attributes and a conditional checkpoint are refused in one line."""
    from PIL import Image

    from pyroflows.cli import main

    run = tmp_path / "run"
    argv = ["fit", "--data", "digits", "--num-steps", "2", "--levels", "1", "--num-layers", "1", "--hidden", "4"]
    assert main([*argv, "--out", str(run), "--no-progress"]) == 0
    ckpt = str(run / "checkpoint.pt")
    grid = tmp_path / "interp.png"
    assert main(["interpolate", ckpt, "--pairs", "3", "--num", "4", "--path", "slerp", "--out", str(grid)]) == 0
    width, height = Image.open(grid).size
    assert abs(width / height - 4 / 3) < 0.1  # 3 rows of 4
    for attribute in ("thickness", "class:0,8"):
        out = tmp_path / f"{attribute.replace(':', '_')}.png"
        assert (
            main(["manipulate", ckpt, "--attribute", attribute, "--n", "2", "--alphas", "0,1", "--out", str(out)]) == 0
        )
        assert out.exists()
    capsys.readouterr()
    assert main(["manipulate", ckpt, "--attribute", "colour", "--out", str(tmp_path / "x.png")]) == 2
    assert "thickness or class:A,B" in capsys.readouterr().err
    assert main(["manipulate", ckpt, "--attribute", "class:0,42", "--out", str(tmp_path / "x.png")]) == 2
    assert "no image of class 42" in capsys.readouterr().err
    assert main(["interpolate", ckpt, "--num", "1", "--out", str(tmp_path / "x.png")]) == 2
