"""Long runs and concurrent hands: thousands of saves keep memory, descriptors and files at their bounds, and
`ckptio clean` running beside a training run never removes what that run needs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import ckptio
from ckptio.naming import scan


def test_thousands_of_saves_with_retention_keep_memory_descriptors_and_files_flat(tmp_path: Path) -> None:
    process = psutil.Process()
    model = torch.nn.Linear(64, 64)
    state = {"epoch": 1, "batch": 0, "model_state_dict": model.state_dict()}
    with ckptio.CheckpointManager(tmp_path, keep_count=3, fsync=False) as mgr:
        for step in range(200):  # warm-up: buffers, allocator pools, the index
            mgr.save({**state, "batch": step}, name=f"checkpoint_epoch_1_batch_{step}")
        mgr.wait()
        rss_before, fds_before = process.memory_info().rss, process.num_fds()
        for step in range(200, 2200):
            with torch.no_grad():
                model.weight.add_(1.0)
            mgr.save({**state, "batch": step}, name=f"checkpoint_epoch_1_batch_{step}")
        mgr.wait()
        rss_after, fds_after = process.memory_info().rss, process.num_fds()
        assert mgr.stats.committed == 2200 and mgr.stats.failed == 0
    assert fds_after <= fds_before
    assert rss_after - rss_before < 24 * 2**20
    names = sorted(e.name for e in scan(tmp_path))
    assert names == [f"checkpoint_epoch_1_batch_{s}" for s in (2197, 2198, 2199)]
    newest = ckptio.load(tmp_path / "checkpoint_epoch_1_batch_2199.pth")
    assert torch.equal(newest["model_state_dict"]["weight"], model.weight.detach())


@pytest.mark.slow
def test_clean_beside_a_running_training_never_removes_the_newest_or_in_flight_checkpoint(tmp_path: Path) -> None:
    run = subprocess.Popen(
        [sys.executable, "-m", "craft_train", "--synthetic-size", "8", "--image-size", "64", "--batch-size", "2",
         "--workers", "0", "--val-fraction", "0", "--epochs", "2", "--save-freq", "1", "--async-save",
         "--save-dir", "ck", "--device", "cpu"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    directory = tmp_path / "ck"
    cleans = 0
    try:
        while run.poll() is None:
            if directory.exists() and len(scan(directory)) >= 2:
                done = subprocess.run([sys.executable, "-m", "ckptio", "clean", "ck", "--keep-count", "1"],
                                      cwd=tmp_path, capture_output=True, text=True)
                assert done.returncode == 0, done.stderr
                cleans += 1
                kept = done.stdout.split("newest valid: ")[1].split(")")[0]
                assert f"deleted: {kept}" not in done.stdout
                assert (directory / kept).exists() or scan(directory)[0].name != kept
                remaining = scan(directory)
                assert remaining and ckptio.verify(remaining[0].path).ok
            time.sleep(0.2)
    finally:
        try:
            _, err = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert run.returncode == 0, err
    assert cleans >= 2
    assert "Traceback" not in err
    assert ckptio.verify(directory).ok
    assert scan(directory)[0].name == "checkpoint_epoch_2_batch_4"
