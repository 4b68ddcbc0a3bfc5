"""Several processes (GPUs, machines) with ``torchrun``: process-group setup and small helpers.

Every training command and ``make-masks`` call :func:`init` with the device they resolved. When
the process was started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it joins the
process group (NCCL on CUDA, Gloo on CPU), binds ``cuda`` to ``cuda:LOCAL_RANK`` and silences the
shared console on every rank but 0 (one set of progress bars and messages). Without ``torchrun``
every helper is a cheap no-op: rank 0 of a world of 1.

Importing this module imports no torch (a process group exists only once :func:`init`, which
imports it, has run), so a command can ask whether torchrun started it before it pays for torch.

Multi-node runs need ``--out``, ``--data`` and ``--store`` on a file system every node sees:
rank 0 writes checkpoints and manifests that the other ranks read when resuming, and every rank
writes its own images' chunks of the mask store.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from iumask.errors import IumaskError
from iumask.progress import console

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def env_world_size() -> int:
    """The world size torchrun announced (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as torchrun announced it (0 without torchrun), readable before :func:`init`."""
    return int(os.environ.get("RANK", "0"))


def _process_group():
    """``torch.distributed`` when this process has joined a process group, else None (without
    importing torch: nothing can have joined one before :func:`init` imported it)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    return _process_group() is not None


def rank() -> int:
    dist = _process_group()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _process_group()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    """True on the process that writes checkpoints, manifests and progress (rank 0)."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun; return this process's device.

    Idempotent. ``cuda`` (no index) becomes ``cuda:LOCAL_RANK`` under torchrun; an explicit
    ``cuda:N`` is kept.
    """
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    if env_world_size() <= 1:
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
        atexit.register(_shutdown)
        if not is_main():
            console.quiet = True  # one set of progress bars and messages: rank 0's
    return device


# How long a collective waits for the other ranks before the job fails (torch's default when unset:
# 10 minutes for NCCL, 30 for Gloo). Every long step iumask runs is shared by all ranks, so the
# default suffices; raise it for a file system where rank 0's writes are slow.
TIMEOUT_ENV = "IUMASK_COLLECTIVE_TIMEOUT_S"


def collective_timeout() -> datetime.timedelta | None:
    """The process group's timeout from ``$IUMASK_COLLECTIVE_TIMEOUT_S`` (seconds), or None for torch's."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise IumaskError(f"{TIMEOUT_ENV}={text!r}: give the collectives' timeout in seconds (> 0), or unset it")
    return datetime.timedelta(seconds=seconds)


def _shutdown() -> None:
    dist = _process_group()
    if dist:
        dist.destroy_process_group()


def barrier() -> None:
    dist = _process_group()
    if dist:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (and return it). NCCL needs it on this rank's GPU."""
    dist = _process_group()
    if dist:
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            import torch

            moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor)
    return tensor


def all_gather_object(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (``[value]`` without torchrun)."""
    dist = _process_group()
    if not dist:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main_first(on_main: Callable[[], T], on_others: Callable[[], T]) -> T:
    """Run ``on_main`` on rank 0, then (after a barrier) ``on_others`` on the other ranks: e.g. rank 0
    creates a file the others then open. An error on rank 0 ends the job (torchrun stops the rest)."""
    if is_main():
        result = on_main()
        barrier()
        return result
    barrier()
    return on_others()


def shard(items: list[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item starting at ``rank``."""
    return items[rank()::world_size()]
