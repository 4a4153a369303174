"""Creating, replacing and locking files in a checkpoint directory: a planted symlink, hard link or fifo is never
followed or truncated, and a regular lock file left by an earlier run is reused."""

from __future__ import annotations

import os

import pytest
from helpers import periodic, state

import ckptio
import ckptio.atomic
import ckptio.dir_index
import ckptio.naming
from ckptio import CheckpointManager
from ckptio.naming import LOCK_NAME


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_is_not_truncated(tmp_path, outside) -> None:
    directory = tmp_path / "ck"
    directory.mkdir()
    (directory / LOCK_NAME).symlink_to(outside / "precious.txt")
    with pytest.raises(OSError, match="is a symlink, not a ckptio lock file"):
        CheckpointManager(directory)
    assert (outside / "precious.txt").read_text() == "precious"


def test_a_lock_file_that_is_a_hard_link_or_a_fifo_is_refused_without_blocking(tmp_path, outside) -> None:
    directory = tmp_path / "ck"
    directory.mkdir()
    os.link(outside / "precious.txt", directory / LOCK_NAME)
    with pytest.raises(OSError, match="hard link"):
        CheckpointManager(directory)
    assert (outside / "precious.txt").read_text() == "precious"
    (directory / LOCK_NAME).unlink()
    os.mkfifo(directory / LOCK_NAME)
    with pytest.raises(OSError, match="not a regular file"):
        CheckpointManager(directory)


def test_new_files_are_never_created_over_an_existing_name_or_through_a_symlink(tmp_path, outside) -> None:
    (tmp_path / "link").symlink_to(outside / "precious.txt")
    (tmp_path / "file").write_text("someone's")
    for name in ("link", "file"):
        with pytest.raises(FileExistsError):
            ckptio.atomic.create_new(tmp_path / name)
    assert (outside / "precious.txt").read_text() == "precious"
    assert (tmp_path / "file").read_text() == "someone's"


def test_a_symlink_under_a_checkpoint_name_is_replaced_as_a_link_and_its_target_is_untouched(tmp_path,
                                                                                             outside) -> None:
    (tmp_path / f"{periodic(1)}.pth").symlink_to(outside / "precious.txt")
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(state(1), name=periodic(1))
    assert not (tmp_path / f"{periodic(1)}.pth").is_symlink()
    assert ckptio.load(tmp_path / f"{periodic(1)}.pth")["batch"] == 1
    assert (outside / "precious.txt").read_text() == "precious"


def test_open_lock_reuses_a_regular_lock_file_left_by_an_earlier_run(tmp_path) -> None:
    (tmp_path / LOCK_NAME).write_text("12345")
    fd = ckptio.atomic.open_lock(tmp_path / LOCK_NAME)
    os.close(fd)
    CheckpointManager(tmp_path).close()
