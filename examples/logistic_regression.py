"""Bayesian logistic regression on scikit-learn's breast-cancer data (569 x 30, bundled): flow guides against
Pyro's autoguides, checked against a NUTS reference.

``w_k ~ N(0, 1)``, ``b ~ N(0, 5²)``, ``y_n ~ Bernoulli(logit⁻¹(x_n·w + b))`` on standardised features. The
reference is one chain of Pyro's NUTS (about a minute; cached in ``examples/out/logistic_nuts.nc``). Besides
the posterior comparison, :func:`pyroflows.diagnostics.loo` gives PSIS-LOO corrected for the guide.

Run: ``python examples/logistic_regression.py`` (``--quick`` checks it runs, against a short NUTS run).
Writes ``examples/out/logistic_regression.json`` and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import sys
import time

import vi_common
import vi_models

from pyroflows import _arviz_compat as compat
from pyroflows import diagnostics


def reference(args) -> object:
    cache = args.out / "logistic_nuts.nc"
    if not args.quick and cache.exists():
        return compat.from_netcdf(cache)
    start = time.perf_counter()
    num, warmup = (50, 50) if args.quick else (1000, 500)
    ref = vi_models.logistic_regression_reference(num_samples=num, warmup=warmup, seed=args.seed)
    print(f"NUTS reference: {num} draws after {warmup} warm-up in {time.perf_counter() - start:.0f} s", flush=True)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        compat.to_netcdf(ref, cache)
    return ref


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = vi_common.apply_quick(vi_common.add_arguments(parser, steps=3000).parse_args(argv))
    X, y, names = vi_models.load_breast_cancer_data()
    ref = reference(args)
    print(f"logistic regression: {args.steps} steps x {args.particles} particles, {args.samples} draws", flush=True)
    summary, details, idatas = vi_common.compare_guides(
        vi_models.logistic_regression,
        (X, y),
        guides=args.guides.split(","),
        references={"NUTS": ref},
        var_names=["w", "b"],
        steps=args.steps,
        lr=args.lr,
        particles=args.particles,
        samples=args.samples,
        coords=vi_models.logistic_regression_coords(X, names),
        dims=vi_models.LOGISTIC_DIMS,
        seed=args.seed,
        progress=args.progress,
        khat_repeats=args.khat_repeats,
    )
    loos = {g: diagnostics.loo(idatas[g]) for g in summary.index}
    summary["elpd_loo"] = [loos[g].elpd_loo for g in summary.index]
    summary["loo max k"] = [float(loos[g].pareto_k.max()) for g in summary.index]
    vi_common.print_summary("logistic regression (breast cancer)", summary)
    command = "python examples/logistic_regression.py " + " ".join(sys.argv[1:])
    path = vi_common.save_results(args.out, "logistic_regression", summary, details, command)
    if not args.no_plots:
        vi_common.save_plots(args.out, "logistic_regression", idatas, summary, ["b", "w"], {"feature": names[:3]})
    print(f"wrote {path}")
    return summary, details


if __name__ == "__main__":
    main()
