"""kill -9 at random moments, many times: no good checkpoint is lost, no bad one is ever visible, and the run
that is resumed again and again ends with exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptio
import ckptio.naming
from ckptio.atomic import HOLD_ENV, TEMP_SUFFIX
from ckptio.naming import scan

STEPS = 8
TRAIN = ["--synthetic-size", "8", "--image-size", "64", "--batch-size", "2", "--workers", "0",
         "--val-fraction", "0", "--epochs", "10", "--save-freq", "1", "--async-save", "--keep-count", "2",
         "--max-steps", str(STEPS), "--device", "cpu"]  # the bit-identical check holds for CPU kernels


def _start(save_dir: Path, *extra: str, hold: Path | None = None) -> subprocess.Popen[bytes]:
    """A training run in a session of its own (its writer process included); with ``hold``, every checkpoint
    write waits before its rename while that file exists (``ckptio.atomic.HOLD_ENV``)."""
    env = dict(os.environ)
    env.pop(HOLD_ENV, None)
    if hold is not None:
        env[HOLD_ENV] = str(hold)
    return subprocess.Popen([sys.executable, "-m", "craft_train", *TRAIN, "--save-dir", str(save_dir), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(TEMP_SUFFIX)] if directory.exists() else []


def _committed(directory: Path) -> set[tuple[str, int]]:
    return {(e.path.name, e.mtime_ns) for e in scan(directory)} if directory.exists() else set()


def _kill_at_a_random_moment(save_dir: Path, rng: random.Random, hold: Path | None, extra: list[str]) -> bool:
    """Start a resumed run and SIGKILL it; returns whether the kill landed while a file was being written.

    With ``hold`` (an existing file), the run's first checkpoint write stops before its rename: the run, writer
    process and all, is killed while that write is certainly in progress. Without, the trainer alone is killed
    at a random moment after a commit, and its writer process finishes what it was given (as it does when a
    trainer dies).
    """
    before = _committed(save_dir)
    process = _start(save_dir, "--resume", "auto", *extra, hold=hold)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if hold is not None and _temporaries(save_dir):
                break
            if hold is None and _committed(save_dir) - before:
                time.sleep(rng.uniform(0.0, 0.4))
                break
            time.sleep(0.005)
        if hold is not None:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        _wait_for_the_group_to_end(process.pid)  # no writer of this run may still be writing during the next one
    finally:
        if process.poll() is None:
            process.kill()
    return bool(_temporaries(save_dir))


def _wait_for_the_group_to_end(group: int, timeout: float = 120) -> None:
    """Wait until no live process is left in process group ``group`` (zombies awaiting their reaper count as
    ended), then kill whatever is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _live_members(group):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _live_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == group:
                members.append(int(entry.name))
    return members


def _after_a_kill_everything_visible_verifies(save_dir: Path) -> None:
    report = ckptio.verify(save_dir, record=False)
    assert report.ok, [(c.path.name, c.reason) for c in report.corrupt]
    for entry in scan(save_dir):  # nothing partial under a checkpoint name: every visible file is sealed
        assert ckptio.read_meta(entry.path)[0] is not None, entry.path


def _final_state(save_dir: Path) -> dict:
    newest = max(scan(save_dir), key=lambda e: (ckptio.read_meta(e.path)[0].meta["summary"]["global_step"],
                                                 not e.protected))
    return ckptio.load(newest.path)


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "kills"), [([], 4), (["--format", "safetensors"], 3)])
def test_repeated_kill_9_loses_nothing_and_the_resumed_run_ends_bit_identical(
    tmp_path: Path, extra: list[str], kills: int
) -> None:
    rng = random.Random(1234 + kills)
    reference_dir, crash_dir = tmp_path / "straight", tmp_path / "crashed"
    hold = tmp_path / "hold-writes"
    hold.touch()
    reference = _start(reference_dir, *extra)
    finish = None
    try:
        landed_mid_write = 0
        for attempt in range(kills):
            # two of every three kills land in a write held open (certainly mid-write), the third at a random
            # moment after a commit
            mid_write = attempt % 3 != 1
            landed = _kill_at_a_random_moment(crash_dir, rng, hold if mid_write else None, extra=extra)
            assert landed or not mid_write, f"kill {attempt} found no write in progress"
            landed_mid_write += landed
            _after_a_kill_everything_visible_verifies(crash_dir)
        assert landed_mid_write >= 2, "the test must kill some runs while a checkpoint is being written"

        verify_cli = subprocess.run([sys.executable, "-m", "ckptio", "verify", str(crash_dir)], capture_output=True,
                                    timeout=300)
        assert verify_cli.returncode == 0, verify_cli.stdout

        finish = _start(crash_dir, "--resume", "auto", *extra)
        assert finish.wait(timeout=300) == 0
        assert reference.wait(timeout=300) == 0
    finally:  # a failed assertion must not leave a training run writing in the background
        for process in (reference, finish):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert _temporaries(crash_dir) == []

    expected, actual = _final_state(reference_dir), _final_state(crash_dir)
    assert actual["global_step"] == expected["global_step"] == STEPS
    for key, tensor in expected["model_state_dict"].items():
        assert torch.equal(tensor, actual["model_state_dict"][key]), key
    for index, slots in expected["optimizer_state_dict"]["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, actual["optimizer_state_dict"]["state"][index][name]), (index, name)


# Loaded by the trainer (and its writer process) from PYTHONPATH: records the name of every save whose save() call
# returned, before the caller goes on; the test kills the trainer at random moments and then checks that none of
# these saves was lost to the immediate restart.
RETURNED_SITE = """
import os
import ckptio.manager

_log = os.environ["CKPTIO_RETURNED_LOG"]
_real = ckptio.manager.CheckpointManager.save


def _save(self, state, *, name, **kwargs):
    future = _real(self, state, name=name, **kwargs)
    if future is not None:
        fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (name + "\\n").encode())
        os.close(fd)
    return future


ckptio.manager.CheckpointManager.save = _save
"""
KILLS = 10
LOOP_STEPS = 24  # every killed round ends by its first new save at the latest: 10 kills come before the end
LOOP_TRAIN = [*TRAIN[: TRAIN.index("--max-steps")], "--max-steps", str(LOOP_STEPS)]


def _returned(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def _position(name: str) -> tuple[int, int]:
    position = ckptio.naming.parse_checkpoint_name(name.split(".")[0])
    assert position is not None, name
    return position


@pytest.mark.slow
def test_a_trainer_killed_and_restarted_at_once_again_and_again_loses_no_returned_save_and_ends_bit_identical(
    tmp_path: Path,
) -> None:
    rng = random.Random(2112)
    site, crash_dir, reference_dir = tmp_path / "site", tmp_path / "crashed", tmp_path / "straight"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RETURNED_SITE)
    returned_log = tmp_path / "returned.log"
    root = str(Path(ckptio.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(site), root)), CKPTIO_RETURNED_LOG=str(returned_log),
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "craft_train", *LOOP_TRAIN, "--save-dir", str(crash_dir), "--resume", "auto"]
    kills, resumes, process = 0, [], None
    try:
        for round_number in range(3 * KILLS):
            before = len(_returned(returned_log))
            newest_returned = max(map(_position, _returned(returned_log)), default=None)
            output = tmp_path / f"round{round_number}.log"
            with output.open("wb") as sink:
                process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
            # Two of three kills come right after a save() returned (its file may not be written yet), the third
            # at a random moment of the run (start-up, waiting for the old writer, resuming, training) but no later
            # than that: each killed round advances the run by about one step, so the kills happen for certain
            # before the run could finish, however fast or slow this machine is. Once they have, the run finishes.
            killing = kills < KILLS
            right_after_a_save = round_number % 3 != 2
            random_moment = time.monotonic() + rng.uniform(0.0, 12.0)
            deadline = time.monotonic() + 300
            while killing and process.poll() is None and time.monotonic() < deadline:
                if len(_returned(returned_log)) > before:
                    time.sleep(rng.uniform(0.0, 0.05))
                    break
                if not right_after_a_save and time.monotonic() > random_moment:
                    break
                time.sleep(0.005)
            if not killing:
                process.wait(timeout=600)
            finished = process.poll() is not None
            process.kill()  # SIGKILL, then at once the next round starts the run again
            process.wait(timeout=30)
            resumed = re.search(r"resumed from (\S+): epoch", output.read_text(errors="replace"))
            if resumed and newest_returned is not None:
                resumes.append((newest_returned, _position(Path(resumed.group(1)).name)))
            if finished:
                assert process.returncode == 0, output.read_text(errors="replace")[-3000:]
                break
            kills += 1
        else:
            pytest.fail("the run never finished")
        reference = subprocess.run([sys.executable, "-m", "craft_train", *LOOP_TRAIN, "--save-dir",
                                    str(reference_dir)], capture_output=True, timeout=900)
        assert reference.returncode == 0, reference.stdout[-3000:]
    finally:  # a failed assertion must not leave a training run writing in the background
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
    assert kills >= KILLS, f"only {kills} kills before the run finished"
    assert resumes, "no restart ever resumed"
    for newest_returned, resumed_at in resumes:  # a save that had returned is never passed over
        assert resumed_at >= newest_returned, (resumed_at, newest_returned)
    _after_a_kill_everything_visible_verifies(crash_dir)
    assert _temporaries(crash_dir) == []
    expected, actual = _final_state(reference_dir), _final_state(crash_dir)
    assert actual["global_step"] == expected["global_step"] == LOOP_STEPS
    for key, tensor in expected["model_state_dict"].items():
        assert torch.equal(tensor, actual["model_state_dict"][key]), key
    for index, slots in expected["optimizer_state_dict"]["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, actual["optimizer_state_dict"]["state"][index][name]), (index, name)
    del expected, actual
    for directory in (reference_dir, crash_dir):  # ~1 GB of CRAFT checkpoints: gone once the test has passed
        shutil.rmtree(directory)
