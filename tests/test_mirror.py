"""The mirror: verified copies of committed checkpoints in a second place, its retention, and resuming from it."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import ckptio
from ckptio.mirror import (
    MANIFEST_SUFFIX,
    LocalTarget,
    Mirror,
    MirrorError,
    newest_verified,
    open_target,
    pull,
    remote_checkpoints,
    upload,
    verify_remote,
)
from craft_train.config import TrainConfig
from craft_train.train import train


def _state(step: int) -> dict[str, object]:
    return {"weights": torch.full((256,), float(step)), "global_step": step}


def _saved(directory: Path, *names_and_steps: tuple[str, int]) -> list[Path]:
    with ckptio.CheckpointManager(directory, async_save=False) as manager:
        for name, step in names_and_steps:
            manager.save(_state(step), name=name, metadata={"summary": {"global_step": step}})
    return [manager.path_for(name) for name, _ in names_and_steps]


class FlakyTarget(LocalTarget):
    """A directory that refuses the first ``failures`` uploads, as a store that is down for a while."""

    def __init__(self, directory: Path, failures: int) -> None:
        super().__init__(directory, fsync=False)
        self.failures = failures
        self.attempts = 0

    def put_file(self, key: str, source: Path) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise MirrorError("the store is down")
        super().put_file(key, source)


class CorruptingTarget(LocalTarget):
    """A directory that flips a byte of every checkpoint it stores: what a bad disk or store returns."""

    def put_file(self, key: str, source: Path) -> None:
        super().put_file(key, source)
        path = self.directory / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def test_an_uploaded_checkpoint_is_verified_on_the_target_and_listed_once_its_manifest_is_written(
        tmp_path: Path) -> None:
    [path] = _saved(tmp_path / "local", ("checkpoint_epoch_1_batch_1", 1))
    target = open_target(str(tmp_path / "mirror"))
    entry = upload(target, path)
    assert (tmp_path / "mirror" / path.name).read_bytes() == path.read_bytes()
    assert [e.key for e in remote_checkpoints(target)] == [path.name]
    assert entry.global_step == 1 and verify_remote(target, entry).status == "verified"
    (tmp_path / "mirror" / (path.name + MANIFEST_SUFFIX)).unlink()  # a copy whose manifest never came
    assert remote_checkpoints(target) == []


def test_a_copy_that_does_not_read_back_as_sealed_is_refused_and_never_listed(tmp_path: Path) -> None:
    [path] = _saved(tmp_path / "local", ("checkpoint_epoch_1_batch_1", 1))
    target = CorruptingTarget(tmp_path / "mirror", fsync=False)
    with pytest.raises(MirrorError, match="does not match the digest sealed"):
        upload(target, path)
    assert remote_checkpoints(target) == []


def test_a_mirrored_copy_corrupted_later_is_skipped_by_verify_and_resume_for_the_previous_one(tmp_path: Path) -> None:
    paths = _saved(tmp_path / "local", ("checkpoint_epoch_1_batch_1", 1), ("checkpoint_epoch_1_batch_2", 2))
    target = open_target(str(tmp_path / "mirror"))
    for path in paths:
        upload(target, path)
    damaged = tmp_path / "mirror" / paths[1].name
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0x01
    damaged.write_bytes(bytes(data))
    said: list[str] = []
    assert newest_verified(target, said.append).key == paths[0].name  # type: ignore[union-attr]
    assert "skipping checkpoint_epoch_1_batch_2.pth: corrupt" in said[0]
    entry = remote_checkpoints(target)[0]
    with pytest.raises(MirrorError, match="does not verify"):
        pull(target, entry, tmp_path / "restore")
    assert not (tmp_path / "restore" / paths[1].name).exists()


def test_the_mirror_retries_a_failing_store_and_the_copy_lands_once_it_is_back(tmp_path: Path) -> None:
    [path] = _saved(tmp_path / "local", ("checkpoint_epoch_1_batch_1", 1))
    target = FlakyTarget(tmp_path / "mirror", failures=3)
    mirror = Mirror("flaky", target=target, retry_initial=0.001, retry_max=0.01)
    mirror.submit(_committed(path))
    assert mirror.wait_mirrored("checkpoint_epoch_1_batch_1", timeout=60)
    assert mirror.close(timeout=5) == []
    assert target.attempts == 4 and mirror.failures == 3 and "store is down" in (mirror.last_error or "")
    assert [e.key for e in remote_checkpoints(target)] == [path.name]


def test_a_checkpoint_the_store_never_takes_is_named_as_unmirrored_at_close(tmp_path: Path) -> None:
    [path] = _saved(tmp_path / "local", ("checkpoint_epoch_1_batch_1", 1))
    target = FlakyTarget(tmp_path / "mirror", failures=10**9)
    mirror = Mirror("down", target=target, retry_initial=0.001, retry_max=0.01)
    mirror.submit(_committed(path))
    assert mirror.close(timeout=0.2) == ["checkpoint_epoch_1_batch_1"]
    assert mirror.failures >= 1


def _committed(path: Path) -> ckptio.SavedCheckpoint:
    seal, size = ckptio.read_meta(path)
    assert seal is not None
    return ckptio.SavedCheckpoint(path=path, name=path.name.removesuffix(".pth"), digest=seal.digest, size=size,
                                  meta=seal.meta, seconds=0.0)


def test_mirror_retention_keeps_the_newest_n_and_best_model_and_never_touches_local_files(tmp_path: Path) -> None:
    names = [(f"checkpoint_epoch_1_batch_{i}", i) for i in range(1, 5)] + [("best_model", 2)]
    with ckptio.CheckpointManager(tmp_path / "local", async_save=True, mirror=str(tmp_path / "mirror"),
                                  mirror_keep=2) as manager:
        for name, step in names:
            manager.save(_state(step), name=name, metadata={"summary": {"global_step": step}})
    assert manager.mirror is not None and manager.mirror.unmirrored == []
    remote = sorted(e.key for e in remote_checkpoints(open_target(str(tmp_path / "mirror"))))
    assert remote == ["best_model.pth", "checkpoint_epoch_1_batch_3.pth", "checkpoint_epoch_1_batch_4.pth"]
    assert len(list((tmp_path / "local").glob("*.pth"))) == 5


def test_a_manager_with_a_mirror_copies_each_checkpoint_in_a_thread_other_than_the_callers(tmp_path: Path) -> None:
    copied_in: list[str] = []

    class Watching(LocalTarget):
        def put_file(self, key: str, source: Path) -> None:
            copied_in.append(threading.current_thread().name)
            super().put_file(key, source)

    with ckptio.CheckpointManager(tmp_path / "local", async_save=False, mirror=str(tmp_path / "mirror")) as manager:
        assert manager.mirror is not None
        manager.mirror.target = Watching(tmp_path / "mirror", fsync=False)
        manager.save(_state(1), name="checkpoint_epoch_1_batch_1")
    assert copied_in and threading.current_thread().name not in copied_in
    manifest = json.loads((tmp_path / "mirror" / ("checkpoint_epoch_1_batch_1.pth" + MANIFEST_SUFFIX)).read_text())
    assert manifest["digest"] == ckptio.read_meta(tmp_path / "local" / "checkpoint_epoch_1_batch_1.pth")[0].digest


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mirror_keep", 0, "mirror_keep must be at least 1"),
    ("mirror", "", "mirror must be a directory or a URL"),
])
def test_invalid_mirror_settings_are_refused_saying_what_to_do(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ckptio.CheckpointOptions(**{field: value})  # type: ignore[arg-type]


def test_an_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_target("gs://bucket/run")


# 10 synthetic images, 2 held out: 4 batches of 2 per epoch.
BASE = dict(synthetic_size=10, image_size=64, batch_size=2, epochs=3, val_fraction=0.2, seed=7, workers=0)


def test_deleting_the_local_directory_and_resuming_from_the_mirror_continues_bit_identically(tmp_path: Path) -> None:
    straight = train(TrainConfig(**BASE, save_dir=str(tmp_path / "straight"), save_freq=0, max_steps=7),
                     say=lambda _: None)
    mirror = str(tmp_path / "backup")
    first = TrainConfig(**BASE, save_dir=str(tmp_path / "run"), save_freq=2, max_steps=5, mirror=mirror,
                        async_save=True)
    train(first, say=lambda _: None)
    shutil.rmtree(tmp_path / "run")  # the machine and its disk are gone
    said: list[str] = []
    resumed = train(TrainConfig(**BASE, save_dir=str(tmp_path / "run"), save_freq=2, max_steps=7, mirror=mirror,
                                resume="auto"), say=said.append)
    assert resumed.start_step == 5 and resumed.global_step == 7
    assert any("from the mirror" in line and "checkpoint_epoch_2_batch_1.pth" in line for line in said), said
    assert straight.model is not None and resumed.model is not None
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_local_retention_keeps_checkpoints_not_yet_mirrored_and_deletes_them_once_copied(tmp_path: Path) -> None:
    target = FlakyTarget(tmp_path / "mirror", failures=10**9)
    with ckptio.CheckpointManager(tmp_path / "local", async_save=False, keep_count=1,
                                  mirror=str(tmp_path / "mirror"), mirror_timeout=0.1) as manager:
        assert manager.mirror is not None
        manager.mirror.target = target
        manager.mirror.retry_initial = manager.mirror.retry_max = 0.01
        for step in (1, 2, 3):
            manager.save(_state(step), name=f"checkpoint_epoch_1_batch_{step}")
        assert len(manager.checkpoints()) == 3  # keep_count=1, but none is mirrored yet
        target.failures = 0  # the store is back
        assert manager.mirror.wait(timeout=60)
        manager.save(_state(4), name="checkpoint_epoch_1_batch_4")
        assert [e.name for e in manager.checkpoints()] == ["checkpoint_epoch_1_batch_4"]


def test_the_disk_budget_still_deletes_an_unmirrored_checkpoint_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with ckptio.CheckpointManager(tmp_path / "local", async_save=False, disk_budget=2500,
                                  mirror=str(tmp_path / "mirror"), mirror_timeout=0.1) as manager:
        assert manager.mirror is not None
        manager.mirror.target = FlakyTarget(tmp_path / "mirror", failures=10**9)
        manager.mirror.retry_initial = manager.mirror.retry_max = 0.01
        for step in (1, 2):
            manager.save(_state(step), name=f"checkpoint_epoch_1_batch_{step}")
        assert [e.name for e in manager.checkpoints()] == ["checkpoint_epoch_1_batch_2"]
    assert "disk_budget forces deleting checkpoint_epoch_1_batch_1.pth before it was mirrored" in caplog.text


def test_checkpoints_a_run_left_unmirrored_are_copied_by_the_next_run_with_the_mirror(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(tmp_path / "local", async_save=False, mirror=str(tmp_path / "mirror"),
                                  mirror_timeout=0.1) as manager:
        assert manager.mirror is not None
        manager.mirror.target = FlakyTarget(tmp_path / "mirror", failures=10**9)
        manager.save(_state(1), name="checkpoint_epoch_1_batch_1")
    assert manager.mirror.unmirrored == ["checkpoint_epoch_1_batch_1"]
    with ckptio.CheckpointManager(tmp_path / "local", async_save=False, mirror=str(tmp_path / "mirror")) as again:
        assert again.mirror is not None and again.mirror.wait(timeout=60)
    assert [e.key for e in remote_checkpoints(open_target(str(tmp_path / "mirror")))] == [
        "checkpoint_epoch_1_batch_1.pth"]


def test_resume_auto_with_a_mirror_says_it_looks_there_when_the_local_directory_is_gone(tmp_path: Path) -> None:
    from craft_train.resume import resume_path

    said: list[str] = []
    config = TrainConfig(save_dir=str(tmp_path / "lost"), resume="auto", mirror=str(tmp_path / "backup"))
    assert resume_path(config, said.append) is None
    assert said[0].endswith(f"does not exist; looking on the mirror {tmp_path / 'backup'}"), said
    assert "starting a fresh run" not in said[0]
    assert said[-1].endswith("either; starting a fresh run"), said
