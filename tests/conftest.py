"""The one CRAFT model the suite trains from scratch, trained in the background while the other tests run.

Training is the suite's largest single cost (200 steps at 128 px: ~3.5 minutes of a 2-core machine's CPU), and
the rest of the suite leaves about a third of the CPU idle (process start-ups, lock waits, file I/O). So when a
selected test needs the model, the real trainer (``python -m craft_train``) starts on one thread as soon as the
tests are collected, and the tests that need it are moved to the end of the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import TrainedOnSynthetic

from craft_train.config import TrainConfig
from craft_train.model import CRAFT

TRAINED_STEPS = 200
"""Enough for the region score to split words into characters better than an even split (weak supervision's
interim model, tests/test_weak.py) and to find words at the official thresholds (tests/test_evaluate.py)."""

TRAINED_CONFIG = TrainConfig(synthetic_size=1000, val_fraction=32 / 1000, image_size=128, augment=False, batch_size=4,
                             lr=1e-3, epochs=1, max_steps=TRAINED_STEPS, save_freq=TRAINED_STEPS, workers=0,
                             device="cpu")
_WAIT_SECONDS = 1200  # the training alone, on a slow machine with the whole suite competing


@dataclass
class _Training:
    process: subprocess.Popen[bytes]
    directory: Path
    started: float


_TRAINING = pytest.StashKey[_Training]()


def _start_training() -> _Training:
    c = TRAINED_CONFIG
    directory = Path(tempfile.mkdtemp(prefix="ckptio-trained-"))
    args = [sys.executable, "-m", "craft_train", "--synthetic-size", str(c.synthetic_size), "--val-fraction",
            str(c.val_fraction), "--image-size", str(c.image_size), "--no-augment", "--batch-size", str(c.batch_size),
            "--lr", str(c.lr), "--epochs", str(c.epochs), "--max-steps", str(c.max_steps), "--save-freq",
            str(c.save_freq), "--workers", str(c.workers), "--device", c.device, "--seed", str(c.seed),
            "--save-dir", str(directory / "checkpoints")]
    # One thread: the other core stays with the tests. The log is bounded (no terminal: a line every few steps).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(directory / "train.log", "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return _Training(process, directory, time.monotonic())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needing = [item for item in items if "trained_on_synthetic" in getattr(item, "fixturenames", ())]
    if not needing:
        return
    items[:] = [item for item in items if item not in needing] + needing
    config.stash[_TRAINING] = _start_training()


def pytest_unconfigure(config: pytest.Config) -> None:
    training = config.stash.get(_TRAINING, None)
    if training is None:
        return
    if training.process.poll() is None:  # the run was cut short: the trainer must not outlive it
        training.process.kill()
        training.process.wait()
    shutil.rmtree(training.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_on_synthetic(request: pytest.FixtureRequest) -> TrainedOnSynthetic:
    """``TRAINED_STEPS`` steps of ``python -m craft_train`` from scratch: batch 4, 128 px, Adam 1e-3, no
    augmentation, synthetic seed 0 (968 training images, 32 held out), one thread."""
    import ckptio

    training = request.config.stash.get(_TRAINING, None)
    if training is None:  # collected some other way: train now
        training = request.config.stash[_TRAINING] = _start_training()
    try:
        code = training.process.wait(timeout=max(1.0, _WAIT_SECONDS - (time.monotonic() - training.started)))
    except subprocess.TimeoutExpired:
        training.process.kill()
        training.process.wait()
        code = None
    log = (training.directory / "train.log").read_text(errors="replace")
    assert code == 0, f"the background training ended with {code}:\n{log[-3000:]}"
    state = ckptio.load(training.directory / "checkpoints" / f"checkpoint_epoch_1_batch_{TRAINED_STEPS}.pth")
    assert state["global_step"] == TRAINED_STEPS, log[-3000:]
    torch.manual_seed(TRAINED_CONFIG.seed)  # the trainer's initial weights
    untrained = CRAFT()
    trained = CRAFT()
    trained.load_state_dict(state["model_state_dict"])
    return TrainedOnSynthetic(TRAINED_CONFIG, untrained.eval(), trained.eval(), TRAINED_STEPS)
