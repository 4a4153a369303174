"""Multi-process training under ``torchrun``: process-group setup and the few collectives the loop needs.

Every collective runs in the training thread; the checkpoint writer thread never issues one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["World", "setup_world"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def step_totals(self, losses: list[float], errors: int, device: torch.device) -> tuple[list[float], int]:
        """Losses averaged and error counts summed over all processes, in one all-reduce (identity for one)."""
        if not self.distributed:
            return losses, errors
        tensor = torch.tensor([*losses, float(errors)], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        *summed, total_errors = tensor.tolist()
        return [value / self.size for value in summed], int(total_errors)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every process got here (nothing to wait for with one)."""
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_world(device_kind: str) -> World:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank)
