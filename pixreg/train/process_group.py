"""Process-group set-up of the training tool for ``torchrun`` (renamed from ``pixreg.train.dist``,
whose name was too close to the core's :mod:`pixreg.distributed`), and the device choice.

Launched by ``torchrun --nproc-per-node N -m pixreg train ...`` (``WORLD_SIZE > 1`` in
the environment), :func:`setup` initialises the default process group from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``;
``nccl`` on CUDA, ``gloo`` on CPU) and picks ``cuda:LOCAL_RANK``; otherwise it does
nothing. On several machines (``torchrun --nnodes M --node-rank ...``) ``RANK`` is the
global rank and ``LOCAL_RANK`` the rank on this machine: the GPU is chosen by
``LOCAL_RANK``, everything else (data shard, "main process") by the global rank. Only
global rank 0 writes files (config, logs, TensorBoard, checkpoints, metrics) and shows
progress bars, so the run folder must be on a file system every machine sees for
``--resume`` (all ranks read ``last.pt``). Batch statistics are global through
:mod:`pixreg.distributed`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

__all__ = ["DistContext", "resolve_device", "setup", "teardown", "barrier", "all_gather_object"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when setup() created the process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"cpu"``, ``"cuda"`` (``cuda:LOCAL_RANK``), ``"cuda:N"`` or ``"auto"`` (CUDA when available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        if device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                                   "device(s): use --nproc-per-node <= the number of GPUs")
            return torch.device("cuda", local_rank)
        return torch.device(device)
    if device != "cpu":
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Initialise ``torch.distributed`` when ``WORLD_SIZE > 1``; return the context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistContext(device=dev)
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev, owns_group=owns)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_gather_object(ctx: DistContext, obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
