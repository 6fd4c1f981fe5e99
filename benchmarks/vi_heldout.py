"""Flow guides against Pyro's autoguides on posteriors that chose nothing: held-out models of the kinds the guides are
meant for, at the budget of ``vi_guides.py``.

``vi_guides.py``'s six posteriors chose :func:`pyroflows.infer.fit`'s defaults. These three did not (they were written
after the defaults were fixed), and none has a known ``log Z``:

* ``hier_logreg``: a centred hierarchical logistic regression, 8 groups of 6 binary outcomes, group intercepts
  ``a_g ~ N(mu, sigma)`` with ``sigma ~ HalfNormal(1)`` and a shared slope (11-D, funnel geometry under a
  non-Gaussian likelihood);
* ``stoch_vol``: a stochastic-volatility series of 30 returns, an AR(1) log-volatility with unknown mean,
  persistence and scale, non-centred innovations (33-D, a time-series latent);
* ``horseshoe_reg``: a regression of 20 readings on 10 covariates (two non-zero coefficients) under a horseshoe
  prior, global and local half-Cauchy scales (21-D, heavy-tailed shrinkage).

So the table gives, per guide, ``log Ẑ − ELBO`` where ``log Ẑ`` is the largest, over the run's guides, of the
median of each guide's five importance-weighted bounds (one per set of draws; the median because one set's bound can
overshoot ``log Z`` when the weights are heavy-tailed, and the largest of many picks such a set): up to that
estimate's noise a *lower bound* on KL(q‖p). Differences between rows of one model are exact KL differences
(``log Z`` cancels). Guides are scored as in ``vi_guides.py``: 5 sets of 10,000 draws, the ELBO
and the importance-weighted bound over all of them, k̂ the median of the sets' values, "worst" the lowest
``log p − log q`` of any draw minus ``log Ẑ``.
Recipes as in ``vi_guides.py``: Pyro's guides through the plain SVI loop (``Trace_ELBO(8)`` vectorised,
``ClippedAdam(lr 3e-3)``, 2000 steps), pyroflows' guides through ``infer.fit`` with its defaults at the same 16,000
particle-steps. ``--reparam auto`` trains and scores every guide on the model under
``poutine.reparam(model, config=AutoReparam())`` (Pyro's learned non-centring; the same evidence), ``--reparam
none,auto`` both in one table (rows ``GUIDE + AutoReparam``), where they share each model's ``log Ẑ``.

::

    python benchmarks/vi_heldout.py --workers 2
    python benchmarks/vi_heldout.py --workers 2 --reparam none,auto --out benchmarks/results/vi_heldout_reparam.json
    python benchmarks/vi_heldout.py --workers 2 --plain --guides "AutoIAFNormal(2),realnvp(8),autoregressive_flow(8)" \
        --seed 1 --out benchmarks/results/vi_heldout_plain_seed1.json
    python benchmarks/vi_heldout.py --quick      # a few steps: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402
from benchmarks.vi_guides import (  # noqa: E402
    DRAW_SETS,
    PARTICLES,
    STEPS,
    _train_fit,
    _train_plain,
    evaluate,
    grid,
    make_guide,
    reparameterised,
)

MODELS = ["hier_logreg", "stoch_vol", "horseshoe_reg"]
GUIDES = ["AutoNormal", "AutoIAFNormal(2)", "realnvp(8)", "autoregressive_flow(8)"]
PYRO_GUIDES = ("AutoNormal", "AutoIAFNormal(2)")


def hier_logreg(x, group, y):
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("groups", 8):
        a = pyro.sample("a", dist.Normal(mu, sigma))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=a[..., group] + b * x), obs=y)


def stoch_vol(y):
    import pyro
    import pyro.distributions as dist
    import torch

    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
    with pyro.plate("t", len(y)):
        eps = pyro.sample("eps", dist.Normal(0.0, 1.0))
    h = mu + sigma / torch.sqrt(1 - phi**2) * eps[..., 0:1]  # the stationary start
    path = [h]
    for t in range(1, len(y)):
        h = mu + phi * (h - mu) + sigma * eps[..., t : t + 1]
        path.append(h)
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(0.0, torch.exp(torch.cat(path, -1) / 2)), obs=y)


def horseshoe_reg(features, y):
    import pyro
    import pyro.distributions as dist

    tau = pyro.sample("tau", dist.HalfCauchy(1.0))
    with pyro.plate("coefficients", features.shape[1]):
        lam = pyro.sample("lam", dist.HalfCauchy(1.0))
        beta = pyro.sample("beta", dist.Normal(0.0, tau * lam))
    with pyro.plate("data", features.shape[0]):
        pyro.sample("y", dist.Normal((beta.unsqueeze(-2) * features).sum(-1), 1.0), obs=y)


def model_spec(name: str):
    """``(model, model_args)``, the data drawn from a fixed seed."""
    import torch

    gen = torch.Generator().manual_seed(1)
    if name == "hier_logreg":
        group = torch.arange(8).repeat_interleave(6)
        x = torch.randn(48, generator=gen)
        a = 0.5 + 0.3 * torch.randn(8, generator=gen)
        return hier_logreg, (x, group, torch.bernoulli(torch.sigmoid(a[group] + 0.8 * x), generator=gen))
    if name == "stoch_vol":
        h = torch.full((30,), -1.0)
        for t in range(1, 30):
            h[t] = -1.0 + 0.9 * (h[t - 1] + 1.0) + 0.3 * torch.randn(1, generator=gen)
        return stoch_vol, (torch.exp(h / 2) * torch.randn(30, generator=gen),)
    if name == "horseshoe_reg":
        features = torch.randn(20, 10, generator=gen)
        beta = torch.zeros(10)
        beta[:2] = torch.tensor([3.0, -2.0])
        return horseshoe_reg, (features, features @ beta + torch.randn(20, generator=gen))
    raise ValueError(f"unknown model {name!r}")


def run_job(
    model_name: str,
    guide_name: str,
    steps: int,
    draws: int,
    seed: int,
    reparam: str | None = None,
    recipe: str | None = None,
) -> dict:
    """Train one guide on one model (under Pyro's ``AutoReparam`` with ``reparam="auto"``) and evaluate it; returns
    a result row (``error`` on failure). ``recipe``: ``"plain"`` or ``"fit"``; by default plain SVI for Pyro's
    guides and ``infer.fit`` for pyroflows'."""
    import pyro
    import torch

    torch.set_num_threads(1)
    recipe = recipe or ("plain" if guide_name in PYRO_GUIDES else "fit")
    row = {"model": model_name, "guide": guide_name, "recipe": recipe, **({"reparam": reparam} if reparam else {})}
    try:
        model, args = model_spec(model_name)
        model = reparameterised(model, reparam)
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = make_guide(guide_name, model)
        start = time.perf_counter()
        if recipe == "plain":
            _train_plain(model, guide, args, steps, PARTICLES)
        else:
            _train_fit(model, guide, args, steps * PARTICLES, {})
        row["train_s"] = time.perf_counter() - start
        row.update(evaluate(model, guide, args, draws, seed))
    except Exception as e:  # a guide that diverges is a result, not a crash of the benchmark
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=3)
    return row


def label(row: dict) -> str:
    """The row's guide, ``+ AutoReparam`` when it was trained on the model under Pyro's ``AutoReparam``, ``(plain
    SVI)`` for a pyroflows guide trained by the plain loop instead of ``infer.fit``."""
    plain = row.get("recipe") == "plain" and row["guide"] not in PYRO_GUIDES
    return row["guide"] + (" + AutoReparam" if row.get("reparam") else "") + (" (plain SVI)" if plain else "")


def log_z_hat(rows: list[dict]) -> float | None:
    """The run's estimate of ``log Z`` for one model: the largest, over its guides, of the median of each guide's
    per-set importance-weighted bounds (rows of runs before per-set bounds were kept: the bound over all draws).

    Each set's bound is below ``log Z`` in expectation, but one set can overshoot it when the weights are
    heavy-tailed (k̂ near or above 0.7: a rare draw with a huge weight), and the largest of many noisy bounds picks
    such an overshoot; the median of a guide's sets does not follow one lucky set."""
    if not rows:
        return None
    return max(statistics.median(r["iw_sets"]) if "iw_sets" in r else r["iw_elbo"] for r in rows)


def markdown(rows: list[dict]) -> str:
    """The table of ``log Ẑ − ELBO`` per guide and model, ``log Ẑ`` from :func:`log_z_hat` over all the model's rows
    (a reparameterised model has the same evidence, so its rows share the column's ``log Ẑ``)."""
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    seen = {label(r) for r in rows}
    suffixes = ("", " (plain SVI)", " + AutoReparam", " + AutoReparam (plain SVI)")
    guides = [g + s for g in GUIDES for s in suffixes if g + s in seen]
    cell = {(r["model"], label(r)): r for r in rows}
    best = {m: log_z_hat([r for r in rows if r["model"] == m and "error" not in r]) for m in models}
    for key, r in cell.items():  # the worst draw's log ratio against log Ẑ (rows of runs before the column had none)
        if "min_log_ratio" in r:
            cell[key] = {**r, "worst": r["min_log_ratio"] - best[r["model"]]}
    return grid(models, guides, cell, lambda r: best[r["model"]] - r["elbo"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="20 steps, 5 x 100 draws: checks the script runs")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--guides", default=",".join(GUIDES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reparam",
        default="none",
        help="none, auto (every guide on the model under Pyro's AutoReparam), or none,auto (both, one table)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="also train pyroflows' guides through the plain SVI loop (rows 'GUIDE (plain SVI)'): fit's defaults "
        "against Pyro's usual recipe on models that chose neither",
    )
    p.add_argument("--out", default=None, help="the JSON to write (default results/vi_heldout.json)")
    args = p.parse_args(argv)
    steps, draws = (20, 100) if args.quick else (STEPS, 10_000)
    variants = [None if v == "none" else v for v in args.reparam.split(",")]
    guides = args.guides.split(",")
    jobs = [(m, g, v, None) for m in args.models.split(",") for v in variants for g in guides]
    if args.plain:
        jobs += [(m, g, v, "plain") for m, g, v, _ in jobs if g not in PYRO_GUIDES]
    rows, start = [], time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_job, m, g, steps, draws, args.seed, v, r) for m, g, v, r in jobs]
        for f in as_completed(futures):
            row = f.result()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    payload = {
        "benchmark": "vi_heldout",
        "command": _common.command_line("benchmarks/vi_heldout.py", argv),
        "quick": args.quick,
        "machine": _common.machine(),
        "commit": _common.git_commit(),
        "budget": {"steps": steps, "particles": PARTICLES, "draws": draws, "draw_sets": DRAW_SETS},
        "wall_s": time.perf_counter() - start,
        "rows": sorted(rows, key=lambda r: (r["model"], label(r))),
    }
    print("\n" + markdown(rows))
    out = Path(args.out) if args.out else _common.result_path(_common.RESULTS, "vi_heldout", args.quick)
    _common.write_result(out, payload)
    return payload


if __name__ == "__main__":
    main()
