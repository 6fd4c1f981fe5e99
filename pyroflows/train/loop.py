r"""Maximum-likelihood training of a :class:`~pyroflows.FlowDensity`: :func:`fit` and :func:`evaluate`.

Images (an :class:`~pyroflows.data.ImageDataset` or an integer tensor) are dequantised on the device each step,
:math:`\tilde x = (x + u)/n_{bins}`, and the loss is bits/dim; float data (e.g. 2-D toys) is used as is and the
loss is the negative log-likelihood in nats. The step-to-batch map is a pure function of ``(seed, step)``
(``DistributedSampler`` order per epoch), and RNG states, optimiser, schedule and EMA go into every checkpoint,
so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler

from ..density import FlowDensity
from ..nn.conditioners import set_compute_dtype
from . import distributed
from .checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    atomic_torch_save,
    load_checkpoint,
    load_model_state,
    rng_state,
    set_rng_state,
)
from .evaluation import _as_data, _Data, _loss_units, evaluate

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
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
)


class TrainingError(RuntimeError):
    """Training stopped on a non-finite loss or gradient, before the update. The message names the step; for
    density training (:func:`fit`) also the last good checkpoint, which is left untouched; for
    :func:`pyroflows.infer.fit` the parameters keep their values from the step before.

    A subclass of ``RuntimeError``, raised by :func:`fit` and :func:`pyroflows.infer.fit`.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.infer import fit
        >>> from pyroflows.train import TrainingError
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        ...     pyro.factor("impossible", torch.tensor(float("-inf")))  # p(x) = 0 everywhere: the loss is +inf
        >>> pyro.clear_param_store()
        >>> try:
        ...     fit(model, AutoNormal(model), num_steps=10, progress=False, seed=0)
        ... except TrainingError as err:
        ...     print(str(err).split(";")[0])
        fit: the loss is inf at step 0
    """


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :ivar model: the trained model (the object passed in, trained in place).
    :ivar ema_model: the exponential moving average of the weights (``None`` without ``ema``).
    :ivar int step: number of optimiser steps taken in total (including those before a resume).
    :ivar list losses: training loss per step (bits/dim for images, nats for float data), mean over ranks.
    :ivar list evals: ``{"step", "test_bpd" or "test_nll", ...}`` per evaluation.
    :ivar out: output directory (``None`` when nothing was written).

    Example: continuous 2-D data, so the loss and the evaluation are in nats::

        >>> import torch
        >>> from pyroflows.data import get_toy
        >>> from pyroflows.train import build_density, fit
        >>> x = get_toy("two_moons").sample(256, torch.Generator().manual_seed(0))
        >>> result = fit(build_density("realnvp", (2,), num_layers=2), x, x, steps=3, device="cpu", progress=False)
        >>> result.step, len(result.losses), sorted(result.evals[-1]), result.checkpoint
        (3, 3, ['step', 'test_nll'], None)
    """

    model: FlowDensity
    ema_model: FlowDensity | None
    step: int
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    out: Path | None = None

    @property
    def checkpoint(self) -> Path | None:
        """Path of the last checkpoint (``None`` when none was written)."""
        if self.out is None or not (self.out / CHECKPOINT).is_file():
            return None
        return self.out / CHECKPOINT


# ------------------------------------------------------------------------------------------------ helpers
def _make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float):
    key = str(name).lower()
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "adamax":
        return torch.optim.Adamax(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"fit: unknown optimizer {name!r}; choose 'adam' or 'adamax'")


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
            path.write_text("".join(k + "\n" for k in kept))
        elif path.is_file():
            path.unlink()
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, **record) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _save_samples(model: FlowDensity, data: _Data, path: Path, n: int, temperature: float, seed: int) -> None:
    from ..plots import plot_density_2d, save_image_grid

    devices = [model._loc.device] if model._loc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        x = model.sample(n, temperature=temperature)
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


# ------------------------------------------------------------------------------------------------ fit
def fit(
    model: FlowDensity,
    train,
    test=None,
    *,
    n_bins: int | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    clip_norm: float | None = 50.0,
    ema: float | None = None,
    eval_every: int | None = None,
    eval_batch_size: int = 500,
    sample_every: int | None = None,
    n_samples: int = 64,
    temperature: float = 0.7,
    checkpoint_every: int | None = None,
    log_every: int = 10,
    out: str | os.PathLike | None = None,
    resume: bool | str = False,
    device: str | torch.device | None = "auto",
    amp: bool = False,
    compile: bool | str = False,  # noqa: A002 - mirrors torch.compile
    seed: int = 0,
    init_batch_size: int = 512,
    progress: bool | None = None,
    time_limit: float | None = None,
) -> FitResult:
    r"""Train ``model`` by maximum likelihood on ``train``.

    The loop: ActNorm's data-dependent init once, on a dedicated batch of ``init_batch_size`` examples (under
    ``torchrun``, each rank's shard, statistics all-reduced); then ``steps`` optimiser steps on batches drawn
    without replacement per epoch (``DistributedSampler`` order); linear learning-rate warm-up; gradient-norm
    clipping; optional EMA of the weights; test evaluation, sample grids (density plots for 2-D data), JSON-lines
    metrics and atomic checkpoints at the given intervals, and all of them once more at the end.

    Under ``torchrun`` with more than one process the model is wrapped in ``DistributedDataParallel``, the
    data are sharded, ``batch_size`` is per process, and only rank 0 writes files.

    :param model: a :class:`~pyroflows.FlowDensity` (e.g. from :func:`pyroflows.train.build_density`, whose
        recipe goes into the checkpoint so ``pyroflows sample`` can rebuild it). Trained in place.
    :param train: training data: an :class:`~pyroflows.data.ImageDataset`, an integer tensor ``(N, C, H, W)`` of
        pixels in ``[0, n_bins)``, any ``Dataset`` of images, or a float tensor ``(N, *event_shape)`` of
        continuous data (loss in nats). Held in (device) memory.
    :param test: evaluation data of the same kind (optional).
    :param n_bins: intensity levels of integer pixels given as a tensor (default 256; an ``ImageDataset`` knows
        its own).
    :param steps: number of optimiser steps in total (a resumed run continues up to it); or give ``epochs``.
    :param epochs: training length in passes over ``train`` instead of ``steps`` (may be fractional).
    :param int batch_size: examples per step (per process under DDP).
    :param float lr: peak learning rate.
    :param str optimizer: ``"adam"`` or ``"adamax"``.
    :param float weight_decay: the optimiser's weight decay.
    :param int warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``.
    :param clip_norm: clip the global gradient norm (``None``: no clipping; the norm is still checked).
    :param ema: EMA decay (e.g. ``0.999``); evaluation and samples then use the averaged weights.
    :param eval_every: evaluate on ``test`` every so many steps (and at the end).
    :param int eval_batch_size: batch size of the evaluations.
    :param sample_every: write ``samples_<step>.png`` every so many steps (and ``samples.png`` at the end).
    :param int n_samples: images per sample grid.
    :param float temperature: the latent's temperature for the sample grids.
    :param checkpoint_every: write ``checkpoint.pt`` every so many steps (and at the end); needs ``out``.
    :param int log_every: with ``out``, write a ``metrics.jsonl`` record every so many steps.
    :param out: output directory (checkpoint, ``metrics.jsonl``, PNGs); ``None`` writes nothing.
    :param resume: ``True`` continues from ``out/checkpoint.pt`` (error if missing), ``"auto"`` when it exists,
        or a path to a checkpoint. Without it, an existing checkpoint in ``out`` is an error (never overwritten).
    :param device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a ``torch.device``.
    :param bool amp: run the conditioner networks in bfloat16 (:func:`pyroflows.nn.set_compute_dtype`);
        log-dets stay in float32.
    :param compile: ``True`` or a backend name: run the forward pass through ``torch.compile``. (torch.compile
        switches ``torch.distributions`` validation off process-wide; ``fit`` restores the previous setting.)
    :param int seed: seeds the batch order, the dequantisation noise and the estimators' randomness.
    :param int init_batch_size: examples for ActNorm's data-dependent initialisation.
    :param time_limit: stop after the step during which this many seconds of training have passed, and finish
        as at the last step (evaluation, samples, checkpoint); ``resume=True`` later continues towards ``steps``.
    :param progress: tqdm progress bar (``None``: only when stderr is a terminal); ``False`` also silences the
        evaluation lines.
    :raises TrainingError: on a non-finite loss or gradient norm, naming the step; nothing is overwritten.
    :raises CheckpointError: for a missing, corrupted or other-architecture checkpoint on resume.

    Example::

        >>> import pyroflows
        >>> from pyroflows.data import load_digits
        >>> from pyroflows.train import build_density, fit
        >>> model = build_density("glow", (1, 8, 8), levels=1, steps=2, hidden_channels=16)
        >>> result = fit(model, load_digits("train"), load_digits("test"), steps=20, device="cpu",
        ...              progress=False)
        >>> result.step, len(result.losses), result.evals[-1]["test_bpd"] < 5
        (20, 20, True)
    """
    if time_limit is not None and time_limit <= 0:
        raise ValueError(f"fit: time_limit must be > 0 seconds, got {time_limit}")
    if not isinstance(model, FlowDensity):
        raise TypeError(f"fit: model must be a pyroflows.FlowDensity, got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"fit: batch_size must be >= 1, got {batch_size}")
    if ema is not None and not 0.0 < ema < 1.0:
        raise ValueError(f"fit: ema decay must be in (0, 1), got {ema}")
    if (steps is None) == (epochs is None):
        raise ValueError("fit: give exactly one of steps= and epochs=")
    if (resume is True or resume == "auto") and out is None:
        raise ValueError("fit: resume needs out= (the directory holding checkpoint.pt)")

    ctx = distributed.setup(device)
    try:
        return _fit(**locals())
    finally:
        distributed.teardown(ctx)


def _fit(
    model,
    train,
    test,
    *,
    ctx,
    n_bins,
    steps,
    epochs,
    batch_size,
    lr,
    optimizer,
    weight_decay,
    warmup_steps,
    clip_norm,
    ema,
    eval_every,
    eval_batch_size,
    sample_every,
    n_samples,
    temperature,
    checkpoint_every,
    log_every,
    out,
    resume,
    device,
    amp,
    compile,
    seed,
    init_batch_size,
    progress,
    time_limit,
) -> FitResult:
    from tqdm.auto import tqdm

    dev = ctx.device
    out = Path(out) if out is not None else None
    model.to(dev)
    data = _as_data(train, n_bins, model.event_shape, dev, "training data")
    test_data = (
        _as_data(test, data.n_bins if n_bins is None else n_bins, model.event_shape, dev, "test data")
        if test is not None
        else None
    )
    units = _loss_units(data, model.dim)

    sampler = DistributedSampler(
        range(len(data)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=ctx.distributed
    )
    per_epoch = len(sampler) // batch_size
    if per_epoch < 1:
        raise ValueError(f"fit: batch_size {batch_size} exceeds the {len(sampler)} training examples per process")
    total = int(steps) if steps is not None else max(1, round(float(epochs) * per_epoch))

    config = {
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": optimizer,
        "warmup_steps": warmup_steps,
        "clip_norm": clip_norm,
        "ema": ema,
        "seed": seed,
        "world_size": ctx.world_size,
        "amp": bool(amp),
        "weight_decay": weight_decay,
        "steps": total,
        "n_bins": data.n_bins,
    }

    # --------------------------------------------------------------- resume or fresh start
    ckpt_path = out / CHECKPOINT if out is not None else None
    source = None
    if isinstance(resume, (str, os.PathLike)) and resume != "auto":
        source = Path(resume)
    elif resume is True or resume == "auto":
        if resume is True or ckpt_path.is_file():
            source = ckpt_path
    if source is None and ckpt_path is not None and ckpt_path.is_file():
        raise FileExistsError(
            f"fit: {str(ckpt_path)!r} already exists; pass resume=True (pyroflows fit --resume) to continue "
            "that run, or choose another output directory"
        )
    ckpt = load_checkpoint(source, map_location=dev) if source is not None else None

    if amp:
        set_compute_dtype(model, torch.bfloat16)
    optim = _make_optimizer(optimizer, model.parameters(), lr, weight_decay)
    warm = max(int(warmup_steps), 0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ema_model = None

    losses: list[float] = []
    evals: list[dict] = []
    start = 0
    if ckpt is not None:
        load_model_state(model, ckpt["model"], f"checkpoint {str(source)!r}")
        spec = getattr(model, "spec", None)
        if ckpt.get("spec") is not None and spec is not None and ckpt["spec"] != spec:
            raise CheckpointError(f"checkpoint {str(source)!r} is for model {ckpt['spec']}, not {spec}")
        optim.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        if ema:
            if ckpt.get("ema") is None:
                raise CheckpointError(f"checkpoint {str(source)!r} holds no EMA weights but ema={ema} was asked for")
            ema_model = _averaged(model, ema)
            ema_model.load_state_dict(ckpt["ema"])
        start, losses, evals = int(ckpt["step"]), list(ckpt["losses"]), list(ckpt["evals"])
        changed = {
            k: (ckpt["config"].get(k), config[k]) for k in _TRAJECTORY_KEYS if ckpt["config"].get(k) != config[k]
        }
        if changed:
            warnings.warn(
                f"fit: resuming with changed settings {changed}; the run will not repeat the original", stacklevel=3
            )
        rng = ckpt["rng"][ctx.rank] if ctx.rank < len(ckpt["rng"]) else None
        if rng is not None:
            set_rng_state(rng)
        else:
            torch.manual_seed(seed + 7919 * ctx.rank + start)
    else:
        if ctx.distributed:  # every rank starts from rank 0's weights (1x1 convs, conditioners)
            for tensor in model.state_dict().values():
                torch_dist.broadcast(tensor, src=0)
        _init_actnorm(model, data, init_batch_size, seed, ctx)  # also gives lazily sized buffers their size
        if ema:
            ema_model = _averaged(model, ema)
            ema_model.update_parameters(model)
        torch.manual_seed(seed + 7919 * ctx.rank)

    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if compile:
        # The first torch.compile of a process turns torch.distributions' default validation off for good
        # (dynamo's one-time patching), and with it pyroflows' validation when that follows torch: keep the
        # user's setting instead of changing it behind their back.
        validate = torch.distributions.Distribution._validate_args
        net = torch.compile(net, backend=compile if isinstance(compile, str) else "inductor")
        torch.distributions.Distribution.set_default_validate_args(validate)

    writes = ctx.is_main and out is not None
    if writes:
        out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / METRICS if writes else None, start if ckpt is not None else None)

    def eval_model() -> FlowDensity:
        return model if ema_model is None else ema_model.module

    def save(step: int) -> None:
        """Collective under DDP (RNG states are gathered); rank 0 writes."""
        if not _all_finite(model):  # never replace a good checkpoint with broken weights (same on every rank)
            raise TrainingError(f"step {step}: parameters are not finite; kept the checkpoint of an earlier step")
        rngs = [rng_state()]
        if ctx.distributed:
            gathered = [None] * ctx.world_size if ctx.is_main else None
            torch_dist.gather_object(rngs[0], gathered, dst=0)
            rngs = gathered
        if not writes:
            return
        atomic_torch_save(
            {
                "format": FORMAT,
                "version": VERSION,
                "spec": getattr(model, "spec", None),
                "step": step,
                "model": model.state_dict(),
                "optimizer": optim.state_dict(),
                "scheduler": schedule.state_dict(),
                "ema": ema_model.state_dict() if ema_model is not None else None,
                "losses": losses,
                "evals": evals,
                "rng": rngs,
                "config": config,
                "event_shape": list(model.event_shape),
                "n_bins": data.n_bins,
            },
            ckpt_path,
        )

    def run_eval(step: int) -> None:
        if test_data is None:
            return
        value = evaluate(eval_model(), test_data.x, test_data.n_bins, eval_batch_size, seed=seed, device=dev)
        record = {"step": step, ("test_bpd" if data.n_bins else "test_nll"): value}
        evals.append(record)
        metrics.write(**record)
        if ctx.is_main and progress is not False:
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))

    def samples(step: int, name: str) -> None:
        if writes:
            _save_samples(eval_model(), data, out / name, n_samples, temperature, seed + step)

    quiet = True if not ctx.is_main else (None if progress is None else not progress)  # None: tty only
    bar = tqdm(total=total, initial=start, disable=quiet, desc="fit", dynamic_ncols=True)
    unit = "bpd" if data.n_bins else "nll"
    order, order_epoch = None, -1
    last_saved = start if ckpt is not None else None
    model.train()
    t0 = time.perf_counter()
    reached = max(start, total) if start >= total else start
    try:
        for step in range(start, total):
            epoch, b = divmod(step, per_epoch)
            if epoch != order_epoch:
                sampler.set_epoch(epoch)
                order, order_epoch = torch.tensor(list(sampler), device=dev), epoch
            xb = data.batch(order[b * batch_size : (b + 1) * batch_size])
            error = None
            try:
                loss = units(-net(xb).mean())
            except (RuntimeError, ValueError) as e:  # validation found a non-finite value inside a layer
                error, loss = e, torch.full((), math.nan, device=dev)
            loss_all = distributed.all_mean(loss.detach(), ctx)
            value = float(loss_all)
            if not math.isfinite(value):
                where = (
                    f"; the last good checkpoint is {str(ckpt_path)!r} (step {last_saved})"
                    if last_saved is not None and writes
                    else ""
                )
                cause = f": {error}" if error is not None else ""
                raise TrainingError(f"non-finite training loss at step {step + 1}{cause}{where}") from error
            optim.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm if clip_norm is not None else math.inf)
            )
            if not math.isfinite(grad_norm):
                where = (
                    f"; the last good checkpoint is {str(ckpt_path)!r} (step {last_saved})"
                    if last_saved is not None and writes
                    else ""
                )
                raise TrainingError(f"non-finite gradient norm at step {step + 1} (loss {value:.4g}){where}")
            optim.step()
            schedule.step()
            if ema_model is not None:
                ema_model.update_parameters(model)
            losses.append(value)
            done = reached = step + 1
            if done % max(log_every, 1) == 0 or done == total:
                metrics.write(
                    step=done,
                    loss=value,
                    lr=optim.param_groups[0]["lr"],
                    grad_norm=grad_norm,
                    seconds=round(time.perf_counter() - t0, 3),
                )
            bar.set_postfix({unit: f"{value:.3f}"}, refresh=False)
            bar.update(1)
            final = done == total or (time_limit is not None and _out_of_time(t0, time_limit, ctx))
            if eval_every and done % eval_every == 0 or final:
                run_eval(done)
            if sample_every and done % sample_every == 0 and not final:
                samples(done, f"samples_{done:07d}.png")
            if final:
                samples(done, "samples.png")
            if out is not None and (checkpoint_every and done % checkpoint_every == 0 or final):
                save(done)
                last_saved = done
            if final:
                break
    finally:
        bar.close()
        metrics.close()
    return FitResult(
        model,
        ema_model.module if ema_model is not None else None,
        reached,
        losses,
        evals,
        out if writes else None,
    )


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
    model.log_prob(data.batch(shard, gen))


__all__ = ["FitResult", "TrainingError", "fit"]
