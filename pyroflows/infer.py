"""Variational inference with flow guides: :func:`fit` runs SVI with the checks a long run needs, configured by one
frozen :class:`SVIConfig` on the run engine of :mod:`pyroflows.run` (the one that :func:`pyroflows.train.fit`
uses too), and :func:`save_guide` / :func:`load_guide` / :func:`sync_param_store` keep a fitted guide across
processes.

Guides are Pyro's own ``AutoNormalizingFlow`` with a pyroflows builder::

    guide = AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=8))
    result = pyroflows.infer.fit(model, guide, num_steps=2000, model_args=(data,))

Every Pyro guide works with :func:`fit` (``AutoNormal``, hand-written guides, ...).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.messenger import Messenger

from ._deprecation import renamed
from .autoguide import FLAT_NAME, AutoFlow, AutoFlowMixture, parameter_like, share_with_store
from .elbo import TraceIW_ELBO, TraceRenyi_ELBO, TraceSTL_ELBO
from .run import (
    CHECKPOINT,
    SCHEDULES,
    VERSION,
    CheckpointError,
    CheckpointExistsError,
    TrainingError,
    atomic_torch_save,
    check_choice,
    check_data,
    check_finite,
    check_int,
    check_number,
    check_resume,
    check_seed,
    check_settings,
    fingerprint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    progress_bar,
    require_keys,
    resume_source,
    rng_state,
    run_lock,
    set_rng_state,
    stop_on_signals,
)
from .start import MODES as _START_MODES
from .start import gaussian_start
from .transforms import ActNorm

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "SVIConfig",
    "SVIResult",
    "TrainingError",
    "default_anneal",
    "is_reparameterised",
    "default_lr",
    "fit",
    "load_guide",
    "is_built",
    "loss_relapse",
    "max_plate_nesting",
    "plate_nesting",
    "replayed_traces",
    "save_guide",
    "sync_param_store",
]

#: The ELBO gradient estimators of :func:`fit`: sticking the landing (the default), Pyro's reparameterised
#: ``Trace_ELBO``, the importance-weighted bound with the doubly reparameterised gradient, or the Rényi bound of
#: order ``alpha`` between the two with the same gradient.
ESTIMATORS = ("stl", "reparam", "iw", "renyi")
#: fit's default peak learning rate up to :data:`LR_PARTICLES` particles; beyond, it falls as ``particles ** (-1/3)``
DEFAULT_LR = 3e-3
LR_PARTICLES = 8
#: torch's messages for a distribution argument outside its constraint or a value outside its support
_DRAW_ERRORS = ("to satisfy the constraint", "to be within the support")
_SVI_FORMAT = "pyroflows-svi-1"
_GUIDE_FORMAT = "pyroflows-guide-1"
_RESUME_HINT = "resume=True (or 'auto')"
#: fit's ``start`` values: pyroflows.start.gaussian_start's modes, or the guide as built
START_CHOICES = (*_START_MODES, "identity")


@dataclass
class SVIResult:
    """What :func:`fit` returns.

    :ivar numpy.ndarray losses: the loss (negative ELBO estimate) at every step, shape ``(num_steps,)``;
        ``losses[i]`` is the loss of step ``i + 1``. With ``estimator="iw"`` or ``"renyi"`` it is minus the
        multi-sample bound's estimate instead (``objective`` names it).
    :ivar guide: the fitted guide (the same object that was passed in).
    :ivar float seconds: wall time of the optimisation.
    :ivar numpy.ndarray lr: the learning rate used at every step, shape ``(num_steps,)``.
    :ivar int step: number of optimiser steps taken in total (including those before a resume).
    :ivar out: the run directory (``None`` when none was given).
    :ivar checkpoint: the checkpoint file written (``None`` when none was).
    :ivar list skipped: the steps (counted from 1) whose non-finite loss or gradient was skipped (no update).
    :ivar khat: the PSIS k̂ of the fitted guide (:func:`pyroflows.diagnostics.psis_khat`, 4000 draws) when
        :func:`fit` reported it (``report=True``), else ``None``; ``nan`` when it could not be computed.
    :ivar str objective: what ``losses`` estimate minus: ``"ELBO"``, ``"IW bound"`` or ``"Rényi bound (alpha=A)"``
        (with ``" mixed with the ELBO (weight W)"`` for a :class:`~pyroflows.elbo.TraceRenyi_ELBO` mixture).
    :ivar draws_elbo: with ``report=True``, the ELBO estimated from the same fresh draws as ``khat``, else
        ``None``. After a multi-sample bound it gives KL(q‖p) ≥ bound − ELBO (the bound is at
        most log Z): a guide that spreads its mass where the posterior has little shows as a large gap.
    :ivar start: what ``fit(start=...)`` did before the first step, :func:`pyroflows.start.gaussian_start`'s
        report (``{"used": ..., "reason": ..., "bound_identity": ..., "bound_gaussian": ...}``); ``None`` on resume
        or with ``start="identity"``.
    :ivar selection: with a :class:`~pyroflows.AutoFlowMixture` guide whose ``select_after`` is set, what
        :meth:`~pyroflows.AutoFlowMixture.select_components` did (its report, with the ``"step"`` after which it ran);
        else ``None``.
    :ivar final_weights: with an :class:`~pyroflows.AutoFlowMixture` guide that learns its weights, what
        :meth:`~pyroflows.AutoFlowMixture.fit_weights` did after the last step (the weights before and after, and
        the ELBO with each); else ``None``.
    :ivar relapse: ``None``, or, when the loss ended well above its best (:func:`loss_relapse`: the optimisation
        became unstable, and :func:`fit` warned), ``{"final": ..., "best": ..., "best_steps": (a, b)}``.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.infer import fit
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> pyro.clear_param_store()
        >>> guide = AutoNormal(model)
        >>> result = fit(model, guide, num_steps=50, lr=0.05, progress=False, seed=0)
        >>> result.losses.shape, result.lr.shape, result.guide is guide, result.step
        ((50,), (50,), True, 50)
        >>> round(float(result.lr[0]), 4), round(float(result.lr[-1]), 4)  # decays to lr * final_lr_factor
        (0.05, 0.0025)
        >>> bool((result.elbo == -result.losses).all()), type(result.final_elbo(window=10))
        (True, <class 'float'>)
    """

    losses: np.ndarray
    guide: Callable
    seconds: float
    lr: np.ndarray = field(repr=False)
    step: int = 0
    out: Path | None = None
    checkpoint: Path | None = None
    skipped: list = field(default_factory=list)
    khat: float | None = None
    relapse: dict | None = None
    objective: str = "ELBO"
    draws_elbo: float | None = None
    start: dict | None = None
    selection: dict | None = None
    final_weights: dict | None = None

    @property
    def elbo(self) -> np.ndarray:
        """The ELBO trace, ``-losses`` (the bound's, after a multi-sample ``objective``)."""
        return -self.losses

    def final_elbo(self, window: int = 100) -> float:
        """Mean ELBO estimate over the last ``window`` steps (a noisy per-step estimate smoothed).

        :param int window: how many of the last steps to average.
        """
        return float(self.elbo[-window:].mean())

    def summary(self) -> str:
        """The lines :func:`fit` prints at the end with ``report=True``: steps and time, the final ELBO, and k̂
        with its verdict (below 0.5 good, below 0.7 usable, else unreliable) and, when it is high, what to try.

        Example::

            >>> import numpy as np
            >>> result = SVIResult(np.full(10, 3.0), None, 1.5, np.full(10, 0.01), step=10, khat=0.92)
            >>> print(result.summary())  # doctest: +NORMALIZE_WHITESPACE
            fit: 10 steps in 1.5 s; ELBO -3 (mean of the last 10 steps); k̂ 0.92: unreliable, the guide misses
            posterior mass (do not trust its means or intervals).
            Try: more steps; a more expressive flow (more num_layers, or pyroflows.autoregressive_flow /
            spline_flow); on a posterior of a few dimensions, the mass-covering estimator="renyi"; heavy-tailed
            base noise (pyroflows.AutoFlow(..., heavy_tails=True)); for hierarchical models and shrinkage priors,
            the model non-centred by Pyro (pyro.poutine.reparam(model, config=pyro.infer.reparam.AutoReparam())).

        After a multi-sample bound (``estimator="iw"`` or ``"renyi"``) the bound is named, and the ELBO of the
        report's draws bounds KL(q‖p) from below::

            >>> bound = SVIResult(np.full(10, 3.0), None, 1.5, np.full(10, 0.01), step=10, khat=0.4,
            ...                   objective="IW bound", draws_elbo=-5.0)
            >>> print(bound.summary())  # doctest: +NORMALIZE_WHITESPACE
            fit: 10 steps in 1.5 s; IW bound -3 (mean of the last 10 steps); ELBO -5 from fresh draws, so KL(q||p)
            is at least about 2; k̂ 0.40: good, the guide covers the posterior (PSIS-corrected estimates are
            reliable).
        """
        window = min(100, len(self.losses))
        value = self.final_elbo(window)
        head = f"fit: {self.step} steps in {self.seconds:.1f} s; {self.objective} {value:.4g} (mean of the last "
        head += f"{window} steps)"
        if self.objective != "ELBO" and self.draws_elbo is not None and math.isfinite(self.draws_elbo):
            head += (
                f"; ELBO {self.draws_elbo:.4g} from fresh draws, so KL(q||p) is at least about "
                f"{max(0.0, value - self.draws_elbo):.3g}"
            )
        if self.start is not None and self.start.get("used"):
            head += "; started from a Gaussian approximation of the posterior (" + self.start["reason"] + ")"
        if self.selection is not None:
            s = self.selection
            head += (
                f"; after step {s['step']} kept mixture component(s) {s['kept']} of "
                f"{len(s['kept']) + len(s['removed'])} (ELBO {s['elbo']:.4g} -> {s['elbo_kept']:.4g})"
            )
        if self.relapse is not None:
            head += "\n" + _relapse_message(self.relapse)
        if self.khat is None:
            return head
        if not math.isfinite(self.khat):
            return head + "; k̂ could not be computed (see pyroflows.diagnostics.psis_khat)"
        k = self.khat
        if k < 0.5 and self.objective != "ELBO":  # a mass-covering guide: a good proposal, maybe a poor fit
            return head + f"; k̂ {k:.2f}: good, the guide covers the posterior (PSIS-corrected estimates are reliable)."
        if k < 0.5:
            return head + f"; k̂ {k:.2f}: good, the guide fits the posterior."
        if k < 0.7:
            return head + (
                f"; k̂ {k:.2f}: usable, the guide is somewhat off; PSIS-corrected estimates "
                "(pyroflows.diagnostics.psis_khat) are reliable."
            )
        return head + (
            f"; k̂ {k:.2f}: unreliable, the guide misses posterior mass (do not trust its means or intervals).\n"
            "Try: more steps; a more expressive flow (more num_layers, or pyroflows.autoregressive_flow / "
            'spline_flow); on a posterior of a few dimensions, the mass-covering estimator="renyi"; heavy-tailed '
            "base noise (pyroflows.AutoFlow(..., heavy_tails=True)); for hierarchical models and shrinkage priors, "
            "the model non-centred by Pyro (pyro.poutine.reparam(model, config=pyro.infer.reparam.AutoReparam()))."
        )


def default_lr(num_particles: int) -> float:
    r""":func:`fit`'s default peak learning rate for ``num_particles`` particles per step: ``3e-3`` up to 8
    particles, ``3e-3 * (8 / num_particles) ** (1/3)`` beyond (``1.9e-3`` at 32 particles, ``9.4e-4`` at 256).

    Why it falls: Adam divides each parameter's step by the root mean square of its recent gradients. More
    particles make the gradient less noisy, so the same rate moves the guide further per step, relative to the
    posterior's curvature: not at all further while the mean gradient dominates (early, far from the posterior),
    up to :math:`\sqrt{n/8}` times further where the noise dominates (near a good guide; the sticking-the-landing
    gradient's noise also vanishes there). With 256 particles at ``lr=3e-3``, fit ended at KL 54 nats
    (``spline_flow(8)``, a collapse late in the run) and 0.637 (``realnvp(16)``) on the 2-D energies of
    ``benchmarks/vi_energies.py``. The exponent 1/3 lies between those two regimes (0 and 1/2): it is the power
    law through the two rates measured best, ``3e-3`` at 8 particles (the guide benchmark) and about ``1e-3`` at 256
    (the energies); the square-root rule (``5.3e-4`` at 256) left several energies short of a fit in 4,000 steps
    (docs: "Variational inference", defaults).

    :param int num_particles: particles per step (at least 1).
    :returns: the learning rate.

    Example::

        >>> from pyroflows.infer import default_lr
        >>> default_lr(8), default_lr(1), round(default_lr(64), 4), round(default_lr(256), 6)
        (0.003, 0.003, 0.0015, 0.000945)
    """
    check_int("default_lr", "num_particles", num_particles, 1)
    return DEFAULT_LR * min(1.0, (LR_PARTICLES / num_particles) ** (1.0 / 3.0))


def default_anneal(model: Callable, *args, **kwargs) -> float:
    """The annealing :func:`fit` uses when none is given (``anneal="auto"``): ``0.5`` for a model with an observed
    sample site (data, not only ``pyro.factor`` terms or latents a reparameterisation computes,
    :func:`is_reparameterised`) whose latent sites all have proper priors; ``0.0`` otherwise,
    also for a model that cannot be run from its prior (an ``ImproperUniform`` site cannot be sampled). It runs the
    model once, drawing from the prior, and leaves the random number generators as they were.

    Tempering starts the guide on the prior, so it needs a proper one; a target made of ``pyro.factor`` terms alone
    (an energy, a potential) has no likelihood to temper apart from the whole target. On the guide benchmark's
    posteriors with observations, annealing half the run lowered KL(q‖p) for most guides and made finding both modes
    of a bimodal posterior likelier (docs: "Variational inference", defaults).

    :param model: a Pyro model.
    :param args: its positional arguments.
    :param kwargs: its keyword arguments.
    :returns: ``0.5`` or ``0.0``.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyroflows.infer import default_anneal
        >>> def regression(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> def energy():
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.factor("u", -(z**2 - 1.0) ** 2)
        >>> default_anneal(regression, torch.zeros(3)), default_anneal(energy)
        (0.5, 0.0)
    """
    trace = _prior_trace(model, args, kwargs)
    if trace is None:  # a prior that cannot be sampled (ImproperUniform): no annealing, the old default; fit's own
        return 0.0  # steps report any real error of the model
    observed, proper = False, True
    for site in trace.nodes.values():
        if site["type"] != "sample" or is_reparameterised(site):  # (a reparameterised latent is not data)
            continue
        fn = _base_distribution(site["fn"])
        if site["is_observed"]:
            observed = observed or not isinstance(fn, pyro.distributions.Unit)  # pyro.factor is a Unit site
        elif isinstance(fn, pyro.distributions.ImproperUniform):
            proper = False
    return 0.5 if observed and proper else 0.0


def _prior_trace(model: Callable, args: tuple, kwargs: dict):
    """A trace of one blocked, gradient-free run of ``model`` from its prior, the random streams left as they were;
    ``None`` when the model cannot be run that way (an ``ImproperUniform`` site cannot be sampled)."""
    state = rng_state()
    try:
        with torch.no_grad(), poutine.block():
            return poutine.trace(model).get_trace(*args, **kwargs)
    except Exception:  # noqa: BLE001  the callers fall back; a real error of the model shows at fit's first step
        return None
    finally:
        set_rng_state(state)


def is_reparameterised(site) -> bool:
    """Whether a trace site is a latent that a Pyro reparameterisation (``poutine.reparam`` with ``LocScaleReparam``,
    ``TransformReparam``, ``AutoReparam``, ...) computes from the new latent sites it adds. Pyro marks such a site
    observed, with a ``Delta`` distribution at the computed value (its log density zero, or the
    reparameterisation's own term): it is part of the prior, not data. ``pyro.deterministic`` sites are not
    counted (they are marked as such).

    :param dict site: a sample site of a trace.
    :returns: ``True`` for a reparameterised latent.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro import poutine
        >>> from pyro.infer.reparam import LocScaleReparam
        >>> from pyroflows.infer import is_reparameterised
        >>> def model():
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     theta = pyro.sample("theta", dist.Normal(0.0, scale))
        ...     pyro.sample("y", dist.Normal(theta, 1.0), obs=torch.tensor(0.5))
        >>> noncentred = poutine.reparam(model, config={"theta": LocScaleReparam(0.0)})
        >>> trace = poutine.trace(noncentred).get_trace()
        >>> {name: is_reparameterised(site) for name, site in trace.nodes.items() if site["type"] == "sample"}
        {'scale': False, 'theta_decentered': False, 'theta': True, 'y': False}
    """
    return (
        site["type"] == "sample"
        and site["is_observed"]
        and not site["infer"].get("_deterministic", False)
        and isinstance(_base_distribution(site["fn"]), pyro.distributions.Delta)
    )


def _base_distribution(fn):
    """``fn`` without its ``Independent``, ``MaskedDistribution`` and ``ExpandedDistribution`` wrappers."""
    while True:
        inner = getattr(fn, "base_dist", None)
        if inner is None:
            return fn
        fn = inner


@dataclass(frozen=True)
class SVIConfig:
    """The settings of one :func:`fit` run, checked in one place (``ValueError`` naming the argument and value).

    :func:`fit` builds it from its keywords; each field is the keyword of the same name, documented there:
    ``num_steps``, ``lr``, ``optimizer``, ``optimizer_kwargs``, ``lr_schedule``, ``final_lr_factor``,
    ``warmup_steps``, ``num_particles``, ``vectorize_particles``, ``estimator``, ``alpha``, ``anneal``,
    ``anneal_alpha``, ``clip_norm``,
    ``skip_nonfinite``, ``progress``, ``start``,
    ``seed``, ``out``
    (the run directory, a ``Path`` or ``None``), ``checkpoint_every`` and ``resume``. ``checkpoint`` is the
    checkpoint file: ``out/checkpoint.pt``, or the file given to :func:`fit`'s deprecated ``checkpoint=``.

    Example::

        >>> from pyroflows.infer import SVIConfig
        >>> SVIConfig(num_steps=100, out="runs/svi").checkpoint.as_posix()
        'runs/svi/checkpoint.pt'
        >>> SVIConfig(final_lr_factor=2.0)
        Traceback (most recent call last):
          ...
        ValueError: fit: final_lr_factor must be in (0, 1] (a finite number), got 2.0
    """

    num_steps: int = 1000
    lr: float | None = None
    optimizer: Any = torch.optim.Adam
    optimizer_kwargs: dict | None = None
    lr_schedule: str = "stable_cosine"
    final_lr_factor: float = 0.05
    warmup_steps: int = 0
    num_particles: int = 8
    vectorize_particles: bool = True
    estimator: str = "stl"
    alpha: float | None = None
    anneal: float = 0.0
    anneal_alpha: float | None = None
    clip_norm: float | None = 10.0
    skip_nonfinite: int = 10
    progress: bool | None = None
    seed: int | None = None
    out: Path | None = None
    checkpoint: Path | None = None
    checkpoint_every: int | None = None
    resume: bool | str | Path = False
    start: str = "auto"

    def __post_init__(self):
        self._paths()
        c = "fit"
        check_int(c, "num_steps", self.num_steps, 1)
        check_int(c, "num_particles", self.num_particles, 1)
        if self.lr is None:  # the default: by the number of particles
            object.__setattr__(self, "lr", default_lr(self.num_particles))
        check_number(c, "lr", self.lr, 0)
        if not callable(self.optimizer):
            raise ValueError(f"fit: optimizer must be a torch.optim.Optimizer class, got {self.optimizer!r}")
        if self.optimizer_kwargs is not None and not isinstance(self.optimizer_kwargs, dict):
            raise ValueError(f"fit: optimizer_kwargs must be None or a dict, got {self.optimizer_kwargs!r}")
        check_choice(c, "lr_schedule", self.lr_schedule, SCHEDULES)
        check_number(c, "final_lr_factor", self.final_lr_factor, 0, 1, high_open=False)
        check_int(c, "warmup_steps", self.warmup_steps, 0)
        check_int(c, "skip_nonfinite", self.skip_nonfinite, 0)
        check_choice(c, "vectorize_particles", self.vectorize_particles, (True, False))
        check_choice(c, "estimator", self.estimator, ESTIMATORS)
        if self.estimator == "renyi":
            if self.alpha is None:
                object.__setattr__(self, "alpha", 0.5)
            check_number(c, "alpha", self.alpha, 0, 1, high_open=False)
        elif self.alpha is not None:
            raise ValueError(f"fit: alpha is the order of estimator='renyi', not of {self.estimator!r}")
        check_number(c, "anneal", self.anneal, 0, 1, high_open=True, low_open=False)
        if self.anneal_alpha is not None:
            check_number(c, "anneal_alpha", self.anneal_alpha, 0, 1, high_open=True, low_open=False)
            if self.estimator != "stl":
                raise ValueError(
                    f"fit: anneal_alpha leads the annealing phase of estimator='stl' from a Rényi bound to the ELBO; "
                    f"got estimator={self.estimator!r}"
                )
            if self.anneal == 0:
                raise ValueError(
                    "fit: anneal_alpha needs annealing, anneal > 0 (anneal='auto' is 0 for a model without observed "
                    "data or with an improper prior); got anneal=0"
                )
        check_number(c, "clip_norm", self.clip_norm, 0, optional=True)
        check_choice(c, "progress", self.progress, (None, True, False))
        check_seed(c, self.seed, optional=True)
        check_int(c, "checkpoint_every", self.checkpoint_every, 1, optional=True)
        if self.checkpoint_every is not None and self.checkpoint is None:
            raise ValueError("fit: checkpoint_every needs out= (the run directory to save checkpoint.pt in)")
        check_resume(c, self.resume, self.checkpoint)
        check_choice(c, "start", self.start, START_CHOICES)

    def _paths(self) -> None:
        out = Path(self.out) if self.out is not None else None
        file = Path(self.checkpoint) if self.checkpoint is not None else None
        if out is not None and file is not None and file != out / CHECKPOINT:
            raise ValueError("fit: give out= (a run directory) or the old checkpoint= (a file), not both")
        object.__setattr__(self, "out", out)
        object.__setattr__(self, "checkpoint", file if file is not None else (out / CHECKPOINT if out else None))

    @property
    def every(self) -> int:
        """Steps between checkpoints: ``checkpoint_every``, by default a tenth of ``num_steps``."""
        return self.checkpoint_every or max(1, self.num_steps // 10)

    def temperature(self, step: int) -> float:
        """The likelihood's weight β at ``step`` (counted from 1): rising linearly to 1 over the first
        ``anneal`` share of the steps, then 1 (always 1 without annealing)."""
        ramp = self.anneal * self.num_steps
        return 1.0 if step >= ramp else step / ramp

    def order(self, step: int) -> float:
        """The Rényi order of the objective at ``step`` with ``anneal_alpha``: ``anneal_alpha + (1 - anneal_alpha)
        β_t``, reaching 1 (the ELBO) with the likelihood's full weight (always 1 without ``anneal_alpha``)."""
        if self.anneal_alpha is None:
            return 1.0
        return self.anneal_alpha + (1.0 - self.anneal_alpha) * self.temperature(step)

    def settings(self, guide) -> dict:
        """The settings that shape the run's trajectory, stored in its checkpoints and compared on resume."""
        return {
            "guide": type(guide).__name__,
            "num_steps": self.num_steps,
            "lr": float(self.lr),
            "optimizer": getattr(self.optimizer, "__name__", str(self.optimizer)),
            "lr_schedule": self.lr_schedule,
            "final_lr_factor": float(self.final_lr_factor),
            "warmup_steps": self.warmup_steps,
            "num_particles": self.num_particles,
            "estimator": self.estimator,
            "alpha": self.alpha,
            "anneal": float(self.anneal),
            "anneal_alpha": self.anneal_alpha,
            "clip_norm": self.clip_norm,
            "skip_nonfinite": self.skip_nonfinite,
        }


class _Temper(Messenger):
    """Weights the log-density of every observed site (``pyro.factor`` included) by ``beta``: the likelihood
    tempered, the prior as it is (a reparameterised latent, which Pyro marks observed, is part of the prior)."""

    def __init__(self) -> None:
        super().__init__()
        self.beta = 1.0

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["is_observed"] and self.beta != 1.0 and not is_reparameterised(msg):
            # the scale before tempering: TraceIW_ELBO refuses scaled (subsampled) sites, not tempered ones
            msg["infer"] = {**msg["infer"], "untempered_scale": msg["scale"]}
            msg["scale"] = self.beta * msg["scale"]


@dataclass
class _SVIRun:
    """The mutable state of one :func:`fit` call, passed between its pieces."""

    cfg: SVIConfig
    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    elbo: ELBO
    settings: dict
    losses: np.ndarray
    lrs: np.ndarray
    first: int = 0
    saved: dict | None = None
    last_checkpoint: tuple | None = None
    opt: torch.optim.Optimizer | None = None
    sched: Any = None
    params: list = field(default_factory=list)
    known: set = field(default_factory=set)
    skipped: list = field(default_factory=list)  # steps (from 1) whose non-finite loss or gradient was skipped
    temper: _Temper | None = None  # the likelihood's weight while annealing (the ELBO sees the tempered model)
    renyi: TraceRenyi_ELBO | None = None  # the annealing phase's objective with anneal_alpha (its order moves)
    start: dict | None = None  # what gaussian_start did before the first step (None on resume, or start="identity")
    select_step: int | None = None  # after which step an AutoFlowMixture selects its components (None: never)
    selection: dict | None = None  # what it did then
    final_weights: dict | None = None  # an AutoFlowMixture's weights set to their best after the last step


def fit(
    model: Callable,
    guide: Callable,
    num_steps: int = 1000,
    *,
    model_args: Sequence = (),
    model_kwargs: dict | None = None,
    lr: float | None = None,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict | None = None,
    lr_schedule: str = "stable_cosine",
    final_lr_factor: float = 0.05,
    warmup_steps: int = 0,
    num_particles: int = 8,
    vectorize_particles: bool = True,
    estimator: str = "stl",
    alpha: float | None = None,
    anneal: float | str = "auto",
    anneal_alpha: float | None = None,
    loss: ELBO | None = None,
    clip_norm: float | None = 10.0,
    skip_nonfinite: int = 10,
    progress: bool | None = None,
    seed: int | None = None,
    callback: Callable[[int, float], None] | None = None,
    out: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str | os.PathLike = False,
    checkpoint: str | os.PathLike | None = None,
    report: bool = True,
    start: str = "auto",
) -> SVIResult:
    """Fit ``guide`` to ``model``'s posterior by stochastic variational inference.

    Each step is Pyro's ``SVI.step`` (parameters captured from a trace, ``loss_and_grads``, one optimiser
    update), with these additions:

    - the loss and every gradient are checked *before* the update. A step whose loss or gradient is not finite
      (one unlucky draw, say a scale that underflows in a funnel) makes no update, and the run goes on: up to
      ``skip_nonfinite`` such steps in a row, counted in :attr:`SVIResult.skipped` (as NumPyro's
      ``stable_update``). One more in a row stops the run with :class:`~pyroflows.train.TrainingError` naming the
      step (counted from 1, as in :func:`pyroflows.train.fit`), the parameters at their last finite values;
    - a guide without parameters (``AutoNormalizingFlow`` given a plain list of transforms, or ``t.inv``, trains
      silently with an empty param store in Pyro) is an error, and so is a guide none of whose parameters get a
      gradient (a stale param store entry shadowing the guide's module);
    - values already in the param store under the guide's names are adopted first (:func:`sync_param_store`),
      so ``pyro.get_param_store().load(path)`` followed by ``fit`` resumes a fitted guide;
    - with a :class:`~pyroflows.AutoFlowMixture` guide, its components are selected once its ``select_after`` share
      of the steps after the annealing is done (:meth:`~pyroflows.AutoFlowMixture.select_components`; off by
      default), and after the last step its learned weights are set to their best for its components
      (:meth:`~pyroflows.AutoFlowMixture.fit_weights`; on the ELBO, not after ``estimator="iw"`` or ``"renyi"``),
      both recorded in the result;
    - the global gradient norm is clipped to ``clip_norm``; the learning rate follows ``lr_schedule``
      (by default ``"stable_cosine"``: the peak rate for four fifths of the run, then a cosine
      to ``lr * final_lr_factor``; or ``"constant"``, ``"cosine"``, ``"exponential"``) after an optional linear
      warm-up; a tqdm bar shows the running ELBO.

    Parameters live in Pyro's param store (``pyro.get_param_store()``), as with ``SVI``.

    :param model: a Pyro model.
    :param guide: a Pyro guide, e.g. ``AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=8))``.
    :param int num_steps: optimisation steps (at least 1).
    :param model_args: positional arguments of ``model`` and ``guide``.
    :param dict model_kwargs: keyword arguments of ``model`` and ``guide``.
    :param float lr: peak learning rate; by default :func:`default_lr` of the particles per step: ``3e-3`` up to 8
        particles, then falling as ``num_particles ** (-1/3)`` (``9.4e-4`` at 256): Adam's steps grow as the gradient
        gets less noisy (with ``loss=``, the particles of that ELBO). The defaults (``lr=3e-3``,
        ``num_particles=8``, the stable-then-cosine schedule, Adam, ``clip_norm=10``, STL) were chosen by ``python
        -m benchmarks guides``: at an equal budget of particle-steps they beat one particle at ``lr=1e-2`` and the
        usual constant-rate ``ClippedAdam`` loop for every pyroflows builder (docs: "Variational inference",
        defaults).
    :param optimizer: a ``torch.optim.Optimizer`` class (default Adam), built by
        :func:`pyroflows.run.make_optimizer` (torch's fused update for Adam, unless ``optimizer_kwargs`` chooses).
    :param dict optimizer_kwargs: more arguments of the optimiser (e.g. ``{"betas": (0.9, 0.99)}``).
    :param str lr_schedule: ``"stable_cosine"`` (default), ``"cosine"``, ``"constant"`` or ``"exponential"``
        (:func:`pyroflows.run.lr_factor`).
    :param float final_lr_factor: the learning rate at the last step is ``lr * final_lr_factor``.
    :param int warmup_steps: linear warm-up steps.
    :param int num_particles: Monte Carlo particles per ELBO estimate (vectorised: more particles cost far less
        than proportionally more time).
    :param bool vectorize_particles: draw the particles in one vectorised pass (needs
        ``pyro.plate``-annotated models, as Pyro's ``Trace_ELBO``).
    :param str estimator: the ELBO's gradient: ``"stl"`` (default), sticking the landing
        (:class:`pyroflows.elbo.TraceSTL_ELBO`: the path derivative alone, whose variance vanishes as the guide
        approaches the posterior; it costs one inverse pass of the flow per step, 1.5 to 2.5 times a ``Trace_ELBO``
        step on the example models),
        ``"reparam"``, Pyro's reparameterised ``Trace_ELBO``, or ``"iw"``, the importance-weighted bound over the
        ``num_particles`` draws with the doubly reparameterised gradient (:class:`pyroflows.elbo.TraceIW_ELBO`: a
        guide that covers the posterior's mass, lower k̂, at some cost in KL(q‖p); the losses are then the bound's,
        not the ELBO's), or ``"renyi"``, the Rényi bound of order ``alpha`` between the ELBO and ``"iw"``'s, with the
        same gradient (:class:`pyroflows.elbo.TraceRenyi_ELBO`). At equal steps STL lowered KL(q‖p) for every
        pyroflows builder on the benchmark's posteriors, 2 to 6 times for the coupling and autoregressive flows
        (``python -m benchmarks guides``).
    :param float alpha: the order of ``estimator="renyi"``, in ``[0, 1]`` (0 is ``"iw"``'s bound, 1 the ELBO with
        the STL gradient; default 0.5); an error with another estimator.
    :param anneal: temper the likelihood over the first ``anneal`` share of the steps (in ``[0, 1)``; 0 does not;
        ``"auto"``, the default, is :func:`default_anneal`: 0.5 for a model with observed data and proper priors, 0
        otherwise; it was 0 before 0.2): at step ``t`` every observed site's log-density (``pyro.factor``
        included; not the latents a ``poutine.reparam`` computes, which Pyro marks observed) is weighted by
        β_t = min(1, t / (anneal · num_steps)), so the guide starts on the prior and follows the posterior as it
        sharpens, instead of settling on the first mode it meets. The losses of the annealing steps are those of
        the tempered target. Needs a proper prior (at small β_t the target is nearly the prior).
    :param float anneal_alpha: with annealing and ``estimator="stl"``, train the annealing steps on the Rényi bound
        (:class:`pyroflows.elbo.TraceRenyi_ELBO`) of order α_t = anneal_alpha + (1 − anneal_alpha) β_t instead of
        the ELBO, in ``[0, 1)`` (``None``, the default, does not): a mass-covering objective while the target
        sharpens, which keeps the modes the guide meets, moving to the ELBO (α = 1, the same STL gradient) as the
        likelihood reaches full weight; the steps after annealing are unchanged. An option for posteriors with
        several modes, not a default: on the guide benchmark's bimodal posterior ``anneal_alpha=0.5`` found both
        modes in 4 of 8 runs (``autoregressive_flow(8)`` and ``realnvp(8)``, seeds 0-3) against 2 of 8 without, and
        left the KL on the eight schools and the local-level series as it was, but on the horseshoe it made
        ``autoregressive_flow(8)``'s rare draws deep in the funnel's neck worse (KL 3.04 against 0.30 at one seed),
        and it did not reach the second of two far-apart modes (a label-switching mixture: one mode in every run,
        with or without it, where :class:`pyroflows.AutoFlowMixture` found both in every run; docs: "Variational
        inference", defaults). The losses of those steps are the tempered
        target's Rényi bound. Needs the bound's conditions: a model without parameters of its own, no subsampling,
        reparameterised guide sites, and ``loss=None``.
    :param loss: a Pyro ``ELBO`` instance instead of the one ``estimator``, ``num_particles`` and
        ``vectorize_particles`` describe.
    :param float clip_norm: clip the global gradient norm; ``None`` disables clipping.
    :param int skip_nonfinite: how many steps in a row may have a non-finite loss or gradient (skipped, no update)
        before the run stops; 0 stops at the first.
    :param progress: show a progress bar (``None``, the default: only when stderr is a terminal).
    :param int seed: ``pyro.set_rng_seed(seed)`` first.
    :param callback: called as ``callback(step, loss)`` after every step, ``step`` counted from 1.
    :param out: the run directory: ``out/checkpoint.pt`` is saved atomically every ``checkpoint_every`` steps and
        at the end, with the guide's ``state_dict``, the parameters the model creates itself (``pyro.param`` in the
        model, e.g. the centring a ``LocScaleReparam`` learns), the optimiser and schedule states, the losses and
        learning rates so far, the RNG states and the settings. An existing checkpoint is never overwritten unless
        the run resumes from it (:class:`~pyroflows.run.CheckpointExistsError`).
    :param int checkpoint_every: steps between checkpoints (default: a tenth of ``num_steps``).
    :param resume: ``True`` continues from ``out/checkpoint.pt`` (an error if it is missing), ``"auto"`` when it
        exists, ``False`` starts afresh (an error if the checkpoint exists), or the path of a checkpoint to continue.
        Give a freshly built guide of the same kind and the same settings (they are checked): the continued run
        takes the steps an uninterrupted run would have taken, draw for draw.
    :param checkpoint: the old form of ``out``: the checkpoint *file* itself (a ``FutureWarning``; removed in
        0.3).
    :param bool report: at the end, compute k̂ from 4000 guide draws (:func:`pyroflows.diagnostics.psis_khat`,
        the global RNG left as it was) into :attr:`SVIResult.khat`, and print :meth:`SVIResult.summary` to stderr:
        ELBO, k̂ with its verdict, and what to try when it is high.
    :param str start: where a fresh guide starts. ``"auto"`` (default): as built (a flow guide: N(0, I) in the
        unconstrained space), unless that is far out of the optimiser's reach, then on a Gaussian (Laplace)
        approximation of the posterior (:func:`pyroflows.start.gaussian_start`: its importance-weighted bound beats
        the guide's as built by more than 10 nats per latent coordinate, e.g. an intercept near 1000 under a wide
        prior, or a posterior a hundred times narrower than N(0, I)); ``"gaussian"``: on the Gaussian approximation
        always; ``"identity"``: as built. Flow guides of pyroflows' vector builders and Pyro's ``AutoNormal``,
        ``AutoDiagonalNormal`` and ``AutoMultivariateNormal`` are moved, only while still as built (not on resume,
        nor after an earlier fit); :attr:`SVIResult.start` says what was done.
    :returns: :class:`SVIResult` with the loss trace (of all steps, those before a resume included).
    :raises ValueError: for a setting out of range (:class:`SVIConfig` names it).
    :raises CheckpointError: for a missing, unreadable or foreign checkpoint on resume, or settings that differ.

    Example::

        >>> import pyro, pyro.distributions as dist, pyroflows, torch
        >>> from functools import partial
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> from pyroflows.infer import fit
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 0.5).to_event(1))
        >>> pyro.clear_param_store()
        >>> guide = AutoNormalizingFlow(model, partial(pyroflows.planar_flow, num_layers=2))
        >>> result = fit(model, guide, num_steps=300, lr=0.05, num_particles=8, progress=False, seed=0)
        >>> result.losses.shape, abs(result.final_elbo(50)) < 0.2  # log Z = 0, so ELBO -> 0
        ((300,), True)
    """
    given = dict(locals())
    if isinstance(anneal, str):
        if anneal != "auto":
            raise ValueError(f"fit: anneal must be a number in [0, 1) or 'auto', got {anneal!r}")
        given["anneal"] = default_anneal(model, *tuple(model_args), **dict(model_kwargs or {}))
    if lr is None and loss is not None:  # the default for the particles the given ELBO draws
        given["lr"] = default_lr(getattr(loss, "num_particles", num_particles))
    if checkpoint is not None:
        note = " (a run directory; the checkpoint file is out/checkpoint.pt)"
        renamed("fit", "checkpoint", "out", checkpoint, out, note=note)
    cfg = SVIConfig(**{f.name: given[f.name] for f in fields(SVIConfig)})
    if loss is not None and cfg.anneal_alpha is not None:
        raise ValueError("fit: anneal_alpha builds its Rényi bound from estimator='stl'; it does not take loss=")
    if report not in (True, False):
        raise ValueError(f"fit: report must be True or False, got {report!r}")
    args, kwargs = tuple(model_args), dict(model_kwargs or {})
    with run_lock(cfg.checkpoint.parent if cfg.checkpoint is not None else None, "fit"):
        result = _svi_loop(model, guide, args, kwargs, loss, callback, cfg)
    if report:
        result.khat, result.draws_elbo = _final_report(model, guide, args, kwargs)
        print(result.summary(), file=sys.stderr, flush=True)
    return result


def loss_relapse(losses, start: int = 0) -> dict | None:
    """Whether a loss trace ended well above its best: the optimisation became unstable part-way (a learning rate
    too high for the guide), and the result is worse than what the run had reached.

    The steps from ``start`` on (a tempered run's steps before its likelihood reached full weight are not
    comparable) are cut into consecutive windows of ``w = clamp(n // 20, 10, 100)`` steps, ending at the last
    step; non-finite losses (skipped steps) are left out. The last window's mean is a relapse when it exceeds the
    lowest earlier window's mean by more than 0.1 and by more than 4 combined standard errors of the two means:
    for noise alone the lowest of ``k`` windows lies about 2 standard errors low, so that margin is rarely crossed
    by chance.

    :param losses: the loss (negative ELBO) per step.
    :param int start: the first step (0-based) to consider.
    :returns: ``None``, or ``{"final": mean of the last window, "best": the lowest window mean, "best_steps": (a, b)}``
        with ``a``, ``b`` the best window's first and last step, counted from 1.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> steady = 1.0 + 0.3 * rng.standard_normal(2000)
        >>> loss_relapse(steady) is None
        True
        >>> relapsed = np.concatenate([steady[:1500], steady[1500:] + 2.0])
        >>> r = loss_relapse(relapsed)
        >>> round(r["final"] - r["best"], 1), r["best_steps"][1] <= 1500
        (2.0, True)
    """
    x = np.asarray(losses, dtype=float)[start:]
    n = len(x)
    w = min(100, max(10, n // 20))
    k = n // w
    if k < 4:
        return None
    offset = n - k * w  # the windows end at the last step
    rows = x[offset:].reshape(k, w)
    finite = np.isfinite(rows)
    counts = finite.sum(axis=1)
    if (counts < 2).any():
        return None
    clean = np.where(finite, rows, 0.0)
    means = clean.sum(axis=1) / counts
    var = np.where(finite, (rows - means[:, None]) ** 2, 0.0).sum(axis=1) / (counts - 1)
    se = np.sqrt(var / counts)
    b = int(np.argmin(means[:-1]))
    gap = means[-1] - means[b]
    if gap > 0.1 and gap > 4.0 * math.hypot(se[-1], se[b]):
        first = start + offset + b * w + 1
        return {"final": float(means[-1]), "best": float(means[b]), "best_steps": (first, first + w - 1)}
    return None


def _relapse_message(relapse: dict) -> str:
    a, b = relapse["best_steps"]
    return (
        f"fit: the loss ended at {relapse['final']:.4g} (mean of the last window) after reaching {relapse['best']:.4g} "
        f"over steps {a}-{b}: the optimisation became unstable, and the guide is worse than it was. Try a lower lr "
        "(a third, say) or another seed; for a posterior with several separated modes, a mixture of flows "
        "(pyroflows.AutoFlowMixture)."
    )


#: guide draws behind :func:`fit`'s closing k̂ (``report=True``): a few thousand, as PSIS needs. From 1000 the
#: estimate moved by 0.1-0.3 against 4000 and 10,000 draws of the same guides (autoregressive, spline and realnvp
#: guides after 50 fit steps on three example models), and ArviZ's own threshold for 1000 draws is 0.67, not 0.7; 4000
#: draws of those guides took 0.04-0.17 s (one CPU thread), little beside any fit.
REPORT_DRAWS = 4000


def _final_report(model, guide, args: tuple, kwargs: dict) -> tuple[float, float]:
    """k̂ and the ELBO of the fitted guide from ``REPORT_DRAWS`` draws, leaving every RNG as it was; ``nan`` when
    they cannot be computed (e.g. guide draws outside the model's support)."""
    from .diagnostics import psis_khat

    state = rng_state()
    try:
        report = psis_khat(model, guide, num_samples=REPORT_DRAWS, model_args=args, model_kwargs=kwargs)
        return float(report.khat), float(report.elbo)
    except (ValueError, RuntimeError, NotImplementedError):
        return math.nan, math.nan
    finally:
        set_rng_state(state)


def _objective(elbo) -> str:
    """What the losses of a run with the ELBO instance ``elbo`` are minus the estimate of."""
    if isinstance(elbo, TraceIW_ELBO) and elbo.alpha < 1 and elbo.elbo_weight < 1:
        name = "IW bound" if elbo.alpha == 0 else f"Rényi bound (alpha={elbo.alpha:g})"
        return name if not elbo.elbo_weight else f"{name} mixed with the ELBO (weight {elbo.elbo_weight:g})"
    return "ELBO"


def _svi_loop(model, guide, args: tuple, kwargs: dict, loss, callback, cfg: SVIConfig) -> SVIResult:
    """The steps of :func:`fit`, with checkpoints and progress, once the run directory is locked."""
    run = _svi_setup(model, guide, args, kwargs, loss, cfg)
    bar = progress_bar(cfg.num_steps, cfg.progress, desc="svi", initial=run.first)
    start = time.perf_counter()
    try:
        with stop_on_signals() as request:  # SIGINT/SIGTERM: finish the step, checkpoint, then stop
            for step in range(run.first + 1, cfg.num_steps + 1):
                loss_value = _svi_step(run, step)
                _mixture_step(run, step)
                due = step % cfg.every == 0 or step == cfg.num_steps or request.signum is not None
                if cfg.checkpoint is not None and due:
                    _svi_save(run, step)
                if callback is not None:
                    callback(step, loss_value)
                bar.update(1)
                if step % 10 == 1 or step == cfg.num_steps:
                    bar.set_postfix(elbo=f"{-np.mean(run.losses[max(0, step - 50) : step]):.4g}", refresh=False)
                request.stop("fit", step, cfg.checkpoint, "continue with fit(..., resume=True)")
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    result = SVIResult(run.losses, guide, seconds, run.lrs, cfg.num_steps, cfg.out, cfg.checkpoint, run.skipped)
    result.objective = _objective(run.elbo)
    result.start, result.selection, result.final_weights = run.start, run.selection, run.final_weights
    # before the likelihood reaches full weight a tempered run's losses are not comparable with the later ones
    result.relapse = loss_relapse(run.losses, start=math.ceil(cfg.anneal * cfg.num_steps))
    if result.relapse is not None:
        warnings.warn(_relapse_message(result.relapse), UserWarning, stacklevel=3)
    return result


def _svi_setup(model, guide, args: tuple, kwargs: dict, loss, cfg: SVIConfig) -> _SVIRun:
    """The checkpoint to resume from (settings checked before anything changes), the seed, the param store, the
    ELBO, then the guide's state, the history so far and the RNG exactly as they were after the saved step."""
    source = resume_source(cfg.checkpoint, cfg.resume, caller="fit", hint=_RESUME_HINT)
    saved = load_checkpoint(source, marker=_SVI_FORMAT) if source is not None else None
    settings = cfg.settings(guide)
    # the model's data: a resumed run must continue on the same; hashed only where a checkpoint is written or read
    data = fingerprint(args, kwargs) if cfg.checkpoint is not None or cfg.resume is not False else None
    if saved is not None:
        require_keys(saved, ("settings", "guide", "optimizer", "scheduler", "step", "losses", "lrs", "rng"),
                     source=source, caller="fit")  # fmt: skip
        if isinstance(saved["settings"], dict):  # checkpoints written before the estimator option used Trace_ELBO
            saved["settings"].setdefault("estimator", "reparam")
            saved["settings"].setdefault("anneal", 0.0)  # and before annealing existed, did not anneal
            saved["settings"].setdefault("alpha", None)  # and before the Rényi option, had no order
            saved["settings"].setdefault("anneal_alpha", None)  # and before anneal_alpha, annealed on the ELBO
        check_settings(saved["settings"], settings, source=source, caller="fit")
        check_data(saved["settings"], data, source=source, caller="fit", what="model data (model_args/kwargs)")
    settings["data"] = data
    if cfg.seed is not None:
        pyro.set_rng_seed(cfg.seed)
    sync_param_store(guide, *args, **kwargs)
    _clear_gradients(guide)
    elbo, renyi = _svi_objectives(model, guide, args, kwargs, loss, cfg)
    if _vectorizes(elbo):  # a model that breaks or mixes the particles when they are vectorised: said before training
        from .diagnostics import _check_vectorized

        where = (
            "pass vectorize_particles=False to fit" if loss is None else "build the loss with vectorize_particles=False"
        )
        _check_vectorized(
            "fit", model, args, kwargs, "particles", fix=f"; or {where} (the particles then run one at a time, slower)"
        )
    start = None
    if saved is None and cfg.start != "identity":  # the random state is left as it was: a seeded run's draws stay
        start = gaussian_start(model, guide, *args, mode=cfg.start, **kwargs)
    losses, lrs = np.full(cfg.num_steps, np.nan), np.full(cfg.num_steps, np.nan)
    run = _SVIRun(cfg, model, guide, args, kwargs, elbo, settings, losses, lrs, saved=saved, start=start)
    run.select_step = _select_step(guide, cfg)
    if cfg.anneal > 0:
        run.temper = _Temper()
        run.model = run.temper(model)  # a Messenger wraps a function as a handler
        run.renyi = renyi
    if saved is not None:
        _load_guide_state(guide, saved["guide"], os.fspath(source), "fit", *args, **kwargs)
        _restore_model_params(model, guide, saved, source, args, kwargs)
        run.first = int(saved["step"])
        run.losses[: run.first] = saved["losses"].numpy()
        run.lrs[: run.first] = saved["lrs"].numpy()
        run.skipped = [int(s) for s in saved.get("skipped", [])]
        run.selection, run.final_weights = saved.get("selection"), saved.get("final_weights")
        run.last_checkpoint = (source, run.first)
        set_rng_state(saved["rng"])
    return run


def _clear_gradients(guide) -> None:
    """Drop gradients left on the guide's and the param store's parameters from before the run (a ``backward``
    of the user's): the first step would otherwise add its own to them."""
    own = list(guide.parameters()) if isinstance(guide, torch.nn.Module) else []
    for p in own + [p for _, p in pyro.get_param_store().named_parameters()]:
        p.grad = None


def _mixture_step(run: _SVIRun, step: int) -> None:
    """An :class:`~pyroflows.AutoFlowMixture`'s work after ``step`` (before that step's checkpoint): its components
    selected at ``run.select_step``, its learned weights set to their best for the components after the last step
    (of a run on the ELBO: a multi-sample bound's run leaves them as they are).
    Where either fails (the guide is left as trained) a warning says so, and the run goes on."""
    guide, what = run.guide, None
    try:
        if step == run.select_step:
            what = "components were not selected"
            run.selection = {"step": step, **guide.select_components(*run.args, **run.kwargs)}
        last = step == run.cfg.num_steps and _objective(run.elbo) == "ELBO"  # (a bound's weights stay its own)
        if last and isinstance(guide, AutoFlowMixture) and guide.learn_weights:
            what = "weights stay as trained"
            run.final_weights = guide.fit_weights(*run.args, **run.kwargs)
    except Exception as e:  # noqa: BLE001  the trained guide is intact: the run goes on, and says what failed
        warnings.warn(f"fit: after step {step} the mixture guide's {what} ({type(e).__name__}: {e})", stacklevel=4)


def _select_step(guide, cfg: SVIConfig) -> int | None:
    """The step after which an :class:`~pyroflows.AutoFlowMixture` selects its components: ``select_after`` of the
    steps once the likelihood has full weight (``None``: another guide, or ``select_after=None``)."""
    after = getattr(guide, "select_after", None) if isinstance(guide, AutoFlowMixture) else None
    if after is None:
        return None
    annealed = math.ceil(cfg.anneal * cfg.num_steps)
    return min(cfg.num_steps, max(1, annealed + round(after * (cfg.num_steps - annealed))))


def _svi_objectives(model, guide, args: tuple, kwargs: dict, loss, cfg: SVIConfig) -> tuple[ELBO, ELBO | None]:
    """The run's ELBO (``loss``, or the one ``estimator`` names) and, with ``anneal_alpha``, the Rényi bound of its
    annealing steps (``None`` without)."""
    if loss is not None:
        return loss, None  # (fit refuses loss= with anneal_alpha)
    # give the plate nesting rather than letting Trace_ELBO guess it (it logs its guess at INFO level)
    nesting = max_plate_nesting(model, guide, *args, **kwargs)
    kind = {"reparam": Trace_ELBO, "stl": TraceSTL_ELBO, "iw": TraceIW_ELBO, "renyi": TraceRenyi_ELBO}
    options = dict(num_particles=cfg.num_particles, vectorize_particles=cfg.vectorize_particles)
    if cfg.estimator == "renyi":
        options["alpha"] = cfg.alpha
    elbo = kind[cfg.estimator](max_plate_nesting=nesting, **options)
    if cfg.anneal_alpha is None:
        return elbo, None
    _check_no_model_params(model, args, kwargs)
    return elbo, TraceRenyi_ELBO(cfg.anneal_alpha, max_plate_nesting=nesting, **options)


def _check_no_model_params(model, args: tuple, kwargs: dict) -> None:
    """``anneal_alpha``'s Rényi bound trains guides only: refuse, before training, a model that creates parameters
    (found by one blocked run from the prior; a model that cannot run from its prior is left to the bound's own
    check at the first step)."""
    trace = _prior_trace(model, args, kwargs)
    names = [] if trace is None else [name for name, site in trace.nodes.items() if site["type"] == "param"]
    if names:
        raise ValueError(
            f"fit: anneal_alpha trains on a Rényi bound, which fits guides only, and the model has the parameter(s) "
            f"{', '.join(map(repr, names))}; leave anneal_alpha=None for a model with parameters of its own "
            "(poutine.reparam's LocScaleReparam centrings are such parameters)"
        )


def _svi_step(run: _SVIRun, step: int) -> float:
    """One update, ``step`` counted from 1: the ELBO's loss and gradients, checked before the optimiser moves."""
    error, elbo = None, run.elbo
    if run.temper is not None:
        run.temper.beta = run.cfg.temperature(step)
        if run.renyi is not None and run.temper.beta < 1:  # annealing with anneal_alpha: the Rényi bound
            run.renyi.alpha = run.cfg.order(step)
            elbo = run.renyi
    try:
        with poutine.trace(param_only=True) as capture:
            loss_value = elbo.loss_and_grads(run.model, run.guide, *run.args, **run.kwargs)
    except Exception as e:
        if run.opt is None:  # the first step: a guide that breaks under vectorised particles is named as such
            _check_guide_vectorized(run, e)
        # With validation on, an unlucky draw (a scale that underflows to 0 in a funnel's neck) raises torch's
        # constraint error where validation off gives a NaN loss: the same step, skipped the same way. Any other
        # error, and any at the first step (no optimiser yet), propagates.
        if run.opt is None or not isinstance(e, ValueError) or not any(m in str(e) for m in _DRAW_ERRORS):
            raise
        error, loss_value, capture = e, math.nan, None
    step_params = (
        {}
        if capture is None
        else {id(p): p for p in (s["value"].unconstrained() for s in capture.trace.nodes.values())}
    )
    if run.opt is None:
        _svi_optimizer(run, step_params)
    elif not run.known.issuperset(step_params):  # a guide may create parameters lazily
        new = [p for k, p in step_params.items() if k not in run.known]
        run.known.update(id(p) for p in new)
        run.params += new
        run.opt.add_param_group({"params": new})
    loss_value = float(loss_value)
    # one fused norm over all gradients: non-finite if any gradient is
    clip = run.cfg.clip_norm if run.cfg.clip_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, clip))
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
    in_a_row = next((k for k in range(len(run.skipped)) if run.skipped[-1 - k] != step - 1 - k), len(run.skipped))
    if finite or in_a_row >= run.cfg.skip_nonfinite:
        check_finite("fit", step, loss_value, grad_norm, cause=error, checkpoint=run.last_checkpoint, params=run.params)
        run.opt.step()
    else:
        run.skipped.append(step)  # one unlucky draw: no update, the schedule and the step count go on
    run.lrs[step - 1] = run.opt.param_groups[0]["lr"]
    run.opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step: torch warns of a schedule step before any update
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`", category=UserWarning)
        run.sched.step()
    run.losses[step - 1] = loss_value
    return loss_value


def _vectorizes(elbo) -> bool:
    """Whether ``elbo`` runs more than one particle in one vectorised pass (a plate around model and guide)."""
    return bool(getattr(elbo, "vectorize_particles", False)) and getattr(elbo, "num_particles", 1) > 1


def _check_guide_vectorized(run: _SVIRun, error: Exception) -> None:
    """After the first step failed with ``error``: if the ELBO vectorises its particles and the guide itself fails
    when run on a plate of two particles (the model was checked before training), raise that, naming the fix."""
    elbo = run.elbo
    if not _vectorizes(elbo):
        return
    from .diagnostics import _first_line

    nesting = getattr(elbo, "max_plate_nesting", math.inf)
    if not math.isfinite(nesting):
        nesting = max_plate_nesting(run.model, run.guide, *run.args, **run.kwargs)
    state = rng_state()
    try:
        with torch.no_grad(), poutine.block(), pyro.plate("_pyroflows_guide_check", 2, dim=-(int(nesting) + 1)):
            run.guide(*run.args, **run.kwargs)
    except Exception as guide_error:  # noqa: BLE001  the guide's own failure, named with its cause
        raise ValueError(
            f"fit: the guide fails when its particles are vectorised (a plate of 2 left of the model's plates), "
            f"though it runs on one: {type(guide_error).__name__}: {_first_line(guide_error)}. Python control flow "
            "on a sampled value or a shape the guide fixes do this; pass vectorize_particles=False to fit (or to "
            "the loss), or write the guide for batches"
        ) from error
    finally:
        set_rng_state(state)


def _svi_optimizer(run: _SVIRun, step_params: dict) -> None:
    """The optimiser and schedule, built on the first step's parameters (restored when resuming)."""
    cfg = run.cfg
    run.params = _first_step_params(step_params)
    run.known = set(step_params)
    run.opt = make_optimizer(cfg.optimizer, run.params, lr=cfg.lr, **(cfg.optimizer_kwargs or {}))
    run.sched = make_scheduler(run.opt, cfg.lr_schedule, cfg.num_steps, cfg.warmup_steps, cfg.final_lr_factor)
    if run.saved is not None:
        run.opt.load_state_dict(run.saved["optimizer"])
        run.sched.load_state_dict(run.saved["scheduler"])


def _svi_save(run: _SVIRun, done: int) -> None:
    """The checkpoint after step ``done``, written atomically."""
    payload = {
        "format": _SVI_FORMAT,
        "version": VERSION,
        "step": done,
        "settings": run.settings,
        "guide": _guide_payload(run.guide),
        "model_params": _model_params(run),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "losses": torch.from_numpy(run.losses[:done].copy()),
        "lrs": torch.from_numpy(run.lrs[:done].copy()),
        "skipped": list(run.skipped),
        "selection": run.selection,
        "final_weights": run.final_weights,
        "rng": rng_state(),
    }
    atomic_torch_save(payload, run.cfg.checkpoint)
    run.last_checkpoint = (run.cfg.checkpoint, done)


def _model_params(run: _SVIRun) -> dict[str, torch.Tensor]:
    """The trained parameters that are not the guide's, by param-store name, unconstrained (copies): those the model
    creates with ``pyro.param`` (a learned prior scale, the centring of ``LocScaleReparam(centered=None)``), or a
    guide function's. The guide's own are in its ``state_dict``."""
    own = {id(p) for p in run.guide.parameters()} if isinstance(run.guide, torch.nn.Module) else set()
    trained = {id(p) for p in run.params} - own
    store = pyro.get_param_store()
    return {name: p.detach().clone() for name, p in store._params.items() if id(p) in trained}


def _restore_model_params(
    model, guide, saved: dict, source, args: tuple, kwargs: dict, caller: str = "fit", error=CheckpointError
) -> None:
    """Put a checkpoint's :func:`_model_params` (or a saved guide's) back, in place (the optimiser's state refers to
    these tensors): the model runs once first (on a draw of the guide, blocked), so that it creates its parameters
    with their constraints. A saved parameter the model does not create (or of another shape) raises ``error``."""
    values = saved.get("model_params", {})  # (none in checkpoints written before they were saved)
    if not values:
        return
    with torch.no_grad(), poutine.block():
        replayed_traces(model, guide, *args, **kwargs)
    store = pyro.get_param_store()
    for name, value in values.items():
        held = store._params.get(name)
        if held is None or held.shape != value.shape:
            what = "does not create it" if held is None else f"gives it shape {tuple(held.shape)}"
            fix = (
                "resume with the model the run was started with"
                if caller == "fit"
                else "build the guide on the model it was saved with"
            )
            raise error(
                f"{caller}: {str(source)!r} holds the parameter {name!r} of shape {tuple(value.shape)}, but the "
                f"model {what}; {fix}"
            )
        with torch.no_grad():
            held.copy_(value)


def _first_step_params(step_params: dict) -> list[torch.Tensor]:
    params = list(step_params.values())
    if not params:
        raise ValueError(
            "fit: the guide has no parameters, so nothing would be trained (an empty param store). For "
            "AutoNormalizingFlow the init_transform_fn must return one transform that is an nn.Module, e.g. "
            "a pyroflows builder (a plain list of transforms or `t.inv` of a module is not registered by Pyro)."
        )
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        raise ValueError(
            f"fit: none of the guide's {len(params)} parameters received a gradient: the param store probably "
            "holds stale entries under the same names that shadow the guide's own parameters. Call "
            "pyro.clear_param_store() before building a new guide."
        )
    return params


def plate_nesting(trace) -> int:
    """How many batch dims the vectorised plates of ``trace`` use (``-min(frame.dim)``; 0 without plates).

    :param trace: a Pyro trace, e.g. ``poutine.trace(model).get_trace(*args)``.
    :returns: the number of batch dims, an ``int``.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro import poutine
        >>> from pyroflows.infer import plate_nesting
        >>> def model():
        ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("rows", 3, dim=-2), pyro.plate("cols", 4):
        ...         pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> plate_nesting(poutine.trace(model).get_trace())
        2
        >>> plate_nesting(poutine.trace(lambda: pyro.sample("y", dist.Normal(0.0, 1.0))).get_trace())
        0
    """
    dims = [
        -f.dim for s in trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized
    ]
    return max(dims, default=0)


def replayed_traces(model, guide, *args, **kwargs):
    """One blocked, gradient-free run of ``guide``, and of ``model`` replayed on it: ``(guide_trace, model_trace)``.

    :param model: a Pyro model.
    :param guide: a Pyro guide for it.
    :param args: positional arguments of ``model`` and ``guide``.
    :param kwargs: keyword arguments of ``model`` and ``guide``.
    :returns: ``(guide_trace, model_trace)``; the model's latent sites hold the guide's values.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.infer import replayed_traces
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> pyro.clear_param_store()
        >>> guide_trace, model_trace = replayed_traces(model, AutoNormal(model), torch.tensor([0.5, 1.5, 1.0]))
        >>> torch.equal(guide_trace.nodes["mu"]["value"], model_trace.nodes["mu"]["value"])
        True
        >>> model_trace.nodes["y"]["is_observed"], guide_trace.nodes["mu"]["value"].requires_grad
        (True, False)
    """
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


def max_plate_nesting(model, guide, *args, **kwargs) -> int:
    """The plate nesting of ``model`` replayed on one (blocked, gradient-free) run of ``guide``.

    The larger of the two traces' :func:`plate_nesting`, as ``Trace_ELBO(max_plate_nesting=...)`` wants it.

    :param model: a Pyro model.
    :param guide: a Pyro guide for it.
    :param args: positional arguments of ``model`` and ``guide``.
    :param kwargs: keyword arguments of ``model`` and ``guide``.
    :returns: the number of batch dims used by plates, an ``int``.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.infer import max_plate_nesting
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> pyro.clear_param_store()
        >>> max_plate_nesting(model, AutoNormal(model), torch.tensor([0.5, 1.5, 1.0]))
        1
    """
    return max(plate_nesting(trace) for trace in replayed_traces(model, guide, *args, **kwargs))


# --- building, saving and loading guides ---------------------------------------------------------------------


def is_built(guide) -> bool:
    """Whether ``guide`` has set itself up: an AutoGuide builds its prototype (and ``AutoNormalizingFlow`` its
    transform) on first use; any other guide counts as built.

    :param guide: a Pyro guide.
    :returns: a ``bool``.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.infer import is_built
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> pyro.clear_param_store()
        >>> guide = AutoNormal(model)
        >>> is_built(guide)
        False
        >>> _ = guide()  # the first call builds it
        >>> is_built(guide), is_built(lambda: None)  # a plain function is always "built"
        (True, True)
    """
    return not isinstance(guide, AutoGuide) or (
        guide.prototype_trace is not None and getattr(guide, "transform", 0) is not None
    )


def _ensure_built(guide, *args, **kwargs) -> None:
    """Run ``guide`` once (blocked, no gradients) if it has not set itself up yet.

    A flow guide's first layer sees standard-normal noise, so an ActNorm's data-dependent init would only estimate
    the identity it starts as: the one draw of this call leaves it there (inside Pyro's handlers, ActNorm does not
    warn about a one-row init batch)."""
    if not is_built(guide):
        with torch.no_grad(), poutine.block():
            guide(*args, **kwargs)


def _module_params(guide) -> dict[str, tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """Param-store name -> (owning module, attribute, parameter) for every nn.Module parameter the guide
    registers through ``pyro.module`` (plain ``nn.Module`` attributes of a ``PyroModule`` guide)."""
    from pyro.nn import PyroModule
    from pyro.params.param_store import param_with_module_name

    out = {}
    if not isinstance(guide, PyroModule):
        return out
    if isinstance(guide, AutoFlow):  # one flat parameter holds the flow's values (the layers' are views of it)
        flat = guide._parameters.get(FLAT_NAME)
        return {} if flat is None else {guide._pyro_get_fullname(FLAT_NAME): (guide, FLAT_NAME, flat)}
    for attr, sub in guide.named_children():
        if isinstance(sub, PyroModule):
            continue
        prefix = guide._pyro_get_fullname(attr)
        for name, p in sub.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = sub.get_submodule(owner_name) if owner_name else sub
            out[param_with_module_name(prefix, name)] = (owner, leaf, p)
    return out


def sync_param_store(guide, *model_args, **model_kwargs) -> int:
    """Make ``guide`` use the values the param store holds under its names, and share them.

    Pyro registers a plain ``nn.Module`` inside a guide (such as ``AutoNormalizingFlow``'s transform) with
    ``pyro.module(..., update_module_params=False)``: values loaded into the param store with
    ``pyro.get_param_store().load(path)`` are then *not* used by a freshly built guide, and the optimiser
    would update the store's copies while the guide computes with its own. This function builds the guide
    if needed and puts the store's tensors into the modules (so both are one tensor), and marks data-dependent
    layers (ActNorm) initialised so the loaded values are not overwritten. :func:`fit` calls it first.

    Buffers (permutations, spectral-norm power-iteration vectors) are not in the param store; pyroflows'
    vector builders use fixed permutations, so a rebuilt flow matches. For an exact copy including buffers,
    use :func:`save_guide` / :func:`load_guide`.

    :param guide: a Pyro guide; only ``nn.Module`` parameters registered with ``pyro.module`` (such as
        ``AutoNormalizingFlow``'s transform) are synced, others already read the param store.
    :param model_args: positional arguments of the model and guide, to build the guide if it is not built.
    :param model_kwargs: keyword arguments of the model and guide, likewise.
    :returns: the number of parameters taken from the param store.

    Example::

        >>> import os, tempfile
        >>> import pyro, pyro.distributions as dist, pyroflows, torch
        >>> from functools import partial
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> from pyroflows.infer import fit, sync_param_store
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.tensor([0.5, 1.5, 1.0])
        >>> pyro.clear_param_store()
        >>> guide = AutoNormalizingFlow(model, partial(pyroflows.planar_flow, num_layers=2))
        >>> _ = fit(model, guide, num_steps=20, model_args=(y,), progress=False, seed=0)
        >>> with tempfile.TemporaryDirectory() as tmp:  # e.g. a fit in another process
        ...     pyro.get_param_store().save(os.path.join(tmp, "params.pt"))
        ...     pyro.clear_param_store()
        ...     pyro.get_param_store().load(os.path.join(tmp, "params.pt"))
        >>> fresh = AutoNormalizingFlow(model, partial(pyroflows.planar_flow, num_layers=2))
        >>> sync_param_store(fresh, y) == len(list(fresh.parameters()))
        True
        >>> all(torch.equal(a, b) for a, b in zip(guide.parameters(), fresh.parameters()))
        True
    """
    _ensure_built(guide, *model_args, **model_kwargs)
    store = pyro.get_param_store()
    adopted = 0
    for name, (owner, leaf, p) in _module_params(guide).items():
        if name not in store:
            continue
        stored = store.get_param(name)
        if stored is p:
            continue
        if stored.shape != p.shape:
            raise ValueError(
                f"sync_param_store: the param store holds {name!r} with shape {tuple(stored.shape)} but the "
                f"guide's parameter has shape {tuple(p.shape)}; call pyro.clear_param_store() before building "
                "a different guide."
            )
        if isinstance(owner, AutoFlow):
            owner._adopt(store._params[name])  # also makes the layers' parameters views of it
            adopted += 1
            continue
        value = parameter_like(store._params[name], p)
        owner._parameters[leaf] = value
        share_with_store(store, name, value)
        adopted += 1
    if adopted:
        for module in guide.modules():
            if isinstance(module, ActNorm):
                module.mark_initialized()
    return adopted


def save_guide(guide, path: str | os.PathLike, *model_args, **model_kwargs) -> None:
    """Save a fitted guide's ``state_dict`` (parameters *and* buffers) atomically to ``path``, with the parameters
    its model creates (``pyro.param`` in the model: a learned prior scale, the centrings that
    ``poutine.reparam(model, config=AutoReparam())`` learns), which the guide's draws depend on.

    Unlike the param store, this keeps buffers (permutations, ActNorm flags, spectral-norm vectors), so
    :func:`load_guide` restores the guide exactly. The model's parameters are found by running it once, replayed on a
    draw of the guide (blocked, no gradients), which needs the model's arguments; that run happens only when the param
    store holds parameters the guide does not own, so a model without parameters needs no arguments here.

    :param guide: a fitted (or at least built) guide that is an ``nn.Module``, e.g. an ``AutoNormalizingFlow``.
    :param path: the file to write (replaced atomically if it exists).
    :param model_args: positional arguments of the model and guide (only used to find the model's parameters).
    :param model_kwargs: keyword arguments of the model and guide, likewise.
    :raises TypeError: if ``guide`` is not an ``nn.Module``.
    :raises ValueError: if ``guide`` was never run, or if the param store holds parameters the guide does not own and
        the model cannot be run without the arguments that were not passed.

    Example::

        >>> import os, tempfile
        >>> import pyro, pyro.distributions as dist, pyroflows, torch
        >>> from functools import partial
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> from pyroflows.infer import fit, save_guide
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> pyro.clear_param_store()
        >>> guide = AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=2))
        >>> _ = fit(model, guide, num_steps=10, progress=False, seed=0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_guide(guide, os.path.join(tmp, "guide.pt"))
        ...     print(os.listdir(tmp))
        ['guide.pt']
    """
    if not isinstance(guide, torch.nn.Module):
        raise TypeError(f"save_guide: the guide must be an nn.Module (a Pyro AutoGuide), got {type(guide).__name__}")
    if not is_built(guide):
        raise ValueError("save_guide: the guide was never run or fitted; fit it first (pyroflows.infer.fit)")
    payload = _guide_payload(guide)
    payload["model_params"] = _guide_model_params(guide, model_args, model_kwargs)
    atomic_torch_save(payload, path)


def _guide_payload(guide) -> dict:
    return {"format": _GUIDE_FORMAT, "class": type(guide).__name__, "state": guide.state_dict()}


def _guide_model_params(guide, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The param-store parameters that the guide's model creates and the guide does not own, by name, unconstrained
    (copies); none without a model (a guide that is not an ``AutoGuide``) or when the store holds nothing else."""
    model = getattr(guide, "model", None)
    store = pyro.get_param_store()
    own = {id(p) for p in guide.parameters()}
    others = sorted(name for name, p in store._params.items() if id(p) not in own)
    if model is None or not others:
        return {}
    try:
        _, model_trace = replayed_traces(model, guide, *args, **kwargs)
    except TypeError as err:
        if args or kwargs:
            raise
        shown = ", ".join(repr(n) for n in others[:5]) + (", ..." if len(others) > 5 else "")
        raise ValueError(
            f"save_guide: the param store holds parameters the guide does not own ({shown}), and finding which of "
            f"them the model creates means running it, which failed without arguments ({err}); pass the model's "
            "arguments after the path, save_guide(guide, path, *model_args), or clear stale parameters "
            "(pyro.clear_param_store() before building the guide)"
        ) from err
    names = [name for name, site in model_trace.nodes.items() if site["type"] == "param"]
    return {
        name: store._params[name].detach().clone()
        for name in names
        if name in store._params and id(store._params[name]) not in own
    }


def load_guide(guide, path: str | os.PathLike, *model_args, **model_kwargs):
    """Load a guide saved by :func:`save_guide` into ``guide``, a freshly built guide of the same kind.

    ``AutoNormalizingFlow`` creates its transform on first use, so ``load_state_dict`` on a fresh guide fails;
    this runs the guide once (with ``model_args`` / ``model_kwargs``, blocked), then loads the state and
    points the param store at the loaded tensors. Parameters of the model saved with the guide (a learned centring)
    are put back into the param store, after one blocked run of the model creates them. Returns ``guide``.

    :param guide: a new guide built like the saved one (same class, model and flow architecture).
    :param path: a file written by :func:`save_guide`.
    :param model_args: positional arguments of the model and guide, to build ``guide`` first.
    :param model_kwargs: keyword arguments of the model and guide, likewise.
    :returns: ``guide``, with the saved parameters and buffers.
    :raises ValueError: if ``path`` is missing or not a saved guide (read with :func:`pyroflows.run.load_checkpoint`),
        holds a guide of another class or architecture, or a model parameter that the guide's model does not create.

    Example::

        >>> import os, tempfile
        >>> import pyro, pyro.distributions as dist, pyroflows, torch
        >>> from functools import partial
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> from pyroflows.infer import fit, load_guide, save_guide
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)
        >>> y = torch.tensor([[0.5, -1.0], [1.5, 0.0]])
        >>> flow = partial(pyroflows.realnvp, num_layers=2)
        >>> pyro.clear_param_store()
        >>> guide = AutoNormalizingFlow(model, flow)
        >>> _ = fit(model, guide, num_steps=10, model_args=(y,), progress=False, seed=0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     save_guide(guide, os.path.join(tmp, "guide.pt"))
        ...     pyro.clear_param_store()  # e.g. a new process
        ...     loaded = load_guide(AutoNormalizingFlow(model, flow), os.path.join(tmp, "guide.pt"), y)
        >>> pyro.set_rng_seed(1)
        >>> a = guide(y)["mu"]
        >>> pyro.set_rng_seed(1)
        >>> torch.equal(a, loaded(y)["mu"])  # the same draws: parameters and buffers match
        True
    """
    try:
        payload = load_checkpoint(path, marker=_GUIDE_FORMAT)
    except CheckpointError as err:
        raise ValueError(
            f"load_guide: {os.fspath(path)!r} is not a guide saved by pyroflows.infer.save_guide ({err})"
        ) from err
    _load_guide_state(guide, payload, os.fspath(path), "load_guide", *model_args, **model_kwargs)
    if payload.get("model_params"):  # (files written before the model's parameters were saved have none)
        _restore_model_params(
            guide.model, guide, payload, os.fspath(path), model_args, model_kwargs, "load_guide", ValueError
        )
    return guide


def _load_guide_state(guide, payload: dict, source: str, caller: str, *model_args, **model_kwargs):
    """Build ``guide`` if needed, load a :func:`_guide_payload` into it and share its tensors with the store."""
    if payload["class"] != type(guide).__name__:
        raise ValueError(f"{caller}: {source!r} holds a guide of class {payload['class']}, not {type(guide).__name__}")
    _ensure_built(guide, *model_args, **model_kwargs)
    try:
        guide.load_state_dict(payload["state"])
    except RuntimeError as err:
        raise ValueError(f"{caller}: the saved guide does not fit this guide's architecture: {err}") from None
    store = pyro.get_param_store()
    for name, (_, _, p) in _module_params(guide).items():
        share_with_store(store, name, p)  # the store and the module share the loaded tensors
    return guide
