r"""Two-dimensional toy densities with exact ``log_prob`` and exact sampling.

Every density is defined exactly (its docstring states the formula), so a trained flow can be scored by
:math:`\mathrm{KL}(p \,\|\, q) = \mathbb E_p[\log p - \log q]`. The curved ones (:class:`TwoMoons`,
:class:`Rings`, :class:`Pinwheel`) are equal-weight mixtures of many isotropic Gaussians placed densely along
their curves (:class:`IsotropicMixture`): smooth, positive everywhere, with a closed-form density and exact
sampling (pick a component, add Gaussian noise).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

__all__ = [
    "TOYS",
    "Checkerboard",
    "EightGaussians",
    "IsotropicMixture",
    "Pinwheel",
    "Rings",
    "ToyDensity",
    "TwoMoons",
    "get_toy",
]


class ToyDensity:
    r"""A 2-D density with exact :meth:`~ToyDensity.sample` and :meth:`~ToyDensity.log_prob`.

    Subclasses set ``name`` and ``bounds`` (a box ``((x_min, x_max), (y_min, y_max))`` outside which the
    density is negligible, below ``1e-20`` of its peak: for plots and quadrature) and implement both methods.

    Example: scoring a model by :math:`\mathrm{KL}(p \,\|\, q)` against a toy's exact density::

        >>> import torch
        >>> from pyroflows.data import get_toy
        >>> toy = get_toy("two_moons")
        >>> x = toy.sample(1000, torch.Generator().manual_seed(0))
        >>> q = torch.distributions.Independent(torch.distributions.Normal(x.mean(0), x.std(0)), 1)  # a Gaussian fit
        >>> kl = (toy.log_prob(x) - q.log_prob(x)).mean()
        >>> bool(kl > 0)
        True
    """

    name: str = "toy"
    bounds: tuple[tuple[float, float], tuple[float, float]] = ((-4.0, 4.0), (-4.0, 4.0))

    def __init_subclass__(cls, **kwargs):
        """Every subclass's ``sample`` checks ``n`` first (one place, not one per density)."""
        super().__init_subclass__(**kwargs)
        draw = cls.__dict__.get("sample")
        if draw is None:
            return

        @functools.wraps(draw)
        def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
            if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{type(self).__name__}.sample: n must be an int >= 0, got {n!r}")
            return draw(self, int(n), generator)

        cls.sample = sample

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples, float32 of shape ``(n, 2)``, drawn with torch's RNG (or ``generator``)."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of points ``x`` of shape ``(..., 2)``: shape ``(...)``, computed in float64 and
        returned in ``x``'s dtype."""
        raise NotImplementedError

    def entropy(self, n: int = 1_000_000, generator: torch.Generator | None = None, chunk: int = 250_000):
        r"""Differential entropy :math:`H = -\mathbb E \log p(X)` in nats: the Monte Carlo mean over ``n`` samples
        (float64 accumulation), or the exact value where a subclass knows it.

        :returns: ``(estimate, standard error)`` (standard error 0 when exact).
        """
        total, total_sq, done = 0.0, 0.0, 0
        while done < n:
            m = min(chunk, n - done)
            lp = self.log_prob(self.sample(m, generator).double())
            total += float(lp.sum())
            total_sq += float((lp * lp).sum())
            done += m
        mean = total / n
        var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
        return -mean, math.sqrt(var / n)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != 2:
            raise ValueError(f"{type(self).__name__}.log_prob expects points of shape (..., 2), got {tuple(x.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Checkerboard(ToyDensity):
    r"""Uniform on the 8 unit squares :math:`[i, i+1] \times [j, j+1]`, :math:`i, j \in \{-2, -1, 0, 1\}`,
    :math:`i + j` even, of a 4x4 board on :math:`[-2, 2]^2`: density :math:`1/8` on them (closed squares), 0
    elsewhere; entropy exactly :math:`\log 8`.

    Example::

        >>> toy = Checkerboard()
        >>> toy.log_prob(torch.tensor([[0.5, 0.5], [0.5, -0.5]])).exp().tolist()
        [0.125, 0.0]
    """

    name = "checkerboard"
    bounds = ((-2.0, 2.0), (-2.0, 2.0))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples: a uniform column ``x1``, then a uniform one of the two filled cells in it."""
        x1 = torch.rand(n, generator=generator, dtype=torch.float32) * 4.0 - 2.0
        col = torch.floor(x1)
        # the filled rows of column i are j with (i + j) even: j in {-2, 0} for even i, {-1, 1} for odd i
        pick = torch.randint(0, 2, (n,), generator=generator).to(torch.float32)
        row = 2.0 * pick - 2.0 + torch.remainder(col, 2.0)
        x2 = row + torch.rand(n, generator=generator, dtype=torch.float32)
        return torch.stack([x1, x2], dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``-log 8`` on the filled (closed) squares, ``-inf`` elsewhere."""
        self._check(x)
        xd = x.double()
        # the cells whose closure holds each coordinate: floor(x) and, on a grid line, also x - 1
        hi, lo = torch.floor(xd), torch.ceil(xd) - 1.0
        inside = torch.zeros(xd.shape[:-1], dtype=torch.bool, device=x.device)
        for i in (lo[..., 0], hi[..., 0]):
            for j in (lo[..., 1], hi[..., 1]):
                on_board = (i >= -2) & (i <= 1) & (j >= -2) & (j <= 1)
                inside |= on_board & (torch.remainder(i + j, 2.0) == 0)
        out = torch.full(inside.shape, -math.inf, dtype=torch.float64, device=x.device)
        return out.masked_fill(inside, -math.log(8.0)).to(x.dtype)

    def entropy(self, n: int = 0, generator: torch.Generator | None = None, chunk: int = 0):
        """Exact: ``(log 8, 0.0)``; the arguments are ignored."""
        return math.log(8.0), 0.0


class IsotropicMixture(ToyDensity):
    r"""Equal-weight mixture :math:`p(x) = \frac1K \sum_k \mathcal N(x \mid \mu_k, \sigma^2 I_2)`.

    :param means: component means, shape ``(K, 2)``.
    :param float sigma: the common standard deviation.
    :param str name: a name for tables and plots.

    Example::

        >>> toy = IsotropicMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), sigma=0.5)
        >>> toy.sample(3).shape, toy.log_prob(torch.zeros(4, 2)).shape
        (torch.Size([3, 2]), torch.Size([4]))
    """

    name = "mixture"

    def __init__(self, means, sigma: float, name: str | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[1] != 2 or len(means) == 0:
            raise ValueError(f"IsotropicMixture: means must have shape (K, 2), got {tuple(means.shape)}")
        if not sigma > 0:
            raise ValueError(f"IsotropicMixture: sigma must be > 0, got {sigma}")
        self.means = means
        self.sigma = float(sigma)
        if name is not None:
            self.name = name
        pad = 10.0 * self.sigma  # the density there is below exp(-50) of its peak
        low, high = (means.min(0).values - pad).tolist(), (means.max(0).values + pad).tolist()
        self.bounds = ((low[0], high[0]), (low[1], high[1]))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples (float32): a uniform component, plus ``sigma`` times standard normal noise."""
        k = torch.randint(0, len(self.means), (n,), generator=generator)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.sigma * eps).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density (a log-sum-exp over the components in float64, returned in ``x``'s dtype)."""
        self._check(x)
        means = self.means.to(x.device)
        flat = x.double().reshape(-1, 2)
        log_norm = -math.log(len(means)) - math.log(2.0 * math.pi * self.sigma**2)
        rows = max(1, 2**16 // len(means))  # (rows, K) blocks of 512 KiB: cache-sized, no large temporaries
        parts = []
        for part in flat.split(rows):
            dx, dy = part[:, :1] - means[:, 0], part[:, 1:] - means[:, 1]
            parts.append(torch.logsumexp((dx * dx + dy * dy) / (-2.0 * self.sigma**2), dim=-1))
        out = torch.cat(parts) if parts else flat.new_zeros(0)
        return (out + log_norm).reshape(x.shape[:-1]).to(x.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={len(self.means)}, sigma={self.sigma:g})"


class EightGaussians(IsotropicMixture):
    r"""Equal mixture of :math:`\mathcal N(\mu_k, \sigma^2 I)`, :math:`\mu_k = 2\sqrt 2\,(\cos k\pi/4, \sin k\pi/4)`,
    :math:`k = 0..7`, :math:`\sigma = \sqrt 2 / 4` (FFJORD's toy, means at radius 4 and std 0.5, divided by
    :math:`\sqrt 2`). Its entropy has no closed form: :meth:`~ToyDensity.entropy` is a Monte Carlo estimate.

    Example::

        >>> toy = EightGaussians()
        >>> toy.sample(5, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])
    """

    name = "eight_gaussians"
    radius = 2.0 * math.sqrt(2.0)

    def __init__(self):
        angles = torch.arange(8, dtype=torch.float64) * math.pi / 4.0
        super().__init__(self.radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1), math.sqrt(2) / 4)


class TwoMoons(IsotropicMixture):
    r"""Two interleaved half-circles (scikit-learn's ``make_moons`` shape, centred and scaled by ``radius``)
    blurred by a Gaussian: the equal mixture of :math:`\mathcal N(\mu, \sigma^2 I)` over the :math:`2m` means

    .. math::
        \mu^{\mathrm{up}}_j = r\,(\cos t_j - \tfrac12,\ \sin t_j - \tfrac14), \qquad
        \mu^{\mathrm{down}}_j = r\,(\tfrac12 - \cos t_j,\ \tfrac14 - \sin t_j), \qquad
        t_j = \pi j / (m - 1),\ j = 0..m-1,

    with :math:`r` = ``radius`` = 2, :math:`\sigma` = ``sigma`` = 0.2, :math:`m` = ``n_per_arc`` = 64 (means
    about 0.1 apart, so the density is smooth along the arcs).

    :param float radius: arc radius.
    :param float sigma: standard deviation of every component.
    :param int n_per_arc: components per arc.

    Example::

        >>> toy = TwoMoons()
        >>> len(toy.means), toy.log_prob(toy.sample(4)).shape
        (128, torch.Size([4]))
    """

    name = "two_moons"

    def __init__(self, radius: float = 2.0, sigma: float = 0.2, n_per_arc: int = 64):
        if n_per_arc < 2:
            raise ValueError(f"TwoMoons: n_per_arc must be >= 2, got {n_per_arc}")
        t = torch.linspace(0.0, math.pi, n_per_arc, dtype=torch.float64)
        up = torch.stack([torch.cos(t) - 0.5, torch.sin(t) - 0.25], dim=-1)
        super().__init__(radius * torch.cat([up, -up]), sigma)


class Rings(IsotropicMixture):
    r"""Concentric circles blurred by a Gaussian: the equal mixture of :math:`\mathcal N(\mu, \sigma^2 I)` over
    the means :math:`\mu_{r,j} = r\,(\cos(2\pi j / n_r), \sin(2\pi j / n_r))`, :math:`j = 0..n_r - 1`, for each
    radius :math:`r` in ``radii`` = (1, 2, 3), with :math:`n_r = \mathrm{round}(\rho\, r)` means on circle
    :math:`r` (``per_unit_radius`` :math:`\rho` = 40, so each circle carries mass proportional to its length and
    neighbouring means are about :math:`1.6\sigma` apart) and :math:`\sigma` = ``sigma`` = 0.1. Unlike a density
    written radially (a radius mixture divided by :math:`2\pi r`), it is smooth and finite at the origin.

    :param radii: circle radii.
    :param float sigma: standard deviation of every component.
    :param int per_unit_radius: components per unit of radius.

    Example::

        >>> toy = Rings()
        >>> len(toy.means), toy.log_prob(toy.sample(4)).shape
        (240, torch.Size([4]))
    """

    name = "rings"

    def __init__(self, radii=(1.0, 2.0, 3.0), sigma: float = 0.1, per_unit_radius: int = 40):
        means = []
        for r in radii:
            n_r = max(1, round(per_unit_radius * r))
            angle = 2.0 * math.pi * torch.arange(n_r, dtype=torch.float64) / n_r
            means.append(r * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1))
        super().__init__(torch.cat(means), sigma)


class Pinwheel(IsotropicMixture):
    r"""Spiral arms blurred by a Gaussian: the equal mixture of :math:`\mathcal N(\mu, \sigma^2 I)` over the means

    .. math::
        \mu_{k,j} = s_j\,\big(\cos(2\pi k / A + a s_j),\ \sin(2\pi k / A + a s_j)\big), \qquad
        s_j = s_0 + (s_1 - s_0)\, j / (m - 1),

    for arms :math:`k = 0..A-1` and :math:`j = 0..m-1`: each arm turns by :math:`a` radians per unit of radius.
    Defaults: ``arms`` :math:`A` = 5, ``twist`` :math:`a` = 0.6, radii from :math:`s_0` = 0.5 to :math:`s_1` = 3,
    ``n_per_arm`` :math:`m` = 32, ``sigma`` :math:`\sigma` = 0.12 (means at most about 0.17 apart along an arm).

    :param int arms: number of arms.
    :param float twist: turn per unit radius (radians).
    :param tuple radius: ``(s_0, s_1)``, the radial extent of an arm.
    :param float sigma: standard deviation of every component.
    :param int n_per_arm: components per arm.

    Example::

        >>> toy = Pinwheel()
        >>> len(toy.means), toy.log_prob(toy.sample(4)).shape
        (160, torch.Size([4]))
    """

    name = "pinwheel"

    def __init__(self, arms: int = 5, twist: float = 0.6, radius=(0.5, 3.0), sigma: float = 0.12, n_per_arm: int = 32):
        if arms < 1 or n_per_arm < 2:
            raise ValueError(f"Pinwheel: need arms >= 1 and n_per_arm >= 2, got {arms} and {n_per_arm}")
        s = torch.linspace(float(radius[0]), float(radius[1]), n_per_arm, dtype=torch.float64)
        base = 2.0 * math.pi * torch.arange(arms, dtype=torch.float64) / arms
        angle = base[:, None] + twist * s  # (arms, n_per_arm)
        means = s[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)  # (arms, n_per_arm, 2)
        super().__init__(means.reshape(-1, 2), sigma)


#: The toy densities by name, for :func:`get_toy`.
TOYS: dict[str, type[ToyDensity]] = {cls.name: cls for cls in (Checkerboard, EightGaussians, TwoMoons, Rings, Pinwheel)}


def get_toy(name: str) -> ToyDensity:
    """A toy density by name (an instance with default parameters).

    :param str name: one of ``TOYS``: ``checkerboard``, ``eight_gaussians``, ``two_moons``, ``rings``,
        ``pinwheel`` (case-insensitive, ``-`` or ``_``).
    :raises ValueError: for an unknown name, listing the choices.

    Example::

        >>> get_toy("two-moons")
        TwoMoons(K=128, sigma=0.2)
    """
    key = str(name).lower().replace("-", "_")
    if key not in TOYS:
        raise ValueError(f"unknown toy density {name!r}; choose one of {', '.join(TOYS)}")
    return TOYS[key]()
