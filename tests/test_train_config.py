"""Tests for craft_train.config and the trainer's command line built from it: one declaration per setting, and
errors told as the user's to fix or as ours to report."""

from __future__ import annotations

import dataclasses

import pytest

import craft_train.cli as trainer_cli
from craft_train.cli import _parser, main
from craft_train.config import ConfigError, TrainConfig, field_docs


def _actions() -> dict[str, object]:
    return {action.dest: action for action in _parser()._actions}


def test_every_setting_has_exactly_one_flag_and_the_flags_defaults_are_the_configs() -> None:
    actions = _actions()
    fields = [spec.name for spec in dataclasses.fields(TrainConfig)]
    assert set(fields) <= set(actions)
    assert set(actions) - set(fields) == {"help", "demo", "debug"}
    args = vars(_parser().parse_args([]))
    assert TrainConfig(**{name: args[name] for name in fields}) == TrainConfig()


def test_a_flags_help_is_its_settings_docstring_with_settings_named_as_flags() -> None:
    actions = _actions()
    docs = field_docs()
    assert "keep_full" in docs and "mirror" in docs
    keep_full = actions["keep_full"].help  # type: ignore[attr-defined]
    assert keep_full.startswith("Keep the newest N batch checkpoints complete (resumable) and slim older ones")
    assert "``" not in keep_full
    resume = actions["resume"].help  # type: ignore[attr-defined]
    assert "in --save-dir that verifies" in resume


def test_a_switch_on_by_default_is_a_no_flag_that_says_what_it_turns_off() -> None:
    args = vars(_parser().parse_args(["--no-amp", "--no-augment", "--no-val-hmean", "--async-save"]))
    assert (args["amp"], args["augment"], args["val_hmean"], args["async_save"]) == (False, False, False, True)
    assert _actions()["augment"].help.startswith("train without")  # type: ignore[attr-defined]


def test_a_settings_error_is_a_value_error_that_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--image-size must be a positive multiple of 32"):
        TrainConfig(image_size=100)
    assert issubclass(ConfigError, ValueError)


def test_an_unexpected_error_keeps_its_traceback_rather_than_passing_for_a_usage_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def broken_train(config: TrainConfig, **_: object) -> None:
        raise ValueError("an internal bug, not the user's settings")

    monkeypatch.setattr(trainer_cli, "train", broken_train)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["--save-dir", str(tmp_path), "--image-size", "64", "--batch-size", "1"])


def test_debug_prints_the_traceback_of_an_error_otherwise_told_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--image-size", "100"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", "--image-size", "100"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("got 100")
