"""Tests for how a CheckpointManager manages storage: retention, the disk budget, free space, a full disk or a file
size limit, one writer per directory, and zstd files.

Free space is faked (``psutil.disk_usage``); the file size limit is real (``RLIMIT_FSIZE`` in a child process, so
that a write fails with EFBIG exactly as on a full volume).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from helpers import state, visible

import ckptio
import ckptio.atomic
import ckptio.cli
import ckptio.dir_index
import ckptio.formats
import ckptio.manager
import ckptio.naming
import ckptio.slim
from ckptio import CheckpointDirectoryLockedError, CheckpointManager, CheckpointWriteError, InsufficientSpaceError
from ckptio.atomic import TEMP_SUFFIX
from ckptio.fileio import MAX_ZSTD_EXPANSION
from ckptio.naming import scan

COMBOS = [("torch", None), ("torch", "zstd"), ("safetensors", None), ("safetensors", "zstd")]
COMBO_IDS = ["pth", "pth.zst", "safetensors", "safetensors.zst"]
SUFFIXES = {("torch", None): ".pth", ("torch", "zstd"): ".pth.zst", ("safetensors", None): ".safetensors",
            ("safetensors", "zstd"): ".safetensors.zst"}
MiB = 2**20
FRAMING = 2**20  # what the manager adds to a snapshot's tensor bytes when it estimates a save's size

# -- helpers ---------------------------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2)


def train_state(batch: int = 1, elements: int = 1000) -> dict[str, Any]:
    """A guide-shaped checkpoint; ``elements`` float32 values of padding make its size predictable."""
    torch.manual_seed(batch)
    return {
        "epoch": 1,
        "batch": batch,
        "total_batches": 100,
        "train_loss": 1.0 / (batch + 1),
        "cls_loss": 0.5 / (batch + 1),
        "geo_loss": 0.25 / (batch + 1),
        "model_state_dict": TinyNet().state_dict(),
        "padding": torch.rand(elements, generator=torch.Generator().manual_seed(batch)),
    }


def periodic(batch: int) -> str:
    return f"checkpoint_epoch_1_batch_{batch}"


def files(directory: Path) -> set[str]:
    """Checkpoint file names (the index, the locks and temporary files are hidden)."""
    return {name for name in os.listdir(directory) if not name.startswith(".")}


def temp_names(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".ckptio-tmp")]


def checkpoint_bytes(directory: Path) -> int:
    return sum(entry.size for entry in scan(directory, ()))


def manager(directory: Path, **options: Any) -> CheckpointManager:
    options.setdefault("fsync", False)
    return CheckpointManager(directory, **options)


def file_size(tmp_path: Path, state: dict[str, Any], name: str = periodic(1), **options: Any) -> int:
    """The size one save of ``state`` takes, measured in a scratch directory."""
    scratch = tmp_path / f"scratch-{len(os.listdir(tmp_path))}"
    with manager(scratch, async_save=False, **options) as mgr:
        mgr.save(state, name=name)
        return mgr.path_for(name).stat().st_size


@dataclass
class FakeVolume:
    """Stands in for ``psutil.disk_usage``: a volume of ``capacity`` bytes holding only ``directory``'s checkpoints."""

    directory: Path
    capacity: int
    calls: int = 0

    def __call__(self, path: str) -> Any:
        assert Path(path) == self.directory
        self.calls += 1
        used = checkpoint_bytes(self.directory)
        return _Usage(total=self.capacity, used=used, free=self.capacity - used, percent=100.0 * used / self.capacity)


@dataclass
class FixedFreeSpace:
    """Stands in for ``psutil.disk_usage``: always ``free`` bytes free, whatever is deleted."""

    free: int

    def __call__(self, path: str) -> Any:
        return _Usage(total=10 * self.free, used=9 * self.free, free=self.free, percent=90.0)


@dataclass
class _Usage:
    total: int
    used: int
    free: int
    percent: float


# -- keep_count ------------------------------------------------------------------------------------------------


def test_keep_count_keeps_the_newest_n_periodic_checkpoints_and_never_best_model(tmp_path) -> None:
    with manager(tmp_path, keep_count=2) as mgr:
        mgr.save(train_state(0), name="best_model")
        for batch in range(1, 6):
            mgr.save(train_state(batch), name=periodic(batch))
            mgr.wait()
            expected = {periodic(b) + ".pth" for b in range(max(1, batch - 1), batch + 1)} | {"best_model.pth"}
            assert files(tmp_path) == expected
        assert mgr.stats.deleted == 3
    assert ckptio.verify(tmp_path).ok
    assert set(json.loads((tmp_path / ".ckptio-index.json").read_text())["files"]) == files(tmp_path)


def test_keep_count_counts_older_files_already_in_the_directory_by_modification_time(tmp_path) -> None:
    with manager(tmp_path, async_save=False) as mgr:  # an earlier run, without retention
        for batch in (50, 40, 30):
            mgr.save(train_state(batch), name=periodic(batch))
    for age, batch in enumerate((50, 40, 30)):  # batch 50 oldest: the batch number says nothing about age
        os.utime(tmp_path / f"{periodic(batch)}.pth", (1_700_000_000 + age, 1_700_000_000 + age))

    with manager(tmp_path, keep_count=2, async_save=False) as mgr:
        mgr.save(train_state(1), name=periodic(1))

    assert files(tmp_path) == {f"{periodic(30)}.pth", f"{periodic(1)}.pth"}


# -- disk_budget -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_disk_budget_is_never_exceeded_after_a_save_and_deletes_the_oldest_periodic_first(tmp_path, fmt,
                                                                                          compression) -> None:
    size = file_size(tmp_path, train_state(1), format=fmt, compression=compression)
    budget_kb = (3 * size + size // 2) // 1000  # room for three checkpoints, not four
    directory = tmp_path / "run"
    with manager(directory, format=fmt, compression=compression, disk_budget=f"{budget_kb}KB") as mgr:
        for batch in range(1, 8):
            mgr.save(train_state(batch), name=periodic(batch))
            mgr.wait()
            assert checkpoint_bytes(directory) <= budget_kb * 1000, f"over the budget after batch {batch}"
            newest_first = [periodic(b) + SUFFIXES[fmt, compression] for b in range(batch, 0, -1)]
            assert files(directory) == set(newest_first[:3])
    assert ckptio.verify(directory).ok


def test_disk_budget_counts_best_model_but_never_deletes_it(tmp_path) -> None:
    size = file_size(tmp_path, train_state(1))
    directory = tmp_path / "run"
    with manager(directory, disk_budget=3 * size + size // 2) as mgr:
        mgr.save(train_state(0), name="best_model")
        for batch in range(1, 6):
            mgr.save(train_state(batch), name=periodic(batch))
            mgr.wait()
            assert checkpoint_bytes(directory) <= 3 * size + size // 2
            assert "best_model.pth" in files(directory)
    assert files(directory) == {"best_model.pth", f"{periodic(4)}.pth", f"{periodic(5)}.pth"}


def test_disk_budget_smaller_than_one_checkpoint_keeps_best_and_newest_and_warns(tmp_path, caplog) -> None:
    size = file_size(tmp_path, train_state(1))
    directory = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="ckptio"), manager(directory, disk_budget=size // 2) as mgr:
        mgr.save(train_state(0), name="best_model")
        for batch in range(1, 4):
            mgr.save(train_state(batch), name=periodic(batch))
        mgr.wait()
        assert mgr.stats.failed == 0 and mgr.stats.committed == 4

    assert files(directory) == {"best_model.pth", f"{periodic(3)}.pth"}
    assert "raise disk_budget" in caplog.text
    assert ckptio.verify(directory).ok


def test_disk_budget_keeps_the_newest_periodic_checkpoint_when_best_model_is_saved_after_it(tmp_path) -> None:
    """Saving best_model must not cost the resume point: the newest periodic checkpoint is never deleted."""
    size = file_size(tmp_path, train_state(1))
    directory = tmp_path / "run"
    with manager(directory, disk_budget=size + size // 2, async_save=False) as mgr:
        mgr.save(train_state(1), name=periodic(1))
        mgr.save(train_state(2), name=periodic(2))
        assert files(directory) == {f"{periodic(2)}.pth"}
        mgr.save(train_state(2), name="best_model")

    assert files(directory) == {f"{periodic(2)}.pth", "best_model.pth"}


def test_keep_count_and_disk_budget_together_apply_both(tmp_path) -> None:
    size = file_size(tmp_path, train_state(1))
    directory = tmp_path / "run"
    with manager(directory, keep_count=3, disk_budget=2 * size + size // 2) as mgr:
        for batch in range(1, 6):
            mgr.save(train_state(batch), name=periodic(batch))
        mgr.wait()
    assert files(directory) == {f"{periodic(4)}.pth", f"{periodic(5)}.pth"}


# -- min_free --------------------------------------------------------------------------------------------------


def test_min_free_deletes_the_oldest_periodic_checkpoints_to_make_room(tmp_path, monkeypatch) -> None:
    state_bytes = 1000 * 4 + sum(t.numel() * 4 for t in TinyNet().state_dict().values())
    size = file_size(tmp_path, train_state(1))
    min_free = 5 * MiB
    directory = tmp_path / "run"
    volume = FakeVolume(directory, capacity=state_bytes + FRAMING + min_free + 3 * size + size // 2)
    monkeypatch.setattr(ckptio.writer.psutil, "disk_usage", volume)

    with manager(directory, min_free="5MiB", async_save=False) as mgr:
        mgr.save(train_state(0), name="best_model")
        for batch in range(1, 7):
            mgr.save(train_state(batch), name=periodic(batch))
            assert volume.capacity - checkpoint_bytes(directory) >= min_free, f"min_free broken at batch {batch}"
            if batch >= 3:  # best_model and the three newest periodic checkpoints fit, no more
                assert files(directory) == {"best_model.pth", *(f"{periodic(b)}.pth" for b in (batch - 2, batch - 1,
                                                                                                batch))}
        assert mgr.stats.skipped_no_space == 0
        assert mgr.stats.committed == 7
    assert volume.calls >= 7
    assert ckptio.verify(directory).ok


def test_min_free_skips_the_save_with_a_warning_when_room_cannot_be_made_and_deletes_nothing(
        tmp_path, monkeypatch, caplog) -> None:
    directory = tmp_path / "run"
    with manager(directory, async_save=False) as mgr:
        for name in ("best_model", periodic(1), periodic(2)):
            mgr.save(train_state(1), name=name)
    before = {name: (directory / name).read_bytes() for name in files(directory)}
    monkeypatch.setattr(ckptio.writer.psutil, "disk_usage", FixedFreeSpace(free=2 * MiB))

    with caplog.at_level(logging.WARNING, logger="ckptio"), manager(directory, min_free="10MB") as mgr:
        future = mgr.save(train_state(3), name=periodic(3))
        mgr.wait()  # does not raise: on_no_space="skip" is the default
        assert future is not None and future.result() is None
        assert mgr.stats.skipped_no_space == 1
        assert mgr.stats.committed == 0 and mgr.stats.failed == 0

    assert f"skipped saving {directory / periodic(3)}.pth" in caplog.text
    assert "min_free" in caplog.text
    # Deleting periodic(1) would not have made enough room: it is kept, as is everything else.
    assert {name: (directory / name).read_bytes() for name in files(directory)} == before
    assert not temp_names(directory)
    assert ckptio.verify(directory).ok


def test_min_free_with_on_no_space_raise_surfaces_insufficient_space_on_the_next_wait(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ckptio.writer.psutil, "disk_usage", FixedFreeSpace(free=MiB))
    directory = tmp_path / "run"
    mgr = manager(directory, min_free="1GB", on_no_space="raise")
    try:
        mgr.save(train_state(1), name=periodic(1))
        with pytest.raises(CheckpointWriteError, match=r"min_free") as raised:
            mgr.wait()
        assert isinstance(raised.value.__cause__, InsufficientSpaceError)
        assert raised.value.__cause__.errno == errno.ENOSPC
        assert mgr.stats.skipped_no_space == 0
        # Room appears again: the manager goes on saving.
        monkeypatch.setattr(ckptio.writer.psutil, "disk_usage", FixedFreeSpace(free=10**12))
        mgr.save(train_state(2), name=periodic(2))
        mgr.wait()
    finally:
        mgr.close()
    assert files(directory) == {f"{periodic(2)}.pth"}


# -- a write that runs out of space ----------------------------------------------------------------------------


@pytest.mark.parametrize("on_no_space", ["skip", "raise"])
def test_a_write_failing_with_enospc_removes_its_temp_file_and_keeps_older_checkpoints(tmp_path, monkeypatch,
                                                                                      on_no_space) -> None:
    seen_temp_files: list[list[str]] = []
    real_write_torch = ckptio.formats.write_torch

    def disk_fills_up(snapshot: Any, stream: Any) -> None:
        if snapshot.summary.get("batch") != 2:
            return real_write_torch(snapshot, stream)
        stream.write(b"\0" * (64 * 1024))
        seen_temp_files.append(temp_names(tmp_path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckptio.formats, "write_torch", disk_fills_up)
    with manager(tmp_path, on_no_space=on_no_space, keep_count=1) as mgr:
        mgr.save(train_state(1), name=periodic(1))
        mgr.wait()
        future = mgr.save(train_state(2), name=periodic(2))
        if on_no_space == "raise":
            with pytest.raises(CheckpointWriteError, match=r"No space left on device") as raised:
                mgr.wait()
            assert isinstance(raised.value.__cause__, OSError) and raised.value.__cause__.errno == errno.ENOSPC
        else:
            mgr.wait()
            assert future is not None and future.result() is None
            assert mgr.stats.skipped_no_space == 1
        assert seen_temp_files and seen_temp_files[0], "the failing write had a temporary file"
        assert not temp_names(tmp_path)
        assert files(tmp_path) == {f"{periodic(1)}.pth"}
        mgr.save(train_state(3), name=periodic(3))  # training goes on
        mgr.wait()
    assert files(tmp_path) == {f"{periodic(3)}.pth"}
    assert ckptio.verify(tmp_path).ok


EFBIG_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    import ckptio

    # A file size limit: writing past it fails with EFBIG (SIGXFSZ ignored), as a full volume fails with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    small = {"epoch": 1, "batch": 1, "w": torch.rand(100, generator=torch.Generator().manual_seed(1))}
    large = {"epoch": 1, "batch": 2, "w": torch.rand(limit // 2, generator=torch.Generator().manual_seed(2))}
    for fmt in ("torch", "safetensors"):
        for compression in (None, "zstd"):
            for on_no_space in ("skip", "raise"):
                directory = Path(sys.argv[1]) / f"{fmt}-{compression}-{on_no_space}"
                report = {"directory": directory.name}
                with ckptio.CheckpointManager(directory, format=fmt, compression=compression,
                                              on_no_space=on_no_space, fsync=False) as mgr:
                    mgr.save(small, name="checkpoint_epoch_1_batch_1")
                    mgr.wait()
                    future = mgr.save(large, name="checkpoint_epoch_1_batch_2")
                    try:
                        mgr.wait()
                        report["result"] = repr(future.result())
                    except ckptio.CheckpointWriteError as exc:
                        report["error"] = str(exc)
                        report["errno"] = getattr(exc.__cause__, "errno", None)
                    report["skipped_no_space"] = mgr.stats.skipped_no_space
                    report["committed"] = mgr.stats.committed
                print(json.dumps(report), flush=True)
    print("done", flush=True)
""")


@pytest.fixture(scope="module")
def efbig_run(tmp_path_factory) -> tuple[Path, dict[str, dict[str, Any]], subprocess.CompletedProcess[str]]:
    """One child process saves a small then a too-large checkpoint under RLIMIT_FSIZE, for every combination."""
    root = tmp_path_factory.mktemp("efbig")
    script = root / "child.py"
    script.write_text(EFBIG_CHILD)
    result = subprocess.run([sys.executable, str(script), str(root), str(256 * 1024)], cwd=root,
                            capture_output=True, text=True, timeout=120, check=False)
    reports = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            reports[doc["directory"]] = doc
    return root, reports, result


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_efbig_from_a_file_size_limit_skips_the_save_reports_it_and_keeps_the_older_checkpoint(efbig_run, fmt,
                                                                                              compression) -> None:
    root, reports, result = efbig_run
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("done")
    directory = root / f"{fmt}-{compression}-skip"
    report = reports[directory.name]
    suffix = SUFFIXES[fmt, compression]

    assert report == {"directory": directory.name, "result": "None", "skipped_no_space": 1, "committed": 1}
    assert f"skipped saving {directory / periodic(2)}{suffix}: File too large" in result.stderr
    assert files(directory) == {f"{periodic(1)}{suffix}"}
    assert not temp_names(directory)
    assert ckptio.verify(directory / f"{periodic(1)}{suffix}").ok
    assert ckptio.load(directory / f"{periodic(1)}{suffix}")["batch"] == 1


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_efbig_with_on_no_space_raise_surfaces_a_write_error_on_the_next_wait(efbig_run, fmt, compression) -> None:
    root, reports, result = efbig_run
    assert result.returncode == 0, result.stderr
    directory = root / f"{fmt}-{compression}-raise"
    report = reports[directory.name]
    suffix = SUFFIXES[fmt, compression]

    assert report["errno"] == errno.EFBIG
    assert f"{periodic(2)}{suffix} failed" in report["error"]
    assert "File too large" in report["error"]
    assert files(directory) == {f"{periodic(1)}{suffix}"}
    assert not temp_names(directory)
    assert ckptio.verify(directory).ok


# -- one writer per directory ----------------------------------------------------------------------------------


def test_a_second_manager_on_the_same_directory_gets_a_clear_lock_error_until_the_first_closes(tmp_path) -> None:
    first = manager(tmp_path)
    try:
        with pytest.raises(CheckpointDirectoryLockedError, match=rf"{os.getpid()}") as raised:
            manager(tmp_path, keep_count=1)
        message = str(raised.value)
        assert str(tmp_path) in message and "another checkpoint manager" in message
        assert "choose another directory" in message
        first.save(train_state(1), name=periodic(1))  # the first one is not disturbed
        first.wait()
    finally:
        first.close()
    with manager(tmp_path) as second:
        second.save(train_state(2), name=periodic(2))
    assert files(tmp_path) == {f"{periodic(1)}.pth", f"{periodic(2)}.pth"}


LOCK_HOLDER = textwrap.dedent("""
    import sys
    import ckptio
    with ckptio.CheckpointManager(sys.argv[1], fsync=False) as mgr:
        print("locked", flush=True)
        sys.stdin.read()  # hold the directory until the parent closes our stdin
    print("released", flush=True)
""")


def test_a_manager_in_another_process_locks_the_directory_with_a_clear_message(tmp_path) -> None:
    directory = tmp_path / "run"
    script = tmp_path / "holder.py"
    script.write_text(LOCK_HOLDER)
    with subprocess.Popen([sys.executable, str(script), str(directory)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(CheckpointDirectoryLockedError, match=rf"process {holder.pid}\b") as raised:
                CheckpointManager(directory)
            assert str(directory) in str(raised.value)
            assert "already being written by another checkpoint manager" in str(raised.value)
            holder.stdin.close()
            assert holder.stdout.readline().strip() == "released"
            assert holder.wait(timeout=60) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
    with manager(directory, async_save=False) as mgr:  # free again once the holder is gone
        mgr.save(train_state(1), name=periodic(1))
    assert files(directory) == {f"{periodic(1)}.pth"}


# -- zstd ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_zstd_files_get_a_zst_suffix_and_load_transparently(tmp_path, fmt) -> None:
    state = train_state(3)
    with manager(tmp_path, format=fmt, compression="zstd") as mgr:
        mgr.save(state, name=periodic(3))
        mgr.wait()
        path = mgr.path_for(periodic(3))
    suffix = ".pth.zst" if fmt == "torch" else ".safetensors.zst"

    assert files(tmp_path) == {periodic(3) + suffix}
    assert path.name == periodic(3) + suffix
    # zstd frames, led and followed by skippable frames that any zstd decoder passes over
    assert b"\x28\xb5\x2f\xfd" in path.read_bytes()[:32]
    plain = zstandard.ZstdDecompressor().stream_reader(path.read_bytes(), read_across_frames=True).read()
    assert plain[:4] == (b"PK\x03\x04" if fmt == "torch" else plain[:4])
    loaded = ckptio.load(path)
    assert {k: loaded[k] for k in ("epoch", "batch", "total_batches", "train_loss", "cls_loss", "geo_loss")} == {
        k: state[k] for k in ("epoch", "batch", "total_batches", "train_loss", "cls_loss", "geo_loss")}
    assert torch.equal(loaded["padding"], state["padding"])
    for key, tensor in state["model_state_dict"].items():
        assert torch.equal(loaded["model_state_dict"][key], tensor)
    seal, _ = ckptio.read_meta(path)
    assert seal is not None and seal.meta["compression"] == "zstd" and seal.meta["format"] == fmt
    assert ckptio.verify(path).ok


def zero_state(batch: int) -> dict[str, Any]:
    """What compresses past 1024x: zero-initialised weights (8 MiB), fresh optimizer moments, a sparse embedding."""
    embedding = torch.zeros(512, 1024)
    embedding[batch, :4] = 1.0
    return {"epoch": 1, "batch": batch,
            "model_state_dict": {"lora.weight": torch.zeros(2**21), "embedding": embedding},
            "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(2**18), "step": torch.tensor(0.0)}}}}


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_a_state_of_zeros_that_compresses_past_1024x_saves_verifies_loads_and_slims(tmp_path, capsys, fmt,
                                                                                    compression) -> None:
    with manager(tmp_path, format=fmt, compression=compression, keep_full=1) as mgr:
        for batch in (1, 2):
            mgr.save(zero_state(batch), name=periodic(batch))
            mgr.wait()
        slimmed, newest = mgr.path_for(periodic(1)), mgr.path_for(periodic(2))
    if compression == "zstd":
        assert newest.stat().st_size * MAX_ZSTD_EXPANSION < 10 * MiB  # past the expansion limit of unsealed files

    assert ckptio.verify(tmp_path).ok
    assert ckptio.cli.main(["info", str(newest)]) == 0
    loaded = ckptio.load(newest)
    for key, tensor in zero_state(2)["model_state_dict"].items():
        assert torch.equal(loaded["model_state_dict"][key], tensor)
    assert torch.equal(loaded["optimizer_state_dict"]["state"][0]["exp_avg"], torch.zeros(2**18))
    assert ckptio.slim.is_slim(ckptio.read_meta(slimmed)[0].meta)
    assert set(ckptio.load(slimmed)) == {"epoch", "batch", "model_state_dict"}
    capsys.readouterr()


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_safetensors_state_whose_header_passes_16_mib_is_written_and_loads_back(tmp_path, compression) -> None:
    """20,000 tensors with 500-character names: a ~22 MB header, as 100,000 tensors with 100-character ones."""
    prefix = "encoder." * 60
    state = {"model_state_dict": {f"{prefix}{i:05}.weight": torch.full((1,), float(i)) for i in range(20_000)}}
    with manager(tmp_path, format="safetensors", compression=compression) as mgr:
        saved = mgr.save(state, name="big").result()

    assert (saved.meta["raw_size"] or saved.size) > 16 * MiB  # almost all of it header
    loaded = ckptio.load(saved.path)["model_state_dict"]
    assert len(loaded) == 20_000 and torch.equal(loaded[f"{prefix}12345.weight"], torch.tensor([12345.0]))
    assert ckptio.verify(saved.path).ok


def test_zstd_files_are_counted_by_keep_count_and_the_disk_budget(tmp_path) -> None:
    with manager(tmp_path, compression="zstd", keep_count=2, disk_budget="1GB") as mgr:
        mgr.save(train_state(0), name="best_model")
        for batch in range(1, 5):
            mgr.save(train_state(batch), name=periodic(batch))
        mgr.wait()
    assert files(tmp_path) == {"best_model.pth.zst", f"{periodic(3)}.pth.zst", f"{periodic(4)}.pth.zst"}


# -- a full disk in every format, and what retention may delete ------------------------------------------------


def open_temp_files() -> list[str]:
    """Targets of this process's descriptors that are (or were) ckptio temporary files."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if TEMP_SUFFIX in target:
                found.append(target)
    return found


class FillingFileIO(io.FileIO):
    """A file on a volume with ``room`` bytes left: a write beyond it fails with ENOSPC, as the kernel's does."""

    room = 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > FillingFileIO.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FillingFileIO.room -= size
        return super().write(data)


@pytest.fixture
def small_volume(monkeypatch) -> Iterator[None]:
    """Every file ckptio opens for writing behaves as if the volume had 64 KiB left."""
    real_fdopen = os.fdopen

    def fdopen(fd: int, mode: str = "r", buffering: int = -1, **kwargs: Any) -> Any:
        if mode != "wb":
            return real_fdopen(fd, mode, buffering, **kwargs)
        FillingFileIO.room = 64 * 1024
        return io.BufferedWriter(FillingFileIO(fd, "w"), buffering if buffering > 0 else io.DEFAULT_BUFFER_SIZE)

    monkeypatch.setattr(ckptio.atomic.os, "fdopen", fdopen)
    yield


@pytest.fixture
def ext4_volume(tmp_path) -> Iterator[Path]:
    """A real 32 MiB ext4 volume (a loop mount: needs root), where a full disk behaves as on a training node."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not os.path.exists("/dev/loop-control"):
        pytest.skip("a loop-mounted ext4 volume needs root and mkfs.ext4")
    image, mount = tmp_path / "volume.img", tmp_path / "volume"
    with open(image, "wb") as out:
        out.truncate(32 * MiB)
    mount.mkdir()
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, check=False, timeout=60)
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(mount)],
                                                      capture_output=True, check=False, timeout=60).returncode == 0
    if not mounted:
        pytest.skip("could not mount a loop ext4 volume here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False, timeout=60)


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_a_full_disk_is_reported_as_enospc_in_every_format_and_skipped(tmp_path, small_volume, fmt,
                                                                      compression) -> None:
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        future = mgr.save(state(1, elements=MiB), name=periodic(1))
        mgr.wait()
        assert future is not None and future.result() is None
        assert mgr.stats.skipped_no_space == 1 and mgr.stats.failed == 0
    assert visible(tmp_path) == set() and temp_names(tmp_path) == []


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_with_on_no_space_raise_the_error_is_enospc_and_the_failed_file_is_closed_at_once(tmp_path, small_volume,
                                                                                         fmt, compression) -> None:
    with CheckpointManager(tmp_path, format=fmt, compression=compression, on_no_space="raise") as mgr:
        mgr.save(state(1, elements=MiB), name=periodic(1))
        with pytest.raises(CheckpointWriteError) as raised:
            mgr.wait()
        assert isinstance(raised.value.__cause__, OSError) and raised.value.__cause__.errno == errno.ENOSPC
        assert open_temp_files() == []  # its blocks are freed now, not when the error is collected
    assert temp_names(tmp_path) == []


def test_positioned_writes_put_every_byte_down_even_when_the_os_writes_part_of_them(tmp_path,
                                                                                   monkeypatch) -> None:
    real_pwrite = os.pwrite
    monkeypatch.setattr(ckptio.atomic.os, "pwrite", lambda fd, data, offset: real_pwrite(fd, bytes(data)[:3], offset))
    for fmt in ("torch", "safetensors"):
        with CheckpointManager(tmp_path / fmt, format=fmt, async_save=False) as mgr:
            mgr.save(state(1), name=periodic(1))
        assert ckptio.verify(tmp_path / fmt).ok
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        ckptio.atomic.write_all_at(fd, b"0123456789", 0)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789"


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_on_a_real_ext4_volume_a_full_disk_skips_the_save_in_every_format(ext4_volume, fmt, compression) -> None:
    directory = ext4_volume / "ck"
    with CheckpointManager(directory, format=fmt, compression=compression, fsync=False) as mgr:
        results = []
        for batch in range(1, 5):  # 12 MB each (random floats do not compress): the third cannot fit
            results.append(mgr.save(state(batch, elements=3_000_000), name=periodic(batch)))
            mgr.wait()
        assert mgr.stats.failed == 0 and mgr.stats.skipped_no_space >= 2
    assert [f.result() is not None for f in results][:2] == [True, True]
    assert temp_names(directory) == []
    assert ckptio.verify(directory).ok


def test_on_a_real_ext4_volume_on_no_space_raise_frees_the_failed_files_blocks_at_once(ext4_volume) -> None:
    directory = ext4_volume / "ck"
    with CheckpointManager(directory, on_no_space="raise", fsync=False) as mgr:
        mgr.save(state(1, elements=3_000_000), name=periodic(1))
        mgr.save(state(2, elements=3_000_000), name=periodic(2))
        mgr.wait()
        free_before = shutil.disk_usage(ext4_volume).free
        mgr.save(state(3, elements=3_000_000), name=periodic(3))
        with pytest.raises(CheckpointWriteError) as raised:
            mgr.wait()
        assert raised.value.__cause__.errno == errno.ENOSPC
        assert open_temp_files() == []
        assert shutil.disk_usage(ext4_volume).free >= free_before - 64 * 1024


@pytest.mark.parametrize("policy", [{"keep_count": 1}, {"disk_budget": 1}])
def test_retention_never_deletes_pretrained_weights_or_a_hand_saved_final(tmp_path, policy) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "vgg16_pretrained.pth")
    with CheckpointManager(tmp_path, **policy) as mgr:
        mgr.save(state(1), name="final")
        for batch in (1, 2, 3):
            mgr.save(state(batch), name=periodic(batch))
            mgr.wait()
    assert visible(tmp_path) == {"vgg16_pretrained.pth", "final.pth", f"{periodic(3)}.pth"}
