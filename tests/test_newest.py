"""``ckptio.latest``: the newest valid checkpoint, the one answer that resuming and ``ckptio clean`` share."""

from __future__ import annotations

from pathlib import Path

import torch

import ckptio


def _save(directory: Path, name: str, step: int) -> Path:
    with ckptio.CheckpointManager(directory, async_save=False) as manager:
        manager.save({"w": torch.full((4,), float(step)), "global_step": step}, name=name)
        return manager.path_for(name)


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_latest_is_the_newest_periodic_checkpoint_written_and_skips_a_damaged_newer_one(tmp_path: Path) -> None:
    older = _save(tmp_path, "checkpoint_epoch_1_batch_10", 10)
    newer = _save(tmp_path, "checkpoint_epoch_1_batch_20", 20)
    _save(tmp_path, "best_model", 30)  # never a periodic checkpoint, however new
    assert ckptio.latest(tmp_path) == newer
    _damage(newer)
    skipped: list[ckptio.Skipped] = []
    assert ckptio.latest(tmp_path, on_skip=skipped.append) == older
    assert [(s.path, s.status) for s in skipped] == [(newer, "corrupt")]


def test_latest_by_progress_counts_every_name_and_ranks_by_the_recorded_global_step(tmp_path: Path) -> None:
    furthest = _save(tmp_path, "final", 50)
    periodic = _save(tmp_path, "checkpoint_epoch_1_batch_20", 20)
    assert ckptio.latest(tmp_path, order="progress", periodic_only=False) == furthest
    assert ckptio.latest(tmp_path, order="progress") == periodic


def test_latest_is_none_for_a_directory_without_a_valid_checkpoint(tmp_path: Path) -> None:
    assert ckptio.latest(tmp_path) is None
    _damage(_save(tmp_path, "checkpoint_epoch_1_batch_10", 10))
    assert ckptio.latest(tmp_path) is None


def test_the_public_api_names_what_a_trainer_needs_to_find_and_describe_checkpoints() -> None:
    for name in ("scan", "latest", "parse_checkpoint_name", "is_slim", "CheckpointEntry"):
        assert name in ckptio.__all__
    assert ckptio.parse_checkpoint_name("checkpoint_epoch_3_batch_40") == (3, 40)
    assert ckptio.parse_checkpoint_name("best_model") is None


def test_scan_takes_a_directory_given_as_a_string(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(tmp_path, async_save=False, fsync=False) as mgr:
        mgr.save({"w": torch.zeros(2)}, name="checkpoint_epoch_1_batch_1")
    assert [e.name for e in ckptio.scan(str(tmp_path))] == [e.name for e in ckptio.scan(tmp_path)] != []
