"""Flow guides against Pyro's autoguides at equal budget: KL(q‖p) on posteriors with an exact log Z.

Models (exact ``log Z`` known):

* ``eight_schools_centered``: the centred eight-schools model (funnel geometry between ``mu``, ``tau`` and
  ``theta``); ``log p(y)`` by quadrature over ``tau`` (``examples/vi_models.py``);
* ``funnel10``: Neal's funnel in 10 dimensions, no observations, ``log Z = 0``;
* ``banana``: ``z1 ~ N(0, 1.5²)``, ``z2 | z1 ~ N(z1²/2 - 1, 0.5²)``, no observations, ``log Z = 0``;
* ``horseshoe``: six normal means under a horseshoe prior (heavy-tailed shrinkage, 12-D), ``log Z`` by 1-D
  quadrature per mean;
* ``local_level``: a 12-step random walk seen through noise with an unknown process scale (a state-space latent,
  13-D), ``log Z`` by quadrature over the scale with the path integrated out exactly;
* ``bimodal``: ``z ~ N(0, 2² I)``, the product ``z1 z2 = 2`` observed with noise 0.5 (two symmetric modes: a guide
  that finds one has KL ≥ log 2), ``log Z`` by 1-D quadrature.

The last three are in ``examples/vi_models.py`` with their evidence functions; none was used to choose defaults.

Other posteriors, not in the default run (``--models`` names them; :data:`EXTRA_MODELS`): larger ones, to see
whether the defaults chosen on the six above carry over to 30-40 dimensions, ``funnel32`` (Neal's funnel, 32-D),
``horseshoe16`` (16 means, 32-D) and ``local_level40`` (a 40-step series, 41-D); and ``trend_regression``, a
linear trend on unstandardised readings (intercept near 1000, 3-D: a posterior far from where guides start, for
``fit``'s Gaussian start), ``log Z`` by quadrature over the noise scale with the coefficients integrated out; and
``mixture2``, the two means of an equal-weight mixture of two unit-variance normals under ``N(0, 3²)`` priors, seen
through 20 points near -2 and +2: label switching makes two well-separated modes (a guide on one has KL ≥ log 2),
``log Z`` by 2-D quadrature; and ``mixture3``, the same with three means and 30 points near -3, 0 and +3: six modes
(one has KL ≥ log 6), ``log Z`` by 3-D quadrature.

pyroflows guides are :class:`pyroflows.AutoFlow` (``AutoNormalizingFlow``'s guide in one parameter tensor;
``NAME/tails`` with ``heavy_tails=True``; ``NAME/mixK`` is :class:`pyroflows.AutoFlowMixture`, a mixture of K such flows
with learned weights, and ``NAME/mixKsel`` the same selecting its components during ``fit`` (``select_after=0.5``); rows
of a mixture record ``components_kept``). Every guide is trained the same way in the ``plain`` recipe: ``SVI`` with
``Trace_ELBO(num_particles=8, vectorize_particles=True)`` and ``ClippedAdam(lr=3e-3)`` for 2000 steps (16,000
particle-steps; ``--steps N`` for another budget). The ``fit`` recipe trains every guide (Pyro's too) through
:func:`pyroflows.infer.fit` with its defaults at the same budget (``num_steps = 8 * steps / num_particles``);
``fit:KEY=VALUE,...`` with other settings, to choose the defaults. ``reparam=auto`` in a recipe (``plain:reparam=auto``,
``fit:reparam=auto``) trains and scores the guide on the model wrapped in ``poutine.reparam(model,
config=AutoReparam())``, Pyro's learned non-centring of every location-scale latent (same evidence, so the same KL).
Each trained guide is scored from 5 independent sets of 10,000 draws: KL(q‖p) = log Z − ELBO, the ELBO over all 50,000
(its standard error from the spread of the five sets' ELBOs is reported); k̂ (PSIS, Yao et al. 2018) is the median of
the five sets' values (k̂ from a few thousand draws moves by ±0.1 near 0.7 for one guide: ``khat_noise.py``); "worst" is
the lowest ``log p(z | x) − log q(z)`` of any draw, which says whether rare draws sit where the posterior has no mass
(tens of nats below zero: then the ELBO's sample mean is heavy-tailed, and its standard error understates its spread).
Wall time is the training time of each job in its own process (one thread), so rows are comparable within one run.

::

    python benchmarks/vi_guides.py --workers 16 --out benchmarks/results/vi_guides.json
    python benchmarks/vi_guides.py --quick      # a few steps: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

STEPS, PARTICLES, LR = 2000, 8, 3e-3
#: the trained guide is scored from this many independent sets of ``draws`` draws (10,000 each by default)
DRAW_SETS = 5
GUIDES = [
    "AutoNormal",
    "AutoIAFNormal(2)",
    "planar_flow(16)",
    "realnvp(8)",
    "residual_flow(8)",
    "autoregressive_flow(4)",
    "autoregressive_flow(8)",
    "spline_flow(8)",
]
MODELS = ["eight_schools_centered", "funnel10", "banana", "horseshoe", "local_level", "bimodal"]
#: ``NAME/mixKsel``'s ``select_after``: the components are selected halfway through the steps after the annealing
SELECT_AFTER = 0.5
EXTRA_MODELS = ["funnel32", "horseshoe16", "local_level40", "trend_regression", "mixture2", "mixture3"]
#: the 16 observations of ``horseshoe16``: near-zero means and a few signals, as a shrinkage prior expects
HORSESHOE16_Y = [0.2, -0.5, 1.0, 3.0, -4.5, 6.0, 0.0, 0.3, -0.8, 1.5, -2.2, 0.1, 4.0, -0.4, 0.6, -7.0]


def _banana():
    import pyro
    import pyro.distributions as dist

    z1 = pyro.sample("z1", dist.Normal(0.0, 1.5))
    pyro.sample("z2", dist.Normal(0.5 * z1**2 - 1.0, 0.5))


def _mixture_means(y, k: int):
    """``k`` component means under ``N(0, 3²)`` priors, equal weights, unit variances: ``k!`` modes by label
    switching."""
    import pyro
    import pyro.distributions as dist
    import torch

    loc = torch.stack([pyro.sample(f"mu{i + 1}", dist.Normal(0.0, 3.0)) for i in range(k)], -1)
    weights = dist.Categorical(logits=torch.zeros(loc.shape))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.MixtureSameFamily(weights, dist.Normal(loc, 1.0)), obs=y)


def _mixture2(y):
    """Two component means (:func:`_mixture_means`): two modes."""
    _mixture_means(y, 2)


def _mixture3(y):
    """Three component means (:func:`_mixture_means`): six modes."""
    _mixture_means(y, 3)


def _mixture2_data():
    """20 points, 10 around -2 and 10 around +2 (a fixed seed)."""
    import torch

    gen = torch.Generator().manual_seed(5)
    return torch.cat([torch.randn(10, generator=gen) - 2.0, torch.randn(10, generator=gen) + 2.0])


def _mixture3_data():
    """30 points, 10 around each of -3, 0 and +3 (a fixed seed)."""
    import torch

    gen = torch.Generator().manual_seed(6)
    return torch.cat([torch.randn(10, generator=gen) + c for c in (-3.0, 0.0, 3.0)])


def _mixture2_log_evidence(y, half_width: float = 15.0, num_points: int = 1201) -> float:
    """``log p(y)`` of :func:`_mixture2` by the trapezoid rule on a grid over both means (5 prior standard deviations
    each way)."""
    return _mixture_log_evidence(y, 2, half_width, num_points)


def _mixture_log_evidence(y, k: int, half_width: float, num_points: int) -> float:
    """``log p(y)`` of :func:`_mixture_means` with ``k`` components by the trapezoid rule on a grid of
    ``num_points`` per mean over ``[-half_width, half_width]``, one slice of the first mean at a time."""
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    grid = np.linspace(-half_width, half_width, num_points)
    step = grid[1] - grid[0]
    log_w = np.zeros(num_points)
    log_w[[0, -1]] = np.log(0.5)

    def rest_grid(values):  # the other k - 1 means' points, one row each
        return np.stack(np.meshgrid(*[values] * (k - 1), indexing="ij"), -1).reshape(-1, k - 1)

    rest, rest_log_w = rest_grid(grid), rest_grid(log_w).sum(-1)
    rest_prior = (-(rest**2) / 18.0).sum(-1)
    slices = []
    for first, first_log_w in zip(grid, log_w):
        means = np.concatenate([np.full((len(rest), 1), first), rest], 1)  # (points, k)
        comp = -0.5 * (y[None, :, None] - means[:, None, :]) ** 2  # (points, data, k)
        top = comp.max(-1)
        log_lik = (top + np.log(np.exp(comp - top[..., None]).mean(-1))).sum(-1) - 0.5 * len(y) * np.log(2 * np.pi)
        log_f = rest_prior - first**2 / 18.0 - 0.5 * k * np.log(2 * np.pi * 9.0) + log_lik + rest_log_w + first_log_w
        peak = log_f.max()
        slices.append(peak + np.log(np.exp(log_f - peak).sum()))
    slices = np.array(slices)
    peak = slices.max()
    return float(peak + np.log(np.exp(slices - peak).sum()) + k * np.log(step))


def model_spec(name: str):
    """``(model, model_args, log_z)``."""
    import torch
    import vi_models

    if name == "eight_schools_centered":
        log_z = float(vi_models.eight_schools_exact_moments()["log_evidence"])
        return vi_models.eight_schools_centered, (vi_models.Y, vi_models.SIGMA), log_z
    if name == "funnel10":
        return vi_models.funnel, (10,), 0.0
    if name == "banana":
        return _banana, (), 0.0
    if name == "horseshoe":
        return vi_models.horseshoe_means, (), vi_models.horseshoe_log_evidence()
    if name == "local_level":
        return vi_models.local_level, (), vi_models.local_level_log_evidence()
    if name == "bimodal":
        return vi_models.bimodal_product, (), vi_models.bimodal_log_evidence()
    if name == "funnel32":
        return vi_models.funnel, (32,), 0.0
    if name == "horseshoe16":
        y = torch.tensor(HORSESHOE16_Y)
        return vi_models.horseshoe_means, (y,), vi_models.horseshoe_log_evidence(y)
    if name == "local_level40":
        y = vi_models.local_level_data(40)
        return vi_models.local_level, (y,), vi_models.local_level_log_evidence(y)
    if name == "trend_regression":
        return vi_models.trend_regression, (), vi_models.trend_regression_log_evidence()
    if name == "mixture2":
        y = _mixture2_data()
        return _mixture2, (y,), _mixture2_log_evidence(y)
    if name == "mixture3":
        y = _mixture3_data()
        return _mixture3, (y,), _mixture_log_evidence(y, 3, 7.5, 121)
    raise ValueError(f"unknown model {name!r}")


def make_guide(name: str, model):
    """A fresh guide by name, or ``None`` when this pyroflows has no such builder.

    ``"realnvp(8)"`` is ``pyroflows.AutoFlow(model, partial(pyroflows.realnvp, num_layers=8))``, the guide the
    documentation recommends (``AutoNormalizingFlow``'s guide, its parameters in one tensor); ``"realnvp(8)/tails"``
    the same with ``heavy_tails=True`` (the flow on noise with learned tails, ``HeavyTails``); ``"realnvp(8)/mix4"``
    ``pyroflows.AutoFlowMixture`` of four such flows, and ``"realnvp(8)/mix4sel"`` the same selecting its components
    halfway through the steps after fit's annealing (``select_after=SELECT_AFTER``)."""
    from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

    import pyroflows

    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoIAFNormal(2)":
        return AutoIAFNormal(model, num_transforms=2)
    spec, _, base = name.partition("/")
    select = base.endswith("sel")
    count = base[3:-3] if select else base[3:]
    mixture = base.startswith("mix") and count.isdigit()
    if base not in ("", "tails") and not mixture:
        raise ValueError(f"unknown guide variant {name!r} (a builder, builder/tails, builder/mixK or builder/mixKsel)")
    builder, _, arg = spec.partition("(")
    fn = getattr(pyroflows, builder, None)
    auto = getattr(pyroflows, "AutoFlowMixture" if mixture else "AutoFlow", None)
    if fn is None or auto is None:
        return None
    flow = partial(fn, num_layers=int(arg.rstrip(")")))
    if mixture:
        return auto(model, flow, components=int(count), select_after=SELECT_AFTER if select else None)
    return auto(model, flow, heavy_tails=base == "tails")


def _train_plain(model, guide, args, steps: int, particles: int) -> list[float]:
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": LR}), Trace_ELBO(particles, vectorize_particles=True))
    return [svi.step(*args) for _ in range(steps)]


def _train_fit(model, guide, args, budget: int, options: dict) -> list[float]:
    """``infer.fit`` with its defaults, or with ``options`` (e.g. ``num_particles=8, lr=0.003``), at ``budget``
    particle-steps. ``elbo_weight=W`` (with ``alpha=A``, default 0) trains on
    ``pyroflows.elbo.TraceRenyi_ELBO(A, elbo_weight=W)``, the bound mixed with the ELBO, passed as fit's ``loss``."""
    import pyroflows

    options = dict(options)
    particles = options.get("num_particles", pyroflows.infer.SVIConfig().num_particles)
    if "elbo_weight" in options:  # the Rényi bound mixed with the ELBO: fit takes it as a loss
        pyroflows.infer.sync_param_store(guide, *args)  # built as fit builds it, before the plates are counted
        options.pop("estimator", None)
        options["loss"] = pyroflows.elbo.TraceRenyi_ELBO(
            options.pop("alpha", 0.0),
            elbo_weight=options.pop("elbo_weight"),
            num_particles=particles,
            vectorize_particles=True,
            max_plate_nesting=pyroflows.infer.max_plate_nesting(model, guide, *args),
        )
        options.pop("num_particles", None)
    result = pyroflows.infer.fit(
        model, guide, num_steps=max(1, budget // particles), model_args=args, progress=False, report=False, **options
    )
    return [float(v) for v in result.losses]


def _options(recipe: str) -> dict:
    """``"fit:num_particles=8,lr=0.003"`` -> ``{"num_particles": 8, "lr": 0.003}``."""
    from benchmarks import _common

    return _common.parse_options(recipe.partition(":")[2])


def reparameterised(model, how):
    """``model`` as it is (``how=None``), or with ``how="auto"`` wrapped in ``poutine.reparam`` with Pyro's
    ``AutoReparam``: every location-scale latent gets a learned centring (``LocScaleReparam(centered=None)``,
    Gorinova, Moore & Hoffman 2020). The evidence is the same, so KL(q‖p) = log Z − ELBO still holds."""
    if how is None:
        return model
    if how != "auto":
        raise ValueError(f"reparam must be 'auto', got {how!r}")
    from pyro import poutine
    from pyro.infer.reparam.strategies import AutoReparam

    return poutine.reparam(model, config=AutoReparam())


def evaluate(model, guide, args, draws: int, seed: int) -> dict:
    """Scores a trained guide from :data:`DRAW_SETS` independent sets of ``draws`` guide draws (seeds ``seed + 1``,
    ``seed + 2``, ...): the ELBO over all of them with its standard error from the spread of the sets' ELBOs, the
    importance-weighted ELBO over all of them and per set, k̂ per set and its median, and the lowest
    ``log p - log q`` of any draw."""
    from pyroflows.diagnostics import psis_khat

    sets = [psis_khat(model, guide, num_samples=draws, model_args=args, seed=seed + 1 + k) for k in range(DRAW_SETS)]
    elbos, khats = [s.elbo for s in sets], [s.khat for s in sets]
    iw = max(s.iw_elbo for s in sets)
    return {
        "elbo": statistics.fmean(elbos),  # equal set sizes: the mean over every draw
        "elbo_se": statistics.stdev(elbos) / math.sqrt(len(sets)),
        "iw_elbo": iw + math.log(statistics.fmean(math.exp(s.iw_elbo - iw) for s in sets)),
        "iw_sets": [s.iw_elbo for s in sets],
        "khat_median": statistics.median(khats),
        "khat_sets": khats,
        "min_log_ratio": min(s.min_log_ratio for s in sets),
    }


def run_job(model_name: str, guide_name: str, recipe: str, steps: int, particles: int, draws: int, seed: int):
    """Train one guide on one model and evaluate it; returns a result row (``error`` on failure)."""
    import pyro
    import torch

    torch.set_num_threads(1)
    row = {"model": model_name, "guide": guide_name, "recipe": recipe}
    try:
        model, args, log_z = model_spec(model_name)
        plain, options = recipe.partition(":")[0] == "plain", _options(recipe)
        model = reparameterised(model, options.pop("reparam", None))
        if plain and options:
            raise ValueError(f"the plain recipe takes only reparam=auto, got {recipe!r}")
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = make_guide(guide_name, model)
        if guide is None:
            return {**row, "error": "not available in this pyroflows"}
        start = time.perf_counter()
        if plain:
            losses = _train_plain(model, guide, args, steps, particles)
        else:
            losses = _train_fit(model, guide, args, steps * particles, options)
        row["train_s"] = time.perf_counter() - start
        logits = getattr(getattr(guide, "transform", None), "logits", None)
        if isinstance(logits, torch.Tensor):  # an AutoFlowMixture: its components of nonzero weight at the end
            row["components_kept"] = int(torch.isfinite(logits).sum())
        row.update(evaluate(model, guide, args, draws, seed))
        row["kl"], row["kl_se"] = log_z - row["elbo"], row["elbo_se"]
        row["worst"] = row["min_log_ratio"] - log_z
        row["final_loss"] = statistics.fmean(losses[-50:])
    except Exception as e:  # a guide that diverges is a result, not a crash of the benchmark
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=3)
    return row


def markdown(rows: list[dict], recipe: str) -> str:
    models = [m for m in MODELS + EXTRA_MODELS if any(r["model"] == m for r in rows)]
    seen = [r["guide"] for r in rows if r["recipe"] == recipe]
    guides = [g for g in GUIDES if g in seen] + sorted(set(seen) - set(GUIDES))
    cell = {(r["model"], r["guide"]): r for r in rows if r["recipe"] == recipe}
    return grid(models, guides, cell, lambda r: r["kl"])


def grid(models: list[str], guides: list[str], cell: dict, kl) -> str:
    """The markdown table of ``guides`` (rows) by ``models`` (columns): per cell ``kl(row)`` (three decimals, or two
    significant figures below 0.01) with the row's k̂, its worst draw's log ratio (where the row has one), a mixture's
    components kept (where recorded) and training seconds, "–" where ``cell`` has no row, "error" where the job
    failed."""
    lines = ["| guide | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for g in guides:
        out = []
        for m in models:
            r = cell.get((m, g))
            if r is None or "error" in r:
                out.append("–" if r is None else "error")
            else:
                worst = f", worst {r['worst']:.0f}" if "worst" in r else ""  # runs before the column had none
                kept = f", {r['components_kept']} kept" if "components_kept" in r else ""  # a mixture's components
                value = kl(r)
                shown = f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2g}"  # small ones to two figures
                out.append(f"{shown} (k̂ {r['khat_median']:.2f}{worst}{kept}, {r['train_s']:.0f} s)")
        lines.append(f"| {g} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="20 steps, 5 x 100 draws: checks the script runs")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--guides", default=",".join(GUIDES))
    p.add_argument(
        "--recipes",
        default="plain;fit",
        help="plain (SVI, 8 particles, ClippedAdam 3e-3), fit (infer.fit's defaults), or fit:KEY=VALUE,... "
        "(infer.fit with those options), separated by ';'; reparam=auto (plain:reparam=auto too) trains on the "
        "model under Pyro's AutoReparam",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=STEPS, help=f"steps of 8 particles per guide (default {STEPS})")
    p.add_argument("--out", help="JSON file (rows are also appended to OUT.jsonl as they finish)")
    args = p.parse_args(argv)
    steps, draws = (20, 100) if args.quick else (args.steps, 10_000)
    jobs = [(m, g, r) for r in args.recipes.split(";") for m in args.models.split(",") for g in args.guides.split(",")]
    partial_log = Path(args.out).with_suffix(".jsonl") if args.out else None
    if partial_log is not None:
        partial_log.parent.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_job, m, g, r, steps, PARTICLES, draws, args.seed) for m, g, r in jobs]
        for f in as_completed(futures):
            row = f.result()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
            if partial_log is not None:
                with partial_log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    from benchmarks import _common

    payload = {
        "benchmark": "vi_guides",
        "command": _common.command_line("benchmarks/vi_guides.py", argv),
        "quick": args.quick,
        "machine": _common.machine(),
        "commit": _common.git_commit(),
        "budget": {"steps": steps, "particles": PARTICLES, "lr": LR, "draws": draws, "draw_sets": DRAW_SETS},
        "wall_s": time.perf_counter() - start,
        "rows": sorted(rows, key=lambda r: (r["recipe"], r["model"], r["guide"])),
    }
    for recipe in dict.fromkeys(r for _, _, r in jobs):
        print(f"\n{recipe}:\n" + markdown(rows, recipe))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
