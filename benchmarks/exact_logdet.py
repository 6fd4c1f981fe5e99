"""Exact residual log-det: ``method="vjp"`` (D vector-Jacobian products on one graph) against ``"vmap"``
(torch.func's batched ``jacrev``), timed interleaved in one process on one device, forward and log-det of a
``ResidualBlock`` in eval mode, and with gradients (training with ``logdet="exact"``).

``exact_log_det(method="auto")`` takes ``vjp`` on CPU and ``vmap`` on accelerators; this measures that choice.
The figure is ``vjp_ms / vmap_ms`` per row (> 1: vmap is faster), and both methods' values are compared.

::

    python benchmarks/exact_logdet.py --device cuda --out benchmarks/results/exact_logdet_cuda.json
    python benchmarks/exact_logdet.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common  # noqa: E402
from pyroflows.logdet import exact_log_det  # noqa: E402
from pyroflows.nn import frozen_power_iteration  # noqa: E402
from pyroflows.transforms import ResidualBlock  # noqa: E402

SIZES = [(4,), (16,), (64,), (1, 4, 4), (2, 8, 8)]


def _row(shape, batch: int, device: str, warmup: int, rounds: int, grad: bool) -> dict:
    torch.manual_seed(0)
    vector = len(shape) == 1
    block = ResidualBlock(shape[0] if vector else (shape[0], None, None), hidden=(64,) if vector else 16, coeff=0.9)
    block = block.to(device).eval()
    x = torch.randn((batch,) + shape, device=device, requires_grad=grad)
    with torch.no_grad():
        block(x)  # the power iteration converged for this weight, then frozen below
    event_dim = len(shape)

    def step(method):
        def run():
            with frozen_power_iteration(), torch.set_grad_enabled(grad):
                value = exact_log_det(block.net, x, event_dim, method=method)
                if grad:
                    value.sum().backward()
            if device != "cpu":
                torch.cuda.synchronize()
            return value

        return run

    with frozen_power_iteration(), torch.no_grad():
        a = exact_log_det(block.net, x.detach(), event_dim, method="vjp")
        b = exact_log_det(block.net, x.detach(), event_dim, method="vmap")
    times = _common.time_interleaved({"vjp": step("vjp"), "vmap": step("vmap")}, warmup, rounds)
    return {
        "shape": list(shape),
        "batch": batch,
        "grad": grad,
        "vjp_ms": times["vjp"]["ms_median"],
        "vmap_ms": times["vmap"]["ms_median"],
        "vjp_over_vmap": statistics.median(
            p / q for p, q in zip(times["vjp"]["rounds_ms"], times["vmap"]["rounds_ms"])
        ),
        "max_abs_diff": float((a - b).abs().max()),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="few rounds: checks the script runs")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    warmup, rounds = (1, 3) if args.quick else (5, 30)
    rows = [_row(s, args.batch, args.device, warmup, rounds, grad) for grad in (False, True) for s in SIZES]
    payload = {
        "benchmark": "exact_logdet",
        "command": _common.command_line("benchmarks/exact_logdet.py", argv),
        "quick": args.quick,
        "machine": _common.machine(),
        "device": args.device,
        "commit": _common.git_commit(),
        "rows": rows,
    }
    if args.device != "cpu":
        payload["device_name"] = torch.cuda.get_device_name()
    for r in rows:
        print(
            f"{str(tuple(r['shape'])):>12} grad={r['grad']!s:5} vjp {r['vjp_ms']:8.2f} ms  vmap {r['vmap_ms']:8.2f} ms"
            f"  vjp/vmap {r['vjp_over_vmap']:5.2f}  |diff| {r['max_abs_diff']:.1e}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1))
    return payload


if __name__ == "__main__":
    main()
