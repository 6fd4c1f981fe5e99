"""Glow and RealNVP density models on scikit-learn's 8x8 digits: pyroflows against normflows, on CPU.

Every model is trained by maximum likelihood on the same uniformly dequantised batches, with the same
optimiser, learning rate, batch size and number of steps, in a fresh subprocess of its own (so that its peak
memory is its own), and is scored by test bits/dim.

Data. ``sklearn.datasets.load_digits`` through ``pyroflows.data.load_digits``: 1797 images of 1x8x8 integer
pixels in 0..16, treated as ``n_bins = 17`` levels; a fixed stratified split (``train_test_split(test_size=0.2,
random_state=0)``, 1437 train / 360 test). A pixel ``k`` is dequantised as ``x = (k + u) / n_bins`` with
``u ~ U(0, 1)``, so ``x`` lies in ``[0, 1]^D`` with ``D = 64``.

Bits/dim. ``bpd = (-log p(x) + D log n_bins) / (D ln 2)``, where ``log p(x)`` is the density of the
dequantised ``x`` in ``[0, 1]^D``: it includes the Jacobian of the logit preprocessing
``y = logit(a + (1 - 2a) x)`` (``a = --logit-alpha``). pyroflows' ``glow`` / ``realnvp`` start with that
logit layer; for normflows the same logit is applied outside the model and its exact log-det is added, so
both libraries are scored by one function on the same tensors (test noise drawn once from a fixed seed).

Models. ``glow/pyroflows`` is ``pyroflows.glow((1, 8, 8), levels, num_layers=depth, hidden_channels)`` wrapped in
``pyroflows.FlowDensity``. ``glow/normflows`` is the same multi-scale Glow built from normflows parts: per
level a squeeze, ``depth`` ``GlowBlock``s (ActNorm, LU 1x1 convolution, affine coupling with a
3x3-1x1-3x3 conv net of ``hidden_channels``), then half of the channels factored out (``Merge``), in a
``MultiscaleFlow`` whose bases are standard normals (``DiagGaussian(trainable=False)``; ``--nf-base glow``
gives normflows' learned per-channel ``GlowBase`` instead). ActNorm layers initialise from the first
training batch in both. pyroflows' ``glow`` adds a learned conditional prior (a coupling) at each factor-out;
``glow/pyroflows-noprior`` (``pyroflows.glow(..., learned_prior=False)``) leaves it out, which matches the
normflows model parameter for parameter. Remaining differences: the coupling scale map (pyroflows
``exp(3 tanh(s / 3))``, normflows Glow's ``sigmoid(s + 2)``) and which half of the channels is factored out.
``realnvp/pyroflows`` is ``pyroflows.realnvp((1, 8, 8), ...)``, with no normflows counterpart.
``glow/pyroflows-noval`` is ``glow/pyroflows`` with ``pyroflows.enable_validation(False)``.

Measurements. ms per training step: the median (and quartiles) of ``time.perf_counter`` around
``zero_grad + loss + backward + optimiser step`` over the steps after ``--warmup`` (batch assembly and
dequantisation noise are outside the timed region), with ``torch.set_num_threads(--threads)``; the CPU time of
the same region (``time.process_time``) is reported beside it, as it is less sensitive to other processes.
Then all Glow models are timed again *interleaved* in one process (``--paired-rounds`` rounds, one step of
each per round in rotating order, same batch): the speed ratio ``normflows_ms / pyroflows_ms`` is the median
of the per-round ratios, so that load from other processes falls on both libraries alike. Peak memory: each
model runs in a fresh Python process; after imports, data loading and one throwaway conv/optimiser step (torch's
lazy imports alone add ~70 MiB at the first ``Adam.step``) the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs`` ← 5); the reported figure is the peak RSS (``VmHWM``) at the end minus the RSS at
the reset, i.e. what building, training and evaluating the model added (falls back to ``resource.getrusage``
where ``clear_refs`` is not writable).

Usage::

    python benchmarks/image_flows.py                 # 500 steps per model, ~6-8 minutes on 2 cores
    python benchmarks/image_flows.py --quick         # a smoke test (writes image_flows_quick.json)
    python benchmarks/image_flows.py --steps 2000 --models glow/pyroflows,glow/normflows
    python benchmarks/image_flows.py --profile --models glow/pyroflows --steps 60   # cProfile one model

Needs ``normflows`` (the ``bench`` extra), which pyroflows itself does not use; the digits come from
``pyroflows.data.load_digits`` (scikit-learn, a core dependency).

References: Kingma & Dhariwal, *Glow*, NeurIPS 2018; Dinh, Sohl-Dickstein & Bengio, *Density estimation
using Real NVP*, ICLR 2017; Stimper et al., *normflows*, JOSS 2023.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402

MODELS = ("glow/pyroflows", "glow/normflows", "realnvp/pyroflows", "glow/pyroflows-noprior", "glow/pyroflows-noval")
DEFAULT_MODELS = ("glow/pyroflows", "glow/normflows", "glow/pyroflows-noprior", "realnvp/pyroflows")
N_BINS = 17  # digits pixels are the integers 0..16
SHAPE = (1, 8, 8)
DIM = math.prod(SHAPE)
RESULT_TAG = "IMAGE_FLOWS_RESULT "


# --------------------------------------------------------------------------------------------- data
def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as integer-valued float tensors ``(N, 1, 8, 8)`` in ``0..16``: ``(train, test)``.

    ``pyroflows.data.load_digits``' split: ``train_test_split(test_size=0.2, random_state=seed, stratify=labels)``
    (1437 / 360 for seed 0).
    """
    from pyroflows.data import load_digits

    train, test = (load_digits(split, seed=seed) for split in ("train", "test"))
    if train.n_bins != N_BINS or train.shape != SHAPE:
        raise RuntimeError(f"load_digits changed: n_bins {train.n_bins}, shape {train.shape}")
    return train.images.float(), test.images.float()


def dequantize(k: torch.Tensor, generator: torch.Generator, n_bins: int = N_BINS) -> torch.Tensor:
    """``(k + u) / n_bins`` with ``u ~ U(0, 1)`` drawn from ``generator``: a point of ``[0, 1]^D``."""
    return (k + torch.rand(k.shape, generator=generator, dtype=k.dtype)) / n_bins


def bits_per_dim(log_prob: torch.Tensor, dim: int = DIM, n_bins: int = N_BINS) -> torch.Tensor:
    """Bits/dim of the discrete data from the log-density of its dequantised version in ``[0, 1]^D``."""
    return (-log_prob + dim * math.log(n_bins)) / (dim * math.log(2.0))


def logit_preprocess(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = logit(a + (1 - 2a) x)`` and its exact ``log|det dy/dx|`` summed over the last 3 dims.

    RealNVP's preprocessing; used outside the normflows model, whose ``log_prob`` then sees ``y``.
    """
    s = alpha + (1.0 - 2.0 * alpha) * x
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    log_det = (math.log1p(-2.0 * alpha) - log_s - log_1ms).sum((-3, -2, -1))
    return log_s - log_1ms, log_det


# --------------------------------------------------------------------------------------------- models
class Built:
    """A model under test: its ``nn.Module`` (for the optimiser) and ``log_prob(x)`` of ``x`` in ``[0, 1]^D``."""

    def __init__(self, module: torch.nn.Module, log_prob: Callable[[torch.Tensor], torch.Tensor], extra=None):
        self.module = module
        self.log_prob = log_prob
        self.extra = extra or {}


def build_pyroflows_glow(cfg: dict, validation: bool = True, learned_prior: bool = True) -> Built:
    """``pyroflows.glow`` in a ``pyroflows.FlowDensity`` (its own logit layer included)."""
    import pyroflows

    pyroflows.enable_validation(None if validation else False)
    flow = pyroflows.glow(
        SHAPE,
        levels=cfg["levels"],
        num_layers=cfg["depth"],
        hidden=cfg["hidden_channels"],
        logit_alpha=cfg["logit_alpha"],
        learned_prior=learned_prior,
    )
    density = pyroflows.FlowDensity(flow, SHAPE)
    return Built(density, density.log_prob, {"density": density})


def build_pyroflows_glow_noprior(cfg: dict) -> Built:
    """``pyroflows.glow(..., learned_prior=False)``: without the learned factor-out prior, layer for layer the
    normflows model (squeeze, ``depth`` × ActNorm → LU 1x1 conv → channel coupling, plain factor-out)."""
    return build_pyroflows_glow(cfg, learned_prior=False)


def build_pyroflows_realnvp(cfg: dict) -> Built:
    """``pyroflows.realnvp`` for the image shape (``levels`` scales, ``realnvp_layers`` couplings per block,
    conditioner width ``hidden_channels``, its own logit layer), in a ``pyroflows.FlowDensity``."""
    import pyroflows

    flow = pyroflows.realnvp(
        SHAPE,
        num_layers=cfg["realnvp_layers"],
        hidden=cfg["hidden_channels"],
        levels=cfg["levels"],
        logit_alpha=cfg["logit_alpha"],
    )
    density = pyroflows.FlowDensity(flow, SHAPE)
    return Built(density, density.log_prob, {"density": density})


def build_normflows_glow(cfg: dict) -> Built:
    """The multi-scale Glow of ``build_pyroflows_glow`` from normflows parts, logit applied outside.

    normflows orders levels from the coarsest (index 0) to the finest; its ``log_prob`` runs the finest
    level first: squeeze, the ``GlowBlock``s (each ActNorm → 1x1 conv → coupling towards the latent), then
    ``Merge.inverse`` keeps the first half of the channels and scores the second half under that level's base.
    """
    levels, depth, hidden = cfg["levels"], cfg["depth"], cfg["hidden_channels"]
    model = _common.normflows_glow(SHAPE, levels, depth, hidden, glow_base=cfg["nf_base"] == "glow")
    alpha = cfg["logit_alpha"]

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        y, log_det = logit_preprocess(x, alpha)
        return model.log_prob(y, None) + log_det

    def sample(n: int) -> torch.Tensor:
        y, _ = model.sample(n)
        return (torch.sigmoid(y) - alpha) / (1.0 - 2.0 * alpha)

    return Built(model, log_prob, {"sample": sample})


BUILDERS = {
    "glow/pyroflows": build_pyroflows_glow,
    "glow/pyroflows-noval": lambda cfg: build_pyroflows_glow(cfg, validation=False),
    "glow/pyroflows-noprior": build_pyroflows_glow_noprior,
    "glow/normflows": build_normflows_glow,
    "realnvp/pyroflows": build_pyroflows_realnvp,
}


# --------------------------------------------------------------------------------------------- memory
class PeakRSS:
    """Peak resident memory added after :meth:`reset`, in MiB (``VmHWM`` after a ``clear_refs`` reset)."""

    def reset(self) -> None:
        """Start counting from here: reset the kernel's peak-RSS mark where possible."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs=5, minus VmRSS at reset"
        except OSError:
            self.method = "ru_maxrss(end) - ru_maxrss(reset) (an underestimate if imports peaked higher)"
        self.base_kib = _common.proc_status_kib("VmRSS")
        self.base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.base_kib is None:
            self.base_kib = self.base_maxrss

    def peak_increase_mib(self) -> float:
        """Peak RSS since :meth:`reset` minus the RSS then, in MiB."""
        hwm = _common.proc_status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if hwm is None:
            return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base_maxrss) / 1024.0
        return (hwm - self.base_kib) / 1024.0


# --------------------------------------------------------------------------------------------- one model
def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@torch.no_grad()
def evaluate_bpd(built: Built, k: torch.Tensor, seed: int, batch: int = 512) -> float:
    """Mean bits/dim over ``k`` (integer pixels), dequantised with noise from a fixed seed, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    x = dequantize(k, gen)
    built.module.eval()
    try:
        bpd = torch.cat([bits_per_dim(built.log_prob(x[i : i + batch])) for i in range(0, len(x), batch)])
    finally:
        built.module.train()
    return float(bpd.mean())


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Indices of minibatches: shuffled epochs, the last short batch of each epoch dropped."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def _extra_checks(name: str, built: Built, test: torch.Tensor, cfg: dict) -> dict:
    """Cross-checks after training: library bpd, logit consistency, sampling. Failures are recorded, not raised."""
    out: dict = {}
    density = built.extra.get("density")
    if density is not None:
        try:  # pyroflows' own bits/dim, given the generator of our test noise: it should equal test_bpd
            with torch.no_grad():
                density.eval()
                gen = torch.Generator().manual_seed(cfg["eval_seed"])
                out["library_test_bpd"] = float(density.bits_per_dim(test, n_bins=N_BINS, generator=gen).mean())
                density.train()
        except Exception as e:
            out["library_test_bpd_error"] = f"{type(e).__name__}: {e}"
        if cfg["logit_alpha"] is not None:
            try:  # our logit Jacobian against pyroflows' logit layer, on the same x
                out["logit_check_max_abs_diff"] = _logit_check(density, cfg["logit_alpha"])
            except Exception as e:
                out["logit_check_error"] = f"{type(e).__name__}: {e}"
    try:
        with torch.no_grad():
            built.module.eval()
            torch.manual_seed(cfg["seed"] + 11)
            if density is not None:
                s = density.sample(16)
            else:
                s = built.extra["sample"](16)
            built.module.train()
        out["sample_shape"] = list(s.shape)
        out["sample_finite"] = bool(torch.isfinite(s).all())
        out["sample_range"] = [float(s.min()), float(s.max())]
    except Exception as e:
        out["sample_error"] = f"{type(e).__name__}: {e}"
    return out


def _logit_check(density, alpha: float) -> float:
    """max |log-det of pyroflows' first layer - ours| on random points of (0, 1)^D (it should be ~1e-5)."""
    first = density.flow.parts[0]
    x = torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(3)) * 0.98 + 0.01
    y, ld = first.forward_and_log_det(x)
    y_ref, ld_ref = logit_preprocess(x, alpha)
    return max(float((y - y_ref).abs().max()), float((ld - ld_ref).abs().max()))


def _warm_runtime(opt_cls) -> None:
    """One throwaway conv/linear-algebra/optimiser step, so torch's lazy imports and kernel set-up (the first
    optimiser step alone imports ~70 MiB of modules) happen before the memory baseline, in every worker."""
    net = torch.nn.Conv2d(2, 4, 3, padding=1)
    opt = opt_cls(net.parameters(), lr=1e-3)
    net(torch.randn(2, 2, 4, 4)).square().mean().backward()
    torch.linalg.solve_triangular(torch.eye(2), torch.eye(2), upper=True)
    torch.linalg.lu(torch.eye(2))
    opt.step()


def train_step(built: Built, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """One maximum-likelihood step on the batch ``x``; returns the loss (mean negative log-density, nats)."""
    opt.zero_grad(set_to_none=True)
    loss = -built.log_prob(x).mean()
    loss.backward()
    opt.step()
    return loss


def _setup(name: str, cfg: dict):
    """Threads, data, optimiser class; the model's library imported and torch warmed up."""
    torch.set_num_threads(cfg["threads"])
    train, test = load_digits_split(cfg["split_seed"])
    opt_cls = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[cfg["optimizer"]]
    for lib in {("normflows" if "normflows" in n else "pyroflows") for n in name.split(",")}:
        __import__(lib)
    _warm_runtime(opt_cls)
    return train, test, opt_cls


def _build(name: str, cfg: dict, opt_cls):
    torch.manual_seed(cfg["seed"])
    built = BUILDERS[name](cfg)
    built.module.train()
    return built, opt_cls(built.module.parameters(), lr=cfg["lr"])


def _ms_stats(seconds: list[float], prefix: str) -> dict:
    return {
        f"{prefix}_median": 1000 * _quantile(seconds, 0.5),
        f"{prefix}_p25": 1000 * _quantile(seconds, 0.25),
        f"{prefix}_p75": 1000 * _quantile(seconds, 0.75),
    }


def run_one(name: str, cfg: dict) -> dict:
    """Build, train and score one model in this process; return a JSON-able record."""
    train, test, opt_cls = _setup(name, cfg)
    mem = PeakRSS()  # the library is imported and torch warmed up before the baseline: neither is counted
    mem.reset()
    built, opt = _build(name, cfg, opt_cls)
    n_params = sum(p.numel() for p in built.module.parameters() if p.requires_grad)
    data_gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    batches = _batches(len(train), cfg["batch_size"], data_gen)
    wall, cpu, losses = [], [], []
    profiler = cProfile.Profile() if cfg.get("profile") else None
    wall0 = time.perf_counter()
    for step in range(cfg["steps"]):
        x = dequantize(train[next(batches)], data_gen)
        if profiler is not None and step == cfg["warmup"]:
            profiler.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = train_step(built, opt, x)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{name}: non-finite loss at step {step}")
    if profiler is not None:
        profiler.disable()
    train_seconds = time.perf_counter() - wall0
    w = cfg["warmup"]
    record = {
        "model": name,
        "params": n_params,
        **_ms_stats(wall[w:], "ms_per_step"),
        **_ms_stats(cpu[w:], "cpu_ms_per_step"),
        "ms_first_step": 1000 * wall[0],
        "train_seconds": train_seconds,
        "final_train_batch_bpd": float(bits_per_dim(-torch.tensor(losses[-20:])).mean()),
        "test_bpd": evaluate_bpd(built, test, cfg["eval_seed"]),
        "train_bpd": evaluate_bpd(built, train, cfg["eval_seed"]),
    }
    record.update(_extra_checks(name, built, test, cfg))
    record["peak_rss_increase_mib"] = mem.peak_increase_mib()
    record["memory_method"] = mem.method
    if profiler is not None:
        record["profile"] = _profile_text(profiler, len(wall) - w)
    return record


def run_paired(names: list[str], cfg: dict) -> dict:
    """Interleaved timing: every model in one process, one training step of each per round (the order rotating
    from round to round) on the same batch, so that load from other processes falls on all models alike.

    Returns per-model medians of wall and CPU ms/step and, per pyroflows model, the median over rounds of the
    per-round ratio ``normflows_ms / pyroflows_ms``.
    """
    train, _, opt_cls = _setup(",".join(names), cfg)
    models = {name: _build(name, cfg, opt_cls) for name in names}
    data_gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    batches = _batches(len(train), cfg["batch_size"], data_gen)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(cfg["warmup"] + cfg["paired_rounds"]):
        x = dequantize(train[next(batches)], data_gen)
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            built, opt = models[name]
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(built, opt, x)
            if r >= cfg["warmup"]:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    out = {
        "rounds": cfg["paired_rounds"],
        "models": {
            name: {**_ms_stats(wall[name], "ms_per_step"), **_ms_stats(cpu[name], "cpu_ms_per_step")} for name in names
        },
        "ratios": {},
    }
    out["cpu_ratios"] = {}
    if "glow/normflows" in names:
        for name in names:
            if name.startswith("glow/pyroflows"):
                per_round = [a / b for a, b in zip(wall["glow/normflows"], wall[name])]
                out["ratios"][name] = _quantile(per_round, 0.5)
                per_round = [a / b for a, b in zip(cpu["glow/normflows"], cpu[name])]
                out["cpu_ratios"][name] = _quantile(per_round, 0.5)
    return out


def _profile_text(profiler: cProfile.Profile, n_steps: int, top: int = 40) -> str:
    buf = io.StringIO()
    buf.write(f"cProfile over {n_steps} timed training steps\n")
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- driver
def run_in_subprocess(name: str, cfg: dict, timeout: float) -> dict:
    """Run :func:`run_one` (or, for ``name = "paired:m1,m2,..."``, :func:`run_paired`) in a fresh interpreter
    (so peak RSS is the model's own); return its record, or the error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--config", json.dumps(cfg)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout:.0f} s", "load_avg_1min_before": load}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            record = json.loads(line[len(RESULT_TAG) :])
            record["load_avg_1min_before"] = load
            record["process_seconds"] = time.perf_counter() - t0
            return record
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"model": name, "error": " | ".join(tail) or f"exit code {proc.returncode}", "load_avg_1min_before": load}


def markdown_table(records: list[dict], paired: dict | None) -> str:
    """One row per model: params, test/train bits/dim, ms/step (own run and interleaved), peak RSS."""
    timing = (paired or {}).get("models", {})
    head = (
        "| model | params | test bits/dim | train bits/dim | ms/step, own run: wall median [p25, p75] "
        "| CPU ms/step, own run | ms/step, interleaved: wall (CPU) | peak RSS increase (MiB) | train time (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in records:
        if "error" in r:
            rows.append(f"| {r['model']} | error: {r['error'][:160]} | | | | | | | |")
            continue
        ms = f"{r['ms_per_step_median']:.1f} [{r['ms_per_step_p25']:.1f}, {r['ms_per_step_p75']:.1f}]"
        t = timing.get(r["model"])
        inter = f"{t['ms_per_step_median']:.1f} ({t['cpu_ms_per_step_median']:.1f})" if t else "—"
        rows.append(
            f"| {r['model']} | {r['params']:,} | {r['test_bpd']:.3f} | {r['train_bpd']:.3f} | {ms} "
            f"| {r['cpu_ms_per_step_median']:.1f} | {inter} | {r['peak_rss_increase_mib']:.0f} "
            f"| {r['train_seconds']:.0f} |"
        )
    return head + "\n".join(rows)


def compare(records: list[dict], paired: dict | None, target_speedup: float) -> dict:
    """``normflows_ms / pyroflows_ms`` for each pyroflows Glow, and whether the speed and bits/dim targets hold.

    The verdict uses the interleaved (paired) ratio where there is one, else the ratio of the own-run medians.
    """
    by = {r["model"]: r for r in records if "error" not in r}
    paired_ratios = (paired or {}).get("ratios", {})
    paired_cpu = (paired or {}).get("cpu_ratios", {})
    out = {}
    nf = by.get("glow/normflows")
    for name in ("glow/pyroflows", "glow/pyroflows-noprior", "glow/pyroflows-noval"):
        pf = by.get(name)
        if nf is None or pf is None:
            continue
        own = nf["ms_per_step_median"] / pf["ms_per_step_median"]
        own_cpu = nf["cpu_ms_per_step_median"] / pf["cpu_ms_per_step_median"]
        ratio = paired_ratios.get(name, own)
        out[name] = {
            "speed_ratio_normflows_over_pyroflows": ratio,
            "speed_ratio_source": "interleaved" if name in paired_ratios else "own runs",
            "speed_ratio_interleaved_cpu": paired_cpu.get(name),
            "speed_ratio_own_runs_wall": own,
            "speed_ratio_own_runs_cpu": own_cpu,
            "test_bpd_difference_pyroflows_minus_normflows": pf["test_bpd"] - nf["test_bpd"],
            "meets_speed_target": ratio >= target_speedup,
            "meets_bpd_target": pf["test_bpd"] <= nf["test_bpd"],
        }
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--quick`` fills in smoke-test values for those not given)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 500; quick 12)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny models, a few steps, under a minute")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--levels", type=int, default=2, help="Glow levels (squeeze + steps + factor-out); default 2")
    p.add_argument("--depth", type=int, default=None, help="Glow steps (flow blocks) per level (default 8; quick 2)")
    p.add_argument("--hidden-channels", type=int, default=None, help="coupling conv width (default 64; quick 16)")
    p.add_argument("--realnvp-layers", type=int, default=None, help="pyroflows.realnvp num_layers (default 3; quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default 64; quick 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, the same for every model")
    p.add_argument("--optimizer", choices=("adam", "adamax"), default="adam", help="the same for every model")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 10; quick 3)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every worker (default 1)")
    p.add_argument("--logit-alpha", type=float, default=0.05, help="logit preprocessing a (default 0.05)")
    p.add_argument("--nf-base", choices=("normal", "glow"), default="normal", help="normflows base distributions")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the test dequantisation noise")
    p.add_argument("--target-speedup", type=float, default=1.5, help="required normflows_ms / pyroflows_ms")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per model subprocess")
    p.add_argument(
        "--paired-rounds", type=int, default=None, help="interleaved timing rounds, 0 = off (default 100; quick 5)"
    )
    p.add_argument("--profile", action="store_true", help="cProfile the timed steps; print the top functions")
    p.add_argument(
        "--out", default=None, help="where to write the JSON (default results/image_flows.json; quick: *_quick.json)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    if args.out is None:  # a smoke test never overwrites a full run's results
        args.out = f"benchmarks/results/image_flows{'_quick' if quick else ''}.json"
    defaults = {
        "steps": 12 if quick else 500,
        "depth": 2 if quick else 8,
        "hidden_channels": 16 if quick else 64,
        "realnvp_layers": 2 if quick else 3,
        "batch_size": 32 if quick else 64,
        "warmup": 3 if quick else 10,
        "paired_rounds": 5 if quick else 100,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        args.models = ",".join(m for m in DEFAULT_MODELS if not (quick and m == "glow/pyroflows-noprior"))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    args.models = models
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def main(argv=None) -> int:
    """Run every requested model in its own subprocess, print the table, write the JSON."""
    args = parse_args(argv)
    if args.worker is not None:
        config = json.loads(args.config)
        if args.worker.startswith("paired:"):
            record = run_paired(args.worker[len("paired:") :].split(","), config)
        else:
            record = run_one(args.worker, config)
        print(RESULT_TAG + json.dumps(record), flush=True)
        return 0
    cfg = {
        "steps": args.steps,
        "warmup": args.warmup,
        "levels": args.levels,
        "depth": args.depth,
        "hidden_channels": args.hidden_channels,
        "realnvp_layers": args.realnvp_layers,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "threads": args.threads,
        "logit_alpha": args.logit_alpha,
        "nf_base": args.nf_base,
        "seed": args.seed,
        "split_seed": 0,
        "eval_seed": args.eval_seed,
        "profile": args.profile,
        "paired_rounds": args.paired_rounds,
    }
    command = "python " + shlex.join([os.path.relpath(os.path.abspath(__file__))] + sys.argv[1:])
    train, test = load_digits_split(cfg["split_seed"])
    print(
        f"digits: {len(train)} train / {len(test)} test images of {SHAPE}, pixel values 0..16 treated as "
        f"n_bins = {N_BINS} levels; uniform dequantisation x = (k + u) / {N_BINS}; "
        f"bpd = (-log p(x) + D log {N_BINS}) / (D ln 2), D = {DIM}, logit Jacobian (a = {args.logit_alpha}) included"
    )
    print(
        f"Glow: {args.levels} levels x {args.depth} steps, hidden {args.hidden_channels}; batch {args.batch_size}, "
        f"{args.optimizer} lr {args.lr}, {args.steps} steps (timing excludes the first {args.warmup}); "
        f"torch {torch.__version__}, {args.threads} thread(s)",
        flush=True,
    )
    records = []
    for name in args.models:
        print(f"  running {name} ...", flush=True)
        record = run_in_subprocess(name, cfg, args.timeout)
        records.append(record)
        if "error" in record:
            print(f"    error: {record['error']}", flush=True)
        else:
            print(
                f"    test bpd {record['test_bpd']:.3f}, {record['ms_per_step_median']:.1f} ms/step, "
                f"peak RSS +{record['peak_rss_increase_mib']:.0f} MiB",
                flush=True,
            )
        if "profile" in record:
            print(record["profile"])
    glow_ok = [r["model"] for r in records if r["model"].startswith("glow/") and "error" not in r]
    paired = None
    if args.paired_rounds > 0 and "glow/normflows" in glow_ok and len(glow_ok) > 1:
        print(f"  interleaved timing of {', '.join(glow_ok)} ({args.paired_rounds} rounds) ...", flush=True)
        paired = run_in_subprocess("paired:" + ",".join(glow_ok), cfg, args.timeout)
        if "error" in paired:
            print(f"    error: {paired['error']}", flush=True)
            paired = None
    comparison = compare(records, paired, args.target_speedup)
    table = markdown_table(records, paired)
    print()
    print(table)
    print()
    for name, c in comparison.items():
        verdict = "met" if c["meets_speed_target"] and c["meets_bpd_target"] else "NOT met"
        cpu = "" if c["speed_ratio_interleaved_cpu"] is None else f", CPU {c['speed_ratio_interleaved_cpu']:.2f}"
        print(
            f"{name} vs glow/normflows: speed ratio normflows_ms / pyroflows_ms = "
            f"{c['speed_ratio_normflows_over_pyroflows']:.2f} ({c['speed_ratio_source']}{cpu}; own runs: wall "
            f"{c['speed_ratio_own_runs_wall']:.2f}, CPU {c['speed_ratio_own_runs_cpu']:.2f}; target >= "
            f"{args.target_speedup}), test bpd difference {c['test_bpd_difference_pyroflows_minus_normflows']:+.3f} "
            f"(target <= 0): target {verdict}"
        )
    memory_method = next((r["memory_method"] for r in records if "memory_method" in r), None)
    print(f"\nmemory: {memory_method}, each model in a fresh process")
    print(f"command: {command}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        payload = {
            "command": command,
            "config": cfg,
            "data": {
                "dataset": "sklearn.datasets.load_digits",
                "shape": list(SHAPE),
                "n_bins": N_BINS,
                "split": "train_test_split(test_size=0.2, random_state=0, stratify=target)",
                "n_train": len(train),
                "n_test": len(test),
                "dequantization": "x = (k + u) / n_bins, u ~ U(0, 1)",
                "bpd": "(-log p(x) + D log n_bins) / (D ln 2), logit Jacobian included",
            },
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "threads": args.threads,
            },
            "memory_method": memory_method,
            "timing_method": (
                "median of time.perf_counter (and time.process_time) over zero_grad + loss + backward + step, "
                "after warm-up; 'own run' in each model's process, 'interleaved' with all Glow models in one "
                "process, one step each per round in rotating order (ratio = median of per-round ratios)"
            ),
            "interleaved": paired,
            "results": [{k: v for k, v in r.items() if k != "profile"} for r in records],
            "comparison": comparison,
            "table": table,
        }
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
