"""The directory index (a cache of each file's verified digest) and its lock: a damaged, planted or expensive index is
a cache miss, a lock held forever by another process never hangs a save, verify or clean, and no index file is ever
written through a planted link."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    MiB,
    _cli,
    _damage_index,
    _periodic,
    _state,
    periodic,
    state,
    temp_names,
    visible,
)

import ckptio
import ckptio.atomic
import ckptio.dir_index
import ckptio.naming
from ckptio import CheckpointManager
from ckptio.atomic import TEMP_SUFFIX
from ckptio.cli import main
from ckptio.fileio import write_checkpoint
from ckptio.snapshot import BufferSlot


def test_verify_returns_when_another_process_holds_the_index_lock_forever(tmp_path: Path) -> None:
    # Before: `ckptio verify DIR` hung for as long as anyone able to read .ckptio-index.lock held a shared flock
    # on it (no write permission needed).
    path = tmp_path / "checkpoint_epoch_1_batch_1.safetensors"
    write_checkpoint(path, BufferSlot().take({"w": torch.ones(2)}), name=path.name, fmt="safetensors",
                     compression=None, fsync=False)
    lock = tmp_path / ".ckptio-index.lock"
    lock.touch()
    holder = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        reports: list[ckptio.VerifyReport] = []
        worker = threading.Thread(target=lambda: reports.append(ckptio.verify(tmp_path)), daemon=True)
        worker.start()
        worker.join(2.0 + 5)  # verify.INDEX_WAIT_SECONDS, and time to spare
        assert reports, "verify still waits for the index lock"
        assert reports[0].ok and [c.status for c in reports[0].files] == ["verified"]
    finally:
        os.close(holder)  # the waiting thread now records the result and ends


def test_clean_returns_when_another_process_holds_the_index_lock_forever(tmp_path: Path) -> None:
    older = _periodic(tmp_path, 5, 1_000_000_000_000_000_000)
    newer = _periodic(tmp_path, 10, 2_000_000_000_000_000_000)
    lock = tmp_path / ".ckptio-index.lock"
    lock.touch()
    holder = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        codes: list[int] = []
        worker = threading.Thread(target=lambda: codes.append(main(["clean", str(tmp_path), "--keep-count", "1"])),
                                  daemon=True)
        worker.start()
        worker.join(2.0 + 5)
        assert codes == [0], "clean still waits for the index lock"
        assert newer.exists() and not older.exists()
    finally:
        os.close(holder)


@pytest.mark.parametrize("damage", ["garbage", "deep", "odd-records", "plausible-but-wrong", "huge", "fifo"])
def test_a_damaged_index_is_a_cache_miss_for_list_and_rebuilt_by_the_next_save(tmp_path: Path, capsys,
                                                                              damage: str) -> None:
    directory = tmp_path / "ckpts"
    with CheckpointManager(directory, async_save=False, fsync=False) as manager:
        manager.save(_state(), name="checkpoint_epoch_1_batch_1")
    _damage_index(directory, damage, "checkpoint_epoch_1_batch_1.pth")

    code, out, err = _cli(capsys, directory, "list", str(directory))
    assert code == 0, err
    assert "checkpoint_epoch_1_batch_1.pth" in out
    with CheckpointManager(directory, async_save=False, fsync=False) as manager:
        manager.save(_state(1), name="checkpoint_epoch_1_batch_2")  # raises if the save reports failure
    if damage != "fifo":  # a FIFO stays a FIFO until someone removes it; the index then just stays empty
        code, out, err = _cli(capsys, directory, "list", str(directory))
        assert code == 0, err
        assert "checkpoint_epoch_1_batch_2.pth - " in out and "✅ verified" in out


def test_an_index_lock_that_is_a_symlink_is_never_written_through_and_saves_still_succeed(tmp_path, outside) -> None:
    (tmp_path / ".ckptio-index.lock").symlink_to(outside / "precious.txt")
    with CheckpointManager(tmp_path, keep_count=1) as mgr:
        mgr.save(state(1), name=periodic(1))
        future = mgr.save(state(2), name=periodic(2))
        mgr.wait()
    assert future is not None and future.result() is not None
    assert visible(tmp_path) == {f"{periodic(2)}.pth"}
    assert (outside / "precious.txt").read_text() == "precious"


def test_symlinks_planted_under_the_old_predictable_index_temp_name_are_never_written_through(tmp_path,
                                                                                             outside) -> None:
    with CheckpointManager(tmp_path, async_save=False) as mgr:  # planted once the manager swept leftovers
        (tmp_path / f".ckptio-index.json.{os.getpid()}{TEMP_SUFFIX}").symlink_to(outside / "precious.txt")
        mgr.save(state(1), name=periodic(1))
    assert (outside / "precious.txt").read_text() == "precious"
    assert ckptio.verify(tmp_path).ok


@pytest.mark.parametrize("damage", ["deep", "huge-number", "directory"])
def test_a_damaged_index_never_makes_a_save_report_failure(tmp_path, damage) -> None:
    index = tmp_path / ".ckptio-index.json"
    if damage == "deep":
        index.write_text("[" * 100_000 + "]" * 100_000)
    elif damage == "huge-number":
        index.write_text('{"files": {"x": {"size": 1' + "0" * 5000 + "}}}")
    else:
        index.mkdir()
    with CheckpointManager(tmp_path, keep_count=1) as mgr:
        mgr.save(state(1), name=periodic(1))
        future = mgr.save(state(2), name=periodic(2))
        mgr.wait()
    assert future is not None and future.result() is not None
    assert visible(tmp_path) - {".ckptio-index.json"} == {f"{periodic(2)}.pth"}


def test_a_disk_filling_while_the_index_is_written_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    def disk_full(doc: Any, out: Any, **kwargs: Any) -> None:
        out.write("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with CheckpointManager(tmp_path) as mgr:
        monkeypatch.setattr(ckptio.dir_index.json, "dump", disk_full)
        future = mgr.save(state(1), name=periodic(1))
        mgr.wait()
        assert future is not None and future.result() is not None  # the checkpoint itself is committed
        assert temp_names(tmp_path) == []  # while the manager is still open
    monkeypatch.undo()
    assert ckptio.verify(tmp_path).ok


def test_an_index_lock_held_forever_by_another_process_never_hangs_a_save(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    monkeypatch.setattr(ckptio.dir_index, "INDEX_LOCK_SECONDS", 0.2)
    holder = os.open(tmp_path / ".ckptio-index.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: conflicts as another process would
        with CheckpointManager(tmp_path, async_save=False, keep_count=1) as mgr:
            for batch in (1, 2):
                future = mgr.save(state(batch), name=periodic(batch))
                assert future is not None and future.result(timeout=30) is not None
        assert [p.name for p in tmp_path.glob("checkpoint_*")] == [f"{periodic(2)}.pth"]
        assert ckptio.verify(tmp_path).ok
    finally:
        os.close(holder)


def test_an_index_built_to_be_expensive_to_parse_is_a_cache_miss_without_parsing_it(tmp_path: Path) -> None:
    import tracemalloc

    payload = b'{"version":1,"files":{"x":[' + b"{}," * 2_000_000 + b"{}]}}"  # 6 MB: ~2M dicts if parsed
    (tmp_path / ckptio.dir_index.INDEX_NAME).write_bytes(payload)
    tracemalloc.start()
    try:
        assert ckptio.dir_index.read_index(tmp_path) == {}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * MiB, f"reading a 6 MB index peaked at {peak / MiB:.0f} MiB"
