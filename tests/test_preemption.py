"""Save on preemption: a signal ends the run at a step boundary with a checkpoint that resumes exactly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from craft_train.config import TrainConfig
from craft_train.preemption import RELAY_WINDOW, Preemption
from craft_train.train import TrainResult, train

# 10 synthetic images, 2 held out: 4 batches of 2 per epoch.
BASE = dict(synthetic_size=10, image_size=64, batch_size=2, epochs=3, val_fraction=0.2, seed=7, workers=0,
            augment=True)
ROOT = Path(__file__).resolve().parent.parent


def _config(**overrides: object) -> TrainConfig:
    return TrainConfig(**{**BASE, **overrides})  # type: ignore[arg-type]


def _signal_after(lines: int, signum: int, said: list[str]) -> Callable[[str], None]:
    """A ``say`` that sends ``signum`` to this process when the ``lines``-th progress line is printed."""
    def say(text: str) -> None:
        said.append(text)
        if text.startswith("Epoch") and "训练" in text and sum("训练" in t for t in said) == lines:
            os.kill(os.getpid(), signum)
    return say


def _assert_same_weights(a: TrainResult, b: TrainResult) -> None:
    assert a.model is not None and b.model is not None and a.optimizer is not None and b.optimizer is not None
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    for index, slots in a.optimizer.state_dict()["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, b.optimizer.state_dict()["state"][index][name]), (index, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train(_config(save_dir=str(tmp_path_factory.mktemp("straight")), save_freq=0, max_steps=7),
                 say=lambda _: None)


def test_a_sigtermed_run_saves_its_last_step_and_resumes_to_the_weights_of_an_uninterrupted_run(
        tmp_path: Path, uninterrupted: TrainResult) -> None:
    said: list[str] = []
    # save_freq 100: no periodic checkpoint would exist without the preemption save
    stopped = train(_config(save_dir=str(tmp_path), save_freq=100, max_steps=7, async_save=True),
                    say=_signal_after(3, signal.SIGTERM, said))
    assert stopped.stopped_by == "SIGTERM" and stopped.exit_code == 143
    assert stopped.global_step == 3
    assert [p.name for p in stopped.saved_paths] == ["checkpoint_epoch_1_batch_3.pth"]
    assert any("stopped by SIGTERM at global step 3: saved checkpoint_epoch_1_batch_3, durable" in t for t in said)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler is gone after the run
    resumed = train(_config(save_dir=str(tmp_path), save_freq=100, max_steps=7, resume="auto"), say=lambda _: None)
    assert resumed.start_step == 3 and resumed.global_step == 7
    _assert_same_weights(resumed, uninterrupted)


def test_sigusr1_saves_and_ends_the_run_with_exit_code_0(tmp_path: Path) -> None:
    stopped = train(_config(save_dir=str(tmp_path), save_freq=0, max_steps=7),
                    say=_signal_after(2, signal.SIGUSR1, []))
    assert stopped.stopped_by == "SIGUSR1" and stopped.exit_code == 0 and stopped.global_step == 2
    assert [p.name for p in stopped.saved_paths] == ["checkpoint_epoch_1_batch_2.pth"]


def test_sigint_after_a_periodic_save_of_the_same_step_waits_for_that_save_and_exits_130(tmp_path: Path) -> None:
    said: list[str] = []
    stopped = train(_config(save_dir=str(tmp_path), save_freq=2, max_steps=7, async_save=True),
                    say=_signal_after(2, signal.SIGINT, said))
    assert stopped.stopped_by == "SIGINT" and stopped.exit_code == 130 and stopped.global_step == 2
    assert [p.name for p in stopped.saved_paths] == ["checkpoint_epoch_1_batch_2.pth"]
    assert any("stopped by SIGINT at global step 2: saved checkpoint_epoch_1_batch_2, durable" in t for t in said)


def _start_cli(tmp_path: Path, *extra: str, new_session: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "craft_train", "--synthetic-size", "10", "--image-size", "64", "--batch-size", "2",
         "--epochs", "3", "--val-fraction", "0.2", "--seed", "7", "--workers", "0", "--save-freq", "100",
         "--save-dir", str(tmp_path / "ck"), "--device", "cpu", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        start_new_session=new_session)


def _wait_for_progress(process: subprocess.Popen[str], lines: int) -> list[str]:
    seen: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if sum("训练" in s for s in seen) == lines:
            return seen
    raise AssertionError("the run ended before printing enough progress lines:\n" + "".join(seen))


@pytest.mark.slow
def test_the_cli_exits_143_on_sigterm_with_the_checkpoint_durable(tmp_path: Path) -> None:
    process = _start_cli(tmp_path, "--async-save")
    _wait_for_progress(process, 2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 143, out
    assert "stopped by SIGTERM" in out and "durable" in out
    saved = sorted(p.name for p in (tmp_path / "ck").glob("checkpoint_epoch_*.pth"))
    assert len(saved) == 1, saved


@pytest.mark.slow
def test_a_second_signal_ends_the_cli_at_once_leaving_nothing_half_written(tmp_path: Path) -> None:
    process = _start_cli(tmp_path, "--async-save")
    _wait_for_progress(process, 2)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)  # a different signal: two of the same may merge into one delivery
    out, _ = process.communicate(timeout=300)
    assert process.returncode in (130, 143), out
    assert "second signal" in out
    leftovers = [p.name for p in (tmp_path / "ck").iterdir() if p.name.endswith(".tmp")]
    assert all(name.startswith(".") for name in leftovers)  # only hidden temporaries, swept at the next start


def test_with_a_mirror_the_preemption_save_is_reported_mirrored_and_lands_on_the_mirror(tmp_path: Path) -> None:
    said: list[str] = []
    stopped = train(_config(save_dir=str(tmp_path / "run"), save_freq=0, max_steps=7, async_save=True,
                            mirror=str(tmp_path / "backup")), say=_signal_after(2, signal.SIGTERM, said))
    assert stopped.exit_code == 143
    assert any("saved checkpoint_epoch_1_batch_2, durable and mirrored" in line for line in said), said
    assert (tmp_path / "backup" / "checkpoint_epoch_1_batch_2.pth.mirror.json").is_file()


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_as_slurm_sends_it_still_saves_through_the_writer_process(
        tmp_path: Path) -> None:
    process = _start_cli(tmp_path, "--async-save", "--workers", "1", new_session=True)
    _wait_for_progress(process, 2)
    os.killpg(process.pid, signal.SIGTERM)  # the trainer, its writer process and its data loader worker
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 143, out
    assert "stopped by SIGTERM" in out and "durable" in out
    assert len(list((tmp_path / "ck").glob("checkpoint_epoch_*.pth"))) == 1


def test_a_mirror_that_cannot_take_the_preemption_save_within_the_grace_period_is_named_and_not_waited_for(
        tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")  # the mirror below cannot be created: every copy fails
    said: list[str] = []
    # a synchronous save is durable before the grace period is counted out, whatever the machine's speed
    stopped = train(_config(save_dir=str(tmp_path / "run"), save_freq=0, max_steps=7, grace=0.5,
                            mirror=str(tmp_path / "a_file" / "backup")), say=_signal_after(2, signal.SIGTERM, said))
    assert stopped.exit_code == 143 and stopped.saved_paths
    assert any("saved checkpoint_epoch_1_batch_2, durable here but not mirrored to" in line for line in said), said
    assert any("not mirrored: checkpoint_epoch_1_batch_2" in line for line in said), said


class _Exited(Exception):
    pass


def _fake_exit(code: int) -> None:
    raise _Exited(code)


def test_under_torchrun_the_same_signal_relayed_by_the_launcher_is_one_request_and_another_signal_exits_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "_exit", _fake_exit)
    preemption = Preemption(repeat_window=RELAY_WINDOW)
    preemption._handle(signal.SIGTERM, None)  # from the scheduler
    preemption._handle(signal.SIGTERM, None)  # the same, relayed by torchrun a moment later
    assert preemption.signal_name == "SIGTERM" and preemption.exit_code == 143
    with pytest.raises(_Exited, match="130"):
        preemption._handle(signal.SIGINT, None)  # the user will not wait


def test_on_one_process_the_same_signal_twice_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "_exit", _fake_exit)
    preemption = Preemption()
    preemption._handle(signal.SIGTERM, None)
    with pytest.raises(_Exited, match="143"):
        preemption._handle(signal.SIGTERM, None)


# ---- under torchrun: a signal to one process stops every one at the same step, which all save ---------------

CLI_WORKER = Path(__file__).resolve().parent / "cli_worker.py"
# 8 synthetic images, 2 held out: at 2 processes of batch 1, 3 steps an epoch, then a validation that saves
# best_model. No periodic checkpoint: the only checkpoint_epoch_* a run writes is the one a signal asks for.
TORCHRUN_TINY = dict(synthetic_size=8, image_size=64, batch_size=1, workers=0, val_fraction=0.25, val_hmean=False,
                     save_freq=1000, epochs=50, device="cpu")


def _flags(settings: dict[str, object]) -> list[str]:
    flags = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def _start_group(save_dir: Path, mode: str) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    extra = [f"--{mode}"] if mode != "ddp" else []
    rendezvous = save_dir.parent / f"rendezvous-{mode}"
    return [subprocess.Popen([sys.executable, str(CLI_WORKER), str(rank), "2", str(rendezvous),
                              *_flags(TORCHRUN_TINY), "--save-dir", str(save_dir), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=save_dir.parent)
            for rank in range(2)]


def _first_best_model(save_dir: Path, ranks: list[subprocess.Popen[str]]) -> None:
    """Return once the first epoch's best_model is committed: every process is then past the set-up (its signal
    handlers installed) and still has 49 epochs to go."""
    while not any(save_dir.glob("best_model*")):
        if any(rank.poll() is not None for rank in ranks):
            raise AssertionError("a process ended before the first best_model: "
                                 + "".join(rank.communicate()[0] for rank in ranks))
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_with_its_checkpoint_and_exit_143(
        tmp_path: Path, mode: str) -> None:
    save_dir = tmp_path / "ck"
    ranks = _start_group(save_dir, mode)
    try:
        _first_best_model(save_dir, ranks)
        ranks[1].send_signal(signal.SIGTERM)  # not rank 0: the one that saves, prints and commits must be told
        outputs = [rank.communicate(timeout=600)[0] for rank in ranks]
    finally:  # never leave a process behind, whatever failed
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    assert [rank.returncode for rank in ranks] == [143, 143], outputs
    found = re.search(r"stopped by SIGTERM at global step (\d+): saved (checkpoint_epoch_\d+_batch_\d+), durable",
                      outputs[0])
    assert found, outputs[0]
    step, name = int(found[1]), found[2]
    # the step's checkpoint is the run's only one besides best_model, committed whole
    assert {p.name.split(".")[0] for p in save_dir.glob("checkpoint_epoch_*")} == {name}
    assert "terminate called" not in outputs[0] + outputs[1]

    # --resume auto continues from it (at one process: both kinds of checkpoint resume at any count)
    resumed = train(TrainConfig(**TORCHRUN_TINY, fsdp=mode == "fsdp", save_dir=str(save_dir), resume="auto",
                                max_steps=step + 1), say=lambda _: None)  # type: ignore[arg-type]
    assert resumed.stopped_by is None and resumed.start_step == step and resumed.global_step == step + 1
