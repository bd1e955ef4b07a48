"""torchrun glue shared by training and the per-image commands (refine, evaluate, compare).

A process started by torchrun finds WORLD_SIZE, RANK and LOCAL_RANK in its environment; with
WORLD_SIZE > 1 it joins the process group (NCCL when its device is a GPU, each rank on
cuda:<local rank>; gloo on the CPU). Without torchrun everything here is a single process and
every helper is a no-op, so the same code runs either way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:<local_rank> when CUDA is available, else cpu; "cuda" -> cuda:<local_rank>."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device=cpu")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown(info: DistInfo, orderly: bool = True) -> None:
    """Leave the process group. orderly (a rank that finished its work): wait at a barrier until every
    rank has finished its collectives, then destroy the group; a rank that destroyed its group and
    exited while another still talked to it could end that rank with SIGABRT ("terminate called
    without an active exception") after the work was done. A rank that is failing leaves at once
    (the others learn of it from their own collectives, or torchrun ends them)."""
    if info.enabled and dist.is_initialized():
        if orderly:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """init_distributed for the duration of a command; the group is left as found (a caller that
    already joined one, such as a test running several commands in one process, keeps it)."""
    started = not dist.is_initialized()
    info = init_distributed(device)
    try:
        yield info
    except BaseException:
        if started:
            shutdown(info, orderly=False)
        raise
    if started:
        shutdown(info)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over processes (in place; a no-op for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(value: Any, info: DistInfo) -> Any:
    """Rank 0's value on every rank (e.g. a ${now:} folder name that may differ between processes)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's value, in rank order, on every rank (picklable values; [value] for one process)."""
    if not info.enabled:
        return [value]
    values: list[Any] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on any (a collective: every rank must call it)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shard(count: int, info: DistInfo) -> range:
    """This rank's item indices out of `count`: every world_size-th one from its rank, so the ranks'
    shards are disjoint, cover every index exactly once and depend only on (count, world size)."""
    return range(info.rank, count, info.world_size)
