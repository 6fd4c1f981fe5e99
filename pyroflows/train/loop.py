r"""Maximum-likelihood training of a :class:`~pyroflows.FlowDensity`: :func:`fit`, configured by one frozen
:class:`FitConfig`, on the run engine of :mod:`pyroflows.run` (errors, checkpoints, resume, schedule, progress).

Images (an :class:`~pyroflows.data.ImageDataset` or an integer tensor) are dequantised on the device each step,
:math:`\tilde x = (x + u)/n_{bins}`, and the loss is bits/dim; float data (e.g. 2-D toys) is used as is and the
loss is the negative log-likelihood in nats. The step-to-batch map is a pure function of ``(seed, step)``
(``DistributedSampler`` order per epoch), and RNG states, optimiser, schedule and EMA go into every checkpoint,
so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler

from .._deprecation import renamed
from ..cif import CIFDensity
from ..density import FlowDensity
from ..hybrid import HybridDensity
from ..nn.conditioners import set_compute_dtype
from ..run import (
    CHECKPOINT,
    FORMAT,
    VERSION,
    CheckpointError,
    OutputError,
    TrainingError,
    atomic_torch_save,
    atomic_write,
    check_choice,
    check_data,
    check_device,
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
from . import distributed
from .checkpoint import load_model_state
from .evaluation import _as_data, _Data, _loss_units, evaluate, evaluate_hybrid

METRICS = "metrics.jsonl"
OPTIMIZERS = ("adam", "adamax")
# the settings that change a run's trajectory: resuming with any of them changed is a CheckpointError
_TRAJECTORY_KEYS = (
    "batch_size",
    "lr",
    "optimizer",
    "warmup_steps",
    "clip_norm",
    "ema",
    "seed",
    "world_size",
    "amp",
    "weight_decay",
    "n_bins",
)
_RESUME_HINT = "resume=True (pyroflows fit --resume)"
# what a density checkpoint must hold for a resume
_CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "step", "losses", "evals", "rng")


@dataclass(frozen=True)
class FitConfig:
    """The settings of one :func:`fit` run, checked in one place (``ValueError`` naming the argument and value).

    :func:`fit` builds it from its keywords; each field is the keyword of the same name, documented there:
    ``num_steps``, ``epochs``, ``n_bins``, ``batch_size``, ``lr``, ``optimizer``, ``weight_decay``,
    ``warmup_steps``, ``clip_norm``, ``ema``, ``eval_every``, ``eval_batch_size``, ``sample_every``,
    ``n_samples``, ``temperature``, ``checkpoint_every``, ``log_every``, ``out`` (a ``Path`` or ``None``),
    ``resume``, ``device``, ``amp``, ``compile``, ``seed``, ``init_batch_size``, ``progress``, ``time_limit``,
    ``report``, ``check_invertibility``.

    Example::

        >>> from pyroflows.train import FitConfig
        >>> FitConfig(num_steps=100, lr=1e-3).warmup_steps
        0
        >>> FitConfig(num_steps=0)
        Traceback (most recent call last):
          ...
        ValueError: fit: num_steps must be None or an int >= 1, got 0
    """

    num_steps: int | None = None
    epochs: float | None = None
    n_bins: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    clip_norm: float | None = 50.0
    ema: float | None = None
    eval_every: int | str | None = None
    eval_batch_size: int = 500
    sample_every: int | None = None
    n_samples: int = 64
    temperature: float = 0.7
    checkpoint_every: int | None = None
    log_every: int = 10
    out: Path | None = None
    resume: bool | str | Path = False
    device: Any = "auto"
    amp: bool = False
    compile: bool | str = False
    seed: int = 0
    init_batch_size: int = 512
    progress: bool | None = None
    time_limit: float | None = None
    report: bool = True
    check_invertibility: bool = False

    def __post_init__(self):
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        c = "fit"
        check_int(c, "num_steps", self.num_steps, 1, optional=True)
        check_number(c, "epochs", self.epochs, 0, optional=True)
        if (self.num_steps is None) == (self.epochs is None):
            raise ValueError("fit: give exactly one of num_steps= and epochs=")
        check_int(c, "n_bins", self.n_bins, 2, optional=True)
        check_int(c, "batch_size", self.batch_size, 1)
        check_number(c, "lr", self.lr, 0)
        check_choice(c, "optimizer", str(self.optimizer).lower(), OPTIMIZERS)
        check_number(c, "weight_decay", self.weight_decay, 0, low_open=False)
        check_int(c, "warmup_steps", self.warmup_steps, 0)
        check_number(c, "clip_norm", self.clip_norm, 0, optional=True)
        check_number(c, "ema", self.ema, 0, 1, optional=True)
        if self.eval_every != "auto":
            check_int(c, "eval_every", self.eval_every, 1, optional=True)
        for name in ("sample_every", "checkpoint_every"):
            check_int(c, name, getattr(self, name), 1, optional=True)
        for name in ("eval_batch_size", "n_samples", "log_every", "init_batch_size"):
            check_int(c, name, getattr(self, name), 1)
        check_number(c, "temperature", self.temperature, 0, low_open=False)
        check_resume(c, self.resume, self.out)
        check_choice(c, "amp", self.amp, (True, False))
        if not isinstance(self.compile, (bool, str)):
            raise ValueError(f"fit: compile must be True, False or a backend name, got {self.compile!r}")
        check_seed(c, self.seed)
        check_device(c, self.device)
        check_choice(c, "progress", self.progress, (None, True, False))
        check_number(c, "time_limit", self.time_limit, 0, optional=True)
        check_choice(c, "report", self.report, (True, False))
        check_choice(c, "check_invertibility", self.check_invertibility, (True, False))


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :ivar model: the trained model (the object passed in, trained in place).
    :ivar ema_model: the exponential moving average of the weights (``None`` without ``ema``).
    :ivar int step: number of optimiser steps taken in total (including those before a resume).
    :ivar list losses: training loss per step (bits/dim for images, nats for float data), mean over ranks;
        ``losses[i]`` is the loss of step ``i + 1``.
    :ivar list evals: ``{"step", "test_bpd" or "test_nll", ...}`` per evaluation.
    :ivar out: output directory (``None`` when nothing was written).
    :ivar float seconds: wall time of this call's training loop.

    Example: continuous 2-D data, so the loss and the evaluation are in nats::

        >>> import torch
        >>> from pyroflows.data import get_toy
        >>> from pyroflows.train import build_density, fit
        >>> x = get_toy("two_moons").sample(256, torch.Generator().manual_seed(0))
        >>> result = fit(build_density("realnvp", (2,), num_layers=2), x, x, num_steps=3, device="cpu",
        ...              progress=False)
        >>> result.step, len(result.losses), sorted(result.evals[-1]), result.checkpoint
        (3, 3, ['step', 'test_nll'], None)
    """

    model: FlowDensity
    ema_model: FlowDensity | None
    step: int
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    out: Path | None = None
    seconds: float = 0.0

    @property
    def checkpoint(self) -> Path | None:
        """Path of the last checkpoint (``None`` when none was written)."""
        if self.out is None or not (self.out / CHECKPOINT).is_file():
            return None
        return self.out / CHECKPOINT


@dataclass
class _Run:
    """The mutable state of one :func:`fit` call, passed between its pieces."""

    cfg: FitConfig
    ctx: Any
    model: FlowDensity
    data: _Data
    test_data: _Data | None
    units: Any
    sampler: DistributedSampler
    per_epoch: int
    total: int
    settings: dict
    ckpt_path: Path | None
    optim: torch.optim.Optimizer | None = None
    schedule: Any = None
    ema_model: AveragedModel | None = None
    net: nn.Module | None = None
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    start: int = 0
    reached: int = 0
    last_saved: int | None = None
    metrics: Any = None
    bar: Any = None
    order: torch.Tensor | None = None
    order_epoch: int = -1
    t0: float = 0.0
    last_eval_step: int = 0  # the step of the last evaluation (or the start), for the report and "auto"
    last_eval_end: float = 0.0  # perf_counter when it finished
    last_eval_seconds: float | None = None  # how long it took

    @property
    def writes(self) -> bool:
        return self.ctx.is_main and self.cfg.out is not None

    @property
    def eval_model(self) -> FlowDensity:
        return self.model if self.ema_model is None else self.ema_model.module

    def last_good(self) -> tuple | None:
        """``(path, step)`` of the last checkpoint this run wrote or resumed from, for error messages."""
        return (self.ckpt_path, self.last_saved) if self.last_saved is not None and self.writes else None


# ------------------------------------------------------------------------------------------------ fit
def fit(
    model: FlowDensity,
    train,
    test=None,
    *,
    n_bins: int | None = None,
    num_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    clip_norm: float | None = 50.0,
    ema: float | None = None,
    eval_every: int | str | None = None,
    eval_batch_size: int = 500,
    sample_every: int | None = None,
    n_samples: int = 64,
    temperature: float = 0.7,
    checkpoint_every: int | None = None,
    log_every: int = 10,
    out: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    device: str | torch.device | None = "auto",
    amp: bool = False,
    compile: bool | str = False,  # noqa: A002 - mirrors torch.compile
    seed: int = 0,
    init_batch_size: int = 512,
    progress: bool | None = None,
    time_limit: float | None = None,
    report: bool = True,
    check_invertibility: bool = False,
    steps: int | None = None,
) -> FitResult:
    r"""Train ``model`` by maximum likelihood on ``train``.

    The loop: ActNorm's data-dependent init once, on a dedicated batch of ``init_batch_size`` examples (under
    ``torchrun``, each rank's shard, statistics all-reduced); then ``num_steps`` optimiser steps on batches drawn
    without replacement per epoch (``DistributedSampler`` order); linear learning-rate warm-up; gradient-norm
    clipping; optional EMA of the weights; test evaluation, sample grids (density plots for 2-D data), JSON-lines
    metrics and atomic checkpoints at the given intervals, and all of them once more at the end. Steps are counted
    from 1, in errors, metrics, evaluations and checkpoints alike (:mod:`pyroflows.run`).

    Under ``torchrun`` with more than one process the model is wrapped in ``DistributedDataParallel``, the
    data are sharded, ``batch_size`` is per process, and only rank 0 writes files.

    :param model: a :class:`~pyroflows.FlowDensity` (e.g. from :func:`pyroflows.train.build_density`, whose
        recipe goes into the checkpoint so ``pyroflows sample`` can rebuild it). Trained in place. A
        :class:`~pyroflows.HybridDensity` is trained on its objective :math:`\lambda \log p(x) + \log p(y \mid x)`
        (the loss is its negative in nats per example), needs labelled data (a labelled ``ImageDataset`` or a
        ``(data, labels)`` pair), and its evaluations add ``test_accuracy`` and ``test_class_nll``
        (:func:`~pyroflows.train.evaluate_hybrid`).
    :param train: training data: an :class:`~pyroflows.data.ImageDataset`, an integer tensor ``(N, C, H, W)`` of
        pixels in ``[0, n_bins)``, any ``Dataset`` of images, or a float tensor ``(N, *event_shape)`` of
        continuous data (loss in nats). Held in (device) memory.
    :param test: evaluation data of the same kind (optional).
    :param n_bins: intensity levels of integer pixels given as a tensor (default 256; an ``ImageDataset`` knows
        its own).
    :param num_steps: number of optimiser steps in total (a resumed run continues up to it); or give ``epochs``.
    :param epochs: training length in passes over ``train`` instead of ``num_steps`` (may be fractional).
    :param int batch_size: examples per step (per process under DDP).
    :param float lr: peak learning rate.
    :param str optimizer: ``"adam"`` or ``"adamax"``, built by :func:`pyroflows.run.make_optimizer` (Adam with
        torch's fused update, Adamax with its multi-tensor one).
    :param float weight_decay: the optimiser's weight decay.
    :param int warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``.
    :param clip_norm: clip the global gradient norm (``None``: no clipping; the norm is still checked).
    :param ema: EMA decay in ``(0, 1)`` (e.g. ``0.999``); evaluation and samples then use the averaged weights.
    :param eval_every: evaluate on ``test`` every so many steps (and at the end); ``"auto"``: after at least one
        epoch and once the training time since the last evaluation is at least 9 times what that evaluation took,
        so evaluations take at most about a tenth of the run whatever they cost (a residual flow's exact
        evaluation can cost as much as a hundred training steps); ``None``: at the end only.
    :param int eval_batch_size: batch size of the evaluations (bounds their memory).
    :param sample_every: write ``samples_step<step>.png`` every so many steps (and ``samples.png`` at the end);
        ``None``: at every evaluation.
    :param int n_samples: images per sample grid.
    :param float temperature: the latent's temperature for the sample grids.
    :param checkpoint_every: write ``checkpoint.pt`` every so many steps (and at the end); needs ``out``.
    :param int log_every: with ``out``, write a ``metrics.jsonl`` record every so many steps.
    :param out: the run directory (``checkpoint.pt``, ``metrics.jsonl``, PNGs); ``None`` writes nothing.
    :param resume: ``True`` continues from ``out/checkpoint.pt`` (error if missing), ``"auto"`` when it exists,
        or a path to a checkpoint. Without it, an existing checkpoint in ``out`` is a
        :class:`~pyroflows.run.CheckpointExistsError` (never overwritten). The settings that shape the run's
        trajectory (batch size, learning rate, optimiser, warm-up, clipping, EMA, seed, number of processes,
        ``amp``, weight decay, ``n_bins``) must be those of the checkpoint; ``num_steps`` may grow.
    :param device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a ``torch.device``.
    :param bool amp: run the conditioner networks in bfloat16 (:func:`pyroflows.nn.set_compute_dtype`);
        log-dets stay in float32.
    :param compile: ``True`` or a backend name: run the forward pass through ``torch.compile``. (torch.compile
        switches ``torch.distributions`` validation off process-wide; ``fit`` restores the previous setting.)
    :param int seed: seeds the batch order, the dequantisation noise and the estimators' randomness.
    :param int init_batch_size: examples for ActNorm's data-dependent initialisation.
    :param time_limit: stop after the step during which this many seconds of training have passed, and finish
        as at the last step (evaluation, samples, checkpoint); ``resume=True`` later continues towards
        ``num_steps``.
    :param progress: tqdm progress bar (``None``: only when stderr is a terminal).
    :param bool report: print one line per evaluation to stderr, with or without the bar: step, epoch, mean
        training loss since the last evaluation, test bits/dim (or NLL), training images per second and the
        estimated time left.
    :param bool check_invertibility: at each evaluation, also run :func:`pyroflows.diagnostics.invertibility` on
        (up to) 64 dequantised test examples and record its figures (``inv_error32_max``, ``inv_lipschitz_max``,
        ``inv_inverse_lipschitz_max``, ``inv_condition_max``, ...) with the evaluation and in ``metrics.jsonl``; it
        warns when the flow is numerically non-invertible on them.
    :param steps: the old name of ``num_steps`` (a ``FutureWarning``; removed in 0.3).
    :raises ValueError: for a setting out of range (:class:`FitConfig` names it) or unusable data.
    :raises TrainingError: on a non-finite loss or gradient norm, naming the step; nothing is overwritten.
    :raises CheckpointError: for a missing, corrupted or other-architecture checkpoint on resume, or one written
        with other settings; :class:`~pyroflows.run.CheckpointExistsError` for an existing one without ``resume``.

    Example::

        >>> import pyroflows
        >>> from pyroflows.data import load_digits
        >>> from pyroflows.train import build_density, fit
        >>> model = build_density("glow", (1, 8, 8), levels=1, num_layers=2, hidden=16)
        >>> result = fit(model, load_digits("train"), load_digits("test"), num_steps=20, device="cpu",
        ...              progress=False)
        >>> result.step, len(result.losses), result.evals[-1]["test_bpd"] < 5
        (20, 20, True)
    """
    given = dict(locals())
    given["num_steps"] = renamed("fit", "steps", "num_steps", steps, num_steps)
    config = FitConfig(**{f.name: given[f.name] for f in fields(FitConfig)})
    if not isinstance(model, FlowDensity):
        raise TypeError(f"fit: model must be a pyroflows.FlowDensity, got {type(model).__name__}")
    if config.check_invertibility and isinstance(model, CIFDensity):
        raise ValueError(
            "fit: check_invertibility needs a bijection, and a continuously indexed flow (CIFDensity) is a latent "
            "variable model: check the flow it was built from instead"
        )
    ctx = distributed.setup(config.device)
    finished = False
    try:
        with run_lock(config.out if ctx.rank == 0 else None, "fit"):  # rank 0 is the one that writes
            result = _fit(model, train, test, config, ctx)
        finished = True
        return result
    finally:
        distributed.teardown(ctx, finished)


def _fit(model: FlowDensity, train, test, cfg: FitConfig, ctx) -> FitResult:
    run = _setup(model, train, test, cfg, ctx)
    model.train()
    run.t0 = run.last_eval_end = time.perf_counter()
    run.last_eval_step = run.start
    try:
        # SIGINT/SIGTERM: finish the step, checkpoint, then stop (one process only: under DDP the ranks would have
        # to agree on the step first)
        with stop_on_signals(enabled=ctx.world_size == 1) as request:
            for step in range(run.start, run.total):
                value, grad_norm = _step(run, step + 1)
                if _after_step(run, step + 1, value, grad_norm):
                    break
                if request.signum is not None and cfg.out is not None and run.last_saved != step + 1:
                    _save(run, step + 1)
                request.stop("fit", step + 1, run.ckpt_path if cfg.out is not None else None, _RESUME_HINT)
    except OutputError as e:  # disk full, read-only: say which checkpoint is the last good one
        last = run.last_good()
        where = f"{last[0]} (step {last[1]}) is intact" if last else "no checkpoint of this run was written"
        error = OutputError(f"fit: {e}; the last good checkpoint {where}")
        error.errno = e.errno
        raise error from e
    finally:
        run.bar.close()
        run.metrics.close()
    return FitResult(
        model,
        run.ema_model.module if run.ema_model is not None else None,
        run.reached,
        run.losses,
        run.evals,
        cfg.out if run.writes else None,
        time.perf_counter() - run.t0,
    )


# ------------------------------------------------------------------------------------------------ setup
def _setup(model: FlowDensity, train, test, cfg: FitConfig, ctx) -> _Run:
    """Data, batches, the checkpoint to resume from (checked before anything changes), optimiser and schedule,
    then the restored or freshly initialised state, the wrapped network, metrics file and progress bar."""
    run = _prepare(model, train, test, cfg, ctx)
    source = resume_source(run.ckpt_path, cfg.resume, caller="fit", hint=_RESUME_HINT)
    ckpt = load_checkpoint(source, map_location=ctx.device) if source is not None else None
    if ckpt is not None:
        require_keys(ckpt, _CHECKPOINT_KEYS, source=source, caller="fit")
        if not isinstance(ckpt["config"], dict):
            raise CheckpointError(f"fit: checkpoint {str(source)!r} has no settings dict ('config')")
        trajectory = {k: run.settings[k] for k in _TRAJECTORY_KEYS}
        check_settings(ckpt["config"], trajectory, source=source, caller="fit")
        check_data(ckpt["config"], run.settings["data"], source=source, caller="fit")
    if cfg.amp:
        set_compute_dtype(model, torch.bfloat16)
    run.optim = _make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    run.schedule = make_scheduler(run.optim, "constant", run.total, cfg.warmup_steps)
    if ckpt is not None:
        _restore(run, ckpt, source)
    else:
        _fresh_start(run)
    run.net = _wrap(model, cfg, ctx)
    if run.writes:
        cfg.out.mkdir(parents=True, exist_ok=True)
    run.metrics = _Metrics(cfg.out / METRICS if run.writes else None, run.start if ckpt is not None else None)
    run.bar = progress_bar(run.total, cfg.progress, desc="fit", initial=run.start, enabled=ctx.is_main)
    return run


def _prepare(model: FlowDensity, train, test, cfg: FitConfig, ctx) -> _Run:
    """The model on its device, the data in memory, the batch order and the run's length and settings."""
    dev = ctx.device
    model.to(dev)
    shapes = (model.context_shape, model.num_classes if isinstance(model, HybridDensity) else None)
    data = _as_data(train, cfg.n_bins, model.event_shape, dev, "training data", "fit", *shapes)
    test_n_bins = data.n_bins if cfg.n_bins is None else cfg.n_bins
    test_data = None
    if test is not None:
        test_data = _as_data(test, test_n_bins, model.event_shape, dev, "test data", "fit", *shapes)
    sampler = DistributedSampler(
        range(len(data)),
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=cfg.seed,
        drop_last=ctx.distributed,
    )
    per_epoch = len(sampler) // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"fit: batch_size {cfg.batch_size} exceeds the {len(sampler)} training examples per process")
    total = cfg.num_steps if cfg.num_steps is not None else max(1, round(float(cfg.epochs) * per_epoch))
    settings = {
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "optimizer": cfg.optimizer,
        "warmup_steps": cfg.warmup_steps,
        "clip_norm": cfg.clip_norm,
        "ema": cfg.ema,
        "seed": cfg.seed,
        "world_size": ctx.world_size,
        "amp": bool(cfg.amp),
        "weight_decay": cfg.weight_decay,
        "steps": total,
        "n_bins": data.n_bins,
        # a resumed run must continue on the same data; hashed only where a checkpoint is written or read
        "data": fingerprint(data.x) if cfg.out is not None or cfg.resume is not False else None,
    }
    ckpt_path = cfg.out / CHECKPOINT if cfg.out is not None else None
    # a hybrid model's loss is its objective, -(lam log p(x) + log p(y|x)), in nats per example
    units = (lambda objective: -objective) if isinstance(model, HybridDensity) else _loss_units(data, model.dim)
    return _Run(cfg, ctx, model, data, test_data, units, sampler, per_epoch, total, settings, ckpt_path)


def _restore(run: _Run, ckpt: dict, source: Path) -> None:
    """Model, optimiser, schedule, EMA, history and RNG states as they were after the checkpoint's step."""
    model, cfg = run.model, run.cfg
    load_model_state(model, ckpt["model"], f"checkpoint {str(source)!r}")
    spec = getattr(model, "spec", None)
    if ckpt.get("spec") is not None and spec is not None and ckpt["spec"] != spec:
        raise CheckpointError(f"checkpoint {str(source)!r} is for model {ckpt['spec']}, not {spec}")
    try:
        run.optim.load_state_dict(ckpt["optimizer"])
        run.schedule.load_state_dict(ckpt["scheduler"])
        if cfg.ema:  # check_settings made sure that the run saved EMA weights
            run.ema_model = _averaged(model, cfg.ema)
            run.ema_model.load_state_dict(ckpt["ema"])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"fit: checkpoint {str(source)!r} has an unusable optimiser/schedule/EMA state: {e}"
        ) from e
    run.start = run.reached = run.last_saved = int(ckpt["step"])
    run.losses, run.evals = list(ckpt["losses"]), list(ckpt["evals"])
    ctx = run.ctx
    rng = ckpt["rng"][ctx.rank] if ctx.rank < len(ckpt["rng"]) else None
    if rng is not None:
        set_rng_state(rng)
    else:
        torch.manual_seed(cfg.seed + 7919 * ctx.rank + run.start)


def _fresh_start(run: _Run) -> None:
    """Rank 0's weights on every rank, ActNorm's data-dependent init, the EMA, and the seeded RNG."""
    model, cfg, ctx = run.model, run.cfg, run.ctx
    if ctx.distributed:  # every rank starts from rank 0's weights (1x1 convs, conditioners)
        for tensor in model.state_dict().values():
            torch_dist.broadcast(tensor, src=0)
    _init_actnorm(model, run.data, cfg.init_batch_size, cfg.seed, ctx)  # also sizes lazily sized buffers
    if cfg.ema:
        run.ema_model = _averaged(model, cfg.ema)
        run.ema_model.update_parameters(model)
    torch.manual_seed(cfg.seed + 7919 * ctx.rank)


def _wrap(model: FlowDensity, cfg: FitConfig, ctx) -> nn.Module:
    """The network the steps run through: DDP across processes, ``torch.compile`` on request."""
    net: nn.Module = model
    dev = ctx.device
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        # The first torch.compile of a process turns torch.distributions' default validation off for good
        # (dynamo's one-time patching), and with it pyroflows' validation when that follows torch: keep the
        # user's setting instead of changing it behind their back.
        validate = torch.distributions.Distribution._validate_args
        net = torch.compile(net, backend=cfg.compile if isinstance(cfg.compile, str) else "inductor")
        torch.distributions.Distribution.set_default_validate_args(validate)
    return net


def _make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float):
    key = str(name).lower()
    if key == "adam":
        return make_optimizer(torch.optim.Adam, params, lr=lr, weight_decay=weight_decay)
    if key == "adamax":
        return make_optimizer(torch.optim.Adamax, params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"fit: unknown optimizer {name!r}; choose 'adam' or 'adamax'")


# ------------------------------------------------------------------------------------------------ one step
def _batch(run: _Run, step: int) -> tuple[torch.Tensor, tuple]:
    """The dequantised batch of ``step`` (counted from 1), a pure function of ``(seed, step)`` and the rank, with
    the model's other arguments (contexts or labels, :meth:`_Data.model_args`)."""
    epoch, b = divmod(step - 1, run.per_epoch)
    if epoch != run.order_epoch:
        run.sampler.set_epoch(epoch)
        run.order, run.order_epoch = torch.tensor(list(run.sampler), device=run.ctx.device), epoch
    size = run.cfg.batch_size
    index = run.order[b * size : (b + 1) * size]
    return run.data.batch(index), run.data.model_args(index)


def _step(run: _Run, step: int) -> tuple[float, float]:
    """One update: the loss (mean over ranks) and the gradient norm are checked before the optimiser moves."""
    xb, args = _batch(run, step)
    error = None
    try:
        loss = run.units(run.net(xb, *args).mean())
    except (RuntimeError, ValueError) as e:  # validation found a non-finite value inside a layer
        error, loss = e, torch.full((), math.nan, device=run.ctx.device)
    value = float(distributed.all_mean(loss.detach(), run.ctx))
    check_finite("fit", step, value, cause=error, checkpoint=run.last_good())
    run.optim.zero_grad(set_to_none=True)
    loss.backward()
    clip = run.cfg.clip_norm if run.cfg.clip_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip))
    check_finite("fit", step, value, grad_norm, checkpoint=run.last_good(), params=run.model.parameters())
    run.optim.step()
    run.schedule.step()
    if run.ema_model is not None:
        run.ema_model.update_parameters(run.model)
    run.losses.append(value)
    return value, grad_norm


def _after_step(run: _Run, done: int, value: float, grad_norm: float) -> bool:
    """Metrics, progress, evaluation, samples and checkpoint after step ``done``; whether the run is over."""
    cfg = run.cfg
    run.reached = done
    if done % cfg.log_every == 0 or done == run.total:
        lr = run.optim.param_groups[0]["lr"]
        seconds = round(time.perf_counter() - run.t0, 3)
        run.metrics.write(step=done, loss=value, lr=lr, grad_norm=grad_norm, seconds=seconds)
    run.bar.set_postfix({_loss_name(run): f"{value:.3f}"}, refresh=False)
    run.bar.update(1)
    final = done == run.total or (cfg.time_limit is not None and _out_of_time(run.t0, cfg.time_limit, run.ctx))
    evaluates = final or _eval_due(run, done)
    if evaluates:
        _evaluate(run, done)
    # the checkpoint before the pictures: a grid that cannot be written (disk full) must not cost the step's state
    if cfg.out is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or final):
        _save(run, done)
    if not final and (done % cfg.sample_every == 0 if cfg.sample_every else evaluates):
        _samples(run, done, f"samples_step{done:07d}.png")
    if final:
        _samples(run, done, "samples.png")
    return final


# ------------------------------------------------------------------------------------------------ outputs
def _eval_due(run: _Run, done: int) -> bool:
    """Whether ``eval_every`` asks for an evaluation after step ``done`` (the last step always has one).

    ``"auto"``: at least an epoch since the last evaluation, and at least 9x its duration of training since
    (rank 0's clock decides for all ranks)."""
    every = run.cfg.eval_every
    if every is None:
        return False
    if every != "auto":
        return done % every == 0
    if done - run.last_eval_step < run.per_epoch:
        return False
    if run.last_eval_seconds is None:
        return True
    budget = 9.0 * run.last_eval_seconds
    return _out_of_time(run.last_eval_end, budget, run.ctx)


def _evaluate(run: _Run, step: int) -> None:
    cfg = run.cfg
    started = time.perf_counter()
    record = {"step": step}
    if run.test_data is not None:
        test = run.test_data
        if test.labels is not None:  # a hybrid model: likelihood and classification from one pass
            figures = evaluate_hybrid(
                run.eval_model, (test.x, test.labels), test.n_bins, cfg.eval_batch_size, cfg.seed, run.ctx.device
            )
            record.update({f"test_{k}": v for k, v in figures.items()})
        else:
            value = evaluate(
                run.eval_model,
                test.x if test.context is None else (test.x, test.context),
                test.n_bins,
                cfg.eval_batch_size,
                seed=cfg.seed,
                device=run.ctx.device,
            )
            record["test_bpd" if run.data.n_bins else "test_nll"] = value
        if cfg.check_invertibility:
            record.update(_invertibility(run))
        run.evals.append(record)
        run.metrics.write(**record)
    if run.ctx.is_main and cfg.report:
        _report(run, step, record, started)
    run.last_eval_end = time.perf_counter()
    run.last_eval_seconds = run.last_eval_end - started
    run.last_eval_step = step


def _invertibility(run: _Run) -> dict:
    """:func:`pyroflows.diagnostics.invertibility` of the evaluated model's flow on up to 64 test examples (the
    dequantisation noise seeded, the global RNG untouched), its figures prefixed ``inv_``."""
    from ..diagnostics import invertibility

    data = run.test_data
    index = torch.arange(min(64, len(data)), device=data.x.device)
    generator = torch.Generator(device=data.x.device).manual_seed(run.cfg.seed + 31337)
    x = data.batch(index, generator).to(run.eval_model._loc.dtype)
    report = invertibility(run.eval_model.flow_for(data.contexts(index)), x, seed=run.cfg.seed)
    wanted = ("error32_max", "error64_max", "lipschitz_max", "inverse_lipschitz_max", "condition_max", "condition_q50")
    summary = report.summary()
    return {f"inv_{k}": summary[k] for k in wanted}


def _report(run: _Run, step: int, record: dict, started: float) -> None:
    """One line per evaluation on stderr (above the bar when there is one)."""
    steps = step - run.last_eval_step
    seconds = max(started - run.last_eval_end, 1e-9)  # training time since the last evaluation
    units = "bits/dim" if run.data.n_bins else "nats"
    parts = [f"step {step}/{run.total} (epoch {step / run.per_epoch:.1f})"]
    if steps > 0:
        train_units = "nats (hybrid objective)" if run.data.labels is not None else units
        parts.append(f"train {sum(run.losses[-steps:]) / steps:.4f} {train_units}")
    for key in ("test_bpd", "test_nll"):
        if key in record:
            parts.append(f"test {record[key]:.4f} {units}")
    if "test_accuracy" in record:
        parts.append(f"accuracy {record['test_accuracy']:.4f}")
    if "inv_error32_max" in record:
        parts.append(f"round trip {record['inv_error32_max']:.1e}, cond {record['inv_condition_max']:.3g}")
    if steps > 0:
        parts.append(f"{steps * run.cfg.batch_size * run.ctx.world_size / seconds:.0f} img/s")
        left = (run.total - step) * seconds / steps
        if run.cfg.time_limit is not None:
            left = min(left, max(0.0, run.cfg.time_limit - (time.perf_counter() - run.t0)))
        if step < run.total and left > 0:
            parts.append(f"ETA {_duration(left)}")
    line = "fit: " + ", ".join(parts)
    if run.bar.disable:
        print(line, file=sys.stderr, flush=True)
    else:
        run.bar.write(line, file=sys.stderr)


def _loss_name(run: _Run) -> str:
    """The progress bar's name of the training loss."""
    if run.data.labels is not None:
        return "loss"
    return "bpd" if run.data.n_bins else "nll"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _samples(run: _Run, step: int, name: str) -> None:
    if run.writes:
        cfg = run.cfg
        _save_samples(run.eval_model, run.data, cfg.out / name, cfg.n_samples, cfg.temperature, cfg.seed + step)


def _save(run: _Run, step: int) -> None:
    """The checkpoint of ``step``: collective under DDP (RNG states are gathered); rank 0 writes."""
    model = run.model
    if not _all_finite(model):  # never replace a good checkpoint with broken weights (same on every rank)
        last = f"step {run.last_saved}" if run.last_saved is not None else "no checkpoint"
        raise TrainingError(f"fit: the parameters are not finite after step {step}; kept the checkpoint of {last}")
    rngs = [rng_state()]
    if run.ctx.distributed:
        gathered = [None] * run.ctx.world_size if run.ctx.is_main else None
        torch_dist.gather_object(rngs[0], gathered, dst=0)
        rngs = gathered
    if run.writes:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "spec": getattr(model, "spec", None),
            "step": step,
            "model": model.state_dict(),
            "optimizer": run.optim.state_dict(),
            "scheduler": run.schedule.state_dict(),
            "ema": run.ema_model.state_dict() if run.ema_model is not None else None,
            "losses": run.losses,
            "evals": run.evals,
            "rng": rngs,
            "config": run.settings,
            "event_shape": list(model.event_shape),
            "n_bins": run.data.n_bins,
        }
        atomic_torch_save(payload, run.ckpt_path)
    run.last_saved = step


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class _Metrics:
    """``metrics.jsonl`` on rank 0: one JSON object per line; on resume, lines after the checkpoint's step are
    dropped so the file matches the restored run."""

    def __init__(self, path: Path | None, resume_step: int | None):
        self.path = path
        self.file = None
        if path is None:
            return
        if resume_step is not None and path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a torn last line from a killed run
                    continue
            text = "".join(k + "\n" for k in kept).encode()
            atomic_write(path, lambda f: f.write(text), what="metrics")
        elif path.is_file():
            path.unlink()
        try:
            self.file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close(); unbuffered: whole lines
        except OSError as e:
            raise OutputError(f"could not write metrics {str(path)!r}: {e.strerror or e}") from e

    def write(self, **record) -> None:
        if self.file is None:
            return
        end = os.fstat(self.file.fileno()).st_size
        try:
            self.file.write((json.dumps(record) + "\n").encode())
        except OSError as e:  # e.g. disk full: cut the torn line off again, so the file stays whole lines
            with contextlib.suppress(OSError):
                self.file.truncate(end)
            raise OutputError(
                f"could not write metrics {str(self.path)!r}: {e.strerror or e}; its earlier lines are intact"
            ) from e

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _save_samples(model: FlowDensity, data: _Data, path: Path, n: int, temperature: float, seed: int) -> None:
    from ..plots import plot_density_2d, save_image_grid

    devices = [model._loc.device] if model._loc.device.type == "cuda" else []
    contexts = None
    if data.context is not None:  # a conditional model: one row of samples per distinct context (e.g. per class)
        contexts = torch.unique(data.context, dim=0)[:10]
        n = max(1, n // len(contexts))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        x = model.sample(n, temperature=temperature, context=contexts)
    if contexts is not None:
        if data.n_bins is not None and x.dim() == 5:
            save_image_grid(x, path)
        return
    if data.n_bins is not None and x.dim() == 4:
        save_image_grid(x, path)
    elif x.dim() == 2 and x.shape[-1] == 2:
        import matplotlib.pyplot as plt

        lim = float(data.x.abs().max()) * 1.1
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                fig = plot_density_2d(model.log_prob, path, bounds=(-lim, lim), samples=x.cpu())
        finally:
            model.train(was_training)
        plt.close(fig)


def _out_of_time(t0: float, limit: float, ctx) -> bool:
    """Rank 0's clock decides for all ranks, so that they stop at the same step."""
    over = time.perf_counter() - t0 >= limit
    if not ctx.distributed:
        return over
    flag = torch.tensor(float(over), device=ctx.device)
    torch_dist.broadcast(flag, src=0)
    return bool(flag)


def _averaged(model: FlowDensity, decay: float) -> AveragedModel:
    """EMA of the parameters; buffers (ActNorm flags, spectral-norm vectors) follow the live model."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


@torch.no_grad()
def _init_actnorm(model: FlowDensity, data: _Data, size: int, seed: int, ctx) -> None:
    """One forward pass in training mode on a dedicated batch: every ActNorm initialises from it (statistics
    all-reduced across ranks). A model without ActNorm, or already initialised, is left as it is."""
    size = min(int(size), len(data))
    g = torch.Generator().manual_seed(seed + 104729)
    chosen = torch.randperm(len(data), generator=g)[:size]
    shard = chosen[ctx.rank :: ctx.world_size].to(data.x.device)
    gen = torch.Generator(device=data.x.device).manual_seed(seed + 15485863 + ctx.rank)
    model.train()
    model.log_prob(data.batch(shard, gen), data.contexts(shard))


__all__ = ["FitConfig", "FitResult", "TrainingError", "fit"]
