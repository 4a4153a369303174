"""ckptio.dcp: torch.distributed.checkpoint saves through our Writer and loads through our Reader with digests
checked on every read, atomic directory commits, sweeping of crashed saves, and the CLI on DCP directories.

The single-process tests run DCP without a process group (``no_dist``); the multi-process ones start real ranks
(FSDP2 on CPU, gloo) through ``tests/dcp_worker.py``.
"""

from __future__ import annotations

import fcntl
import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import assert_same
from torch.distributed.checkpoint.api import CheckpointException

import ckptio
import ckptio.dcp
from ckptio.cli import main as cli_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(13, 7, generator=generator), "b": torch.randn(7, generator=generator).bfloat16(),
                  "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "mask": torch.tensor([True, False])},
        "step": 12, "name": "run-a", "lrs": [0.1, 0.01],
    }


def _blank() -> dict[str, Any]:
    state = _state()
    state["model"] = {key: torch.zeros_like(value) for key, value in state["model"].items()}
    state.update(step=0, name="", lrs=[0.0, 0.0])
    return state


def _save(path: Path, state: dict[str, Any] | None = None, **options: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state or _state(), storage_writer=ckptio.dcp.Writer(path, **options), no_dist=True)


def _load(path: Path, **options: Any) -> dict[str, Any]:
    state = _blank()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=ckptio.dcp.Reader(path, **options), no_dist=True)
    return state


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _offset_of(path: Path, fqn: str) -> int:
    storage = ckptio.dcp.open_directory(path).metadata.storage_data
    return next(info["offset"] for index, info in storage.items() if index.fqn == fqn)


def _cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_state_saved_through_the_writer_loads_back_bit_for_bit_and_verifies(tmp_path: Path,
                                                                                compression: str | None) -> None:
    _save(tmp_path / "ckpt", compression=compression)
    assert_same(_load(tmp_path / "ckpt"), _state())
    check = ckptio.dcp.verify_directory(tmp_path / "ckpt")
    assert check.status == "verified" and check.items == 8
    # Nothing but the committed directory: the staging directory was renamed into place, its lock removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".ckptio-seal.json", ".metadata",
                                                                      "__0_0.distcp"]


def test_zstd_makes_compressible_state_smaller(tmp_path: Path) -> None:
    state = {"zeros": torch.zeros(100_000)}
    _save(tmp_path / "raw", state)
    _save(tmp_path / "zstd", state, compression="zstd")
    raw, packed = ((tmp_path / d / "__0_0.distcp").stat().st_size for d in ("raw", "zstd"))
    assert packed < raw / 50


def test_a_flipped_byte_is_named_with_its_file_and_item_by_load_verify_and_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "checkpoint_epoch_1_batch_1")
    _save(tmp_path / "checkpoint_epoch_1_batch_2")
    data = tmp_path / "checkpoint_epoch_1_batch_2" / "__0_0.distcp"
    _flip(data, _offset_of(tmp_path / "checkpoint_epoch_1_batch_2", "model.w") + 17)
    with pytest.raises(CheckpointException, match=r"__0_0\.distcp: item 'model\.w'.*digest mismatch"):
        _load(tmp_path / "checkpoint_epoch_1_batch_2")
    check = ckptio.dcp.verify_directory(tmp_path / "checkpoint_epoch_1_batch_2")
    assert check.status == "corrupt" and "model.w" in check.reason and str(data) in check.reason
    code, out = _cli("verify", str(tmp_path), capsys=capsys)
    assert code == 1
    assert "checkpoint_epoch_1_batch_2/: corrupt" in out and "__0_0.distcp: item 'model.w'" in out
    assert "checkpoint_epoch_1_batch_1/: verified" in out
    assert_same(_load(tmp_path / "checkpoint_epoch_1_batch_1"), _state())  # the previous one still loads


def test_a_truncated_data_file_is_named_before_any_item_is_read(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "ckpt")
    data = tmp_path / "ckpt" / "__0_0.distcp"
    os.truncate(data, data.stat().st_size - 10)
    with pytest.raises(CheckpointException, match=r"__0_0\.distcp: .* the file is truncated"):
        _load(tmp_path / "ckpt")
    code, out = _cli("verify", str(tmp_path / "ckpt"), capsys=capsys)
    assert code == 1 and "__0_0.distcp" in out and "truncated" in out


def test_damaged_metadata_is_refused_by_its_digest(tmp_path: Path) -> None:
    _save(tmp_path / "ckpt")
    _flip(tmp_path / "ckpt" / ".metadata", 40)
    with pytest.raises(ckptio.CorruptCheckpointError, match=r"\.metadata: digest mismatch"):
        ckptio.dcp.open_directory(tmp_path / "ckpt")


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned > pwned.txt",))


def test_planted_metadata_that_would_run_code_is_refused_without_running_it(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".ckptio-seal.json").unlink()  # a plain directory: no digest to stop it first
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckptio.CorruptCheckpointError, match="posix.system is not part of DCP metadata"):
        ckptio.dcp.open_directory(tmp_path / "ckpt")
    assert not (tmp_path / "pwned.txt").exists()


def test_pickled_objects_a_weights_only_load_refuses_need_trusted(tmp_path: Path) -> None:
    state = {"w": torch.ones(2), "extra": io.StringIO("not plain data")}
    _save(tmp_path / "ckpt", state)
    target = {"w": torch.zeros(2), "extra": None}
    with pytest.raises(CheckpointException, match="item 'extra'.*trusted=True"):
        dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path / "ckpt"), no_dist=True)
    dcp.load(target, storage_reader=ckptio.dcp.Reader(tmp_path / "ckpt", trusted=True), no_dist=True)
    assert target["extra"].getvalue() == "not plain data"


def test_a_plain_filesystemwriter_directory_loads_through_the_reader_and_is_reported_unsealed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(), checkpoint_id=tmp_path / "plain", no_dist=True)
    assert_same(_load(tmp_path / "plain"), _state())
    assert ckptio.dcp.verify_directory(tmp_path / "plain").status == "unsealed"
    code, out = _cli("verify", str(tmp_path / "plain"), capsys=capsys)
    assert code == 0 and "plain/: unsealed" in out
    code, out = _cli("info", str(tmp_path / "plain"), capsys=capsys)
    assert code == 0 and "plain DCP" in out and "5 tensors" in out


def test_saving_over_an_existing_checkpoint_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    _save(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    with pytest.raises(CheckpointException, match="already exists"):
        _save(tmp_path / "ckpt", {"other": torch.ones(1)})
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


class _CrashAtCommit(ckptio.dcp.Writer):
    """Stops where a crash between the last data write and the rename would: everything written, nothing renamed."""

    def finish(self, metadata: Any, results: Any) -> None:
        raise OSError("crash at commit")


def test_a_save_interrupted_before_its_commit_leaves_no_checkpoint_and_a_leftover_that_clean_sweeps(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "checkpoint_epoch_1_batch_1")
    writer = _CrashAtCommit(tmp_path / "checkpoint_epoch_1_batch_2")
    with pytest.raises(CheckpointException, match="crash at commit"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(), storage_writer=writer, no_dist=True)
    assert not (tmp_path / "checkpoint_epoch_1_batch_2").exists()
    [staging] = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not ckptio.dcp.is_dcp_directory(staging)
    # While the writer lives it holds the staging lock: a save in flight is never swept.
    assert ckptio.dcp.dcp_leftovers(tmp_path) == []
    code, out = _cli("clean", str(tmp_path), "--keep-count", "5", capsys=capsys)
    assert code == 0 and staging.exists()
    writer.reset()  # what the next save (or the writer's end) does: the lock goes, the leftover is a leftover
    assert ckptio.dcp.dcp_leftovers(tmp_path) == [staging]
    code, out = _cli("clean", str(tmp_path), "--keep-count", "5", capsys=capsys)
    assert code == 0 and "a DCP save that never committed" in out and not staging.exists()
    assert_same(_load(tmp_path / "checkpoint_epoch_1_batch_1"), _state())


def test_a_staging_directory_whose_lock_is_held_by_another_process_is_not_swept(tmp_path: Path) -> None:
    staging = tmp_path / ".ckpt.1.0123456789abcdef.ckptio-tmp"
    staging.mkdir()
    (staging / "__0_0.distcp").write_bytes(b"partial")
    lock = staging / ckptio.dcp.WRITING_LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(lock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert ckptio.dcp.remove_dcp_leftovers(tmp_path) == [] and staging.exists()
    finally:
        holder.communicate("", timeout=60)
    assert ckptio.dcp.remove_dcp_leftovers(tmp_path) == [staging] and not staging.exists()
    assert fcntl  # the holder used flock, as the writer does


def test_clean_applies_keep_count_to_dcp_directories_and_keeps_the_newest_valid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for batch in (1, 2, 3):
        _save(tmp_path / f"checkpoint_epoch_1_batch_{batch}")
        os.utime(tmp_path / f"checkpoint_epoch_1_batch_{batch}" / ".ckptio-seal.json", ns=(batch * 10**9,) * 2)
    _save(tmp_path / "best_model")
    newest = tmp_path / "checkpoint_epoch_1_batch_3" / "__0_0.distcp"
    _flip(newest, 0)
    os.utime(newest, ns=(3 * 10**9,) * 2)
    code, out = _cli("clean", str(tmp_path), "--keep-count", "1", capsys=capsys)
    assert code == 0, out
    # batch 3 is kept by the count but corrupt; batch 2, the newest valid, is kept for a resume; batch 1 goes.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "best_model", "checkpoint_epoch_1_batch_2", "checkpoint_epoch_1_batch_3"]


def test_list_and_info_show_dcp_directories_with_their_integrity(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "checkpoint_epoch_1_batch_1", compression="zstd")
    code, out = _cli("list", str(tmp_path), capsys=capsys)
    assert code == 0 and "checkpoint_epoch_1_batch_1/" in out and "unverified" in out
    assert _cli("verify", str(tmp_path), capsys=capsys)[0] == 0
    code, out = _cli("list", str(tmp_path), "--json", capsys=capsys)
    assert code == 0 and '"integrity": "verified"' in out
    code, out = _cli("info", str(tmp_path / "checkpoint_epoch_1_batch_1"), capsys=capsys)
    assert code == 0 and "ckptio DCP" in out and "compression: zstd" in out and "xxh3_128 per item" in out


def test_async_save_through_the_writer_commits_when_its_future_completes(tmp_path: Path) -> None:
    writer = ckptio.dcp.Writer(tmp_path / "ckpt", cache_staged_state_dict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        future = dcp.async_save(_state(), storage_writer=writer, no_dist=True)
        future.result(timeout=300)
        writer.reset(tmp_path / "ckpt2")
        dcp.async_save(_state(), storage_writer=writer, no_dist=True).result(timeout=300)
    for name in ("ckpt", "ckpt2"):
        assert ckptio.dcp.verify_directory(tmp_path / name).status == "verified"
        assert_same(_load(tmp_path / name), _state())


def test_invalid_writer_settings_say_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use None or 'zstd'"):
        ckptio.dcp.Writer(tmp_path / "x", compression="gzip")
    with pytest.raises(ValueError, match="zstd level"):
        ckptio.dcp.Writer(tmp_path / "x", compression="zstd", level=0)


# -- several processes: FSDP2 on CPU with gloo ----------------------------------------------------------------

WORKER = Path(__file__).resolve().parent / "dcp_worker.py"
RANK_TIMEOUT = 400  # generous: a busy 2-core machine starts each rank's interpreter and torch slowly


def _start(action: str, world: int, directory: Path, tag: str,
           started: list[subprocess.Popen[str]], *extra: str) -> list[subprocess.Popen[str]]:
    rendezvous = directory / f"rendezvous-{tag}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")])}
    ranks = [subprocess.Popen([sys.executable, str(WORKER), action, str(rank), str(world), str(rendezvous),
                               str(directory), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(world)]
    started += ranks
    return ranks


def _finish(ranks: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    results = []
    try:
        for rank in ranks:
            out, _ = rank.communicate(timeout=RANK_TIMEOUT)
            results.append((rank.returncode, out))
    finally:
        for rank in ranks:  # never leave a rank behind, whatever failed
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    return results


@pytest.mark.slow
def test_fsdp2_state_saved_by_two_processes_loads_bit_for_bit_at_one_two_and_three_and_a_killed_rank_commits_nothing(
        tmp_path: Path) -> None:
    started: list[subprocess.Popen[str]] = []
    try:
        _check_save_load_crash_and_manager(tmp_path, started)
    finally:  # an assertion that fails early must not leave the other groups' ranks running
        for rank in started:
            if rank.poll() is None:
                rank.kill()
                rank.wait()


def _check_save_load_crash_and_manager(tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    saved = _finish(_start("save", 2, tmp_path, "save", started))
    assert all(code == 0 for code, _ in saved), saved
    assert ckptio.dcp.verify_directory(tmp_path / "ckpt").status == "verified"

    # Loads at 1, 2 and 3 processes (uneven shards of rows 7, 5 and 3) and the crashing save, side by side.
    loads = {world: _start("load", world, tmp_path, f"load{world}", started) for world in (1, 2, 3)}
    crash = _start("crash", 2, tmp_path, "crash", started)
    managed = _start("manage", 2, tmp_path, "manage", started)
    for world, ranks in loads.items():
        results = _finish(ranks)
        assert all(code == 0 for code, _ in results), (world, results)
        assert f"loaded bit for bit at {world} process(es)" in results[0][1]
    results = _finish(managed)
    assert all(code == 0 for code, _ in results) and "managed: ['checkpoint_epoch_1_batch_2']" in results[0][1], results
    # The manager's checkpoint (staged in its slots, written by its writer, committed by rank 0 without a
    # collective) loads resharded at 1 and 3 processes and passes the CLI's verify.
    managed_ckpt = "managed/checkpoint_epoch_1_batch_2"
    reloads = {world: _start("load", world, tmp_path, f"reload{world}", started, managed_ckpt, "expected-managed.pt")
               for world in (1, 3)}
    for world, ranks in reloads.items():
        results = _finish(ranks)
        assert all(code == 0 for code, _ in results) and "bit for bit" in results[0][1], (world, results)
    assert cli_main(["verify", str(tmp_path / managed_ckpt)]) == 0
    crashed = _finish(crash)
    assert crashed[1][0] == -9, crashed  # rank 1 died by SIGKILL mid-save
    assert crashed[0][0] != 0, crashed  # and rank 0's save failed instead of committing

    assert not (tmp_path / "crashed").exists()
    leftovers = ckptio.dcp.dcp_leftovers(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".crashed.")
    assert ckptio.dcp.remove_dcp_leftovers(tmp_path) == leftovers and not leftovers[0].exists()
    assert ckptio.dcp.verify_directory(tmp_path / "ckpt").status == "verified"  # the previous one is intact
    for path in tmp_path.iterdir():  # the checkpoints are small, but leave nothing that outlives the test run
        if path.is_file():
            path.unlink()


# -- ShardedCheckpointManager (one process) --------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [True, False])
def test_manager_keeps_the_newest_periodic_directories_and_never_best_model(tmp_path: Path,
                                                                           async_save: bool) -> None:
    from ckptio.dcp_manager import ShardedCheckpointManager

    with ShardedCheckpointManager(tmp_path, keep_count=2, async_save=async_save) as manager:
        for batch in range(1, 5):
            state = _state()
            state["step"] = batch
            manager.save(state, name=f"checkpoint_epoch_1_batch_{batch}")
            # The save in flight is a hidden staging directory, never a checkpoint that retention could delete.
            assert len(manager.checkpoints()) <= 3
        manager.save(_state(), name="best_model")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "best_model", "checkpoint_epoch_1_batch_3", "checkpoint_epoch_1_batch_4"]
    manager = ShardedCheckpointManager(tmp_path)
    state = _blank()
    assert manager.load(state, tmp_path / "checkpoint_epoch_1_batch_4").name == "checkpoint_epoch_1_batch_4"
    assert state["step"] == 4
    manager.close()


def test_manager_disk_budget_never_deletes_the_newest_committed_checkpoint(tmp_path: Path) -> None:
    from ckptio.dcp_manager import ShardedCheckpointManager

    with ShardedCheckpointManager(tmp_path, disk_budget=1, async_save=False) as manager:
        for batch in (1, 2):
            manager.save(_state(), name=f"checkpoint_epoch_1_batch_{batch}")
    assert [p.name for p in manager.checkpoints()] == ["checkpoint_epoch_1_batch_2"]


def test_manager_latest_skips_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    from ckptio.dcp_manager import ShardedCheckpointManager

    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(_state(), name="checkpoint_epoch_1_batch_1")
        manager.save(_state(), name="checkpoint_epoch_1_batch_2")
        data = tmp_path / "checkpoint_epoch_1_batch_2" / "__0_0.distcp"
        _flip(data, _offset_of(tmp_path / "checkpoint_epoch_1_batch_2", "model.w"))
        os.utime(data)
        assert manager.latest() == tmp_path / "checkpoint_epoch_1_batch_1"


def test_manager_raises_a_failed_background_save_on_the_next_call(tmp_path: Path) -> None:
    from ckptio.dcp_manager import ShardedCheckpointManager

    manager = ShardedCheckpointManager(tmp_path)
    manager.save(_state(), name="checkpoint_epoch_1_batch_1")
    manager.wait()
    (tmp_path / "checkpoint_epoch_1_batch_2").mkdir()  # the name is taken: that save must fail, loudly
    with pytest.raises(ckptio.CheckpointWriteError, match="already exists"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager.save(_state(), name="checkpoint_epoch_1_batch_2")
        manager.wait()
    manager.save(_state(), name="checkpoint_epoch_1_batch_3")  # the manager goes on
    manager.wait()
    assert ckptio.dcp.verify_directory(tmp_path / "checkpoint_epoch_1_batch_3").status == "verified"
    manager.close()
    with pytest.raises(ValueError, match="keep at least 1"):
        ShardedCheckpointManager(tmp_path, keep_count=0)


class _NameTakenMidSave(ckptio.dcp.Writer):
    """Someone creates an (empty) directory under the checkpoint's name while the ranks write."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        result = super().write_data(plan, planner)
        self.path.mkdir()
        return result


def test_a_directory_created_under_the_name_during_the_save_is_never_replaced(tmp_path: Path) -> None:
    with pytest.raises(CheckpointException, match="appeared while this checkpoint was written"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(), storage_writer=_NameTakenMidSave(tmp_path / "ckpt"), no_dist=True)
    assert list((tmp_path / "ckpt").iterdir()) == []
    # the commit itself refuses too (plain rename would replace an empty directory made after the last check)
    (tmp_path / "source").mkdir()
    with pytest.raises(FileExistsError):
        ckptio.dcp_writer._rename_no_replace(tmp_path / "source", tmp_path / "ckpt")
    assert (tmp_path / "source").is_dir() and list((tmp_path / "ckpt").iterdir()) == []


def test_manager_retention_and_start_up_sweep_leave_a_save_in_flight_alone(tmp_path: Path) -> None:
    from ckptio.dcp_manager import ShardedCheckpointManager

    in_flight = _CrashAtCommit(tmp_path / "checkpoint_epoch_9_batch_9")  # holds its staging lock, like a live save
    with pytest.raises(CheckpointException), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(), storage_writer=in_flight, no_dist=True)
    [staging] = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint_epoch_9_batch_9.")]
    with ShardedCheckpointManager(tmp_path, keep_count=1, disk_budget=1, async_save=False) as manager:
        for batch in (1, 2):
            manager.save(_state(), name=f"checkpoint_epoch_1_batch_{batch}")
    assert staging.is_dir()
    assert [p.name for p in manager.checkpoints()] == ["checkpoint_epoch_1_batch_2"]
    in_flight.reset()  # the save is over (it failed): its staging directory is now a leftover
    ShardedCheckpointManager(tmp_path).close()
    assert not staging.exists()
