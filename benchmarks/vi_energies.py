"""Variational inference on the 2-D energies U1-U4 of Rezende & Mohamed (2015, Table 1).

Every guide is an ``AutoNormalizingFlow`` (or ``AutoNormal``) fitted to ``p(z) ∝ exp(-U(z))`` by maximising
Pyro's vectorised ``Trace_ELBO``, all for the same number of steps with the same optimiser and learning rate.
By default the loop calls ``Trace_ELBO.differentiable_loss`` and steps one ``torch.optim.Adam`` (with an
exponential lr decay); ``--loop svi`` uses ``pyro.infer.SVI`` with ``pyro.optim.Adam``/``ClippedAdam``
instead (the same objective and update, with Pyro's per-parameter optimisers, slower). The log-normaliser
``log Z`` comes from grid quadrature, and each fitted guide's ``KL(q‖p) = log Z - ELBO`` from an ELBO
averaged over many samples of the guide; a run that produces a non-finite loss is reported as diverged.

Usage::

    python benchmarks/vi_energies.py                 # the full benchmark
    python benchmarks/vi_energies.py --quick         # a smoke test (writes vi_energies_quick.json)
    python benchmarks/vi_energies.py --steps 8000 --energies U3,U4 --out benchmarks/results/more_steps.json
    python benchmarks/vi_energies.py --loop svi --lr-final 1 --guide 'pyro iterated(32, planar)'

Reference: Rezende & Mohamed, *Variational Inference with Normalizing Flows*, ICML 2015.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_options  # noqa: E402

# --------------------------------------------------------------------------------------------- energies
_BOX_U1 = ((-6.0, 6.0), (-6.0, 6.0))
_BOX_WAVES = ((-20.0, 20.0), (-8.0, 8.0))  # z1 carries a N(0, 3^2) factor: |z1| <= 20 is 6.7 sd


def _w1(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(0.5 * math.pi * z[..., 0])


def _w2(z: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.exp(-0.5 * ((z[..., 0] - 1.0) / 0.6) ** 2)


def _w3(z: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.sigmoid((z[..., 0] - 1.0) / 0.3)


def _neg_logsumexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``-log(exp(a) + exp(b))``, computed stably."""
    return -torch.logaddexp(a, b)


def _z1_prior(z: torch.Tensor) -> torch.Tensor:
    """``z1² / 18``: the N(0, 3²) factor on ``z1`` that makes U2-U4 normalisable."""
    return z[..., 0] ** 2 / 18.0


def energy_u1(z: torch.Tensor) -> torch.Tensor:
    """U1, the ring with two lobes; ``z`` has shape ``(..., 2)``, the result ``(...)``."""
    z1 = z[..., 0]
    ring = 0.5 * ((torch.linalg.vector_norm(z, dim=-1) - 2.0) / 0.4) ** 2
    lobes = _neg_logsumexp(-0.5 * ((z1 - 2.0) / 0.6) ** 2, -0.5 * ((z1 + 2.0) / 0.6) ** 2)
    return ring + lobes


def energy_u2(z: torch.Tensor) -> torch.Tensor:
    """U2, the sine wave, plus the N(0, 3²) factor on ``z1``."""
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2 + _z1_prior(z)


def energy_u3(z: torch.Tensor) -> torch.Tensor:
    """U3, the sine wave split by a bump, plus the N(0, 3²) factor on ``z1``."""
    d = z[..., 1] - _w1(z)
    return _neg_logsumexp(-0.5 * (d / 0.35) ** 2, -0.5 * ((d + _w2(z)) / 0.35) ** 2) + _z1_prior(z)


def energy_u4(z: torch.Tensor) -> torch.Tensor:
    """U4, the sine wave split by a step, plus the N(0, 3²) factor on ``z1``."""
    d = z[..., 1] - _w1(z)
    return _neg_logsumexp(-0.5 * (d / 0.4) ** 2, -0.5 * ((d + _w3(z)) / 0.35) ** 2) + _z1_prior(z)


ENERGIES = {"U1": energy_u1, "U2": energy_u2, "U3": energy_u3, "U4": energy_u4}
BOXES = {"U1": _BOX_U1, "U2": _BOX_WAVES, "U3": _BOX_WAVES, "U4": _BOX_WAVES}


def log_normalizer(energy, box, n: int, chunk: int = 500) -> float:
    """``log ∫ exp(-U(z)) dz`` over ``box`` by the midpoint rule on an ``n × n`` grid, in float64."""
    (a0, b0), (a1, b1) = box
    h0, h1 = (b0 - a0) / n, (b1 - a1) / n
    x0 = a0 + h0 * (torch.arange(n, dtype=torch.float64) + 0.5)
    x1 = a1 + h1 * (torch.arange(n, dtype=torch.float64) + 0.5)
    parts = []
    for i in range(0, n, chunk):
        g0, g1 = torch.meshgrid(x0[i : i + chunk], x1, indexing="ij")
        parts.append(torch.logsumexp(-energy(torch.stack([g0, g1], dim=-1)).flatten(), dim=0))
    return float(torch.logsumexp(torch.stack(parts), dim=0)) + math.log(h0 * h1)


def checked_log_normalizer(name: str, n: int) -> dict:
    """``log Z`` of energy ``name``, with two checks of the quadrature: a 1.5× wider box at the same
    spacing, and a 1.5× finer grid on the same box. Returns the value and both differences."""
    energy, box = ENERGIES[name], BOXES[name]
    value = log_normalizer(energy, box, n)
    wide_box = tuple((1.5 * a, 1.5 * b) for a, b in box)
    wider = log_normalizer(energy, wide_box, int(round(1.5 * n)))
    finer = log_normalizer(energy, box, int(round(1.5 * n)))
    return {
        "log_Z": value,
        "grid": [n, n],
        "box": [list(b) for b in box],
        "delta_wider_box": wider - value,
        "delta_finer_grid": finer - value,
    }


# --------------------------------------------------------------------------------------------- guides
# Each entry: (library, description, init_transform_fn builder or None for AutoNormal).
def _pyroflows_planar(k):
    import pyroflows

    return partial(pyroflows.planar_flow, num_layers=k)


def _pyroflows_realnvp(k):
    import pyroflows

    return partial(pyroflows.realnvp, num_layers=k)


def _pyroflows_spline(k):
    import pyroflows

    return partial(pyroflows.spline_flow, num_layers=k)


def _pyroflows_autoregressive(k):
    import pyroflows

    return partial(pyroflows.autoregressive_flow, num_layers=k)


def _pyro_iterated(k, kind, permute=False):
    import pyro.distributions.transforms as T

    base = {
        "planar": partial(T.planar),
        "affine_coupling": partial(T.affine_coupling, hidden_dims=[64, 64]),
        "spline_coupling": partial(T.spline_coupling, hidden_dims=[64, 64]),
    }[kind]
    if not permute:
        return partial(T.iterated, k, base)

    def init(input_dim):
        # Swap the halves between layers, so the conditioning coordinate(s) are transformed too.
        flip = torch.arange(input_dim - 1, -1, -1)
        parts = []
        for i in range(k):
            parts.append(base(input_dim))
            if i < k - 1:
                parts.append(T.Permute(flip))
        return T.ComposeTransformModule(parts)

    return init


GUIDES = {
    "pyroflows planar_flow(8)": ("pyroflows", lambda: _pyroflows_planar(8)),
    "pyroflows planar_flow(32)": ("pyroflows", lambda: _pyroflows_planar(32)),
    "pyroflows realnvp(8)": ("pyroflows", lambda: _pyroflows_realnvp(8)),
    "pyroflows realnvp(16)": ("pyroflows", lambda: _pyroflows_realnvp(16)),
    # the same flow trained with the sticking-the-landing gradient (pyroflows.elbo.TraceSTL_ELBO)
    "pyroflows realnvp(16) + STL": ("pyroflows", lambda: _pyroflows_realnvp(16)),
    "pyroflows realnvp(8) + STL": ("pyroflows", lambda: _pyroflows_realnvp(8)),
    "pyroflows spline_flow(8)": ("pyroflows", lambda: _pyroflows_spline(8)),
    "pyroflows spline_flow(8) + STL": ("pyroflows", lambda: _pyroflows_spline(8)),
    "pyroflows autoregressive_flow(4)": ("pyroflows", lambda: _pyroflows_autoregressive(4)),
    "pyroflows autoregressive_flow(8)": ("pyroflows", lambda: _pyroflows_autoregressive(8)),
    "pyro iterated(8, planar)": ("pyro", lambda: _pyro_iterated(8, "planar")),
    "pyro iterated(32, planar)": ("pyro", lambda: _pyro_iterated(32, "planar")),
    # Without a permutation every coupling transforms z2 given z1 (z1 keeps its N(0, 1) base marginal), so
    # a few layers are as expressive as many: 4 affine (their composition is one affine map of z2), 2 splines.
    "pyro iterated(4, affine_coupling)": ("pyro", lambda: _pyro_iterated(4, "affine_coupling")),
    "pyro iterated(2, spline_coupling)": ("pyro", lambda: _pyro_iterated(2, "spline_coupling")),
    # The like-for-like counterpart of realnvp(16): 16 couplings, the halves swapped in between.
    "pyro affine_coupling(16) + Permute": ("pyro", lambda: _pyro_iterated(16, "affine_coupling", True)),
    "pyro affine_coupling(8) + Permute": ("pyro", lambda: _pyro_iterated(8, "affine_coupling", True)),
    "pyro spline_coupling(4) + Permute": ("pyro", lambda: _pyro_iterated(4, "spline_coupling", True)),
    "pyro AutoNormal": ("pyro", None),
}
DEFAULT_GUIDES = [
    "pyroflows planar_flow(8)",
    "pyroflows planar_flow(32)",
    "pyroflows realnvp(16)",
    "pyroflows realnvp(16) + STL",
    "pyro iterated(8, planar)",
    "pyro iterated(32, planar)",
    "pyro iterated(4, affine_coupling)",
    "pyro iterated(2, spline_coupling)",
    "pyro affine_coupling(16) + Permute",
    "pyro AutoNormal",
]
QUICK_GUIDES = [
    "pyroflows planar_flow(8)",
    "pyroflows realnvp(8)",
    "pyro iterated(8, planar)",
    "pyro affine_coupling(8) + Permute",  # realnvp(8)'s peer, so every speed figure has one
    "pyro AutoNormal",
]
# Rough relative cost per step, to start the slowest jobs first.
_COST = {"(16": 5, "32": 4, "spline": 3, "realnvp": 2, "affine": 2}


def _cost(guide_name: str) -> int:
    return max([c for key, c in _COST.items() if key in guide_name] or [1])


# --------------------------------------------------------------------------------------------- fitting
def make_model(energy):
    """A Pyro model whose joint density is exactly ``exp(-U(z))``.

    ``z`` is drawn from a standard-normal *carrier* whose log-density the factor subtracts again, so the
    carrier only gives the autoguides a distribution to initialise from (``ImproperUniform`` cannot be used:
    the autoguides' ``init_to_feasible`` calls ``.sample()`` on it, which raises). Written for a batch of
    particles: ``z`` has shape ``(..., 2)``, the factor shape ``(...)``.
    """
    import pyro
    import pyro.distributions as dist

    def model():
        carrier = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        z = pyro.sample("z", carrier)
        pyro.factor("U", -energy(z) - carrier.log_prob(z))

    return model


def _make_guide(guide_name, model):
    from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow

    _, factory = GUIDES[guide_name]
    if factory is None:
        return AutoNormal(model)
    return AutoNormalizingFlow(model, factory())


def _posterior(guide):
    """The fitted guide's distribution over ``z`` (shape ``(2,)``): ``get_posterior()`` for the flows."""
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal

    if isinstance(guide, AutoNormal):
        return dist.Normal(guide.locs.z.detach(), guide.scales.z.detach()).to_event(1)
    return guide.get_posterior()


def _logdet_check(guide, n: int = 256) -> float | None:
    """Largest ``|log q(z) - (log N(x) - log|det ∂z/∂x|)|`` over ``n`` base samples ``x``, ``z`` the flow's
    output: ``log q`` as the evaluation computes it (a forward pass, then ``log_prob`` of its output, which
    uses the remembered/cached log-det), the log-det from an autograd Jacobian. ``None`` for ``AutoNormal``."""
    from pyro.infer.autoguide import AutoNormal

    if isinstance(guide, AutoNormal):
        return None
    q = guide.get_posterior()
    x = q.base_dist.sample((n,))
    with torch.no_grad():
        z = x
        for t in q.transforms:
            z = t(z)
        log_q = q.log_prob(z)
    x_grad = x.clone().requires_grad_(True)
    y = x_grad
    for t in q.transforms:
        y = t(y)
    # The maps act on each sample independently, so row i of every Jacobian is one gradient away.
    rows = [torch.autograd.grad(y[:, i].sum(), x_grad, retain_graph=True)[0] for i in range(y.shape[-1])]
    logdet = torch.linalg.slogdet(torch.stack(rows, dim=-2).double())[1]
    reference = q.base_dist.log_prob(x).double() - logdet
    return float((log_q.double() - reference).abs().max())


def _lr_decay(cfg) -> float:
    """Per-step multiplicative lr decay reaching ``lr_final × lr`` after ``steps`` steps."""
    return cfg["lr_final"] ** (1.0 / cfg["steps"])


def _pyro_optimizer(cfg):
    """``pyro.optim.Adam`` at a constant lr, or ``ClippedAdam`` with the lr decay and optional clipping."""
    import pyro.optim

    if cfg["lr_final"] == 1.0 and cfg["clip_norm"] is None:
        return pyro.optim.Adam({"lr": cfg["lr"]}), "pyro.optim.Adam"
    clip = math.inf if cfg["clip_norm"] is None else cfg["clip_norm"]
    return pyro.optim.ClippedAdam({"lr": cfg["lr"], "lrd": _lr_decay(cfg), "clip_norm": clip}), "ClippedAdam"


def _svi_stepper(model, guide, elbo, cfg):
    """``pyro.infer.SVI`` with a Pyro optimiser (one ``torch.optim.Adam`` per parameter tensor)."""
    import pyro.infer

    optim, name = _pyro_optimizer(cfg)
    svi = pyro.infer.SVI(model, guide, optim, elbo)
    return svi.step, name


def _torch_stepper(model, guide, elbo, cfg):
    """``Trace_ELBO.differentiable_loss`` with one ``torch.optim.Adam`` over all guide parameters: the same
    objective and update as SVI with ``pyro.optim.Adam``/``ClippedAdam`` (Adam acts elementwise), without the
    per-parameter optimiser overhead. The first call runs the guide once in the particle plate, so that its
    parameters exist (and data-dependent initialisations see a batch, as under SVI)."""
    state = {}

    def setup():
        loss = elbo.differentiable_loss(model, guide)
        params = list(guide.parameters())
        state["params"] = params
        state["opt"] = torch.optim.Adam(params, lr=cfg["lr"])
        decay = _lr_decay(cfg)
        state["sched"] = torch.optim.lr_scheduler.ExponentialLR(state["opt"], decay) if decay != 1.0 else None
        return loss

    def step():
        loss = setup() if not state else elbo.differentiable_loss(model, guide)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        state["opt"].zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip_norm"] is not None:
            torch.nn.utils.clip_grad_value_(state["params"], cfg["clip_norm"])
        state["opt"].step()
        if state["sched"] is not None:
            state["sched"].step()
        return value

    name = "torch.optim.Adam" + ("" if _lr_decay(cfg) == 1.0 else " + ExponentialLR")
    return step, name


def _fit_stepper(model, guide, cfg):
    """:func:`pyroflows.infer.fit` with its defaults (STL, the stable-then-cosine schedule, its lr and clipping),
    at the benchmark's steps and particles: the whole run happens at the first call; the later calls replay its
    losses, so the loop below times and records it as it does the others (``--lr``, ``--lr-final``, ``--clip-norm``
    and a ``+ STL`` suffix do not apply)."""
    from pyroflows.infer import fit

    state = {}

    def step():
        if not state:
            options = cfg.get("fit_options", {})
            result = fit(model, guide, cfg["steps"], num_particles=cfg["particles"], progress=False, report=False,
                         **options)  # fmt: skip
            # a step fit skipped (non-finite, no update) replays the loss before it
            losses = result.losses.tolist()
            for i in range(1, len(losses)):
                losses[i] = losses[i - 1] if not math.isfinite(losses[i]) else losses[i]
            state["losses"] = iter(losses)
        return next(state["losses"])

    return step, "pyroflows.infer.fit defaults"


def fit_and_evaluate(energy_name: str, guide_name: str, cfg: dict, log_z: float) -> dict:
    """Fit one guide to one energy and estimate ``KL(q‖p)``; runs in a worker process."""
    import pyro
    import pyro.infer

    import pyroflows
    from pyroflows.elbo import TraceSTL_ELBO

    torch.set_num_threads(1)
    logging.getLogger("pyro").setLevel(logging.WARNING)
    pyro.enable_validation(cfg["validate"])
    pyroflows.enable_validation(cfg["validate"])
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg["seed"])

    energy = ENERGIES[energy_name]
    model = make_model(energy)
    guide = _make_guide(guide_name, model)
    kind = TraceSTL_ELBO if guide_name.endswith("+ STL") else pyro.infer.Trace_ELBO
    elbo = kind(num_particles=cfg["particles"], vectorize_particles=True)
    if cfg["loop"] == "fit":
        step_fn, optim_name = _fit_stepper(model, guide, cfg)
    else:
        stepper = _svi_stepper if cfg["loop"] == "svi" else _torch_stepper
        step_fn, optim_name = stepper(model, guide, elbo, cfg)

    result = {"energy": energy_name, "guide": guide_name, "library": GUIDES[guide_name][0]}
    result["optimizer"] = optim_name
    losses, window = [], []
    diverged_at, error = None, None
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, cfg["steps"] + 1):
        try:
            loss = step_fn()
        except (ValueError, RuntimeError) as exc:  # validation errors on NaN parameters, failed inverses
            diverged_at, error = step, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            break
        if not math.isfinite(loss):
            diverged_at, error = step, f"non-finite loss {loss}"
            break
        window.append(loss)
        if len(window) == cfg["log_every"]:
            losses.append(sum(window) / len(window))
            window = []
    result["train_seconds"] = time.perf_counter() - start
    result["train_cpu_seconds"] = time.process_time() - cpu_start  # robust to other load on the machine
    result["steps_done"] = cfg["steps"] if diverged_at is None else diverged_at - 1
    steps_run = max(1, result["steps_done"] + (diverged_at is not None))
    result["ms_per_step"] = 1e3 * result["train_seconds"] / steps_run
    result["cpu_ms_per_step"] = 1e3 * result["train_cpu_seconds"] / steps_run
    result["loss_trace"] = losses
    result["diverged_at"] = diverged_at
    result["error"] = error
    result["log_Z"] = log_z
    result["kl"] = result["kl_se"] = result["elbo"] = result["logdet_check"] = None
    if diverged_at is not None:
        return result

    start = time.perf_counter()
    try:
        with torch.no_grad():
            q = _posterior(guide)
            z = q.rsample((cfg["eval_samples"],))
            log_q = q.log_prob(z)
            log_w = (-energy(z.double()) - log_q.double()).flatten()
        elbo_value = float(log_w.mean())
        se = float(log_w.std() / math.sqrt(log_w.numel()))
        result.update(elbo=elbo_value, kl=log_z - elbo_value, kl_se=se)
        if not math.isfinite(elbo_value):
            result["error"] = "non-finite ELBO at evaluation"
        result["logdet_check"] = _logdet_check(guide)
    except (ValueError, RuntimeError) as exc:
        result["error"] = f"evaluation failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    result["eval_seconds"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------- reporting
def _cell(r: dict) -> str:
    if r["diverged_at"] is not None:
        return f"diverged at step {r['diverged_at']}"
    if r["kl"] is None or not math.isfinite(r["kl"]):
        return "error"
    return f"{r['kl']:.3f} ± {r['kl_se']:.3f}"


def markdown_table(results: list[dict], energies: list[str], guides: list[str]) -> str:
    """Rows: guides; columns: ``KL ± se`` per energy, then the training wall and CPU seconds summed over the
    energies, and the mean CPU milliseconds per step (CPU time is not inflated by other load on the machine)."""
    by_key = {(r["guide"], r["energy"]): r for r in results}
    columns = [f"{e} KL (nats)" for e in energies] + ["train wall (s)", "train CPU (s)", "CPU ms/step"]
    head = "| guide | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(energies) + 4)]
    for g in guides:
        rows = [by_key[(g, e)] for e in energies]
        wall = sum(r["train_seconds"] for r in rows)
        cpu = sum(r["train_cpu_seconds"] for r in rows)
        ms = sum(r["cpu_ms_per_step"] for r in rows) / len(rows)
        cells = " | ".join(_cell(r) for r in rows)
        lines.append(f"| {g} | {cells} | {wall:.0f} | {cpu:.0f} | {ms:.1f} |")
    return "\n".join(lines)


def assess_targets(results: list[dict], energies: list[str], threshold: float) -> dict:
    """Whether the best pyroflows guide reaches ``KL <= threshold`` on every energy, and whether the
    32-layer pyroflows planar flow trained without divergence."""
    per_guide: dict[str, list[dict]] = {}
    for r in results:
        if r["library"] == "pyroflows":
            per_guide.setdefault(r["guide"], []).append(r)

    def worst(rows):
        kls = [r["kl"] for r in rows if r["kl"] is not None and r["diverged_at"] is None]
        return max(kls) if len(kls) == len(energies) else math.inf

    best = min(per_guide, key=lambda g: worst(per_guide[g])) if per_guide else None
    planar32 = per_guide.get("pyroflows planar_flow(32)", [])
    return {
        "kl_threshold": threshold,
        "best_pyroflows_guide": best,
        "best_pyroflows_worst_kl": worst(per_guide[best]) if best else None,
        "kl_target_met": bool(best) and worst(per_guide[best]) <= threshold,
        "kl_target_met_within_2se": bool(best)
        and all(r["kl"] - 2 * r["kl_se"] <= threshold for r in per_guide[best] if r["kl"] is not None),
        "pyroflows_planar32_no_divergence": (
            bool(planar32) and all(r["diverged_at"] is None and r["kl"] is not None for r in planar32)
        )
        if planar32
        else None,
    }


# --------------------------------------------------------------------------------------------- main
def _git_state() -> dict:
    """The repository's commit and whether ``pyroflows/`` differs from it (the library under test)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd):
        try:
            out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    status = git("status", "--porcelain", "--", "pyroflows")
    return {"commit": git("rev-parse", "HEAD"), "pyroflows_modified": None if status is None else bool(status)}


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` changes the defaults of the others, explicit values win."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="SVI steps for every guide (default 4000; quick 150)")
    p.add_argument("--quick", action="store_true", help="smoke test: few steps, a subset of guides")
    p.add_argument(
        "--out", default=None, help="where to write the JSON (default results/vi_energies.json; quick: *_quick.json)"
    )
    p.add_argument("--particles", type=int, default=None, help="ELBO particles per step (default 256; quick 64)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate, the same for every guide")
    p.add_argument(
        "--lr-final",
        type=float,
        default=0.05,
        help="final lr as a fraction of --lr, reached by ClippedAdam's per-step decay lrd;\n"
        "1.0 with no --clip-norm means plain pyro.optim.Adam at a constant lr",
    )
    p.add_argument("--clip-norm", type=float, default=None, help="ClippedAdam's elementwise gradient clip (off)")
    p.add_argument("--eval-samples", type=int, default=20000, help="guide samples for the ELBO estimate")
    p.add_argument("--grid", type=int, default=None, help="quadrature grid size per axis (default 2000)")
    p.add_argument(
        "--guide",
        action="append",
        dest="guides",
        default=None,
        help="a guide to run (repeatable; names as --list prints them); default: all but\n"
        "realnvp(8), affine_coupling(8) + Permute and spline_coupling(4) + Permute",
    )
    p.add_argument("--energies", default="U1,U2,U3,U4", help="comma-separated subset of U1..U4")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: number of CPUs)")
    p.add_argument("--seed", type=int, default=0, help="pyro.set_rng_seed for every run")
    p.add_argument(
        "--loop",
        choices=("torch", "svi", "fit"),
        default="torch",
        help="torch: Trace_ELBO.differentiable_loss + one torch.optim.Adam (default, faster);\n"
        "svi: pyro.infer.SVI + pyro.optim.Adam/ClippedAdam (same objective and update);\n"
        "fit: pyroflows.infer.fit with its defaults (STL, stable_cosine, lr = infer.default_lr(particles): 9.4e-4 at "
        "256) at the same steps and particles",
    )
    p.add_argument(
        "--fit-options",
        default="",
        help="with --loop fit: infer.fit keywords as KEY=VALUE,... (e.g. anneal=0.5)",
    )
    p.add_argument("--validate", action="store_true", help="keep Pyro's and pyroflows' validation on (slower)")
    p.add_argument("--kl-target", type=float, default=0.05, help="the KL target for the pyroflows guides")
    p.add_argument("--list", action="store_true", help="list the guide names and exit")
    args = p.parse_args(argv)
    args.steps = args.steps or (150 if args.quick else 4000)
    args.particles = args.particles or (64 if args.quick else 256)
    args.grid = args.grid or (500 if args.quick else 2000)
    if args.out is None:  # a smoke test never overwrites a full run's results
        args.out = f"benchmarks/results/vi_energies{'_quick' if args.quick else ''}.json"
    if args.eval_samples < 10000:
        p.error("--eval-samples must be at least 10000")
    return args


def main(argv=None) -> int:
    """Run the benchmark, print the table and the command, write the JSON; exit status 0."""
    args = parse_args(argv)
    if args.list:
        print("\n".join(GUIDES))
        return 0
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    t0 = time.perf_counter()
    energies = [e.strip() for e in args.energies.split(",") if e.strip()]
    if args.guides:
        guides = list(dict.fromkeys(args.guides))
    else:
        guides = QUICK_GUIDES if args.quick else DEFAULT_GUIDES
    unknown = [g for g in guides if g not in GUIDES] + [e for e in energies if e not in ENERGIES]
    if unknown:
        raise SystemExit(f"unknown guide(s)/energy(ies): {unknown}; see --list")
    cfg = {
        "steps": args.steps,
        "particles": args.particles,
        "lr": args.lr,
        "lr_final": args.lr_final,
        "clip_norm": args.clip_norm,
        "eval_samples": args.eval_samples,
        "seed": args.seed,
        "validate": args.validate,
        "loop": args.loop,
        "fit_options": parse_options(args.fit_options),
        "log_every": max(1, args.steps // 50),
    }
    if args.loop == "fit":  # the peak rate fit uses: the option given, else its default for these particles
        from pyroflows.infer import default_lr

        cfg["fit_lr"] = float(cfg["fit_options"].get("lr", default_lr(args.particles)))
    torch.set_num_threads(1)
    git_state = _git_state()  # taken before the workers import pyroflows
    workers = args.workers or os.cpu_count() or 1
    print(f"# {len(guides)} guides × {len(energies)} energies, {args.steps} steps, {workers} workers", flush=True)

    log_z_info = {e: checked_log_normalizer(e, args.grid) for e in energies}
    for e, info in log_z_info.items():
        print(
            f"# log Z[{e}] = {info['log_Z']:.6f}  (wider box: {info['delta_wider_box']:+.1e}, "
            f"finer grid: {info['delta_finer_grid']:+.1e})",
            flush=True,
        )

    jobs = [(e, g) for g in guides for e in energies]
    jobs.sort(key=lambda j: -_cost(j[1]))
    results = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(fit_and_evaluate, e, g, cfg, log_z_info[e]["log_Z"]) for e, g in jobs]
        for fut in futures:
            r = fut.result()
            results.append(r)
            print(f"#   {r['guide']:<36} {r['energy']}: {_cell(r):<26} ({r['train_seconds']:.0f} s)", flush=True)

    table = markdown_table(results, energies, guides)
    targets = assess_targets(results, energies, args.kl_target)
    total = time.perf_counter() - t0
    optim = results[0]["optimizer"] if results else None
    schedule = "constant" if args.lr_final == 1.0 else f"decayed to {args.lr_final:g}× by the last step"
    print()
    if args.loop == "fit":
        print(
            f"pyroflows.infer.fit with its defaults (STL, stable_cosine; peak lr {cfg['fit_lr']:.3g})"
            f"{' but ' + args.fit_options if args.fit_options else ''}: {args.steps} steps, "
            f"{args.particles} vectorised particles, ELBO from {args.eval_samples} guide samples, seed {args.seed}"
        )
    else:
        print(
            f"{'SVI' if args.loop == 'svi' else 'Trace_ELBO.differentiable_loss loop'}: {args.steps} steps, "
            f"Trace_ELBO({args.particles} vectorised particles), {optim} lr={args.lr:g} ({schedule}), "
            f"ELBO from {args.eval_samples} guide samples, seed {args.seed}"
        )
    print()
    print(table)
    print()
    print(f"targets: {json.dumps(targets)}")
    print(f"total wall time: {total:.0f} s")
    print(f"command: {command}")

    out = {
        "command": command,
        "config": {**cfg, "optimizer": optim, "workers": workers, "energies": energies, "guides": guides},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyro": __import__("pyro").__version__,
            "pyroflows": __import__("pyroflows").__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "git": git_state,
        },
        "log_Z": log_z_info,
        "results": results,
        "targets": targets,
        "table_markdown": table,
        "total_seconds": total,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
