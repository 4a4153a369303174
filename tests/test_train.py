"""The trainer end to end: `python -m craft_train` as a user runs it, on synthetic and ICDAR-style data."""

from __future__ import annotations

import os
import re
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
from ckptio.slim import is_slim
from craft_train.cli import _underscores_to_dashes, main
from craft_train.config import TrainConfig
from craft_train.train import train

TINY = ["--synthetic-size", "8", "--image-size", "64", "--batch-size", "2", "--workers", "0", "--val-fraction", "0.25",
        "--device", "cpu"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "craft_train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_run_writes_batch_checkpoints_and_best_model_with_the_guides_fields_and_progress_line(
        tmp_path: Path) -> None:
    done = _run(*TINY, "--epochs", "1", "--save-freq", "2", "--async-save", "--keep-full", "1", "--save-dir", "ck",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith("."))
    # 6 training images in batches of 2: a save at batch 2, the final one at batch 3, and the best model.
    assert names == ["best_model.pth", "checkpoint_epoch_1_batch_2.pth", "checkpoint_epoch_1_batch_3.pth"]
    state = torch.load(tmp_path / "ck" / "checkpoint_epoch_1_batch_3.pth", weights_only=True)
    assert (state["epoch"], state["batch"], state["total_batches"]) == (1, 3, 3)
    for field in ("model_state_dict", "optimizer_state_dict", "train_loss", "cls_loss", "geo_loss"):
        assert field in state
    assert len(state["model_state_dict"]) == 154
    assert state["train_loss"] > 0
    # --keep-full 1: the older checkpoint keeps the weights and the guide's scalars, not the optimizer
    slim = torch.load(tmp_path / "ck" / "checkpoint_epoch_1_batch_2.pth", weights_only=True)
    assert "optimizer_state_dict" not in slim and len(slim["model_state_dict"]) == 154
    assert (slim["epoch"], slim["batch"], slim["total_batches"]) == (1, 2, 3)
    assert is_slim(ckptio.read_meta(tmp_path / "ck" / "checkpoint_epoch_1_batch_2.pth")[0].meta)
    assert "slimmed checkpoint_epoch_1_batch_2.pth to its model weights" in done.stdout
    # the guide's progress line, as plain lines without a terminal; each save reported once it is durable
    assert re.search(r"^Epoch 1 - 训练 \[(保存中|已保存): batch 2\]: +\d+% 3/3 \[.*, loss=\d\.\d{4}, cls=\d\.\d{4}, "
                     r"geo=\d\.\d{4}, errors=0, avg_loss=\d\.\d{4}\]$", done.stdout, re.MULTILINE), done.stdout
    assert "saved checkpoint_epoch_1_batch_2.pth (" in done.stdout
    assert "saved checkpoint_epoch_1_batch_3.pth (" in done.stdout
    assert "done: 3 steps" in done.stdout and "3 checkpoints saved, 0 skipped, 0 failed" in done.stdout
    assert "Epoch 1 - 验证: train_loss=" in done.stdout and "saved best_model.pth" in done.stdout
    assert ckptio.verify(tmp_path / "ck").ok


def test_guide_underscore_flags_are_accepted() -> None:
    assert _underscores_to_dashes(["--batch_size", "16", "--save_freq=50", "x_y"]) == [
        "--batch-size", "16", "--save-freq=50", "x_y"]


@pytest.mark.parametrize(("args", "message"), [
    (["--image-size", "100"], "--image-size must be a positive multiple of 32"),
    (["--keep-count", "0"], "--keep-count must be at least 1"),
    (["--keep-full", "0"], "--keep-full must be at least 1"),
    (["--save-dir", "a_file"], "--save-dir a_file is a file, not a directory"),
    (["--save-dir", "a_file/ck"], "--save-dir a_file/ck: checkpoints cannot be written there"),
])
def test_bad_settings_exit_2_naming_the_flag_before_any_model_or_data_is_set_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    # a data directory that does not exist: had the data been set up first, that would be the error
    assert main(["--data-dir", "missing", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("craft_train: error: ") and message in err, err


def test_a_fresh_run_into_a_directory_holding_checkpoints_stops_and_points_at_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ckptio.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save({"w": torch.ones(2)}, name="checkpoint_epoch_1_batch_5")
    assert main(["--data-dir", str(tmp_path / "missing"), "--save-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "already holds 1 checkpoint(s)" in err and "checkpoint_epoch_1_batch_5.pth" in err
    assert "--resume auto" in err and "another --save-dir" in err and "--reuse-save-dir" in err
    # the override goes on to the next step (here: the missing data directory)
    assert main(["--data-dir", str(tmp_path / "missing"), "--save-dir", str(tmp_path), "--reuse-save-dir"]) != 0
    assert "already holds" not in capsys.readouterr().err


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path: Path) -> None:
    # SIGINT back to its default in the child even where the test runner ignores it (a child would inherit that);
    # --max-steps 1 bounds what the run can write if the signal were lost.
    process = subprocess.Popen([sys.executable, "-m", "craft_train", *TINY, "--save-dir", "ck", "--max-steps", "1"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(0.5)  # importing torch, building the model: whichever it is, the outcome must be the same
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, err
    assert "Traceback" not in err


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


def test_training_on_icdar_data_skips_counts_and_names_a_corrupt_image(tmp_path: Path) -> None:
    data = tmp_path / "icdar"
    _write_icdar(data)
    config = TrainConfig(data_dir=str(data), image_size=64, batch_size=4, epochs=2, workers=0, val_fraction=0.0,
                         save_dir=str(tmp_path / "ck"), save_freq=0, device="cpu")
    messages: list[str] = []
    result = train(config, say=messages.append)
    assert result.global_step == 2
    assert result.errors == 2  # the corrupt image, once per epoch
    assert result.bad_samples and all(s.startswith(f"{data / 'img_9.jpg'}: ") for s in result.bad_samples)
    assert any(m.startswith(f"skipped an unreadable sample: {data / 'img_9.jpg'}: ") for m in messages), messages
    assert any("errors=2" in m for m in messages), messages


def test_validation_counts_and_names_the_images_it_could_not_read(tmp_path: Path) -> None:
    from craft_train.data import IcdarDataset
    from craft_train.model import CRAFT
    from craft_train.train import _validate

    data = tmp_path / "icdar"
    _write_icdar(data)
    dataset = IcdarDataset(str(data), 64, augment=False)
    config = TrainConfig(data_dir=str(data), image_size=64, batch_size=2, workers=0)
    messages: list[str] = []
    loss = _validate(CRAFT(), dataset, list(range(len(dataset))), config, torch.device("cpu"), False,
                     messages.append)
    assert np.isfinite(loss)
    assert messages == [m for m in messages if m.startswith("validation left out 1 unreadable image(s) of 4: ")]
    assert len(messages) == 1 and str(data / "img_9.jpg") in messages[0], messages


def test_help_shows_every_default_and_no_default_for_switches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--image-size IMAGE_SIZE", "512"), ("--batch-size BATCH_SIZE", "16"),
                          ("--epochs EPOCHS", "50"), ("--save-dir SAVE_DIR", "checkpoints_improved")):
        assert f"{flag} (default: {default})" in text, flag
    assert "full precision on CUDA --deterministic" in text  # --no-amp: no "(default: True)"
    assert "(default: True)" not in text and "(default: False)" not in text
    assert "0 writes no batch checkpoints at all" in text


def test_a_shortened_flag_is_refused_instead_of_taken_for_a_longer_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--epoch", "1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --epoch" in capsys.readouterr().err


def test_icdar_data_with_mixed_in_synthetic_images_trains_on_both_and_still_names_the_corrupt_image(
    tmp_path: Path,
) -> None:
    data = tmp_path / "icdar"
    _write_icdar(data)  # 4 images, one of them corrupt: with --mix-synthetic 2, 4 + 2 samples, 2 steps of 3
    config = TrainConfig(data_dir=str(data), image_size=64, batch_size=3, epochs=1, workers=1, val_fraction=0.0,
                         mix_synthetic=2, save_dir=str(tmp_path / "ck"), save_freq=2, device="cpu")
    messages: list[str] = []
    result = train(config, say=messages.append)
    assert result.global_step == 2 and result.errors == 1
    assert result.bad_samples and result.bad_samples[0].startswith(f"{data / 'img_9.jpg'}: ")
    saved = ckptio.load(tmp_path / "ck" / "checkpoint_epoch_1_batch_2.pth")
    order = saved["data_order"]["permutation"].tolist()
    assert sorted(i for i in order if i < 4) == [0, 1, 2, 3] and len([i for i in order if i >= 4]) == 2
    assert saved["config"]["mix_synthetic"] == 2 and saved["total_batches"] == 2


def test_max_steps_stops_early_and_keeps_the_last_steps_in_a_final_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig(synthetic_size=8, image_size=64, batch_size=2, epochs=5, workers=0, val_fraction=0.25,
                         save_dir=str(tmp_path), save_freq=2, max_steps=3, device="cpu")
    result = train(config, say=lambda _: None)
    assert result.global_step == 3
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == [
        "checkpoint_epoch_1_batch_2.pth", "checkpoint_epoch_1_batch_3.pth"]


# A CI runner may start tests with SIGINT ignored, which a child inherits and Python then leaves ignored: restore
# Python's own handler so that the Ctrl-C below really interrupts the run.
_WITH_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('craft_train', run_name='__main__', alter_sys=True)")


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_finishes_queued_saves_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    # --keep-count bounds what the run can write if the interrupt were lost: 2 checkpoints and best_model.
    process = subprocess.Popen(
        [sys.executable, "-c", _WITH_CTRL_C, *TINY, "--epochs", "50", "--save-freq", "1", "--async-save",
         "--keep-count", "2", "--save-dir", "ck"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "ck").glob("checkpoint_*.pth")) and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "stopped by SIGINT" in out and "continue with --resume auto" in out, out[-2000:]
    leftovers = [p for p in (tmp_path / "ck").iterdir() if p.name.endswith(".ckptio-tmp")]
    assert leftovers == []
    assert ckptio.verify(tmp_path / "ck").ok
    assert os.listdir(tmp_path / "ck")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the advice is for machines without a GPU")
def test_without_a_gpu_a_full_size_run_says_what_it_costs_and_suggests_a_cpu_sized_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from craft_train.cli import CPU_SIZED, _parser, cpu_advice, next_step

    advice = cpu_advice(TrainConfig())
    assert advice is not None and "about 74 s on 2 CPU cores" in advice and "about 59 hours" in advice
    assert advice.endswith(CPU_SIZED)
    sized = vars(_parser().parse_args(CPU_SIZED.split()[3:]))
    sized.pop("demo")
    assert cpu_advice(TrainConfig(**sized)) is None  # the suggestion does not warn about itself
    assert next_step().startswith(CPU_SIZED)
    # printed before anything is set up (here: before the missing data directory stops the run)
    assert main(["--data-dir", str(tmp_path / "missing"), "--save-dir", str(tmp_path / "ck")]) == 2
    assert capsys.readouterr().out.startswith("no GPU here: at --image-size 512 --batch-size 16")
