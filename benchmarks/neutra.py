"""NUTS on a model against NUTS in a fitted flow guide's base space (Pyro's ``NeuTraReparam``, Hoffman et al. 2019).

A flow guide that fits the posterior well maps it close to N(0, I); HMC on the flow's base space then sees that
simple geometry instead of the model's (a funnel's neck, say). Per model and seed: NUTS on the model as written, and
NUTS on the model reparameterised by :meth:`pyroflows.AutoFlow.neutra_reparam` of a ``realnvp(8)`` guide fitted by
:func:`pyroflows.infer.fit` with its defaults. Reported: the sampler's seconds (the guide's fit apart), its
divergences, the mean and sd of one variable against their exact values, and ArviZ's bulk ESS of that variable,
per draw and per second of sampling.

Models (``examples/vi_models.py``): ``funnel10``, Neal's funnel in 10 dimensions (``v``, exact mean 0 and sd 3), and
``eight_schools_centered`` (``tau``, exact mean 3.598 and sd 3.220 by quadrature over ``tau``).

Usage::

    python benchmarks/neutra.py                       # both models, seeds 0 and 1
    python benchmarks/neutra.py --models funnel10 --seeds 0
    python benchmarks/neutra.py --quick               # few steps and draws (a smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402
from benchmarks.vi_guides import make_guide, model_spec  # noqa: E402 (also puts examples/ on the path)

FULL = {"fit_steps": 2000, "warmup": 500, "draws": 500, "max_tree_depth": 8}
QUICK = {"fit_steps": 20, "warmup": 10, "draws": 10, "max_tree_depth": 4}
GUIDE = "realnvp(8)"
#: model -> the variable reported (its exact posterior mean and sd: :func:`_exact`)
TARGETS = {"funnel10": "v", "eight_schools_centered": "tau"}


def _exact(model_name: str) -> tuple[float, float]:
    """The reported variable's exact posterior mean and sd (``examples/vi_models.py``)."""
    import vi_models

    if model_name == "funnel10":
        m = vi_models.funnel_exact_moments(10)
        return float(m["v_mean"]), float(m["v_sd"])
    m = vi_models.eight_schools_exact_moments()
    return float(m["tau_mean"]), float(m["tau_sd"])


def _nuts(model, args, cfg: dict, seed: int):
    """NUTS on ``model``: (its draws, seconds, number of divergent transitions)."""
    import pyro
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    mcmc = MCMC(
        NUTS(model, max_tree_depth=cfg["max_tree_depth"]),
        num_samples=cfg["draws"],
        warmup_steps=cfg["warmup"],
        disable_progbar=True,
    )
    t0 = time.perf_counter()
    mcmc.run(*args)
    seconds = time.perf_counter() - t0
    divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    return mcmc.get_samples(), seconds, divergences


def run_row(model_name: str, seed: int, cfg: dict) -> list[dict]:
    """NUTS on the model, then on its NeuTra reparameterisation by a fitted ``realnvp(8)`` guide."""
    import arviz as az
    import pyro
    import torch
    from pyro import poutine

    from pyroflows.infer import fit

    torch.set_num_threads(1)
    model, args, _ = model_spec(model_name)
    name = TARGETS[model_name]
    mean, sd = _exact(model_name)
    rows = []

    def row(sampler: str, values: torch.Tensor, seconds: float, divergences: int, fit_s: float | None) -> dict:
        v = values.detach().reshape(-1).double().numpy()
        ess = float(az.ess(v[None]))
        return {
            "model": model_name,
            "variable": name,
            "sampler": sampler,
            "seed": seed,
            "mean": float(v.mean()),
            "sd": float(v.std()),
            "exact_mean": mean,
            "exact_sd": sd,
            "divergences": divergences,
            "ess": ess,
            "seconds": seconds,
            "ess_per_s": ess / seconds,
            "fit_seconds": fit_s,
        }

    draws, seconds, divergences = _nuts(model, args, cfg, seed)
    rows.append(row("NUTS", draws[name], seconds, divergences, None))

    pyro.clear_param_store()
    guide = make_guide(GUIDE, model)
    t0 = time.perf_counter()
    fit(model, guide, cfg["fit_steps"], model_args=args, progress=False, report=False, seed=seed)
    fit_s = time.perf_counter() - t0
    reparam = guide.neutra_reparam(*args)
    draws, seconds, divergences = _nuts(poutine.reparam(model, config=lambda _: reparam), args, cfg, seed)
    shared = next(k for k in draws if k.endswith("_shared_latent"))
    values = reparam.transform_sample(draws[shared])[name]
    rows.append(row(f"NUTS + NeuTra ({GUIDE})", values, seconds, divergences, fit_s))
    return rows


def markdown(payload: dict) -> str:
    lines = [
        "| model | variable | sampler | seed | mean (exact) | sd (exact) | divergences | ESS | sampling s | "
        "ESS / s | guide fit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        fit_s = "" if r["fit_seconds"] is None else f"{r['fit_seconds']:.0f}"
        lines.append(
            f"| {r['model']} | {r['variable']} | {r['sampler']} | {r['seed']} | {r['mean']:.2f} "
            f"({r['exact_mean']:.2f}) | {r['sd']:.2f} ({r['exact_sd']:.2f}) | {r['divergences']} | {r['ess']:.0f} | "
            f"{r['seconds']:.1f} | "
            f"{r['ess_per_s']:.1f} | {fit_s} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(TARGETS), help="comma-separated, of: " + ", ".join(TARGETS))
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (of the fit and of NUTS)")
    p.add_argument("--quick", action="store_true", help="few steps and draws (a smoke test)")
    p.add_argument("--out", default=None, help="the JSON to write (default results/neutra.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the NeuTra comparison from the command line."""
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(TARGETS))
    if unknown:
        raise SystemExit(f"neutra.py: unknown model(s) {unknown}; choose from {sorted(TARGETS)}")
    t0 = time.perf_counter()
    rows = [r for m in models for s in args.seeds.split(",") for r in run_row(m, int(s), cfg)]
    config = {**cfg, "guide": GUIDE}
    return _common.save_rows("neutra", args, argv, config, rows, t0, lambda rows: markdown({"rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
