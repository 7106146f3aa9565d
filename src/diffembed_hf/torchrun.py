"""This process's place in a torchrun job (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`; also how Slurm and Kubernetes
launchers start it), read where training, corpus encoding and the CLI all find it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UsageError


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


_LAUNCH = "run the command under torchrun (torchrun --nproc-per-node N -m diffembed_hf ...), which sets them"


def torchrun_ranks() -> Ranks:
    """This process's place in a torchrun job (one process alone: rank 0 of 1). `RANK`, `WORLD_SIZE` and
    `LOCAL_RANK` must make sense together, and several ranks need `MASTER_ADDR` and `MASTER_PORT`: a variable
    left over in the shell would otherwise make this process wait for ranks that never start, or fail inside
    torch.distributed with a message that does not name it."""
    env = os.environ
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = env.get(name, "").strip()
        if not text:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise UsageError(f"the environment variable {name}={env[name]!r} is not an integer; {_LAUNCH}, or "
                             f"unset {name}") from None
    rank, world, local = values.get("RANK", 0), values.get("WORLD_SIZE", 1), values.get("LOCAL_RANK", 0)
    shown = ", ".join(f"{name}={value}" for name, value in values.items())
    if world < 1 or not 0 <= rank < world or local < 0:
        unset = " ".join(values)
        raise UsageError(f"the environment says {shown}, which is not a rank of a torchrun job (RANK runs from 0 "
                         f"to WORLD_SIZE - 1); {_LAUNCH}, or unset {unset} to run in one process")
    if world > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name, "").strip()]
        if missing:
            raise UsageError(f"the environment says {shown} but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set, so the ranks cannot meet; {_LAUNCH}, "
                             f"or unset {' '.join(values)} to run in one process")
    return Ranks(rank, world, local)
