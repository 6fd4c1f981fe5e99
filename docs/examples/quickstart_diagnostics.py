"""Quick start: checking fitted guides with ArviZ (docs/quickstart/diagnostics.rst).

Fits a mean-field ``AutoNormal`` guide and a RealNVP flow guide to the non-centered eight-schools model, then,
for each: converts guide draws to ArviZ data, computes the PSIS k̂ diagnostic, compares the posterior with
ArviZ's bundled NUTS run of the same model, and estimates LOO with and without the correction for guide draws.
"""

from __future__ import annotations

import warnings
from functools import partial

import arviz as az
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow

import pyroflows
from pyroflows.diagnostics import compare_to_reference, loo, psis_khat, to_inference_data
from pyroflows.infer import fit

# Eight schools (Rubin 1981): estimated effects y and standard errors sigma of a coaching programme.
SCHOOLS = ["Choate", "Deerfield", "Phillips Andover", "Phillips Exeter", "Hotchkiss", "Lawrenceville",
           "St. Paul's", "Mt. Hermon"]  # fmt: skip
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def model(y, sigma):
    """Non-centered parameterisation, with the priors of ArviZ's bundled ``non_centered_eight`` run."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", len(sigma)):
        theta_t = pyro.sample("theta_t", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_t)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


GUIDES = {
    "AutoNormal": lambda: AutoNormal(model),
    "RealNVP flow": lambda: AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=8)),
}
# ArviZ names for the non-(chain, draw) dims: the reference run uses the same ones.
DIMS = {"theta": ["school"], "theta_t": ["school"], "obs": ["school"]}
COORDS = {"school": SCHOOLS}


def plain_loo(idata) -> tuple[float, float]:
    """ArviZ's own PSIS-LOO: (elpd, largest Pareto k). ArviZ 0.x returns a pandas Series, 1.x an object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns when some k is large
        result = az.loo(idata, pointwise=True)
    elpd = result["elpd_loo"] if isinstance(result, pd.Series) else result.elpd
    return float(elpd), float(result.pareto_k.max())


def main(num_steps: int = 2000, num_samples: int = 4000):
    reference = az.load_arviz_data("non_centered_eight")  # NUTS (PyMC), 4 chains x 500 draws, bundled offline
    results = {}
    for name, make_guide in GUIDES.items():
        pyro.clear_param_store()
        guide = make_guide()
        fit(model, guide, num_steps, model_args=(Y, SIGMA), lr=1e-2, num_particles=16, progress=False, seed=0)

        # 1. Guide draws as ArviZ data: posterior, posterior_predictive, log_likelihood, observed_data and
        #    sample_stats (log_p, log_q per draw), all from the same num_samples draws.
        idata = to_inference_data(model, guide, num_samples, model_args=(Y, SIGMA), coords=COORDS, dims=DIMS)

        # 2. PSIS k̂ of the importance ratios p(y, z) / q(z), reusing those draws.
        psis = psis_khat(idata=idata)
        print(f"\n== {name}: k̂ = {psis.khat:.2f} (threshold {psis.threshold:.2f}, ok: {psis.ok}), "
              f"PSIS ESS = {psis.ess:.0f} of {psis.num_samples}, "
              f"ELBO = {psis.elbo:.2f}, IW-ELBO = {psis.iw_elbo:.2f}")  # fmt: skip

        # 3. The guide's posterior against NUTS, one row per component.
        table = compare_to_reference(idata, reference, ["mu", "tau", "theta"])
        with pd.option_context("display.width", 160, "display.max_columns", 10, "display.precision", 2):
            print(table)

        # 4. LOO: corrected for guide draws (pyroflows) against plain az.loo, which takes them for exact draws.
        corrected = loo(idata)
        plain_elpd, plain_k = plain_loo(idata)
        print(f"LOO corrected (pyroflows.diagnostics.loo): elpd {corrected.elpd_loo:.2f}, "
              f"max k {corrected.pareto_k.max():.2f}")  # fmt: skip
        print(f"LOO plain (az.loo):                        elpd {plain_elpd:.2f}, max k {plain_k:.2f}")
        results[name] = {
            "idata": idata,
            "psis": psis,
            "table": table,
            "loo": corrected,
            "az_loo": {"elpd_loo": plain_elpd, "max_pareto_k": plain_k},
        }
    ref_elpd, ref_k = plain_loo(reference)  # for NUTS draws plain PSIS-LOO is the right estimate
    print(f"\nNUTS reference, az.loo: elpd {ref_elpd:.2f}, max k {ref_k:.2f}")
    return results


if __name__ == "__main__":
    main()
