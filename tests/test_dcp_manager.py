"""ShardedCheckpointManager (one process): best_model replaced atomically, min_free, and latest() as the one answer
to what ``--resume auto`` resumes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import ckptio
import ckptio.dcp
import ckptio.dcp_commit
import ckptio.dcp_manager
from ckptio.dcp_manager import ShardedCheckpointManager, latest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.full((64,), float(step)), "step": step}


def _step_in(path: Path) -> int:
    state = {"w": torch.zeros(64), "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=ckptio.dcp.Reader(path), no_dist=True)
    return state["step"]


@pytest.mark.parametrize("async_save", [True, False])
def test_best_model_saved_again_replaces_the_previous_one_and_leaves_nothing_hidden(tmp_path: Path,
                                                                                    async_save: bool) -> None:
    with ShardedCheckpointManager(tmp_path, keep_count=1, async_save=async_save) as manager:
        manager.save(_state(1), name="best_model")
        manager.save(_state(2), name="checkpoint_epoch_1_batch_2")
        manager.save(_state(3), name="best_model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model", "checkpoint_epoch_1_batch_2"]
    assert _step_in(tmp_path / "best_model") == 3
    assert ckptio.dcp.verify_directory(tmp_path / "best_model").ok


def test_a_replacement_that_crashed_before_its_swap_is_deleted_at_start_and_the_old_best_model_kept(
        tmp_path: Path) -> None:
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(_state(1), name="best_model")
    with warnings.catch_warnings():  # committed under its hidden name, then the process died
        warnings.simplefilter("ignore")
        dcp.save(_state(2), storage_writer=ckptio.dcp.Writer(tmp_path / ".best_model.next-ckptio"), no_dist=True)
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        assert not (tmp_path / ".best_model.next-ckptio").exists()
        assert _step_in(tmp_path / "best_model") == 1
        manager.save(_state(3), name="best_model")
    assert _step_in(tmp_path / "best_model") == 3


def test_min_free_deletes_the_oldest_periodic_checkpoints_never_the_newest_or_best_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        for batch in (1, 2, 3):
            manager.save(_state(batch), name=f"checkpoint_epoch_1_batch_{batch}")
        manager.save(_state(0), name="best_model")
    size = next(e.size for e in ckptio.dcp.checkpoint_entries(tmp_path))
    # A volume with room for the next save only once one old checkpoint is gone.
    monkeypatch.setattr(ckptio.dcp_manager, "_free_bytes", lambda _: 1000 - size // 2)
    with ShardedCheckpointManager(tmp_path, min_free=1000 - 256, async_save=False) as manager:
        manager.save(_state(4), name="checkpoint_epoch_1_batch_4")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best_model", "checkpoint_epoch_1_batch_2", "checkpoint_epoch_1_batch_3", "checkpoint_epoch_1_batch_4"]


def test_min_free_that_cannot_be_kept_refuses_the_save_and_deletes_nothing_needed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(_state(1), name="checkpoint_epoch_1_batch_1")
    monkeypatch.setattr(ckptio.dcp_manager, "_free_bytes", lambda _: 0)
    with ShardedCheckpointManager(tmp_path, min_free="1GB", async_save=False) as manager, \
            pytest.raises(ckptio.InsufficientSpaceError, match="lower min_free"):
        manager.save(_state(2), name="checkpoint_epoch_1_batch_2")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_epoch_1_batch_1"]


def test_latest_is_the_newest_directory_that_verifies_and_none_for_a_missing_directory(tmp_path: Path) -> None:
    assert latest(tmp_path / "missing") is None
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(_state(1), name="checkpoint_epoch_1_batch_1")
        manager.save(_state(2), name="checkpoint_epoch_1_batch_2")
    (tmp_path / "checkpoint_epoch_1_batch_2" / "__0_0.distcp").write_bytes(b"cut")
    assert latest(tmp_path) == tmp_path / "checkpoint_epoch_1_batch_1"


class _Crash(BaseException):
    """The process dying at this point: nothing after it runs."""


def test_a_crash_between_the_two_renames_of_a_swap_without_renameat2_keeps_a_best_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(_state(1), name="best_model")
    with warnings.catch_warnings():  # the replacement, committed under its hidden name
        warnings.simplefilter("ignore")
        dcp.save(_state(2), storage_writer=ckptio.dcp.Writer(tmp_path / ".best_model.next-ckptio"), no_dist=True)
    # A file system without RENAME_EXCHANGE (NFS): the old one is renamed aside first, then the process dies.
    def no_renameat2(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no glibc renameat2")

    monkeypatch.setattr(ckptio.atomic.ctypes, "CDLL", no_renameat2)
    renames = []
    real_rename = ckptio.dcp_commit.os.rename

    def rename_then_die(source: Any, target: Any) -> None:
        if renames:
            raise _Crash
        renames.append((source, target))
        real_rename(source, target)

    monkeypatch.setattr(ckptio.dcp_commit.os, "rename", rename_then_die)
    with pytest.raises(_Crash):
        ckptio.dcp_commit._swap_into_place(tmp_path / ".best_model.next-ckptio", tmp_path / "best_model")
    monkeypatch.undo()
    with ShardedCheckpointManager(tmp_path, async_save=False):  # the restarted run
        pass
    assert _step_in(tmp_path / "best_model") == 1  # the save was never reported committed: the old one is back
    assert [p.name for p in tmp_path.iterdir()] == ["best_model"]


def test_a_best_model_whose_swap_failed_does_not_block_the_next_best_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    swap = ckptio.dcp_commit._swap_into_place
    failures: list[OSError] = []

    def fails_once(new: Path, final: Path) -> None:
        if failures:
            raise failures.pop()
        swap(new, final)

    monkeypatch.setattr(ckptio.dcp_commit, "_swap_into_place", fails_once)
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(_state(1), name="best_model")
        failures.append(OSError(13, "Permission denied"))
        with pytest.raises(ckptio.CheckpointWriteError, match="Permission denied"):
            manager.save(_state(2), name="best_model")
        assert _step_in(tmp_path / "best_model") == 1
        manager.save(_state(3), name="best_model")
    assert _step_in(tmp_path / "best_model") == 3
    assert [p.name for p in tmp_path.iterdir()] == ["best_model"]


def test_a_swap_without_renameat2_whose_second_rename_fails_puts_the_old_best_model_back_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(_state(1), name="best_model")

        def no_renameat2(*args: Any, **kwargs: Any) -> Any:
            raise OSError("no glibc renameat2")

        real_rename = ckptio.dcp_commit.os.rename
        renames: list[Any] = []

        def second_fails(source: Any, target: Any) -> None:
            if Path(source).name == ".best_model.next-ckptio" and not renames:
                renames.append(source)
                raise OSError(28, "No space left on device")
            real_rename(source, target)

        with monkeypatch.context() as patch:
            patch.setattr(ckptio.atomic.ctypes, "CDLL", no_renameat2)
            patch.setattr(ckptio.dcp_commit.os, "rename", second_fails)
            with pytest.raises(ckptio.CheckpointWriteError, match="No space left"):
                manager.save(_state(2), name="best_model")
        assert _step_in(tmp_path / "best_model") == 1  # while this run goes on, not only after a restart
        manager.save(_state(3), name="best_model")
    assert _step_in(tmp_path / "best_model") == 3


class _Wrapper:
    """A Stateful, as trainers wrap a model or its optimizers (torchtitan's ModelWrapper)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.tensor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensor.copy_(state["w"])


def test_min_free_counts_the_tensors_of_stateful_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckptio.dcp_manager, "_free_bytes", lambda _: 4096)
    with ShardedCheckpointManager(tmp_path, min_free=2048, async_save=False) as manager, \
            pytest.raises(ckptio.InsufficientSpaceError, match="lower min_free"):
        manager.save({"model": _Wrapper(torch.zeros(1024)), "step": 1}, name="checkpoint_epoch_1_batch_1")
    assert list(tmp_path.iterdir()) == []
