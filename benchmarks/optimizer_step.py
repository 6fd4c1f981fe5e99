"""What the optimiser's update costs, interleaved in one process: torch's default Adam on the CPU (a Python loop
over the tensors), its multi-tensor ``foreach`` update, and the update :func:`pyroflows.run.make_optimizer` picks
(torch's fused kernel), which both trainers (:func:`pyroflows.infer.fit`, :func:`pyroflows.train.fit`) use.

Two tables:

* ``update``: one ``optimizer.step()`` over the parameters of a pyroflows model (gradients set, lr tiny): the
  flows of the eight-schools guides (event size 10, the tensors an ``AutoNormalizingFlow`` registers; an
  :class:`~pyroflows.AutoFlow` steps them as one tensor, also a row) and the 28x28 image models of the command
  line's CPU defaults;
* ``fit``: ms per step of :func:`pyroflows.infer.fit` (its defaults: STL, 8 particles) on the eight-schools model,
  ``AutoNormalizingFlow`` and ``AutoFlow`` guides, with ``optimizer_kwargs={"foreach": True}`` (what ``fit`` used
  before) against its default, 20-step calls.

Ratios are medians over interleaved rounds of paired times (> 1: the fused update is faster).

Usage::

    python benchmarks/optimizer_step.py            # 4 guides + 3 image models; fit with 2 guides
    python benchmarks/optimizer_step.py --quick    # fewer models and rounds
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

GUIDES = ["realnvp(8)", "autoregressive_flow(8)", "spline_flow(8)", "residual_flow(8)"]
IMAGES = ["glow", "realnvp", "residual"]
FIT_GUIDES = ["realnvp(8)", "autoregressive_flow(8)"]
QUICK_GUIDES, QUICK_IMAGES, QUICK_FIT_GUIDES = ["realnvp(8)"], ["glow"], ["realnvp(8)"]
MODEL = "eight_schools_centered"
LATENT_DIM = 10  # mu, tau and the eight thetas
UPDATES_PER_CALL, FIT_STEPS = 20, 20
KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}}  # "fused": make_optimizer's choice


def _flow_parameters(name: str) -> list[torch.nn.Parameter]:
    """The parameters of the builder's flow on the model's latent size, the tensors an ``AutoNormalizingFlow``
    guide registers (an ``AutoFlow`` guide steps one tensor instead)."""
    torch.manual_seed(0)
    return list(_builder(name)(LATENT_DIM).parameters())


def _image_parameters(name: str) -> list[torch.nn.Parameter]:
    from pyroflows.train import build_density
    from pyroflows.train.models import default_options

    torch.manual_seed(0)
    shape = (1, 28, 28)
    return list(build_density(name, shape, **default_options(name, shape)).parameters())


def update_row(label: str, params: list[torch.nn.Parameter], warmup: int, rounds: int) -> dict:
    """Time ``optimizer.step()`` of the three Adam updates over ``params`` (gradients set once)."""
    from pyroflows.run import make_optimizer

    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    optimizers = {kind: torch.optim.Adam(params, lr=1e-12, **kw) for kind, kw in KINDS.items()}
    optimizers["fused"] = make_optimizer(torch.optim.Adam, params, lr=1e-12)

    def call(opt):
        def run():
            for _ in range(UPDATES_PER_CALL):
                opt.step()

        return run

    timing = _common.time_interleaved({k: call(o) for k, o in optimizers.items()}, warmup=warmup, rounds=rounds)
    row = {
        "model": label,
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        "fused_choice": optimizers["fused"].defaults["fused"] is True,
    }
    for kind in optimizers:
        row[f"{kind}_ms"] = timing[kind]["ms_median"] / UPDATES_PER_CALL
    row["loop_over_fused"] = _common.paired_ratio(timing["loop"], timing["fused"])
    row["foreach_over_fused"] = _common.paired_ratio(timing["foreach"], timing["fused"])
    return row


def fit_row(name: str, guide_class: str, warmup: int, rounds: int) -> dict:
    """ms per step of ``infer.fit`` with the multi-tensor update against its default, on one guide each."""
    import pyro
    from pyro.infer.autoguide import AutoNormalizingFlow

    from pyroflows import AutoFlow
    from pyroflows.infer import fit

    torch.set_num_threads(1)
    model, args, _ = model_spec(MODEL)
    cls = {"AutoFlow": AutoFlow, "AutoNormalizingFlow": AutoNormalizingFlow}[guide_class]
    guides, counter = {}, {"n": 0}
    for kind in ("foreach", "default"):  # two guides of one name: each in its own param-store scope
        pyro.set_rng_seed(0)
        guides[kind] = (cls(model, _builder(name)), {"params": {}, "constraints": {}})

    def call(kind):
        def run():
            counter["n"] += 1
            guide, state = guides[kind]
            options = {"optimizer_kwargs": {"foreach": True}} if kind == "foreach" else {}
            with pyro.get_param_store().scope(state):
                fit(model, guide, FIT_STEPS, model_args=args, progress=False, report=False, seed=counter["n"],
                    **options)  # fmt: skip

        return run

    timing = _common.time_interleaved({k: call(k) for k in guides}, warmup=warmup, rounds=rounds)
    return {
        "model": MODEL,
        "builder": name,
        "guide": guide_class,
        "foreach_ms_per_step": timing["foreach"]["ms_median"] / FIT_STEPS,
        "default_ms_per_step": timing["default"]["ms_median"] / FIT_STEPS,
        "speed_ratio": _common.paired_ratio(timing["foreach"], timing["default"]),
    }


def markdown(payload: dict) -> str:
    lines = [
        "| model | tensors | parameters | torch default (loop) ms | foreach ms | fused ms | loop / fused | "
        "foreach / fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["update"]:
        lines.append(
            f"| {r['model']} | {r['tensors']} | {r['parameters']:,} | {r['loop_ms']:.3f} | {r['foreach_ms']:.3f} | "
            f"{r['fused_ms']:.3f} | {r['loop_over_fused']:.2f} | {r['foreach_over_fused']:.2f} |"
        )
    if payload.get("fit"):
        lines += [
            "",
            "| model | guide | flow | fit ms/step, foreach | fit ms/step, default (fused) | speed ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in payload["fit"]:
            lines.append(
                f"| {r['model']} | {r['guide']} | {r['builder']} | {r['foreach_ms_per_step']:.2f} | "
                f"{r['default_ms_per_step']:.2f} | {r['speed_ratio']:.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    return _common.row_timing_args(argv, __doc__, "optimizer_step", "one guide, one image model, fewer rounds", 10, 3)


def main(argv=None) -> int:
    """Run the optimiser-update benchmark from the command line."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    guides, images, fit_guides = (QUICK_GUIDES, QUICK_IMAGES, QUICK_FIT_GUIDES) if args.quick else (
        GUIDES, IMAGES, FIT_GUIDES)  # fmt: skip
    rounds = args.rounds or (3 if args.quick else 10)
    warmup = 1 if args.quick else 2
    t0 = time.perf_counter()
    payload = {"update": [], "fit": []}
    for name in guides:
        payload["update"].append(update_row(f"{name}, D={LATENT_DIM}", _flow_parameters(name), warmup, rounds))
    flat = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in _flow_parameters(guides[-1])]))]
    payload["update"].append(
        update_row(f"{guides[-1]}, D={LATENT_DIM}, as AutoFlow's one tensor", flat, warmup, rounds)
    )
    for name in images:
        payload["update"].append(update_row(f"{name}, 1x28x28", _image_parameters(name), warmup, rounds))
    for name in fit_guides:
        for guide_class in ("AutoNormalizingFlow", "AutoFlow"):
            payload["fit"].append(fit_row(name, guide_class, warmup, rounds))
    print(markdown(payload), flush=True)
    out = Path(args.out) if args.out else _common.result_path(_common.RESULTS, "optimizer_step", args.quick)
    payload = {
        "benchmark": "optimizer_step",
        "command": _common.command_line("benchmarks/optimizer_step.py", argv),
        "machine": _common.machine(),
        "quick": args.quick,
        "config": {
            "updates_per_call": UPDATES_PER_CALL,
            "fit_steps_per_call": FIT_STEPS,
            "rounds": rounds,
            "warmup": warmup,
            "threads": 1,
        },
        **payload,
        "total_seconds": time.perf_counter() - t0,
    }
    _common.write_result(out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
