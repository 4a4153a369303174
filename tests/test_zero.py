"""craft_train.zero: --zero checkpoints resume at another process count, the optimizer state exactly as saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same
from test_fsdp import _run_group
from torch.distributed.optim import ZeroRedundancyOptimizer

from craft_train.model import CRAFT
from craft_train.zero import zero_partition


class _TorchPartition:
    """ZeroRedundancyOptimizer's own partitioning code, run without a process group."""

    _partition_parameters = ZeroRedundancyOptimizer._partition_parameters
    _get_min_index = ZeroRedundancyOptimizer._get_min_index
    _partition_param_group = ZeroRedundancyOptimizer._partition_param_group

    def __init__(self, params: list[torch.Tensor], world_size: int) -> None:
        self.param_groups = [{"params": params}]
        self.world_size = world_size
        self._partition_parameters_cache: list[Any] = []


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_the_partition_is_the_one_zero_redundancy_optimizer_makes_for_crafts_parameters(world_size: int) -> None:
    params = list(CRAFT().parameters())
    by_id = {id(p): i for i, p in enumerate(params)}
    torch_partition = _TorchPartition(params, world_size)._partition_parameters()
    expected = [[by_id[id(p)] for p in groups[0]["params"]] for groups in torch_partition]
    assert zero_partition([p.numel() for p in params], world_size) == expected


def test_equal_sizes_go_in_their_original_order_to_the_first_emptiest_process() -> None:
    assert zero_partition([4, 4, 4, 8], 2) == [[3, 2], [0, 1]]
    assert zero_partition([1, 1, 1], 2) == [[0, 2], [1]]


def _optimizer_by_index(state: dict[str, Any]) -> dict[str, Any]:
    return {"state": {k: state["state"][k] for k in sorted(state["state"])}, "param_groups": state["param_groups"]}


@pytest.mark.slow
def test_a_zero_run_saved_at_two_processes_resumes_at_one_and_three_with_the_optimizer_exactly_as_saved(
        tmp_path: Path) -> None:
    save_dir = tmp_path / "checkpoints"
    _run_group(2, save_dir, 4, tmp_path / "saved.pt", "save", "zero")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert saved["global_step"] == 4 and len(saved["optim"]["state"]) == len(list(CRAFT().parameters()))
    for world in (1, 3):  # 1: a plain Adam takes the whole state; 3: each process its new part of it
        _run_group(world, save_dir, 4, tmp_path / f"resumed{world}.pt", f"resume{world}", "zero")
        resumed = torch.load(tmp_path / f"resumed{world}.pt", weights_only=True)
        assert resumed["global_step"] == 4
        assert_same(resumed["model"], saved["model"], f"model at {world}")
        assert_same(_optimizer_by_index(resumed["optim"])["state"], _optimizer_by_index(saved["optim"])["state"],
                    f"optimizer at {world}")
