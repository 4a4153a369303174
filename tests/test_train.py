"""The trainer end to end: `python -m craft_train` as a user runs it, on synthetic and ICDAR-style data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import ckptio
from craft_train.cli import _underscores_to_dashes
from craft_train.config import TrainConfig
from craft_train.train import train

TINY = ["--synthetic-size", "8", "--image-size", "64", "--batch-size", "2", "--workers", "0", "--val-fraction", "0.25"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "craft_train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_run_writes_batch_checkpoints_and_best_model_with_the_guides_fields(tmp_path: Path) -> None:
    done = _run(*TINY, "--epochs", "1", "--save-freq", "2", "--async-save", "--save-dir", "ck", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith("."))
    # 6 training images in batches of 2: a save at batch 2, the final one at batch 3, and the best model.
    assert names == ["best_model.pth", "checkpoint_epoch_1_batch_2.pth", "checkpoint_epoch_1_batch_3.pth"]
    state = torch.load(tmp_path / "ck" / "checkpoint_epoch_1_batch_2.pth", weights_only=True)
    assert (state["epoch"], state["batch"], state["total_batches"]) == (1, 2, 3)
    for field in ("model_state_dict", "optimizer_state_dict", "train_loss", "cls_loss", "geo_loss"):
        assert field in state
    assert len(state["model_state_dict"]) == 154
    assert state["train_loss"] > 0
    assert "done: 3 steps" in done.stdout
    assert "val_loss=" in done.stdout and "saved best_model" in done.stdout
    assert ckptio.verify(tmp_path / "ck").ok


def test_guide_underscore_flags_are_accepted() -> None:
    assert _underscores_to_dashes(["--batch_size", "16", "--save_freq=50", "x_y"]) == [
        "--batch-size", "16", "--save-freq=50", "x_y"]


def test_bad_settings_exit_2_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    done = _run("--image-size", "100", cwd=tmp_path)
    assert done.returncode == 2
    assert "multiple of 32" in done.stderr and "Traceback" not in done.stderr


def _write_icdar(directory: Path) -> None:
    directory.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        cv2.putText(image, "TEXT", (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 3)
        cv2.imwrite(str(directory / f"img_{i}.jpg"), image)
        (directory / f"gt_img_{i}.txt").write_text(
            "\ufeff10,30,110,30,110,70,10,70,TEXT\n5,5,20,5,20,15,5,15,###\n", encoding="utf-8")
    (directory / "img_9.jpg").write_bytes(b"not a jpeg")
    (directory / "gt_img_9.txt").write_text("1,1,5,1,5,5,1,5,AB\n")


def test_training_on_icdar_data_skips_and_counts_a_corrupt_image(tmp_path: Path) -> None:
    data = tmp_path / "icdar"
    _write_icdar(data)
    config = TrainConfig(data_dir=str(data), image_size=64, batch_size=4, epochs=2, workers=0, val_fraction=0.0,
                         save_dir=str(tmp_path / "ck"), save_freq=0)
    result = train(config, say=lambda _: None)
    assert result.global_step == 2
    assert result.errors == 2  # the corrupt image, once per epoch


def test_max_steps_stops_early_and_keeps_the_last_steps_in_a_final_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig(synthetic_size=8, image_size=64, batch_size=2, epochs=5, workers=0, val_fraction=0.25,
                         save_dir=str(tmp_path), save_freq=2, max_steps=3)
    result = train(config, say=lambda _: None)
    assert result.global_step == 3
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == [
        "checkpoint_epoch_1_batch_2.pth", "checkpoint_epoch_1_batch_3.pth"]


@pytest.mark.slow
def test_ctrl_c_finishes_queued_saves_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "craft_train", *TINY, "--epochs", "50", "--save-freq", "1", "--async-save",
         "--save-dir", "ck"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "ck").glob("checkpoint_*.pth")) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in out
    leftovers = [p for p in (tmp_path / "ck").iterdir() if p.name.endswith(".ckptio-tmp")]
    assert leftovers == []
    assert ckptio.verify(tmp_path / "ck").ok
    assert os.listdir(tmp_path / "ck")
