"""pyroflows.train: resume equivalence, atomic checkpoints under crashes, non-finite stops, bad checkpoints,
2-process DDP (gloo), continuous data, mixed precision."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from pyroflows.data import load_digits
from pyroflows.data.toy import TwoMoons
from pyroflows.train import (
    CheckpointError,
    CheckpointExistsError,
    TrainingError,
    atomic_torch_save,
    build_density,
    evaluate,
    evaluate_with_error,
    fit,
    load_checkpoint,
    load_density,
)
from pyroflows.transforms import ActNorm

TINY = dict(levels=1, num_layers=2, hidden=8)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def tiny(flow="glow", **options):
    torch.manual_seed(0)
    if flow == "glow":
        return build_density("glow", (1, 8, 8), **{**TINY, **options})
    if flow == "residual":
        return build_density("residual", (1, 8, 8), **{"levels": 1, "num_layers": 1, "hidden": 8, **options})
    return build_density(flow, (1, 8, 8), **options)


def run(model, data, out=None, **kw):
    kw = {"num_steps": 12, "batch_size": 32, "lr": 2e-3, "device": "cpu", "progress": False, **kw}
    return fit(model, *data, out=out, **kw)


def states_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ basics
def test_fit_trains_and_writes(digits, tmp_path):
    result = run(tiny(), digits, tmp_path, num_steps=40, eval_every=20, warmup_steps=5)
    assert result.step == 40 and len(result.losses) == 40
    assert all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.3  # bits/dim actually falls
    assert [e["step"] for e in result.evals] == [20, 40]
    assert {"checkpoint.pt", "metrics.jsonl", "samples.png"} <= {p.name for p in tmp_path.iterdir()}
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 40
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 40 and ckpt["n_bins"] == 17
    # the stored model evaluates to the reported test figure (same dequantisation seed)
    reloaded = load_density(tmp_path / "checkpoint.pt")
    assert evaluate(reloaded, digits[1], seed=0) == pytest.approx(result.evals[-1]["test_bpd"], abs=1e-6)


def test_actnorm_initialised_once_on_init_batch(digits):
    model = tiny()
    run(model, digits, num_steps=1, lr=1e-12)
    norms = [m for m in model.modules() if isinstance(m, ActNorm)]
    assert norms and all(bool(m.initialized) for m in norms)
    # with a negligible lr the first ActNorm still standardises its input (logit, squeezed data) per channel
    logit, squeeze = model.flow.parts[0], model.flow.parts[1].parts[0]
    assert (type(logit).__name__, type(squeeze).__name__, model.flow.parts[1].parts[1]) == (
        "Logit",
        "Squeeze",
        norms[0],
    )
    with torch.no_grad():
        z = norms[0](squeeze(logit((load_digits("train").images.float() + 0.5) / 17)))
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    assert mean.abs().max() < 0.1 and (std - 1).abs().max() < 0.1, (mean, std)


def test_evaluate_is_repeatable_and_leaves_global_rng_alone(digits):
    model = tiny()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    a = evaluate(model, digits[1], seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert evaluate(model, digits[1], seed=5) == a
    assert evaluate(model, digits[1], seed=6) != a


def test_evaluate_is_the_mean_of_bits_per_dim(digits):
    """Bits/dim has one implementation: evaluate averages FlowDensity.bits_per_dim (same noise, same formula)."""
    model, test = tiny().eval(), digits[1]
    value = evaluate(model, test, batch_size=10_000, seed=4)
    with torch.no_grad():
        direct = model.bits_per_dim(test.images, test.n_bins, torch.Generator().manual_seed(4))
    assert value == pytest.approx(float(direct.double().mean()), abs=1e-6)


def test_evaluate_with_error_is_the_mean_of_independent_evaluations(digits):
    """The mean is the average of evaluate at seeds seed, seed + 1, ...; the standard error is the formula over the
    examples' figures (nll_scores gives them one evaluation at a time); repeats < 2 is refused."""
    from pyroflows.ood import nll_scores

    model, test = tiny(), digits[1]
    mean, se = evaluate_with_error(model, test, seed=3, repeats=3)
    runs = torch.stack([nll_scores(model, test, seed=s).double() for s in (3, 4, 5)])
    assert mean == pytest.approx(sum(evaluate(model, test, seed=s) for s in (3, 4, 5)) / 3, abs=1e-9)
    assert mean == pytest.approx(float(runs.mean()), abs=1e-9)
    assert se == pytest.approx(float(runs.var(0).sum().div(3).sqrt() / runs.shape[1]), rel=1e-9)
    with pytest.raises(ValueError, match="repeats"):
        evaluate_with_error(model, test, repeats=1)


def test_batch_sum_variance_counts_noise_shared_within_a_batch():
    """Figures with a random offset per batch of 10 plus noise per example: the batch formula's mean squared error
    bar over 4,000 simulated pairs of evaluations matches the true variance of the mean within 10 %; the
    per-example formula misses the covariances inside a batch and gives 2/11 of it here."""
    from pyroflows.train.evaluation import batch_sum_variance

    gen = torch.Generator().manual_seed(0)
    n, bs, reps, sims = 100, 10, 2, 4000
    shared = torch.randn(sims, reps, n // bs, 1, generator=gen, dtype=torch.float64).expand(-1, -1, -1, bs)
    runs = (shared.reshape(sims, reps, n) + torch.randn(sims, reps, n, generator=gen, dtype=torch.float64)).add(3.0)
    true_var = (n // bs * bs**2 + n) / reps / n**2  # variance of the mean over the R evaluations
    batch = torch.stack([batch_sum_variance(r, bs) for r in runs]) / reps / n**2
    per_example = runs.var(1).sum(-1) / reps / n**2
    assert float(batch.mean()) == pytest.approx(true_var, rel=0.1)
    assert float(per_example.mean()) == pytest.approx(2 / 11 * true_var, rel=0.1)


def test_evaluate_with_error_standard_error_is_calibrated():
    """A residual flow evaluated with its stochastic log-det (Hutchinson probe and Russian roulette, 2 exact
    terms): the standard error from 2 repeats matches the spread of the 2-repeat mean over 80 seeds within the
    sampling error of an 80-draw sd (|log ratio| < 0.25, about 3 of its standard errors; a standard error off by
    the factor sqrt(2) of a wrong repeats count would be 0.35)."""
    import pyroflows

    torch.manual_seed(0)
    flow = pyroflows.residual_flow(6, num_layers=2, hidden=(32,), eval_logdet="unbiased", eval_n_exact_terms=2)
    model = pyroflows.FlowDensity(flow, (6,))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a branch far from zero: the estimator has variance to measure
    data = torch.randn(300, 6)
    # the roulette is shared by a batch: the error bar comes from the 10 batches' totals
    results = [evaluate_with_error(model, data, seed=10 * s, repeats=2, batch_size=30) for s in range(80)]
    means = torch.tensor([m for m, _ in results], dtype=torch.float64)
    predicted = float(torch.tensor([se for _, se in results]).mean())
    assert predicted > 0
    assert abs(math.log(float(means.std()) / predicted)) < 0.25


def test_fit_on_continuous_2d_data_reports_nats_and_plots(tmp_path):
    toy = TwoMoons()
    torch.manual_seed(0)
    train, test = toy.sample(2000), toy.sample(500)
    model = build_density("residual", (2,), num_layers=2, hidden=(32,), logdet="exact")
    result = fit(model, train, test, num_steps=60, batch_size=128, lr=5e-3, device="cpu", out=tmp_path, progress=False)
    assert "test_nll" in result.evals[-1] and math.isfinite(result.evals[-1]["test_nll"])
    assert result.losses[-1] < result.losses[0]
    assert (tmp_path / "samples.png").stat().st_size > 1000  # density plot with samples


def test_bad_data_is_rejected(digits):
    with pytest.raises(ValueError, match="shape"):
        run(tiny(), (torch.randint(0, 17, (50, 1, 4, 4)),))
    with pytest.raises(ValueError, match="NaN"):
        run(build_density("realnvp", (2,), num_layers=2), (torch.tensor([[0.0, math.nan]] * 10),), batch_size=4)
    with pytest.raises(ValueError, match="exactly one of num_steps= and epochs="):
        fit(tiny(), digits[0], num_steps=3, epochs=1)
    with pytest.raises(ValueError, match="batch_size"):
        run(tiny(), digits, batch_size=5000)
    with pytest.raises(ValueError, match="optimizer"):
        run(tiny(), digits, optimizer="sgd")
    pixels = digits[0].images.float()  # integer pixels stored as floats: checked like any other pixels
    with pytest.raises(ValueError, match=r"^fit: training data \(n_bins=17\): pixels must be integer-valued"):
        fit(tiny(), pixels + 0.5, n_bins=17, num_steps=1, device="cpu", progress=False)
    assert run(tiny(), (pixels,), n_bins=17, num_steps=2).step == 2


def test_epochs_count_whole_passes(digits):
    result = run(tiny(), digits, num_steps=None, epochs=0.5, batch_size=100, eval_every=None)
    assert result.step == round(0.5 * (1437 // 100))


# ------------------------------------------------------------------------------------------------ resume
class Interrupt(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in fit may swallow it."""


def kill_at_forward(model, n):
    calls = {"n": 0}
    forward = model.forward

    def counting(x):
        calls["n"] += 1
        if calls["n"] == n:
            raise Interrupt
        return forward(x)

    model.forward = counting


@pytest.mark.parametrize("flow", ["glow", "residual"])
def test_resume_repeats_the_uninterrupted_run(digits, tmp_path, flow):
    kw = dict(num_steps=24, checkpoint_every=8, eval_every=8, ema=0.9, warmup_steps=4, sample_every=None)
    whole = run(tiny(flow), digits, tmp_path / "whole", **kw)

    killed = tiny(flow)
    kill_at_forward(killed, 13)  # dies during step 13, after the checkpoint of step 8
    with pytest.raises(Interrupt):
        run(killed, digits, tmp_path / "killed", **kw)
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 8

    torch.manual_seed(123)  # the resumed process starts from a different RNG state and different weights
    resumed = run(
        tiny(flow, **({"hidden": 8} if flow == "glow" else {})), digits, tmp_path / "killed", resume=True, **kw
    )
    assert resumed.step == 24
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses), rtol=0, atol=1e-5)
    assert [e["step"] for e in resumed.evals] == [8, 16, 24]
    for a, b in zip(resumed.evals, whole.evals, strict=True):
        assert a["test_bpd"] == pytest.approx(b["test_bpd"], abs=1e-5)
    states_equal(resumed.model.state_dict(), whole.model.state_dict(), atol=1e-5)
    states_equal(resumed.ema_model.state_dict(), whole.ema_model.state_dict(), atol=1e-5)
    lines = [json.loads(s) for s in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(s) for s in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in ref]  # no duplicated lines from the killed part


def test_resume_errors(digits, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(tiny(), digits, tmp_path, resume=True)
    run(tiny(), digits, tmp_path, num_steps=4)
    with pytest.raises(CheckpointExistsError, match="already exists") as exists:
        run(tiny(), digits, tmp_path, num_steps=4)
    assert isinstance(exists.value, CheckpointError) and isinstance(exists.value, FileExistsError)
    assert str(tmp_path / "checkpoint.pt") in str(exists.value) and "resume=True" in str(exists.value)
    with pytest.raises(CheckpointError, match="different architecture|is for model"):
        run(tiny(hidden=16), digits, tmp_path, num_steps=8, resume=True)
    with pytest.raises(CheckpointError, match="ema: saved None, now 0.9"):
        run(tiny(), digits, tmp_path, num_steps=8, resume=True, ema=0.9)
    with pytest.raises(CheckpointError, match=r"lr: saved 0.002, now 0.001.*seed: saved 0, now 1"):
        run(tiny(), digits, tmp_path, num_steps=8, resume=True, lr=1e-3, seed=1)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4  # none of that touched the checkpoint
    # "auto" resumes when there is a checkpoint and starts fresh when there is none
    assert run(tiny(), digits, tmp_path, num_steps=6, resume="auto").losses.__len__() == 6
    assert run(tiny(), digits, tmp_path / "new", num_steps=3, resume="auto").step == 3


def test_corrupted_and_foreign_checkpoints(digits, tmp_path):
    run(tiny(), digits, tmp_path, num_steps=3)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        run(tiny(), digits, tmp_path / "other", resume=bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a pyroflows checkpoint"):
        load_density(foreign)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


# ------------------------------------------------------------------------------------------------ crashes
def test_atomic_save_survives_a_kill_between_write_and_rename(tmp_path):
    target = tmp_path / "c.pt"
    atomic_torch_save({"v": torch.arange(3)}, target)
    script = textwrap.dedent(f"""
        import os, torch
        from pyroflows import run
        from pyroflows.train import checkpoint
        def die(*a, **k):
            os._exit(9)  # the process is killed after the temp file is written, before the rename
        run.os.replace = die
        checkpoint.atomic_torch_save({{"v": torch.arange(1000)}}, {str(target)!r})  # the old import path
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == 9
    assert torch.equal(torch.load(target)["v"], torch.arange(3))  # the old checkpoint is intact
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the new one was written, never renamed


def test_crash_inside_a_checkpoint_write_keeps_the_previous_one(digits, tmp_path, monkeypatch):
    from pyroflows import run as engine

    replace, calls = os.replace, {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt
        return replace(src, dst)

    monkeypatch.setattr(engine.os, "replace", flaky)
    with pytest.raises(Interrupt):
        run(tiny(), digits, tmp_path, num_steps=12, checkpoint_every=4)
    monkeypatch.setattr(engine.os, "replace", replace)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # cleaned up in-process
    assert run(tiny(), digits, tmp_path, num_steps=12, checkpoint_every=4, resume=True).step == 12


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(digits, tmp_path):
    model = tiny()
    run(model, digits, tmp_path, num_steps=10, checkpoint_every=5)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    coupling_weight = next(p for n, p in model.named_parameters() if "net" in n and p.dim() == 4)
    calls = {"n": 0}

    def poison(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                coupling_weight.fill_(math.nan)

    model.register_forward_pre_hook(poison)
    with pytest.raises(TrainingError, match=r"^fit: the loss is nan at step 13\b.*last good checkpoint .*step 10"):
        run(model, digits, tmp_path, num_steps=20, checkpoint_every=5, resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_non_finite_gradient_is_caught(digits, monkeypatch):
    model = tiny()
    param = next(model.parameters())
    param.register_hook(lambda g: torch.full_like(g, math.inf))
    with pytest.raises(TrainingError, match=r"^fit: the gradient norm is (inf|nan) at step 1\b"):
        run(model, digits, num_steps=3)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # no update was applied


# ------------------------------------------------------------------------------------------------ devices
def test_amp_runs_conditioners_in_bfloat16_on_cpu(digits):
    model = tiny()
    result = run(model, digits, num_steps=15, amp=True)
    assert all(math.isfinite(v) for v in result.losses) and result.losses[-1] < result.losses[0]
    nets = [m for m in model.modules() if hasattr(m, "compute_dtype")]
    assert nets and all(m.compute_dtype == torch.bfloat16 for m in nets)


def test_compile_opt_in_gives_the_same_losses(digits):
    eager = run(tiny(), digits, num_steps=4)
    compiled = run(tiny(), digits, num_steps=4, compile="eager")
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=0, atol=1e-5)
    assert torch.distributions.Distribution._validate_args  # torch.compile's global switch-off was undone


def test_cuda_request_without_cuda_is_a_clear_error(digits):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the GPU path is exercised by the device runs instead
    with pytest.raises(ValueError, match="cuda"):
        run(tiny(), digits, device="cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(worker),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    states_equal(r0["model"], r1["model"])  # DDP kept the replicas identical, ActNorm init included
    assert r0["init_bias"].abs().sum() > 0 and torch.equal(r0["init_bias"], r1["init_bias"])
    assert r0["losses"] == r1["losses"]  # both ranks report the mean over ranks
    assert r0["losses"][-1] < r0["losses"][0]
    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # the data were sharded
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint.pt")
    states_equal(ckpt["model"], r0["model"])
    assert len(ckpt["rng"]) == 2  # each rank's RNG state, for resume


def test_teardown_meets_at_a_barrier_only_after_a_finished_run(monkeypatch):
    from pyroflows.train import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    ctx = distributed.Context(rank=1, world_size=2, owns_group=True)
    distributed.teardown(ctx)
    assert calls == ["barrier", "destroy"]  # no rank leaves while another still receives
    calls.clear()
    distributed.teardown(ctx, finished=False)
    assert calls == ["destroy"]  # after an exception the other ranks may never arrive
    calls.clear()
    distributed.teardown(distributed.Context(rank=0, world_size=2, owns_group=False))
    assert calls == []  # a group the caller made is the caller's


def test_time_limit_stops_early_with_a_checkpoint_and_resume_continues(digits, tmp_path):
    first = run(tiny(), digits, tmp_path, num_steps=100000, time_limit=1.0, eval_every=None)
    assert 0 < first.step < 100000 and len(first.losses) == first.step
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == first.step and first.evals[-1]["step"] == first.step  # finished as at the last step
    second = run(tiny(), digits, tmp_path, num_steps=first.step + 5, resume=True)
    assert second.step == first.step + 5 and len(second.losses) == first.step + 5
    with pytest.raises(ValueError, match="time_limit"):
        run(tiny(), digits, time_limit=0)


# ------------------------------------------------------------------------------------------------ reports, outputs
def test_a_line_per_evaluation_without_the_bar(digits, capfd):
    """progress=False hides the bar, not the report: step, epoch, train and test bits/dim, img/s, ETA on stderr."""
    run(tiny(), digits, num_steps=30, eval_every=10)
    captured = capfd.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 3 and captured.out == "", captured
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"fit: step {10 * i}/30 (epoch "), line
        assert "train " in line and "test " in line and "bits/dim" in line and " img/s" in line
    assert "ETA " in lines[0] and "ETA " not in lines[-1]  # nothing left after the last step
    run(tiny(), digits, num_steps=10, eval_every=5, report=False)
    assert capfd.readouterr().err == ""


def test_auto_evaluation_keeps_evaluation_under_a_tenth_of_the_run(digits, monkeypatch):
    """eval_every="auto": the first evaluation after an epoch, each later one only after 9x the last one's time."""
    import time

    from pyroflows.train import loop

    calls, real = [], loop.evaluate

    def slow(*args, **kwargs):
        start = time.perf_counter()
        time.sleep(0.15)  # an expensive evaluation (a residual flow's exact log-det, say)
        value = real(*args, **kwargs)
        calls.append((start, time.perf_counter()))
        return value

    monkeypatch.setattr(loop, "evaluate", slow)
    per_epoch = len(digits[0]) // 32
    result = run(tiny(), digits, num_steps=4 * per_epoch, eval_every="auto")
    steps = [e["step"] for e in result.evals]
    assert steps[0] == per_epoch and steps[-1] == 4 * per_epoch and steps == sorted(set(steps))
    for (_, end), (start, _), step, nxt in zip(calls, calls[1:-1], steps, steps[1:-1]):
        assert start - end >= 9 * 0.15 and nxt - step >= per_epoch  # 9x the evaluation's time, and an epoch


def test_a_sample_grid_at_each_evaluation(digits, tmp_path):
    run(tiny(), digits, tmp_path, num_steps=20, eval_every=10)
    grids = sorted(p.name for p in tmp_path.glob("samples*.png"))
    assert grids == ["samples.png", "samples_step0000010.png"]  # the last step's grid is samples.png


def test_disk_full_keeps_the_last_checkpoint_and_leaves_no_partial_file(digits, tmp_path, monkeypatch):
    """ENOSPC while writing the second checkpoint: OutputError naming the file, the reason and the last good
    checkpoint; the first checkpoint is intact, no temporary file is left, and the run resumes from it."""
    import errno

    from pyroflows import run as engine
    from pyroflows.train import OutputError

    fsync, calls = os.fsync, {"n": 0}

    def full(fd):
        import stat

        calls["n"] += stat.S_ISREG(os.fstat(fd).st_mode)  # files only: directories are fsync-ed too
        if calls["n"] == 2 and stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(engine.os, "fsync", full)
    with pytest.raises(OutputError) as info:
        run(tiny(), digits, tmp_path, num_steps=12, checkpoint_every=4, eval_every=None, sample_every=100)
    message = str(info.value)
    assert "could not write checkpoint" in message and "No space left on device" in message
    assert f"the last good checkpoint {tmp_path / 'checkpoint.pt'} (step 4) is intact" in message
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(engine.os, "fsync", fsync)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert run(tiny(), digits, tmp_path, num_steps=12, checkpoint_every=4, resume=True).step == 12


def test_a_full_metrics_file_is_cut_back_to_whole_lines(tmp_path, monkeypatch):
    import errno

    from pyroflows.train import OutputError
    from pyroflows.train.loop import _Metrics

    metrics = _Metrics(tmp_path / "m.jsonl", None)
    metrics.write(step=1, loss=1.0)
    real = metrics.file

    class Full:
        def __getattr__(self, name):
            return getattr(real, name)

        def write(self, data):
            real.write(data[:5])  # a torn line, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    metrics.file = Full()
    with pytest.raises(OutputError, match="could not write metrics .*No space left.*earlier lines are intact"):
        metrics.write(step=2, loss=0.5)
    metrics.file = real
    metrics.close()
    assert [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [{"step": 1, "loss": 1.0}]


def test_evaluate_with_error_warns_when_few_batches_carry_a_residual_flows_error():
    """A residual flow's error bar comes from its batches: with fewer than 10 a warning names the batch size to use;
    by default the batch leaves 10 of them (at most 100 examples each), and gives the figures of that batch size;
    a flow with an exact log-det (per-example noise only) does not warn."""
    import pyroflows

    torch.manual_seed(0)
    flow = pyroflows.residual_flow(6, num_layers=1, hidden=(8,), eval_logdet="unbiased")
    residual = pyroflows.FlowDensity(flow, (6,))
    data = torch.randn(100, 6)
    with pytest.warns(UserWarning, match=r"from 1 batch\(es\) of 500.*batch_size <= 10"):
        evaluate_with_error(residual, data, repeats=2, batch_size=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = evaluate_with_error(residual, data, repeats=2)
        assert chosen == evaluate_with_error(residual, data, repeats=2, batch_size=10)
        big = torch.randn(3000, 6)
        assert evaluate_with_error(residual, big, repeats=2) == evaluate_with_error(residual, big, batch_size=100)
        evaluate_with_error(pyroflows.FlowDensity(pyroflows.realnvp(6, num_layers=2), (6,)), data, repeats=2)
