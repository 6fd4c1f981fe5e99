"""pyroflows.run, the engine under both trainers: pyroflows.train.fit and pyroflows.infer.fit share one contract
(step numbering, errors, resume policy, argument checks, renamed keywords), and the engine stays small and neutral."""

from __future__ import annotations

import ast
import copy
import math
import re
import signal
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import pyroflows
from pyroflows import infer, run, train
from pyroflows.data import get_toy
from pyroflows.infer import SVIConfig
from pyroflows.train import FitConfig, build_density

PACKAGE = Path(pyroflows.__file__).parent
MAX_FUNCTION_LINES = 60


def toy():
    return get_toy("two_moons").sample(256, torch.Generator().manual_seed(0))


def density_fit(out=None, **kw):
    torch.manual_seed(0)
    model = build_density("realnvp", (2,), num_layers=2)
    kw = {"num_steps": 4, "batch_size": 32, "lr": 2e-3, "device": "cpu", "progress": False, **kw}
    return train.fit(model, toy(), out=out, **kw), model


def gaussian():
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def svi_fit(out=None, **kw):
    pyro.clear_param_store()
    return infer.fit(gaussian, AutoNormal(gaussian), **{"num_steps": 4, "progress": False, "seed": 0, **kw}, out=out)


# ------------------------------------------------------------------------------------------------ one contract
@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own warning, before ours stops the run
def test_both_trainers_number_the_failing_step_alike():
    """A NaN loss at the third update is "step 3" in both, and both keep the values after step 2."""
    expected = (
        r"^fit: the loss is nan at step 3\b.*stopped before the update, the parameters keep their values after step 2"
    )
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * math.nan if calls["n"] == 3 else output

    torch.manual_seed(0)
    model = build_density("realnvp", (2,), num_layers=2)
    model.register_forward_hook(poison)
    with pytest.raises(run.TrainingError, match=expected):
        train.fit(model, toy(), num_steps=5, batch_size=32, device="cpu", progress=False)

    state = {"bad": False}

    def model_with_factor():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.tensor(math.nan if state["bad"] else 0.0))

    def callback(step, loss):
        state["bad"] = step == 2

    pyro.clear_param_store()
    with pyro.validation_enabled(False), pytest.raises(run.TrainingError, match=expected):
        infer.fit(
            model_with_factor, AutoNormal(model_with_factor), 5, callback=callback, progress=False, skip_nonfinite=0
        )


def test_both_trainers_build_their_optimiser_with_the_fused_update(tmp_path):
    """Adam in both trainers takes torch's fused update: the saved optimiser state says so."""
    density_fit(tmp_path / "density", num_steps=2)
    svi_fit(tmp_path / "svi", num_steps=2)
    for name in ("density", "svi"):
        group = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]
        assert group["fused"] is True and not group["foreach"], name


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_the_fused_update_equals_torchs_default_loop(cls):
    """make_optimizer's fused Adam/AdamW against torch's single-tensor loop, 30 steps on a float64 quartic with
    tensors of several shapes: the same parameters within 1e-12 (the same update up to rounding)."""
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((3,), (4, 5), (2, 3, 3), ())]
    runs = []
    for build in (
        lambda ps: run.make_optimizer(cls, ps, lr=0.05, weight_decay=0.01),
        lambda ps: cls(ps, lr=0.05, weight_decay=0.01, foreach=False),
    ):
        params = [torch.zeros_like(t, requires_grad=True) for t in targets]
        opt = build(params)
        for _ in range(30):
            opt.zero_grad()
            sum(((p - t) ** 4).sum() for p, t in zip(params, targets)).backward()
            opt.step()
        runs.append(params)
    assert runs[0][0].abs().sum() > 0.1  # the parameters moved
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the state of a run saved before (the last optimiser built above: torch's loop) loads into the fused optimiser
    # and continues alike
    saved = opt.state_dict()
    params = [p.detach().clone().requires_grad_() for p in runs[1]]
    for p in params:
        p.grad = torch.ones_like(p)
    fused = run.make_optimizer(cls, params, lr=0.05, weight_decay=0.01)
    old = cls(runs[1], lr=0.05, weight_decay=0.01, foreach=False)
    old.load_state_dict(copy.deepcopy(saved))  # (a state dict holds the optimiser's own tensors)
    fused.load_state_dict(copy.deepcopy(saved))
    assert fused.param_groups[0]["fused"] is None  # the saved state's own update comes with it
    for p in runs[1]:
        p.grad = torch.ones_like(p)
    fused.step(), old.step()
    for a, b in zip(params, runs[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_make_optimizer_leaves_a_given_choice_and_other_optimisers_alone():
    w = torch.zeros(3, requires_grad=True)
    chosen = run.make_optimizer(torch.optim.Adam, [w], lr=0.1, foreach=False)
    assert chosen.defaults["fused"] is None and chosen.defaults["foreach"] is False
    assert run.make_optimizer(torch.optim.Adamax, [w], lr=0.1).defaults["foreach"] is True
    sgd = run.make_optimizer(torch.optim.SGD, [w], lr=0.1)
    assert sgd.defaults["fused"] is None and sgd.defaults["foreach"] is None
    # where the fused kernel does not apply (differentiable=True), the multi-tensor update
    fallback = run.make_optimizer(torch.optim.Adam, (p for p in [w]), lr=0.1, differentiable=True)
    assert fallback.defaults["fused"] is None and fallback.defaults["foreach"] is True
    assert fallback.param_groups[0]["params"] == [w]  # a generator of parameters is not consumed by the first try


def test_an_existing_checkpoint_is_the_same_error_in_both(tmp_path):
    density_fit(tmp_path / "density")
    svi_fit(tmp_path / "svi")
    errors = []
    for again in (lambda: density_fit(tmp_path / "density"), lambda: svi_fit(tmp_path / "svi")):
        with pytest.raises(run.CheckpointExistsError) as caught:
            again()
        errors.append(caught.value)
    for err, name in zip(errors, ("density", "svi"), strict=True):
        assert isinstance(err, run.CheckpointError) and isinstance(err, FileExistsError)
        assert str(err).startswith(f"fit: {str(tmp_path / name / 'checkpoint.pt')!r} already exists; pass resume=True")
    assert train.CheckpointExistsError is infer.CheckpointExistsError is run.CheckpointExistsError


def test_resuming_with_changed_settings_fails_in_both(tmp_path):
    density_fit(tmp_path / "density")
    svi_fit(tmp_path / "svi")
    with pytest.raises(run.CheckpointError, match=r"other settings \(lr: saved 0.002, now 0.001\)"):
        density_fit(tmp_path / "density", lr=1e-3, num_steps=6, resume=True)
    with pytest.raises(run.CheckpointError, match=r"other settings \(lr: saved 0.003, now 0.02, warmup_steps: saved 0"):
        svi_fit(tmp_path / "svi", lr=0.02, warmup_steps=2, resume=True)
    # unchanged settings resume (a density run may grow longer: its schedule does not depend on the length)
    assert density_fit(tmp_path / "density", num_steps=6, resume=True)[0].step == 6
    assert svi_fit(tmp_path / "svi", resume=True).step == 4


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "name, value",
    [
        ("num_steps", 0),
        ("num_steps", 2.5),
        ("lr", 0.0),
        ("lr", math.nan),
        ("lr", math.inf),
        ("warmup_steps", -1),
        ("clip_norm", 0.0),
        ("batch_size", 0),
        ("eval_batch_size", 0),
        ("ema", 1.0),
        ("time_limit", math.inf),
        ("checkpoint_every", 0),
        ("seed", "zero"),
    ],
)
def test_fit_config_names_the_bad_argument(name, value):
    with pytest.raises(ValueError, match=rf"^fit: {name} must be .*, got {value!r}$"):
        FitConfig(**{"num_steps": 10, name: value})


@pytest.mark.parametrize(
    "name, value",
    [
        ("num_steps", 0),
        ("lr", -1.0),
        ("final_lr_factor", 0.0),
        ("warmup_steps", -2),
        ("num_particles", 0),
        ("clip_norm", -1.0),
        ("lr_schedule", "linear"),
        ("progress", "yes"),
    ],
)
def test_svi_config_names_the_bad_argument(name, value):
    with pytest.raises(ValueError, match=rf"^fit: {name} must be .*, got {value!r}$"):
        SVIConfig(**{name: value})


def test_configs_are_frozen_and_fit_builds_them_from_its_keywords():
    config = FitConfig(num_steps=3, out="runs/a")
    assert config.out == Path("runs/a")
    with pytest.raises(AttributeError):
        config.lr = 1.0
    assert {f for f in FitConfig.__dataclass_fields__} <= set(train.fit.__code__.co_varnames)
    assert {f for f in SVIConfig.__dataclass_fields__} <= set(infer.fit.__code__.co_varnames)


# ------------------------------------------------------------------------------------------------ renamed keywords
def test_steps_is_the_deprecated_name_of_num_steps():
    torch.manual_seed(0)
    model = build_density("realnvp", (2,), num_layers=2)
    with pytest.warns(
        FutureWarning, match=r"^fit: 'steps' is renamed 'num_steps'; the old name will be removed in pyroflows 0\.3$"
    ):
        result = train.fit(model, toy(), steps=3, batch_size=32, device="cpu", progress=False)
    assert result.step == 3 and len(result.losses) == 3
    with pytest.raises(ValueError, match="not both"):
        train.fit(model, toy(), steps=3, num_steps=3, device="cpu", progress=False)


# ------------------------------------------------------------------------------------------------ shared pieces
def test_the_schedule_is_the_two_trainers_old_ones_exactly():
    for warm in (0, 1, 4):  # train's old LambdaLR: linear warm-up, then constant
        old = [min(1.0, (s + 1) / warm) if warm else 1.0 for s in range(10)]
        assert [run.lr_factor("constant", 10, warm)(s) for s in range(10)] == old
    n, f, warm = 11, 0.1, 3  # infer's old _lr_factor: warm-up times a cosine to final_lr_factor
    old = [
        (min(1.0, (s + 1) / warm)) * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(s / (n - 1), 1.0))))
        for s in range(n)
    ]
    assert [run.lr_factor("cosine", n, warm, f)(s) for s in range(n)] == old


def test_progress_none_means_only_on_a_terminal():
    assert run.progress_bar(3, None, desc="t").disable  # pytest captures stderr: not a terminal
    assert not run.progress_bar(3, True, desc="t").disable
    assert run.progress_bar(3, True, desc="t", enabled=False).disable


def test_old_import_paths_still_work():
    from pyroflows.train import checkpoint

    assert checkpoint.atomic_torch_save is run.atomic_torch_save
    assert checkpoint.load_checkpoint is train.load_checkpoint is run.load_checkpoint
    assert checkpoint.rng_state is run.rng_state and checkpoint.set_rng_state is run.set_rng_state
    assert train.TrainingError is infer.TrainingError is run.TrainingError
    assert train.CheckpointError is checkpoint.CheckpointError is run.CheckpointError


# ------------------------------------------------------------------------------------------------ structure
def _imports(path: Path) -> set[str]:
    """Modules a file imports, relative imports resolved against the pyroflows package."""
    tree = ast.parse(path.read_text())
    package = ".".join(("pyroflows",) + path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
    return found


def test_the_engine_is_neutral_and_infer_does_not_import_train():
    run_imports = _imports(PACKAGE / "run.py")
    assert not {m for m in run_imports if m.startswith("pyroflows")}, run_imports
    assert {m.split(".")[0] for m in run_imports} <= {
        "__future__",
        "contextlib",
        "fcntl",
        "hashlib",
        "io",
        "signal",
        "threading",
        "math",
        "numbers",
        "os",
        "random",
        "tempfile",
        "warnings",
        "collections",
        "pathlib",
        "typing",
        "numpy",
        "torch",
        "tqdm",
    }
    infer_imports = _imports(PACKAGE / "infer.py")
    assert "pyroflows.run" in infer_imports
    assert not {m for m in infer_imports if m.startswith(("pyroflows.train", "pyroflows.density"))}, infer_imports


def _function_lengths():
    """(lines, where) of every function in train/, infer.py and run.py: from ``def`` to its last line, the
    docstring not counted."""
    files = sorted((PACKAGE / "train").glob("*.py")) + [PACKAGE / "infer.py", PACKAGE / "run.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                doc = node.body[0]
                if (
                    isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)
                ):
                    lines -= doc.end_lineno - doc.lineno + 1
                yield lines, f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"


def test_no_run_engine_function_is_longer_than_60_lines():
    long = sorted(item for item in _function_lengths() if item[0] > MAX_FUNCTION_LINES)
    assert not long, long


# ------------------------------------------------------------------------------------------------ the run directory
def test_a_second_writer_into_a_run_directory_is_refused_in_both(tmp_path):
    """Two runs into one directory: the one that comes second fails at once, naming the directory, and touches
    nothing; the lock is released when the first one ends (also when it fails)."""
    for name, fit_into in (("density", density_fit), ("svi", svi_fit)):
        out = tmp_path / name
        with run.run_lock(out, "other run"):  # another writer holds the directory (a separate open file)
            with pytest.raises(run.RunLockedError, match=rf"^fit: {re.escape(str(out))} is in use by another run"):
                fit_into(out)
            assert not (out / run.CHECKPOINT).exists()
        fit_into(out)  # released: the run goes ahead
        assert (out / run.CHECKPOINT).is_file()
        with pytest.raises(run.CheckpointExistsError):  # fails inside the lock: the lock is released all the same
            fit_into(out)
        with run.run_lock(out, "check"):
            pass


def test_the_command_line_reports_a_locked_directory_in_one_line(tmp_path, capsys):
    from pyroflows.cli import main

    out = tmp_path / "run"
    argv = ["fit", "--levels", "1", "--num-layers", "1", "--hidden", "8", "--num-steps", "2", "--out", str(out)]
    with run.run_lock(out, "the first run"):
        assert main([*argv, "--no-progress"]) == 2
    *header, err = capsys.readouterr().err.strip().splitlines()  # the model's line, then the error
    assert len(header) == 1 and header[0].startswith("fit: glow")
    assert err.startswith("pyroflows fit: error:") and "is in use by another run" in err
    assert not (out / run.CHECKPOINT).exists()


def test_the_lock_of_a_killed_process_is_released_by_the_os(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pyroflows.run import run_lock\nimport time\nwith run_lock({str(out)!r}, 'x'):\n"
         "    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run.RunLockedError):
            density_fit(out)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait(timeout=30)
    density_fit(out)  # no stale lock file blocks the next run
    assert (out / run.CHECKPOINT).is_file()


# ------------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_checkpoints_and_the_resumed_run_repeats_the_uninterrupted_one(tmp_path, signum):
    # density: the signal arrives during step 3 (a forward hook raises it), checkpoint_every would only save at 8
    whole, _ = density_fit(tmp_path / "whole", num_steps=8, checkpoint_every=8)
    calls = {"n": 0}
    # what the process had before the run: Python's default_int_handler, or SIG_IGN where SIGINT was ignored when it
    # started (a job started in the background by a shell without job control)
    before = signal.getsignal(signal.SIGINT)

    def raise_at_third(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signum)
        return output

    torch.manual_seed(0)
    model = build_density("realnvp", (2,), num_layers=2)
    model.register_forward_hook(raise_at_third)
    kw = {"num_steps": 8, "batch_size": 32, "lr": 2e-3, "device": "cpu", "progress": False, "checkpoint_every": 8}
    with pytest.raises(run.RunInterrupted, match=r"^fit: stopped by SIG\w+ after step 3; checkpoint .*resume") as info:
        train.fit(model, toy(), out=tmp_path / "cut", **kw)
    assert info.value.exit_code == 128 + signum and isinstance(info.value, KeyboardInterrupt)
    assert run.load_checkpoint(tmp_path / "cut" / run.CHECKPOINT)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
    resumed, _ = density_fit(tmp_path / "cut", num_steps=8, checkpoint_every=8, resume=True)
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)

    # SVI: the signal arrives in the callback of step 5
    full = svi_fit(tmp_path / "svi_whole", num_steps=10)

    def callback(step, loss):
        if step == 5:
            signal.raise_signal(signum)

    with pytest.raises(run.RunInterrupted, match=r"after step 5; checkpoint"):
        svi_fit(tmp_path / "svi_cut", num_steps=10, callback=callback)
    resumed = svi_fit(tmp_path / "svi_cut", num_steps=10, resume=True)
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=0, atol=1e-6)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_the_command_line_stops_on_a_signal_with_one_line_and_the_shell_exit_code(tmp_path, signum, code):
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = ["fit", "--levels", "1", "--num-layers", "1", "--hidden", "8", "--num-steps", "100000", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyroflows.cli", *argv, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code
    header, *reports, last = err.strip().splitlines()  # the model, the evaluation lines, then one about the stop
    assert header.startswith("fit: glow") and all(line.startswith("fit: step ") for line in reports), err
    assert "stopped by" in last and "--resume" in last, err
    step = run.load_checkpoint(out / run.CHECKPOINT)["step"]
    assert f"after step {step};" in last


def test_a_run_directory_stands_for_its_checkpoint_when_reading_and_resuming(tmp_path):
    from pyroflows.run import CheckpointError, atomic_torch_save, checkpoint_file, load_checkpoint, resume_source

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint at .*checkpoint.pt"):
        load_checkpoint(run, marker="m")
    with pytest.raises(CheckpointError, match="no checkpoint at .*checkpoint.pt'? to resume from"):
        resume_source(tmp_path / "new" / "checkpoint.pt", run, caller="fit")
    atomic_torch_save({"format": "m", "step": 7}, run / "checkpoint.pt")
    assert load_checkpoint(run, marker="m")["step"] == 7
    assert resume_source(tmp_path / "new" / "checkpoint.pt", run, caller="fit") == run / "checkpoint.pt"
    assert resume_source(tmp_path / "new" / "checkpoint.pt", str(run / "checkpoint.pt"), caller="fit") == (
        run / "checkpoint.pt"
    )
    assert checkpoint_file(tmp_path / "missing.pt") == tmp_path / "missing.pt"  # a file path is taken as it is
