"""Run by ``test_train.py`` under ``torch.distributed.run --nproc_per_node 2``: a few DDP steps on digits with
the gloo backend; each rank saves what the test compares (weights, ActNorm init, losses, first batch)."""

import os
import sys

import torch


def main(out: str) -> None:
    from pyroflows.data import load_digits
    from pyroflows.train import build_density, fit, loop
    from pyroflows.transforms import ActNorm

    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # ranks build different weights: fit must start them from rank 0's
    model = build_density("glow", (1, 8, 8), levels=1, num_layers=2, hidden=8)
    record = {}

    init = loop._init_actnorm

    def recording_init(*args, **kwargs):
        init(*args, **kwargs)
        first = next(m for m in model.modules() if isinstance(m, ActNorm))
        record["init_bias"] = first.bias.detach().clone()

    loop._init_actnorm = recording_init
    forward = model.forward

    def recording_forward(x):
        record.setdefault("first_batch", x.detach().clone())
        return forward(x)

    model.forward = recording_forward
    result = fit(
        model,
        load_digits("train"),
        load_digits("test"),
        num_steps=8,
        batch_size=32,
        lr=2e-3,
        device="cpu",
        out=os.path.join(out, "out"),
        checkpoint_every=4,
        eval_every=4,
        progress=False,
    )
    record.update(model=model.state_dict(), losses=result.losses)
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
