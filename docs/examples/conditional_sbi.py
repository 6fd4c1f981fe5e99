"""Amortised posterior estimation (docs/conditional.rst): a conditional RealNVP q(θ | x) trained on simulated pairs
of the "two moons" simulator, checked against the exact posterior on a grid for many observations.

The simulator (a standard simulation-based-inference benchmark): θ ~ U(-1, 1)², a ~ U(-π/2, π/2),
r ~ N(0.1, 0.01²), and

    x = (r cos a + 0.25 - |θ₁ + θ₂| / √2,  r sin a + (θ₂ - θ₁) / √2).

Its posterior for one x is a crescent (or two, from the |·|). Given x and θ, u = x - m(θ) is (r cos a + 0.25,
r sin a): polar coordinates around (0.25, 0) give r and a, so the likelihood is N(r; 0.1, 0.01²) / (π r) for
|a| < π/2, and the exact posterior on a grid is prior × likelihood, normalised.
"""

from __future__ import annotations

import math

import torch

import pyroflows
from pyroflows.train import evaluate, fit

LOW, HIGH = -1.0, 1.0


def shift(theta: torch.Tensor) -> torch.Tensor:
    """m(θ): the moon's position for parameters θ."""
    t1, t2 = theta[..., 0], theta[..., 1]
    return torch.stack([-(t1 + t2).abs() / math.sqrt(2), (t2 - t1) / math.sqrt(2)], dim=-1)


def simulate(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    theta = LOW + (HIGH - LOW) * torch.rand(n, 2, generator=generator)
    a = math.pi * (torch.rand(n, generator=generator) - 0.5)
    r = 0.1 + 0.01 * torch.randn(n, generator=generator)
    x = torch.stack([r * torch.cos(a) + 0.25, r * torch.sin(a)], dim=-1) + shift(theta)
    return theta, x


def log_likelihood(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log p(x | θ) (broadcasting), exact."""
    u = x - shift(theta) - torch.tensor([0.25, 0.0], dtype=theta.dtype)
    r, a = u.norm(dim=-1), torch.atan2(u[..., 1], u[..., 0])
    log_r = -0.5 * ((r - 0.1) / 0.01) ** 2 - math.log(0.01 * math.sqrt(2 * math.pi))
    inside = (a.abs() < math.pi / 2) & (r > 0)  # at r = 0 the density is 0 (N(0; 0.1, 0.01²) ≈ e⁻⁵⁰), not 0/0
    return torch.where(inside, log_r - math.log(math.pi) - r.clamp_min(1e-300).log(), torch.full_like(r, -math.inf))


def grid(box=((LOW, HIGH), (LOW, HIGH)), n: int = 200) -> torch.Tensor:
    """Cell centres of an n x n grid on ``box`` ((x0, x1), (y0, y1)), row-major from the bottom."""
    (x0, x1), (y0, y1) = box
    xs = torch.linspace(x0 + (x1 - x0) / (2 * n), x1 - (x1 - x0) / (2 * n), n, dtype=torch.float64)
    ys = torch.linspace(y0 + (y1 - y0) / (2 * n), y1 - (y1 - y0) / (2 * n), n, dtype=torch.float64)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


def posterior_window(x: torch.Tensor, n: int = 400, margin: float = 0.1):
    """The exact posterior of θ given ``x`` on a fine n x n grid over the box that holds its mass (found on a coarse
    grid of the prior's square, widened by ``margin``): ``(points, box, probabilities of the cells)``."""
    coarse = grid(n=400)
    log_p = log_likelihood(x.double(), coarse)
    inside = coarse[log_p > log_p.max() - 20]
    box = tuple(
        (max(LOW, float(inside[:, d].min()) - margin), min(HIGH, float(inside[:, d].max()) + margin)) for d in (0, 1)
    )
    points = grid(box, n)
    return points, box, torch.softmax(log_likelihood(x.double(), points), 0)  # uniform prior: ∝ the likelihood


def main(steps: int = 4000, n_train: int = 50000, n_obs: int = 50, figure: str | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    theta, x = simulate(n_train, g)
    test_theta, test_x = simulate(2000, g)

    torch.manual_seed(0)
    flow = pyroflows.realnvp(2, num_layers=8, hidden=(128, 128), context_dim=2)  # q(θ | x): context = x
    model = pyroflows.FlowDensity(flow, (2,), context_shape=(2,))
    fit(model, (theta, x), (test_theta, test_x), num_steps=steps, batch_size=256, lr=1e-3, progress=False)
    nll = evaluate(model, (test_theta, test_x))

    # Compare with the exact posterior for n_obs fresh observations: total variation distance on the grid, and the
    # rank of the true θ's density under q among q's own draws (uniform if q is calibrated: coverage).
    obs_theta, obs_x = simulate(n_obs, g)
    model.eval()
    tvs, covered = [], []
    with torch.no_grad():
        for i in range(n_obs):
            points, _, exact = posterior_window(obs_x[i])
            q = torch.softmax(model.log_prob(points.float(), obs_x[i]).double(), 0)
            tvs.append(0.5 * float((exact - q).abs().sum()))
            draws = model.sample(500, context=obs_x[i])
            level = model.log_prob(obs_theta[i], obs_x[i])
            covered.append(float((model.log_prob(draws, obs_x[i]) > level).float().mean()) < 0.9)
    result = {"test_nll": nll, "tv_mean": sum(tvs) / len(tvs), "coverage_90": sum(covered) / len(covered)}
    print(
        f"test NLL of θ given x {nll:.3f} nats; TV distance to the exact posterior {result['tv_mean']:.3f} "
        f"(mean of {n_obs} observations); 90% highest-density region covers the truth in "
        f"{result['coverage_90']:.0%} of them"
    )
    if figure is not None:
        _figure(model, figure, g)
    return result


@torch.no_grad()
def _figure(model, path: str, generator: torch.Generator) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, xs = simulate(4, generator)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    for ax, x in zip(axes, xs):
        points, box, exact = posterior_window(x, n=200)
        exact = exact.reshape(200, 200)
        q = torch.softmax(model.log_prob(points.float(), x).double(), 0).reshape(200, 200)
        extent = (*box[0], *box[1])
        ax.imshow(q.numpy(), origin="lower", extent=extent, cmap="Blues")
        levels = [float(exact.max()) * f for f in (0.05, 0.3, 0.7)]
        ax.contour(exact.numpy(), levels=levels, extent=extent, colors="red", linewidths=0.8)
        ax.set_title(f"x = ({x[0]:.2f}, {x[1]:.2f})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("q(θ | x) (blue) and the exact posterior (red contours), zoomed to the posterior", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main(figure="conditional_sbi.png")
