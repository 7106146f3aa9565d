"""Ranks under torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`; also how Slurm and Kubernetes launchers start it).

Shard k belongs to rank k % WORLD_SIZE. Ranks talk only through torch.distributed's gloo backend (small
Python objects: the plan from rank 0, the shard list back to it), so the same code runs on CPU-only and GPU
machines; the GPUs only compute. A rank waits for the others in a collective, hence the long timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A rank that finished its shards waits in a collective for the slowest one; torchrun ends the whole job when a
# rank dies, so a long timeout only matters for a rank that hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank


def current() -> Ranks:
    """This process's place in a torchrun job (one process alone: rank 0 of 1)."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def device_for(ranks: Ranks, requested: str | None) -> str | None:
    """The rank's `LOCAL_RANK` GPU when several ranks share a machine with GPUs; else what was requested."""
    if requested is None and ranks.world_size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
        return f"cuda:{ranks.local_rank}"
    return requested


@contextlib.contextmanager
def process_group(ranks: Ranks):
    """A gloo process group for the duration of the job, if there are several ranks and none exists yet."""
    created = ranks.world_size > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def broadcast(obj, ranks: Ranks):
    """Rank 0's `obj` on every rank."""
    if ranks.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, ranks: Ranks) -> list:
    """Every rank's `obj`, on every rank (after all ranks got here: it is also the end-of-work barrier)."""
    if ranks.world_size == 1:
        return [obj]
    boxes = [None] * ranks.world_size
    dist.all_gather_object(boxes, obj)
    return boxes
