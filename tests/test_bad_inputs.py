"""Bad input gets a clear error naming the problem, across the public functions and the command line (issue:
hostile inputs). One test per class of input; each asserts the error type and that the message names the argument
or the file, and, for the command line, exit status 2 with one error line."""

from __future__ import annotations

import gzip
import math
import pickle
import struct

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows import diagnostics as D
from pyroflows.cli import main
from pyroflows.data import dequantize, get_toy, load_digits, read_idx
from pyroflows.run import CheckpointError, check_device, check_seed
from pyroflows.train import build_density, evaluate, fit, load_density


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    argv = ["fit", "--flow", "realnvp", "--levels", "1", "--num-layers", "1", "--hidden", "4", "--num-steps", "2",
            "--batch-size", "16", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def cli_error(argv, capsys, command):
    """Runs the CLI expecting exit status 2; returns the one error line."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith(f"pyroflows {command}: error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------------------------ devices, seeds
@pytest.mark.parametrize(
    "device, message",
    [("bogus", "unknown device 'bogus'"), ("gpu:0", "unknown device"), (3.5, "device must be a string"),
     ("meta", "device 'meta' is not supported")],
)  # fmt: skip
def test_devices_are_checked_before_anything_else(device, message):
    with pytest.raises(ValueError, match=message):
        check_device("fit", device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda_is_not_reported_as_a_corrupted_checkpoint(tiny_run, capsys):
    for command in (["sample", str(tiny_run / "checkpoint.pt")], ["eval", str(tiny_run / "checkpoint.pt")]):
        line = cli_error([*command, "--device", "cuda"], capsys, command[0])
        assert "no usable CUDA" in line and "corrupted" not in line
    line = cli_error(["sample", str(tiny_run / "checkpoint.pt"), "--device", "bogus"], capsys, "sample")
    assert "unknown device 'bogus'" in line


@pytest.mark.parametrize("seed", [2**70, -1, 1.5, True])
def test_seeds_out_of_range(seed, capsys):
    with pytest.raises(ValueError, match="seed must be an int in \\[0, 2\\*\\*62\\)"):
        check_seed("fit", seed)
    if isinstance(seed, int) and not isinstance(seed, bool):
        line = cli_error(["fit", "--seed", str(seed), "--out", "unused"], capsys, "fit")
        assert "seed must be an int" in line


# ------------------------------------------------------------------------------------------------ data files
def _idx(images: np.ndarray) -> bytes:
    return (
        struct.pack(">4B", 0, 0, 0x08, images.ndim) + struct.pack(f">{images.ndim}I", *images.shape) + images.tobytes()
    )


def test_corrupt_and_truncated_gzip_idx_files_name_the_file(tmp_path):
    good = gzip.compress(_idx(np.zeros((4, 28, 28), np.uint8)))
    (tmp_path / "corrupt.gz").write_bytes(good[:10] + bytes(len(good) - 10))
    (tmp_path / "short.gz").write_bytes(good[: len(good) // 2])
    for name in ("corrupt.gz", "short.gz"):
        with pytest.raises(ValueError, match=f"{name}: corrupted or truncated gzip file"):
            read_idx(tmp_path / name)


def test_garbage_cifar_pickles_name_the_file_and_code_is_not_run(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x80\x04garbage")
    line = cli_error(["fit", "--data", "cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "o")], capsys, "fit")
    assert "data_batch_1: not a CIFAR-10 python batch" in line

    class Exploit:
        def __reduce__(self):
            return (print, ("code ran",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit()}))
    line = cli_error(["fit", "--data", "cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "o")], capsys, "fit")
    assert "refusing to load builtins.print" in line


# ------------------------------------------------------------------------------------------------ sampling, eval
@pytest.mark.parametrize("temperature", ["-1", "nan", "inf"])
def test_sample_temperature(tiny_run, tmp_path, capsys, temperature):
    out = tmp_path / "s.png"
    line = cli_error(["sample", str(tiny_run / "checkpoint.pt"), "--temperature", temperature, "--out", str(out)],
                     capsys, "sample")  # fmt: skip
    assert "--temperature must be >= 0" in line and not out.exists()


@pytest.mark.parametrize("n, temperature", [(2.5, 1.0), (0, 1.0), (True, 1.0), (2, -1.0), (2, math.nan), (2, math.inf)])
def test_flowdensity_sample_arguments(n, temperature):
    model = build_density("realnvp", (2,), num_layers=1)
    with pytest.raises(ValueError, match="sample: (n|temperature) must be"):
        model.sample(n, temperature=temperature)


@pytest.mark.parametrize("size", ["0", "-5"])
def test_eval_batch_size(tiny_run, capsys, size):
    line = cli_error(["eval", str(tiny_run / "checkpoint.pt"), "--batch-size", size], capsys, "eval")
    assert f"--batch-size must be an int >= 1, got {size}" in line


def test_evaluate_batch_size_and_device():
    model = build_density("realnvp", (2,), num_layers=1)
    x = torch.randn(10, 2)
    for kwargs, message in (({"batch_size": 0}, "batch_size must be an int >= 1"), ({"device": "bogus"}, "unknown")):
        with pytest.raises(ValueError, match=message):
            evaluate(model, x, **kwargs)


def test_n_bits_zero_is_an_error_not_all_bits(capsys):
    line = cli_error(["fit", "--n-bits", "0", "--out", "unused"], capsys, "fit")
    assert "n_bits must be an integer in 1..8, got 0" in line


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("drop", ["model", "optimizer", "rng"])
def test_checkpoints_missing_a_key(tiny_run, tmp_path, capsys, drop):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    del ckpt[drop]
    torch.save(ckpt, run / "checkpoint.pt")
    argv = ["fit", "--flow", "realnvp", "--levels", "1", "--num-layers", "1", "--hidden", "4", "--num-steps", "3",
            "--batch-size", "16", "--no-progress", "--out", str(run), "--resume"]  # fmt: skip
    assert f"lacks '{drop}'" in cli_error(argv, capsys, "fit")
    if drop == "model":
        with pytest.raises(CheckpointError, match="lacks the model weights"):
            load_density(run / "checkpoint.pt")


def test_resuming_on_other_data_is_refused(tmp_path):
    digits = load_digits("train")
    model = build_density("realnvp", (1, 8, 8), levels=1, num_layers=1, hidden=4)
    kwargs = dict(num_steps=2, batch_size=16, device="cpu", progress=False, report=False, out=tmp_path)
    fit(model, digits, **kwargs)
    other = digits.images.flip(-1)  # the same shape and levels, other pixels
    model = build_density("realnvp", (1, 8, 8), levels=1, num_layers=1, hidden=4)
    with pytest.raises(CheckpointError, match="written for other training data"):
        fit(model, other, n_bins=17, **{**kwargs, "num_steps": 4}, resume=True)


def test_svi_resumed_with_other_data_is_refused(tmp_path):
    from pyro.infer.autoguide import AutoNormal

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.randn(20)
    pyro.clear_param_store()
    kwargs = dict(out=tmp_path, checkpoint_every=2, progress=False, report=False)
    stop = lambda step, loss: step == 2 and (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731 - a kill
    with pytest.raises(KeyboardInterrupt):
        pyroflows.infer.fit(model, AutoNormal(model), 4, model_args=(y,), callback=stop, **kwargs)
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match="other model data"):
        pyroflows.infer.fit(model, AutoNormal(model), 4, model_args=(y + 1,), resume=True, **kwargs)
    pyro.clear_param_store()
    assert pyroflows.infer.fit(model, AutoNormal(model), 4, model_args=(y,), resume=True, **kwargs).step == 4


# ------------------------------------------------------------------------------------------------ densities, pixels
def test_flowdensity_inputs():
    model = build_density("glow", (1, 8, 8), levels=1, num_layers=1, hidden=4)
    with pytest.raises(ValueError, match=r"expects data of shape \(\.\.\., \(1, 8, 8\)\), got \(4, 3, 8, 8\)"):
        model.log_prob(torch.rand(4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"got \(4, 1, 6, 6\)"):
        model.log_prob(torch.rand(4, 1, 6, 6))
    with pytest.raises(ValueError, match="meta tensors carry no values"):
        model.log_prob(torch.empty(2, 1, 8, 8, device="meta"))
    empty = model.log_prob(torch.rand(0, 1, 8, 8))  # an empty batch is valid input, with an empty answer
    assert empty.shape == (0,)


@pytest.mark.parametrize("n_bins", [1, 17.5, 0, True])
def test_n_bins(n_bins):
    model = build_density("realnvp", (1, 8, 8), levels=1, num_layers=1, hidden=4)
    with pytest.raises(ValueError, match="n_bins must be an int >= 2"):
        model.bits_per_dim(torch.zeros(2, 1, 8, 8), n_bins=n_bins)
    with pytest.raises(ValueError, match="dequantize: n_bins must be an int >= 2"):
        dequantize(torch.zeros(3), n_bins)


def test_dequantize_pixels_out_of_range():
    with pytest.raises(ValueError, match=r"dequantize: pixels must be whole numbers in \[0, 17\)"):
        dequantize(torch.tensor([0, 17]), 17)
    with pytest.raises(ValueError, match="whole numbers"):
        dequantize(torch.tensor([0.5]), 17)


def test_toy_sample_count():
    with pytest.raises(ValueError, match="sample: n must be an int >= 0, got -1"):
        get_toy("two_moons").sample(-1)
    assert get_toy("checkerboard").sample(0).shape == (0, 2)


# ------------------------------------------------------------------------------------------------ diagnostics
def test_diagnostics_refuse_nan_instead_of_returning_it():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("broken", torch.where(x > 0, torch.tensor(float("nan")), torch.tensor(0.0)))

    def guide():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match="importance_weighted_elbo: \\d+ of 200 draws have a non-finite"):
            D.importance_weighted_elbo(model, guide, num_samples=200, seed=0)
    with pytest.raises(ValueError, match="khat_threshold: num_samples must be a positive int, got -5"):
        D.khat_threshold(-5)


@pytest.mark.parametrize("weights", [np.full(50, np.nan), np.zeros(50), -np.ones(50)])
def test_compare_to_reference_weights(weights):
    rng = np.random.default_rng(0)
    data = D.posterior_data({"mu": rng.normal(size=(1, 50))})
    with pytest.raises(ValueError, match="weights must be finite, >= 0 and not all zero"):
        D.compare_to_reference(data, data, weights=weights)


# ------------------------------------------------------------------------------------------------ second round
@pytest.mark.parametrize("shape", [(), (1, 8.5, 8), "188", (True, 8, 8), (1, None, 8)])
def test_build_density_shapes(shape):
    with pytest.raises(ValueError, match="build_density: (shape must be|the data shape must be fully known)"):
        build_density("glow", shape, levels=1, num_layers=1, hidden=4)


def test_a_size_the_flow_cannot_take_fails_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"cannot take data of shape \(1, 6, 6\): Squeeze needs even .* H=3, W=3"):
        pyroflows.FlowDensity(pyroflows.glow((1, 8, 8), levels=2, num_layers=1, hidden=4), (1, 6, 6))


def test_a_diverging_fixed_point_inverse_says_why():
    from pyroflows.transforms import ResidualBlock

    net = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(2.0 * torch.eye(2))  # Lipschitz 2: x = y - g(x) blows up
    block = ResidualBlock(2, net=net, logdet="exact", max_iter=100).eval()
    with pytest.raises(RuntimeError, match="4 sample\\(s\\) above tolerance.*diverged.*Lipschitz constant below 1"):
        block.inv(torch.randn(4, 2))


def test_models_with_factors_convert_and_nan_likelihoods_are_refused():
    from pyro.infer.autoguide import AutoNormal

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("prior_term", -(mu**2))  # a term of log p, not data
        with pyro.plate("d", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([0.1, 0.2, 0.3])
    guide = AutoNormal(model)
    guide(y)
    idata = D.to_inference_data(model, guide, num_samples=50, model_args=(y,), seed=0)
    assert list(D.compat.group(idata, "log_likelihood").data_vars) == ["y"]
    bad = torch.tensor([0.1, float("nan"), 0.3])
    with pyro.validation_enabled(False):
        idata = D.to_inference_data(model, guide, num_samples=50, model_args=(bad,), seed=0)
    with pytest.raises(ValueError, match="loo: 1 of 3 observations have a non-finite log-likelihood"):
        D.loo(idata)


def test_dequantize_check_can_be_skipped_for_checked_pixels():
    """The trainers check pixels once at load and then skip the per-step check (a device sync on a GPU)."""
    x = torch.tensor([0, 16])
    torch.manual_seed(0)
    checked = dequantize(x, 17)
    torch.manual_seed(0)
    assert torch.equal(dequantize(x, 17, check=False), checked)
    assert dequantize(torch.tensor([17]), 17, check=False).shape == (1,)  # the caller's responsibility
