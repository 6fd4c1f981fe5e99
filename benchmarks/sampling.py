"""Sampling speed (samples/s) of every pyroflows builder against a peer timed in the same process, interleaved.

Vectors, D = 16, guide direction (``TransformedDistribution(N(0, I), flow).sample``, as ``AutoNormalizingFlow``
draws): ``planar_flow(16, 8)`` against 8 × Pyro ``planar``; ``realnvp(16, 4, hidden=(256, 256))`` against 4 × Pyro
``affine_coupling`` + ``Permute``; ``residual_flow(16, 4, hidden=(128, 128))`` against normflows ``Residual``
blocks run forward (``iresblock.forward``, the explicit map). Density direction, where sampling runs the inverse:
the same vector ``residual_flow`` in ``FlowDensity.sample`` (the **fixed-point inverse**) against normflows'
``NormalizingFlow.sample`` of ``Residual(reverse=True)`` blocks (its fixed-point inverse); images ``(3, 16, 16)``
(quick ``(3, 8, 8)``): ``FlowDensity.sample`` of ``glow``, ``realnvp`` and ``residual_flow`` (fixed-point inverse)
against normflows' ``MultiscaleFlow.sample`` (Glow; for realnvp an architecture reference) and its residual CNN flow.
Architectures are those of ``benchmarks/scaling.py``.

Both libraries are timed through their public sampling call. normflows' ``sample`` always returns ``log_q`` too,
so it computes every layer's log-det; Pyro's transforms compute and cache theirs. pyroflows layers compute theirs in
the same pass, except where the log-det costs far more than the map (``lazy_log_det``: residual blocks), which
without gradients defer it until ``log_prob`` asks; ``FlowDensity.sample`` computes none. The residual rows
"density + log q" are the like-for-like comparison with normflows there: pyroflows draws and computes each
sample's log-density (``inverse_and_log_det`` of base draws), against the same normflows ``sample``. The models are
untrained (ActNorm initialised on one data batch); normflows' residual nets start from random weights
(``init_zeros=False``) like pyroflows', so the fixed-point iterations have work to do.
Samples/s = n / median wall time of one call over the interleaved rounds; the speed ratio is the median over rounds
of ``peer time / pyroflows time`` (> 1: pyroflows faster).

Usage::

    python benchmarks/sampling.py            # n = 4096 vectors, 256 images of 16x16
    python benchmarks/sampling.py --quick    # n = 1024 vectors, 64 images of 8x8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common, scaling  # noqa: E402

DIM = 16
#: the density direction with the sample's log-density, as normflows' ``sample`` returns it (pyroflows:
#: ``inverse_and_log_det`` of base draws); normflows' side of such a row is its ordinary ``sample``.
LOG_Q = "density + log q"

# (row name, direction, pyroflows label, peer label, needs normflows, note); labels are scaling.py's builders.
VECTOR_ROWS = (
    ("planar_flow", "guide", "pyroflows planar_flow", "pyro planar", False, "Pyro planar caches its log-det"),
    ("realnvp", "guide", "pyroflows realnvp", "pyro affine_coupling + Permute", False, "Pyro coupling + Permute"),
    (
        "residual_flow",
        "guide",
        "pyroflows residual_flow",
        "normflows Residual",
        True,
        "explicit map x + g(x) in both, no log-det (pyroflows defers it: lazy_log_det)",
    ),
    (
        "residual_flow",
        "density",
        "pyroflows residual_flow",
        "normflows Residual",
        True,
        "fixed-point inverse in both; normflows' sample also returns log_q",
    ),
    (
        "residual_flow",
        LOG_Q,
        "pyroflows residual_flow",
        "normflows Residual",
        True,
        "like for like: pyroflows draws and computes log q too (inverse_and_log_det)",
    ),
)
IMAGE_ROWS = (
    ("glow", "density", "pyroflows glow (no prior)", "normflows Glow", True, "same layers; normflows adds log_q"),
    (
        "realnvp",
        "density",
        "pyroflows realnvp",
        "normflows Glow",
        True,
        "architecture reference (no normflows RealNVP)",
    ),
    (
        "residual_flow",
        "density",
        "pyroflows residual_flow",
        "normflows Residual CNN",
        True,
        "fixed-point inverse in both; normflows' sample also returns log_q",
    ),
    (
        "residual_flow",
        LOG_Q,
        "pyroflows residual_flow",
        "normflows Residual CNN",
        True,
        "like for like: pyroflows draws and computes log q too (inverse_and_log_det)",
    ),
)


def _eval(m: scaling.Model) -> scaling.Model:
    m.module.eval()
    return m


def _with_log_q(m: scaling.Model, n: int):
    """``FlowDensity`` draws with their log-density, as normflows' ``sample`` returns ``(x, log_q)``."""
    from pyroflows.transforms import inverse_and_log_det

    density = m.module

    def draw():
        base = density.base_dist()
        z = base.sample((n,))
        x, log_det = inverse_and_log_det(density.flow, z)
        return x, base.log_prob(z) - log_det

    return draw


def _vector_sampler(label: str, direction: str, n: int):
    """A no-grad callable drawing ``n`` samples from model ``label`` in ``direction``."""
    if label == "pyroflows residual_flow" and direction == LOG_Q:
        return _with_log_q(_eval(scaling.build_vector(label, DIM)), n)
    if label == "normflows Residual":
        model = _eval(scaling.build_vector(label, DIM, init_zeros=False)).module
        if direction == "density":
            return lambda: model.sample(n)
        # the explicit map (normflows' inverse pass with reverse=True), without a log-det
        return lambda: _nf_forward(model, n)
    if label == "pyroflows residual_flow" and direction == "density":
        m = _eval(scaling.build_vector(label, DIM))
        return lambda: m.sample(n)
    if label == "pyroflows residual_flow":  # guide direction: the flow's forward map on base noise
        import pyro.distributions as dist

        flow = scaling.build_vector(label, DIM).module.flow.eval()
        q = dist.TransformedDistribution(dist.Normal(torch.zeros(DIM), torch.ones(DIM)).to_event(1), flow)
        return lambda: q.sample((n,))
    m = _eval(scaling.build_vector(label, DIM))
    return lambda: m.sample(n)


def _nf_forward(model, n: int) -> torch.Tensor:
    z, _ = model.q0(n)
    for flow in model.flows:
        z = flow.iresblock.forward(z)
    return z


def _image_sampler(label: str, side: int, n: int, direction: str = "density"):
    m = _eval(scaling.build_image(label, side, init_zeros=False))
    if direction == LOG_Q and label.startswith("pyroflows"):
        return _with_log_q(m, n)
    return lambda: m.sample(n)


def _key(label: str, direction: str) -> str:
    """The sampler's name; a peer's ``LOG_Q`` row reuses its ordinary sampler (its ``sample`` returns log q)."""
    if direction == LOG_Q and not label.startswith("pyroflows"):
        direction = "density"
    return f"{label} [{direction}]"


def measure(n_vector: int, n_image: int, side: int, warmup: int, rounds: int, log=print) -> list[dict]:
    """Time every row's two samplers interleaved (per group: vectors, images); returns the rows."""
    normflows = _common.peers_available("sampling")
    out = []
    groups = (
        ("vector", VECTOR_ROWS, n_vector, lambda label, d: _vector_sampler(label, d, n_vector)),
        ("image", IMAGE_ROWS, n_image, lambda label, d: _image_sampler(label, side, n_image, d)),
    )
    for kind, rows, n, make in groups:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        samplers = {}
        for _, direction, pf, peer, needs_nf, _ in rows:
            if _key(pf, direction) not in samplers:
                samplers[_key(pf, direction)] = make(pf, direction)
            if (normflows or not needs_nf) and _key(peer, direction) not in samplers:
                samplers[_key(peer, direction)] = make(peer, direction)
        with torch.no_grad():
            timing = _common.time_interleaved(samplers, warmup, rounds)
        log(
            f"  {kind}: "
            + ", ".join(f"{k} {n / v['ms_median'] * 1e3:,.0f}/s" for k, v in timing.items())
            + f"  ({time.perf_counter() - t0:.1f} s)"
        )
        for family, direction, pf, peer, needs_nf, note in rows:
            has_peer = normflows or not needs_nf
            this = timing[_key(pf, direction)]
            other = timing.get(_key(peer, direction)) if has_peer else None
            out.append(
                {
                    "family": family + (f" (3x{side}x{side})" if kind == "image" else f" (D={DIM})"),
                    "direction": direction,
                    "n": n,
                    "pyroflows": pf,
                    "pyroflows_samples_per_s": 1e3 * n / this["ms_median"],
                    "peer": peer if has_peer else None,
                    "peer_samples_per_s": 1e3 * n / other["ms_median"] if other else None,
                    "speed_ratio": _common.paired_ratio(other, this) if other else None,
                    "note": note if has_peer else f"{peer} skipped: normflows is not installed (pip install normflows)",
                }
            )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks the sample counts, image size and repeats."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, 8x8 images, few repeats")
    p.add_argument("--out", default=str(_common.RESULTS), help="results folder (default benchmarks/results)")
    p.add_argument("--n-vector", type=int, default=None, help="vector samples per call (default 4096; quick 1024)")
    p.add_argument("--n-image", type=int, default=None, help="image samples per call (default 256; quick 64)")
    p.add_argument("--side", type=int, default=None, help="image side (default 16; quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per sampler (default 2; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15; quick 3)")
    args = p.parse_args(argv)
    q = args.quick
    for key, full, quick in (
        ("n_vector", 4096, 1024),
        ("n_image", 256, 64),
        ("side", 16, 8),
        ("warmup", 2, 1),
        ("rounds", 15, 3),
    ):
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    return args


def run(args: argparse.Namespace, command: str) -> dict:
    """Measure, print the rows, write ``sampling[_quick].json`` and regenerate ``RESULTS.md``."""
    import pyroflows

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    payload = {
        "benchmark": "sampling",
        "command": command,
        "quick": args.quick,
        "machine": _common.machine(),
        "config": {
            "dim": DIM,
            "n_vector": args.n_vector,
            "n_image": args.n_image,
            "side": args.side,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "pyroflows_validation": pyroflows.is_validation_enabled(),
        },
        "timing_method": "samples/s = n / median wall time (time.perf_counter) of one sampling call over interleaved "
        "rounds after warm-up, torch.no_grad, 1 thread; speed ratio = median over rounds of peer time / pyroflows "
        "time (> 1: pyroflows faster)",
    }
    payload["rows"] = measure(args.n_vector, args.n_image, args.side, args.warmup, args.rounds)
    payload["wall_s"] = time.perf_counter() - t0
    for r in payload["rows"]:
        ratio = "-" if r["speed_ratio"] is None else f"{r['speed_ratio']:.2f}"
        print(
            f"{r['family']} [{r['direction']}]: pyroflows {r['pyroflows_samples_per_s']:,.0f}/s, "
            f"{r['peer'] or 'no peer'}: speed ratio {ratio}"
        )
    path = _common.write_result(_common.result_path(args.out, "sampling", args.quick), payload)
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    return payload


def main(argv=None) -> int:
    """Run the sampling benchmark from the command line."""
    args = parse_args(argv)
    run(args, _common.command_line("benchmarks/sampling.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
