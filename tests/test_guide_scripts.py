"""The batch-checkpoint guide's commands, typed as the guide writes them, run the trainer and ckptio's CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ckptio

ROOT = Path(__file__).resolve().parent.parent
# The guide's spelling, scaled down to a few seconds on a CPU.
TINY = ["--synthetic_size", "6", "--image_size", "64", "--workers", "0", "--val_fraction", "0", "--max_steps", "3"]


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_guides_training_and_checkpoint_commands_run_as_typed(tmp_path: Path) -> None:
    trained = _run("train_with_your_data_improved.py", "--epochs", "1", "--batch_size", "2", "--save_freq", "1",
                   *TINY, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    directory = tmp_path / "checkpoints_improved"
    assert ckptio.verify(directory).ok and len(ckptio.verify(directory).files) == 3

    listed = _run("manage_batch_checkpoints.py", "--action", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "🔄 批次检查点 (3个):" in listed.stdout and "checkpoint_epoch_1_batch_3.pth" in listed.stdout
    assert _run("manage_batch_checkpoints.py", "--save_dir", "checkpoints_improved", "--action", "list",
                cwd=tmp_path).stdout == listed.stdout
    info = _run("manage_batch_checkpoints.py", "--action", "info", "--checkpoint", "checkpoint_epoch_1_batch_2.pth",
                cwd=tmp_path)
    assert info.returncode == 0 and "  batch: 2\n" in info.stdout, info.stderr
    loaded = _run("manage_batch_checkpoints.py", "--action", "load", "--checkpoint",
                  "checkpoint_epoch_1_batch_3.pth", cwd=tmp_path)
    assert loaded.returncode == 0 and "model_state_dict" in loaded.stdout, loaded.stderr
    cleaned = _run("manage_batch_checkpoints.py", "--action", "clean", "--keep_count", "2", cwd=tmp_path)
    assert cleaned.returncode == 0, cleaned.stderr
    assert sorted(p.name for p in directory.glob("*.pth")) == ["checkpoint_epoch_1_batch_2.pth",
                                                               "checkpoint_epoch_1_batch_3.pth"]

    # the resume takes the run's settings (image size, batch size...) from the checkpoint: none retyped
    resumed = _run("train_with_your_data_improved.py", "--resume",
                   "checkpoints_improved/checkpoint_epoch_1_batch_3.pth", "--epochs", "2", "--max_steps", "4",
                   cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "global step 4" in resumed.stdout
