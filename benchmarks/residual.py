"""Residual flows on CPU: pyroflows against normflows (speed, memory), memory against series length, and
density quality on 2-D toy densities with exact log-density.

Three parts, each printed as a markdown table and stored in ``benchmarks/results/residual.json``
(``residual_quick.json`` with ``--quick``, so a smoke test never overwrites real results).

(a) Speed and memory. A pyroflows vector residual flow,
``pyroflows.residual_flow(D, num_layers=8, hidden=(128, 128), coeff=0.98, logdet="unbiased", n_exact_terms=2,
geom_p=0.5, actnorm=False)`` in ``pyroflows.FlowDensity(flow, (D,))``, trained by maximum likelihood
(``loss = -model.log_prob(x).mean()``, Adam, lr 1e-3, batch 256) for D = 2 and D = 64, and a conv residual flow
on 1x8x8 inputs (batch 256 of uniform pixels), ``pyroflows.residual_flow((1, 8, 8), num_layers=4, hidden=32,
levels=1, logit_alpha=None, actnorm=False, ...)`` (conv 3x3 -> LipSwish -> conv 1x1 -> LipSwish -> conv 3x3, 32
hidden channels, no squeeze; 4 blocks of 32 channels because a step of 8 blocks of 64 takes seconds on CPU),
next to the normflows model built to match, read off normflows' source:

* vector: 8 x ``normflows.flows.Residual(normflows.nets.LipschitzMLP([D, 128, 128, D], init_zeros=True,
  lipschitz_const=0.98), n_exact_terms=2, n_samples=1, reduce_memory=True, reverse=True)`` (``geom_p=0.5``,
  geometric roulette, Neumann gradient with backward-in-forward, no brute-force log-det: normflows only uses
  its brute-force 2-D Jacobian when ``brute_force=True`` or in eval mode);
* conv: 4 such blocks with ``normflows.nets.LipschitzCNN([1, 32, 32, 1], [3, 1, 3], init_zeros=True,
  lipschitz_const=0.98)``;
* ``normflows.NormalizingFlow(q0=DiagGaussian(shape), flows)`` with ``forward_kld(x)`` as the loss. normflows'
  Lipschitz layers do no power iteration in ``forward``: the user must call
  ``normflows.utils.update_lipschitz(model, n)`` after every optimiser step. That call is inside normflows' timed
  step (it is part of its training cost), with ``n = 5`` (LipschitzMLP's default ``max_lipschitz_iter`` and what
  normflows' examples use) and, in a second row, ``n = 1`` (pyroflows runs one power iteration per layer per
  optimiser step, by itself, inside ``log_prob``).

Both use LipSwish (``x sigmoid(softplus(b) x) / 1.1``) and spectral-norm (2 -> 2) linear layers scaled by
``1 / max(1, sigma / 0.98)``. Architectural differences that remain: normflows' LipschitzMLP/CNN put an
activation *before* every layer, the input included (3 LipSwish per block), pyroflows only between layers (2);
normflows' output layer starts near zero (``init_zeros``), pyroflows' does not; pyroflows' flow ends in a learned
elementwise affine layer, normflows' base ``DiagGaussian`` has a learned mean and scale instead.

Roulette: both "geom_p = 0.5", but the libraries mean different things. normflows draws ``N ~ numpy geometric``
on {1, 2, ...} (mean 2) and evaluates ``n_exact_terms + N`` series terms (mean 4) plus one more vector-Jacobian
product (VJP) with a graph; pyroflows draws ``N ~ torch Geometric`` on {0, 1, ...} (mean 1) and evaluates
``n_exact_terms + N`` terms (mean 3), then one VJP with a graph in backward. The row "pyroflows geom_p=1/3" has
pyroflows' expected number of terms equal to normflows' (mean 4), i.e. the same expected number of VJPs.
Memory-efficient backward: normflows ``reduce_memory=True`` computes the parameter gradient inside forward and
keeps the graph of ``g(x)``; pyroflows ``memory_efficient=True`` (its default) keeps only ``x``, the probe and the
Neumann vector and recomputes ``g`` in backward. Row "pyroflows ME=False" is ordinary autograd.

Timing: ms per training step = wall time of ``zero_grad + loss + backward + step`` (+ ``update_lipschitz`` for
normflows), median over ``--rounds`` steps after ``--warmup`` steps, ``torch.set_num_threads(--threads)`` (1 by
default; half as many for the conv flow). All variants of one configuration are built in one process and stepped
*interleaved* (one step of each per round, the order rotating, the same fresh batch for all), so the load of other
processes falls on all of them alike; the headline ratio is ``median(normflows n=5) / median(pyroflows)``, with the
median of the per-round ratios beside it. CPU time per step (``time.process_time``) is reported too.

Peak memory: each configuration runs in a fresh Python process (``--isolation spawn``, the default; ``fork``
forks a child from a parent that has only imported the libraries, which is what ``--quick`` uses). The process
imports torch, pyroflows and normflows and runs one throwaway training step of a tiny model of *each* library (so
lazy imports and kernels are loaded), then resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` <- 5) and
records the RSS; it then builds the model and optimiser and trains ``--mem-steps`` steps. Reported: peak RSS
(``VmHWM``) minus that RSS, i.e. what building and training the model added at its peak (parameters, Adam state,
activations, allocator slack). Where ``clear_refs`` is not writable it falls back to ``getrusage(RUSAGE_SELF)
.ru_maxrss`` after minus before, which under-reads when the import peak exceeds the baseline.

(b) Memory against series length: the D = 64 pyroflows flow (8 blocks, batch 256) with ``n_exact_terms`` = 2, 5,
10, 20 and ``geom_p = 0.99``, so the number of terms is ``n_exact_terms + N``, ``N ~ Geometric(0.99)`` on {0, 1,
...} (zero in 99 % of steps), with ``memory_efficient`` True and False, each in a fresh process as above; ms/step
from one interleaved process. normflows (``reduce_memory=True``, ``geom_p=0.99``, so ``n_exact_terms + 1`` terms
almost always) is shown for reference. Target: at most 10 % growth of the pyroflows ``memory_efficient=True``
peak from 2 to 20 terms.

(c) Density quality: ``FlowDensity(residual_flow(2, ...))`` trained by maximum likelihood on fresh samples of two
2-D densities with exact log-density (``pyroflows.data.toy.Checkerboard`` and ``EightGaussians``), then scored in
eval mode (pyroflows' residual blocks then compute the exact log-det, D <= 64; the power iteration runs to
tolerance) on ``--test-samples`` fresh samples:

* checkerboard: uniform on the 8 unit squares ``[i, i+1] x [j, j+1]``, ``i, j in {-2, -1, 0, 1}``, ``i + j``
  even, of a 4x4 board on ``[-2, 2]^2``: density 1/8 on them, 0 elsewhere, entropy ``log 8``. (The brief asked
  for "a 4x4 checkerboard in [-4, 4]^2" *and* "unit squares, density 1/8, entropy log 8"; a 4x4 board on
  ``[-4, 4]^2`` has squares of side 2 and entropy ``log 32``. The unit-square board is used; KL divergence is
  invariant under rescaling both densities, so the KL figures hold for the ``[-4, 4]^2`` board as well.)
* 8 Gaussians: the equal mixture of ``N(mu_k, sigma^2 I)``, ``mu_k = 2 sqrt(2) (cos(k pi / 4), sin(k pi / 4))``,
  ``k = 0..7``, ``sigma = sqrt(2) / 4`` (FFJORD's toy: means at radius 4 and std 0.5, divided by sqrt 2). Its
  differential entropy is estimated by Monte Carlo, ``-mean log p(x)`` over ``--entropy-samples`` samples, with
  its standard error.

Reported: test NLL (nats) with its standard error, KL = NLL - entropy (standard errors combined in quadrature)
and the paired estimate ``mean(log p(x) - log q(x))`` over the same test samples with its own standard error.
Since the checkerboard has zero density off its squares, ``KL(p || q) = E_p[log p - log q]`` is finite and is what
NLL - entropy measures. Target: KL <= 0.05 nats on both.

Usage::

    python benchmarks/residual.py                  # all parts (~35-45 minutes on 2 busy cores)
    python benchmarks/residual.py --quick          # smoke test, under a minute
    python benchmarks/residual.py --part a --rounds 100
    python benchmarks/residual.py --part c --steps 4000
    python benchmarks/residual.py --part a --profile   # also cProfile both libraries' D = 64 training step

Needs ``normflows`` (the ``bench`` extra); pyroflows itself does not use it.

References: Chen, Behrmann, Duvenaud & Jacobsen, *Residual Flows for Invertible Generative Modeling*, NeurIPS
2019; Behrmann et al., *Invertible Residual Networks*, ICML 2019; Stimper et al., *normflows*, JOSS 2023.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402
from pyroflows.data.toy import Checkerboard, EightGaussians  # noqa: E402

RESULT_TAG = "RESIDUAL_RESULT "
HERE = Path(__file__).resolve().parent
BATCH = 256
BLOCKS = 8
HIDDEN = 128
COEFF = 0.98
CONV_SHAPE = (1, 8, 8)
CONV_HIDDEN = 32
CONV_BLOCKS = 4
LR = 1e-3
TARGET_RATIO = 1.5
TARGET_GROWTH = 0.10
TARGET_KL = 0.05

# Training set-up of part (c), per toy (see train_toy). Chosen by the tuning described in the report.
TOY_CONFIGS = {
    "checkerboard": dict(
        blocks=8,
        hidden=(128, 128),
        coeff=0.98,
        actnorm=True,
        logdet="exact",
        batch=512,
        lr=2e-3,
        steps=3000,
        warmup=0.05,
    ),
    "eight_gaussians": dict(
        blocks=8,
        hidden=(128, 128),
        coeff=0.98,
        actnorm=True,
        logdet="exact",
        batch=512,
        lr=2e-3,
        steps=3000,
        warmup=0.05,
    ),
}


# --------------------------------------------------------------------------------------------- variants
def variant(
    lib: str,
    kind: str,
    dim: int | None = None,
    *,
    label: str | None = None,
    memory_efficient=True,
    geom_p: float = 0.5,
    n_exact_terms: int = 2,
    lip_iters: int = 5,
    blocks: int | None = None,
    hidden: int = HIDDEN,
    conv_hidden: int = CONV_HIDDEN,
) -> dict:
    """A model configuration as a JSON-able dict (it travels to worker processes on the command line).

    :param lib: ``"pyroflows"`` or ``"normflows"``.
    :param kind: ``"vector"`` (``dim`` needed) or ``"conv"`` (1x8x8).
    :param memory_efficient: pyroflows' ``memory_efficient`` (normflows always uses ``reduce_memory=True``).
    :param geom_p: roulette parameter, in each library's own convention (see the module docstring).
    :param lip_iters: normflows' ``update_lipschitz(model, lip_iters)`` after each step.
    :param blocks: residual blocks (default 8 for vectors, 4 for images).
    :param hidden: MLP width (two hidden layers); ``conv_hidden``: CNN hidden channels.
    """
    if blocks is None:
        blocks = BLOCKS if kind == "vector" else CONV_BLOCKS
    if label is None:
        label = lib if lib == "pyroflows" else f"normflows n_lip={lip_iters}"
    return dict(
        lib=lib,
        kind=kind,
        dim=dim,
        label=label,
        memory_efficient=memory_efficient,
        geom_p=geom_p,
        n_exact_terms=n_exact_terms,
        lip_iters=lip_iters,
        blocks=blocks,
        hidden=hidden,
        conv_hidden=conv_hidden,
    )


def config_name(v: dict) -> str:
    """``"vector D=64"`` or ``"conv 1x8x8"``."""
    return f"vector D={v['dim']}" if v["kind"] == "vector" else "conv " + "x".join(map(str, CONV_SHAPE))


def event_shape(v: dict) -> tuple[int, ...]:
    """The data event shape of a configuration."""
    return (v["dim"],) if v["kind"] == "vector" else CONV_SHAPE


def make_batch(v: dict, generator: torch.Generator, batch: int = BATCH) -> torch.Tensor:
    """A training batch: for vectors a correlated Gaussian-ish cloud (``tanh``-warped normal), for images
    uniform pixels in [0, 1] (no logit layer: the flows see the raw values)."""
    shape = (batch,) + event_shape(v)
    if v["kind"] == "vector":
        z = torch.randn(shape, generator=generator)
        return z + 0.5 * torch.tanh(2.0 * z.roll(1, dims=-1))
    return torch.rand(shape, generator=generator)


def build(v: dict) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """Build the model of configuration ``v`` with its Adam optimiser; returns ``(module, step)`` where
    ``step(x)`` performs one full training step on batch ``x`` and returns the (detached) loss."""
    if v["lib"] == "pyroflows":
        import pyroflows

        common = dict(
            num_layers=v["blocks"],
            coeff=COEFF,
            logdet="unbiased",
            n_exact_terms=v["n_exact_terms"],
            geom_p=v["geom_p"],
            actnorm=False,
            memory_efficient=v["memory_efficient"],
        )
        if v["kind"] == "vector":
            flow = pyroflows.residual_flow(v["dim"], hidden=(v["hidden"], v["hidden"]), **common)
        else:
            flow = pyroflows.residual_flow(CONV_SHAPE, hidden=v["conv_hidden"], levels=1, logit_alpha=None, **common)
        model = pyroflows.FlowDensity(flow, event_shape(v))
        opt = torch.optim.Adam(model.parameters(), lr=LR)

        def step(x: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = -model.log_prob(x).mean()
            loss.backward()
            opt.step()
            return loss.detach()

        return model, step
    if v["lib"] != "normflows":
        raise ValueError(f"unknown library {v['lib']!r}")
    import normflows as nf

    flows = []
    for _ in range(v["blocks"]):
        if v["kind"] == "vector":
            d, h = v["dim"], v["hidden"]
            net = nf.nets.LipschitzMLP([d, h, h, d], lipschitz_const=COEFF, init_zeros=True)
        else:
            c, h = CONV_SHAPE[0], v["conv_hidden"]
            net = nf.nets.LipschitzCNN([c, h, h, c], [3, 1, 3], lipschitz_const=COEFF, init_zeros=True)
        flows.append(
            nf.flows.Residual(
                net, reverse=True, reduce_memory=True, geom_p=v["geom_p"], n_exact_terms=v["n_exact_terms"], n_samples=1
            )
        )
    model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(event_shape(v)), flows=flows)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    lip_iters = v["lip_iters"]

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model.forward_kld(x)
        loss.backward()
        opt.step()
        nf.utils.update_lipschitz(model, lip_iters)
        return loss.detach()

    return model, step


# --------------------------------------------------------------------------------------------- timing
def _stats(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return dict(median=statistics.median(ms), q1=q[0], q3=q[2], mean=statistics.fmean(ms), n=len(ms))


def time_interleaved(variants: list[dict], warmup: int, rounds: int, threads: int, seed: int = 0) -> dict:
    """Build every variant in this process, then step them interleaved: per round one fresh batch, one step of
    each variant, the order rotating by one each round. Returns per-label wall/CPU statistics (ms) and the
    per-round wall times."""
    torch.set_num_threads(threads)
    steps = []
    for i, v in enumerate(variants):
        torch.manual_seed(seed + i)
        steps.append(build(v)[1])
    gen = torch.Generator().manual_seed(seed)
    wall = [[] for _ in variants]
    cpu = [[] for _ in variants]
    n = len(variants)
    for r in range(warmup + rounds):
        x = make_batch(variants[0], gen)
        for k in range(n):
            i = (r + k) % n
            t0, c0 = time.perf_counter(), time.process_time()
            loss = steps[i](x)
            t1, c1 = time.perf_counter(), time.process_time()
            if not math.isfinite(float(loss)):
                raise RuntimeError(f"{variants[i]['label']}: non-finite loss {float(loss)} in round {r}")
            if r >= warmup:
                wall[i].append(1e3 * (t1 - t0))
                cpu[i].append(1e3 * (c1 - c0))
    return {
        v["label"]: dict(wall=_stats(wall[i]), cpu=_stats(cpu[i]), rounds_ms=wall[i]) for i, v in enumerate(variants)
    }


def profile_steps(v: dict, steps: int, threads: int, top: int = 18) -> str:
    """cProfile ``steps`` training steps of ``v`` (after 3 warm-up steps); the top functions by own time and by
    cumulative time, as text."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, step = build(v)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        step(make_batch(v, gen))
    batches = [make_batch(v, gen) for _ in range(steps)]
    prof = cProfile.Profile()
    prof.enable()
    for x in batches:
        step(x)
    prof.disable()
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# --------------------------------------------------------------------------------------------- memory
def _reset_peak() -> tuple[str, int]:
    """Reset the peak-RSS mark if the kernel lets us; returns ``(method, baseline KiB)``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _common.proc_status_kib("VmRSS")
        if rss is not None and _common.proc_status_kib("VmHWM") is not None:
            return "clear_refs+VmHWM", rss
    except OSError:
        pass
    return "getrusage ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib(method: str) -> int:
    if method.startswith("clear_refs"):
        return _common.proc_status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _warm_up(threads: int) -> None:
    """One training step of a tiny model of each library, so that lazy imports, autograd's double-backward
    kernels and Adam's first-step allocations are in place before the baseline is taken."""
    torch.set_num_threads(threads)
    for lib in ("pyroflows", "normflows"):
        for kind in ("vector", "conv"):
            v = variant(lib, kind, dim=2, blocks=1, hidden=4, conv_hidden=4)
            _, step = build(v)
            step(make_batch(v, torch.Generator().manual_seed(0), batch=4))
    gc.collect()


def measure_memory(v: dict, steps: int, threads: int) -> dict:
    """Peak RSS added by building ``v`` and training it ``steps`` steps, in this (fresh) process."""
    _warm_up(threads)
    method, base = _reset_peak()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    _, step = build(v)
    ms = []
    for _ in range(steps):
        x = make_batch(v, gen)
        t0 = time.perf_counter()
        step(x)
        ms.append(1e3 * (time.perf_counter() - t0))
    peak = _peak_kib(method)
    return dict(
        label=v["label"],
        peak_mib=max(peak - base, 0) / 1024,
        baseline_mib=base / 1024,
        method=method,
        steps=steps,
        ms_median_own_process=statistics.median(ms[1:] or ms),
    )


def run_isolated(fn_name: str, payload: dict, isolation: str, timeout: float = 900) -> dict:
    """Run ``fn_name(**payload)`` (a function of this module) in a fresh process and return its result.

    ``spawn``: a new interpreter running this script with ``--worker``; ``fork``: ``os.fork`` of this process
    (which must not have trained anything yet). Errors in the worker come back as ``{"error": ...}``.
    """
    if isolation == "spawn":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(dict(fn=fn_name, **payload))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG) :])
        return {"error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}"}
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            result = WORKER_FUNCTIONS[fn_name](**payload)
        except BaseException:
            result = {"error": traceback.format_exc()[-2000:]}
        with os.fdopen(write_fd, "w") as f:
            f.write(json.dumps(result))
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "forked worker returned nothing"}


# --------------------------------------------------------------------------------------------- toy densities
# Checkerboard and EightGaussians (exact sample / log_prob / entropy) live in pyroflows.data.toy.
TOYS = {"checkerboard": Checkerboard, "eight_gaussians": EightGaussians}


def _log_q(model, x: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.log_prob(part) for part in x.split(chunk)])


def train_toy(
    toy_name: str,
    cfg: dict,
    steps: int,
    test_samples: int,
    entropy_samples: int,
    threads: int,
    seed: int = 0,
    log_every: int = 0,
) -> dict:
    """Train ``FlowDensity(residual_flow(2, ...))`` by maximum likelihood on fresh samples of a toy density (Adam,
    linear warm-up then cosine decay of the learning rate), then score it in eval mode on fresh test samples."""
    import pyroflows

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    toy = TOYS[toy_name]()
    gen = torch.Generator().manual_seed(seed + 1)
    flow = pyroflows.residual_flow(
        2,
        num_layers=cfg["blocks"],
        hidden=tuple(cfg["hidden"]),
        coeff=cfg["coeff"],
        logdet=cfg["logdet"],
        actnorm=cfg["actnorm"],
        **cfg.get("block_kwargs", {}),
    )
    model = pyroflows.FlowDensity(flow, (2,))
    # Three parameter groups: LipSwish's raw_beta (its sharpness), the elementwise affine layers outside the
    # residual branches (ActNorm, output affine), and everything else; the first two may get a larger lr.
    named = list(model.named_parameters())
    beta = [p for n, p in named if n.endswith("raw_beta")]
    affine = [p for n, p in named if ".net." not in n]
    rest = [p for n, p in named if ".net." in n and not n.endswith("raw_beta")]
    opt = torch.optim.Adam(
        [
            dict(params=rest, lr=cfg["lr"]),
            dict(params=beta, lr=cfg["lr"] * cfg.get("beta_lr_mult", 1.0)),
            dict(params=affine, lr=cfg["lr"] * cfg.get("affine_lr_mult", 1.0)),
        ]
    )
    warm = max(1, int(cfg["warmup"] * steps))

    def lr_factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    running = None
    history = []
    for i in range(steps):
        x = toy.sample(cfg["batch"], gen)
        loss = -model.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
            history.append((i + 1, running))
            print(
                f"  [{toy_name}] step {i + 1}/{steps}  train NLL (EMA) {running:.4f}  "
                f"CPU {time.process_time() - cpu0:.0f}s",
                flush=True,
            )
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    betas = [float(torch.nn.functional.softplus(p.detach())) for p in beta]
    model.eval()
    test_gen = torch.Generator().manual_seed(seed + 12345)
    x_test = toy.sample(test_samples, test_gen)
    log_q = _log_q(model, x_test).double()
    log_p = toy.log_prob(x_test.double())
    n = test_samples
    nll, nll_se = float(-log_q.mean()), float(log_q.std() / math.sqrt(n))
    diff = log_p - log_q
    kl_paired, kl_paired_se = float(diff.mean()), float(diff.std() / math.sqrt(n))
    entropy, entropy_se = toy.entropy(entropy_samples, torch.Generator().manual_seed(seed + 999))
    kl = nll - entropy
    kl_se = math.sqrt(nll_se**2 + entropy_se**2)
    return dict(
        toy=toy_name,
        config=cfg,
        steps=steps,
        train_cpu_s=train_cpu,
        train_wall_s=train_wall,
        eval_wall_s=time.perf_counter() - wall0 - train_wall,
        test_samples=n,
        entropy=entropy,
        entropy_se=entropy_se,
        entropy_samples=entropy_samples if toy_name != "checkerboard" else None,
        nll=nll,
        nll_se=nll_se,
        kl=kl,
        kl_se=kl_se,
        kl_paired=kl_paired,
        kl_paired_se=kl_paired_se,
        target_met=bool(kl <= TARGET_KL),
        lipswish_beta_range=[min(betas), max(betas)] if betas else None,
        history=history,
    )


WORKER_FUNCTIONS = {
    "measure_memory": measure_memory,
    "time_interleaved": time_interleaved,
    "train_toy": train_toy,
    "profile_steps": profile_steps,
}


def isolated(args, fn_name: str, **payload):
    """``fn_name(**payload)`` in a fresh process (``args.isolation``); raises if the worker failed."""
    result = run_isolated(fn_name, payload, args.isolation)
    if isinstance(result, dict) and "error" in result and len(result) == 1:
        raise RuntimeError(f"{fn_name} worker failed:\n{result['error']}")
    return result


# --------------------------------------------------------------------------------------------- parts
def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def part_a(args) -> tuple[dict, str]:
    """Speed (interleaved, one process per configuration) and peak memory (a fresh process per model)."""
    configs = [("vector", 2), ("vector", 64), ("conv", None)]
    results = {}
    lines = [
        "| configuration | model | ms/step median | IQR | mean | CPU ms median | peak RSS delta (MiB) "
        "| normflows n=5 / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for kind, dim in configs:
        pf = variant("pyroflows", kind, dim)
        speed_variants = [pf, variant("normflows", kind, dim, lip_iters=5)]
        if not args.quick:
            speed_variants += [
                variant("normflows", kind, dim, lip_iters=1),
                variant("pyroflows", kind, dim, geom_p=1 / 3, label="pyroflows geom_p=1/3"),
                variant("pyroflows", kind, dim, memory_efficient=False, label="pyroflows ME=False"),
            ]
        name = config_name(pf)
        mem_variants = speed_variants if not args.quick else speed_variants[:2]
        rounds = args.rounds if kind == "vector" else max(2, args.rounds // 2)
        mem_steps = args.mem_steps if kind == "vector" else max(2, args.mem_steps // 2)
        memory = {}
        for v in mem_variants:
            if v["label"] == "normflows n_lip=1":
                continue  # the number of power iterations does not change memory
            print(f"(a) memory: {name} / {v['label']}, {mem_steps} steps ...", flush=True)
            memory[v["label"]] = run_isolated(
                "measure_memory", dict(v=v, steps=mem_steps, threads=args.threads), args.isolation
            )
            if "error" in memory[v["label"]]:
                summary.append(f"{name} / {v['label']}: memory worker failed: {memory[v['label']]['error']}")
        print(
            f"(a) speed: {name}, {len(speed_variants)} models interleaved, {args.warmup} + {rounds} rounds ...",
            flush=True,
        )
        speed = isolated(
            args, "time_interleaved", variants=speed_variants, warmup=args.warmup, rounds=rounds, threads=args.threads
        )
        ref_label = "normflows n_lip=5"
        ref = speed[ref_label]
        for v in speed_variants:
            s = speed[v["label"]]
            s["ratio_normflows_over_this"] = ref["wall"]["median"] / s["wall"]["median"]
            s["paired_ratio_median"] = statistics.median(a / b for a, b in zip(ref["rounds_ms"], s["rounds_ms"]))
            mem = memory.get(v["label"], {})
            s["memory"] = mem
            w = s["wall"]
            lines.append(
                f"| {name} | {v['label']} | {w['median']:.1f} | {w['q1']:.1f}-{w['q3']:.1f} | {w['mean']:.1f} "
                f"| {s['cpu']['median']:.1f} | {_fmt(mem.get('peak_mib'))} | "
                f"{s['ratio_normflows_over_this']:.2f} (paired {s['paired_ratio_median']:.2f}) |"
            )
        ratio = speed["pyroflows"]["ratio_normflows_over_this"]
        met = ratio >= TARGET_RATIO
        summary.append(
            f"{name}: normflows(n_lip=5) / pyroflows = {ratio:.2f} "
            f"(target >= {TARGET_RATIO}: {'met' if met else 'NOT met'})"
        )
        results[name] = dict(speed=speed, ratio=ratio, target_met=met)
    if args.profile:
        for lib in ("pyroflows", "normflows"):
            text = isolated(
                args, "profile_steps", v=variant(lib, "vector", 64), steps=args.profile_steps, threads=args.threads
            )
            results[f"profile {lib} vector D=64"] = text
            print(f"\ncProfile, {lib}, vector D=64, {args.profile_steps} steps:\n{text}")
    table = "\n".join(lines + [""] + summary)
    return results, table


def part_b(args) -> tuple[dict, str]:
    """Peak memory (fresh process each) and ms/step (interleaved) against the number of series terms."""
    terms = (2, 20) if args.quick else (2, 5, 10, 20)
    columns = [("pyroflows ME=True", "pyroflows", True), ("pyroflows ME=False", "pyroflows", False)]
    if not args.quick:
        columns.append(("normflows reduce_memory", "normflows", True))
    variants = []
    for n in terms:
        for name, lib, me in columns:
            variants.append(
                variant(
                    lib,
                    "vector",
                    64,
                    label=f"{name} n={n}",
                    memory_efficient=me,
                    geom_p=0.99,
                    n_exact_terms=n,
                    lip_iters=5,
                )
            )
    memory = {}
    for v in variants:
        print(f"(b) memory: {v['label']} ...", flush=True)
        memory[v["label"]] = run_isolated(
            "measure_memory", dict(v=v, steps=args.mem_steps, threads=args.threads), args.isolation
        )
    print(f"(b) speed: {len(variants)} models interleaved, {args.warmup} + {args.rounds_b} rounds ...", flush=True)
    speed = isolated(
        args, "time_interleaved", variants=variants, warmup=args.warmup, rounds=args.rounds_b, threads=args.threads
    )
    head = "| n_exact_terms | " + " | ".join(f"{name} peak MiB | {name} ms/step" for name, _, _ in columns) + " |"
    lines = [head, "|---|" + "---|---|" * len(columns)]
    results = {"terms": list(terms), "geom_p": 0.99, "rows": {}}
    for n in terms:
        cells = []
        for name, _, _ in columns:
            label = f"{name} n={n}"
            mem = memory[label]
            cells += [_fmt(mem.get("peak_mib")), f"{speed[label]['wall']['median']:.0f}"]
            results["rows"][label] = dict(memory=mem, speed=speed[label])
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    summary = []
    for name, _, _ in columns:
        lo = memory[f"{name} n={terms[0]}"].get("peak_mib")
        hi = memory[f"{name} n={terms[-1]}"].get("peak_mib")
        if lo and hi:
            growth = hi / lo - 1.0
            results[f"growth {name}"] = growth
            tgt = ""
            if name == "pyroflows ME=True":
                met = growth <= TARGET_GROWTH
                results["target_met"] = met
                tgt = f" (target <= {TARGET_GROWTH:.0%}: {'met' if met else 'NOT met'})"
            summary.append(f"{name}: peak memory growth {terms[0]} -> {terms[-1]} terms: {growth:+.1%}{tgt}")
    for label, mem in memory.items():
        if "error" in mem:
            summary.append(f"{label}: worker failed: {mem['error']}")
    return results, "\n".join(lines + [""] + summary)


def part_c(args) -> tuple[dict, str]:
    """Train and score one residual flow per toy density."""
    results = {}
    lines = [
        "| toy | entropy H (nats) | test NLL | KL = NLL - H | paired KL | target KL <= 0.05 | steps | train CPU s "
        "| model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in TOY_CONFIGS.items():
        cfg = dict(cfg)
        steps = args.steps if args.steps is not None else (20 if args.quick else cfg["steps"])
        if args.quick:
            cfg["blocks"] = min(cfg["blocks"], 2)
        print(f"(c) training {name}: {steps} steps, {cfg} ...", flush=True)
        res = train_toy(
            name, cfg, steps, args.test_samples, args.entropy_samples, args.threads, log_every=max(1, steps // 10)
        )
        results[name] = res
        model = (
            f"{cfg['blocks']} blocks, hidden {tuple(cfg['hidden'])}, coeff {cfg['coeff']}, "
            f"actnorm={cfg['actnorm']}, train logdet={cfg['logdet']}, batch {cfg['batch']}, lr {cfg['lr']}"
        )
        lines.append(
            f"| {name} | {res['entropy']:.4f} ± {res['entropy_se']:.4f} | {res['nll']:.4f} ± {res['nll_se']:.4f} "
            f"| {res['kl']:.4f} ± {res['kl_se']:.4f} | {res['kl_paired']:.4f} ± {res['kl_paired_se']:.4f} "
            f"| {'met' if res['target_met'] else 'NOT met'} | {steps} | {res['train_cpu_s']:.0f} | {model} |"
        )
    return results, "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--quick`` shrinks every part to a smoke test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("a", "b", "c", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny settings, under a minute in total")
    p.add_argument("--steps", type=int, default=None, help="(c) training steps per toy (default: per-toy config)")
    p.add_argument("--rounds", type=int, default=None, help="(a) timed steps per model (default 60; quick 3)")
    p.add_argument("--rounds-b", type=int, default=None, help="(b) timed steps per model (default 12; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 8; quick 1)")
    p.add_argument("--mem-steps", type=int, default=None, help="training steps in each memory process (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument(
        "--isolation",
        choices=("spawn", "fork"),
        default=None,
        help="fresh process per memory measurement: new interpreter (default) or fork (quick)",
    )
    p.add_argument("--test-samples", type=int, default=None, help="(c) test samples (default 50000; quick 20000)")
    p.add_argument("--entropy-samples", type=int, default=2_000_000, help="(c) Monte Carlo samples for entropy")
    p.add_argument("--profile", action="store_true", help="(a) also cProfile both libraries at D = 64")
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument("--out", default=None, help="JSON path (default results/residual.json, quick: residual_quick.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(
        rounds=2 if q else 60,
        rounds_b=1 if q else 12,
        warmup=1 if q else 8,
        mem_steps=2 if q else 20,
        isolation="fork" if q else "spawn",
        test_samples=20_000 if q else 50_000,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if q and args.entropy_samples == 2_000_000:
        args.entropy_samples = 1_000_000
    if args.out is None:
        args.out = str(HERE / "results" / ("residual_quick.json" if q else "residual.json"))
    return args


def environment() -> dict:
    """Versions and machine facts stored with the results."""
    import pyroflows

    try:
        import normflows

        nf_version = getattr(normflows, "__version__", "unknown")
    except ImportError:
        nf_version = None
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        pyroflows=pyroflows.__version__,
        normflows=nf_version,
        machine=platform.machine(),
        cpus=os.cpu_count(),
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )


def main(argv=None) -> None:
    """Run the selected parts, print the tables and merge the results into the JSON file."""
    args = parse_args(argv)
    if args.worker is not None:
        payload = json.loads(args.worker)
        fn = WORKER_FUNCTIONS[payload.pop("fn")]
        print(RESULT_TAG + json.dumps(fn(**payload)), flush=True)
        return
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/residual.py"] + sys.argv[1:])
    print(
        f"command: {command}\ntorch.set_num_threads({args.threads}); memory isolation: {args.isolation}\n", flush=True
    )
    import normflows  # noqa: F401  (fail early, and load it before any fork)

    import pyroflows  # noqa: F401

    parts = ("a", "b", "c") if args.part == "all" else (args.part,)
    fns = {"a": part_a, "b": part_b, "c": part_c}
    titles = {
        "a": "(a) Training step time and peak memory, batch 256 (vectors: 8 blocks [D,128,128,D]; conv: 4 blocks, "
        "32 channels)",
        "b": "(b) pyroflows D=64 peak training memory against series length (geom_p=0.99)",
        "c": "(c) Density quality: residual flow on 2-D toys, exact test NLL and KL (nats)",
    }
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {}
    tables = []
    t_start = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        results, table = fns[part](args)
        elapsed = time.perf_counter() - t0
        tables.append(f"## {titles[part]}\n\n{table}\n\n(part {part}: {elapsed:.0f} s wall)")
        stored[part] = dict(
            command=command,
            threads=args.threads,
            isolation=args.isolation,
            wall_s=elapsed,
            finished=time.strftime("%Y-%m-%d %H:%M:%S"),
            environment=environment(),
            results=results,
        )
        print("\n" + tables[-1] + "\n", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(stored, indent=1, default=str))
    print("\n\n".join(["# Residual-flow benchmark", f"command: `{command}`"] + tables))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s wall; results in {out}")


if __name__ == "__main__":
    main()
