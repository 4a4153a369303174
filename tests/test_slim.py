"""Tests for ckptio.slim: old checkpoints rewritten to their weights, sealed, verified, marked, order kept."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
import ckptio.atomic
import ckptio.slim
from ckptio import cli as ckptio_cli
from ckptio.dir_index import read_index
from ckptio.fileio import write_checkpoint
from ckptio.integrity import seal_zip_file
from ckptio.naming import CheckpointEntry, scan
from ckptio.slim import is_slim, plan_slimming, slim_checkpoint
from ckptio.snapshot import BufferSlot
from tests.helpers import assert_same


def _state(step: int) -> dict:
    weights = {"conv.weight": torch.full((8, 4), float(step)), "conv.bias": torch.arange(8.0)}
    return {
        "epoch": 1, "batch": step, "global_step": step, "train_loss": 0.5 / step,
        "model_state_dict": weights,
        "optimizer_state_dict": {"state": {0: {"exp_avg": torch.ones(8, 4), "exp_avg_sq": torch.ones(8, 4),
                                               "step": torch.tensor(float(step))}},
                                 "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "rng_state": {"torch": torch.get_rng_state()},
        "config": {"lr": 1e-4, "seed": 0},
    }


def _save(directory: Path, steps: list[int], **options: object) -> list[Path]:
    with ckptio.CheckpointManager(directory, async_save=False, **options) as mgr:
        for step in steps:
            mgr.save(_state(step), name=f"checkpoint_epoch_1_batch_{step}")
        return [mgr.path_for(f"checkpoint_epoch_1_batch_{step}") for step in steps]


@pytest.mark.parametrize(("fmt", "compression"), [("torch", None), ("torch", "zstd"), ("safetensors", None)])
def test_slimming_keeps_the_weights_and_scalars_drops_the_rest_and_marks_the_file(
        tmp_path: Path, fmt: str, compression: str | None) -> None:
    (path,) = _save(tmp_path, [3], format=fmt, compression=compression)
    before_mtime = path.stat().st_mtime_ns
    result = slim_checkpoint(path)
    assert result.bytes_after < result.bytes_before == result.bytes_after + result.bytes_saved
    assert set(result.dropped) == {"optimizer_state_dict", "rng_state"}
    state = ckptio.load(path)
    assert_same(state["model_state_dict"], _state(3)["model_state_dict"])
    assert {k: state[k] for k in ("epoch", "batch", "global_step", "train_loss", "config")} == {
        "epoch": 1, "batch": 3, "global_step": 3, "train_loss": 0.5 / 3, "config": {"lr": 1e-4, "seed": 0}}
    assert "optimizer_state_dict" not in state and "rng_state" not in state
    assert ckptio.verify(path).ok and ckptio.fileio.verify_file(path).status == "verified"
    seal, size = ckptio.read_meta(path)
    assert seal is not None and is_slim(seal.meta) and size == result.bytes_after
    assert seal.meta["user"]["slim"]["bytes_before"] == result.bytes_before
    assert is_slim(read_index(tmp_path)[path.name]["meta"])  # what `ckptio list` reads
    assert path.stat().st_mtime_ns == before_mtime  # keeps its place among the checkpoints
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "slim" in p.name] == []


def test_a_slim_torch_checkpoint_still_loads_with_plain_torch_load(tmp_path: Path) -> None:
    (path,) = _save(tmp_path, [2])
    slim_checkpoint(path)
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["model_state_dict"]["conv.weight"], torch.full((8, 4), 2.0))


def test_slimming_a_corrupt_checkpoint_refuses_and_leaves_it_untouched(tmp_path: Path) -> None:
    (path,) = _save(tmp_path, [1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckptio.CorruptCheckpointError):
        slim_checkpoint(path)
    assert path.read_bytes() == bytes(data)


def test_slimming_twice_or_without_the_weights_is_refused(tmp_path: Path) -> None:
    (path,) = _save(tmp_path, [1])
    with pytest.raises(ValueError, match="has no weights"):
        slim_checkpoint(path, keep=("weights",))
    slim_checkpoint(path)
    with pytest.raises(ValueError, match="already slim"):
        slim_checkpoint(path)


def _entry(name: str, age: int, *, protected: bool = False, shard_bytes: int = 0) -> CheckpointEntry:
    return CheckpointEntry(path=Path(f"{name}.pth"), name=name, suffix=".pth", size=10, mtime_ns=1000 - age,
                           protected=protected, shard_bytes=shard_bytes)


def test_plan_keeps_the_newest_n_complete_and_slims_only_periodic_unsharded_fat_ones() -> None:
    c = [f"checkpoint_epoch_1_batch_{b}" for b in range(6)]
    entries = [_entry("best_model", 0, protected=True), _entry(c[5], 1), _entry(c[4], 2), _entry(c[3], 3),
               _entry(c[2], 4, shard_bytes=5), _entry("final", 5), _entry(c[1], 6), _entry(c[0], 7)]
    planned = plan_slimming(entries, keep_full=2, slim_names={f"{c[0]}.pth"})
    assert [e.name for e in planned] == [c[3], c[1]]
    assert [e.name for e in plan_slimming(entries, keep_full=1, slim_names=set())] == [c[4], c[3], c[1], c[0]]
    with pytest.raises(ValueError, match="at least 1"):
        plan_slimming(entries, keep_full=0, slim_names=set())


def test_plan_leaves_alone_the_oldest_checkpoint_that_retention_deletes_next() -> None:
    entries = [_entry(f"checkpoint_epoch_1_batch_{b}", 10 - b) for b in range(10, 0, -1)]
    planned = plan_slimming(entries, keep_full=1, slim_names=set(), keep_count=4)
    assert [e.name for e in planned] == ["checkpoint_epoch_1_batch_9", "checkpoint_epoch_1_batch_8"]


def test_slimming_old_checkpoints_saves_space_and_keeps_the_directory_order(tmp_path: Path) -> None:
    paths = _save(tmp_path, [1, 2, 3])
    order = [e.name for e in scan(tmp_path)]
    total_before = sum(p.stat().st_size for p in paths)
    for entry in plan_slimming(scan(tmp_path), keep_full=1, slim_names=set()):
        slim_checkpoint(entry.path)
    assert [e.name for e in scan(tmp_path)] == order
    assert sum(p.stat().st_size for p in paths) < total_before
    assert not is_slim(ckptio.read_meta(paths[-1])[0].meta)  # the newest stays complete
    assert "optimizer_state_dict" in ckptio.load(paths[-1])
    assert ckptio.verify(tmp_path).ok


def test_list_marks_slim_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    older, newest = _save(tmp_path, [1, 2])
    slim_checkpoint(older)
    capsys.readouterr()
    assert ckptio_cli.main(["list", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(older.name in line and "(slim: weights only)" in line for line in lines), lines
    assert not any(newest.name in line and "slim" in line for line in lines), lines
    assert ckptio_cli.main(["list", str(tmp_path), "--json"]) == 0
    rows = {row["file"]: row["slim"] for row in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert rows == {older.name: True, newest.name: False}


# ---- keep_full: the writer slims, off the training process ----------------------------------------------------------

@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_manager_with_keep_full_slims_older_checkpoints_in_its_writer_and_says_which(
    tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if writer == "process":  # the process writer slims in its own interpreter: this process's function never runs
        def not_here(*args: object, **kwargs: object) -> list:
            raise AssertionError("slimmed in the training process")

        monkeypatch.setattr("ckptio.writer.slim_older_checkpoints", not_here)
    with ckptio.CheckpointManager(tmp_path, keep_full=1, async_save=True, writer=writer) as mgr:
        results = [mgr.save(_state(step), name=f"checkpoint_epoch_1_batch_{step}").result(timeout=60)
                   for step in (1, 2, 3)]
        results.append(mgr.save(_state(3), name="best_model").result(timeout=60))
        assert mgr.stats.slimmed == 2
    assert [[done.path.name for done in saved.slimmed] for saved in results] == [
        [], ["checkpoint_epoch_1_batch_1.pth"], ["checkpoint_epoch_1_batch_2.pth"], []]
    assert all(saved.slim_error is None for saved in results)
    assert all(done.bytes_after < done.bytes_before for saved in results for done in saved.slimmed)
    slim = {e.name: is_slim(ckptio.read_meta(e.path)[0].meta) for e in scan(tmp_path)}
    assert slim == {"checkpoint_epoch_1_batch_1": True, "checkpoint_epoch_1_batch_2": True,
                    "checkpoint_epoch_1_batch_3": False, "best_model": False}
    assert ckptio.verify(tmp_path).ok


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_checkpoint_the_writer_cannot_slim_stays_complete_and_the_others_and_the_save_still_go_through(
    tmp_path: Path, writer: str
) -> None:
    broken, good = _save(tmp_path, [1, 2])
    data = bytearray(broken.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    with ckptio.CheckpointManager(tmp_path, keep_full=1, async_save=True, writer=writer) as mgr:
        saved = mgr.save(_state(3), name="checkpoint_epoch_1_batch_3").result(timeout=60)
        assert mgr.stats.slimmed == 1
    # before: the first failure ended the pass, and what it had slimmed already went unreported
    assert saved.path.name == "checkpoint_epoch_1_batch_3.pth"
    assert [done.path for done in saved.slimmed] == [good] and is_slim(ckptio.read_meta(good)[0].meta)
    assert saved.slim_error is not None and saved.slim_error.startswith("checkpoint_epoch_1_batch_1.pth: Corrupt")
    assert broken.read_bytes() == bytes(data)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_keep_full_below_one_or_not_a_whole_number_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="keep_full"):
        ckptio.CheckpointOptions(keep_full=value)  # type: ignore[arg-type]


def _step_the_clock_back(paths: list[Path]) -> None:
    """Give the files written so far modification times in the future, as a clock stepped back leaves them."""
    future = time.time_ns() + 3600 * 10**9
    for offset, path in enumerate(paths):
        os.utime(path, ns=(future + offset, future + offset))


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_keep_full_never_slims_the_checkpoint_just_written_when_older_files_have_later_mtimes(
        tmp_path: Path, writer: str) -> None:
    _step_the_clock_back(_save(tmp_path, [1, 2]))
    with ckptio.CheckpointManager(tmp_path, keep_full=1, async_save=True, writer=writer) as mgr:
        saved = mgr.save(_state(3), name="checkpoint_epoch_1_batch_3").result(timeout=60)
    assert [done.path.name for done in saved.slimmed] == ["checkpoint_epoch_1_batch_2.pth",
                                                          "checkpoint_epoch_1_batch_1.pth"]
    slim = {e.name: is_slim(ckptio.read_meta(e.path)[0].meta) for e in scan(tmp_path)}
    assert slim == {"checkpoint_epoch_1_batch_1": True, "checkpoint_epoch_1_batch_2": True,
                    "checkpoint_epoch_1_batch_3": False}


class _CleanDuringSlimming:
    """Stands in for ``ckptio.slim.verify_file``: runs ``ckptio clean --keep-count 1`` once, while the slim copy of
    the oldest checkpoint is written but not yet renamed over it (the interleaving is certain, not timed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cleaned = False
        self.real = ckptio.slim.verify_file

    def __call__(self, path: Path) -> object:
        if not self.cleaned:
            self.cleaned = True
            assert ckptio_cli.main(["clean", str(self.directory), "--keep-count", "1"]) == 0
        return self.real(path)


@pytest.mark.parametrize("exchange", ["renameat2", "unavailable"])
def test_a_checkpoint_clean_deletes_while_it_is_slimmed_stays_deleted(tmp_path: Path, exchange: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if exchange == "unavailable":  # a filesystem or kernel that cannot exchange two names: checked, then renamed
        monkeypatch.setattr(ckptio.atomic, "exchange", lambda a, b: False)
    older, newest = _save(tmp_path, [1, 2])
    fake = _CleanDuringSlimming(tmp_path)
    monkeypatch.setattr(ckptio.slim, "verify_file", fake)
    assert ckptio.slim.slim_older_checkpoints(tmp_path, keep_full=1) == []
    assert fake.cleaned
    assert not older.exists(), "the slim copy brought back the file clean had deleted"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [newest.name]
    assert not any(p.name.endswith(".ckptio-tmp") for p in tmp_path.iterdir())


class _ReplaceDuringSlimming:
    """Stands in for ``ckptio.slim.verify_file``: puts another file under the name being slimmed, once."""

    def __init__(self, path: Path, replacement: Path) -> None:
        self.path, self.replacement = path, replacement
        self.real = ckptio.slim.verify_file

    def __call__(self, path: Path) -> object:
        if self.replacement.exists():
            os.replace(self.replacement, self.path)
        return self.real(path)


def test_a_checkpoint_replaced_while_it_is_slimmed_keeps_the_newer_file(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (older,) = _save(tmp_path / "run", [1])
    (replacement,) = _save(tmp_path / "other", [1])
    expected = replacement.read_bytes()
    monkeypatch.setattr(ckptio.slim, "verify_file", _ReplaceDuringSlimming(older, replacement))
    with pytest.raises(FileExistsError, match="replaced while it was being rewritten"):
        slim_checkpoint(older)
    assert older.read_bytes() == expected
    assert not any(p.name.endswith(".ckptio-tmp") for p in older.parent.iterdir())


def test_the_written_order_survives_slimming_and_re_verification(tmp_path: Path) -> None:
    paths = _save(tmp_path, [1, 2, 3])
    order = [e.name for e in scan(tmp_path)]
    slim_checkpoint(paths[1])
    assert ckptio.verify(tmp_path).ok  # records every file again
    for i, path in enumerate(paths):  # the clock says the reverse of the order they were written in
        os.utime(path, ns=(10**18 - i, 10**18 - i))
    assert [e.name for e in scan(tmp_path)] == order
    assert [read_index(tmp_path)[p.name]["written"] for p in paths] == [1, 2, 3]
def _planted_shared_references(path: Path, depth: int = 60) -> None:
    """A sealed .pth whose state is ``{"model_state_dict": {...}, "a": [x, x]}`` nested ``depth`` times: a few KB
    on disk (the pickler writes each level once), 2**depth paths to walk."""
    level: object = []
    for _ in range(depth):
        level = [level, level]
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "batch": 0, "model_state_dict": {"w": torch.zeros(2)}, "a": level}, buffer)
    path.write_bytes(buffer.getvalue())
    with open(path, "r+b") as file:
        seal_zip_file(file.fileno(), {"name": path.stem, "user": {}})


@pytest.mark.timeout(120)  # a guard only: a writer that walks every path of shared references never returns
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_planted_checkpoint_of_shared_references_is_reported_unslimmable_and_the_save_still_succeeds(
    tmp_path: Path, writer: str
) -> None:
    planted = tmp_path / "checkpoint_epoch_0_batch_0.pth"
    _planted_shared_references(planted)
    assert planted.stat().st_size < 4096
    before = planted.read_bytes()
    with ckptio.CheckpointManager(tmp_path, keep_full=1, async_save=True, writer=writer, fsync=False) as mgr:
        saved = mgr.save(_state(1), name="checkpoint_epoch_1_batch_1").result(timeout=100)

    assert saved.slim_error is not None and "reached by two paths" in saved.slim_error
    assert saved.slim_error.startswith("checkpoint_epoch_0_batch_0.pth")
    assert planted.read_bytes() == before
    assert ckptio.verify(saved.path).ok


def test_a_checkpoint_without_model_weights_is_read_once_by_keep_full_not_at_every_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    real_load = ckptio.slim.load

    def counting_load(path: object, *args: object, **kwargs: object) -> object:
        reads.append(Path(str(path)).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(ckptio.slim, "load", counting_load)
    errors = []
    with ckptio.CheckpointManager(tmp_path, keep_full=1, async_save=False, fsync=False) as mgr:
        for step in (1, 2, 3, 4):
            state = {"epoch": 1, "batch": step, "weights": torch.full((4,), float(step))}  # no model_state_dict
            errors.append(mgr.save(state, name=f"checkpoint_epoch_1_batch_{step}").result().slim_error)

    # before: every save re-read every older checkpoint (1 + 2 + 3 loads); now each is read once
    assert sorted(reads) == [f"checkpoint_epoch_1_batch_{step}.pth" for step in (1, 2, 3)]
    assert [e is not None and "has no model_state_dict" in e for e in errors] == [False, True, True, True]
    assert "model_state_dict" in read_index(tmp_path)["checkpoint_epoch_1_batch_1.pth"]["unslimmable"]


def test_a_checkpoint_found_unslimmable_is_tried_again_once_it_changes(tmp_path: Path) -> None:
    first = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    unslimmable = _state(1)
    del unslimmable["model_state_dict"]
    with ckptio.CheckpointManager(tmp_path, async_save=False, fsync=False) as mgr:
        mgr.save(unslimmable, name="checkpoint_epoch_1_batch_1")
        mgr.save(_state(2), name="checkpoint_epoch_1_batch_2")
    assert ckptio.slim.slim_older_checkpoints(tmp_path, keep_full=1, on_error=lambda path, exc: None) == []
    assert "unslimmable" in read_index(tmp_path)[first.name]

    (replacement,) = _save(tmp_path / "elsewhere", [1])  # the same name, now with weights, put in place
    os.replace(replacement, first)
    assert [done.path for done in ckptio.slim.slim_older_checkpoints(tmp_path, keep_full=1)] == [first]


def _sealed_torch(path: Path, state: Any, meta: dict[str, Any]) -> None:
    torch.save(state, path)
    fd = os.open(path, os.O_RDWR)
    try:
        seal_zip_file(fd, meta)
    finally:
        os.close(fd)


def test_slim_refuses_a_checkpoint_whose_tensor_elements_overlap_instead_of_expanding_it(tmp_path: Path) -> None:
    # Before: a 2 KB sealed file holding zeros(1).expand(250_000_000) was rewritten as a 1 GB file (2.1 GB RSS,
    # 8 s) by the trainer's own slim pass; a larger count fills the disk or memory.
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    _sealed_torch(path, {"model_state_dict": {"w": torch.zeros(1).expand(10**12)}, "opt": torch.zeros(2)},
                  {"summary": {}, "name": "x"})
    with pytest.raises(ValueError, match="elements overlap"):
        slim_checkpoint(path, fsync=False)
    assert path.stat().st_size < 10_000


def test_slim_of_a_checkpoint_whose_user_metadata_is_not_a_dict_slims_it(tmp_path: Path) -> None:
    # Before: ValueError("dictionary update sequence element #0 has length 1; 2 is required").
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    _sealed_torch(path, {"model_state_dict": {"w": torch.ones(3)}, "opt": torch.zeros(2)},
                  {"summary": {}, "name": "x", "user": "not a dict", "compression": "zstd"})
    result = slim_checkpoint(path, fsync=False)
    assert result.dropped == ("opt",)
    assert torch.equal(ckptio.load(path)["model_state_dict"]["w"], torch.ones(3))


def test_slim_refuses_shifted_views_of_one_storage_instead_of_copying_each(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    base = torch.zeros(1000)
    _sealed_torch(path, {"model_state_dict": {f"w{i}": base[i:] for i in range(500)}, "opt": torch.zeros(2)},
                  {"summary": {}, "name": "x"})
    with pytest.raises(ValueError, match="elements overlap"):
        slim_checkpoint(path, fsync=False)


def test_slim_keeps_working_for_tied_weights_and_slices(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    shared = torch.arange(6.0)
    state = {"model_state_dict": {"a": shared, "tied": shared, "head": shared[:2], "tail": shared[2:]},
             "opt": torch.zeros(2)}
    write_checkpoint(path, BufferSlot().take(state), name="x", fmt="torch", compression=None, fsync=False)
    assert slim_checkpoint(path, fsync=False).dropped == ("opt",)
    assert torch.equal(ckptio.load(path)["model_state_dict"]["tail"], shared[2:])
