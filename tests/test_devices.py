"""Density models and training on every available device: the same code path runs on CPU here and in CI, and on
CUDA where a GPU is present (the ``cuda`` cases only exist on such a machine)."""

import math

import pytest
import torch

import pyroflows
from pyroflows.data import load_digits
from pyroflows.train import build_density, evaluate, fit, load_density

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def images(n, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 17, (n,) + shape, generator=g).float() + torch.rand((n,) + shape, generator=g)) / 17


@pytest.mark.parametrize("flow", ["glow", "realnvp", "residual"])
def test_log_prob_agrees_across_devices_and_inverts(device, flow):
    torch.manual_seed(0)
    options = {
        "glow": dict(levels=2, num_layers=2, hidden=16),
        "realnvp": dict(levels=2, num_layers=2),
        "residual": dict(levels=2, num_layers=1, hidden=16, logdet="exact"),
    }[flow]
    model = build_density(flow, (1, 8, 8), **options)
    x = images(64)
    model.log_prob(x)  # ActNorm init on CPU
    model.eval()
    reference = model.log_prob(x).detach()
    moved = model.to(device)
    with torch.no_grad():
        got = moved.log_prob(x.to(device))
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), reference, rtol=1e-4, atol=1e-3)
    z = moved.flow(x.to(device))
    back = pyroflows.inverse(moved.flow)(z)
    assert (back - x.to(device)).abs().max() < 1e-3
    samples = moved.sample(8, temperature=0.7)
    assert samples.device.type == device.type and bool(torch.isfinite(samples).all())


@pytest.mark.parametrize("amp", [False, True])
def test_fit_on_device_checkpoint_loads_on_cpu(device, amp, tmp_path):
    torch.manual_seed(0)
    model = build_density("glow", (1, 8, 8), levels=2, num_layers=2, hidden=16)
    result = fit(
        model,
        load_digits("train"),
        load_digits("test"),
        num_steps=30,
        batch_size=64,
        lr=2e-3,
        device=device,
        amp=amp,
        out=tmp_path,
        progress=False,
        ema=0.9,
    )
    assert all(math.isfinite(v) for v in result.losses) and result.losses[-1] < result.losses[0]
    assert next(result.model.parameters()).device.type == device.type
    on_cpu = load_density(tmp_path / "checkpoint.pt", map_location="cpu")
    cpu_bpd = evaluate(on_cpu, load_digits("test"), device="cpu")
    dev_bpd = evaluate(result.model, load_digits("test"), device=device)
    # same weights; on CUDA the noise generator differs from the CPU one, so only statistically equal there
    tol = 1e-4 if device.type == "cpu" else 0.02
    assert cpu_bpd == pytest.approx(dev_bpd, abs=tol)


def test_a_run_resumed_on_the_device_repeats_the_uninterrupted_one(device, tmp_path):
    """Checkpoints of a run on ``device`` hold that device's RNG states; resuming (the checkpoint read onto the
    device) restores them and repeats the uninterrupted run step for step."""
    digits = load_digits("train")
    kw = dict(batch_size=32, lr=2e-3, device=device, progress=False, checkpoint_every=4, eval_every=None)

    def model():
        torch.manual_seed(0)
        return build_density("glow", (1, 8, 8), levels=1, num_layers=2, hidden=8)

    whole = fit(model(), digits, num_steps=8, out=tmp_path / "whole", **kw)
    fit(model(), digits, num_steps=4, out=tmp_path / "parts", **kw)
    torch.manual_seed(123)  # another RNG state: the resume must restore the saved one
    resumed = fit(model(), digits, num_steps=8, out=tmp_path / "parts", resume=True, **kw)
    assert resumed.step == 8
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses), rtol=0, atol=1e-6)
    for (name, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, equal_nan=True, msg=name)
