"""Neal's funnel in 10-D: flow guides against Pyro's autoguides, checked against exact draws.

``v ~ N(0, 3²)``, ``x_i | v ~ N(0, e^v)`` for ``i = 1..9`` (Neal 2003). There are no observations, so the
posterior is the prior and exact independent draws are the reference. The funnel's neck (small ``v``) and its
heavy-tailed ``x`` are hard for a Gaussian guide; the PSIS k̂ says how much of it each guide misses.

Run: ``python examples/funnel.py`` (a few minutes on a laptop CPU; ``--quick`` checks it runs).
Writes ``examples/out/funnel.json`` and PNG pair / k̂ plots next to it.
"""

from __future__ import annotations

import argparse
import sys

import vi_common
import vi_models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=10, help="total dimension D (v and D - 1 coordinates x)")
    args = vi_common.apply_quick(vi_common.add_arguments(parser).parse_args(argv))
    exact = vi_models.funnel_exact_draws(20000, dim=args.dim, seed=args.seed)
    print(f"funnel (D={args.dim}): {args.steps} steps x {args.particles} particles, {args.samples} draws", flush=True)
    summary, details, idatas = vi_common.compare_guides(
        vi_models.funnel,
        (args.dim,),
        guides=args.guides.split(","),
        references={"exact": exact},
        var_names=["v", "x"],
        steps=args.steps,
        lr=args.lr,
        particles=args.particles,
        samples=args.samples,
        coords=vi_models.funnel_coords(args.dim),
        dims=vi_models.FUNNEL_DIMS,
        seed=args.seed,
        progress=args.progress,
        khat_repeats=args.khat_repeats,
    )
    # x is so heavy-tailed (kurtosis ~ 3e9) that its sample sd says little: judge v, and x through W1 / k̂
    summary["v mean err"] = [float(details[g]["exact"].loc["v", "mean_error"]) for g in summary.index]
    summary["v sd ratio"] = [float(details[g]["exact"].loc["v", "sd_ratio"]) for g in summary.index]
    vi_common.print_summary(f"funnel (D={args.dim})", summary)
    command = "python examples/funnel.py " + " ".join(sys.argv[1:])
    path = vi_common.save_results(args.out, "funnel", summary, details, command)
    if not args.no_plots:
        vi_common.save_plots(args.out, "funnel", idatas, summary, ["v", "x"])
    print(f"wrote {path}")
    return summary, details


if __name__ == "__main__":
    main()
