"""SVI step time of :class:`pyroflows.AutoFlow` against the same flow in Pyro's ``AutoNormalizingFlow``, interleaved in
one process, on the example models.

Both guides are built from the same seed with the same pyroflows builder, so they hold the same initial flow, and
every timed call is preceded by the same seed: the two guides then compute the same draws and make the same updates
(``tests/test_autoflow.py`` checks this to 1e-9 in float64), so they are at equal KL by construction. In float32
the two runs part after a few hundred steps (a global gradient norm summed over one tensor or over many rounds
differently, and SVI amplifies the difference), so the table reports the mean loss (-ELBO) of each guide over
all its timed steps: equal within the noise of the ELBO.

Loops:

* ``SVI``: ``pyro.infer.SVI`` with ``pyro.optim.ClippedAdam(lr 3e-3)`` and ``Trace_ELBO(8)`` with vectorised
  particles, the route Pyro's documentation shows; one timed call is 10 steps;
* ``fit``: :func:`pyroflows.infer.fit` with its defaults (sticking-the-landing gradient, one ``torch.optim.Adam``
  over all parameters); one timed call is a 20-step run, its setup included.

Usage::

    python benchmarks/svi_step.py            # 6 models x 5 builders (SVI), eight schools x 5 builders (fit)
    python benchmarks/svi_step.py --quick    # 2 models x 2 builders, fewer rounds
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402
from benchmarks.vi_guides import model_spec  # noqa: E402 (also puts examples/ on the path)

MODELS = ["eight_schools_centered", "funnel10", "banana", "horseshoe", "local_level", "bimodal"]
BUILDERS = ["planar_flow(16)", "realnvp(8)", "residual_flow(8)", "autoregressive_flow(4)", "spline_flow(8)"]
QUICK_MODELS, QUICK_BUILDERS = ["eight_schools_centered", "banana"], ["realnvp(8)", "autoregressive_flow(4)"]
SVI_STEPS, FIT_STEPS, PARTICLES, LR = 10, 20, 8, 3e-3


def _builder(name: str):
    import pyroflows

    fn, _, k = name.partition("(")
    return partial(getattr(pyroflows, fn), num_layers=int(k.rstrip(")")))


def _twin_guides(model, args, builder):
    """An ``AutoNormalizingFlow`` and an ``AutoFlow`` holding the same initial flow (built from the same seed)."""
    import pyro
    from pyro.infer.autoguide import AutoNormalizingFlow

    from pyroflows import AutoFlow
    from pyroflows.infer import _ensure_built

    guides = {}
    for label, cls in (("AutoNormalizingFlow", AutoNormalizingFlow), ("AutoFlow", AutoFlow)):
        pyro.set_rng_seed(0)
        guides[label] = cls(model, builder)
        _ensure_built(guides[label], *args)
    return guides


def _svi_calls(model, args, guides, losses):
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    from pyroflows.infer import max_plate_nesting

    nesting = max_plate_nesting(model, guides["AutoFlow"], *args)
    calls, counter = {}, {label: 0 for label in guides}
    for label, guide in guides.items():
        elbo = Trace_ELBO(PARTICLES, vectorize_particles=True, max_plate_nesting=nesting)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": LR}), elbo)

        def call(svi=svi, label=label):
            counter[label] += 1
            pyro.set_rng_seed(counter[label])  # the n-th call of either guide draws alike
            losses[label] += [svi.step(*args) for _ in range(SVI_STEPS)]

        calls[label] = call
    return calls, SVI_STEPS


def _fit_calls(model, args, guides, losses):
    from pyroflows.infer import fit

    calls, counter = {}, {label: 0 for label in guides}
    for label, guide in guides.items():

        def call(guide=guide, label=label):
            counter[label] += 1
            result = fit(model, guide, FIT_STEPS, model_args=args, progress=False, report=False, seed=counter[label])
            losses[label] += [float(v) for v in result.losses]

        calls[label] = call
    return calls, FIT_STEPS


def run_row(model_name: str, builder_name: str, loop: str, warmup: int, rounds: int) -> dict:
    import pyro

    torch.set_num_threads(1)
    model, args, _ = model_spec(model_name)
    pyro.clear_param_store()
    guides = _twin_guides(model, args, _builder(builder_name))
    losses = {label: [] for label in guides}
    calls, steps = (_svi_calls if loop == "SVI" else _fit_calls)(model, args, guides, losses)
    timing = _common.time_interleaved(calls, warmup=warmup, rounds=rounds)
    a, b = losses["AutoNormalizingFlow"], losses["AutoFlow"]
    return {
        "model": model_name,
        "builder": builder_name,
        "loop": loop,
        "steps_per_call": steps,
        "anf_ms_per_step": timing["AutoNormalizingFlow"]["ms_median"] / steps,
        "autoflow_ms_per_step": timing["AutoFlow"]["ms_median"] / steps,
        "speed_ratio": _common.paired_ratio(timing["AutoNormalizingFlow"], timing["AutoFlow"]),
        "max_loss_difference": max(abs(x - y) for x, y in zip(a, b)),
        "anf_mean_loss": statistics.mean(a),
        "autoflow_mean_loss": statistics.mean(b),
        "param_tensors": sum(1 for p in guides["AutoNormalizingFlow"].parameters() if p.requires_grad),
    }


def markdown(rows: list[dict]) -> str:
    cols = ["loop", "model", "flow", "parameter tensors", "AutoNormalizingFlow ms/step", "AutoFlow ms/step",
            "speed ratio", "mean loss AutoNormalizingFlow / AutoFlow"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            f"| {r['loop']} | {r['model']} | {r['builder']} | {r['param_tensors']} | {r['anf_ms_per_step']:.2f} | "
            f"{r['autoflow_ms_per_step']:.2f} | {r['speed_ratio']:.2f} | {r['anf_mean_loss']:.3f} / "
            f"{r['autoflow_mean_loss']:.3f} |"
        )
    ratios = [r["speed_ratio"] for r in rows]
    if ratios:
        lines.append("")
        lines.append(
            f"Speed ratio (AutoNormalizingFlow time / AutoFlow time, median over interleaved rounds): "
            f"min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, max {max(ratios):.2f}."
        )
    return "\n".join(lines)


def parse_args(argv=None):
    return _common.row_timing_args(argv, __doc__, "svi_step", "2 models x 2 builders, fewer rounds", 12, 4)


def main(argv=None) -> int:
    """Run the SVI-step benchmark from the command line."""
    args = parse_args(argv)
    models, builders = (QUICK_MODELS, QUICK_BUILDERS) if args.quick else (MODELS, BUILDERS)
    rounds = args.rounds or (4 if args.quick else 12)
    warmup = 1 if args.quick else 3
    jobs = [("SVI", m, b) for m in models for b in builders]
    jobs += [("fit", models[0], b) for b in builders]
    t0, rows = time.perf_counter(), []
    for loop, m, b in jobs:
        row = run_row(m, b, loop, warmup, rounds)
        rows.append(row)
        print(
            f"{loop:<4} {m:<24} {b:<24} ANF {row['anf_ms_per_step']:7.2f} ms  AutoFlow "
            f"{row['autoflow_ms_per_step']:7.2f} ms  ratio {row['speed_ratio']:.2f}  "
            f"loss {row['anf_mean_loss']:.3f} / {row['autoflow_mean_loss']:.3f}",
            flush=True,
        )
    config = {
        "svi_steps_per_call": SVI_STEPS,
        "fit_steps_per_call": FIT_STEPS,
        "particles": PARTICLES,
        "lr": LR,
        "rounds": rounds,
        "warmup": warmup,
    }
    return _common.save_rows("svi_step", args, argv, config, rows, t0, markdown)


if __name__ == "__main__":
    sys.exit(main())
