"""Process-group set-up and the few collectives training needs.

The same code runs as one process (no environment set) and under ``torchrun`` (which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), on one node or on
several (``--nnodes N`` with a rendezvous endpoint): NCCL on CUDA, gloo on CPU. ``RANK`` is the
process's place in the whole job and ``LOCAL_RANK`` its place on its node, so the GPU is picked
by ``LOCAL_RANK`` and everything else by ``RANK``. Only global rank 0 writes the run's files
and prints progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU where CUDA is available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        # torch's own message lists every device type it was built with, on many lines.
        raise UsageError("device", "auto, cpu, cuda or cuda:N", repr(name)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device", "an available device", f"{name!r} (no CUDA here)")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UsageError("device", f"cuda:0 to cuda:{count - 1}", repr(name))
    return device


def init_distributed(device_name: str = "auto") -> DistEnv:
    """Joins the process group when launched by torchrun; a single-process env otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of ``values`` over ranks (a copy; float64 so counts and losses add exactly)."""
    out = values.detach().to(torch.float64).clone()
    if env.distributed:
        if env.device.type == "cuda":
            out = out.to(env.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class ShardedSampler(Sampler[int]):
    """One permutation per epoch, cut into contiguous global batches, dealt out to the ranks.

    A global batch is what one optimizer step takes: ``batch_size * world_size * accum_steps``
    items. Rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of the epoch's order, and its
    loader cuts that stream into micro-batches of ``batch_size`` in order, so the ``accum_steps``
    micro-batches of one step on all ranks hold exactly the items of the same step in a
    single-process run with one batch of the global size: runs with any world size and
    accumulation see the same global batches, and their averaged gradients agree. Training
    drops the incomplete tail so every rank takes the same number of steps; evaluation keeps
    every item once (ranks may get one item more or less, and metrics are summed, not
    averaged, across ranks).
    """

    def __init__(
        self,
        num_items: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        batch_size: int = 1,
        accum_steps: int = 1,
    ) -> None:
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.accum_steps = accum_steps
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        if self.drop_last:
            global_batch = self.batch_size * self.world_size * self.accum_steps
            order = order[: (len(order) // global_batch) * global_batch]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(self._order()[self.rank :: self.world_size])
