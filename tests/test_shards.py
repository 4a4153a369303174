"""Sharded checkpoints: every rank writes its shard, rank 0 commits the manifest last; a checkpoint is valid
only with every shard it recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptio
from ckptio import CheckpointManager, CheckpointWriteError, CorruptCheckpointError


def _save_all(managers: list[CheckpointManager], step: int, token: str | None = None) -> None:
    name = f"checkpoint_epoch_1_batch_{step}"
    for rank, manager in reversed(list(enumerate(managers))):  # the shards of other ranks may come first or last
        state = {"epoch": 1, "batch": step, "w": torch.full((3,), float(step))} if rank == 0 else None
        manager.save(state, name=name, shard={"opt": torch.full((2,), float(rank + step))},
                     token=token or f"run:{step}")


def test_a_sharded_checkpoint_loads_with_each_ranks_shard_and_retention_removes_whole_checkpoints(
    tmp_path: Path,
) -> None:
    managers = [CheckpointManager(tmp_path, rank=r, world_size=2, keep_count=2) for r in range(2)]
    for step in range(1, 4):
        _save_all(managers, step)
    for manager in reversed(managers):
        manager.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "checkpoint_epoch_1_batch_2.pth", "checkpoint_epoch_1_batch_2.shards",
        "checkpoint_epoch_1_batch_3.pth", "checkpoint_epoch_1_batch_3.shards"]
    manifest = tmp_path / "checkpoint_epoch_1_batch_3.pth"
    assert torch.equal(ckptio.load(manifest)["w"], torch.full((3,), 3.0))
    assert torch.equal(ckptio.load_shard(manifest, 1)["opt"], torch.full((2,), 4.0))
    assert ckptio.verify(tmp_path).ok


def test_a_missing_or_replaced_shard_makes_the_whole_checkpoint_invalid(tmp_path: Path) -> None:
    managers = [CheckpointManager(tmp_path, rank=r, world_size=2) for r in range(2)]
    _save_all(managers, 1)
    _save_all(managers, 2)
    for manager in reversed(managers):
        manager.close()
    shards = tmp_path / "checkpoint_epoch_1_batch_2.shards"
    (shards / "rank00001-of-00002.pth").unlink()
    with pytest.raises(CorruptCheckpointError, match="rank00001-of-00002.pth is missing"):
        ckptio.load(tmp_path / "checkpoint_epoch_1_batch_2.pth")
    (tmp_path / "checkpoint_epoch_1_batch_1.shards" / "rank00000-of-00002.pth").replace(
        shards / "rank00001-of-00002.pth")
    report = ckptio.verify(tmp_path)
    reasons = {c.path.name: c.reason for c in report.corrupt}
    assert "not the one this manifest recorded" in reasons["checkpoint_epoch_1_batch_2.pth"]
    assert "checkpoint_epoch_1_batch_1.pth" in reasons  # it lost a shard to the replacement


def test_rank_0_does_not_commit_a_manifest_when_a_rank_never_writes_its_shard(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, rank=0, world_size=2, shard_timeout=0.3) as lonely:
        lonely.save({"w": torch.ones(1)}, name="checkpoint_epoch_1_batch_1", shard={"o": torch.ones(1)},
                    token="a")
        with pytest.raises(CheckpointWriteError, match=r"ranks \[1\] did not write their shards"):
            lonely.wait()
    assert not (tmp_path / "checkpoint_epoch_1_batch_1.pth").exists()


def test_a_stale_shard_from_an_earlier_save_is_never_taken_for_the_current_one(tmp_path: Path) -> None:
    rank1 = CheckpointManager(tmp_path, rank=1, world_size=2)
    rank1.save(None, name="checkpoint_epoch_1_batch_1", shard={"o": torch.zeros(1)}, token="old")
    rank1.close()
    with CheckpointManager(tmp_path, rank=0, world_size=2, shard_timeout=0.3) as rank0:
        rank0.save({"w": torch.ones(1)}, name="checkpoint_epoch_1_batch_1", shard={"o": torch.ones(1)},
                   token="new")
        with pytest.raises(CheckpointWriteError, match="did not write"):
            rank0.wait()


def test_sharded_saves_need_a_shard_and_a_token_on_every_rank(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, rank=0, world_size=2) as manager:
        with pytest.raises(ValueError, match="shard="):
            manager.save({"w": torch.ones(1)}, name="x")
    with CheckpointManager(tmp_path / "single") as single, pytest.raises(ValueError, match="world_size > 1"):
        single.save({"w": torch.ones(1)}, name="x", shard={"o": torch.ones(1)}, token="t")
    with pytest.raises(ValueError, match="rank must be in"):
        CheckpointManager(tmp_path / "bad", rank=2, world_size=2)
