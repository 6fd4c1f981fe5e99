"""The ``pyroflows`` command end to end on the embedded digits: fit / sample / eval, resume, refusal to overwrite,
and the error exits (status 2, a message naming the problem) for bad flows, data, architectures and checkpoints."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyroflows
import pyroflows.train
from pyroflows.cli import main
from pyroflows.data import load_digits
from pyroflows.train import evaluate, evaluate_with_error, load_checkpoint, load_density

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--levels", "1", "--num-layers", "1", "--hidden", "8", "--batch-size", "32", "--no-progress"]
FIT_LINE = re.compile(r"step (\d+): test bits/dim (\S+); checkpoint (.+)")
EVAL_LINE = re.compile(r"digits (\w+): (\S+) bits/dim \((\d+) images\)")


def fit_argv(out, steps=20, *extra):
    return ["fit", *TINY, "--num-steps", str(steps), "--out", str(out), *extra]


def fit_line(stdout):
    match = FIT_LINE.search(stdout)
    assert match, stdout
    return int(match.group(1)), float(match.group(2)), match.group(3).strip()


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny 20-step glow run, shared read-only (tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(fit_argv(out)) == 0
    return out


@pytest.fixture
def evaluate_spy(monkeypatch):
    """Records the full-precision value the CLI gets from ``pyroflows.train.evaluate`` (it prints 4 decimals)."""
    values = []

    def spy(*args, **kwargs):
        values.append(evaluate(*args, **kwargs))
        return values[-1]

    monkeypatch.setattr(pyroflows.train, "evaluate", spy)
    return values


# ------------------------------------------------------------------------------------------------ fit
def test_fit_writes_checkpoint_metrics_samples_and_prints_bpd(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(fit_argv(out)) == 0
    captured = capsys.readouterr()
    header, *reports = captured.err.splitlines()  # the model, then one line per evaluation (--no-progress too)
    assert re.fullmatch(r"fit: glow \(levels 1, num_layers 1, hidden 8; as given\), [\d,]+ parameters, "
                        r"\d+ training / \d+ test images", header), header  # fmt: skip
    assert reports and all(re.match(r"fit: step \d+/20 \(epoch [\d.]+\), train [\d.]+ bits/dim, test [\d.]+ bits/dim, "
                                     r"\d+ img/s", line) for line in reports), reports  # fmt: skip
    step, bpd, ckpt_path = fit_line(captured.out)
    assert step == 20
    assert math.isfinite(bpd) and 0 < bpd < 8  # log2(17) = 4.09 for a uniform model of 17-level pixels
    assert Path(ckpt_path) == out / "checkpoint.pt"

    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 20 and ckpt["spec"]["flow"] == "glow" and ckpt["n_bins"] == 17

    records = metrics(out)
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == 20
    loss_steps = [r["step"] for r in records if "loss" in r]
    assert len(loss_steps) >= 2 and all(a < b for a, b in zip(loss_steps, loss_steps[1:]))
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    final_eval = [r for r in records if "test_bpd" in r][-1]
    assert final_eval["step"] == 20 and f"{final_eval['test_bpd']:.4f}" == f"{bpd:.4f}"

    assert (out / "samples.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("flow", ["glow", "realnvp", "residual"])
def test_each_flow_trains_via_cli(flow, tmp_path, capsys):
    out = tmp_path / flow
    assert main(fit_argv(out, 3, "--flow", flow.upper())) == 0  # the name is case-insensitive
    step, bpd, _ = fit_line(capsys.readouterr().out)
    assert step == 3 and math.isfinite(bpd) and 0 < bpd < 8
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 3
    assert ckpt["spec"]["flow"] == flow
    assert ckpt["spec"]["options"] == {"levels": 1, "num_layers": 1, "hidden": 8}  # every builder, one vocabulary
    assert load_density(out / "checkpoint.pt").event_shape == (1, 8, 8)


def test_resume_continues_to_more_steps_and_repeats_the_uninterrupted_run(tmp_path, capsys):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    torch.manual_seed(0)  # the initial weights come from the global RNG (see test_same_seed_gives_the_same_run)
    assert main(fit_argv(resumed, 10)) == 0
    assert load_checkpoint(resumed / "checkpoint.pt")["step"] == 10
    capsys.readouterr()

    assert main(fit_argv(resumed, 20, "--resume")) == 0
    step, _, _ = fit_line(capsys.readouterr().out)
    assert step == 20
    records = metrics(resumed)
    assert records[-1]["step"] == 20
    loss_steps = [r["step"] for r in records if "loss" in r]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 20  # no step logged twice
    ckpt = load_checkpoint(resumed / "checkpoint.pt")
    assert ckpt["step"] == 20 and len(ckpt["losses"]) == 20

    torch.manual_seed(0)
    assert main(fit_argv(straight, 20)) == 0
    reference = load_checkpoint(straight / "checkpoint.pt")
    assert ckpt["losses"] == pytest.approx(reference["losses"], rel=1e-6, abs=1e-6)
    for name, value in reference["model"].items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=1e-5, atol=1e-6)


def test_same_seed_gives_the_same_run(tmp_path):
    runs = []
    for state in (1, 2):
        torch.manual_seed(state)  # e.g. an earlier call in the same process
        assert main(fit_argv(tmp_path / str(state), 2, "--seed", "5")) == 0
        runs.append(load_checkpoint(tmp_path / str(state) / "checkpoint.pt"))
    for name, value in runs[0]["model"].items():
        torch.testing.assert_close(runs[1]["model"][name], value, rtol=0, atol=0)


def test_fit_refuses_to_overwrite_a_checkpoint_without_resume(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(fit_argv(out)) == 2
    captured = capsys.readouterr()
    assert str(out / "checkpoint.pt") in captured.err
    assert "--resume" in captured.err
    assert "test bits/dim" not in captured.out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_without_a_checkpoint_fails(tmp_path, capsys):
    out = tmp_path / "empty"
    assert main(fit_argv(out, 3, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and str(out / "checkpoint.pt") in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--flow", "nope"], "unknown flow 'nope'"),
        (["--data", "nope"], "unknown data set 'nope'"),
        (["--data", "mnist"], "root"),
        (["--data", "mnist", "--root", "{root}"], "MNIST train images not found in {root}"),
        (["--levels", "4"], "levels=4"),  # glow squeezes once more: 8x8 allows 3
        (["--flow", "realnvp", "--levels", "5"], "levels=5"),
        (["--flow", "residual", "--levels", "5"], "levels=5"),
    ],
    ids=["flow", "data", "mnist-no-root", "mnist-empty-root", "glow-levels", "realnvp-levels", "residual-levels"],
)
def test_fit_error_exits(extra, message, tmp_path, capsys):
    root = tmp_path / "no_mnist_here"
    root.mkdir()
    out = tmp_path / "out"
    extra = [a.format(root=root) for a in extra]
    assert main(fit_argv(out, 2, *extra)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("pyroflows fit: error:")
    assert message.format(root=root) in captured.err
    assert not (out / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------------------------ sample
def test_sample_writes_png_grid(run, tmp_path, capsys):
    import matplotlib.image as mpimg

    out = tmp_path / "grid.png"
    assert main(["sample", str(run / "checkpoint.pt"), "--n", "16", "--out", str(out)]) == 0
    assert "16 samples" in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(out)
    side = 4 * (8 + 1) + 1  # 4x4 grid of 8x8 images, 1-pixel padding
    factor = math.ceil(512 / side)  # enlarged to save_image_grid's min_size, at least
    assert image.shape[:2] == (side * factor, side * factor)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    # a gray-scale grid: equal RGB channels, white padding, some non-white sample pixels
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert (image[:factor, :, :3] == 1).all()
    assert (image[factor:-factor, factor:-factor, :3] < 1).any()


def test_sample_is_repeatable_with_seed(run, tmp_path):
    import matplotlib.image as mpimg

    paths = {name: tmp_path / f"{name}.png" for name in ("a", "b", "c")}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        argv = ["sample", str(run / "checkpoint.pt"), "--n", "4", "--seed", str(seed), "--out", str(paths[name])]
        assert main(argv) == 0
    a, b, c = (mpimg.imread(p) for p in paths.values())
    assert (a == b).all()
    assert not (a == c).all()


def test_sample_rejects_n_below_one(run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(run / "checkpoint.pt"), "--n", "0", "--out", str(out)]) == 2
    assert "--n must be an int >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ eval
def test_eval_matches_library_evaluate(run, capsys, evaluate_spy):
    ckpt = run / "checkpoint.pt"
    assert main(["eval", str(ckpt), "--seed", "3"]) == 0
    match = EVAL_LINE.search(capsys.readouterr().out)
    assert match and match.group(1) == "test" and int(match.group(3)) == 360

    reference = evaluate(load_density(ckpt), load_digits("test"), seed=3)
    assert len(evaluate_spy) == 1
    assert evaluate_spy[0] == pytest.approx(reference, abs=1e-6)
    assert match.group(2) == f"{reference:.6f}"
    # another seed draws other dequantisation noise: close, but a different figure
    other = evaluate(load_density(ckpt), load_digits("test"), seed=4)
    assert other != reference and other == pytest.approx(reference, abs=0.01)


def test_eval_with_ema_uses_the_ema_weights(tmp_path, capsys, evaluate_spy):
    out = tmp_path / "ema"
    assert main(fit_argv(out, 5, "--ema", "0.5", "--warmup", "0", "--lr", "0.01")) == 0
    ckpt = out / "checkpoint.pt"
    assert main(["eval", str(ckpt), "--ema"]) == 0
    assert main(["eval", str(ckpt)]) == 0
    assert len(EVAL_LINE.findall(capsys.readouterr().out)) == 2
    ema_value, plain_value = evaluate_spy
    assert ema_value == pytest.approx(evaluate(load_density(ckpt, ema=True), load_digits("test")), abs=1e-6)
    assert plain_value == pytest.approx(evaluate(load_density(ckpt), load_digits("test")), abs=1e-6)
    assert ema_value != plain_value


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_ema_flag_without_ema_weights_fails(command, run, tmp_path, capsys):
    extra = ["--out", str(tmp_path / "grid.png")] if command == "sample" else []
    assert main([command, str(run / "checkpoint.pt"), "--ema", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pyroflows {command}: error:")
    assert "no EMA weights" in err and str(run / "checkpoint.pt") in err
    assert not (tmp_path / "grid.png").exists()


def _truncated(run, path):
    path.write_bytes((run / "checkpoint.pt").read_bytes()[:1000])


def _text(run, path):
    path.write_text("not a checkpoint\n")


def _foreign(run, path):
    torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize(
    "make, message",
    [
        (_truncated, "cannot be read"),
        (_text, "cannot be read"),
        (_foreign, "not a pyroflows checkpoint"),
        (None, "no checkpoint at"),
    ],
    ids=["truncated", "text", "foreign-torch-file", "missing"],
)
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_bad_checkpoint_exits_2(command, make, message, run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    if make is not None:
        make(run, bad)
    grid = tmp_path / "grid.png"
    extra = ["--out", str(grid)] if command == "sample" else []
    assert main([command, str(bad), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"pyroflows {command}: error:")
    assert message in captured.err and str(bad) in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not grid.exists()


# ------------------------------------------------------------------------------------------------ the command
@pytest.mark.parametrize(
    "argv",
    [[], ["fit"], ["fit", "--out", "x", "--epochs", "1", "--num-steps", "2"], ["sample"]],
    ids=["no-command", "fit-without-out", "epochs-and-num-steps", "sample-without-checkpoint"],
)
def test_usage_errors_exit_2_through_argparse(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: pyroflows" in capsys.readouterr().err


def test_console_script_version():
    script = Path(sys.executable).with_name("pyroflows")
    found = shutil.which("pyroflows")
    if script.is_file():
        command = [str(script)]
    elif found:
        command = [found]
    else:
        command = [sys.executable, "-m", "pyroflows.cli"]
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pyroflows {pyroflows.__version__}"


def test_eval_repeats_prints_the_mean_and_its_standard_error(run, capsys):
    ckpt = run / "checkpoint.pt"
    assert main(["eval", str(ckpt), "--seed", "3", "--repeats", "3"]) == 0
    line = capsys.readouterr().out
    match = re.search(r"test: (\S+) ± (\S+) bits/dim \(360 images, 3 evaluations\)", line)
    assert match, line
    mean, se = evaluate_with_error(load_density(ckpt), load_digits("test"), seed=3, repeats=3)
    assert match.group(1) == f"{mean:.6f}" and match.group(2) == f"{se:.6f}" and se > 0
    assert main(["eval", str(ckpt), "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err


def test_eval_by_default_repeats_the_figure_fit_printed(run, capsys):
    ckpt = run / "checkpoint.pt"
    reported = load_checkpoint(ckpt)["evals"][-1]["test_bpd"]
    assert main(["eval", str(ckpt)]) == 0
    match = EVAL_LINE.search(capsys.readouterr().out)
    assert match and float(match.group(2)) == pytest.approx(reported, abs=1e-6)


def test_zero_or_negative_sizes_are_rejected_not_replaced_by_defaults(tmp_path, capsys):
    for flag in ("--levels", "--num-layers", "--hidden", "--num-steps", "--eval-every"):
        argv = ["fit", "--out", str(tmp_path / flag.strip("-")), flag, "0", "--no-progress"]
        if flag != "--num-steps":
            argv += ["--num-steps", "1"]
        assert main(argv) == 2
        assert f"{flag} must be >= 1" in capsys.readouterr().err
        assert not (tmp_path / flag.strip("-") / "checkpoint.pt").exists()


def test_time_limit_stops_the_run_early(tmp_path, capsys):
    out = tmp_path / "timed"
    argv = ["fit", "--levels", "1", "--num-layers", "1", "--hidden", "8", "--time-limit", "0.02", "--out", str(out)]
    assert main(argv + ["--no-progress"]) == 0
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 0 < step < 1000 * (1437 // 64)  # stopped by the clock, not by the 1000-epoch ceiling


def test_renamed_flags_still_work_and_say_their_new_name(tmp_path, capsys):
    out = tmp_path / "old_flags"
    argv = [
        "fit",
        "--levels",
        "1",
        "--steps",
        "1",
        "--hidden",
        "8",
        "--max-steps=2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "--steps is renamed --num-layers" in err and "--max-steps is renamed --num-steps" in err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["spec"]["options"]["num_layers"] == 1


def test_fit_help_shows_the_default_sizes_of_each_flow(capsys):
    """The table in ``fit --help`` is SIZE_DEFAULTS, row by row (so the two cannot drift apart)."""
    from pyroflows.train import SIZE_DEFAULTS

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for flow, table in SIZE_DEFAULTS.items():
        row = next(line for line in lines if line.split()[:1] == [flow])
        for key in (("small", "cpu"), ("large", "cpu"), ("small", "cuda"), ("large", "cuda")):
            assert " / ".join(map(str, table[key])) in row, (flow, key, row)


@pytest.mark.parametrize(
    "shape, device, expected",
    [((1, 8, 8), "cpu", (2, 4, 64)), ((1, 28, 28), "cpu", (2, 8, 64)), ((3, 32, 32), "cuda", (3, 16, 256)),
     ((1, 28, 28), "cuda", (2, 16, 256))],
)  # fmt: skip
def test_glow_defaults_follow_image_size_and_device(shape, device, expected):
    from pyroflows.train import default_options

    assert tuple(default_options("glow", shape, device).values()) == expected


def test_fit_on_28x28_uses_the_large_image_defaults(tmp_path, monkeypatch, capsys):
    """No architecture flags on MNIST-size images: the model is built with the 28x28 CPU sizes, and says so."""
    from pyroflows.data import ImageDataset
    from pyroflows.train import default_options

    g = torch.Generator().manual_seed(0)
    fake = {
        s: ImageDataset(torch.randint(0, 256, (n, 1, 28, 28), generator=g)) for s, n in (("train", 32), ("test", 8))
    }
    monkeypatch.setattr("pyroflows.cli._dataset", lambda name, root, split, n_bits: fake[split])
    out = tmp_path / "r"
    argv = ["fit", "--data", "mnist", "--root", str(tmp_path), "--device", "cpu", "--num-steps", "1", "--batch-size",
            "16", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    options = load_checkpoint(out / "checkpoint.pt")["spec"]["options"]
    assert options == default_options("glow", (1, 28, 28), "cpu") == {"levels": 2, "num_layers": 8, "hidden": 64}
    assert "glow (levels 2, num_layers 8, hidden 64; defaults for 1x28x28)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ outputs that fail
def test_disk_full_is_one_line_exit_2_and_the_last_checkpoint_survives(tmp_path, monkeypatch, capsys):
    import errno
    import os
    import stat

    from pyroflows import run as engine

    fsync, files = os.fsync, {"n": 0}

    def full(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            files["n"] += 1
            if files["n"] == 2:  # the second checkpoint (step 8), written before the final grid
                raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(engine.os, "fsync", full)
    out = tmp_path / "run"
    assert main(fit_argv(out, 8, "--checkpoint-every", "4", "--sample-every", "100")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pyroflows fit: error: could not write ") and "No space left on device" in err
    assert "(step 4) is intact" in err
    monkeypatch.setattr(engine.os, "fsync", fsync)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert main(fit_argv(out, 8, "--checkpoint-every", "4", "--sample-every", "100", "--resume")) == 0


def test_an_output_directory_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(fit_argv(blocker / "run", 2)) == 2
    *header, err = capsys.readouterr().err.strip().splitlines()  # the model line, then the error
    assert len(header) == 1 and err.startswith("pyroflows fit: error: cannot use") and "as the run directory" in err


@pytest.mark.parametrize("name", ["x.xyz", "existing_dir"])
def test_sample_refuses_outputs_it_cannot_write(run, tmp_path, capsys, name):
    (tmp_path / "existing_dir").mkdir()
    assert main(["sample", str(run / "checkpoint.pt"), "--n", "4", "--out", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pyroflows sample: error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_dir"]


def test_a_run_directory_stands_for_its_checkpoint(run, tmp_path, capsys, evaluate_spy):
    """``pyroflows eval/sample/interpolate RUN`` read ``RUN/checkpoint.pt`` (the directory fit --out wrote): the
    same figure as the file itself; a directory without a checkpoint is an error naming the file it looked for."""
    assert main(["eval", str(run)]) == 0
    assert main(["eval", str(run / "checkpoint.pt")]) == 0
    assert len(EVAL_LINE.findall(capsys.readouterr().out)) == 2
    assert evaluate_spy[0] == evaluate_spy[1]
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "4", "--out", str(out)]) == 0 and out.is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty)]) == 2
    assert f"no checkpoint at {str(empty / 'checkpoint.pt')!r}" in capsys.readouterr().err
