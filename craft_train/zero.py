"""``--zero`` checkpoints at another process count: the optimizer shards gathered into one whole Adam state.

A ``--zero`` checkpoint holds the whole model and one optimizer shard per process, each the state of the local
Adam that ``ZeroRedundancyOptimizer`` gave that process: its parameters numbered 0.. in the order the partition
assigned them. The partition is a pure function of the parameters' sizes and the process count (largest first,
each to the process with the fewest elements so far, the first such on ties), so it can be computed again
without the processes that wrote the shards. With it the shards become one Adam state numbered as
``model.parameters()``: the format both ``torch.optim.Adam.load_state_dict`` and
``ZeroRedundancyOptimizer.load_state_dict`` (which keeps its own process's part) read, at any process count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import ckptio

__all__ = ["whole_optimizer_state", "zero_partition"]


def zero_partition(numels: list[int], world_size: int) -> list[list[int]]:
    """For each process, the indices of the parameters ``ZeroRedundancyOptimizer`` gives it, in its local order.

    The same greedy rule as ``torch.distributed.optim.ZeroRedundancyOptimizer._partition_parameters`` for one
    parameter group (``tests/test_zero.py`` checks them against each other).
    """
    per_rank: list[list[int]] = [[] for _ in range(world_size)]
    sizes = [0] * world_size
    for index in sorted(range(len(numels)), key=lambda i: numels[i], reverse=True):  # stable, as torch's
        rank = sizes.index(min(sizes))
        per_rank[rank].append(index)
        sizes[rank] += numels[index]
    return per_rank


def whole_optimizer_state(path: str | Path, saved_world_size: int, model: torch.nn.Module) -> dict[str, Any]:
    """The Adam state of the ``--zero`` checkpoint ``path`` (written by ``saved_world_size`` processes), whole.

    ``ValueError`` (naming the file) when a shard does not fit the partition of ``model``'s parameters.
    """
    numels = [p.numel() for p in model.parameters()]
    partition = zero_partition(numels, saved_world_size)
    state: dict[int, Any] = {}
    group: dict[str, Any] | None = None
    for rank, indices in enumerate(partition):
        shard = ckptio.load_shard(path, rank, map_location="cpu")
        local = shard.get("optimizer_shard") if isinstance(shard, dict) else None
        groups = local.get("param_groups") if isinstance(local, dict) else None
        if not isinstance(groups, list) or len(groups) != 1 or len(groups[0].get("params", ())) != len(indices):
            raise ValueError(f"{path}: the optimizer shard of rank {rank} does not fit CRAFT's parameters split over "
                             f"{saved_world_size} processes: the file is damaged; resume from another checkpoint")
        if group is None:
            group = {key: value for key, value in groups[0].items() if key != "params"}
        for local_index, global_index in zip(groups[0]["params"], indices, strict=True):
            if local_index in local["state"]:
                state[global_index] = local["state"][local_index]
    assert group is not None
    return {"state": dict(sorted(state.items())), "param_groups": [{**group, "params": list(range(len(numels)))}]}
