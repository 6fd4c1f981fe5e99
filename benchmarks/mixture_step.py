"""What a step of :class:`pyroflows.AutoFlowMixture` costs, against one flow, interleaved in one process.

A mixture of ``K`` flows runs every component's forward pass on its share of the draws, and every component's
inverse on every draw for the mixture's ``log q`` (twice with the sticking-the-landing gradient: once for the value,
once with the parameters held fixed). A component given weight zero by
:meth:`pyroflows.AutoFlowMixture.select_components` (logit ``-inf``) is neither drawn from nor evaluated, so a
guide of four components of which two are left should cost what a guide of two costs. Each row times, on one model
and one builder: one flow (:class:`pyroflows.AutoFlow`), mixtures of two and four components, and the four with two
of them given weight zero.

All loops: ``TraceSTL_ELBO`` (``fit``'s default estimator) with 8 vectorised particles, ``loss_and_grads`` then
``ClippedAdam(lr 3e-3)`` through ``pyro.infer.SVI``, 10 steps per timed call, one thread. Ratios are medians over
interleaved rounds of paired times.

Usage::

    python benchmarks/mixture_step.py            # 3 models x realnvp(8), spline_flow(8)
    python benchmarks/mixture_step.py --quick    # 1 model x realnvp(2), fewer rounds
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402
from benchmarks.svi_step import _builder  # noqa: E402
from benchmarks.vi_guides import model_spec  # noqa: E402 (also puts examples/ on the path)

MODELS = ["bimodal", "eight_schools_centered", "horseshoe"]
BUILDERS = ["realnvp(8)", "spline_flow(8)"]
QUICK_MODELS, QUICK_BUILDERS = ["bimodal"], ["realnvp(2)"]
STEPS, PARTICLES, LR = 10, 8, 3e-3
#: guide label -> (components, components left with nonzero weight); 0 components: one flow (AutoFlow)
GUIDES = {"one flow": (0, 0), "mix2": (2, 2), "mix4": (4, 4), "mix4, 2 kept": (4, 2)}


def _guide(model, args, builder, components: int, kept: int, name: str):
    import pyro

    from pyroflows import AutoFlow, AutoFlowMixture
    from pyroflows.infer import _ensure_built

    pyro.set_rng_seed(0)
    if components == 0:
        guide = AutoFlow(model, builder)
    else:
        guide = AutoFlowMixture(model, builder, components=components)
    guide._pyro_name = name  # its own param-store names: the guides are timed side by side in one store
    _ensure_built(guide, *args)
    if kept < components:  # as select_components leaves a guide: the others at weight zero
        with torch.no_grad():
            logits = guide.transform.logits
            logits.copy_(torch.tensor([0.0 if k < kept else -math.inf for k in range(components)]).to(logits))
    return guide


def run_row(model_name: str, builder_name: str, warmup: int, rounds: int) -> dict:
    import pyro
    from pyro.infer import SVI

    from pyroflows.elbo import TraceSTL_ELBO
    from pyroflows.infer import max_plate_nesting

    torch.set_num_threads(1)
    model, args, _ = model_spec(model_name)
    pyro.clear_param_store()
    builder = _builder(builder_name)
    calls = {}
    for i, (label, (components, kept)) in enumerate(GUIDES.items()):
        guide = _guide(model, args, builder, components, kept, f"guide{i}")
        nesting = max_plate_nesting(model, guide, *args)
        elbo = TraceSTL_ELBO(PARTICLES, vectorize_particles=True, max_plate_nesting=nesting)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": LR}), elbo)

        def call(svi=svi):
            for _ in range(STEPS):
                svi.step(*args)

        calls[label] = call
    timing = _common.time_interleaved(calls, warmup=warmup, rounds=rounds)
    row = {"model": model_name, "builder": builder_name}
    for label in GUIDES:
        row[f"{label} ms/step"] = timing[label]["ms_median"] / STEPS
        row[f"{label} / one flow"] = _common.paired_ratio(timing[label], timing["one flow"])
    row["2 kept / mix2"] = _common.paired_ratio(timing["mix4, 2 kept"], timing["mix2"])
    return row


def markdown(rows: list[dict]) -> str:
    cols = ["model", "flow"] + [f"{label} ms/step (ratio)" for label in GUIDES] + ["mix4 with 2 kept / mix2"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[f'{label} ms/step']:.2f} ({r[f'{label} / one flow']:.2f})" for label in GUIDES]
        lines.append(f"| {r['model']} | {r['builder']} | " + " | ".join(cells) + f" | {r['2 kept / mix2']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    return _common.row_timing_args(argv, __doc__, "mixture_step", "1 model x 1 builder, fewer rounds", 10, 3)


def main(argv=None) -> int:
    """Run the mixture-step benchmark from the command line."""
    args = parse_args(argv)
    models, builders = (QUICK_MODELS, QUICK_BUILDERS) if args.quick else (MODELS, BUILDERS)
    rounds = args.rounds or (3 if args.quick else 10)
    warmup = 1 if args.quick else 2
    t0, rows = time.perf_counter(), []
    for m in models:
        for b in builders:
            row = run_row(m, b, warmup, rounds)
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    config = {
        "steps_per_call": STEPS,
        "particles": PARTICLES,
        "lr": LR,
        "rounds": rounds,
        "warmup": warmup,
    }
    return _common.save_rows("mixture_step", args, argv, config, rows, t0, markdown)


if __name__ == "__main__":
    sys.exit(main())
