"""The write side: whatever sits in a checkpoint directory, ckptio never writes outside it, never
truncates a file it did not create, reports a full disk as a full disk, leaves no leftovers, and deletes only
the periodic checkpoints its retention owns."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
import ckptio.atomic
import ckptio.dir_index
import ckptio.naming
from ckptio import CheckpointManager, CheckpointWriteError
from ckptio.atomic import TEMP_SUFFIX
from ckptio.naming import LOCK_NAME

COMBOS = [("torch", None), ("torch", "zstd"), ("safetensors", None), ("safetensors", "zstd")]
COMBO_IDS = ["pth", "pth.zst", "safetensors", "safetensors.zst"]
MiB = 2**20


def periodic(batch: int) -> str:
    return f"checkpoint_epoch_1_batch_{batch}"


def state(batch: int, elements: int = 1000) -> dict[str, Any]:
    return {"epoch": 1, "batch": batch, "w": torch.rand(elements, generator=torch.Generator().manual_seed(batch))}


def visible(directory: Path) -> set[str]:
    return {name for name in os.listdir(directory) if not name.startswith(".")}


def temp_names(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(TEMP_SUFFIX)]


def open_temp_files() -> list[str]:
    """Targets of this process's descriptors that are (or were) ckptio temporary files."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if TEMP_SUFFIX in target:
                found.append(target)
    return found


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory elsewhere holding a file that must never change."""
    directory = tmp_path_factory.mktemp("outside")
    (directory / "precious.txt").write_text("precious")
    return directory


# -- locks ------------------------------------------------------------------------------------------------------------


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


def test_an_index_lock_that_is_a_symlink_is_never_written_through_and_saves_still_succeed(tmp_path, outside) -> None:
    (tmp_path / ".ckptio-index.lock").symlink_to(outside / "precious.txt")
    with CheckpointManager(tmp_path, keep_count=1) as mgr:
        mgr.save(state(1), name=periodic(1))
        future = mgr.save(state(2), name=periodic(2))
        mgr.wait()
    assert future is not None and future.result() is not None
    assert visible(tmp_path) == {f"{periodic(2)}.pth"}
    assert (outside / "precious.txt").read_text() == "precious"


# -- temporary files --------------------------------------------------------------------------------------------------


def test_symlinks_planted_under_the_old_predictable_index_temp_name_are_never_written_through(tmp_path,
                                                                                             outside) -> None:
    with CheckpointManager(tmp_path, async_save=False) as mgr:  # planted once the manager swept leftovers
        (tmp_path / f".ckptio-index.json.{os.getpid()}{TEMP_SUFFIX}").symlink_to(outside / "precious.txt")
        mgr.save(state(1), name=periodic(1))
    assert (outside / "precious.txt").read_text() == "precious"
    assert ckptio.verify(tmp_path).ok


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


# -- every byte written or the real error raised ----------------------------------------------------------------------


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


def test_signals_arriving_all_through_a_save_do_not_lose_or_damage_it(tmp_path) -> None:
    ticks = []
    previous = signal.signal(signal.SIGALRM, lambda *_: ticks.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        for fmt, compression in COMBOS:
            with CheckpointManager(tmp_path / f"{fmt}-{compression}", format=fmt, compression=compression,
                                   async_save=False) as mgr:
                mgr.save(state(1, elements=4 * MiB), name=periodic(1))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert ticks, "no signal arrived during the saves"
    for fmt, compression in COMBOS:
        assert ckptio.verify(tmp_path / f"{fmt}-{compression}").ok


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


# -- the index (write side) ---------------------------------------------------------------------------------------


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


# -- orphan shard directories -----------------------------------------------------------------------------------------


def plant_orphan(directory: Path, name: str, size: int = 100_000) -> Path:
    shards = directory / f"{name}.shards"
    shards.mkdir(parents=True)
    (shards / "rank00001-of-00002.pth").write_bytes(b"\0" * size)
    return shards


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


# -- retention deletes only what it owns ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [{"keep_count": 1}, {"disk_budget": 1}])
def test_retention_never_deletes_pretrained_weights_or_a_hand_saved_final(tmp_path, policy) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "vgg16_pretrained.pth")
    with CheckpointManager(tmp_path, **policy) as mgr:
        mgr.save(state(1), name="final")
        for batch in (1, 2, 3):
            mgr.save(state(batch), name=periodic(batch))
            mgr.wait()
    assert visible(tmp_path) == {"vgg16_pretrained.pth", "final.pth", f"{periodic(3)}.pth"}


# -- refused up front, or stored as plain torch.save would ------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_thirty_emoji_strings_of_199_characters_fit_in_every_format(tmp_path, fmt, compression) -> None:
    emoji = {f"note{i}": "\N{GRINNING FACE}" * 199 for i in range(30)}
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        mgr.save({**state(1), **emoji}, name="c")
    loaded = ckptio.load(mgr.path_for("c"))
    assert {k: loaded[k] for k in emoji} == emoji
    summary = ckptio.read_meta(mgr.path_for("c"))[0].meta["summary"]
    assert len(json.dumps(summary)) <= 8192


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_a_name_too_long_for_its_temporary_file_is_refused_in_save_naming_the_limit(tmp_path, fmt,
                                                                                   compression) -> None:
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        with pytest.raises(ValueError, match=r"may be at most \d+ bytes"):
            mgr.save(state(1), name="n" * 230)
        with pytest.raises(ValueError) as refused:
            mgr.save(state(1), name="n" * 300)
        longest = int(str(refused.value).split("at most ")[1].split()[0])
        mgr.save(state(1), name="n" * longest)  # the limit itself works, in the background too
        mgr.wait()
    assert ckptio.verify(tmp_path).ok


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2])
def test_dtypes_safetensors_cannot_store_are_refused_in_save_pointing_to_the_torch_format(tmp_path, dtype) -> None:
    with CheckpointManager(tmp_path, format="safetensors") as mgr:
        with pytest.raises(ValueError, match="format='torch'"):
            mgr.save({"w": torch.zeros(16, dtype=torch.uint8).view(dtype)}, name="c")
        assert mgr.pending == 0
    with CheckpointManager(tmp_path / "torch", format="torch") as mgr:
        mgr.save({"w": torch.zeros(16, dtype=torch.uint8).view(dtype)}, name="c")
    assert ckptio.load(mgr.path_for("c"))["w"].dtype == dtype


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_two_distinct_empty_tensors_load_as_two_objects_and_one_shared_stays_shared(tmp_path, fmt,
                                                                                   compression) -> None:
    a, b = torch.zeros(0), torch.empty(0)
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        mgr.save({"a": a, "b": b, "again": a}, name="c")
    loaded = ckptio.load(mgr.path_for("c"))
    assert loaded["a"] is not loaded["b"]
    assert loaded["a"] is loaded["again"]


def test_open_lock_reuses_a_regular_lock_file_left_by_an_earlier_run(tmp_path) -> None:
    (tmp_path / LOCK_NAME).write_text("12345")
    fd = ckptio.atomic.open_lock(tmp_path / LOCK_NAME)
    os.close(fd)
    CheckpointManager(tmp_path).close()


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


def test_a_state_whose_safetensors_header_would_be_unreadable_is_refused_when_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptio.formats

    # 200 tensors need at least 25,200 header bytes and take ~38,000: over 30,000 only the exact header tells
    monkeypatch.setattr(ckptio.formats, "MAX_SAFETENSORS_HEADER", 30_000)  # 150,000 tensors would take minutes
    many = {f"layer{i:03}.weight_with_a_long_name": torch.zeros(1) for i in range(200)}
    with CheckpointManager(tmp_path, async_save=False, format="safetensors") as mgr:
        with pytest.raises(CheckpointWriteError, match="use format='torch'"):
            mgr.save(many, name="big")
    assert not list(tmp_path.glob("big*"))


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_torch_state_whose_zip_directory_would_be_unreadable_is_refused_before_it_is_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str | None) -> None:
    import ckptio.formats

    monkeypatch.setattr(ckptio.formats, "MAX_ZIP_DIRECTORY", 4096)  # 500,000 tensors would take minutes
    many = {f"layer{i:03}.weight": torch.zeros(1) for i in range(200)}  # ~60 bytes of directory each
    with CheckpointManager(tmp_path, async_save=False, compression=compression) as mgr:
        with pytest.raises(CheckpointWriteError, match="zip directory would be .* use format='safetensors'"):
            mgr.save(many, name="big")
        mgr.save({"w": torch.zeros(3)}, name="small")  # a state within the cap is still written
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "small.pth" + (".zst" if compression else "")]


def test_metadata_whose_trailer_would_cost_too_much_to_parse_is_refused_before_it_is_committed(
        tmp_path: Path) -> None:
    nested = {"runs": [{}] * 1_500_000}  # 4.5 MB of JSON, within the trailer's length, ~230 MiB to parse
    with CheckpointManager(tmp_path, async_save=False, compression="zstd", fsync=False) as mgr:
        with pytest.raises(CheckpointWriteError, match="metadata= nests too many"):
            mgr.save({"w": torch.zeros(3)}, name="meta", metadata=nested)
    assert not list(tmp_path.glob("meta*"))


def test_a_state_whose_safetensors_header_certainly_passes_the_cap_is_refused_in_save_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptio.formats

    monkeypatch.setattr(ckptio.formats, "MAX_SAFETENSORS_HEADER", 20_000)
    many = {f"layer{i:03}.weight_with_a_long_name": torch.zeros(1) for i in range(200)}
    with CheckpointManager(tmp_path, format="safetensors") as mgr:
        with pytest.raises(ValueError, match="use format='torch'") as refused:
            mgr.save(many, name="big")  # asynchronous: only a check in save() itself can raise here
        assert not isinstance(refused.value, CheckpointWriteError)
        assert mgr.stats.requested == 0
    assert not list(tmp_path.glob("big*"))
