"""Cost as the work grows: ms per training step and peak memory of every pyroflows layer family, against a peer
measured in the same process, for vectors of size D and images of growing side; the scaling exponent is the slope
of log(ms) against log(size).

A training step is ``zero_grad`` + forward + log-det + loss + backward + an SGD update (``lr = 1e-6``: the weights
change, so weight-dependent caches such as power iterations are refreshed as in real training), batch 64,
``torch.set_num_threads(1)``. Families and their peers (same widths and depths on both sides):

* planar: ``pyroflows.planar_flow(D, 8)`` against 8 × ``pyro.distributions.transforms.planar(D)``;
* realnvp: ``pyroflows.realnvp(D, 4, hidden=(256, 256))`` against 4 × Pyro ``affine_coupling(D, hidden_dims=[256,
  256])`` with a fixed ``Permute`` in between (pyroflows adds an ActNorm before each coupling and a final affine);
* couplings: the same Pyro flow against the same architecture from pyroflows' layers (4 ``AffineCoupling(D,
  hidden=(256, 256))`` with the same ``Permute`` in between), the layers like for like;
* residual: ``pyroflows.residual_flow(D, 4, hidden=(128, 128), actnorm=False, logdet="unbiased")`` in
  ``FlowDensity`` against
  4 × ``normflows.flows.Residual(LipschitzMLP([D, 128, 128, D]))`` (``reduce_memory``, 2 exact terms + geometric
  roulette on both sides) whose step also calls ``normflows.utils.update_lipschitz(model, 1)`` (pyroflows runs one
  power iteration per layer per update by itself); and "residual (defaults)", the same with pyroflows' default
  ``logdet="auto"`` (the exact log-det where a block takes it in training: D <= 16 at batch 64);
* images ``(3, s, s)``, s = 8, 16, 32: ``glow(levels=2, num_layers=2, hidden=32, learned_prior=False)`` (like
  for like with normflows) and the default ``glow`` with its learned factor-out prior, ``realnvp(levels=2,
  num_layers=2, hidden=32)`` and ``residual_flow(num_layers=2, hidden=32, levels=1, actnorm=False)`` in
  ``FlowDensity`` (no logit layer, standard-normal data); peers: the normflows multi-scale Glow of the same
  levels/steps/width (``GlowBlock`` + ``Squeeze`` + ``Merge``), also shown beside realnvp as an architecture
  reference (normflows has no multi-scale RealNVP), and 2 × normflows ``Residual(LipschitzCNN([3, 32, 32, 3]))``.

Planar and coupling flows run in the guide direction (``TransformedDistribution(N(0, I), flow)``: ``rsample``, then
``log_prob`` of the sample, loss ``E[log q(z) + |z|²/2]``), as ``AutoNormalizingFlow`` uses them; the density
models run ``-log_prob(x).mean()`` on data. Every direction used is the explicit one of each library.

Timing: all models of one size are built in one process and stepped interleaved (one step each per round, order
rotating); the figure is the median wall time over the rounds after warm-up, and the speed ratio
``peer ms / pyroflows ms`` (> 1: pyroflows faster) is the median of the per-round ratios. Peak memory: see
``_common.MEMORY_METHOD`` (build + 2 steps in a forked child; tracemalloc does not see torch's allocations).

Usage::

    python benchmarks/scaling.py            # D up to 1024, images up to 32x32
    python benchmarks/scaling.py --quick    # D in {2, 16, 64}, images 8x8 and 16x16
    python benchmarks/scaling.py --families "residual,residual (defaults)" --name scaling_residual  # some families
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common  # noqa: E402

BATCH = 64
CHANNELS = 3
VECTOR_DIMS = (2, 16, 64, 256, 1024)
QUICK_VECTOR_DIMS = (2, 16, 64)
IMAGE_SIZES = (8, 16, 32)
QUICK_IMAGE_SIZES = (8, 16)
PLANAR_LAYERS, COUPLINGS, COUPLING_HIDDEN = 8, 4, 256
RES_BLOCKS, RES_HIDDEN, COEFF = 4, 128, 0.98
IMG_LEVELS, IMG_STEPS, IMG_HIDDEN, IMG_RES_BLOCKS = 2, 2, 32, 2

#: family -> (pyroflows label, peer label, peer note); peers needing normflows are dropped when it is missing.
VECTOR_FAMILIES = {
    "planar": ("pyroflows planar_flow", "pyro planar", "Pyro's own planar transform"),
    "realnvp": ("pyroflows realnvp", "pyro affine_coupling + Permute", "Pyro's own affine coupling"),
    "couplings": (
        "pyroflows AffineCoupling + Permute",
        "pyro affine_coupling + Permute",
        "the same architecture on both sides: 4 affine couplings (DenseNN, ReLU) and 3 fixed permutations, without "
        "realnvp's ActNorms and output affine map",
    ),
    "residual": ("pyroflows residual_flow", "normflows Residual", "normflows residual flow, same MLP"),
    "residual (defaults)": (
        "pyroflows residual_flow (default log-det)",
        "normflows Residual",
        "both libraries' default log-det: pyroflows' logdet='auto' is exact (closed-form Jacobian) where a block "
        "takes it in training (D <= 16 at this batch), the estimator above",
    ),
}
IMAGE_FAMILIES = {
    "glow": ("pyroflows glow (no prior)", "normflows Glow", "normflows multi-scale Glow, same levels/steps/width"),
    "glow + prior": ("pyroflows glow", "normflows Glow", "pyroflows' default adds a learned factor-out prior"),
    "realnvp image": ("pyroflows realnvp", "normflows Glow", "architecture reference: normflows has no RealNVP"),
    "residual image": ("pyroflows residual_flow", "normflows Residual CNN", "normflows residual flow, same CNN"),
}
NORMFLOWS_PEERS = ("normflows Residual", "normflows Glow", "normflows Residual CNN")


# --------------------------------------------------------------------------------------------- models
class Model:
    """A model under test: its module, a training ``step()`` on a fixed batch, and ``sample(n)``."""

    def __init__(self, module: torch.nn.Module, loss: Callable[[], torch.Tensor], sample: Callable[[int], object]):
        self.module = module
        self._loss = loss
        self.sample = sample
        self._opt = torch.optim.SGD(module.parameters(), lr=1e-6)

    def compile(self) -> Model:
        """The loss (forward and log-det) through ``torch.compile`` (inductor); the backward runs compiled too."""
        self._loss = torch.compile(self._loss)
        return self

    def step(self) -> None:
        """One training step: zero_grad, loss (forward + log-det), backward, SGD update."""
        self._opt.zero_grad(set_to_none=True)
        self._loss().backward()
        self._opt.step()


class _Params(torch.nn.Module):
    """Holds the parameterised parts of a list of Pyro transforms as one module, for the optimiser."""

    def __init__(self, parts):
        super().__init__()
        self.parts = torch.nn.ModuleList(p for p in parts if isinstance(p, torch.nn.Module))


def _guide_model(flow, parts_module: torch.nn.Module, dim: int) -> Model:
    import pyro.distributions as dist

    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    q = dist.TransformedDistribution(base, flow)
    q.log_prob(q.rsample((BATCH,)))  # data-dependent initialisations see a batch before the optimiser is made

    def loss() -> torch.Tensor:
        z = q.rsample((BATCH,))
        return (q.log_prob(z) + 0.5 * (z * z).sum(-1)).mean()

    def sample(n: int):
        return q.sample((n,))

    return Model(parts_module, loss, sample)


def _density_model(module, log_prob: Callable, sample: Callable, x: torch.Tensor) -> Model:
    log_prob(x)  # ActNorm's data-dependent init, in both libraries
    return Model(module, lambda: -log_prob(x).mean(), sample)


def _pyro_parts(kind: str, dim: int, layers: int, hidden: int = COUPLING_HIDDEN) -> list:
    import pyro.distributions.transforms as T

    from pyroflows.builders import _fixed_permutation

    parts = []
    for i in range(layers):
        if kind == "planar":
            parts.append(T.planar(dim))
        else:
            parts.append(T.affine_coupling(dim, hidden_dims=[hidden, hidden]))
            if i < layers - 1:
                parts.append(T.Permute(_fixed_permutation(dim, seed=i)))
    return parts


def _nf_residual(shape: tuple[int, ...], blocks: int, hidden: int, *, reverse: bool = True, init_zeros: bool = True):
    import normflows as nf

    flows = []
    for _ in range(blocks):
        if len(shape) == 1:
            d = shape[0]
            net = nf.nets.LipschitzMLP([d, hidden, hidden, d], lipschitz_const=COEFF, init_zeros=init_zeros)
        else:
            c = shape[0]
            net = nf.nets.LipschitzCNN([c, hidden, hidden, c], [3, 1, 3], lipschitz_const=COEFF, init_zeros=init_zeros)
        flows.append(
            nf.flows.Residual(net, reverse=reverse, reduce_memory=True, geom_p=0.5, n_exact_terms=2, n_samples=1)
        )
    return nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(shape), flows=flows)


def build_vector(label: str, dim: int, *, init_zeros: bool = True) -> Model:
    """The vector model ``label`` (a label of :data:`VECTOR_FAMILIES`) at event size ``dim``."""
    import pyroflows

    if label == "pyroflows planar_flow":
        flow = pyroflows.planar_flow(dim, num_layers=PLANAR_LAYERS)
        return _guide_model(flow, flow, dim)
    if label == "pyro planar":
        parts = _pyro_parts("planar", dim, PLANAR_LAYERS)
        return _guide_model(parts, _Params(parts), dim)
    if label == "pyroflows realnvp":
        flow = pyroflows.realnvp(dim, num_layers=COUPLINGS, hidden=(COUPLING_HIDDEN, COUPLING_HIDDEN))
        return _guide_model(flow, flow, dim)
    if label == "pyroflows AffineCoupling + Permute":
        from pyroflows.builders import _fixed_permutation
        from pyroflows.transforms import AffineCoupling, Compose, Permute

        parts = []
        for i in range(COUPLINGS):  # the permutations of _pyro_parts: the same seeds
            parts.append(AffineCoupling(dim, hidden=(COUPLING_HIDDEN, COUPLING_HIDDEN)))
            if i < COUPLINGS - 1:
                parts.append(Permute(_fixed_permutation(dim, seed=i)))
        flow = Compose(parts)
        return _guide_model(flow, flow, dim)
    if label == "pyro affine_coupling + Permute":
        parts = _pyro_parts("affine_coupling", dim, COUPLINGS)
        return _guide_model(parts, _Params(parts), dim)
    x = torch.randn(BATCH, dim, generator=torch.Generator().manual_seed(0))
    if label in ("pyroflows residual_flow", "pyroflows residual_flow (default log-det)"):
        # "residual": the estimator like normflows' ("auto" would take the exact log-det at D <= 16, another
        # computation); "residual (defaults)": each library as it comes
        logdet = "unbiased" if label == "pyroflows residual_flow" else "auto"
        flow = pyroflows.residual_flow(
            dim, num_layers=RES_BLOCKS, hidden=(RES_HIDDEN, RES_HIDDEN), actnorm=False, logdet=logdet
        )
        model = pyroflows.FlowDensity(flow, (dim,))
        return _density_model(model, model.log_prob, model.sample, x)
    if label == "normflows Residual":
        import normflows as nf

        model = _nf_residual((dim,), RES_BLOCKS, RES_HIDDEN, init_zeros=init_zeros)
        m = _density_model(model, model.log_prob, model.sample, x)
        loss = m._loss

        def loss_and_lipschitz() -> torch.Tensor:  # normflows needs the power iteration called by the user
            nf.utils.update_lipschitz(model, 1)
            return loss()

        m._loss = loss_and_lipschitz
        return m
    raise ValueError(f"unknown vector model {label!r}")


def build_image(label: str, side: int, *, init_zeros: bool = True, data: torch.Tensor | None = None) -> Model:
    """The image model ``label`` (a label of :data:`IMAGE_FAMILIES`, or ``"pyroflows realnvp"``) on
    ``(3, side, side)``; ``data`` is the batch it trains on (default: standard normal)."""
    import pyroflows

    shape = (CHANNELS, side, side)
    x = torch.randn((BATCH, *shape), generator=torch.Generator().manual_seed(0)) if data is None else data
    if label.startswith("pyroflows"):
        if label in ("pyroflows glow", "pyroflows glow (no prior)"):
            prior = label == "pyroflows glow"
            flow = pyroflows.glow(shape, IMG_LEVELS, IMG_STEPS, IMG_HIDDEN, logit_alpha=None, learned_prior=prior)
        elif label == "pyroflows realnvp":
            flow = pyroflows.realnvp(shape, IMG_STEPS, IMG_HIDDEN, levels=IMG_LEVELS, logit_alpha=None)
        elif label == "pyroflows residual_flow":
            flow = pyroflows.residual_flow(shape, IMG_RES_BLOCKS, IMG_HIDDEN, actnorm=False, levels=1, logit_alpha=None)
        else:
            raise ValueError(f"unknown image model {label!r}")
        model = pyroflows.FlowDensity(flow, shape)
        return _density_model(model, model.log_prob, model.sample, x)
    if label == "normflows Glow":
        model = _common.normflows_glow(shape, IMG_LEVELS, IMG_STEPS, IMG_HIDDEN)
        return _density_model(model, lambda v: model.log_prob(v, None), model.sample, x)
    if label == "normflows Residual CNN":
        import normflows as nf

        model = _nf_residual(shape, IMG_RES_BLOCKS, IMG_HIDDEN, init_zeros=init_zeros)
        m = _density_model(model, model.log_prob, model.sample, x)
        loss = m._loss

        def loss_and_lipschitz() -> torch.Tensor:
            nf.utils.update_lipschitz(model, 1)
            return loss()

        m._loss = loss_and_lipschitz
        return m
    raise ValueError(f"unknown image model {label!r}")


# --------------------------------------------------------------------------------------------- measuring
def _labels(families: dict, normflows: bool) -> list[str]:
    labels = []
    for pf, peer, _ in families.values():
        for label in (pf, peer):
            if label not in labels and (normflows or label not in NORMFLOWS_PEERS):
                labels.append(label)
    return labels


def measure(
    kind: str,
    sizes: tuple[int, ...],
    warmup: int,
    rounds: int,
    memory: bool = True,
    log=print,
    compiled: bool = False,
    only: tuple[str, ...] | None = None,
) -> dict:
    """Time (interleaved) and measure every model of ``kind`` (``"vector"`` or ``"image"``) at each size.

    :returns: ``{"sizes", "size_label", "families": {family: {"pyroflows", "peer", "peer_note", "rows",
        "exponent_pyroflows", "exponent_peer"}}}``; a row per size holds both libraries' ms and peak memory
        and ``speed_ratio`` = peer ms / pyroflows ms (median of per-round ratios). ``only``: the families to
        measure (default all of ``kind``).
    """
    families = VECTOR_FAMILIES if kind == "vector" else IMAGE_FAMILIES
    if only is not None:
        families = {k: v for k, v in families.items() if k in only}
        if not families:
            return {"size_label": "D" if kind == "vector" else "side (3 x s x s)", "sizes": [], "families": {}}
    build = build_vector if kind == "vector" else build_image
    normflows = _common.peers_available("scaling")
    labels = _labels(families, normflows)
    per_size, failed = {}, {}
    for size in sizes:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        models = {label: build(label, size) for label in labels if label not in failed}
        if compiled:  # both libraries; compiled here, so the warm-up below is steady-state
            for label in list(models):
                try:
                    models[label].compile().step()
                except Exception as e:  # noqa: BLE001 - e.g. double backward, which compiled autograd lacks
                    failed[label] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
                    del models[label]
        timing = _common.time_interleaved({k: m.step for k, m in models.items()}, warmup, rounds)
        del models
        peaks = {}
        if memory:
            for label in labels:
                peaks[label] = _common.peak_rss_mib(
                    lambda label=label, size=size: [build(label, size).step() for _ in range(2)]
                )
        per_size[size] = (timing, peaks)
        log(
            f"  {kind} size {size}: "
            + ", ".join(f"{k} {v['ms_median']:.2f} ms" for k, v in timing.items())
            + f"  ({time.perf_counter() - t0:.1f} s)"
        )
    out = {}
    for family, (pf, peer, note) in families.items():
        if pf in failed or peer in failed:
            bad = pf if pf in failed else peer
            out[family] = {"pyroflows": pf, "peer": peer, "peer_note": f"{bad} did not compile: {failed[bad]}",
                           "rows": [], "exponent_pyroflows": None, "exponent_peer": None}  # fmt: skip
            continue
        has_peer = normflows or peer not in NORMFLOWS_PEERS
        rows = []
        for size, (timing, peaks) in per_size.items():
            row = {
                "size": size,
                "work": size if kind == "vector" else CHANNELS * size * size,
                "pyroflows_ms": timing[pf]["ms_median"],
                "pyroflows_ms_iqr": [timing[pf]["ms_q1"], timing[pf]["ms_q3"]],
                "pyroflows_peak_mib": peaks.get(pf),
                "peer_ms": timing[peer]["ms_median"] if has_peer else None,
                "peer_peak_mib": peaks.get(peer) if has_peer else None,
                "speed_ratio": _common.paired_ratio(timing[peer], timing[pf]) if has_peer else None,
            }
            rows.append(row)
        work = [r["work"] for r in rows]
        out[family] = {
            "pyroflows": pf,
            "peer": peer if has_peer else None,
            "peer_note": note if has_peer else f"{peer} skipped: normflows is not installed (pip install normflows)",
            "rows": rows,
            "exponent_pyroflows": _common.fit_exponent(work, [r["pyroflows_ms"] for r in rows]),
            "exponent_peer": _common.fit_exponent(work, [r["peer_ms"] for r in rows]) if has_peer else None,
        }
    return {"size_label": "D" if kind == "vector" else "side (3 x s x s)", "sizes": list(sizes), "families": out}


def summary_lines(payload: dict) -> list[str]:
    """One line per family: exponents and the speed ratio at each size."""
    lines = []
    for kind in ("vector", "image"):
        for family, f in payload[kind]["families"].items():
            exp_pf, exp_peer = f["exponent_pyroflows"], f["exponent_peer"]
            ratios = ", ".join(
                f"{r['size']}: {r['speed_ratio']:.2f}" if r["speed_ratio"] is not None else f"{r['size']}: -"
                for r in f["rows"]
            )
            peer = f["peer"] or "no peer"
            lines.append(
                f"{kind} {family}: exponent pyroflows {_fmt(exp_pf)}, {peer} {_fmt(exp_peer)}; "
                f"speed ratio peer/pyroflows by size {ratios}"
            )
    return lines


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks the sizes and repeats."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="D in {2, 16, 64}, images 8x8 and 16x16, few repeats")
    p.add_argument("--out", default=str(_common.RESULTS), help="results folder (default benchmarks/results)")
    p.add_argument("--dims", default=None, help="comma-separated vector sizes (overrides the default)")
    p.add_argument("--sides", default=None, help="comma-separated image sides (overrides the default)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 5; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30; quick 5)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument(
        "--families",
        default=None,
        help="comma-separated families to measure (default all), e.g. 'residual,residual (defaults)'",
    )
    p.add_argument("--name", default=None, help="results file name (default scaling, or scaling_compiled)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="both libraries' losses through torch.compile (writes scaling_compiled.json; no memory children)",
    )
    args = p.parse_args(argv)
    args.families = tuple(f.strip() for f in args.families.split(",")) if args.families else None
    known = set(VECTOR_FAMILIES) | set(IMAGE_FAMILIES)
    if args.families and not set(args.families) <= known:
        p.error(f"unknown families {sorted(set(args.families) - known)}; known: {sorted(known)}")
    args.dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else None
    args.sides = tuple(int(s) for s in args.sides.split(",")) if args.sides else None
    args.dims = args.dims or (QUICK_VECTOR_DIMS if args.quick else VECTOR_DIMS)
    args.sides = args.sides or (QUICK_IMAGE_SIZES if args.quick else IMAGE_SIZES)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.rounds = args.rounds if args.rounds is not None else (5 if args.quick else 30)
    return args


def run(args: argparse.Namespace, command: str) -> dict:
    """Measure, print the summary, write ``scaling[_quick].json`` and regenerate ``RESULTS.md``."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    memory = not (args.no_memory or args.compile)  # the forked memory children would compile again
    payload = {
        "benchmark": "scaling",
        "command": command,
        "quick": args.quick,
        "machine": _common.machine(),
        "config": {
            "batch": BATCH,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "planar_layers": PLANAR_LAYERS,
            "couplings": COUPLINGS,
            "coupling_hidden": COUPLING_HIDDEN,
            "residual": {"blocks": RES_BLOCKS, "hidden": RES_HIDDEN, "coeff": COEFF},
            "image": {"levels": IMG_LEVELS, "steps": IMG_STEPS, "hidden": IMG_HIDDEN, "res_blocks": IMG_RES_BLOCKS},
        },
        "timing_method": "median wall ms (time.perf_counter) over interleaved rounds after warm-up; speed_ratio = "
        "median over rounds of peer ms / pyroflows ms (> 1: pyroflows faster)",
        "compiled": args.compile,
        "memory_method": _common.MEMORY_METHOD if memory else None,
        "exponent_method": "least-squares slope of log(ms) against log(work), work = D or 3 * s * s",
    }
    for kind, sizes in (("vector", args.dims), ("image", args.sides)):
        payload[kind] = measure(
            kind, sizes, args.warmup, args.rounds, memory=memory, compiled=args.compile, only=args.families
        )
    payload["wall_s"] = time.perf_counter() - t0
    for line in summary_lines(payload):
        print(line)
    name = args.name or ("scaling_compiled" if args.compile else "scaling")
    path = _common.write_result(_common.result_path(args.out, name, args.quick), payload)
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    return payload


def main(argv=None) -> int:
    """Run the scaling benchmark from the command line."""
    args = parse_args(argv)
    run(args, _common.command_line("benchmarks/scaling.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
