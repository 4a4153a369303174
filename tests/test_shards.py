"""Sharded checkpoints: every rank writes its shard, rank 0 commits the manifest last; a checkpoint is valid
only with every shard it recorded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    _crafted,
    _periodic,
    periodic,
    state,
    visible,
)

import ckptio
import ckptio.atomic
import ckptio.dir_index
import ckptio.naming
from ckptio import CheckpointManager, CheckpointWriteError, CorruptCheckpointError
from ckptio.atomic import TEMP_SUFFIX
from ckptio.cli import main
from ckptio.fileio import verify_file, write_checkpoint
from ckptio.snapshot import BufferSlot


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


def _nested_manifests(directory: Path, depth: int, fan_out: int = 4) -> Path:
    """A chain of manifests, each level listing every file of the next level: fan_out**depth paths."""
    directory.mkdir(parents=True, exist_ok=True)

    def level(where: Path, remaining: int) -> list[dict[str, Any]]:
        shards = where / "L.shards"
        shards.mkdir()
        below = level(shards, remaining - 1) if remaining > 1 else None
        records = []
        for i in range(fan_out):
            saved = write_checkpoint(shards / f"s{i}.pth", BufferSlot().take({"x": torch.zeros(1)}), name=f"s{i}",
                                     fmt="torch", compression=None, fsync=False, shards=below)
            records.append({"rank": i, "file": f"L.shards/s{i}.pth", "digest": saved.digest})
        return records

    records = level(directory, depth)
    manifest = directory / "L.pth"
    write_checkpoint(manifest, BufferSlot().take({"x": torch.zeros(1)}), name="L", fmt="torch", compression=None,
                     fsync=False, shards=records)
    return manifest


def plant_orphan(directory: Path, name: str, size: int = 100_000) -> Path:
    shards = directory / f"{name}.shards"
    shards.mkdir(parents=True)
    (shards / "rank00001-of-00002.pth").write_bytes(b"\0" * size)
    return shards


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_a_shard_table_naming_one_file_twice_through_links_is_damaged(tmp_path: Path, link: Any) -> None:
    # Before: each link was verified again (200 links to one 50 MB shard: 6 s of hashing for 50 MB on disk; a
    # 16 MiB table allows 100,000 of them).
    shards = tmp_path / "checkpoint_epoch_1_batch_1.shards"
    shards.mkdir()
    real = shards / "rank00000-of-00002.safetensors"
    saved = write_checkpoint(real, BufferSlot().take({"w": torch.ones(8)}), name="s", fmt="safetensors",
                             compression=None, fsync=False)
    link(real.name if link is os.symlink else real, shards / "rank00001-of-00002.safetensors")
    table = [{"rank": rank, "file": f"{shards.name}/rank{rank:05d}-of-00002.safetensors", "digest": saved.digest}
             for rank in range(2)]
    manifest = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    write_checkpoint(manifest, BufferSlot().take({"x": torch.zeros(1)}), name="m", fmt="torch", compression=None,
                     fsync=False, shards=table)
    check = verify_file(manifest)
    assert check.status == "corrupt" and "names one file twice" in check.reason
    with pytest.raises(CorruptCheckpointError, match="names one file twice"):
        ckptio.load(manifest)


def test_clean_keeps_a_users_directory_that_merely_ends_in_shards_and_dry_run_lists_real_orphans(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: `ckptio clean --keep-count 5` deleted my_dataset.shards/ and all it held (its --dry-run said nothing).
    _periodic(tmp_path, 5, 1_000_000_000_000_000_000)
    users = tmp_path / "my_dataset.shards"
    users.mkdir()
    (users / "part-0000.tar").write_bytes(b"precious")
    orphan = tmp_path / "checkpoint_epoch_1_batch_2.shards"
    orphan.mkdir()
    (orphan / "rank00001-of-00002.safetensors").write_bytes(b"\0" * 100)
    (orphan / f".rank00001-of-00002.safetensors.1.{'0' * 16}.ckptio-tmp").write_bytes(b"")
    assert main(["clean", str(tmp_path), "--keep-count", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete: checkpoint_epoch_1_batch_2.shards" in out and "my_dataset" not in out
    assert main(["clean", str(tmp_path), "--keep-count", "5"]) == 0
    assert (users / "part-0000.tar").read_bytes() == b"precious"
    assert not orphan.exists()


def test_a_shard_that_is_itself_a_manifest_is_refused_instead_of_followed(tmp_path: Path) -> None:
    manifest = _nested_manifests(tmp_path / "d", depth=3)

    check = ckptio.verify(manifest).files[0]
    assert check.status == "corrupt"
    assert "a shard must hold data" in check.reason
    with pytest.raises(CorruptCheckpointError, match="a shard must hold data"):
        ckptio.load(manifest)
    with pytest.raises(CorruptCheckpointError, match="a shard must hold data"):
        ckptio.load_shard(manifest, 0)


def test_a_shard_table_listing_one_file_twice_is_damaged(tmp_path: Path) -> None:
    shard_dir = tmp_path / "M.shards"
    shard_dir.mkdir()
    saved = write_checkpoint(shard_dir / "s.pth", BufferSlot().take({"x": torch.zeros(1)}), name="s", fmt="torch",
                             compression=None, fsync=False)
    record = {"rank": 0, "file": "M.shards/s.pth", "digest": saved.digest}
    write_checkpoint(tmp_path / "M.pth", BufferSlot().take({"x": torch.zeros(1)}), name="M", fmt="torch",
                     compression=None, fsync=False, shards=[record] * 100)

    assert "twice" in ckptio.verify(tmp_path / "M.pth").files[0].reason


def test_a_shard_name_too_long_for_the_file_system_is_a_missing_shard_not_an_os_error(tmp_path: Path) -> None:
    suffix, data = _crafted("pth-long-shard-name")
    path = tmp_path / f"M{suffix}"
    path.write_bytes(data)

    assert "is missing" in ckptio.verify(path).files[0].reason
    with pytest.raises(CorruptCheckpointError, match="is missing"):
        ckptio.load(path)


def test_a_shard_directory_that_is_a_symlink_is_refused_and_nothing_is_written_outside(tmp_path, outside) -> None:
    (tmp_path / f"{periodic(1)}.shards").symlink_to(outside, target_is_directory=True)
    with CheckpointManager(tmp_path, rank=1, world_size=2) as rank1:
        rank1.save(None, name=periodic(1), shard={"opt": torch.ones(2)}, token="t1")
        with pytest.raises(CheckpointWriteError, match="not a directory of shards"):
            rank1.wait()
    assert sorted(os.listdir(outside)) == ["precious.txt"]


def test_opening_a_directory_never_deletes_through_a_symlinked_shard_directory(tmp_path, outside) -> None:
    (outside / f".looks-temporary{TEMP_SUFFIX}").write_text("not ours")
    (tmp_path / f"{periodic(1)}.shards").symlink_to(outside, target_is_directory=True)
    CheckpointManager(tmp_path).close()
    assert sorted(os.listdir(outside)) == [f".looks-temporary{TEMP_SUFFIX}", "precious.txt"]


def test_deleting_a_sharded_checkpoint_removes_a_symlinked_shard_directory_as_a_link_only(tmp_path,
                                                                                          outside) -> None:
    with CheckpointManager(tmp_path, keep_count=1) as mgr:
        mgr.save(state(1), name=periodic(1))
        mgr.wait()
        (tmp_path / f"{periodic(1)}.shards").symlink_to(outside, target_is_directory=True)
        mgr.save(state(2), name=periodic(2))
    assert visible(tmp_path) == {f"{periodic(2)}.pth"}
    assert sorted(os.listdir(outside)) == ["precious.txt"]


def test_a_new_manager_removes_shard_directories_whose_manifest_was_never_committed(tmp_path) -> None:
    plant_orphan(tmp_path, periodic(7))
    plant_orphan(tmp_path, "best_model")
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(state(1), name=periodic(1))
    assert visible(tmp_path) == {f"{periodic(1)}.pth"}


def test_orphans_are_kept_while_another_rank_of_the_run_holds_its_lock(tmp_path) -> None:
    plant_orphan(tmp_path, periodic(7))
    with CheckpointManager(tmp_path, rank=1, world_size=2), CheckpointManager(tmp_path, rank=0, world_size=2):
        assert f"{periodic(7)}.shards" in visible(tmp_path)  # rank 1 may be writing it right now


def test_a_shard_another_rank_is_writing_keeps_its_temporary_file_when_rank_0_opens_the_directory(tmp_path) -> None:
    shards = plant_orphan(tmp_path, periodic(7))
    writing = shards / ".rank00001-of-00002.pth.4242.0123456789abcdef.ckptio-tmp"
    writing.write_bytes(b"half a shard")
    with CheckpointManager(tmp_path, rank=1, world_size=2), CheckpointManager(tmp_path, rank=0, world_size=2):
        assert writing.exists()  # rank 1 (or its writer process) is writing it right now
    with CheckpointManager(tmp_path):  # nobody else holds a lock: a leftover of a crash, removed
        assert not shards.exists()


def test_retention_removes_orphans_older_than_the_committed_checkpoint_and_counts_newer_ones(tmp_path) -> None:
    with CheckpointManager(tmp_path, keep_count=5, disk_budget=400_000) as mgr:
        mgr.save(state(1), name=periodic(1))
        mgr.wait()
        plant_orphan(tmp_path, periodic(2), size=150_000)  # a rank that died before rank 0 committed
        plant_orphan(tmp_path, periodic(9), size=150_000)  # a rank running ahead: still being written
        for batch in (3, 4, 5):
            mgr.save(state(batch, elements=30_000), name=periodic(batch))
            mgr.wait()
    assert f"{periodic(2)}.shards" not in visible(tmp_path)
    assert f"{periodic(9)}.shards" in visible(tmp_path)
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert on_disk <= 400_000
    assert visible(tmp_path) == {f"{periodic(9)}.shards", f"{periodic(4)}.pth", f"{periodic(5)}.pth"}


def test_orphan_listing_skips_committed_sharded_checkpoints_and_removal_needs_no_live_writer(tmp_path) -> None:
    managers = [CheckpointManager(tmp_path, rank=r, world_size=2) for r in range(2)]
    for rank, manager in reversed(list(enumerate(managers))):
        manager.save(state(1) if rank == 0 else None, name=periodic(1), shard={"opt": torch.ones(2)}, token="t")
    for manager in managers:
        manager.wait()
    plant_orphan(tmp_path, periodic(2))
    assert [o.name for o in ckptio.naming.orphan_shards(tmp_path)] == [periodic(2)]
    assert ckptio.naming.remove_orphan_shards(tmp_path, when_idle=True) == []  # managers are open: someone may write it
    for manager in reversed(managers):
        manager.close()
    assert [o.name for o in ckptio.naming.remove_orphan_shards(tmp_path, when_idle=True)] == [periodic(2)]
    assert ckptio.verify(tmp_path).ok


def test_ckptio_clean_removes_orphan_shard_directories_and_keeps_the_final_checkpoint(tmp_path, capsys) -> None:
    from ckptio.cli import main

    with CheckpointManager(tmp_path) as mgr:
        for name in (periodic(1), periodic(3), "final"):
            mgr.save(state(1), name=name)
    plant_orphan(tmp_path, periodic(2))
    assert main(["clean", str(tmp_path), "--keep-count", "1", "--dry-run"]) == 0
    assert f"{periodic(2)}.shards" in visible(tmp_path)
    assert main(["clean", str(tmp_path), "--keep-count", "1"]) == 0
    assert f"{periodic(2)}.shards (shards of a save never committed)" in capsys.readouterr().out
    assert visible(tmp_path) == {f"{periodic(3)}.pth", "final.pth"}


def test_opening_a_manager_or_cleaning_never_deletes_a_users_directory_named_like_shards(tmp_path: Path) -> None:
    user_data = tmp_path / "my_dataset.shards"
    user_data.mkdir()
    (user_data / "a.tar").write_bytes(b"precious")
    outside = tmp_path.parent / f"{tmp_path.name}-target"
    outside.mkdir()
    (tmp_path / "linked.shards").symlink_to(outside, target_is_directory=True)
    with CheckpointManager(tmp_path, async_save=False, keep_count=1) as mgr:
        for batch in (1, 2):
            mgr.save(state(batch), name=periodic(batch))
    from ckptio.cli import main

    assert main(["clean", str(tmp_path), "--keep-count", "1"]) == 0
    assert (user_data / "a.tar").read_bytes() == b"precious"
    assert (tmp_path / "linked.shards").is_symlink() and outside.is_dir()
