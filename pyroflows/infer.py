"""Variational inference with flow guides: :func:`fit` runs SVI with the checks a long run needs, and
:func:`save_guide` / :func:`load_guide` / :func:`sync_param_store` keep a fitted guide across processes.

Guides are Pyro's own ``AutoNormalizingFlow`` with a pyroflows builder::

    guide = AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=8))
    result = pyroflows.infer.fit(model, guide, num_steps=2000, model_args=(data,))

Every Pyro guide works with :func:`fit` (``AutoNormal``, hand-written guides, ...).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoGuide

from .train import TrainingError, atomic_torch_save
from .train.checkpoint import CheckpointError, load_checkpoint, rng_state, set_rng_state
from .transforms import ActNorm

__all__ = [
    "SVIResult",
    "TrainingError",
    "fit",
    "load_guide",
    "is_built",
    "max_plate_nesting",
    "plate_nesting",
    "replayed_traces",
    "save_guide",
    "sync_param_store",
]

_SCHEDULES = ("constant", "cosine", "exponential")


@dataclass
class SVIResult:
    """What :func:`fit` returns.

    :ivar numpy.ndarray losses: the loss (negative ELBO estimate) at every step, shape ``(num_steps,)``.
    :ivar guide: the fitted guide (the same object that was passed in).
    :ivar float seconds: wall time of the optimisation.
    :ivar numpy.ndarray lr: the learning rate used at every step, shape ``(num_steps,)``.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.infer import fit
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> pyro.clear_param_store()
        >>> guide = AutoNormal(model)
        >>> result = fit(model, guide, num_steps=50, lr=0.05, progress=False, seed=0)
        >>> result.losses.shape, result.lr.shape, result.guide is guide
        ((50,), (50,), True)
        >>> round(float(result.lr[0]), 4), round(float(result.lr[-1]), 4)  # cosine decay to lr * final_lr_factor
        (0.05, 0.0025)
        >>> bool((result.elbo == -result.losses).all()), type(result.final_elbo(window=10))
        (True, <class 'float'>)
    """

    losses: np.ndarray
    guide: Callable
    seconds: float
    lr: np.ndarray = field(repr=False)

    @property
    def elbo(self) -> np.ndarray:
        """The ELBO trace, ``-losses``."""
        return -self.losses

    def final_elbo(self, window: int = 100) -> float:
        """Mean ELBO estimate over the last ``window`` steps (a noisy per-step estimate smoothed)."""
        return float(self.elbo[-window:].mean())


def _lr_factor(schedule: str, num_steps: int, final_factor: float, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        t = min(step / max(num_steps - 1, 1), 1.0)
        if schedule == "cosine":
            decay = final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))
        elif schedule == "exponential":
            decay = final_factor**t
        else:
            decay = 1.0
        return warm * decay

    return factor


def _check_fit_args(num_steps, lr, num_particles, lr_schedule, final_lr_factor, clip_norm):
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"fit: num_steps must be a non-negative int, got {num_steps!r}")
    if not lr > 0:
        raise ValueError(f"fit: lr must be > 0, got {lr!r}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"fit: num_particles must be a positive int, got {num_particles!r}")
    if lr_schedule not in _SCHEDULES:
        raise ValueError(f"fit: lr_schedule must be one of {_SCHEDULES}, got {lr_schedule!r}")
    if not 0 < final_lr_factor <= 1:
        raise ValueError(f"fit: final_lr_factor must be in (0, 1], got {final_lr_factor!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"fit: clip_norm must be > 0 or None, got {clip_norm!r}")


def fit(
    model: Callable,
    guide: Callable,
    num_steps: int = 1000,
    *,
    model_args: Sequence = (),
    model_kwargs: dict | None = None,
    lr: float = 1e-2,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict | None = None,
    lr_schedule: str = "cosine",
    final_lr_factor: float = 0.05,
    warmup_steps: int = 0,
    num_particles: int = 1,
    vectorize_particles: bool = True,
    loss: ELBO | None = None,
    clip_norm: float | None = 10.0,
    progress: bool = True,
    seed: int | None = None,
    callback: Callable[[int, float], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool | str = False,
) -> SVIResult:
    """Fit ``guide`` to ``model``'s posterior by stochastic variational inference.

    Each step is Pyro's ``SVI.step`` (parameters captured from a trace, ``loss_and_grads``, one optimiser
    update), with these additions:

    - the loss and every gradient are checked *before* the update; a non-finite value stops the run with
      :class:`~pyroflows.train.TrainingError` naming the step, and the parameters stay at their last finite
      values;
    - a guide without parameters (``AutoNormalizingFlow`` given a plain list of transforms, or ``t.inv``, trains
      silently with an empty param store in Pyro) is an error, and so is a guide none of whose parameters get a
      gradient (a stale param store entry shadowing the guide's module);
    - values already in the param store under the guide's names are adopted first (:func:`sync_param_store`),
      so ``pyro.get_param_store().load(path)`` followed by ``fit`` resumes a fitted guide;
    - the global gradient norm is clipped to ``clip_norm``; the learning rate follows ``lr_schedule``
      (``"constant"``, ``"cosine"`` or ``"exponential"`` decay to ``lr * final_lr_factor``) after an optional
      linear warm-up; a tqdm bar shows the running ELBO.

    Parameters live in Pyro's param store (``pyro.get_param_store()``), as with ``SVI``.

    :param model: a Pyro model.
    :param guide: a Pyro guide, e.g. ``AutoNormalizingFlow(model, partial(pyroflows.realnvp, num_layers=8))``.
    :param int num_steps: optimisation steps.
    :param model_args: positional arguments of ``model`` and ``guide``.
    :param dict model_kwargs: keyword arguments of ``model`` and ``guide``.
    :param float lr: peak learning rate.
    :param optimizer: a ``torch.optim.Optimizer`` class (default Adam).
    :param dict optimizer_kwargs: more arguments of the optimiser (e.g. ``{"betas": (0.9, 0.99)}``).
    :param str lr_schedule: ``"constant"``, ``"cosine"`` or ``"exponential"``.
    :param float final_lr_factor: the learning rate at the last step is ``lr * final_lr_factor``.
    :param int warmup_steps: linear warm-up steps.
    :param int num_particles: Monte Carlo particles per ELBO estimate.
    :param bool vectorize_particles: draw the particles in one vectorised pass (needs
        ``pyro.plate``-annotated models, as Pyro's ``Trace_ELBO``).
    :param loss: a Pyro ``ELBO`` instance instead of ``Trace_ELBO(num_particles, vectorize_particles)``.
    :param float clip_norm: clip the global gradient norm; ``None`` disables clipping.
    :param bool progress: show a progress bar.
    :param int seed: ``pyro.set_rng_seed(seed)`` first.
    :param callback: called as ``callback(step, loss)`` after every step.
    :param checkpoint: a file that the run is saved to atomically every ``checkpoint_every`` steps and at the end:
        the guide's ``state_dict``, the optimiser and schedule states, the losses and learning rates so far, the
        RNG states and the settings. An existing file is never overwritten unless the run resumes from it.
    :param int checkpoint_every: steps between checkpoints (default: a tenth of ``num_steps``).
    :param resume: ``True`` continues from ``checkpoint`` (an error if it is missing), ``"auto"`` when it exists,
        ``False`` starts afresh (an error if ``checkpoint`` exists). Give a freshly built guide of the same kind and
        the same arguments (the settings are checked): the continued run takes the steps an uninterrupted run
        would have taken, draw for draw.
    :returns: :class:`SVIResult` with the loss trace (of all steps, those before a resume included).
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
    _check_fit_args(num_steps, lr, num_particles, lr_schedule, final_lr_factor, clip_norm)
    model_kwargs = dict(model_kwargs or {})
    settings = {
        "guide": type(guide).__name__,
        "num_steps": num_steps,
        "lr": float(lr),
        "optimizer": getattr(optimizer, "__name__", str(optimizer)),
        "lr_schedule": lr_schedule,
        "final_lr_factor": float(final_lr_factor),
        "warmup_steps": warmup_steps,
        "num_particles": num_particles,
        "clip_norm": clip_norm,
    }
    saved = _open_svi_checkpoint(checkpoint, checkpoint_every, resume, settings)
    if seed is not None:
        pyro.set_rng_seed(seed)
    sync_param_store(guide, *model_args, **model_kwargs)
    elbo = loss
    if elbo is None:
        # give the plate nesting rather than letting Trace_ELBO guess it (it logs its guess at INFO level)
        nesting = max_plate_nesting(model, guide, *model_args, **model_kwargs)
        elbo = Trace_ELBO(
            num_particles=num_particles, vectorize_particles=vectorize_particles, max_plate_nesting=nesting
        )

    factor = _lr_factor(lr_schedule, num_steps, final_lr_factor, warmup_steps)
    opt = None
    params: list[torch.Tensor] = []
    losses = np.full(num_steps, np.nan)
    lrs = np.full(num_steps, np.nan)
    first = 0
    if saved is not None:  # the guide's state, the history so far, then the RNG exactly as it was after that step
        _load_guide_state(guide, saved["guide"], os.fspath(checkpoint), "fit", *model_args, **model_kwargs)
        first = int(saved["step"])
        losses[:first] = saved["losses"].numpy()
        lrs[:first] = saved["lrs"].numpy()
        set_rng_state(saved["rng"])
    every = checkpoint_every or max(1, num_steps // 10)

    def save(done: int) -> None:
        payload = {
            "format": _SVI_FORMAT,
            "step": done,
            "settings": settings,
            "guide": _guide_payload(guide),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "losses": torch.from_numpy(losses[:done].copy()),
            "lrs": torch.from_numpy(lrs[:done].copy()),
            "rng": rng_state(),
        }
        atomic_torch_save(payload, checkpoint)

    bar = _progress(num_steps, progress)
    if bar is not None and first:
        bar.update(first)
    start = time.perf_counter()
    for step in range(first, num_steps):
        with poutine.trace(param_only=True) as capture:
            loss_value = elbo.loss_and_grads(model, guide, *model_args, **model_kwargs)
        step_params = {id(p): p for p in (s["value"].unconstrained() for s in capture.trace.nodes.values())}
        if opt is None:
            params = _first_step_params(step_params)
            known = set(step_params)
            opt = optimizer(params, lr=lr, **_optimizer_kwargs(optimizer, optimizer_kwargs))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            if saved is not None:
                opt.load_state_dict(saved["optimizer"])
                sched.load_state_dict(saved["scheduler"])
        elif not known.issuperset(step_params):  # a guide may create parameters lazily
            new = [p for k, p in step_params.items() if k not in known]
            known.update(id(p) for p in new)
            params += new
            opt.add_param_group({"params": new})
        loss_value = float(loss_value)
        # one fused norm over all gradients: non-finite if any gradient is
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm is not None else math.inf)
        _check_finite(step, loss_value, float(grad_norm), params)
        lrs[step] = opt.param_groups[0]["lr"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses[step] = loss_value
        if checkpoint is not None and ((step + 1) % every == 0 or step + 1 == num_steps):
            save(step + 1)
        if callback is not None:
            callback(step, loss_value)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == num_steps - 1:
                bar.set_postfix(elbo=f"{-np.mean(losses[max(0, step - 49) : step + 1]):.4g}", refresh=False)
    if bar is not None:
        bar.close()
    return SVIResult(losses=losses, guide=guide, seconds=time.perf_counter() - start, lr=lrs)


_SVI_FORMAT = "pyroflows-svi-1"


def _open_svi_checkpoint(checkpoint, checkpoint_every, resume, settings: dict) -> dict | None:
    """Check the checkpoint arguments; the saved run to continue, or ``None`` for a fresh start."""
    if resume not in (True, False, "auto"):
        raise ValueError(f"fit: resume must be True, False or 'auto', got {resume!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"fit: checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if checkpoint is None:
        if resume is not False or checkpoint_every is not None:
            raise ValueError("fit: resume and checkpoint_every need checkpoint= (the file to save to)")
        return None
    path = os.fspath(checkpoint)
    exists = os.path.isfile(path)
    if not exists:
        if resume is True:
            raise CheckpointError(f"fit: no checkpoint at {path!r} to resume from")
        return None
    if resume is False:
        raise CheckpointError(
            f"fit: {path!r} already exists; pass resume=True (or 'auto') to continue that run, or remove the file"
        )
    saved = load_checkpoint(path, marker=_SVI_FORMAT)
    differ = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"fit: checkpoint {path!r} was written with other settings ({detail})")
    return saved


def _optimizer_kwargs(optimizer, kwargs) -> dict:
    kwargs = dict(kwargs or {})
    if optimizer in (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax):
        kwargs.setdefault("foreach", True)  # one fused update for the many small tensors of a flow (CPU too)
    return kwargs


def _progress(num_steps, progress):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=num_steps, desc="svi", unit="step", dynamic_ncols=True)


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


def _check_finite(step: int, loss_value: float, grad_norm: float, params: list[torch.Tensor]) -> None:
    bad = None
    if not math.isfinite(loss_value):
        bad = f"the loss is {loss_value}"
    elif not math.isfinite(grad_norm):
        bad = f"the gradient norm is {grad_norm}"
    if bad is not None:
        for p in params:
            p.grad = None
        raise TrainingError(
            f"fit: {bad} at step {step}; stopped before the update, the parameters keep their values after "
            f"step {step - 1}. Lower lr, set clip_norm, or check the model for invalid values (e.g. a scale "
            "that can reach zero)."
        )


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
    """Run ``guide`` once (blocked, no gradients) if it has not set itself up yet."""
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
        value = store._params[name]
        if not isinstance(value, torch.nn.Parameter) or value.device != p.device or value.dtype != p.dtype:
            value = torch.nn.Parameter(value.detach().to(p.device, p.dtype))
        owner._parameters[leaf] = value
        _share_with_store(store, name, value)
        adopted += 1
    if adopted:
        for module in guide.modules():
            if isinstance(module, ActNorm):
                module.initialized.fill_(True)
                module._known_initialized = True
    return adopted


def _share_with_store(store, name: str, p: torch.Tensor) -> None:
    store._params[name] = p
    store._param_to_name[p] = name


def save_guide(guide, path: str | os.PathLike) -> None:
    """Save a fitted guide's ``state_dict`` (parameters *and* buffers) atomically to ``path``.

    Unlike the param store, this keeps buffers (permutations, ActNorm flags, spectral-norm vectors), so
    :func:`load_guide` restores the guide exactly.

    :param guide: a fitted (or at least built) guide that is an ``nn.Module``, e.g. an ``AutoNormalizingFlow``.
    :param path: the file to write (replaced atomically if it exists).
    :raises TypeError: if ``guide`` is not an ``nn.Module``.
    :raises ValueError: if ``guide`` was never run.

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
    atomic_torch_save(_guide_payload(guide), path)


def _guide_payload(guide) -> dict:
    return {"format": "pyroflows-guide-1", "class": type(guide).__name__, "state": guide.state_dict()}


def load_guide(guide, path: str | os.PathLike, *model_args, **model_kwargs):
    """Load a guide saved by :func:`save_guide` into ``guide``, a freshly built guide of the same kind.

    ``AutoNormalizingFlow`` creates its transform on first use, so ``load_state_dict`` on a fresh guide fails;
    this runs the guide once (with ``model_args`` / ``model_kwargs``, blocked), then loads the state and
    points the param store at the loaded tensors. Returns ``guide``.

    :param guide: a new guide built like the saved one (same class, model and flow architecture).
    :param path: a file written by :func:`save_guide`.
    :param model_args: positional arguments of the model and guide, to build ``guide`` first.
    :param model_kwargs: keyword arguments of the model and guide, likewise.
    :returns: ``guide``, with the saved parameters and buffers.
    :raises ValueError: if ``path`` is not a saved guide, or holds a guide of another class or architecture.

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
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "pyroflows-guide-1":
        raise ValueError(f"load_guide: {os.fspath(path)!r} is not a guide saved by pyroflows.infer.save_guide")
    return _load_guide_state(guide, payload, os.fspath(path), "load_guide", *model_args, **model_kwargs)


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
        _share_with_store(store, name, p)  # the store and the module share the loaded tensors
    return guide
