"""``ckptio.latest``: the newest valid checkpoint, the one answer that resuming and ``ckptio clean`` share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import _periodic

import ckptio
from ckptio.dir_index import INDEX_NAME
from ckptio.naming import parse_checkpoint_name
from craft_train.resume import find_resume_checkpoint


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


def test_resume_auto_ranks_a_checkpoint_whose_summary_is_not_a_dict_instead_of_crashing(tmp_path: Path) -> None:
    good = _periodic(tmp_path, 5, 1_000_000_000_000_000_000)
    _periodic(tmp_path, 6, 2_000_000_000_000_000_000, summary_override="not a dict")
    said: list[str] = []
    assert find_resume_checkpoint(tmp_path, said.append) in (good, tmp_path / "checkpoint_epoch_1_batch_6.safetensors")


def test_resume_auto_ignores_an_index_record_made_for_another_file(tmp_path: Path) -> None:
    # A record claiming global_step 999 for the older file (its size and mtime do not match it) must not make
    # --resume auto pick the older checkpoint over the newer one.
    older = _periodic(tmp_path, 5, 1_000_000_000_000_000_000)
    newer = _periodic(tmp_path, 10, 2_000_000_000_000_000_000)
    record = {"size": 1, "mtime_ns": 1, "status": "verified", "digest": None,
              "meta": {"summary": {"global_step": 999}}, "reason": ""}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"version": 1, "files": {older.name: record}}))
    assert find_resume_checkpoint(tmp_path, lambda _: None) == newer


@pytest.mark.parametrize("stem", ["checkpoint_epoch_1_batch_1\n", "checkpoint_epoch_\u0661_batch_1",
                                  "checkpoint_epoch_1_batch_\uff11", "checkpoint_epoch_1_batch_1x"])
def test_only_plain_ascii_digits_make_a_batch_checkpoint_name(stem: str) -> None:
    # "\u0661" (Arabic-Indic one) and "\uff11" (fullwidth one) are digits to \d and to int(): such a planted name
    # would pass for checkpoint_epoch_1_batch_1 in retention and in --resume auto's order
    assert parse_checkpoint_name(stem) is None
    assert parse_checkpoint_name("checkpoint_epoch_12_batch_340") == (12, 340)
