"""Shared harness of the VI examples: fit several guides to one model, then compare them on the ELBO, the PSIS
k̂ (Yao et al. 2018) and the error against reference posteriors, with ArviZ plots.

Used by ``eight_schools.py``, ``funnel.py`` and ``logistic_regression.py``; importing it has no side effects.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal, AutoNormalizingFlow

import pyroflows
from pyroflows import diagnostics
from pyroflows.infer import fit

#: Guide factories compared by every example: Pyro's own autoguides, then pyroflows builders as
#: ``AutoNormalizingFlow`` guides.
GUIDES: dict[str, Callable] = {
    "AutoNormal": lambda model: AutoNormal(model),
    "AutoMultivariateNormal": lambda model: AutoMultivariateNormal(model),
    "AutoIAFNormal": lambda model: AutoIAFNormal(model, num_transforms=2),
    "pyroflows.planar": lambda model: AutoNormalizingFlow(model, partial(pyroflows.planar_flow, num_layers=16)),
    "pyroflows.realnvp": lambda model: AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=8)),
    "pyroflows.residual": lambda model: AutoNormalizingFlow(
        model, partial(pyroflows.residual_flow, num_layers=4, hidden=(64,))
    ),
}


def add_arguments(parser: argparse.ArgumentParser, steps: int = 2000) -> argparse.ArgumentParser:
    """The command-line options every VI example shares."""
    parser.add_argument("--steps", type=int, default=steps, help="SVI steps per guide")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (fit's schedule)")
    parser.add_argument("--particles", type=int, default=16, help="ELBO particles per step")
    parser.add_argument("--samples", type=int, default=4000, help="guide draws for the diagnostics")
    parser.add_argument("--guides", default=",".join(GUIDES), help="comma-separated subset of: " + ", ".join(GUIDES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--khat-repeats", type=int, default=5, help="independent draw sets for the k̂ spread")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="directory for PNG/JSON")
    parser.add_argument("--quick", action="store_true", help="a few steps and draws: checks the script runs")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per guide")
    return parser


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.steps, args.samples, args.particles = min(args.steps, 30), min(args.samples, 200), min(args.particles, 4)
        args.khat_repeats = min(args.khat_repeats, 2)
    unknown = [g for g in args.guides.split(",") if g not in GUIDES]
    if unknown:
        raise SystemExit(f"unknown guide(s) {unknown}; choose from {list(GUIDES)}")
    return args


def compare_guides(
    model: Callable,
    model_args: Sequence = (),
    *,
    guides: Sequence[str],
    references: dict[str, object],
    var_names: Sequence[str],
    steps: int,
    lr: float,
    particles: int,
    samples: int,
    coords: dict | None = None,
    dims: dict | None = None,
    seed: int = 0,
    progress: bool = False,
    khat_repeats: int = 5,
) -> tuple[pd.DataFrame, dict[str, dict[str, pd.DataFrame]], dict[str, object]]:
    """Fit each guide, draw ``samples`` from it and compare.

    :returns: ``(summary, details, idatas)``: one summary row per guide (ELBO, importance-weighted ELBO, k̂,
        PSIS ESS, and per reference the largest ``|mean error|`` in reference-sd units, the smallest and largest
        sd ratio, the largest 1-D Wasserstein distance in reference-sd units; k̂ also as the median and maximum over
        ``khat_repeats`` independent sets of ``samples`` draws); ``details[guide][ref]`` the
        per-component tables of :func:`pyroflows.diagnostics.compare_to_reference`; the InferenceData per guide.
    """
    rows, details, idatas = {}, {}, {}
    for name in guides:
        pyro.clear_param_store()
        guide = GUIDES[name](model)
        result = fit(
            model, guide, steps, model_args=model_args, lr=lr, num_particles=particles, progress=progress, seed=seed
        )
        idata = diagnostics.to_inference_data(model, guide, samples, model_args=model_args, coords=coords, dims=dims)
        psis = diagnostics.psis_khat(idata=idata)
        # k̂ from one set of draws is noisy (a few heavy weights decide it): repeat on fresh draws
        khats = [psis.khat] + [
            diagnostics.psis_khat(model, guide, samples, model_args=model_args, seed=seed + r).khat
            for r in range(1, khat_repeats)
        ]
        row = {
            "elbo": psis.elbo,
            "iw_elbo": psis.iw_elbo,
            "khat": psis.khat,
            f"khat median of {khat_repeats}": float(np.median(khats)),
            f"khat max of {khat_repeats}": float(np.max(khats)),
            "psis_ess": psis.ess,
            "fit_s": result.seconds,
        }
        details[name] = {}
        for ref_name, ref in references.items():
            table = diagnostics.compare_to_reference(idata, ref, var_names)
            details[name][ref_name] = table
            row[f"max|mean err| vs {ref_name}"] = float(table["mean_error"].abs().max())
            row[f"min sd ratio vs {ref_name}"] = float(table["sd_ratio"].min())
            row[f"max sd ratio vs {ref_name}"] = float(table["sd_ratio"].max())
            row[f"max W1/sd vs {ref_name}"] = float(table["wasserstein_sd"].max())
        rows[name] = row
        idatas[name] = idata
        print(f"  {name}: ELBO {psis.elbo:.3f}, k̂ {psis.khat:.2f}, {result.seconds:.0f} s", flush=True)
    return pd.DataFrame.from_dict(rows, orient="index"), details, idatas


def meets_target(table: pd.DataFrame, mean_tol: float = 0.1, sd_tol: float = 0.1) -> bool:
    """Every component's mean within ``mean_tol`` reference sds and sd within ``sd_tol`` (relative)."""
    return bool((table["mean_error"].abs() < mean_tol).all() and ((table["sd_ratio"] - 1).abs() < sd_tol).all())


def save_results(out: Path, tag: str, summary: pd.DataFrame, details: dict, command: str, extra=None) -> Path:
    """Write ``<out>/<tag>.json`` (summary, per-component tables, the command) and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "versions": {"pyro": pyro.__version__, "pyroflows": pyroflows.__version__},
        "summary": json.loads(summary.to_json(orient="index")),
        "details": {g: {r: json.loads(t.to_json(orient="index")) for r, t in d.items()} for g, d in details.items()},
        **(extra or {}),
    }
    path = out / f"{tag}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def save_plots(
    out: Path, tag: str, idatas: dict, summary: pd.DataFrame, pair_vars: Sequence[str], coords: dict | None = None
) -> list[Path]:
    """A pair plot per guide (``<tag>_pair_<guide>.png``) and a k̂ bar chart of all guides (``<tag>_khat.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyroflows import _arviz_compat as compat

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, idata in idatas.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = compat.plot_pair(idata, list(pair_vars), coords)
        fig.suptitle(f"{tag}: {name} (k̂ = {summary.loc[name, 'khat']:.2f})")
        path = out / f"{tag}_pair_{name.replace('.', '_')}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    khat = summary["khat"]
    ax.barh(list(khat.index), khat.values, color=["tab:green" if k < 0.7 else "tab:red" for k in khat.values])
    for x, style in ((0.5, ":"), (0.7, "--")):
        ax.axvline(x, color="k", linestyle=style, linewidth=1)
    ax.set_xlabel("PSIS k̂ of log p(x, z) - log q(z)  (< 0.7: usable, < 0.5: good)")
    ax.set_title(tag)
    fig.tight_layout()
    path = out / f"{tag}_khat.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [*paths, path]


def print_summary(title: str, summary: pd.DataFrame) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(f"\n{title}\n{summary}\n", flush=True)


__all__ = ["GUIDES", "add_arguments", "apply_quick", "compare_guides", "meets_target", "save_plots", "save_results"]
