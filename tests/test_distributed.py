"""torchrun with 2 CPU processes (gloo): one checkpoint per save, exact resume, a different process count,
and a killed rank that leaves the previous checkpoint valid."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import ckptio
from ckptio.naming import scan

TINY = ["--synthetic-size", "10", "--image-size", "64", "--batch-size", "2", "--workers", "0",
        "--val-fraction", "0.2", "--save-freq", "1", "--device", "cpu"]  # gloo on CPUs, even on a GPU machine


def _torchrun(processes: int, save_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "craft_train", *TINY, "--save-dir", str(save_dir), *args]


def _run(processes: int, save_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(_torchrun(processes, save_dir, *args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _names(directory: Path) -> list[str]:
    return sorted(e.name for e in scan(directory))


@pytest.mark.slow
def test_two_processes_write_each_checkpoint_once_and_resume_exactly_in_two_processes_or_one(tmp_path: Path) -> None:
    straight = _run(2, tmp_path / "straight", "--epochs", "2", "--async-save")
    # 8 training images, 2 per process per step: 2 steps an epoch, one file per save (not one per rank)
    assert _names(tmp_path / "straight") == [
        "best_model", "checkpoint_epoch_1_batch_1", "checkpoint_epoch_1_batch_2", "checkpoint_epoch_2_batch_1",
        "checkpoint_epoch_2_batch_2"]
    assert straight.stdout.count("saved checkpoint_epoch_") == 4
    assert ckptio.verify(tmp_path / "straight").ok
    first = ckptio.load(tmp_path / "straight" / "checkpoint_epoch_1_batch_1.pth")
    assert first["world_size"] == 2 and first["data_order"]["position"] == 4

    # The straight run's checkpoint of step 1 (written in the background while it trained on), resumed once by
    # two processes and once by one: the same proof as stopping a run there, without two more torchrun starts.
    for directory in ("resumed", "one_process"):
        (tmp_path / directory).mkdir()
        shutil.copy2(tmp_path / "straight" / "checkpoint_epoch_1_batch_1.pth", tmp_path / directory)
    resumed = _run(2, tmp_path / "resumed", "--epochs", "2", "--resume", "auto")
    assert "resumed from" in resumed.stdout
    expected = ckptio.load(tmp_path / "straight" / "checkpoint_epoch_2_batch_2.pth")
    actual = ckptio.load(tmp_path / "resumed" / "checkpoint_epoch_2_batch_2.pth")
    for key, tensor in expected["model_state_dict"].items():
        assert torch.equal(tensor, actual["model_state_dict"][key]), key

    one = subprocess.run([sys.executable, "-m", "craft_train", *TINY, "--save-dir", str(tmp_path / "one_process"),
                          "--epochs", "2", "--max-steps", "3", "--resume", "auto"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert "written by 2 process(es), this run has 1" in one.stdout
    assert "continues at sample 4 of 8" in one.stdout
    # the 4 remaining samples take 2 single-process steps: batches 2 and 3 of the epoch
    assert "checkpoint_epoch_1_batch_3" in _names(tmp_path / "one_process")
    last = ckptio.load(tmp_path / "one_process" / "checkpoint_epoch_1_batch_3.pth")
    assert last["data_order"]["position"] == 8 and last["world_size"] == 1


@pytest.mark.slow
def test_killing_one_rank_mid_run_leaves_the_previous_checkpoint_valid(tmp_path: Path) -> None:
    launcher = subprocess.Popen(_torchrun(2, tmp_path, "--epochs", "50", "--async-save"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not [n for n in _names(tmp_path) if n.startswith("checkpoint_")] and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "craft_train" in p.cmdline()]
        assert len(workers) == 2
        victim = next(p for p in workers if "LOCAL_RANK" in p.environ() and p.environ()["LOCAL_RANK"] == "1")
        victim.send_signal(signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0  # torchrun notices and stops the other rank
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert ckptio.verify(tmp_path).ok
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".ckptio-tmp") and not p.name.startswith(".")] == []
    newest = scan(tmp_path)[0]
    assert ckptio.load(newest.path)["world_size"] == 2


@pytest.mark.slow
def test_sharded_optimizer_checkpoints_are_valid_only_with_every_shard_and_resume_exactly(tmp_path: Path) -> None:
    _run(2, tmp_path / "straight", "--epochs", "1", "--zero")
    # its step-1 checkpoint, manifest and shards, resumed (as in the test above)
    (tmp_path / "resumed").mkdir()
    for name in ("checkpoint_epoch_1_batch_1.pth", "checkpoint_epoch_1_batch_1.shards"):
        copy = shutil.copytree if (tmp_path / "straight" / name).is_dir() else shutil.copy2
        copy(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    resumed = _run(2, tmp_path / "resumed", "--epochs", "1", "--zero", "--resume", "auto")
    assert "resumed from" in resumed.stdout and "global step 1" in resumed.stdout
    for directory in ("straight", "resumed"):
        shards = sorted(p.name for p in (tmp_path / directory / "checkpoint_epoch_1_batch_2.shards").iterdir())
        assert shards == ["rank00000-of-00002.pth", "rank00001-of-00002.pth"]
    expected = ckptio.load(tmp_path / "straight" / "checkpoint_epoch_1_batch_2.pth")
    actual = ckptio.load(tmp_path / "resumed" / "checkpoint_epoch_1_batch_2.pth")
    assert "optimizer_state_dict" not in actual and actual["sharded"]
    for key, tensor in expected["model_state_dict"].items():
        assert torch.equal(tensor, actual["model_state_dict"][key]), key
    for rank in (0, 1):
        a = ckptio.load_shard(tmp_path / "straight" / "checkpoint_epoch_1_batch_2.pth", rank)["optimizer_shard"]
        b = ckptio.load_shard(tmp_path / "resumed" / "checkpoint_epoch_1_batch_2.pth", rank)["optimizer_shard"]
        for index, slots in a["state"].items():
            for name, value in slots.items():
                assert torch.equal(value, b["state"][index][name]), (rank, index, name)

    (tmp_path / "straight" / "checkpoint_epoch_1_batch_2.shards" / "rank00001-of-00002.pth").unlink()
    verify = subprocess.run([sys.executable, "-m", "ckptio", "verify", str(tmp_path / "straight")],
                            capture_output=True, text=True)
    assert verify.returncode == 1
    assert "batch_2.pth: corrupt - shard checkpoint_epoch_1_batch_2.shards/rank00001" in verify.stdout

    # One process resumes what two sharded: the shards are made one whole Adam state (craft_train.zero).
    alone = subprocess.run([sys.executable, "-m", "craft_train", *TINY, "--save-dir", str(tmp_path / "resumed"),
                            "--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0 and "written by 2 process(es), this run has 1" in alone.stdout, alone.stderr
