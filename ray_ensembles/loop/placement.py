"""Which process trains which members, and on which device: the one mapping.

Members go round-robin to Ray Train workers, to torchrun (or `accelerate launch`) processes and to
nothing else. A member's result never depends on where it trains: every random stream comes from
(seed, member id), never from the rank.
"""

from __future__ import annotations

import contextlib
import os

import torch


def assign_members(member_ids: list[int], num_workers: int) -> list[list[int]]:
    """The members each worker trains: round-robin, e.g. 5 members on 2 workers -> [0,2,4], [1,3]."""
    return [list(member_ids[rank::num_workers]) for rank in range(num_workers)]


def local_device(cpu: bool = False, index: int | None = None) -> torch.device:
    """This process's device: the CPU when `cpu` or without CUDA, else GPU `index`: a Ray GPU
    worker sees its one GPU as 0; under torchrun or accelerate launch it is the LOCAL_RANK."""
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if index is None else index)


def launched_rank() -> tuple[int, int]:
    """(rank, world size) of this process when a launcher started several (torchrun and
    accelerate launch both set RANK and WORLD_SIZE), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ["RANK"]), world) if world > 1 else (0, 1)


@contextlib.contextmanager
def process_group():
    """The launcher's process group, for barriers only (members exchange nothing): joined here
    unless the user's script (or accelerate) has joined it already, and left again if so."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")  # a barrier needs no GPU collective
    try:
        yield dist
    finally:
        if created:
            dist.destroy_process_group()
