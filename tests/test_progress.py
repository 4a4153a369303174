"""What the trainer prints: the guide's progress line, and each save's outcome only once it is known."""

from __future__ import annotations

import re
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest

from ckptio.slim import SlimResult
from craft_train.config import TrainConfig
from craft_train.progress import EpochProgress, SaveReport, progress_fields
from craft_train.train import train


def test_progress_fields_keep_the_guides_order() -> None:
    assert progress_fields(0.41234, 0.2056, 0.2067, 0, 0.42) == (
        "loss=0.4123, cls=0.2056, geo=0.2067, errors=0, avg_loss=0.4200")


def test_without_a_terminal_the_progress_line_is_printed_at_once_then_ten_times_an_epoch() -> None:
    lines: list[str] = []
    progress = EpochProgress(1, 20, 0, lines.append, show=True)  # pytest's stderr is not a terminal
    for _ in range(20):
        progress.update(" [已保存: batch 2]", progress_fields(0.5, 0.25, 0.25, 1, 0.5))
    progress.close()
    assert len(lines) == 11  # the first batch's line, then one every tenth of the epoch
    assert re.fullmatch(r"Epoch 1 - 训练 \[已保存: batch 2\]: 100% 20/20 \[\d\d:\d\d<00:00, .+/s, loss=0\.5000, "
                        r"cls=0\.2500, geo=0\.2500, errors=1, avg_loss=0\.5000\]", lines[-1]), lines[-1]
    assert lines[0].startswith("Epoch 1 - 训练 [已保存: batch 2]:   5% 1/20 [")
    assert lines[1].startswith("Epoch 1 - 训练 [已保存: batch 2]:  10% 2/20 [")


def test_a_resumed_epoch_counts_from_where_it_stopped() -> None:
    lines: list[str] = []
    progress = EpochProgress(2, 10, 7, lines.append, show=True)
    for _ in range(3):
        progress.update("", "loss=1")
    assert [line.split(" [")[0] for line in lines] == [
        "Epoch 2 - 训练:  80% 8/10", "Epoch 2 - 训练:  90% 9/10", "Epoch 2 - 训练: 100% 10/10"]


def _saved(name: str) -> SimpleNamespace:
    return SimpleNamespace(size=249_400_000, path=Path(f"ck/{name}.pth"), slimmed=(), slim_error=None)


def test_a_background_save_is_reported_saved_only_once_it_is_durable() -> None:
    report = SaveReport()
    future: Future[object] = Future()
    report.queued("checkpoint_epoch_1_batch_100", future)
    assert report.lines() == [] and report.label(1) == " [保存中: batch 100]"
    future.set_result(_saved("checkpoint_epoch_1_batch_100"))
    assert report.lines() == ["saved checkpoint_epoch_1_batch_100.pth (249.4 MB)"]
    assert report.label(1) == " [已保存: batch 100]" and report.label(2) == ""
    assert (report.saved, report.skipped, report.failed) == (1, 0, 0)
    assert report.saved_paths == [Path("ck/checkpoint_epoch_1_batch_100.pth")]


@pytest.mark.parametrize(("outcome", "line", "label"), [
    ("no space", "skipped checkpoint_epoch_1_batch_5: not enough disk space", " [未保存: batch 5]"),
    ("busy", "skipped checkpoint_epoch_1_batch_5: the earlier saves are still being written", " [未保存: batch 5]"),
    ("failed", "failed to save checkpoint_epoch_1_batch_5: disk on fire", " [保存失败: batch 5]"),
])
def test_a_skipped_or_failed_save_is_never_reported_as_saved(outcome: str, line: str, label: str) -> None:
    report = SaveReport()
    future: Future[object] | None = Future()
    if outcome == "busy":
        future = None
    report.queued("checkpoint_epoch_1_batch_5", future)
    if outcome == "no space":
        future.set_result(None)
    elif outcome == "failed":
        future.set_exception(OSError("disk on fire"))
    lines = report.lines()
    assert len(lines) == 1 and lines[0].startswith(line) and "saved checkpoint" not in lines[0]
    assert report.label(1) == label and report.saved == 0 and report.saved_paths == []
    assert report.summary().startswith(f"0 checkpoints saved, {int(outcome != 'failed')} skipped, "
                                       f"{int(outcome == 'failed')} failed")


def test_what_the_writer_slimmed_after_a_save_and_a_slimming_failure_are_reported_not_lost() -> None:
    report = SaveReport(keep_full=2)
    first: Future[object] = Future()
    second: Future[object] = Future()
    report.queued("checkpoint_epoch_1_batch_3", first)
    report.queued("checkpoint_epoch_1_batch_4", second)
    slimmed = SlimResult(Path("ck/checkpoint_epoch_1_batch_1.pth"), 249_400_000, 83_200_000, ("optimizer_state_dict",))
    first.set_result(SimpleNamespace(**{**vars(_saved("checkpoint_epoch_1_batch_3")), "slimmed": (slimmed,)}))
    second.set_result(SimpleNamespace(**{**vars(_saved("checkpoint_epoch_1_batch_4")),
                                         "slim_error": "OSError: read-only file system"}))
    assert report.lines() == [
        "saved checkpoint_epoch_1_batch_3.pth (249.4 MB)",
        "slimmed checkpoint_epoch_1_batch_1.pth to its model weights: 249.4 MB -> 83.2 MB (--keep-full 2)",
        "saved checkpoint_epoch_1_batch_4.pth (249.4 MB)",
        "could not slim an older checkpoint after checkpoint_epoch_1_batch_4: OSError: read-only file system; it "
        "stays complete"]
    assert report.slimmed == 1 and report.summary().endswith("1 slimmed to weights (166 MB freed)")


def test_saves_skipped_for_lack_of_space_are_reported_by_the_trainer(tmp_path: Path) -> None:
    config = TrainConfig(synthetic_size=4, image_size=64, batch_size=2, epochs=1, workers=0, val_fraction=0.0,
                         save_dir=str(tmp_path), save_freq=1, min_free="1000TB")
    messages: list[str] = []
    result = train(config, say=messages.append)
    assert result.saves == 0 and result.skipped_saves == 2 and result.saved_paths == []
    assert sum(m.startswith("skipped checkpoint_epoch_1_batch_") for m in messages) == 2, messages
    assert not any(m.startswith("saved ") for m in messages), messages
    assert any("0 checkpoints saved, 2 skipped, 0 failed" in m for m in messages), messages
    assert any(m.startswith("Epoch 1 - 训练 [未保存: batch 2]") for m in messages), messages
