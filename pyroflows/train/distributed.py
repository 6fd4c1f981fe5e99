"""The little that training needs from ``torch.distributed``: join the process group ``torchrun`` describes in
the environment, say who we are, and pick each rank's device. Process management is ``torchrun``'s job."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    """Where this process runs: ``rank`` of ``world_size``, its ``device``, and whether ``fit`` created the
    process group (and so must destroy it)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device | None, caller: str = "fit") -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; anything else checked by
    :func:`pyroflows.run.check_device` (``ValueError`` for an unknown or absent device)."""
    from ..run import check_device

    return check_device(caller, device)


def setup(device: str | torch.device | None = "auto") -> Context:
    """Join the process group when running under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) or use
    one the caller initialised; NCCL for CUDA, gloo for CPU. Each rank uses ``cuda:LOCAL_RANK`` on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (world <= 1 and not dist.is_initialized()):
        return Context(device=resolve_device(device))
    device = resolve_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Context(dist.get_rank(), dist.get_world_size(), device, owns)


def teardown(ctx: Context, finished: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it. After a run that ``finished`` (no exception), the
    ranks first meet at a barrier: a rank that destroys the group while another is still receiving from it (rank
    0 gathering the last checkpoint's RNG states, say) can take its gloo threads down mid-transfer and abort the
    process. After an exception there is no barrier, since the other ranks may never arrive."""
    if ctx.owns_group and dist.is_initialized():
        if finished and ctx.distributed:
            dist.barrier()
        dist.destroy_process_group()


def all_mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (the value itself without a process group)."""
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / ctx.world_size


__all__ = ["Context", "all_mean", "resolve_device", "setup", "teardown"]
