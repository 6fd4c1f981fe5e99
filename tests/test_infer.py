"""pyroflows.infer: SVI with flow guides on constrained, multi-site models; non-finite stops; param-store and
file round trips of fitted guides."""

from __future__ import annotations

import math
import warnings
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow

import pyroflows
from pyroflows import AutoFlow
from pyroflows.infer import (
    CheckpointError,
    CheckpointExistsError,
    SVIResult,
    TrainingError,
    fit,
    load_guide,
    loss_relapse,
    save_guide,
    sync_param_store,
)

BUILDERS = {
    "planar": partial(pyroflows.planar_flow, num_layers=4),
    "realnvp": partial(pyroflows.realnvp, num_layers=4, hidden=(32, 32)),
    "residual": partial(pyroflows.residual_flow, num_layers=2, hidden=(32,)),
}


def constrained_model():
    """Several sites with constrained supports: a real, positive scales in a plate, a simplex."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", 3):
        pyro.sample("scale", dist.LogNormal(loc, 0.5))
    pyro.sample("weights", dist.Dirichlet(torch.ones(4)))


def gaussian_model():
    pyro.sample("z", dist.Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])).to_event(1))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_vector_builder_fits_a_constrained_multi_site_model(name):
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(constrained_model, BUILDERS[name])
    result = fit(constrained_model, guide, 100, lr=0.01, num_particles=4, progress=False, seed=0)
    assert isinstance(result, SVIResult) and result.losses.shape == (100,) and np.isfinite(result.losses).all()
    # the model is normalised, so -ELBO = KL(q || p) >= 0 and training must lower it
    assert result.losses[-30:].mean() < result.losses[:30].mean()
    assert len(pyro.get_param_store()) > 2  # the flow's parameters, not only the prototype tensor
    with torch.no_grad():
        draws = [guide() for _ in range(20)]
    assert all((d["scale"] > 0).all() for d in draws)
    assert all(torch.allclose(d["weights"].sum(-1), torch.tensor(1.0), atol=1e-5) for d in draws)


def test_fit_reaches_the_exact_elbo_on_a_gaussian():
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(gaussian_model, BUILDERS["realnvp"])
    result = fit(gaussian_model, guide, 400, lr=0.02, num_particles=16, progress=False, seed=0)
    # log Z = 0: ELBO -> 0 from below; per-step estimates are noisy, so average the last 100
    assert -0.05 < result.final_elbo(100) < 0.05
    np.testing.assert_allclose(result.elbo, -result.losses)


def test_learning_rate_schedule_and_warmup():
    pyro.clear_param_store()
    guide = AutoNormal(gaussian_model)
    r = fit(gaussian_model, guide, 101, lr=0.1, lr_schedule="cosine", final_lr_factor=0.1, progress=False)
    assert r.lr[0] == pytest.approx(0.1) and r.lr[-1] == pytest.approx(0.01) and r.lr[50] == pytest.approx(0.055)
    pyro.clear_param_store()
    r = fit(gaussian_model, AutoNormal(gaussian_model), 20, lr=0.1, lr_schedule="constant", warmup_steps=10)
    np.testing.assert_allclose(r.lr[:10], 0.1 * np.arange(1, 11) / 10)
    assert (r.lr[10:] == 0.1).all()
    pyro.clear_param_store()
    r = fit(gaussian_model, AutoNormal(gaussian_model), 11, lr=0.1, lr_schedule="exponential", final_lr_factor=0.01)
    assert r.lr[-1] == pytest.approx(1e-3) and r.lr[5] == pytest.approx(0.01)
    pyro.clear_param_store()
    r = fit(gaussian_model, AutoNormal(gaussian_model), 101, lr=0.1, warmup_steps=5, progress=False)  # the default
    np.testing.assert_allclose(r.lr[:5], 0.1 * np.arange(1, 6) / 5)
    assert (r.lr[5:81] == 0.1).all()  # the peak rate for four fifths of the run, then half a cosine
    assert r.lr[90] == pytest.approx(0.1 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert r.lr[-1] == pytest.approx(0.1 * 0.05) and (np.diff(r.lr[80:]) < 0).all()


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own warning, before ours stops the run
def test_non_finite_loss_stops_before_the_update():
    state = {"bad": False}

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.tensor(float("nan") if state["bad"] else 0.0))

    def callback(step, loss):  # step counts from 1
        snapshots.append(guide.locs.z.item())
        state["bad"] = step == 5  # the loss of step 6 is NaN

    pyro.clear_param_store()
    guide = AutoNormal(model)
    snapshots = []
    with (
        pyro.validation_enabled(False),
        pytest.raises(TrainingError, match=r"^fit: the loss is nan at step 6; .*after step 5"),
    ):
        fit(model, guide, 20, progress=False, callback=callback, skip_nonfinite=0)
    assert len(snapshots) == 5 and guide.locs.z.item() == snapshots[-1]  # no update from the bad step


def test_an_occasional_non_finite_step_is_skipped_and_a_persistent_one_stops():
    bad_steps = {6, 7}
    state = {"step": 1}

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.tensor(float("nan") if state["step"] in bad_steps else 0.0))

    def callback(step, loss):
        snapshots.append(guide.locs.z.item())
        state["step"] = step + 1

    pyro.clear_param_store()
    guide, snapshots = AutoNormal(model), []
    with pyro.validation_enabled(False):
        result = fit(model, guide, 12, progress=False, callback=callback, skip_nonfinite=2, seed=0)
    assert result.skipped == [6, 7] and result.step == 12 and len(snapshots) == 12
    assert snapshots[4] == snapshots[5] == snapshots[6] != snapshots[7]  # no update at steps 6 and 7, then again
    assert np.isnan(result.losses[5:7]).all() and np.isfinite(np.delete(result.losses, [5, 6])).all()
    bad_steps.update(range(6, 100))  # from step 6 on: two skipped, the third in a row stops the run
    pyro.clear_param_store()
    guide, snapshots, state["step"] = AutoNormal(model), [], 1
    with pyro.validation_enabled(False), pytest.raises(TrainingError, match=r"^fit: the loss is nan at step 8; "):
        fit(model, guide, 12, progress=False, callback=callback, skip_nonfinite=2, seed=0)


def test_a_draw_outside_a_constraint_is_skipped_like_a_nan_with_validation_on():
    """With validation on, an unlucky draw raises torch's constraint error instead of giving a NaN loss: the step
    is skipped the same way, a persistent one stops the run naming the cause, and other errors propagate."""
    bad_steps = {6, 7}
    state = {"step": 1}

    def model():
        scale = torch.tensor(0.0 if state["step"] in bad_steps else 1.0)
        pyro.sample("z", dist.Normal(0.0, scale))

    def callback(step, loss):
        state["step"] = step + 1

    pyro.clear_param_store()
    result = fit(model, AutoNormal(model), 12, progress=False, callback=callback, skip_nonfinite=2, seed=0)
    assert result.skipped == [6, 7] and np.isfinite(np.delete(result.losses, [5, 6])).all()
    bad_steps.update(range(6, 100))
    pyro.clear_param_store()
    state["step"] = 1
    with pytest.raises(TrainingError, match=r"^fit: the loss is nan at step 8 \(Expected parameter scale") as info:
        fit(model, AutoNormal(model), 12, progress=False, callback=callback, skip_nonfinite=2, seed=0)
    assert isinstance(info.value.__cause__, ValueError)

    def shapes():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        if state["step"] > 3:
            pyro.sample("y", dist.Normal(torch.zeros(3), 1.0).to_event(1), obs=torch.zeros(2))

    pyro.clear_param_store()
    state["step"] = 1
    with pytest.raises(ValueError, match="(?i)shape"):
        fit(shapes, AutoNormal(shapes), 6, progress=False, callback=callback, seed=0)


def test_non_finite_gradient_stops():
    pyro.clear_param_store()

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.sqrt(z - z.detach()))  # value 0, gradient inf

    with pytest.raises(TrainingError, match=r"^fit: the gradient norm is (inf|nan) at step 1\b"):
        fit(model, AutoNormal(model), 3, progress=False, skip_nonfinite=0)


def test_guide_without_parameters_is_an_error():
    """Pyro trains an AutoNormalizingFlow built from a plain list of transforms with an empty param store."""
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(gaussian_model, lambda d: list(pyroflows.planar_flow(d, num_layers=2)))
    with pytest.raises(ValueError, match="no parameters"):
        fit(gaussian_model, guide, 5, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=-1), "num_steps"),
        (dict(num_steps=0), "num_steps must be an int >= 1, got 0"),
        (dict(lr=float("inf")), "lr must be > 0"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(checkpoint_every=5), "checkpoint_every needs out="),
        (dict(resume=True), "resume=True needs out="),
        (dict(resume="sometimes"), "no checkpoint at 'sometimes'"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(num_particles=0), "num_particles"),
        (dict(lr_schedule="step"), "lr_schedule"),
        (dict(final_lr_factor=0.0), "final_lr_factor"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(anneal=1.0), "anneal must be in"),
        (dict(anneal=-0.1), "anneal must be in"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, pyroflows.run.CheckpointError), match=match):
        fit(gaussian_model, AutoNormal(gaussian_model), **{"num_steps": 5, "progress": False, **kwargs})


def _fixed_draws(guide, n=5):
    guide.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        return [guide() for _ in range(n)]


@pytest.mark.parametrize("name", ["planar", "realnvp"])
def test_param_store_save_load_round_trips_a_fitted_flow_guide(name, tmp_path):
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(constrained_model, BUILDERS[name])
    fit(constrained_model, guide, 40, num_particles=4, progress=False, seed=0)
    expected = _fixed_draws(guide)
    pyro.get_param_store().save(tmp_path / "params.pt")

    pyro.clear_param_store()
    torch.manual_seed(999)  # a different global RNG state when the new flow is built
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = AutoNormalizingFlow(constrained_model, BUILDERS[name])
    assert sync_param_store(fresh) > 0
    for a, b in zip(expected, _fixed_draws(fresh)):
        for site in a:
            torch.testing.assert_close(a[site], b[site])
    # training continues on the loaded values: the store and the module hold one tensor
    fresh.train()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    fit(constrained_model, fresh, 1, progress=False)
    store = pyro.get_param_store()
    changed = [k for k in before if not torch.equal(before[k], store[k].detach())]
    assert changed and all(any(store[k] is p for p in fresh.parameters()) for k in changed)


def test_fit_adopts_loaded_param_store_values(tmp_path):
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(gaussian_model, BUILDERS["realnvp"])
    fit(gaussian_model, guide, 200, lr=0.02, num_particles=8, progress=False, seed=0)
    pyro.get_param_store().save(tmp_path / "p.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "p.pt")
    fresh = AutoNormalizingFlow(gaussian_model, BUILDERS["realnvp"])
    resumed = fit(gaussian_model, fresh, 20, lr=1e-4, num_particles=8, progress=False, seed=1)
    assert resumed.losses.mean() < 0.2  # a fresh flow starts at KL ~ 2.5 here


def test_residual_guide_param_store_round_trip_is_close():
    """Spectral-norm power-iteration vectors are buffers, not in the param store: a rebuilt residual guide
    re-estimates them, so it matches to the power iteration's accuracy, not bit for bit (load_guide is exact)."""
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(constrained_model, BUILDERS["residual"])
    fit(constrained_model, guide, 20, num_particles=4, progress=False, seed=0)
    expected = _fixed_draws(guide)
    state = pyro.get_param_store().get_state()
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    fresh = AutoNormalizingFlow(constrained_model, BUILDERS["residual"])
    sync_param_store(fresh)
    for a, b in zip(expected, _fixed_draws(fresh)):
        torch.testing.assert_close(a["scale"], b["scale"], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_save_guide_load_guide_is_exact(name, tmp_path):
    pyro.clear_param_store()
    guide = AutoNormalizingFlow(constrained_model, BUILDERS[name])
    fit(constrained_model, guide, 20, num_particles=4, progress=False, seed=0)
    save_guide(guide, tmp_path / "guide.pt")
    expected = _fixed_draws(guide)
    pyro.clear_param_store()
    torch.manual_seed(7)
    fresh = load_guide(AutoNormalizingFlow(constrained_model, BUILDERS[name]), tmp_path / "guide.pt")
    for a, b in zip(expected, _fixed_draws(fresh)):
        for site in a:
            torch.testing.assert_close(a[site], b[site], rtol=0, atol=0)


def test_save_and_load_guide_errors(tmp_path):
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="never run or fitted"):
        save_guide(AutoNormal(gaussian_model), tmp_path / "g.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a guide saved by pyroflows"):
        load_guide(AutoNormal(gaussian_model), tmp_path / "other.pt")
    guide = AutoNormal(gaussian_model)
    guide()
    save_guide(guide, tmp_path / "normal.pt")
    with pytest.raises(ValueError, match="holds a guide of class AutoNormal, not AutoNormalizingFlow"):
        load_guide(AutoNormalizingFlow(gaussian_model, BUILDERS["planar"]), tmp_path / "normal.pt")
    pyro.clear_param_store()
    flow = AutoNormalizingFlow(gaussian_model, BUILDERS["planar"])
    flow()
    save_guide(flow, tmp_path / "planar4.pt")
    pyro.clear_param_store()
    other = AutoNormalizingFlow(gaussian_model, partial(pyroflows.planar_flow, num_layers=2))
    with pytest.raises(ValueError, match="does not fit this guide's architecture"):
        load_guide(other, tmp_path / "planar4.pt")


def test_progress_bar_shows_elbo(capsys):
    pyro.clear_param_store()
    fit(gaussian_model, AutoNormal(gaussian_model), 30, progress=True)
    err = capsys.readouterr().err
    assert "svi" in err and "elbo=" in err and math.isfinite(float(err.rsplit("elbo=", 1)[1].split("]")[0]))


def _interrupt_after(n):
    def callback(step, loss):
        if step == n:
            raise KeyboardInterrupt  # the process dies after step n (the checkpoint before it survives)

    return callback


@pytest.mark.parametrize("guide_cls", [AutoNormalizingFlow, AutoFlow])
@pytest.mark.parametrize("name", ["realnvp", "residual"])
def test_checkpoint_resume_repeats_the_uninterrupted_run(name, guide_cls, tmp_path):
    """Interrupted after 12 of 20 steps (last checkpoint at 10), a fresh guide resumed from the file takes the
    very steps of the uninterrupted run: identical losses, learning rates and final state, draw for draw."""
    kwargs = dict(num_particles=4, lr=0.02, seed=3, progress=False, checkpoint_every=5)

    def run(path, **extra):
        pyro.clear_param_store()
        guide = guide_cls(constrained_model, BUILDERS[name])
        return fit(constrained_model, guide, 20, out=path, **kwargs, **extra), guide

    full, full_guide = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callback=_interrupt_after(12))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 10
    resumed, guide = run(tmp_path / "cut", resume=True)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    np.testing.assert_array_equal(resumed.lr, full.lr)
    for (k, a), b in zip(full_guide.state_dict().items(), guide.state_dict().values()):
        assert torch.equal(a, b), k
    store = pyro.get_param_store()  # the guide trains through the store: both hold the resumed tensors
    assert all(store[n] is p or torch.equal(store[n], p) for n, p in guide.named_parameters() if n in store)
    assert (resumed.step, resumed.out, resumed.checkpoint) == (20, tmp_path / "cut", tmp_path / "cut" / "checkpoint.pt")
    again, _ = run(tmp_path / "cut", resume=True)  # a finished run resumes to nothing
    np.testing.assert_array_equal(again.losses, full.losses)


def observed_model():
    """A prior, a plate of observations and a factor: annealing weights the last two, never the prior."""
    y = torch.tensor([2.0, 1.5, 2.5])
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("data", 3):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    pyro.factor("extra", -0.5 * mu**2)


class _RecordingELBO(pyro.infer.Trace_ELBO):
    """Trace_ELBO that records the scale of every site of the model it is given, once per step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scales = []

    def loss_and_grads(self, model, guide, *args, **kwargs):
        trace = pyro.poutine.trace(model).get_trace(*args, **kwargs)
        sites = trace.nodes.items()
        self.scales.append({name: float(site["scale"]) for name, site in sites if site["type"] == "sample"})
        return super().loss_and_grads(model, guide, *args, **kwargs)


def test_anneal_weights_the_likelihood_linearly_then_leaves_the_model_alone():
    """anneal=0.4 over 10 steps: the observed site and the factor are weighted 1/4, 2/4, 3/4, then 1 from step 4
    on; the prior is never touched."""
    elbo = _RecordingELBO()
    pyro.clear_param_store()
    fit(observed_model, AutoNormal(observed_model), 10, loss=elbo, anneal=0.4, progress=False, report=False)
    assert [s["y"] for s in elbo.scales] == [0.25, 0.5, 0.75] + [1.0] * 7
    assert [s["extra"] for s in elbo.scales] == [s["y"] for s in elbo.scales]
    assert all(s["mu"] == 1.0 for s in elbo.scales)
    # the importance-weighted bound takes the tempered target too (TraceIW_ELBO refuses subsampled sites only)
    fit(observed_model, AutoNormal(observed_model), 4, estimator="iw", anneal=0.5, progress=False, report=False)
    config = pyroflows.infer.SVIConfig(num_steps=7, anneal=0.5)
    assert [config.temperature(t) for t in range(1, 8)] == pytest.approx([1 / 3.5, 2 / 3.5, 3 / 3.5, 1, 1, 1, 1])
    assert pyroflows.infer.SVIConfig(num_steps=7).temperature(1) == 1.0


def test_default_anneal_tempers_data_under_proper_priors_only():
    """anneal="auto" (fit's default): 0.5 for a model with observed data and proper priors; 0 for targets of
    pyro.factor terms alone, for improper priors, and for models without observations."""
    from pyroflows.infer import default_anneal

    def energy():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("u", -(((z**2).sum() - 1.0) ** 2))

    def improper(y):
        mu = pyro.sample("mu", dist.ImproperUniform(dist.constraints.real, (), ()))
        pyro.sample("y", dist.Normal(mu, 1.0).expand([3]).to_event(1), obs=y)

    def masked(y):  # wrapped distributions are looked through
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("y", dist.Normal(mu, 1.0).mask(torch.tensor([True, False])).to_event(1), obs=y)

    state = torch.get_rng_state()
    assert default_anneal(observed_model) == 0.5
    assert torch.equal(torch.get_rng_state(), state)  # the draw from the prior moved no random stream
    assert default_anneal(masked, torch.zeros(2)) == 0.5
    assert default_anneal(energy) == 0.0
    assert default_anneal(improper, torch.zeros(3)) == 0.0
    assert default_anneal(gaussian_model) == 0.0

    def steps(model):
        elbo = _RecordingELBO()
        pyro.clear_param_store()
        fit(model, AutoNormal(model), 10, loss=elbo, progress=False, report=False)
        return elbo.scales

    assert [s["y"] for s in steps(observed_model)] == pytest.approx([0.2, 0.4, 0.6, 0.8] + [1.0] * 6)
    assert all(s["u"] == 1.0 for s in steps(energy))
    with pytest.raises(ValueError, match="anneal must be a number in \\[0, 1\\) or 'auto'"):
        fit(observed_model, AutoNormal(observed_model), 5, anneal="always", progress=False)


def test_annealing_leaves_reparameterised_latents_as_prior():
    """A latent that poutine.reparam computes is marked observed by Pyro (a Delta site): it is not data, so a
    prior-only model stays unannealed by default, and an annealed run tempers the data but not that site."""
    from pyro import poutine
    from pyro.infer.reparam import LocScaleReparam

    from pyroflows.infer import default_anneal, is_reparameterised

    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(torch.zeros(3), torch.exp(v / 2)).to_event(1))

    noncentred_funnel = poutine.reparam(funnel, config={"x": LocScaleReparam(0.0)})
    noncentred = poutine.reparam(observed_model, config={"mu": LocScaleReparam(0.0)})
    trace = poutine.trace(noncentred).get_trace()
    assert [n for n, site in trace.nodes.items() if is_reparameterised(site)] == ["mu"]
    assert default_anneal(noncentred_funnel) == 0.0 and default_anneal(funnel) == 0.0
    assert default_anneal(noncentred) == 0.5
    elbo = _RecordingELBO()
    pyro.clear_param_store()
    fit(noncentred, AutoNormal(noncentred), 4, loss=elbo, anneal=0.5, progress=False, report=False)
    assert [s["y"] for s in elbo.scales] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert all(s["mu"] == 1.0 and s["mu_decentered"] == 1.0 for s in elbo.scales)


@pytest.mark.parametrize(
    "options, changed",
    [({}, {"anneal": 0.5}), ({"anneal_alpha": 0.3}, {"anneal_alpha": 0.5})],
    ids=["anneal", "anneal_alpha"],
)
def test_an_annealed_run_resumes_on_its_schedule(options, changed, tmp_path):
    """Interrupted mid-anneal (with anneal_alpha: during the Rényi steps), the resumed run takes the very steps of
    the uninterrupted one, tempered alike; a checkpoint of another schedule is refused, naming the setting."""

    def run(path, **extra):
        pyro.clear_param_store()
        guide = AutoFlow(observed_model, BUILDERS["realnvp"])
        base = dict(anneal=0.8, num_particles=4, lr=0.02, seed=3, progress=False, report=False, checkpoint_every=5)
        return fit(observed_model, guide, 20, out=path, **{**base, **options, **extra})

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callback=_interrupt_after(7))
    resumed = run(tmp_path / "cut", resume=True)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    with pytest.raises(CheckpointError, match=next(iter(changed))):
        run(tmp_path / "cut", resume=True, **changed)


def test_anneal_alpha_trains_the_annealing_steps_on_a_renyi_bound_rising_to_the_elbo(monkeypatch):
    """anneal_alpha=0.5, anneal=0.5 over 10 steps: steps 1-4 (beta 0.2 to 0.8) train on the Rényi bound of order
    0.5 + 0.5 beta (0.6, 0.7, 0.8, 0.9) of the tempered target, steps 5-10 on STL's ELBO as without the option; the
    same run with anneal_alpha=None uses STL at every step."""
    from pyroflows.elbo import TraceRenyi_ELBO, TraceSTL_ELBO

    calls = []
    for cls in (TraceRenyi_ELBO, TraceSTL_ELBO):
        original = cls.loss_and_grads

        def spy(self, *args, _original=original, **kwargs):
            scale = pyro.poutine.trace(args[0]).get_trace().nodes["y"]["scale"]
            calls.append((type(self).__name__, getattr(self, "alpha", None), float(scale)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "loss_and_grads", spy)
    pyro.clear_param_store()
    guide = AutoFlow(observed_model, BUILDERS["realnvp"])
    result = fit(observed_model, guide, 10, anneal=0.5, anneal_alpha=0.5, seed=0, progress=False, report=False)
    assert [c[0] for c in calls] == ["TraceRenyi_ELBO"] * 4 + ["TraceSTL_ELBO"] * 6
    assert [c[1] for c in calls[:4]] == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert [c[2] for c in calls] == pytest.approx([0.2, 0.4, 0.6, 0.8] + [1.0] * 6)
    assert np.isfinite(result.losses).all() and result.objective == "ELBO"
    calls.clear()
    pyro.clear_param_store()
    fit(observed_model, AutoFlow(observed_model, BUILDERS["realnvp"]), 10, anneal=0.5, progress=False, report=False)
    assert [c[0] for c in calls] == ["TraceSTL_ELBO"] * 10
    config = pyroflows.infer.SVIConfig(num_steps=4, anneal=0.5, anneal_alpha=0.0)
    assert [config.order(t) for t in range(1, 5)] == [0.5, 1.0, 1.0, 1.0]
    assert pyroflows.infer.SVIConfig(num_steps=4, anneal=0.5).order(1) == 1.0


def test_anneal_alpha_refuses_what_its_bound_cannot_do():
    """Each misuse is named: an order outside [0, 1), another estimator, no annealing (also anneal='auto' on a model
    without data), a loss of one's own, and a model with parameters of its own (before any step)."""
    guide = AutoNormal(observed_model)
    options = dict(progress=False, report=False)
    for value in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="anneal_alpha"):
            fit(observed_model, guide, 3, anneal=0.5, anneal_alpha=value, **options)
    with pytest.raises(ValueError, match="anneal_alpha leads the annealing phase of estimator='stl'.*'reparam'"):
        fit(observed_model, guide, 3, anneal=0.5, anneal_alpha=0.5, estimator="reparam", **options)
    with pytest.raises(ValueError, match="anneal_alpha needs annealing"):
        fit(observed_model, guide, 3, anneal=0.0, anneal_alpha=0.5, **options)
    with pytest.raises(ValueError, match="anneal_alpha needs annealing"):  # 'auto' is 0 without observed data
        fit(gaussian_model, AutoNormal(gaussian_model), 3, anneal_alpha=0.5, **options)
    with pytest.raises(ValueError, match="does not take loss="):
        fit(observed_model, guide, 3, anneal=0.5, anneal_alpha=0.5, loss=pyro.infer.Trace_ELBO(), **options)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="the model has the parameter\\(s\\) 'prior_scale'"):
        fit(learned_prior_model, AutoNormal(learned_prior_model), 3, anneal=0.5, anneal_alpha=0.5, **options)


def learned_prior_model():
    """A model with a parameter of its own (type-II maximum likelihood of the prior scale), trained beside the
    guide."""
    scale = pyro.param("prior_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, scale))
    with pyro.plate("data", 3):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.tensor([2.0, 1.5, 2.5]))


def learned_centring_model():
    """observed_model with mu's centring learned (Pyro's LocScaleReparam(centered=None): the parameter mu_centered)."""
    from pyro.infer.reparam import LocScaleReparam

    return pyro.poutine.reparam(observed_model, config={"mu": LocScaleReparam()})()


@pytest.mark.parametrize("model, name", [(learned_prior_model, "prior_scale"), (learned_centring_model, "mu_centered")])
def test_a_resumed_run_restores_the_models_own_parameters(model, name, tmp_path):
    """Parameters the model creates (not the guide) are trained by fit too, so its checkpoints keep them: resumed
    after an interruption, the run takes the very steps of the uninterrupted one and ends at the same values."""

    def run(path, **extra):
        pyro.clear_param_store()
        options = dict(num_particles=4, lr=0.05, seed=3, progress=False, report=False, checkpoint_every=5)
        result = fit(model, AutoFlow(model, BUILDERS["realnvp"]), 20, out=path, **{**options, **extra})
        return result, pyro.get_param_store()[name].detach().clone()

    full, full_value = run(tmp_path / "full")
    assert not torch.allclose(full_value, torch.tensor(1.0 if name == "prior_scale" else 0.5))  # it was trained
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callback=_interrupt_after(12))
    resumed, value = run(tmp_path / "cut", resume=True)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    assert torch.equal(value, full_value)
    pyro.clear_param_store()
    with pytest.raises(CheckpointError, match=f"holds the parameter '{name}' of shape \\(\\), but the model does not"):
        fit(
            observed_model,
            AutoFlow(observed_model, BUILDERS["realnvp"]),
            20,
            out=tmp_path / "cut",
            resume=True,
            num_particles=4,
            lr=0.05,
            seed=3,
            progress=False,
        )


@pytest.mark.parametrize("model, name", [(learned_prior_model, "prior_scale"), (learned_centring_model, "mu_centered")])
def test_save_guide_keeps_the_models_own_parameters(model, name, tmp_path):
    """A guide saved and loaded into a fresh process brings the parameters of its model (a learned prior scale, a
    learned centring) back with it: the original sites' draws, which depend on them, are the same numbers. Stale
    store entries the model does not create are not saved, and a guide loaded onto a model without the parameter
    is refused by name."""
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["realnvp"])
    fit(model, guide, 20, num_particles=4, lr=0.05, seed=3, progress=False, report=False)
    trained = pyro.get_param_store()[name].detach().clone()
    pyro.param("stale", torch.tensor(3.0))  # e.g. left over from another guide
    save_guide(guide, tmp_path / "guide.pt")
    assert set(torch.load(tmp_path / "guide.pt")["model_params"]) == {name}

    def draws(g):
        pyro.set_rng_seed(11)
        return Predictive(model, guide=g, num_samples=6)()["mu"]

    expected = draws(guide)
    pyro.clear_param_store()
    fresh = load_guide(AutoFlow(model, BUILDERS["realnvp"]), tmp_path / "guide.pt")
    assert torch.equal(pyro.get_param_store()[name].detach(), trained)
    assert torch.equal(draws(fresh), expected)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=f"holds the parameter '{name}' of shape \\(\\), but the model does not"):
        load_guide(AutoFlow(observed_model, BUILDERS["realnvp"]), tmp_path / "guide.pt")


def test_save_guide_needs_the_models_arguments_to_find_its_parameters(tmp_path):
    def model(y):
        scale = pyro.param("prior_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        mu = pyro.sample("mu", dist.Normal(0.0, scale))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([2.0, 1.5, 2.5])
    pyro.clear_param_store()
    guide = AutoFlow(model, BUILDERS["planar"])
    fit(model, guide, 10, model_args=(y,), num_particles=2, seed=0, progress=False, report=False)
    with pytest.raises(ValueError, match="parameters the guide does not own \\('prior_scale'\\).*pass the model's"):
        save_guide(guide, tmp_path / "guide.pt")
    save_guide(guide, tmp_path / "guide.pt", y)
    value = pyro.get_param_store()["prior_scale"].detach().clone()
    pyro.clear_param_store()
    load_guide(AutoFlow(model, BUILDERS["planar"]), tmp_path / "guide.pt", y)
    assert torch.equal(pyro.get_param_store()["prior_scale"].detach(), value)


def test_checkpoint_errors(tmp_path):
    out = tmp_path / "svi"
    pyro.clear_param_store()
    guide = AutoNormal(gaussian_model)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(gaussian_model, guide, 4, out=out, resume=True, progress=False)
    fit(gaussian_model, guide, 4, out=out, progress=False)
    with pytest.raises(CheckpointExistsError, match="already exists") as exists:
        fit(gaussian_model, guide, 4, out=out, progress=False)  # never overwrites a run silently
    assert isinstance(exists.value, FileExistsError) and str(out / "checkpoint.pt") in str(exists.value)
    with pytest.raises(CheckpointError, match="num_steps: saved 4, now 8"):
        fit(gaussian_model, AutoNormal(gaussian_model), 8, out=out, resume="auto", progress=False)
    with pytest.raises(ValueError, match="needs out="):
        fit(gaussian_model, guide, 4, resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        fit(gaussian_model, guide, 4, out=tmp_path / "b", checkpoint_every=0, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        fit(gaussian_model, guide, 4, out=tmp_path / "junk", resume=True, progress=False)
    fresh = fit(gaussian_model, guide, 4, out=tmp_path / "new", resume="auto", progress=False)
    assert (tmp_path / "new" / "checkpoint.pt").is_file() and np.isfinite(fresh.losses).all()
    assert fresh.checkpoint == tmp_path / "new" / "checkpoint.pt"


def test_checkpoint_is_the_deprecated_name_of_out_and_keeps_its_file_meaning(tmp_path):
    pyro.clear_param_store()
    with pytest.warns(FutureWarning, match="fit: 'checkpoint' is renamed 'out'.*removed in pyroflows 0.3"):
        result = fit(gaussian_model, AutoNormal(gaussian_model), 4, checkpoint=tmp_path / "svi.pt", progress=False)
    assert (tmp_path / "svi.pt").is_file() and result.checkpoint == tmp_path / "svi.pt" and result.out is None
    pyro.clear_param_store()
    with pytest.warns(FutureWarning), pytest.raises(CheckpointError, match="already exists"):
        fit(gaussian_model, AutoNormal(gaussian_model), 4, checkpoint=tmp_path / "svi.pt", progress=False)
    with pytest.raises(ValueError, match="not both"):
        fit(gaussian_model, AutoNormal(gaussian_model), 4, checkpoint=tmp_path / "a.pt", out=tmp_path / "b")


# ------------------------------------------------------------------------------------------------ the final report
def _normal_model():
    pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 0.5).to_event(1))


def test_fit_ends_with_elbo_and_khat_verdict_on_stderr(capfd):
    pyro.clear_param_store()
    guide = AutoNormal(_normal_model)
    result = fit(_normal_model, guide, num_steps=300, lr=0.05, progress=False, seed=0)
    err = capfd.readouterr().err.strip()
    assert err.startswith("fit: 300 steps in ") and "ELBO " in err and "k̂ " in err, err
    assert result.khat is not None and result.khat < 0.5 and ": good, the guide fits the posterior." in err


def test_report_false_prints_nothing_and_the_report_leaves_the_rng_alone(capfd):
    draws = []
    for report in (False, True):
        pyro.clear_param_store()
        guide = AutoNormal(_normal_model)
        result = fit(_normal_model, guide, num_steps=20, progress=False, seed=0, report=report)
        draws.append(torch.rand(3))
        assert (result.khat is None) == (not report)
        if not report:
            assert capfd.readouterr().err == ""
    assert torch.equal(*draws)  # the 1000 draws behind k̂ did not move the global RNG


@pytest.mark.parametrize(
    "khat, verdict, advice",
    [(0.2, "good", False), (0.6, "usable", False), (0.9, "unreliable", True), (float("nan"), "could not", False)],
)
def test_summary_verdicts(khat, verdict, advice):
    text = SVIResult(np.ones(5), None, 0.1, np.ones(5), step=5, khat=khat).summary()
    assert verdict in text and ("Try:" in text) == advice


def test_loss_relapse_flags_a_trace_that_ends_well_above_its_best():
    rng = np.random.default_rng(0)
    steady = 1.0 + 0.3 * rng.standard_normal(2000)
    assert loss_relapse(steady) is None
    assert loss_relapse(np.linspace(5.0, 1.0, 2000) + 0.3 * rng.standard_normal(2000)) is None  # still improving
    jumped = steady.copy()
    jumped[1500:] += 1.0  # windows of 100 steps: 1501-1600 onwards are worse
    r = loss_relapse(jumped)
    assert r is not None and abs(r["final"] - r["best"] - 1.0) < 0.15
    a, b = r["best_steps"]
    assert b - a == 99 and b <= 1500 and (a - 1) % 100 == 0
    holes = jumped.copy()
    holes[::7] = np.nan  # skipped steps are left out, not fatal
    assert loss_relapse(holes) is not None
    assert (
        loss_relapse(np.full(2000, 1.0)) is None
        and loss_relapse(np.r_[np.full(1000, 1.0), np.full(1000, 1.05)]) is None
    )
    # the last window 0.2 above, but the losses' sd is 3: within 4 standard errors of window means
    assert loss_relapse(1.0 + 3.0 * rng.standard_normal(2000) + np.r_[np.zeros(1900), np.full(100, 0.2)]) is None
    assert loss_relapse(jumped[:30]) is None  # too short to judge (fewer than 4 windows)
    # a tempered start that was lower than the full-weight loss is not a best to return to
    tempered = np.r_[np.full(500, -3.0), steady[500:]]
    assert loss_relapse(tempered) is not None and loss_relapse(tempered, start=500) is None


def test_fit_warns_when_the_loss_ends_well_above_its_best():
    """A run whose loss rises late (here the model's factor moves by 3 nats after step 150) is flagged: a
    UserWarning naming the fix, result.relapse and a line of the summary; the same run without it is not."""
    state = {"offset": 0.0}

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", torch.tensor(-state["offset"]))

    def jump(step, loss):
        state["offset"] = 3.0 if step >= 150 else 0.0

    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="became unstable.*lower lr"):
        result = fit(model, AutoNormal(model), 200, progress=False, report=False, callback=jump, seed=0)
    assert abs(result.relapse["final"] - result.relapse["best"] - 3.0) < 0.5 and result.relapse["best_steps"][1] <= 150
    assert "became unstable" in result.summary()
    state["offset"] = 0.0
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*became unstable")
        calm = fit(model, AutoNormal(model), 200, progress=False, report=False, seed=0)
    assert calm.relapse is None and "unstable" not in calm.summary()


def test_default_lr_falls_with_the_cube_root_of_the_particles():
    """3e-3 up to 8 particles, then 3e-3 * (8 / n) ** (1/3): fit uses it when no lr is given, from its own particles or
    those of the ELBO passed as loss=; an lr given is used as it is."""
    from pyro.infer import Trace_ELBO

    from pyroflows.infer import SVIConfig, default_lr

    assert default_lr(1) == default_lr(8) == 3e-3
    assert default_lr(64) == pytest.approx(1.5e-3, rel=1e-12)
    assert default_lr(256) == pytest.approx(3e-3 / 32 ** (1 / 3), rel=1e-12)
    assert SVIConfig(num_particles=32).lr == default_lr(32) and SVIConfig(num_particles=32, lr=0.02).lr == 0.02
    with pytest.raises(ValueError, match="num_particles"):
        default_lr(0)

    def peak_lr(**kwargs):
        pyro.clear_param_store()
        guide = AutoNormal(gaussian_model)
        return fit(gaussian_model, guide, 5, progress=False, report=False, seed=0, **kwargs).lr[0]

    assert peak_lr() == pytest.approx(3e-3)  # stable_cosine: the peak rate from the first step
    assert peak_lr(num_particles=64) == pytest.approx(1.5e-3)
    assert peak_lr(loss=Trace_ELBO(num_particles=128, vectorize_particles=True)) == pytest.approx(default_lr(128))
    assert peak_lr(num_particles=32, lr=0.01) == pytest.approx(0.01)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoFlow])
def test_gradients_left_from_before_the_run_do_not_enter_its_first_step(guide_cls):
    def run(stale: bool):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = guide_cls(gaussian_model) if guide_cls is AutoNormal else guide_cls(gaussian_model, BUILDERS["realnvp"])
        pyroflows.infer.sync_param_store(guide)
        if stale:  # a backward of the user's before fit
            for _, p in pyro.get_param_store().named_parameters():
                p.grad = torch.full_like(p, 100.0)
        fit(gaussian_model, guide, 1, lr=0.1, seed=1, progress=False, report=False, start="identity")
        return [p.detach().clone() for _, p in sorted(pyro.get_param_store().named_parameters())]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
