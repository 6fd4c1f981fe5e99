"""What the sticking-the-landing gradient costs per SVI step, flow by flow, interleaved in one process.

:class:`pyroflows.elbo.TraceSTL_ELBO` (``fit``'s default estimator) evaluates ``log q`` of each draw a second time
with the guide's parameters held fixed, through the flow's inverse. For coupling layers that inverse costs what the
forward does; for an autoregressive layer it is an iterative solve (Jacobi passes), for a residual block a
fixed-point iteration, each with an implicit-function backward, for a planar layer a scalar Newton solve per draw.
Each row times three loops on one :class:`pyroflows.AutoFlow` guide: ``Trace_ELBO`` (reparameterised, no inverse),
``TraceSTL_ELBO``, and, for flows of planar or autoregressive layers or residual blocks, ``TraceSTL_ELBO`` with the
layers' warm start switched off (``warm_start_inverse = False``: inside a composition the solve then starts from its
default guess, where the warm start starts at the answer), the code before the warm start, as a baseline in the
same process.

All loops: ``pyro.infer.SVI`` + ``ClippedAdam(lr 3e-3)``, 8 vectorised particles, 10 steps per timed call, after a
fit of 300 steps so the flow is away from its identity initialisation (a fresh autoregressive layer's solve settles
at once). Ratios are medians over interleaved rounds of paired times.

Usage::

    python benchmarks/stl_cost.py            # 3 models x 6 builders
    python benchmarks/stl_cost.py --quick    # 1 model x 2 builders, fewer rounds
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402
from benchmarks.svi_step import _builder  # noqa: E402
from benchmarks.vi_guides import model_spec  # noqa: E402 (also puts examples/ on the path)

MODELS = ["eight_schools_centered", "horseshoe", "local_level"]
BUILDERS = [
    "planar_flow(16)",
    "realnvp(8)",
    "autoregressive_flow(4)",
    "autoregressive_flow(8)",
    "spline_flow(8)",
    "residual_flow(8)",
]
QUICK_MODELS, QUICK_BUILDERS = ["eight_schools_centered"], ["realnvp(8)", "autoregressive_flow(4)"]
STEPS, PARTICLES, LR, PRETRAIN = 10, 8, 3e-3, 300


def run_row(model_name: str, builder_name: str, warmup: int, rounds: int, pretrain: int) -> dict:
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    from pyroflows import AutoFlow
    from pyroflows.elbo import TraceSTL_ELBO
    from pyroflows.infer import _ensure_built, max_plate_nesting
    from pyroflows.transforms import AffineAutoregressive, Planar, ResidualBlock

    torch.set_num_threads(1)
    model, args, _ = model_spec(model_name)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(model, _builder(builder_name))
    _ensure_built(guide, *args)
    nesting = max_plate_nesting(model, guide, *args)
    optim = pyro.optim.ClippedAdam({"lr": LR})
    svis = {
        "reparam": SVI(model, guide, optim, Trace_ELBO(PARTICLES, vectorize_particles=True, max_plate_nesting=nesting)),
        "stl": SVI(model, guide, optim, TraceSTL_ELBO(PARTICLES, vectorize_particles=True, max_plate_nesting=nesting)),
    }
    for _ in range(pretrain):
        svis["stl"].step(*args)
    iterative = (AffineAutoregressive, Planar, ResidualBlock)
    warm_started = any(isinstance(m, iterative) for m in guide.modules())

    defaults = {cls: vars(cls)["warm_start_inverse"] for cls in iterative}  # a bool, or ResidualBlock's property

    def call(svi, warm=True):
        def run():
            if not warm:
                for cls in iterative:
                    cls.warm_start_inverse = False
                for m in guide.modules():  # no pair left from a warm call: the solves start as before the warm start
                    if isinstance(m, iterative):
                        m.clear_memo()
            try:
                for _ in range(STEPS):
                    svi.step(*args)
            finally:
                for cls, value in defaults.items():
                    cls.warm_start_inverse = value

        return run

    calls = {"reparam": call(svis["reparam"]), "stl": call(svis["stl"])}
    if warm_started:
        calls["stl_cold"] = call(svis["stl"], warm=False)
    timing = _common.time_interleaved(calls, warmup=warmup, rounds=rounds)
    row = {
        "model": model_name,
        "builder": builder_name,
        "reparam_ms_per_step": timing["reparam"]["ms_median"] / STEPS,
        "stl_ms_per_step": timing["stl"]["ms_median"] / STEPS,
        "stl_cost": _common.paired_ratio(timing["stl"], timing["reparam"]),
    }
    if warm_started:
        row["stl_cold_ms_per_step"] = timing["stl_cold"]["ms_median"] / STEPS
        row["warm_start_speedup"] = _common.paired_ratio(timing["stl_cold"], timing["stl"])
    return row


def markdown(rows: list[dict]) -> str:
    cols = ["model", "flow", "Trace_ELBO ms/step", "STL ms/step", "STL / Trace_ELBO", "STL cold-start ms/step",
            "warm-start speed-up"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cold = (
            f"{r['stl_cold_ms_per_step']:.2f} | {r['warm_start_speedup']:.2f}"
            if "stl_cold_ms_per_step" in r
            else "– | –"
        )
        lines.append(
            f"| {r['model']} | {r['builder']} | {r['reparam_ms_per_step']:.2f} | {r['stl_ms_per_step']:.2f} | "
            f"{r['stl_cost']:.2f} | {cold} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    return _common.row_timing_args(argv, __doc__, "stl_cost", "1 model x 2 builders, fewer rounds", 10, 3)


def main(argv=None) -> int:
    """Run the STL-cost benchmark from the command line."""
    args = parse_args(argv)
    models, builders = (QUICK_MODELS, QUICK_BUILDERS) if args.quick else (MODELS, BUILDERS)
    rounds = args.rounds or (3 if args.quick else 10)
    warmup, pretrain = (1, 20) if args.quick else (2, PRETRAIN)
    t0, rows = time.perf_counter(), []
    for m in models:
        for b in builders:
            row = run_row(m, b, warmup, rounds, pretrain)
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    config = {
        "steps_per_call": STEPS,
        "particles": PARTICLES,
        "lr": LR,
        "pretrain_steps": pretrain,
        "rounds": rounds,
        "warmup": warmup,
    }
    return _common.save_rows("stl_cost", args, argv, config, rows, t0, markdown)


if __name__ == "__main__":
    sys.exit(main())
