"""Bayesian models for the variational-inference examples, with exact reference posteriors.

Importing this module has no side effects (no sampling, no data loading); scripts in ``examples/`` import it
directly and tests put ``examples/`` on ``sys.path``.

* **Eight schools** (Rubin, 1981), centered and non-centered, with the priors of ArviZ's bundled runs
  (``mu ~ N(0, 5²)``, ``tau ~ HalfCauchy(5)``). The exact posterior is computed by 1-D quadrature over ``tau``
  (:func:`eight_schools_exact_moments`) and sampled exactly (:func:`eight_schools_exact_draws`).
* **Neal's funnel** (Neal, 2003) in ``D`` dimensions, sampled exactly (:func:`funnel_exact_draws`).
* **Bayesian logistic regression** on scikit-learn's breast-cancer data, with a NUTS reference
  (:func:`logistic_regression_reference`).
* Posteriors of other kinds with an exact log evidence, for the guide benchmark's KL(q‖p): normal means under a
  horseshoe prior (:func:`horseshoe_means`, heavy-tailed shrinkage), a local-level time series with an unknown
  process scale (:func:`local_level`, a state-space latent) and an observed product of two coordinates
  (:func:`bimodal_product`, two modes).

Reference draws are ArviZ data with a single chain (``InferenceData`` with ArviZ 0.x, ``DataTree`` with 1.x, from
:func:`pyroflows.diagnostics.posterior_data`), so they can be compared with variational draws as they stand.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyroflows import diagnostics

__all__ = [
    "EIGHT_SCHOOLS_COORDS",
    "EIGHT_SCHOOLS_DIMS",
    "SCHOOLS",
    "SIGMA",
    "Y",
    "eight_schools_centered",
    "eight_schools_exact_draws",
    "eight_schools_exact_moments",
    "eight_schools_noncentered",
    "eight_schools_tau_grid",
    "horseshoe_log_evidence",
    "horseshoe_means",
    "local_level",
    "local_level_log_evidence",
    "HORSESHOE_Y",
    "LOCAL_LEVEL_Y",
    "local_level_data",
    "bimodal_log_evidence",
    "TREND_X",
    "TREND_Y",
    "trend_data",
    "trend_regression",
    "trend_regression_log_evidence",
    "bimodal_product",
    "funnel",
    "funnel_coords",
    "funnel_exact_draws",
    "funnel_exact_moments",
    "FUNNEL_DIMS",
    "LOGISTIC_DIMS",
    "load_breast_cancer_data",
    "logistic_regression",
    "logistic_regression_coords",
    "logistic_regression_reference",
]

# ---------------------------------------------------------------------------------------------------------------
# Eight schools
# ---------------------------------------------------------------------------------------------------------------

#: School names, in the order of ArviZ's bundled ``centered_eight`` / ``non_centered_eight`` data.
SCHOOLS = ["Choate", "Deerfield", "Phillips Andover", "Phillips Exeter", "Hotchkiss", "Lawrenceville", "St. Paul's",
           "Mt. Hermon"]  # fmt: skip
_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
#: Observed treatment effects (float32 tensor of shape (8,)).
Y = torch.tensor(_Y, dtype=torch.float32)
#: Standard errors of the effects (float32 tensor of shape (8,)).
SIGMA = torch.tensor(_SIGMA, dtype=torch.float32)
MU_SCALE = 5.0
TAU_SCALE = 5.0

EIGHT_SCHOOLS_DIMS = {"theta": ["school"], "theta_t": ["school"], "obs": ["school"]}
EIGHT_SCHOOLS_COORDS = {"school": list(SCHOOLS)}


def eight_schools_centered(y: torch.Tensor | None = Y, sigma: torch.Tensor = SIGMA) -> None:
    r"""Centered eight-schools model.

    .. math::
        \mu \sim N(0, 5^2), \quad \tau \sim \mathrm{HalfCauchy}(5), \quad
        \theta_j \sim N(\mu, \tau^2), \quad y_j \sim N(\theta_j, \sigma_j^2).

    Sites ``mu``, ``tau`` (scalars), ``theta`` and ``obs`` (shape ``(J,)``, in ``pyro.plate("school", J)``).

    :param torch.Tensor y: observed effects of shape ``(J,)``; ``None`` samples ``obs`` (for prediction).
    :param torch.Tensor sigma: known standard errors of shape ``(J,)``.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, MU_SCALE))
    tau = pyro.sample("tau", dist.HalfCauchy(TAU_SCALE))
    with pyro.plate("school", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(y: torch.Tensor | None = Y, sigma: torch.Tensor = SIGMA) -> None:
    r"""Non-centered eight-schools model: the centered model with :math:`\theta = \mu + \tau \theta_t`.

    .. math::
        \mu \sim N(0, 5^2), \quad \tau \sim \mathrm{HalfCauchy}(5), \quad
        \theta_{t,j} \sim N(0, 1), \quad y_j \sim N(\mu + \tau \theta_{t,j}, \sigma_j^2).

    Sites ``mu``, ``tau`` (scalars), ``theta_t`` and ``obs`` (shape ``(J,)``, in ``pyro.plate("school", J)``), and
    the deterministic site ``theta``. Same posterior over ``(mu, tau, theta)`` as :func:`eight_schools_centered`.

    :param torch.Tensor y: observed effects of shape ``(J,)``; ``None`` samples ``obs`` (for prediction).
    :param torch.Tensor sigma: known standard errors of shape ``(J,)``.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, MU_SCALE))
    tau = pyro.sample("tau", dist.HalfCauchy(TAU_SCALE))
    with pyro.plate("school", sigma.shape[-1]):
        theta_t = pyro.sample("theta_t", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_t)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _log_halfcauchy(tau: np.ndarray, scale: float) -> np.ndarray:
    return math.log(2.0 / (math.pi * scale)) - np.log1p((tau / scale) ** 2)


def eight_schools_tau_grid(
    num_points: int = 20001, log_tau_min: float = -25.0, log_tau_max: float = 15.0
) -> dict[str, np.ndarray]:
    r"""Exact conditional posterior of eight schools on a grid in :math:`u = \log\tau` (float64).

    With :math:`\theta` and :math:`\mu` integrated out, :math:`y \mid \tau \sim N(0, V(\tau))` with
    :math:`V = \mathrm{diag}(\sigma^2 + \tau^2) + 5^2 \mathbf{1}\mathbf{1}^\top`, evaluated in :math:`O(J)` by the
    matrix determinant lemma and Sherman-Morrison. The log-density of :math:`u` given :math:`y` is, up to
    :math:`\log p(y)`, ``log_joint = log HalfCauchy(tau; 5) + u + log N(y; 0, V(tau))``.

    Truncation: near :math:`\tau = 0` the density of :math:`u` behaves like :math:`e^u`, so the mass below
    :math:`e^{-25}` is about :math:`10^{-11}`; above :math:`e^{15}` it decays like :math:`\tau^{-9}`.
    The integrand is smooth and negligible at both ends, so the trapezoid rule converges very fast.

    :param int num_points: grid size.
    :param float log_tau_min: lower end of the grid in :math:`\log\tau`.
    :param float log_tau_max: upper end of the grid in :math:`\log\tau`.
    :return: dict with ``log_tau``, ``tau``, ``log_joint`` (unnormalised log-density of :math:`\log\tau`),
        ``mu_mean``, ``mu_var`` (moments of :math:`\mu \mid \tau, y`, shape ``(G,)``) and ``theta_mean``,
        ``theta_var`` (moments of :math:`\theta \mid \tau, y`, shape ``(G, J)``).
    """
    u = np.linspace(log_tau_min, log_tau_max, num_points)
    tau = np.exp(u)
    s2 = _SIGMA**2 + tau[:, None] ** 2  # (G, J): Var(y_j | mu, tau)
    w = 1.0 / s2
    a2 = MU_SCALE**2
    # log N(y; 0, D + a2 11^T): det = det(D) (1 + a2 sum w); quad = y'D^-1 y - a2 (sum w y)^2 / (1 + a2 sum w)
    sw = w.sum(-1)
    swy = (w * _Y).sum(-1)
    logdet = np.log(s2).sum(-1) + np.log1p(a2 * sw)
    quad = (w * _Y**2).sum(-1) - a2 * swy**2 / (1.0 + a2 * sw)
    log_lik = -0.5 * (len(_Y) * math.log(2 * math.pi) + logdet + quad)
    log_joint = _log_halfcauchy(tau, TAU_SCALE) + u + log_lik
    # mu | tau, y: precision 1/a2 + sum w
    mu_prec = 1.0 / a2 + sw
    mu_mean = swy / mu_prec
    mu_var = 1.0 / mu_prec
    # theta_j | mu, tau, y ~ N((y_j tau^2 + mu sigma_j^2) / s2, sigma_j^2 tau^2 / s2); shrinkage B = sigma^2 / s2
    shrink = _SIGMA**2 / s2
    theta_mean = (1.0 - shrink) * _Y + shrink * mu_mean[:, None]
    theta_var = _SIGMA**2 * (1.0 - shrink) + shrink**2 * mu_var[:, None]
    return {
        "log_tau": u,
        "tau": tau,
        "log_joint": log_joint,
        "mu_mean": mu_mean,
        "mu_var": mu_var,
        "theta_mean": theta_mean,
        "theta_var": theta_var,
    }


def _trapezoid_weights(x: np.ndarray) -> np.ndarray:
    dx = np.diff(x)
    w = np.zeros_like(x)
    w[:-1] += dx / 2
    w[1:] += dx / 2
    return w


def _log_integral(log_f: np.ndarray, x: np.ndarray) -> float:
    """:math:`\\log \\int e^{f}` over the grid ``x`` by the trapezoid rule, computed stably."""
    top = log_f.max()
    return float(top + math.log((np.exp(log_f - top) * _trapezoid_weights(x)).sum()))


def eight_schools_exact_moments(num_points: int = 20001) -> dict[str, float | np.ndarray]:
    r"""Exact posterior moments and evidence of eight schools, by quadrature over :math:`\log\tau`.

    See :func:`eight_schools_tau_grid`. :math:`\mu` and :math:`\theta` moments come from the Gaussian
    conditionals given :math:`\tau` and the law of total variance. The posterior is the same for both
    parameterisations.

    :param int num_points: quadrature grid size.
    :return: dict with ``log_evidence`` (:math:`\log p(y)`), ``mu_mean``, ``mu_sd``, ``tau_mean``, ``tau_sd``
        (floats), ``theta_mean`` and ``theta_sd`` (arrays of shape ``(8,)``).
    """
    g = eight_schools_tau_grid(num_points)
    lj = g["log_joint"]
    m = lj.max()
    f = np.exp(lj - m) * _trapezoid_weights(g["log_tau"])
    z = f.sum()
    p = f / z

    def mean_sd(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p_ = p.reshape(p.shape + (1,) * (mean.ndim - 1))
        e = (p_ * mean).sum(0)
        v = (p_ * (var + mean**2)).sum(0) - e**2
        return e, np.sqrt(v)

    tau_mean, tau_sd = mean_sd(g["tau"], np.zeros_like(g["tau"]))
    mu_mean, mu_sd = mean_sd(g["mu_mean"], g["mu_var"])
    theta_mean, theta_sd = mean_sd(g["theta_mean"], g["theta_var"])
    return {
        "log_evidence": float(m + math.log(z)),
        "mu_mean": float(mu_mean),
        "mu_sd": float(mu_sd),
        "tau_mean": float(tau_mean),
        "tau_sd": float(tau_sd),
        "theta_mean": theta_mean,
        "theta_sd": theta_sd,
    }


def _sample_piecewise_linear(x: np.ndarray, f: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws from the density proportional to the linear interpolant of ``f`` on the grid ``x``."""
    h = np.diff(x)
    f0, f1 = f[:-1], f[1:]
    cdf = np.concatenate([[0.0], np.cumsum(h * (f0 + f1) / 2)])
    target = r * cdf[-1]
    i = np.clip(np.searchsorted(cdf, target, side="right") - 1, 0, len(h) - 1)
    rem = np.clip(target - cdf[i], 0.0, None)  # mass to cover inside cell i
    # solve f0 t + (f1 - f0) t^2 / (2 h) = rem for t in [0, h], in a form stable when f1 == f0
    disc = np.sqrt(np.maximum(f0[i] ** 2 + 2.0 * (f1[i] - f0[i]) * rem / h[i], 0.0))
    t = np.where(rem > 0, 2.0 * rem / np.maximum(f0[i] + disc, np.finfo(float).tiny), 0.0)
    return x[i] + np.clip(t, 0.0, h[i])


def eight_schools_exact_draws(num_draws: int, seed: int = 0, num_points: int = 20001):
    r"""Independent exact posterior draws for eight schools, as a single-chain reference posterior.

    :math:`\log\tau` is drawn by inverse CDF from the linear interpolant of its density on the quadrature grid of
    :func:`eight_schools_tau_grid` (so draws are continuous), then :math:`\mu \mid \tau, y` and
    :math:`\theta \mid \mu, \tau, y` from their Gaussian conditionals, and
    :math:`\theta_t = (\theta - \mu) / \tau`. Uses its own NumPy generator: global RNG state is untouched.

    :param int num_draws: number of draws.
    :param int seed: seed of the NumPy generator.
    :param int num_points: quadrature grid size.
    :return: ``InferenceData`` whose ``posterior`` has ``mu``, ``tau`` of shape ``(1, num_draws)`` and ``theta``,
        ``theta_t`` of shape ``(1, num_draws, 8)`` with dim ``school``.
    """
    rng = np.random.default_rng(seed)
    g = eight_schools_tau_grid(num_points)
    f = np.exp(g["log_joint"] - g["log_joint"].max())
    log_tau = _sample_piecewise_linear(g["log_tau"], f, rng.uniform(size=num_draws))
    tau = np.exp(log_tau)
    s2 = _SIGMA**2 + tau[:, None] ** 2
    w = 1.0 / s2
    mu_prec = 1.0 / MU_SCALE**2 + w.sum(-1)
    mu = (w * _Y).sum(-1) / mu_prec + rng.standard_normal(num_draws) / np.sqrt(mu_prec)
    shrink = _SIGMA**2 / s2
    theta_mean = (1.0 - shrink) * _Y + shrink * mu[:, None]
    theta_sd = np.sqrt(_SIGMA**2 * (1.0 - shrink))
    eps = rng.standard_normal((num_draws, len(_Y)))
    theta = theta_mean + theta_sd * eps
    # (theta - mu) / tau without cancellation when tau is tiny: theta - mu = (1 - B)(y - mu) + sd * eps
    sd_over_tau = _SIGMA / np.sqrt(s2)  # sigma tau / sqrt(s2) / tau
    theta_t = tau[:, None] / s2 * (_Y - mu[:, None]) + sd_over_tau * eps
    posterior = {"mu": mu[None], "tau": tau[None], "theta": theta[None], "theta_t": theta_t[None]}
    return diagnostics.posterior_data(posterior, coords=EIGHT_SCHOOLS_COORDS, dims=EIGHT_SCHOOLS_DIMS)


# ---------------------------------------------------------------------------------------------------------------
# Neal's funnel
# ---------------------------------------------------------------------------------------------------------------

#: ArviZ dims of the funnel: ``x`` is one site of shape ``(dim - 1,)``.
FUNNEL_DIMS = {"x": ["coordinate"]}
FUNNEL_V_SCALE = 3.0


def funnel_coords(dim: int = 10) -> dict[str, list[int]]:
    """ArviZ coords of :func:`funnel`: ``coordinate`` runs over ``1, ..., dim - 1`` (the :math:`x_i`).

    :param int dim: total dimension ``D`` (one ``v`` plus ``D - 1`` coordinates of ``x``).
    """
    return {"coordinate": list(range(1, dim))}


def funnel(dim: int = 10) -> None:
    r"""Neal's funnel in ``dim`` dimensions (no observations: the posterior is the prior).

    .. math::
        v \sim N(0, 3^2), \quad x_i \mid v \sim N(0, e^{v}) \quad (i = 1, \dots, D - 1).

    Sites ``v`` (scalar) and ``x`` (one site of event shape ``(D - 1,)``, via ``.to_event(1)`` rather than a
    plate): the ``x_i`` are one block of a single latent vector, which ``AutoNormalizingFlow`` flattens anyway, and
    the ArviZ dim is just :data:`FUNNEL_DIMS` with no plate bookkeeping.

    :param int dim: total dimension ``D >= 2``.
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    v = pyro.sample("v", dist.Normal(0.0, FUNNEL_V_SCALE))
    scale = torch.exp(v / 2).unsqueeze(-1)  # trailing event dim, so the model also runs vectorised over draws
    pyro.sample("x", dist.Normal(torch.zeros(dim - 1), scale).to_event(1))


def funnel_exact_moments(dim: int = 10) -> dict[str, float | np.ndarray]:
    r"""Exact moments of the funnel.

    :math:`E[v] = 0`, :math:`\mathrm{sd}(v) = 3`, :math:`E[x_i] = 0`,
    :math:`\mathrm{sd}(x_i) = \sqrt{E[e^v]} = e^{9/4}`. Because :math:`x_i` is extremely heavy-tailed
    (:math:`E[x^4] = 3 e^{18}`), also :math:`\log|x_i| = v/2 + \log|z|` with :math:`z \sim N(0, 1)`:
    mean :math:`-(\gamma + \log 2)/2` and variance :math:`9/4 + \pi^2/8`.

    :param int dim: total dimension ``D``.
    :return: dict with ``v_mean``, ``v_sd`` (floats), ``x_mean``, ``x_sd``, ``log_abs_x_mean``,
        ``log_abs_x_sd`` (arrays of shape ``(D - 1,)``).
    """
    n = dim - 1
    euler_gamma = 0.5772156649015329
    return {
        "v_mean": 0.0,
        "v_sd": FUNNEL_V_SCALE,
        "x_mean": np.zeros(n),
        "x_sd": np.full(n, math.exp(FUNNEL_V_SCALE**2 / 4)),
        "log_abs_x_mean": np.full(n, -(euler_gamma + math.log(2.0)) / 2),
        "log_abs_x_sd": np.full(n, math.sqrt(FUNNEL_V_SCALE**2 / 4 + math.pi**2 / 8)),
    }


def funnel_exact_draws(num_draws: int, dim: int = 10, seed: int = 0):
    """Independent exact draws from the funnel, as a single-chain reference posterior.

    Uses its own NumPy generator: global RNG state is untouched.

    :param int num_draws: number of draws.
    :param int dim: total dimension ``D``.
    :param int seed: seed of the NumPy generator.
    :return: ``InferenceData`` whose ``posterior`` has ``v`` of shape ``(1, num_draws)`` and ``x`` of shape
        ``(1, num_draws, D - 1)`` with dim ``coordinate``.
    """
    rng = np.random.default_rng(seed)
    v = FUNNEL_V_SCALE * rng.standard_normal(num_draws)
    x = np.exp(v / 2)[:, None] * rng.standard_normal((num_draws, dim - 1))
    return diagnostics.posterior_data({"v": v[None], "x": x[None]}, coords=funnel_coords(dim), dims=FUNNEL_DIMS)


# ---------------------------------------------------------------------------------------------------------------
# Bayesian logistic regression
# ---------------------------------------------------------------------------------------------------------------

LOGISTIC_DIMS = {"w": ["feature"], "obs": ["obs_id"]}


def load_breast_cancer_data() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Scikit-learn's bundled breast-cancer data (569 tumours, 30 features), features standardised.

    :return: ``(X, y, feature_names)``: float32 features of shape ``(569, 30)`` with zero mean and unit variance
        per column, float32 labels of shape ``(569,)`` (1 = benign), and the 30 feature names.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    X = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)
    return X, y, [str(name) for name in data.feature_names]


def logistic_regression_coords(X: torch.Tensor, feature_names: list[str] | None = None) -> dict[str, list]:
    """ArviZ coords of :func:`logistic_regression` for the design matrix ``X``.

    :param torch.Tensor X: design matrix of shape ``(N, P)``.
    :param list feature_names: ``P`` names; default ``0, ..., P - 1``.
    """
    names = list(feature_names) if feature_names is not None else list(range(X.shape[-1]))
    return {"feature": names, "obs_id": list(range(X.shape[0]))}


def logistic_regression(X: torch.Tensor, y: torch.Tensor | None = None) -> None:
    r"""Bayesian logistic regression.

    .. math::
        w_k \sim N(0, 1), \quad b \sim N(0, 5^2), \quad
        y_n \sim \mathrm{Bernoulli}(\mathrm{logit}^{-1}(x_n^\top w + b)).

    Sites ``w`` (event shape ``(P,)``), ``b`` (scalar) and ``obs`` (shape ``(N,)``, in ``pyro.plate("data", N)``).

    :param torch.Tensor X: standardised design matrix of shape ``(N, P)``.
    :param torch.Tensor y: labels in ``{0, 1}`` of shape ``(N,)``; ``None`` samples ``obs``.
    """
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[-1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(X.new_zeros(()), 5.0))
    # (X * w).sum(-1), not X @ w: with vectorised draws w has batch shape (S, 1), whose trailing 1 is the data
    # plate's dim, and the product broadcasts it to (S, N) as the plate expects (X @ w.T would give (S, 1, N)).
    logits = (X * w).sum(-1) + b
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)


def logistic_regression_reference(
    num_samples: int = 1000, warmup: int = 500, seed: int = 0, num_threads: int | None = 1
):
    """NUTS reference posterior for :func:`logistic_regression` on :func:`load_breast_cancer_data`.

    One chain of Pyro's NUTS with a dense mass matrix (the standardised features are strongly correlated, e.g.
    radius, perimeter and area, so a diagonal one needs about 3x more leapfrog steps) and a JIT-compiled potential.
    Calls ``pyro.set_rng_seed(seed)`` first. Takes one to two minutes on one CPU core with the defaults. The
    tensors are small (569 x 30), so extra intra-op threads only add synchronisation: on a busy 2-core machine two
    threads made the run 5x slower than one. ``torch``'s thread count is restored afterwards.

    :param int num_samples: posterior draws kept.
    :param int warmup: warm-up (adaptation) steps.
    :param int seed: seed passed to ``pyro.set_rng_seed``.
    :param int num_threads: ``torch`` intra-op threads during the run; ``None`` leaves the setting alone.
    :return: ``InferenceData`` with only the ``posterior`` group: ``w`` of shape ``(1, num_samples, 30)`` with dim
        ``feature``, and ``b`` of shape ``(1, num_samples)``.
    """
    from pyro.infer import MCMC, NUTS

    X, y, names = load_breast_cancer_data()
    pyro.set_rng_seed(seed)
    kernel = NUTS(logistic_regression, full_mass=True, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1, disable_progbar=True)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        mcmc.run(X, y)
    finally:
        torch.set_num_threads(threads)
    draws = mcmc.get_samples(group_by_chain=True)  # (chain, draw, ...); ArviZ 1.x has no from_pyro
    return diagnostics.posterior_data(draws, coords=logistic_regression_coords(X, names), dims=LOGISTIC_DIMS)


# ---------------------------------------------------------------------------------------------------------------
# Posteriors of other kinds, each with an exact log evidence (for KL(q||p) = log Z - ELBO)
# ---------------------------------------------------------------------------------------------------------------

#: Observations of :func:`horseshoe_means`: three near zero, three clear signals.
HORSESHOE_Y = torch.tensor([0.2, -0.5, 1.0, 3.0, -4.5, 6.0])


def horseshoe_means(y: torch.Tensor = HORSESHOE_Y) -> None:
    r"""Normal means under a horseshoe prior (heavy-tailed shrinkage; Carvalho, Polson & Scott 2010), global scale 1:

    .. math::
        \lambda_i \sim \mathrm{HalfCauchy}(1), \quad \theta_i \mid \lambda_i \sim N(0, \lambda_i^2), \quad
        y_i \mid \theta_i \sim N(\theta_i, 1).

    The posterior of each :math:`(\log\lambda_i, \theta_i)` is a funnel with a Cauchy tail; the latent has
    ``2 n`` dimensions. :func:`horseshoe_log_evidence` gives :math:`\log p(y)`.

    :param torch.Tensor y: the ``n`` observations.
    """
    with pyro.plate("i", len(y)):
        lam = pyro.sample("lam", dist.HalfCauchy(1.0))
        theta = pyro.sample("theta", dist.Normal(0.0, lam))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def horseshoe_log_evidence(y: torch.Tensor = HORSESHOE_Y, num_points: int = 200_001) -> float:
    r""":math:`\log p(y)` of :func:`horseshoe_means`: a sum over :math:`i` of 1-D integrals over :math:`\lambda`
    (:math:`\theta` integrates out: :math:`y_i \mid \lambda_i \sim N(0, 1 + \lambda_i^2)`), by the trapezoid rule
    in :math:`u = \arctan\lambda`, where the half-Cauchy is uniform on :math:`(0, \pi/2)`.

    :param torch.Tensor y: the observations.
    :param int num_points: quadrature points.
    """
    u = np.linspace(0.0, math.pi / 2, num_points)[1:-1]
    var = 1.0 / np.cos(u) ** 2  # 1 + tan(u)^2
    total = 0.0
    for yi in np.asarray(y, dtype=np.float64):
        log_f = -0.5 * (math.log(2 * math.pi) + np.log(var) + yi**2 / var)
        total += _log_integral(log_f, u) + math.log(2 / math.pi)
    return total


def local_level_data(steps: int = 12, seed: int = 3) -> torch.Tensor:
    """Observations for :func:`local_level`: a random walk with steps of scale 0.4 seen through noise of scale 0.5,
    ``steps`` long, drawn with ``torch.Generator().manual_seed(seed)`` (the defaults give :data:`LOCAL_LEVEL_Y`).

    :param int steps: the series length ``T`` (the latent then has ``T + 1`` dimensions).
    :param int seed: the generator's seed.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.cumsum(0.4 * torch.randn(steps, generator=g), 0)
    return x + 0.5 * torch.randn(steps, generator=g)


#: Observations of :func:`local_level` (a random walk seen through noise, 12 steps).
LOCAL_LEVEL_Y = local_level_data()
LOCAL_LEVEL_NOISE = 0.5


def local_level(y: torch.Tensor = LOCAL_LEVEL_Y) -> None:
    r"""A local-level time series with an unknown process scale (a state-space latent, centred):

    .. math::
        s \sim \mathrm{HalfNormal}(1), \quad x_1 \sim N(0, s^2), \ x_t \mid x_{t-1} \sim N(x_{t-1}, s^2), \quad
        y_t \mid x_t \sim N(x_t, 0.5^2).

    The latent is :math:`(s, x_1, \dots, x_T)`; small :math:`s` pinches the path together (a funnel along a
    chain). :func:`local_level_log_evidence` gives :math:`\log p(y)`.

    :param torch.Tensor y: the ``T`` observations.
    """
    s = pyro.sample("s", dist.HalfNormal(1.0))
    lower = torch.tril(torch.ones(len(y), len(y)))  # x = L @ increments: the path's covariance is s^2 L L^T
    x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(len(y)), scale_tril=s[..., None, None] * lower))
    pyro.sample("y", dist.Normal(x, LOCAL_LEVEL_NOISE).to_event(1), obs=y)


def local_level_log_evidence(y: torch.Tensor = LOCAL_LEVEL_Y, num_points: int = 20_001, s_max: float = 8.0) -> float:
    r""":math:`\log p(y)` of :func:`local_level`: the path integrates out exactly,
    :math:`y \mid s \sim N(0, s^2 L L^\top + 0.5^2 I)` with :math:`L` the lower-triangular matrix of ones, and the
    trapezoid rule over :math:`s \in (0, s_{max})` does the rest.

    :param torch.Tensor y: the observations.
    :param int num_points: quadrature points.
    :param float s_max: the upper end of the grid (the half-normal's mass beyond 8 is below 1e-15).
    """
    y = torch.as_tensor(y, dtype=torch.float64)
    steps = len(y)
    lower = torch.tril(torch.ones(steps, steps, dtype=torch.float64))
    s = torch.linspace(0.0, s_max, num_points, dtype=torch.float64)
    cov = s[:, None, None] ** 2 * (lower @ lower.T) + LOCAL_LEVEL_NOISE**2 * torch.eye(steps, dtype=torch.float64)
    log_lik = torch.distributions.MultivariateNormal(torch.zeros(steps, dtype=torch.float64), cov).log_prob(y)
    log_prior = torch.distributions.HalfNormal(torch.tensor(1.0, dtype=torch.float64)).log_prob(s)
    return _log_integral((log_lik + log_prior).numpy(), s.numpy())


def trend_data(num: int = 30, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Data for :func:`trend_regression`: ``num`` yearly readings ``y = 1000 + 3 x + N(0, 2²)`` at ``x = 0, ..., 29``
    (years since the first), drawn with ``torch.Generator().manual_seed(seed)``.

    :param int num: the number of readings.
    :param int seed: the generator's seed.
    """
    x = torch.arange(float(num))
    return x, 1000.0 + 3.0 * x + 2.0 * torch.randn(num, generator=torch.Generator().manual_seed(seed))


#: Covariate and readings of :func:`trend_regression`.
TREND_X, TREND_Y = trend_data()


def trend_regression(x: torch.Tensor = TREND_X, y: torch.Tensor = TREND_Y) -> None:
    r"""A linear trend on data as recorded (not standardised): a posterior far from the origin, in its own units,

    .. math::
        a \sim N(0, 1000^2), \ b \sim N(0, 10^2), \ \sigma \sim \mathrm{HalfNormal}(10), \quad
        y_i \mid a, b, \sigma \sim N(a + b x_i, \sigma^2).

    The intercept's posterior sits near 1000 with a standard deviation below 1: a guide that starts at the
    origin of the unconstrained space and moves by about its learning rate per step does not get there in a few
    thousand steps. :func:`trend_regression_log_evidence` gives :math:`\log p(y)`.

    :param torch.Tensor x: the covariate.
    :param torch.Tensor y: the readings.
    """
    a = pyro.sample("a", dist.Normal(0.0, 1000.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)


def trend_regression_log_evidence(
    x: torch.Tensor = TREND_X, y: torch.Tensor = TREND_Y, num_points: int = 20_001, s_max: float = 80.0
) -> float:
    r""":math:`\log p(y)` of :func:`trend_regression`: the coefficients integrate out exactly,
    :math:`y \mid \sigma \sim N(0, X S_0 X^\top + \sigma^2 I)` with :math:`X = [1, x]` and
    :math:`S_0 = \mathrm{diag}(1000^2, 10^2)`, and the trapezoid rule over :math:`\sigma \in (0, s_{max})` does
    the rest.

    :param torch.Tensor x: the covariate.
    :param torch.Tensor y: the readings.
    :param int num_points: quadrature points.
    :param float s_max: the upper end of the grid (the half-normal's mass beyond 80 is below 1e-15).
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], -1)
    prior_cov = design @ torch.diag(torch.tensor([1000.0**2, 10.0**2], dtype=torch.float64)) @ design.T
    s = torch.linspace(0.0, s_max, num_points, dtype=torch.float64)[1:]  # sigma = 0: the density is 0 there
    cov = prior_cov + s[:, None, None] ** 2 * torch.eye(len(y), dtype=torch.float64)
    log_lik = torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=torch.float64), cov).log_prob(y)
    log_prior = torch.distributions.HalfNormal(torch.tensor(10.0, dtype=torch.float64)).log_prob(s)
    return _log_integral((log_lik + log_prior).numpy(), s.numpy())


def bimodal_product(y: float = 2.0) -> None:
    r"""A two-mode posterior: the product of two coordinates is observed,

    .. math:: z \sim N(0, 2^2 I_2), \quad y \mid z \sim N(z_1 z_2, 0.5^2),

    so the mass lies along both branches of the hyperbola :math:`z_1 z_2 = y`, in two symmetric modes (quadrants
    one and three for :math:`y > 0`). A guide that finds one mode has KL at least :math:`\log 2`.
    :func:`bimodal_log_evidence` gives :math:`\log p(y)`.

    :param float y: the observed product.
    """
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    pyro.sample("y", dist.Normal(z[..., 0] * z[..., 1], 0.5), obs=torch.tensor(float(y)))


def bimodal_log_evidence(y: float = 2.0, num_points: int = 400_001, half_width: float = 20.0) -> float:
    r""":math:`\log p(y)` of :func:`bimodal_product`: given :math:`z_1`, :math:`y \sim N(0, 4 z_1^2 + 0.25)`, and
    the trapezoid rule over :math:`z_1` does the rest.

    :param float y: the observed product.
    :param int num_points: quadrature points.
    :param float half_width: the grid is :math:`[-w, w]` (10 prior standard deviations by default).
    """
    z1 = np.linspace(-half_width, half_width, num_points)
    var = 4.0 * z1**2 + 0.25
    log_f = -0.5 * (math.log(2 * math.pi * 4.0) + z1**2 / 4.0) - 0.5 * (
        math.log(2 * math.pi) + np.log(var) + y**2 / var
    )
    return _log_integral(log_f, z1)
