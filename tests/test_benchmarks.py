"""Smoke tests of the benchmark suite: the scaling and sampling parts at a tiny size, the results JSON, RESULTS.md
and the dispatcher's arguments. No timing assertions."""

import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as suite  # noqa: E402
from benchmarks import _common, report, sampling, scaling  # noqa: E402

HAVE_NORMFLOWS = _common.have_normflows()


def _check_machine(payload: dict, quick: bool, command: str) -> None:
    assert payload["quick"] is quick and payload["command"] == command
    for key in ("cpu", "cores", "torch", "pyro", "pyroflows"):
        assert payload["machine"][key]


def test_scaling_tiny(tmp_path):
    out = tmp_path / "results"
    args = scaling.parse_args(["--dims", "2,4", "--sides", "8", "--warmup", "0", "--rounds", "1", "--no-memory"])
    args.out = str(out)
    payload = scaling.run(args, "python benchmarks/scaling.py (test)")
    _check_machine(payload, False, "python benchmarks/scaling.py (test)")
    stored = json.loads((out / "scaling.json").read_text())
    assert set(stored["vector"]["families"]) == set(scaling.VECTOR_FAMILIES)
    assert set(stored["image"]["families"]) == set(scaling.IMAGE_FAMILIES)
    for family in stored["vector"]["families"].values():
        assert [r["size"] for r in family["rows"]] == [2, 4]
        assert family["rows"][0]["pyroflows_ms"] > 0
        assert family["exponent_pyroflows"] is not None
        assert (family["rows"][0]["speed_ratio"] is not None) == (family["peer"] is not None)
        if not HAVE_NORMFLOWS and family["peer"] is None:
            assert "skipped" in family["peer_note"]
    image = stored["image"]["families"]["glow"]
    assert image["exponent_pyroflows"] is None  # one size: no slope
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## scaling" in text and "speed ratio peer/pyroflows" in text
    # no links but to its own sections, no images: the docs build includes this file
    assert not re.search(r"\]\((?!#)", text) and "<img" not in text


def test_scaling_some_families(tmp_path, capsys):
    """``--families`` measures those only (images skipped when none is named), ``--name`` names the file, the report
    renders the partial run, and an unknown family is a usage error naming it."""
    out = tmp_path / "results"
    argv = ["--dims", "2", "--warmup", "0", "--rounds", "1", "--no-memory", "--families", "residual (defaults)"]
    args = scaling.parse_args(argv + ["--name", "scaling_part", "--out", str(out)])
    scaling.run(args, "python benchmarks/scaling.py (test)")
    stored = json.loads((out / "scaling_part.json").read_text())
    assert list(stored["vector"]["families"]) == ["residual (defaults)"] and stored["image"]["families"] == {}
    family = stored["vector"]["families"]["residual (defaults)"]
    assert family["pyroflows"] == "pyroflows residual_flow (default log-det)" and family["rows"][0]["pyroflows_ms"] > 0
    text = report._scaling(stored)
    assert "residual (defaults)" in text and "**images**" not in text
    with pytest.raises(SystemExit):
        scaling.parse_args(["--families", "residual,nope"])
    assert "nope" in capsys.readouterr().err


def test_sampling_tiny(tmp_path):
    out = tmp_path / "results"
    argv = ["--quick", "--n-vector", "32", "--n-image", "2", "--warmup", "0", "--rounds", "1", "--out", str(out)]
    payload = sampling.run(sampling.parse_args(argv), "python benchmarks/sampling.py --quick (test)")
    _check_machine(payload, True, "python benchmarks/sampling.py --quick (test)")
    stored = json.loads((out / "sampling_quick.json").read_text())
    rows = stored["rows"]
    assert len(rows) == len(sampling.VECTOR_ROWS) + len(sampling.IMAGE_ROWS)
    assert {r["direction"] for r in rows} == {"guide", "density", sampling.LOG_Q}
    assert all(r["pyroflows_samples_per_s"] > 0 for r in rows)
    pyro_peers = [r for r in rows if r["peer"] and r["peer"].startswith("pyro ")]
    assert len(pyro_peers) == 2 and all(r["speed_ratio"] > 0 for r in pyro_peers)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## sampling_quick" in text and "quick run" in text


def test_report_renders_existing_results(tmp_path):
    """Every results file in the repository renders to a section, and the machine line is there."""
    present = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    if not present:
        pytest.skip("no results in the repository")
    for path in present:
        (tmp_path / path.name).write_text(path.read_text())
    text = report.render(tmp_path)
    for path in present:
        assert f"## {path.stem}\n" in text
    assert "could not render" not in text and "no renderer" not in text
    assert not re.search(r"\]\((?!#)", text)


def test_peak_rss_and_exponent():
    def grow():
        import torch

        return torch.ones(8 * 2**20 // 4).sum()  # 8 MiB

    peak = _common.peak_rss_mib(grow)
    assert peak is None or peak >= 0
    assert _common.fit_exponent([1, 2, 4], [3.0, 12.0, 48.0]) == pytest.approx(2.0)


def test_dispatcher_arguments(tmp_path):
    assert suite._argv("scaling", "scaling", True, tmp_path) == ["--quick", "--out", str(tmp_path)]
    vi = suite._argv("vi", "vi_energies", True, tmp_path)
    assert vi[:2] == ["--quick", "--out"] and vi[2].endswith("vi_energies_quick.json")
    assert suite._argv("image", "image_flows", False, tmp_path)[1].endswith("image_flows.json")
    # a part of two scripts: each writes its own results file
    assert [name for _, name in suite.SCRIPTS["applications"]] == ["hybrid", "ood"]
    assert [name for _, name in suite.SCRIPTS["vi"]] == ["vi_energies", "vi_guides", "vi_heldout"]
    assert suite._argv("vi", "vi_guides", True, tmp_path)[-2] == "--workers"
    assert suite._argv("guides", "vi_heldout", True, tmp_path)[-2] == "--workers"
    assert suite._argv("applications", "ood", False, tmp_path)[1].endswith("ood.json")
    with pytest.raises(SystemExit):
        suite.main(["nonsense"])


def test_vi_heldout_tiny(tmp_path):
    """The held-out posteriors' benchmark runs end to end on one model (a few steps), on the model as written and
    under Pyro's AutoReparam, pyroflows' guide also through the plain loop (``--plain``), and its report renders:
    each row's figure is the gap from its ELBO to the one log Ẑ of the model (log_z_hat over all six rows)."""
    from benchmarks import vi_heldout

    out = tmp_path / "vi_heldout_quick.json"
    argv = ["--quick", "--workers", "1", "--models", "hier_logreg", "--guides", "AutoNormal,realnvp(8)"]
    payload = vi_heldout.main([*argv, "--reparam", "none,auto", "--plain", "--out", str(out)])
    rows = payload["rows"]
    assert {(vi_heldout.label(r), r["recipe"]) for r in rows} == {
        ("AutoNormal", "plain"),
        ("realnvp(8)", "fit"),
        ("realnvp(8) (plain SVI)", "plain"),
        ("AutoNormal + AutoReparam", "plain"),
        ("realnvp(8) + AutoReparam", "fit"),
        ("realnvp(8) + AutoReparam (plain SVI)", "plain"),
    }
    assert all("error" not in r and r["iw_elbo"] >= r["elbo"] - 1e-9 >= r["min_log_ratio"] - 2e-9 for r in rows)
    text = report.section(out)
    assert "| realnvp(8) |" in text and "could not render" not in text and ", worst -" in text
    assert "| realnvp(8) + AutoReparam |" in text and "'+ AutoReparam': the same guide" in text
    assert "| realnvp(8) (plain SVI) |" in text and "'(plain SVI)': a pyroflows guide" in text
    assert all(len(r["iw_sets"]) == 5 for r in rows) and "of the median of a guide's per-set" in text
    gaps = [
        float(line.split("|")[2].split()[0]) for line in text.splitlines() if line.startswith("| ") and "(k̂" in line
    ]
    log_z = vi_heldout.log_z_hat(rows)  # one log Ẑ for the model, whichever parameterisation reached it
    assert sorted(gaps) == pytest.approx(sorted(log_z - r["elbo"] for r in rows), abs=1e-3)


def test_heldout_log_z_follows_each_guides_median_bound_not_one_lucky_set():
    """A guide whose bounds are heavy-tailed (one set far above its others) does not set log Ẑ by that one set; rows
    from before per-set bounds were kept count with their bound over all draws."""
    from benchmarks import vi_heldout

    steady = {"iw_sets": [-40.0, -39.9, -40.1, -40.0, -39.95], "iw_elbo": -39.9}
    lucky = {"iw_sets": [-40.5, -40.4, -38.0, -40.6, -40.45], "iw_elbo": -38.7}
    assert vi_heldout.log_z_hat([steady, lucky]) == -40.0
    assert vi_heldout.log_z_hat([steady, {"iw_elbo": -39.5}]) == -39.5
    assert vi_heldout.log_z_hat([]) is None


def test_mixture2_log_evidence_matches_importance_sampling_from_the_prior():
    """vi_guides' label-switching mixture: its quadrature log Z equals a 400,000-draw importance-sampling estimate
    from the prior (whose standard error here is below 0.01) within 0.03, and the model runs under vectorised
    particles."""
    import torch

    from benchmarks import vi_guides
    from pyroflows.diagnostics import check_vectorized

    model, args, log_z = vi_guides.model_spec("mixture2")
    gen = torch.Generator().manual_seed(0)
    mu = 3.0 * torch.randn(400_000, 2, generator=gen, dtype=torch.float64)
    y = args[0].double()
    components = -0.5 * (y[None, :, None] - mu[:, None, :]) ** 2 - 0.5 * math.log(2 * math.pi) + math.log(0.5)
    log_lik = torch.logsumexp(components, -1).sum(-1)
    estimate = float(torch.logsumexp(log_lik, 0)) - math.log(len(mu))
    assert abs(estimate - log_z) < 0.03
    check_vectorized(model, *args)


def test_mixture3_log_evidence_matches_importance_sampling():
    """The three-component mixture (six modes): its quadrature log Z equals an importance-sampling estimate from a
    proposal with a Gaussian at each of the six orderings of the cluster centres (200,000 draws) within 0.01, and
    the model runs under vectorised particles."""
    import itertools

    import torch

    from benchmarks import vi_guides
    from pyroflows.diagnostics import check_vectorized

    model, args, log_z = vi_guides.model_spec("mixture3")
    y = args[0].double()
    centres = torch.tensor(list(itertools.permutations((-3.0, 0.0, 3.0))), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randint(len(centres), (200_000,), generator=gen)
    mu = centres[pick] + 0.5 * torch.randn(200_000, 3, generator=gen, dtype=torch.float64)
    normal = torch.distributions.Normal(centres[None], 0.5)
    log_q = torch.logsumexp(normal.log_prob(mu[:, None]).sum(-1), 1) - math.log(len(centres))
    log_prior = torch.distributions.Normal(0.0, 3.0).log_prob(mu).sum(-1)
    components = -0.5 * (y[None, :, None] - mu[:, None, :]) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(3)
    log_w = log_prior + torch.logsumexp(components, -1).sum(-1) - log_q
    estimate = float(torch.logsumexp(log_w, 0)) - math.log(len(mu))
    assert abs(estimate - log_z) < 0.01
    check_vectorized(model, *args)


def test_vi_guides_tiny(tmp_path):
    """The equal-budget VI benchmark runs end to end (two guides, one model, a few steps) and its report renders."""
    from benchmarks import vi_guides

    out = tmp_path / "vi_guides_quick.json"
    argv = ["--quick", "--workers", "1", "--models", "banana", "--guides", "AutoNormal,realnvp(8)"]
    payload = vi_guides.main([*argv, "--recipes", "plain;fit:num_particles=2", "--out", str(out)])
    rows = {(r["guide"], r["recipe"]): r for r in payload["rows"]}
    assert set(rows) == {(g, r) for g in ("AutoNormal", "realnvp(8)") for r in ("plain", "fit:num_particles=2")}
    assert all("error" not in r and math.isfinite(r["kl"]) and r["kl_se"] >= 0 for r in rows.values())
    # scored from five draw sets: k̂ is their median, the worst draw is at or below the mean (worst <= ELBO - log Z)
    for r in rows.values():
        assert len(r["khat_sets"]) == 5 and r["khat_median"] == statistics.median(r["khat_sets"])
        assert r["worst"] <= -r["kl"] + 1e-9 and r["iw_elbo"] >= r["elbo"] - 1e-9
    assert json.loads(out.read_text())["benchmark"] == "vi_guides"
    text = report.section(out)
    assert "| realnvp(8) |" in text and "could not render" not in text and ", worst -" in text
    assert suite._argv("guides", "vi_guides", True, tmp_path)[-2] == "--workers"


def test_start_gate_tiny(tmp_path):
    """The start-gate benchmark runs (two posteriors) and renders: the trend regression moves, the banana does not."""
    from benchmarks import start_gate

    out = tmp_path / "start_gate_quick.json"
    payload = start_gate.main(["--quick", "--out", str(out)])
    used = {r["model"]: r["used"] for r in payload["rows"]}
    assert used == {"banana": False, "trend_regression": True}
    text = report.section(out)
    assert "| trend_regression | 3 |" in text and "could not render" not in text


def test_svi_step_tiny(tmp_path):
    """The SVI-step benchmark runs end to end (one timed round) and its report renders; the twin guides computed
    the same losses in the first round, as they must (same flow, same seeds; float32 rounding only)."""
    from benchmarks import svi_step

    out = tmp_path / "svi_step_quick.json"
    assert svi_step.main(["--quick", "--rounds", "1", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "svi_step" and payload["quick"] is True
    assert {r["loop"] for r in payload["rows"]} == {"SVI", "fit"}
    assert all(r["max_loss_difference"] < 1e-2 and r["speed_ratio"] > 0 for r in payload["rows"])
    text = report.section(out)
    assert "| SVI | banana | realnvp(8) |" in text and "could not render" not in text
    assert [name for _, name in suite.SCRIPTS["svi"]] == ["svi_step", "stl_cost", "optimizer_step", "mixture_step"]


def test_optimizer_step_tiny(tmp_path):
    """The optimiser-update benchmark runs end to end (one timed round) and its report renders: make_optimizer chose
    the fused update for every model, and every row has a positive time and ratio."""
    from benchmarks import optimizer_step

    out = tmp_path / "optimizer_step_quick.json"
    assert optimizer_step.main(["--quick", "--rounds", "1", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "optimizer_step" and payload["quick"] is True
    assert payload["update"] and all(r["fused_choice"] and r["loop_over_fused"] > 0 for r in payload["update"])
    assert payload["fit"] and all(r["speed_ratio"] > 0 for r in payload["fit"])
    text = report.section(out)
    assert "| glow, 1x28x28 |" in text and "| AutoNormalizingFlow | realnvp(8) |" in text
    assert "could not render" not in text


def test_khat_noise_tiny(tmp_path):
    """The k̂-noise measurement runs end to end on a short fit and its report renders: every k̂ is finite, and the
    groups of draws are disjoint (different seeds), so the medians are separate estimates."""
    from benchmarks import khat_noise

    out = tmp_path / "khat_noise_quick.json"
    assert khat_noise.main(["--quick", "--guide", "realnvp(2)", "--seeds", "0", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    row = payload["rows"][0]
    assert payload["benchmark"] == "khat_noise" and len(row["khat_median_of_5"]) == payload["config"]["groups"]
    assert all(math.isfinite(k) for k in row["khat_small"] + row["khat_big"] + [row["khat_huge"]] + row["kl_big"])
    assert len(set(row["khat_small"])) == len(row["khat_small"])  # disjoint draws, different estimates
    text = report.section(out)
    assert "| eight_schools_centered | realnvp(2) | 0 |" in text and "could not render" not in text


def test_stl_cost_tiny(tmp_path):
    """The STL-cost benchmark runs end to end (one timed round) and its report renders; the flow with autoregressive
    layers gets the cold-start baseline column, the coupling flow does not."""
    from benchmarks import stl_cost

    out = tmp_path / "stl_cost_quick.json"
    assert stl_cost.main(["--quick", "--rounds", "1", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "stl_cost" and payload["quick"] is True
    rows = {r["builder"]: r for r in payload["rows"]}
    assert "warm_start_speedup" in rows["autoregressive_flow(4)"] and "warm_start_speedup" not in rows["realnvp(8)"]
    assert all(r["stl_cost"] > 0 and r["stl_ms_per_step"] > 0 for r in payload["rows"])
    text = report.section(out)
    assert "| eight_schools_centered | realnvp(8) |" in text and "could not render" not in text


def test_residual_eval_tiny(tmp_path):
    """The residual-evaluation benchmark runs end to end (12x12 images, where the blocks still use the stochastic
    log-det; one training step, four images) and its report renders; every row with repeats reports a standard
    error."""
    from benchmarks import residual_eval

    out = tmp_path / "residual_eval_quick.json"
    argv = ["--quick", "--size", "12", "--train-steps", "1", "--images", "4", "--batch-size", "5"]
    argv += ["--compare-terms", "3", "--out", str(out)]
    assert residual_eval.main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "residual_eval" and payload["images"] == 4
    assert all((r["se"] is None) == (r["repeats"] == 1) and r["bpd"] > 0 for r in payload["rows"])
    text = report.section(out)
    assert "(default)" in text and "could not render" not in text
    assert [name for _, name in suite.SCRIPTS["residual"]] == ["residual", "residual_eval"]


def test_vi_guides_reparam_recipe_trains_on_the_non_centred_model():
    """``reparam=auto`` in a recipe wraps the model in Pyro's AutoReparam (the centred eight schools' theta becomes a
    computed site), for plain SVI and for fit; anything else is refused."""
    from pyro import poutine

    from benchmarks import vi_guides
    from pyroflows.infer import is_reparameterised

    model, args, _ = vi_guides.model_spec("eight_schools_centered")
    assert vi_guides.reparameterised(model, None) is model
    trace = poutine.trace(vi_guides.reparameterised(model, "auto")).get_trace(*args)
    assert {name for name, site in trace.nodes.items() if is_reparameterised(site)} == {"mu", "theta"}
    with pytest.raises(ValueError, match="reparam must be 'auto'"):
        vi_guides.reparameterised(model, "yes")
    for recipe in ("plain:reparam=auto", "fit:reparam=auto,num_particles=2"):
        row = vi_guides.run_job("eight_schools_centered", "autoregressive_flow(2)", recipe, 5, 2, 100, 0)
        assert "error" not in row and math.isfinite(row["kl"]) and row["worst"] <= -row["kl"] + 1e-9, row
    assert (
        "plain recipe takes only reparam=auto"
        in vi_guides.run_job("banana", "AutoNormal", "plain:lr=1", 5, 2, 10, 0)["error"]
    )


def test_vi_energies_fit_options_reach_fit_and_the_report():
    """``--fit-options`` parses to infer.fit keywords, and a fit run with options says which in its report note."""
    from benchmarks import vi_energies, vi_guides

    assert _common.parse_options("anneal=0.5,num_particles=4,estimator=iw") == {
        "anneal": 0.5,
        "num_particles": 4,
        "estimator": "iw",
    }
    assert _common.parse_options("") == {}
    assert vi_guides._options("fit:lr=0.003,num_particles=8") == {"lr": 0.003, "num_particles": 8}
    assert vi_energies.parse_options is _common.parse_options
    config = {"loop": "fit", "fit_options": {"anneal": 0.5}, "steps": 10, "particles": 2}
    config.update(energies=["U1"], guides=[])
    payload = {"config": config, "results": []}
    # a run before the particle-dependent default recorded no fit_lr (it ran at 3e-3)
    assert "(STL, stable_cosine) at peak lr 0.003, then its default at any number of particles, but anneal=0.5;" in (
        report._vi(payload)
    )
    config["fit_lr"] = 9.449e-4
    assert "at peak lr 0.000945, its default for these particles, but anneal=0.5;" in report._vi(payload)
    config["fit_options"] = {"anneal": 0.5, "lr": 0.001}
    assert "at peak lr 0.001, but anneal=0.5;" in report._vi(payload)


def test_mixture_step_tiny(tmp_path):
    """The mixture-step benchmark runs end to end (one timed round) and its report renders, every guide timed."""
    from benchmarks import mixture_step

    out = tmp_path / "mixture_step_quick.json"
    assert mixture_step.main(["--quick", "--rounds", "1", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "mixture_step" and payload["quick"] is True
    (row,) = payload["rows"]
    assert all(row[f"{label} ms/step"] > 0 for label in mixture_step.GUIDES) and row["2 kept / mix2"] > 0
    text = report.section(out)
    assert "| bimodal | realnvp(2) |" in text and "could not render" not in text


def test_neutra_tiny(tmp_path):
    """The NeuTra benchmark runs (a few steps and draws) and writes both samplers' rows for each model."""
    from benchmarks import neutra

    out = tmp_path / "neutra_quick.json"
    assert neutra.main(["--quick", "--models", "eight_schools_centered", "--seeds", "0", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "neutra" and payload["quick"] is True
    assert [r["sampler"] for r in payload["rows"]] == ["NUTS", "NUTS + NeuTra (realnvp(8))"]
    assert all(r["variable"] == "tau" and r["ess"] > 0 for r in payload["rows"])
    assert "| eight_schools_centered | tau | NUTS + NeuTra" in neutra.markdown(payload)
