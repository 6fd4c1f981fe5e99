"""The ``pyroflows`` command: train a density model on images, sample from a checkpoint, evaluate bits/dim.

::

    pyroflows fit --data digits --flow glow --levels 2 --num-layers 4 --hidden 64 --epochs 20 --out runs/glow
    pyroflows fit ... --out runs/glow --resume          # continue a killed run
    pyroflows sample runs/glow/checkpoint.pt --n 64 --temperature 0.7 --out grid.png
    pyroflows eval runs/glow --data digits              # a run directory stands for its checkpoint.pt

Under ``torchrun --nproc_per_node N -m pyroflows.cli fit ...`` (or ``torchrun ... $(which pyroflows) fit ...``)
training runs data-parallel on N processes.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__

_FLOWS = ("glow", "realnvp", "residual", "cif-realnvp", "cif-residual")
# flags renamed in 0.2: old flag -> new flag (the old ones still work until 0.3, with a warning)
_RENAMED_FLAGS = {"--steps": "--num-layers", "--max-steps": "--num-steps"}


_ARCH_HELP = """\
default architecture (levels / num-layers / hidden), by image size and device:

  flow          8x8 CPU     28x28 CPU   8x8 GPU      28x28 / 32x32 GPU
  glow          2 / 4 / 64  2 / 8 / 64  2 / 8 / 128  2 / 16 / 256, 3 / 16 / 256
  realnvp       2 / 3 / 32  2 / 4 / 32  2 / 4 / 64   3 / 8 / 64
  residual      2 / 2 / 32  2 / 2 / 32  2 / 4 / 64   3 / 4 / 128
  cif-realnvp   1 / 4 / 32  1 / 4 / 32  1 / 6 / 64   1 / 8 / 64
  cif-residual  2 / 2 / 32  2 / 2 / 32  2 / 4 / 64   3 / 4 / 128

"8x8" is any image whose longer side is at most 16 pixels; levels are capped by what the size allows.
"""


_CHECKPOINT_HELP = "a checkpoint file, or the run directory (fit's --out) holding checkpoint.pt"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyroflows", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"pyroflows {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser(
        "fit",
        help="train a flow on an image data set by maximum likelihood",
        epilog=_ARCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("--data", default="digits", help="digits (embedded), mnist or cifar10 (default: digits)")
    fit.add_argument("--root", help="directory holding the MNIST / CIFAR-10 files")
    fit.add_argument("--n-bits", type=int, help="keep only the most significant bits of each pixel (e.g. 5)")
    fit.add_argument(
        "--flow",
        default="glow",
        help="glow, realnvp, residual, or a continuously indexed flow: cif-realnvp, cif-residual (default: glow)",
    )
    fit.add_argument("--levels", type=int, help="number of scales (default: by image size and device, below)")
    fit.add_argument(
        "--num-layers", type=int, help="flow depth per level: glow steps, realnvp coupling layers, residual blocks"
    )
    fit.add_argument("--hidden", type=int, help="hidden channels of the conditioner / residual networks")
    length = fit.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="training length in epochs (default 10)")
    length.add_argument("--num-steps", type=int, help="training length in optimiser steps")
    length.add_argument(
        "--time-limit",
        type=float,
        help="minutes: train until then (towards 1000 epochs), then "
        "evaluate, sample and checkpoint; --resume continues",
    )
    fit.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--optimizer", default="adam", choices=("adam", "adamax"))
    fit.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps (default 100)")
    fit.add_argument("--clip-norm", type=float, default=50.0)
    fit.add_argument("--ema", type=float, help="EMA decay of the weights used for evaluation, e.g. 0.999")
    fit.add_argument(
        "--eval-every",
        type=_int_or_auto,
        default="auto",
        help="steps between test evaluations, or auto (default): after at least an epoch, once training since the "
        "last evaluation took 9x as long as it did, so evaluation stays under a tenth of the run",
    )
    fit.add_argument(
        "--eval-batch-size", type=int, default=250, help="images per evaluation batch: bounds its memory (default 250)"
    )
    fit.add_argument(
        "--sample-every", type=int, help="steps between sample grids samples_step<N>.png (default: at each evaluation)"
    )
    fit.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: once per epoch)")
    fit.add_argument(
        "--check-invertibility",
        action="store_true",
        help="at each evaluation, measure reconstruction error and bi-Lipschitz constants on 64 test images "
        "(metrics.jsonl; a warning if the flow is numerically non-invertible)",
    )
    fit.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional model p(x | class) from the data set's labels (one-hot context; glow or realnvp "
        "vectors); sample grids get one row per class",
    )
    fit.add_argument(
        "--hybrid",
        action="store_true",
        help="hybrid model: the flow and a classifier on its latent, trained on lam*log p(x) + log p(y|x) from the "
        "data set's labels; evaluations report test accuracy too",
    )
    fit.add_argument(
        "--lam",
        default="1/D",
        help="with --hybrid: the weight of log p(x), a number >= 0 or 1/D (D = pixels x channels; default 1/D)",
    )
    fit.add_argument(
        "--head", default="linear", choices=("linear", "pooled", "mlp"), help="with --hybrid: the classifier head"
    )
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    fit.add_argument("--amp", action="store_true", help="bfloat16 conditioner networks (log-dets stay float32)")
    fit.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", required=True, help="output directory: checkpoint.pt, metrics.jsonl, samples.png")
    fit.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    fit.add_argument(
        "--no-progress", action="store_true", help="no progress bar (a line per evaluation is printed still)"
    )

    sample = sub.add_parser("sample", help="write a grid of samples from a checkpoint as PNG")
    sample.add_argument("checkpoint", help=_CHECKPOINT_HELP)
    sample.add_argument("--n", type=int, default=64, help="samples (per class, for a class-conditional model)")
    sample.add_argument("--temperature", type=float, default=0.7)
    sample.add_argument("--out", default="samples.png")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--ema", action="store_true", help="use the EMA weights")
    sample.add_argument("--device", default="cpu")

    ev = sub.add_parser("eval", help="print the test bits/dim of a checkpoint")
    ev.add_argument("checkpoint", help=_CHECKPOINT_HELP)
    ev.add_argument("--data", default="digits")
    ev.add_argument("--root")
    ev.add_argument("--n-bits", type=int)
    ev.add_argument("--split", default="test", choices=("train", "test", "all"))
    ev.add_argument("--ema", action="store_true", help="use the EMA weights")
    ev.add_argument("--device", default="cpu")
    ev.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per evaluation batch (default 500; with --repeats and a residual flow, up to 100 so that "
        "there are 10 batches, the independent units of its error bar)",
    )
    ev.add_argument(
        "--seed",
        type=int,
        help="dequantisation noise seed (default: the training run's seed, so the figure repeats the one fit printed)",
    )
    ev.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="independent evaluations of every image (default 1: the figure fit printed); with 2 or more the "
        "figure is their mean, printed with its standard error (the error bar of the dequantisation noise and of "
        "a residual flow's stochastic log-det)",
    )

    def latent_command(name: str, help_text: str):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("checkpoint", help=_CHECKPOINT_HELP)
        cmd.add_argument("--data", default="digits", help="digits, mnist or cifar10 (default: digits)")
        cmd.add_argument("--root", help="directory of MNIST/CIFAR-10 files")
        cmd.add_argument("--split", default="test", choices=("train", "test"))
        cmd.add_argument("--out", default=f"{name}.png")
        cmd.add_argument("--seed", type=int, default=0, help="which examples, and the dequantisation noise")
        cmd.add_argument("--ema", action="store_true", help="use the EMA weights")
        cmd.add_argument("--device", default="cpu")
        return cmd

    interp = latent_command("interpolate", "a grid of latent-space interpolations between pairs of images")
    interp.add_argument("--pairs", type=int, default=8, help="pairs of images, one row each")
    interp.add_argument("--num", type=int, default=8, help="images per row, ends included")
    interp.add_argument("--path", default="linear", choices=("linear", "slerp"))
    manip = latent_command("manipulate", "move images along an attribute's direction in latent space (one row each)")
    manip.add_argument(
        "--attribute",
        default="thickness",
        help="thickness (pixel mass above the median) or class:A,B (images of class B against class A; labelled data)",
    )
    manip.add_argument("--n", type=int, default=8, help="images to manipulate, one row each")
    manip.add_argument("--alphas", default="-1,-0.5,0,0.5,1", help="comma-separated multiples of the direction")
    return parser


def _classes(train, test, flag: str = "--conditional") -> int:
    """The number of classes of a labelled data set (a clear error for an unlabelled one)."""
    if train.labels is None or test.labels is None:
        raise ValueError(f"{flag} needs a labelled data set (digits, MNIST and CIFAR-10 come with labels)")
    return int(max(train.labels.max(), test.labels.max())) + 1


def _one_hot(data, classes: int):
    import torch

    return torch.nn.functional.one_hot(data.labels, classes).float()


def _shape(data):
    return data[0].shape if isinstance(data, tuple) else data.shape


def _dataset(name, root, split, n_bits):
    from .data import get_dataset

    data = get_dataset(name, split, root)
    return data.reduce_bits(n_bits) if n_bits is not None else data  # --n-bits 0 is an error, not "all bits"


def _lam(text: str, dim: int) -> float:
    """``--lam``: a number >= 0, or ``1/D`` for one over the data's dimension."""
    from .hybrid import check_lam

    if text.replace(" ", "").upper() == "1/D":
        return 1.0 / dim
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--lam must be a number >= 0 or 1/D, got {text!r}") from None
    return check_lam(value, "--lam")


def _int_or_auto(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or auto, got {text!r}") from None


def _check_fit_args(args) -> str:
    """The flow's name, after checking the sizes and lengths a user can get wrong (one line each, exit 2)."""
    flow = args.flow.lower()
    if flow not in _FLOWS:
        raise ValueError(f"unknown flow {args.flow!r}; choose one of {', '.join(_FLOWS)}")
    every = None if args.eval_every == "auto" else args.eval_every
    sizes = ("levels", "num_layers", "hidden", "num_steps", "batch_size", "eval_batch_size", "sample_every")
    if every is not None and every < 1:
        raise ValueError(f"--eval-every must be >= 1 or auto, got {every}")
    for name in (*sizes, "checkpoint_every", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {value}")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ValueError(f"--time-limit must be > 0 minutes, got {args.time_limit}")
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    if args.hybrid and args.conditional:
        raise ValueError("--hybrid and --conditional are two different models: choose one")
    if args.hybrid and flow.startswith("cif"):
        raise ValueError(f"--hybrid needs a bijective flow (glow, realnvp or residual), not {flow}")
    if not args.hybrid and (args.lam != "1/D" or args.head != "linear"):
        raise ValueError("--lam and --head apply to --hybrid models only")
    return flow


def _fit(args) -> int:
    import torch

    from .train import FitConfig, build_density, default_options, fit

    flow = _check_fit_args(args)
    per_epoch = None  # known once the data are loaded

    def pick(value, default):
        return value if value is not None else default

    def settings() -> dict:
        return dict(
            num_steps=args.num_steps,
            epochs=None if args.num_steps is not None else (1000.0 if args.time_limit else pick(args.epochs, 10.0)),
            time_limit=60 * args.time_limit if args.time_limit else None,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            warmup_steps=args.warmup,
            clip_norm=args.clip_norm,
            ema=args.ema,
            eval_every=args.eval_every,
            eval_batch_size=args.eval_batch_size,
            sample_every=args.sample_every,
            checkpoint_every=pick(args.checkpoint_every, per_epoch),
            out=args.out,
            resume=args.resume,
            device=args.device,
            amp=args.amp,
            compile=args.compile,
            seed=args.seed,
            progress=False if args.no_progress else None,
            check_invertibility=args.check_invertibility,
        )

    FitConfig(**settings())  # every setting checked (one line, exit 2) before any data or model is touched
    train = _dataset(args.data, args.root, "train", args.n_bits)
    test = _dataset(args.data, args.root, "test", args.n_bits)
    per_epoch = max(1, len(train) // args.batch_size)
    defaults = default_options(flow, _shape(train), args.device)
    options = {name: pick(getattr(args, name), default) for name, default in defaults.items()}
    if args.conditional:
        if flow != "glow":
            raise ValueError(f"--conditional supports --flow glow for images, not {flow}")
        classes = _classes(train, test)
        options["context_dim"] = classes
        train, test = (train, _one_hot(train, classes)), (test, _one_hot(test, classes))
    hybrid = None
    if args.hybrid:
        shape = _shape(train)
        lam = _lam(args.lam, shape[0] * shape[1] * shape[2])
        hybrid = {"num_classes": _classes(train, test, "--hybrid"), "lam": lam, "head": args.head}
    torch.manual_seed(args.seed)  # --seed fixes the initial weights too
    model = build_density(flow, _shape(train), hybrid=hybrid, **options)
    given = [name for name in defaults if getattr(args, name) is not None]
    chosen = ", ".join(f"{name} {value}" for name, value in options.items())
    source = "as given" if len(given) == len(defaults) else f"defaults for {'x'.join(map(str, _shape(train)))}"
    size = sum(p.numel() for p in model.parameters())
    images = (train[0] if args.conditional else train, test[0] if args.conditional else test)
    print(
        f"fit: {flow} ({chosen}; {source}), {size:,} parameters, {len(images[0])} training / {len(images[1])} test "
        "images"
        + (f", conditional on {options['context_dim']} classes" if args.conditional else "")
        + (f", hybrid: {hybrid['num_classes']} classes, lam {hybrid['lam']:.6g}, {args.head} head" if hybrid else ""),
        file=sys.stderr,
        flush=True,
    )
    result = fit(model, train, test, **settings())
    if result.out is not None:
        last = result.evals[-1] if result.evals else {}
        accuracy = f", test accuracy {last['test_accuracy']:.4f}" if "test_accuracy" in last else ""
        print(
            f"step {result.step}: test bits/dim {last.get('test_bpd', float('nan')):.4f}{accuracy}; "
            f"checkpoint {result.checkpoint}"
        )
    return 0


def _sample(args) -> int:
    import torch

    from .plots import check_png_path, save_image_grid
    from .run import check_device, check_int, check_number, check_seed
    from .train import load_density

    check_int("sample", "--n", args.n, 1)
    check_number("sample", "--temperature", args.temperature, 0, low_open=False)
    check_seed("sample", args.seed)
    device = check_device("sample", args.device)
    check_png_path(args.out, "--out")  # before the model is loaded
    model = load_density(args.checkpoint, ema=args.ema, map_location=device)
    if len(model.event_shape) != 3:
        raise ValueError(f"the model is not an image model (event shape {tuple(model.event_shape)})")
    torch.manual_seed(args.seed)
    if model.context_shape is not None:  # class-conditional: one row of n samples per class
        classes = model.context_shape[0]
        x = model.sample(args.n, temperature=args.temperature, context=torch.eye(classes, device=device))
        save_image_grid(x, args.out)
        print(f"wrote {args.n} samples per class ({classes} classes) at temperature {args.temperature} to {args.out}")
        return 0
    x = model.sample(args.n, temperature=args.temperature)
    save_image_grid(x, args.out)
    print(f"wrote {args.n} samples at temperature {args.temperature} to {args.out}")
    return 0


def _eval(args) -> int:
    from .hybrid import HybridDensity
    from .run import check_device, check_int, check_seed
    from .train import evaluate, evaluate_hybrid, evaluate_with_error, load_checkpoint, load_density
    from .train.evaluation import DEFAULT_BATCH

    if args.batch_size is not None:  # (absent: chosen by the model)
        check_int("eval", "--batch-size", args.batch_size, 1)
    check_int("eval", "--repeats", args.repeats, 1)
    check_seed("eval", args.seed, optional=True)
    device = check_device("eval", args.device)
    ckpt = load_checkpoint(args.checkpoint)
    n_bins = ckpt.get("n_bins")
    config = ckpt.get("config")
    seed = args.seed if args.seed is not None else int(config.get("seed", 0) if isinstance(config, dict) else 0)
    model = load_density(args.checkpoint, ema=args.ema, map_location=device)
    data = _dataset(args.data, args.root, args.split, args.n_bits)
    if n_bins is not None and data.n_bins != n_bins:
        raise ValueError(f"the checkpoint was trained on {n_bins}-level pixels but {args.data!r} has {data.n_bins}")
    if isinstance(model, HybridDensity):
        figures = evaluate_hybrid(model, data, batch_size=args.batch_size or DEFAULT_BATCH, seed=seed, device=device)
        print(
            f"{args.data} {args.split}: {figures['bpd']:.6f} bits/dim, accuracy {figures['accuracy']:.4f}, "
            f"class NLL {figures['class_nll']:.4f} nats ({len(data)} images)"
        )
        return 0
    if args.repeats == 1:
        bpd = evaluate(model, data, batch_size=args.batch_size or DEFAULT_BATCH, seed=seed, device=device)
        print(f"{args.data} {args.split}: {bpd:.6f} bits/dim ({len(data)} images)")
        return 0
    bpd, se = evaluate_with_error(
        model, data, batch_size=args.batch_size, seed=seed, device=device, repeats=args.repeats
    )
    print(f"{args.data} {args.split}: {bpd:.6f} ± {se:.6f} bits/dim ({len(data)} images, {args.repeats} evaluations)")
    return 0


def _latent_setup(args):
    """The model (eval mode) and the data set of an ``interpolate``/``manipulate`` command, checked."""
    from .plots import check_png_path
    from .run import check_device, check_seed
    from .train import load_checkpoint, load_density

    check_seed(args.command, args.seed)
    device = check_device(args.command, args.device)
    check_png_path(args.out, "--out")
    ckpt = load_checkpoint(args.checkpoint)
    model = load_density(args.checkpoint, ema=args.ema, map_location=device)
    if len(model.event_shape) != 3 or model.context_shape is not None:
        raise ValueError("the checkpoint is not an unconditional image model")
    data = _dataset(args.data, args.root, args.split, None)
    n_bins = ckpt.get("n_bins")
    if n_bins is not None and data.n_bins != n_bins:  # a run trained with --n-bits: reduce the pixels the same way
        bits = int(n_bins).bit_length() - 1
        if 2**bits != n_bins or n_bins > data.n_bins:
            raise ValueError(f"the checkpoint was trained on {n_bins}-level pixels but {args.data!r} has {data.n_bins}")
        data = data.reduce_bits(bits)
    if tuple(data.shape) != tuple(model.event_shape):
        raise ValueError(f"the model takes images of shape {model.event_shape}, {args.data!r} has {data.shape}")
    return model, data, device


def _interpolate(args) -> int:
    import torch

    from .plots import save_image_grid
    from .run import check_int

    check_int("interpolate", "--pairs", args.pairs, 1)
    check_int("interpolate", "--num", args.num, 2)
    model, data, device = _latent_setup(args)
    g = torch.Generator().manual_seed(args.seed)
    if len(data) < 2:
        raise ValueError("the data set has fewer than two images")
    rows = []
    for _ in range(args.pairs):
        i, j = torch.randperm(len(data), generator=g)[:2].tolist()
        x0, x1 = (data.images[k].to(device) for k in (i, j))
        gen = torch.Generator(device=device).manual_seed(args.seed)
        rows.append(model.interpolate(x0, x1, args.num, args.path, n_bins=data.n_bins, generator=gen))
    save_image_grid(torch.cat(rows), args.out, nrow=args.num)
    print(f"wrote {args.pairs} interpolations ({args.path}, {args.num} images each) to {args.out}")
    return 0


def _manipulate(args) -> int:
    import torch

    from .latent import attribute_direction
    from .plots import save_image_grid
    from .run import check_int

    check_int("manipulate", "--n", args.n, 1)
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    model, data, device = _latent_setup(args)
    images = data.images.to(device)
    if args.attribute == "thickness":
        mass = images.reshape(len(images), -1).float().sum(-1)
        has = mass > mass.median()
        what = "thickness (pixel mass above the median)"
    elif args.attribute.startswith("class:"):
        if data.labels is None:
            raise ValueError(f"--attribute {args.attribute}: {args.data!r} has no labels")
        try:
            a, b = (int(c) for c in args.attribute[len("class:") :].split(","))
        except ValueError:
            raise ValueError(f"--attribute must be thickness or class:A,B, got {args.attribute!r}") from None
        labels = data.labels.to(device)
        for c in (a, b):
            if not bool((labels == c).any()):
                raise ValueError(f"--attribute {args.attribute}: no image of class {c} in the {args.split} split")
        keep = (labels == a) | (labels == b)
        images, has = images[keep], labels[keep] == b
        what = f"class {a} -> class {b}"
    else:
        raise ValueError(f"--attribute must be thickness or class:A,B, got {args.attribute!r}")
    source = ~has
    gen = torch.Generator(device=device).manual_seed(args.seed)
    direction = attribute_direction(model, images, has, n_bins=data.n_bins, generator=gen)
    chosen = images[source][: args.n]
    out = model.manipulate(chosen, direction, alphas, n_bins=data.n_bins, generator=gen)  # (alphas, n, C, H, W)
    save_image_grid(out, args.out)
    print(f"wrote {len(chosen)} images moved along {what} at alphas {alphas} to {args.out}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``pyroflows`` command; returns the exit status.

    Errors a user can fix (bad options, missing files, unusable checkpoints, an output that cannot be written: disk
    full, read-only) print one line to standard error and return 2; a training run stopped by a non-finite loss
    returns 1.

    :param argv: the arguments after ``pyroflows`` (default: ``sys.argv[1:]``).

    Example::

        >>> from pyroflows.cli import main
        >>> main(["sample", "no/such/checkpoint.pt"])  # prints the reason on stderr
        2
    """
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    for i, arg in enumerate(argv):
        old = arg.split("=", 1)[0]
        if old in _RENAMED_FLAGS:
            print(f"pyroflows: {old} is renamed {_RENAMED_FLAGS[old]} (the old name goes in 0.3)", file=sys.stderr)
            argv[i] = _RENAMED_FLAGS[old] + arg[len(old) :]
    args = parser.parse_args(argv)
    from .run import OutputError, RunInterrupted
    from .train import CheckpointError, TrainingError

    try:
        commands = {
            "fit": _fit,
            "sample": _sample,
            "eval": _eval,
            "interpolate": _interpolate,
            "manipulate": _manipulate,
        }
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, OutputError) as e:
        message = str(e).removeprefix(f"{args.command}: ")
        print(f"pyroflows {args.command}: error: {message}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"pyroflows {args.command}: training stopped: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:  # SIGINT/SIGTERM: the step finished and the checkpoint is written
        print(f"pyroflows {args.command}: {str(e).removeprefix('fit: ')}", file=sys.stderr)
        return e.exit_code


__all__ = ["main"]


if __name__ == "__main__":
    sys.exit(main())
