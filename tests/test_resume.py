"""Exact batch-level resume: stopping and resuming gives bit-identical weights to never having stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
import craft_train.train as train_module
from ckptio import cli as ckptio_cli
from ckptio.naming import file_name, scan
from ckptio.slim import slim_checkpoint
from ckptio.snapshot import state_shape
from craft_train.build import checked_optimizer_state
from craft_train.config import TrainConfig, incompatible_changes
from craft_train.resume import find_resume_checkpoint
from craft_train.train import TrainResult, train

# 10 synthetic images, 2 held out: 4 batches of 2 per epoch, so 10 steps span three epochs. On the CPU even on
# a GPU machine: the bit-identical comparisons hold for CPU kernels without AMP (tests/test_cuda.py has CUDA's).
BASE = dict(synthetic_size=10, image_size=64, batch_size=2, epochs=3, val_fraction=0.2, seed=7, workers=1,
            augment=True, device="cpu")


def _quiet(_: str) -> None:
    pass


def _config(**overrides: object) -> TrainConfig:
    return TrainConfig(**{**BASE, **overrides})  # type: ignore[arg-type]


def _assert_same_training_state(a: TrainResult, b: TrainResult) -> None:
    assert a.model is not None and b.model is not None and a.optimizer is not None and b.optimizer is not None
    model_a, model_b = a.model.state_dict(), b.model.state_dict()
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, slots in opt_a["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    directory = tmp_path_factory.mktemp("straight")
    return train(_config(save_dir=str(directory), save_freq=0, max_steps=10), say=_quiet)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run that saves after each of its 6 steps (in the background) and after epoch 1's validation
    (best_model): the checkpoints that the tests below resume from, inspect or copy. Nothing writes here later."""
    directory = tmp_path_factory.mktemp("six_steps")
    train(_config(save_dir=str(directory), save_freq=1, max_steps=6, async_save=True), say=_quiet)
    return directory


def _at_step(directory: Path, step: int) -> Path:
    """The checkpoint of global step ``step`` (4 batches an epoch)."""
    return directory / f"checkpoint_epoch_{(step - 1) // 4 + 1}_batch_{(step - 1) % 4 + 1}.pth"


def _copy(sources: list[Path], directory: Path) -> list[Path]:
    for source in sources:
        shutil.copy2(source, directory / source.name)
    return [directory / source.name for source in sources]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fmt", "compression", "async_save", "stop_at"),
    [
        ("torch", None, True, 5),  # mid-epoch 2, after crossing the first epoch boundary
        ("torch", "zstd", False, 3),  # mid-epoch 1: the resumed run crosses two boundaries
        ("safetensors", None, False, 4),  # exactly at an epoch's end, before its validation
        ("safetensors", "zstd", True, 6),
    ],
)
def test_resuming_from_a_batch_checkpoint_is_bit_identical_to_an_uninterrupted_run(
    tmp_path: Path, six_steps: Path, uninterrupted: TrainResult, fmt: str, compression: str | None,
    async_save: bool, stop_at: int
) -> None:
    # The shared run's checkpoint of step `stop_at`, written again in this case's format and writer mode.
    source = _at_step(six_steps, stop_at)
    with ckptio.CheckpointManager(tmp_path, format=fmt, compression=compression, async_save=async_save) as mgr:
        mgr.save(ckptio.load(source), name=source.stem)
    common = dict(save_dir=str(tmp_path), format=fmt, compression=compression, async_save=async_save)
    messages: list[str] = []
    resumed = train(_config(**common, save_freq=6, max_steps=10, resume="auto"), say=messages.append)
    assert any(m.startswith("resumed from") and f"global step {stop_at}" in m for m in messages), messages
    assert resumed.global_step == 10
    assert any(m.startswith(f"done: {10 - stop_at} steps in ") and "(global step 10, resumed at" in m
               for m in messages), messages
    _assert_same_training_state(uninterrupted, resumed)
    # --save-freq 6 counts steps across the 4-batch epochs: step 6 is epoch 2 batch 2, and the final checkpoint
    # (step 10, epoch 3 batch 2), written in this case's format, holds the uninterrupted run's weights
    written = sorted(p.name.split(".")[0] for p in resumed.saved_paths if p.name.startswith("checkpoint_"))
    assert written == ["checkpoint_epoch_2_batch_2", "checkpoint_epoch_3_batch_2"][(stop_at >= 6):], written
    final = ckptio.load(tmp_path / file_name("checkpoint_epoch_3_batch_2", fmt, compression))
    assert final["global_step"] == 10
    assert uninterrupted.model is not None
    for key, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(final["model_state_dict"][key], tensor), key


@pytest.mark.slow
def test_resuming_from_best_model_does_not_validate_again_and_is_bit_identical(
        tmp_path: Path, six_steps: Path, uninterrupted: TrainResult) -> None:
    best = ckptio.load(six_steps / "best_model.pth")
    assert best["epoch_validated"] and (best["epoch"], best["batch"], best["global_step"]) == (1, 4, 4)
    messages: list[str] = []
    resumed = train(_config(save_dir=str(tmp_path), save_freq=0, max_steps=10,
                            resume=str(six_steps / "best_model.pth")), say=messages.append)
    # the checkpoint holds epoch 1's validation: the resumed run goes straight on to epoch 2
    assert not any(m.startswith("Epoch 1 - ") for m in messages), messages
    assert any(m.startswith("Epoch 2 - 训练") for m in messages), messages
    assert any(m.startswith("Epoch 2 - 验证") for m in messages), messages
    assert any(m.startswith("done: 6 steps in ") for m in messages), messages
    assert resumed.global_step == 10
    _assert_same_training_state(uninterrupted, resumed)


def test_a_run_saving_every_step_names_its_checkpoints_by_epoch_and_batch(six_steps: Path) -> None:
    assert sorted(e.name for e in scan(six_steps)) == [
        "best_model", "checkpoint_epoch_1_batch_1", "checkpoint_epoch_1_batch_2", "checkpoint_epoch_1_batch_3",
        "checkpoint_epoch_1_batch_4", "checkpoint_epoch_2_batch_1", "checkpoint_epoch_2_batch_2"]
    assert ckptio.verify(six_steps).ok


def test_resume_auto_skips_a_corrupt_newest_checkpoint_and_says_so(tmp_path: Path, six_steps: Path) -> None:
    _, newest = _copy([_at_step(six_steps, 1), _at_step(six_steps, 2)], tmp_path)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    messages: list[str] = []
    resumed = train(_config(save_dir=str(tmp_path), workers=0, save_freq=0, max_steps=3, resume="auto"),
                    say=messages.append)
    assert any("skipping checkpoint_epoch_1_batch_2.pth: corrupt" in m for m in messages), messages
    assert any("resumed from" in m and "checkpoint_epoch_1_batch_1.pth" in m for m in messages), messages
    assert resumed.global_step == 3


def test_resume_auto_in_an_empty_directory_starts_fresh_and_says_so(tmp_path: Path) -> None:
    messages: list[str] = []
    result = train(_config(save_dir=str(tmp_path / "new"), save_freq=0, max_steps=1, workers=0, resume="auto"),
                   say=messages.append)
    assert result.global_step == 1
    assert any("starting a fresh run" in m for m in messages), messages


def test_resume_with_another_image_size_is_refused_with_a_clear_message(tmp_path: Path, six_steps: Path) -> None:
    with pytest.raises(ValueError, match="image_size: checkpoint has 64, this run has 96"):
        train(_config(workers=0, image_size=96, save_dir=str(tmp_path), resume=str(_at_step(six_steps, 1))),
              say=_quiet)


def test_resume_from_a_file_without_training_state_suggests_pretrained(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pth"
    torch.save({"model_state_dict": {}}, weights)
    with pytest.raises(ValueError, match="--pretrained"):
        train(_config(workers=0, save_dir=str(tmp_path / "run"), resume=str(weights)), say=_quiet)


def test_checkpoint_holds_everything_a_resume_needs(six_steps: Path) -> None:
    state = ckptio.load(_at_step(six_steps, 3))
    for key in ("epoch", "batch", "total_batches", "global_step", "model_state_dict", "optimizer_state_dict",
                "scheduler_state_dict", "scaler_state_dict", "train_loss", "cls_loss", "geo_loss", "rng_state",
                "data_order", "best_val_loss", "config", "loss_sums", "epoch_validated"):
        assert key in state, key
    assert (state["epoch"], state["batch"], state["total_batches"], state["global_step"]) == (1, 3, 4, 3)
    assert set(state["rng_state"]) >= {"python", "numpy", "torch"}
    assert state["data_order"]["position"] == 6
    assert len(set(state["data_order"]["permutation"].tolist())) == 8
    assert state["train_loss"] == pytest.approx(state["cls_loss"] + state["geo_loss"])
    assert state["epoch_validated"] is False  # saved mid-epoch: a resume validates at the epoch's end


def test_ckptio_info_shows_the_resume_point(six_steps: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ckptio_cli.main(["info", str(_at_step(six_steps, 2)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resume_point"] == {"epoch": 1, "batch": 2, "global_step": 2}


def test_a_slim_checkpoint_is_refused_for_resume_and_skipped_by_resume_auto(tmp_path: Path, six_steps: Path) -> None:
    older, newest = _copy([_at_step(six_steps, 1), _at_step(six_steps, 2)], tmp_path)
    slim_checkpoint(older)
    common = dict(save_dir=str(tmp_path), workers=0)
    with pytest.raises(ValueError, match="model weights only.*--pretrained"):
        train(_config(**common, resume=str(older)), say=_quiet)
    slim_checkpoint(newest)
    messages: list[str] = []
    with pytest.raises(ValueError, match="already holds 2 checkpoint"):  # a fresh run would mix with them
        train(_config(**common, max_steps=3), say=messages.append)
    with pytest.raises(ValueError, match=r"none of the 2 checkpoint\(s\).*weights only.*--pretrained"):
        train(_config(**common, max_steps=1, resume="auto"), say=messages.append)
    assert sum("holds the model weights only (--keep-full)" in m for m in messages) == 2, messages


def test_resume_auto_stops_naming_the_damaged_checkpoints_and_leaves_them_as_they_were(
        tmp_path: Path, six_steps: Path) -> None:
    damaged = _copy([_at_step(six_steps, 1), _at_step(six_steps, 2)], tmp_path)
    for path in damaged:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in damaged}
    with pytest.raises(ValueError, match=r"checkpoint_epoch_1_batch_2\.pth: corrupt.*checkpoint_epoch_1_batch_1"):
        train(_config(save_dir=str(tmp_path), workers=0, save_freq=1, max_steps=2, resume="auto"), say=_quiet)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".pth"} == before


def test_a_resume_from_the_command_line_takes_the_checkpoints_settings_and_reports_safe_changes(
        tmp_path: Path, six_steps: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from craft_train.cli import main

    (copy,) = _copy([_at_step(six_steps, 6)], tmp_path)
    # the run stopped at its --max-steps 6: resumed as it was, it has nothing left to do, and says so
    assert main(["--resume", str(copy), "--save-dir", str(tmp_path), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "already reached --max-steps 6" in out and "done: 0 steps" in out
    # Neither --synthetic-size, --image-size nor --batch-size is typed: their defaults (1000, 512, 16) must not
    # count as this run's choice.
    assert main(["--resume", str(copy), "--save-dir", str(tmp_path), "--max-steps", "7", "--save_freq", "0",
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "global step 7" in out
    assert "--max-steps 7 (the checkpoint had 6)" in out and "--save-freq 0 (the checkpoint had 1)" in out
    assert main(["--resume", str(copy), "--save-dir", str(tmp_path), "--image-size", "96"]) == 2
    assert "image_size: checkpoint has 64, this run has 96" in capsys.readouterr().err


@pytest.mark.slow
def test_a_weakly_supervised_run_mixing_in_character_level_images_resumes_bit_identically(tmp_path: Path) -> None:
    """Weak supervision labels each batch with the weights being trained: a resumed run relabels from the restored
    weights, so it must still match the uninterrupted run bit for bit (word-level synthetic data, 2 workers),
    with a character-level synthetic image after every 3 of the run's own (--mix-synthetic 3)."""
    weak = dict(synthetic_labels="word", workers=2, val_fraction=0.0, mix_synthetic=3)  # 10 + 4 images: 7 steps
    straight = train(_config(**weak, save_dir=str(tmp_path / "straight"), save_freq=0, max_steps=6), say=_quiet)
    first = train(_config(**weak, save_dir=str(tmp_path / "run"), save_freq=3, max_steps=3), say=_quiet)
    assert first.global_step == 3
    saved = ckptio.load(tmp_path / "run" / "checkpoint_epoch_1_batch_3.pth")
    order = saved["data_order"]["permutation"].tolist()
    assert saved["total_batches"] == 7 and len(order) == 14 and saved["data_order"]["position"] == 6
    assert sorted(i for i in order if i < 10) == list(range(10))  # every image of the run's own, once
    assert len([i for i in order if i >= 10]) == 4 and order[3] >= 10  # and 4 character-level ones mixed in
    resumed = train(_config(**weak, save_dir=str(tmp_path / "run"), save_freq=100, max_steps=6, resume="auto"),
                    say=_quiet)
    assert resumed.global_step == 6
    _assert_same_training_state(straight, resumed)
    messages: list[str] = []
    with pytest.raises(ValueError, match="mix_synthetic: checkpoint has 3, this run has 5"):
        train(_config(**{**weak, "mix_synthetic": 5}, save_dir=str(tmp_path / "run"), resume="auto"),
              say=messages.append)


def test_a_setting_that_an_older_checkpoint_lacks_counts_as_its_default_when_resuming() -> None:
    written_before_mixing = {k: v for k, v in _config().to_dict().items() if k != "mix_synthetic"}
    assert incompatible_changes(written_before_mixing, _config()) == []
    assert incompatible_changes(written_before_mixing, _config(synthetic_labels="word", mix_synthetic=5)) == [
        "synthetic_labels: checkpoint has 'char', this run has 'word'",
        "mix_synthetic: checkpoint has 0, this run has 5"]


@pytest.mark.parametrize("damage", ["optimizer state of another shape", "model weights of another shape"])
def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_refused_naming_the_file(
    tmp_path: Path, six_steps: Path, damage: str
) -> None:
    # Before: a forged Adam moment of the wrong shape passed the resume and failed inside the first step with a
    # traceback.
    state = ckptio.load(_at_step(six_steps, 2))
    if damage.startswith("optimizer"):
        state["optimizer_state_dict"]["state"][0]["exp_avg"] = torch.zeros(3)
        expected = "optimizer state of parameter 0 .*'exp_avg' is \\(3,\\)"
    else:
        first = next(iter(state["model_state_dict"]))
        state["model_state_dict"][first] = torch.zeros(3)
        expected = "model weights do not fit CRAFT"
    with ckptio.CheckpointManager(tmp_path / "forged", async_save=False, fsync=False) as manager:
        saved = manager.save(state, name="checkpoint_epoch_1_batch_2")
        assert saved is not None
        path = saved.result().path
    with pytest.raises(ValueError, match=f"{path.name}: .*{expected}.*resume from another checkpoint"):
        train(_config(save_dir=str(tmp_path / "forged"), workers=0, resume=str(path)), say=_quiet)


def _stepped_adam() -> tuple[torch.nn.Parameter, torch.optim.Adam]:
    param = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.grad = torch.ones(4, 3)
    optimizer.step()
    return param, optimizer


@pytest.mark.parametrize("overlapping", [torch.zeros(1).expand(4, 3), torch.zeros(12).as_strided((4, 3), (1, 1))],
                         ids=["stride 0", "overlapping strides"])
def test_optimizer_moments_whose_elements_share_memory_are_made_dense_before_the_first_step(
    overlapping: torch.Tensor,
) -> None:
    # Before: a stride-0 moment (torch.zeros(1).expand(...), kept as such by torch.save) made Adam's in-place
    # update fail with "more than one element of the written-to tensor refers to a single memory location";
    # overlapping strides let it update aliased elements silently.
    param, optimizer = _stepped_adam()
    optimizer.state[param]["exp_avg"] = overlapping
    checked_optimizer_state(optimizer, "forged.pth")
    moment = optimizer.state[param]["exp_avg"]
    assert moment.stride() == (3, 1) and torch.equal(moment, overlapping.clone())
    optimizer.step()  # works


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("exp_avg_sq", torch.zeros(12), "'exp_avg_sq' is \\(12,\\)"),
    ("exp_avg", torch.tensor(0.0), "'exp_avg' is \\(\\)"),  # 0-dim: broadcasting would fail inside step()
    ("exp_avg", 5, "'exp_avg' is int"),
    ("exp_avg", None, "lacks exp_avg"),
    ("step", "seven", "step counter that is not a number"),
])
def test_forged_optimizer_state_is_refused_naming_the_file(name: str, value: object, expected: str) -> None:
    param, optimizer = _stepped_adam()
    if value is None:
        del optimizer.state[param][name]
    else:
        optimizer.state[param][name] = value
    with pytest.raises(ValueError, match=f"forged.pth: the optimizer state of parameter 0 .*{expected}"):
        checked_optimizer_state(optimizer, "forged.pth")


def test_a_checkpoint_written_without_amp_resumes_into_a_run_whose_amp_scaler_is_on_and_says_so(
        tmp_path: Path, six_steps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU run saves the disabled scaler's empty state; on CUDA with AMP the scaler is on. The CPU plays that
    # run with a real scaler switched on (GradScaler("cpu")), through the trainer's own resume path.
    real = torch.amp.GradScaler
    scalers: list[torch.amp.GradScaler] = []

    def amp_scaler(device: str = "cuda", **options: object) -> torch.amp.GradScaler:
        scalers.append(real("cpu", **{**options, "enabled": True}))  # type: ignore[arg-type]
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", amp_scaler)
    checkpoint = _at_step(six_steps, 2)
    assert ckptio.load(checkpoint)["scaler_state_dict"] == {}
    messages: list[str] = []
    result = train(_config(save_dir=str(tmp_path), workers=0, save_freq=0, max_steps=3, resume=str(checkpoint)),
                   say=messages.append)
    assert result.start_step == 2 and result.global_step == 3
    assert scalers and scalers[0].is_enabled() and scalers[0].state_dict()["scale"] > 0
    assert any("written without AMP" in m and "starts fresh" in m for m in messages), messages


def test_the_first_save_after_steps_that_amp_skipped_finds_buffers_prepared_for_its_layout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # AMP skips the first steps of most runs (inf gradients while the scale settles): Adam has no state yet.
    real_step = train_module.step_optimizer
    steps: list[int] = []

    def skips_the_first_two(optimizer: Any, scaler: Any, scheduler: Any) -> bool:
        steps.append(1)
        return False if len(steps) <= 2 else real_step(optimizer, scaler, scheduler)

    prepared: list[Any] = []
    saved: list[Any] = []
    real_prepare, real_save = ckptio.CheckpointManager.prepare, ckptio.CheckpointManager.save

    def prepare(self: Any, state: Any, **kwargs: Any) -> None:
        prepared.append(state_shape(state))
        real_prepare(self, state, **kwargs)

    def save(self: Any, state: Any, **kwargs: Any) -> Any:
        saved.append(state_shape(state))
        return real_save(self, state, **kwargs)

    monkeypatch.setattr(train_module, "step_optimizer", skips_the_first_two)
    monkeypatch.setattr(ckptio.CheckpointManager, "prepare", prepare)
    monkeypatch.setattr(ckptio.CheckpointManager, "save", save)
    train(_config(save_dir=str(tmp_path), workers=0, val_fraction=0.0, save_freq=4, max_steps=4, async_save=True),
          say=_quiet)
    assert len(saved) == 1 and prepared, "no save, or nothing prepared"
    assert prepared[-1] == saved[0], "the first save's layout (with Adam's moments) was never prepared"
def test_a_run_resumed_at_its_last_step_trains_no_further_step(tmp_path: Path, six_steps: Path) -> None:
    (last,) = _copy([_at_step(six_steps, 3)], tmp_path)
    result = train(_config(save_dir=str(tmp_path), workers=0, save_freq=1, max_steps=3, resume="auto"), say=_quiet)
    assert result.start_step == result.global_step == 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [last.name]
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_resume_auto_picks_and_loads_a_zstd_checkpoint_of_fresh_zero_state_that_compresses_past_1024x(
        tmp_path: Path, fmt: str) -> None:
    state = {"epoch": 1, "batch": 2, "global_step": 2, "model_state_dict": {"w": torch.zeros(2**21)},
             "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(2**21)}}, "param_groups": []}}
    with ckptio.CheckpointManager(tmp_path, format=fmt, compression="zstd", async_save=False, fsync=False) as mgr:
        mgr.save(state, name="checkpoint_epoch_1_batch_2")
        newest = mgr.path_for("checkpoint_epoch_1_batch_2")
    assert newest.stat().st_size * 1024 < 16 * 2**20

    said: list[str] = []
    assert find_resume_checkpoint(tmp_path, said.append) == newest and said == []
    assert torch.equal(ckptio.load(newest)["optimizer_state_dict"]["state"][0]["exp_avg"], torch.zeros(2**21))
def test_a_new_run_starts_from_the_weights_of_a_full_or_slimmed_checkpoint_with_pretrained(
        tmp_path: Path, six_steps: Path) -> None:
    full, slim = _copy([_at_step(six_steps, 2), _at_step(six_steps, 1)], tmp_path)
    slim_checkpoint(slim)
    for path, what in ((full, "epoch 1, batch 2), digest checked"), (slim, "slimmed to its weights")):
        messages: list[str] = []
        result = train(_config(workers=0, save_freq=0, max_steps=1, pretrained=str(path),
                               save_dir=str(tmp_path / f"new_{path.stem}")), say=messages.append)
        assert result.start_step == 0 and result.global_step == 1
        assert any(m.startswith(f"--pretrained {path}: a craft_train checkpoint's model_state_dict") and what in m
                   for m in messages), messages
