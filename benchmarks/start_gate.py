"""Where ``fit``'s Gaussian start fires: :func:`pyroflows.start.gaussian_start` on the VI benchmark's posteriors.

For each posterior of ``benchmarks/vi_guides.py`` (the default six and the extra ones) and a 31-D logistic
regression on scikit-learn's bundled breast-cancer data, a fresh guide is built (two flow guides and Pyro's
``AutoNormal``, ``AutoMultivariateNormal`` and ``AutoLowRankMultivariateNormal``) and
``gaussian_start(mode="auto")`` is run as :func:`pyroflows.infer.fit` runs it before its first step. Each row
records the two importance-weighted bounds (the guide as built and the guide moved onto the Laplace approximation;
256 draws, the same for both), the margin between them per latent coordinate (the start is used above
``pyroflows.start.START_MARGIN``), whether it was used, its reason and the seconds it took. No training: this is the
gate's view of each posterior, to check that it leaves alone the posteriors a guide reaches as built and moves the
guide where it does not.

::

    python benchmarks/start_gate.py --out benchmarks/results/start_gate.json
    python benchmarks/start_gate.py --quick      # two posteriors: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

GUIDES = [
    "realnvp(8)",
    "autoregressive_flow(8)/tails",
    "AutoNormal",
    "AutoMultivariateNormal",
    "AutoLowRankMultivariateNormal",
]


def _models(names: list[str]):
    """``name -> (model, args)`` for the vi_guides posteriors by name, and ``logistic_regression``."""
    from benchmarks import vi_guides

    out = {}
    for name in names:
        if name == "logistic_regression":
            import vi_models

            X, y, _ = vi_models.load_breast_cancer_data()
            out[name] = (vi_models.logistic_regression, (X, y))
        else:
            model, args, _ = vi_guides.model_spec(name)
            out[name] = (model, args)
    return out


def run_row(model_name: str, model, args: tuple, guide_name: str) -> dict:
    """One gate decision: the report of ``gaussian_start`` on a fresh guide, with the dimension and seconds."""
    import pyro

    from benchmarks import vi_guides
    from pyroflows.start import _adapter, gaussian_start

    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # Pyro's guides start at a prior median estimated from draws: the same start every run
    if guide_name in ("AutoMultivariateNormal", "AutoLowRankMultivariateNormal"):
        from pyro.infer import autoguide

        guide = getattr(autoguide, guide_name)(model)
    else:
        guide = vi_guides.make_guide(guide_name, model)
    t0 = time.perf_counter()
    report = gaussian_start(model, guide, *args)
    seconds = time.perf_counter() - t0
    dim = _adapter(guide).dim  # latent coordinates, as the gate counts them (AutoNormal has no latent_dim)
    finite = {k: (v if math.isfinite(v) else None) for k, v in report.items() if k.startswith("bound_")}
    margin = None if None in finite.values() else (finite["bound_gaussian"] - finite["bound_identity"]) / dim
    return {
        "model": model_name,
        "guide": guide_name,
        "dim": dim,
        "used": bool(report["used"]),
        "reason": report["reason"],
        **finite,  # None where there was no bound (no Gaussian approximation, or the gate skipped it)
        "margin_per_coordinate": margin,
        "seconds": seconds,
    }


def _f(x: float) -> str:
    return "—" if x is None else f"{x:.2f}"


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| posterior | D | guide | bound as built | bound Gaussian | margin per coordinate | used | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dim']} | {r['guide']} | {_f(r['bound_identity'])} | {_f(r['bound_gaussian'])} | "
            f"{_f(r['margin_per_coordinate'])} | {'yes' if r['used'] else 'no'} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    import torch

    from benchmarks import _common, vi_guides
    from pyroflows.start import START_MARGIN

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two posteriors, one guide: checks the script runs")
    default = ",".join([*vi_guides.MODELS, *vi_guides.EXTRA_MODELS, "logistic_regression"])
    p.add_argument("--models", default=default)
    p.add_argument("--guides", default=",".join(GUIDES))
    p.add_argument("--out", help="JSON file")
    args = p.parse_args(argv)
    names, guides = args.models.split(","), args.guides.split(",")
    if args.quick:
        names, guides = ["banana", "trend_regression"], guides[:1]
    torch.set_num_threads(1)
    rows = []
    for name, (model, model_args) in _models(names).items():
        for guide in guides:
            row = run_row(name, model, model_args, guide)
            print(json.dumps(row), flush=True)
            rows.append(row)
    payload = {
        "benchmark": "start_gate",
        "command": _common.command_line("benchmarks/start_gate.py", argv),
        "quick": args.quick,
        "machine": _common.machine(),
        "commit": _common.git_commit(),
        "margin": START_MARGIN,
        "rows": rows,
    }
    print(markdown(rows))
    if args.out:
        _common.write_result(Path(args.out), payload)
    return payload


if __name__ == "__main__":
    main()
