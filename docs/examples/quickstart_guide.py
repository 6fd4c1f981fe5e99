"""Quick start: a normalizing-flow guide for a Pyro model (docs/quickstart/guide.rst).

The data identify only the product ``a * b`` of the model below, so the posterior lies along the curve
``a * b = 1``: ``a`` stays uncertain while ``b`` follows ``1 / a``. A mean-field guide
(e.g. ``AutoNormal``) cannot follow the curve: it keeps the product near 1 only by shrinking ``a``. A flow guide
follows it.
"""

from __future__ import annotations

from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive

import pyroflows


def model(y):
    a = pyro.sample("a", dist.LogNormal(0.0, 1.0))  # positive: one branch of the hyperbola
    b = pyro.sample("b", dist.Normal(0.0, 3.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(a * b, 0.5), obs=y)


def main(num_steps: int = 1000):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    y = 1.0 + 0.5 * torch.randn(20)  # data with a * b = 1

    # The guide: RealNVP over all latent sites (here 2), built lazily on first use (AutoFlow is Pyro's
    # AutoNormalizingFlow with the flow's parameters in one tensor: the same guide, faster steps).
    guide = pyroflows.AutoFlow(model, partial(pyroflows.realnvp, num_layers=8))
    # SVI with fit's defaults: 8 vectorised particles per step, the sticking-the-landing gradient, the peak
    # learning rate then a cosine decay, and checks before every update.
    result = pyroflows.infer.fit(model, guide, num_steps, model_args=(y,), progress=False)
    print(f"{num_steps} steps in {result.seconds:.0f} s, final ELBO {result.final_elbo():.3f}")

    # Posterior draws from the guide, site by site.
    posterior = Predictive(model, guide=guide, num_samples=2000, return_sites=["a", "b"], parallel=True)(y)
    a, b = posterior["a"], posterior["b"]
    print(f"a * b:  mean {float((a * b).mean()):.3f}, sd {float((a * b).std()):.3f}")  # tight around 1
    print(f"log(a): mean {float(a.log().mean()):.3f}, sd {float(a.log().std()):.3f}")  # wide: a is not pinned down
    return guide, posterior


if __name__ == "__main__":
    main()
