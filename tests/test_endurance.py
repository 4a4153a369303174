"""Long runs and concurrent hands: thousands of saves keep memory, descriptors and files at their bounds, and
`ckptio clean` running beside a training run never removes what that run needs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

import ckptio
from ckptio.atomic import HOLD_ENV, TEMP_SUFFIX
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


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(TEMP_SUFFIX)] if directory.exists() else []


def _wait_until(condition: Callable[[], object], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.slow
def test_clean_beside_a_running_training_never_removes_the_newest_or_in_flight_checkpoint(tmp_path: Path) -> None:
    # Each round holds one of the run's writes before its rename (ckptio.atomic.HOLD_ENV): the run cannot end
    # while it is held, so every clean certainly runs beside the training with a write in flight, however fast or
    # slow this machine is.
    hold = tmp_path / "hold-writes"
    hold.touch()
    run = subprocess.Popen(
        [sys.executable, "-m", "craft_train", "--synthetic-size", "8", "--image-size", "64", "--batch-size", "2",
         "--workers", "0", "--val-fraction", "0", "--epochs", "2", "--save-freq", "1", "--async-save",
         "--save-dir", "ck", "--device", "cpu"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, **{HOLD_ENV: str(hold)}))
    directory = tmp_path / "ck"
    cleans = 0
    try:
        for _ in range(3):
            _wait_until(lambda: _temporaries(directory) or run.poll() is not None)
            assert run.poll() is None, "the run ended with a write held"
            in_flight = _temporaries(directory)
            done = subprocess.run([sys.executable, "-m", "ckptio", "clean", "ck", "--keep-count", "1"],
                                  cwd=tmp_path, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            cleans += 1
            if "newest valid: " in done.stdout:
                kept = done.stdout.split("newest valid: ")[1].split(")")[0]
                assert f"deleted: {kept}" not in done.stdout
                assert (directory / kept).exists()
            assert all(path.exists() for path in in_flight), "clean removed a write in flight"
            remaining = scan(directory)
            assert not remaining or ckptio.verify(remaining[0].path).ok
            committed = {entry.path.name for entry in remaining}
            hold.unlink()  # the held write commits; the next one is held again
            _wait_until(lambda before=committed: {e.path.name for e in scan(directory)} - before
                        or run.poll() is not None)
            hold.touch()
        hold.unlink()
    finally:
        hold.unlink(missing_ok=True)
        try:
            _, err = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert run.returncode == 0, err
    assert cleans == 3
    assert "Traceback" not in err
    assert ckptio.verify(directory).ok
    assert scan(directory)[0].name == "checkpoint_epoch_2_batch_4"
