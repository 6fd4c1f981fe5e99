"""Eight schools: flow guides against Pyro's autoguides, checked against NUTS and the exact posterior.

Both parameterisations (Rubin 1981; ``mu ~ N(0, 5²)``, ``tau ~ HalfCauchy(5)``), each guide fitted by
``pyroflows.infer.fit`` and diagnosed with ``pyroflows.diagnostics``: ELBO, importance-weighted ELBO, PSIS k̂,
and per-variable errors against two references — ArviZ's bundled NUTS runs (``non_centered_eight`` /
``centered_eight``; the centered one has divergences and a biased ``tau``) and exact draws from a quadrature over
``tau`` (both parameterisations have the same posterior of ``mu, tau, theta``).

Run: ``python examples/eight_schools.py`` (about 10 minutes on a laptop CPU; ``--quick`` checks it runs).
Writes ``examples/out/eight_schools_<param>.json`` and PNG pair / k̂ plots next to it.
"""

from __future__ import annotations

import argparse
import sys

import vi_common
import vi_models

from pyroflows import _arviz_compat as compat

VAR_NAMES = ["mu", "tau", "theta"]


def run(param: str, args: argparse.Namespace):
    model = vi_models.eight_schools_noncentered if param == "noncentered" else vi_models.eight_schools_centered
    nuts = compat.load_arviz_data("non_centered_eight" if param == "noncentered" else "centered_eight")
    exact = vi_models.eight_schools_exact_draws(20000, seed=args.seed)
    print(f"eight schools ({param}): {args.steps} steps x {args.particles} particles, {args.samples} draws", flush=True)
    summary, details, idatas = vi_common.compare_guides(
        model,
        guides=args.guides.split(","),
        references={"NUTS": nuts, "exact": exact},
        var_names=VAR_NAMES,
        steps=args.steps,
        lr=args.lr,
        particles=args.particles,
        samples=args.samples,
        coords=vi_models.EIGHT_SCHOOLS_COORDS,
        dims={k: v for k, v in vi_models.EIGHT_SCHOOLS_DIMS.items() if param == "noncentered" or k != "theta_t"},
        seed=args.seed,
        progress=args.progress,
        khat_repeats=args.khat_repeats,
    )
    summary["target vs NUTS"] = [vi_common.meets_target(details[g]["NUTS"]) for g in summary.index]
    summary["target vs exact"] = [vi_common.meets_target(details[g]["exact"]) for g in summary.index]
    tag = f"eight_schools_{param}"
    vi_common.print_summary(tag, summary)
    command = "python examples/eight_schools.py " + " ".join(sys.argv[1:])
    path = vi_common.save_results(args.out, tag, summary, details, command)
    if not args.no_plots:
        vi_common.save_plots(args.out, tag, idatas, summary, ["mu", "tau"])
    print(f"wrote {path}")
    return summary, details


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param", choices=["noncentered", "centered", "both"], default="both")
    args = vi_common.apply_quick(vi_common.add_arguments(parser).parse_args(argv))
    params = ["noncentered", "centered"] if args.param == "both" else [args.param]
    return {p: run(p, args) for p in params}


if __name__ == "__main__":
    main()
