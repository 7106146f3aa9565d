"""The corpus job's collectives under torchrun (the ranks themselves: `torchrun.torchrun_ranks`).

Shard k belongs to rank k % WORLD_SIZE. Ranks talk only through torch.distributed's gloo backend (small
Python objects: the plan from rank 0, the shard list back to it), so the same code runs on CPU-only and GPU
machines; the GPUs only compute. A rank waits for the others in a collective, hence the long timeout.

A job that fails on one rank must end on every rank with one message: each step that all ranks take ends in
`settle`, where the ranks tell each other whether they failed. Rank 0 then raises the failure (its own, or
"rank K of N failed: ..."), the other ranks raise `OtherRankFailed`, which the CLI does not print. Without it
the surviving ranks would wait in their next collective until the failed process is gone and then report a
lost connection, which names neither the rank nor the cause.
"""

from __future__ import annotations

import contextlib
import datetime

import torch
import torch.distributed as dist

from ..errors import DiffembedError, one_line
from ..torchrun import Ranks

# A rank that finished its shards waits in a collective for the slowest one; torchrun ends the whole job when a
# rank dies, so a long timeout only matters for a rank that hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(days=2)


class OtherRankFailed(DiffembedError):
    """Raised on a rank other than 0 when some rank failed: rank 0 says which and why, this rank stays quiet."""


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


def settle(ranks: Ranks, error: BaseException | None) -> None:
    """The end of a step every rank takes: if any rank failed (`error` is this rank's failure, or None), every
    rank raises. Rank 0 raises its own failure, or a `DiffembedError` "rank K of N failed: ..." for the first
    rank that failed (with that failure's exit status); the other ranks raise `OtherRankFailed` (chained to
    their own failure, if any, for --debug). One process alone just raises its own failure."""
    if ranks.world_size == 1:
        if error is not None:
            raise error
        return
    report = None if error is None else (one_line(error), getattr(error, "exit_status", 1))
    failed = [(rank, found) for rank, found in enumerate(gather(report, ranks)) if found is not None]
    if not failed:
        return
    if ranks.is_main:
        if error is not None:
            raise error
        rank, (message, status) = failed[0]
        raise DiffembedError(f"rank {rank} of {ranks.world_size} failed: {message}", exit_status=status)
    raise OtherRankFailed(f"rank {failed[0][0]} failed; rank 0 reports it") from error


@contextlib.contextmanager
def together(ranks: Ranks):
    """A step every rank takes: a failure on any rank ends the step on every rank (see `settle`)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any failure: the other ranks must hear of it
        settle(ranks, err)
        raise
    settle(ranks, None)
