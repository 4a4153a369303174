"""``--deterministic`` and the learning-rate schedule under AMP, on the CPU."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

import ckptio
from craft_train.cli import _parser
from craft_train.config import TrainConfig
from craft_train.determinism import CUBLAS_WORKSPACE_CONFIG, deterministic_mode, resume_note
from craft_train.stepping import step_optimizer
from craft_train.train import TrainResult, train

# 8 synthetic images, no validation: 4 batches of 2 per epoch, so 20 steps cross four epoch boundaries.
BASE = dict(synthetic_size=8, image_size=32, batch_size=2, epochs=10, val_fraction=0.0, seed=3, workers=0,
            augment=True, device="cpu")  # on the CPU even on a GPU machine: tests/test_cuda.py has CUDA's check


def _switches() -> tuple[object, ...]:
    return (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_deterministic_mode_sets_every_switch_and_restores_them_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _switches()
    with deterministic_mode(True):
        assert _switches() == (True, False, True, False, CUBLAS_WORKSPACE_CONFIG)
    assert _switches() == before


def test_deterministic_mode_keeps_a_users_deterministic_cublas_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic_mode(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_mode_warns_when_cuda_was_used_before_it_and_cublas_may_have_read_its_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as after a CUDA matmul in this process
    with pytest.warns(RuntimeWarning, match="CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment"), \
            deterministic_mode(True):
        pass
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # set before Python started: nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with deterministic_mode(True):
            pass


def test_deterministic_mode_off_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _switches()
    with deterministic_mode(False):
        assert _switches() == before


def test_a_resume_that_drops_or_adds_the_flag_warns_and_one_that_keeps_it_is_silent() -> None:
    assert resume_note({"deterministic": True}, True) is None
    assert resume_note({"deterministic": False}, False) is None
    assert resume_note({}, False) is None  # a checkpoint from before the flag existed
    dropped = resume_note({"deterministic": True}, False)
    assert dropped is not None and "no longer bit-identical" in dropped and "--deterministic" in dropped
    added = resume_note({"deterministic": False}, True)
    assert added is not None and "reproducible" in added


def test_the_cli_flag_reaches_the_config() -> None:
    args = vars(_parser().parse_args(["--deterministic"]))
    args.pop("demo")
    assert TrainConfig(**args).deterministic is True
    assert TrainConfig().deterministic is False


def _tiny_step(loss_value: float, model: torch.nn.Linear, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, scheduler: torch.optim.lr_scheduler.LRScheduler) -> bool:
    optimizer.zero_grad(set_to_none=True)
    loss = model(torch.ones(1, 2)).sum() * loss_value
    scaler.scale(loss).backward()
    return step_optimizer(optimizer, scaler, scheduler)


def test_a_step_the_amp_scaler_skips_does_not_advance_the_schedule_and_warns_nothing() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # a real scaler: it skips on inf gradients
    weights = model.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise here
        assert _tiny_step(float("inf"), model, optimizer, scaler, scheduler) is False
        assert torch.equal(model.weight, weights), "the optimizer stepped on inf gradients"
        assert scaler.get_scale() == 512.0
        assert scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 1.0
        assert _tiny_step(1.0, model, optimizer, scaler, scheduler) is True
        assert not torch.equal(model.weight, weights)
        assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == 0.5


class _ScalerThatMustNotSync(torch.amp.GradScaler):
    """Reading the scale copies it from the device: a host sync that the training step must not add."""

    def get_scale(self) -> float:
        raise AssertionError("get_scale() was called: a host sync every step")


def test_telling_a_skipped_step_from_a_taken_one_reads_no_scale_from_the_device() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = _ScalerThatMustNotSync("cpu", init_scale=1024.0)
    assert _tiny_step(float("inf"), model, optimizer, scaler, scheduler) is False
    assert _tiny_step(1.0, model, optimizer, scaler, scheduler) is True
    assert scheduler.last_epoch == 1


def test_without_amp_every_step_advances_the_schedule() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for expected in (1, 2, 3):
        assert _tiny_step(1.0, model, optimizer, scaler, scheduler) is True
        assert scheduler.last_epoch == expected


def _quiet(_: str) -> None:
    pass


def _assert_bit_identical(a: TrainResult, b: TrainResult) -> None:
    assert a.model is not None and b.model is not None and a.optimizer is not None and b.optimizer is not None
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, slots in opt_a["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)


@pytest.mark.slow
def test_deterministic_four_steps_resume_four_steps_equals_eight_bit_for_bit_on_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _switches()
    straight = train(TrainConfig(**BASE, deterministic=True, save_dir=str(tmp_path / "straight"), save_freq=0,
                                 max_steps=8), say=_quiet)
    assert _switches() == before, "train() leaked its deterministic switches into the process"
    common = dict(**BASE, deterministic=True, save_dir=str(tmp_path / "split"), save_freq=100)
    first = train(TrainConfig(**common, max_steps=4), say=_quiet)
    assert first.global_step == 4
    saved = ckptio.load(first.saved_paths[-1])
    assert saved["config"]["deterministic"] is True
    messages: list[str] = []
    resumed = train(TrainConfig(**common, max_steps=8, resume=str(first.saved_paths[-1])), say=messages.append)
    assert resumed.global_step == 8
    assert not any("bit-identical" in m or "reproducible" in m for m in messages), messages
    _assert_bit_identical(straight, resumed)
    # Dropping the flag on resume warns and trains on.
    messages = []
    dropped = train(TrainConfig(**{**common, "deterministic": False, "save_dir": str(tmp_path / "dropped")},
                                max_steps=5, resume=str(first.saved_paths[-1])), say=messages.append)
    assert dropped.global_step == 5
    assert any("no longer bit-identical" in m for m in messages), messages
