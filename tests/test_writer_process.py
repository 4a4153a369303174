"""Tests for the process writer: same files as the thread writer, staging off the training thread, and what
happens when either process dies (kill -9, for real)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from helpers import FakeCuda, assert_same

import ckptio
import ckptio.manager
import ckptio.shm
import ckptio.snapshot
import ckptio.writer_process
from ckptio import CheckpointDirectoryLockedError, CheckpointManager, CheckpointWriteError
from ckptio.atomic import is_temporary
from ckptio.fileio import read_meta
from ckptio.snapshot import state_shape

COMBOS = [("torch", None), ("torch", "zstd"), ("safetensors", None), ("safetensors", "zstd")]
COMBO_IDS = ["pth", "pth.zst", "safetensors", "safetensors.zst"]
TIMEOUT = 60.0  # the writer process imports torch (seconds on a loaded machine); nothing waits longer than this


def _new_shared_memory(before: set[str]) -> list[str]:
    """Entries added to /dev/shm since ``before`` that could be a writer's segment: tensors shared by DataLoader
    workers (``torch_*``) and semaphores (``sem.*``) of other processes on the machine are not."""
    return sorted(n for n in set(os.listdir("/dev/shm")) - before if not n.startswith(("torch_", "sem.")))


def state_of(value: float, size: int = 64) -> dict[str, Any]:
    return {
        "step": int(value),
        "model": {"w": torch.full((size, 3), value), "b": torch.arange(5), "empty": torch.zeros(0, 4)},
        "flags": [torch.tensor([True, False]), torch.tensor(1.5, dtype=torch.float64)],
        "lr": 0.1,
    }


def visible(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if not p.name.startswith(".")}


def writer_pid(mgr: CheckpointManager) -> int:
    return mgr._writer.pid  # type: ignore[union-attr]


def wait_for(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_process_and_thread_writers_write_files_that_load_to_the_same_state_and_verify(tmp_path, fmt,
                                                                                       compression) -> None:
    state = state_of(2.5)
    files = {}
    for writer in ("thread", "process"):
        with CheckpointManager(tmp_path / writer, format=fmt, compression=compression, writer=writer) as mgr:
            saved = mgr.save(state, name="checkpoint_epoch_1_batch_2", metadata={"run": "x"})
            assert saved is not None
            files[writer] = saved.result(timeout=TIMEOUT).path
        assert ckptio.verify(files[writer]).ok
    assert_same(ckptio.load(files["process"]), ckptio.load(files["thread"]))
    assert_same(ckptio.load(files["process"]), state)
    (thread_seal, _), (process_seal, _) = read_meta(files["thread"]), read_meta(files["process"])
    assert thread_seal is not None and process_seal is not None
    assert {k: v for k, v in thread_seal.meta.items() if k != "created"} == {
        k: v for k, v in process_seal.meta.items() if k != "created"}


def test_the_process_writer_reuses_its_shared_slots_and_stats_match_the_saves(tmp_path) -> None:
    state = state_of(1.0)
    with CheckpointManager(tmp_path, writer="process", keep_count=2, fsync=False, max_pending=1) as mgr:
        for i in range(6):
            state["model"]["w"].fill_(i)
            state["step"] = i
            mgr.save(state, name=f"checkpoint_epoch_1_batch_{i}")
        mgr.wait()
        segments = {id(slot.main.staging.segment) for slot in mgr._slots if slot.main.staging is not None}
        assert 1 <= len(segments) <= 2  # one segment per slot, made once, reused by every later save
        assert mgr.stats.committed == 6 and mgr.stats.deleted == 4 and mgr.pending == 0
        assert mgr.stats.last is not None and mgr.stats.last.name == "checkpoint_epoch_1_batch_5"
    assert visible(tmp_path) == {"checkpoint_epoch_1_batch_4.pth", "checkpoint_epoch_1_batch_5.pth"}
    assert ckptio.load(tmp_path / "checkpoint_epoch_1_batch_5.pth")["model"]["w"].eq(5).all()


def test_the_writer_process_runs_without_cuda_and_ends_with_the_manager(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, writer="process")
    pid = writer_pid(mgr)
    try:
        environment = psutil.Process(pid).environ()
        assert environment.get("CUDA_VISIBLE_DEVICES") == ""
        assert pid in {child.pid for child in psutil.Process().children()}
    finally:
        mgr.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_killing_the_writer_process_mid_write_fails_that_save_clearly_and_the_next_save_works(tmp_path) -> None:
    big = {"w": torch.rand(24, 2**20)}  # 96 MiB: long enough a write to be caught in the middle
    mgr = CheckpointManager(tmp_path, writer="process")
    try:
        first = mgr.save({"w": torch.ones(3)}, name="checkpoint_epoch_1_batch_1")
        first.result(timeout=TIMEOUT)  # the writer is up
        pid = writer_pid(mgr)
        committed = {"checkpoint_epoch_1_batch_1.pth"}
        for attempt in range(2, 6):  # stop the writer while a temporary file exists and the final name does not
            name = f"checkpoint_epoch_1_batch_{attempt}"
            future = mgr.save(big, name=name)
            wait_for(lambda f=future: f.done() or any(is_temporary(p.name) for p in tmp_path.iterdir()),
                     "the write to start")
            os.kill(pid, signal.SIGSTOP)
            if not (tmp_path / f"{name}.pth").exists() and any(is_temporary(p.name) for p in tmp_path.iterdir()):
                break
            os.kill(pid, signal.SIGCONT)  # too late: that one was committed; try the next
            future.result(timeout=TIMEOUT)
            committed.add(f"{name}.pth")
        else:
            pytest.fail("never caught the writer in the middle of a write")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(CheckpointWriteError, match=rf"writer process \d+ was killed by signal 9.*lost: {name}"):
            mgr.wait()
        assert isinstance(future.exception(timeout=TIMEOUT), CheckpointWriteError)
        assert mgr.stats.failed == 1 and mgr.pending == 0
        assert visible(tmp_path) == committed
        assert ckptio.verify(tmp_path).ok

        again = mgr.save({"w": torch.full((3,), 3.0)}, name="checkpoint_epoch_1_batch_3")  # a new writer
        assert again.result(timeout=TIMEOUT).path.exists()
        assert writer_pid(mgr) != pid
    finally:
        mgr.close()
    with CheckpointManager(tmp_path, writer="process") as fresh:  # removes the killed writer's temporary files
        assert not any(is_temporary(p.name) for p in tmp_path.iterdir())
        fresh.save({"w": torch.zeros(2)}, name="checkpoint_epoch_1_batch_4")
    assert ckptio.verify(tmp_path).ok
    assert len(ckptio.verify(tmp_path).files) == len(committed) + 2


def test_a_writer_process_that_died_idle_is_logged_and_replaced_without_failing_the_next_save(
        tmp_path, caplog) -> None:
    with CheckpointManager(tmp_path, writer="process") as mgr:
        mgr.save({"w": torch.ones(3)}, name="a").result(timeout=TIMEOUT)
        pid = writer_pid(mgr)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: mgr._writer._generation.dead, "the death to be noticed")  # type: ignore[union-attr]
        assert "killed by signal 9; no save was lost" in caplog.text
        mgr.save({"w": torch.ones(3)}, name="b").result(timeout=TIMEOUT)  # no save was lost: nothing to raise
        assert writer_pid(mgr) != pid
        mgr.wait()
    assert visible(tmp_path) == {"a.pth", "b.pth"}


TRAINER = textwrap.dedent("""
    import sys, time, torch, ckptio
    mgr = ckptio.CheckpointManager(sys.argv[1], writer="process", format="safetensors")
    state = {"step": 7, "w": torch.rand(8, 2**20)}  # 32 MiB
    mgr.save(state, name="checkpoint_epoch_1_batch_7")
    print(mgr._writer.pid, flush=True)
    time.sleep(600)
""")


def test_killing_the_trainer_right_after_save_leaves_a_complete_checkpoint_and_no_writer(tmp_path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    env = dict(os.environ, PYTHONPATH=str(Path(ckptio.__file__).resolve().parent.parent))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env=env)
    writer = None
    try:
        line = trainer.stdout.readline()  # type: ignore[union-attr]
        writer = int(line)
        trainer.kill()  # SIGKILL: save() had returned, nothing was drained
        trainer.wait(TIMEOUT)
        wait_for(lambda: not psutil.pid_exists(writer) or psutil.Process(writer).status() == psutil.STATUS_ZOMBIE,
                 "the orphaned writer to finish and exit")
    finally:
        trainer.kill()
        trainer.wait(TIMEOUT)
        if writer is not None and psutil.pid_exists(writer):
            os.kill(writer, signal.SIGKILL)
    path = tmp_path / "checkpoint_epoch_1_batch_7.safetensors"
    assert path.exists(), "the save handed to the writer before the kill was lost"
    assert ckptio.verify(path).files[0].status == "verified"
    assert ckptio.load(path)["step"] == 7
    assert not any(is_temporary(p.name) for p in tmp_path.iterdir())
    assert _new_shared_memory(shm_before) == []


def test_prepare_allocates_in_the_background_and_the_next_save_uses_those_buffers(tmp_path, monkeypatch) -> None:
    threads: list[threading.Thread] = []
    real = ckptio.manager.heap_staging

    def spy(layout: Any, prepared: bool) -> Any:
        threads.append(threading.current_thread())
        return real(layout, prepared)

    monkeypatch.setattr(ckptio.manager, "heap_staging", spy)
    state = state_of(1.0)
    with CheckpointManager(tmp_path, writer="thread", max_pending=1) as mgr:
        mgr.prepare(state)
        assert mgr._stager is not None and mgr._stager.wait_idle(TIMEOUT)
        assert threads and all(t is not threading.current_thread() for t in threads)
        prepared = [slot.main.prepared for slot in mgr._slots]
        assert all(p is not None for p in prepared) and len({id(p) for p in prepared}) == 2
        mgr.save(state, name="a").result(timeout=TIMEOUT)
        used = [slot.main.staging for slot in mgr._slots if slot.main.staging is not None]
        assert len(used) == 1 and any(used[0] is p for p in prepared)  # adopted: save() allocated nothing

        bigger = dict(state, extra=torch.ones(7))  # a new layout: prepared again, off this thread
        calls = len(threads)
        mgr.prepare(bigger)
        assert mgr._stager.wait_idle(TIMEOUT)
        assert len(threads) == calls + 2
        assert all(slot.main.prepared is not None and slot.main.prepared.shape == state_shape(bigger)
                   for slot in mgr._slots)
        mgr.save(bigger, name="b").result(timeout=TIMEOUT)
    assert_same(ckptio.load(tmp_path / "b.pth"), bigger)


def test_prepare_with_the_process_writer_makes_one_shared_segment_per_slot_off_the_calling_thread(tmp_path,
                                                                                                  monkeypatch) -> None:
    threads: list[threading.Thread] = []
    real = ckptio.shm.shared_staging

    def spy(layout: Any, prepared: bool, *, key: str) -> Any:
        threads.append(threading.current_thread())
        return real(layout, prepared, key=key)

    monkeypatch.setattr(ckptio.shm, "shared_staging", spy)
    state = state_of(4.0)
    with CheckpointManager(tmp_path, writer="process", max_pending=1) as mgr:
        mgr.prepare(state)
        assert mgr._stager is not None and mgr._stager.wait_idle(TIMEOUT)
        assert len(threads) == 2 and all(t is not threading.current_thread() for t in threads)
        segments = {slot.main.prepared.segment.key for slot in mgr._slots}  # type: ignore[union-attr]
        assert segments == {"0.main", "1.main"}
        for i in range(3):
            mgr.save(state, name=f"s{i}").result(timeout=TIMEOUT)
        assert len(threads) == 2  # no save allocated a segment
    assert_same(ckptio.load(tmp_path / "s2.pth"), state)


def test_a_save_before_the_prepared_buffers_are_ready_allocates_for_itself(tmp_path) -> None:
    state = state_of(5.0)
    with CheckpointManager(tmp_path, writer="thread") as mgr:
        mgr.save(state, name="early").result(timeout=TIMEOUT)  # nothing prepared: pageable buffers, no waiting
        mgr.prepare(dict(state, other=torch.ones(2)))  # a layout this save does not have: not used by it
        assert mgr._stager is not None and mgr._stager.wait_idle(TIMEOUT)
        mgr.save(state, name="late").result(timeout=TIMEOUT)
    assert_same(ckptio.load(tmp_path / "late.pth"), state)


@pytest.mark.slow
def test_a_thousand_saves_keep_descriptors_threads_processes_and_memory_flat(tmp_path) -> None:
    me = psutil.Process()
    state = {"step": 0, "w": torch.rand(1024), "b": [torch.zeros(3), torch.ones(2, 2)]}
    shm_before = set(os.listdir("/dev/shm"))

    def sample() -> tuple[int, int, int, int]:
        return me.num_fds(), threading.active_count(), len(me.children(recursive=True)), me.memory_info().rss

    with CheckpointManager(tmp_path, writer="process", keep_count=2, fsync=False, drop_page_cache=False) as mgr:
        for i in range(50):  # warm-up: the writer process, its slots, allocator pools
            state["step"] = i
            mgr.save(state, name=f"checkpoint_epoch_1_batch_{i}")
        mgr.wait()
        fds, threads, children, rss = sample()
        child = psutil.Process(writer_pid(mgr))
        child_fds, child_rss = child.num_fds(), child.memory_info().rss
        for i in range(50, 1050):
            state["step"] = i
            mgr.save(state, name=f"checkpoint_epoch_1_batch_{i}")
        mgr.wait()
        after = sample()
        assert after[:3] == (fds, threads, children)
        assert after[3] - rss < 32 * 2**20, f"trainer RSS grew by {(after[3] - rss) / 2**20:.0f} MiB"
        assert child.num_fds() == child_fds
        assert child.memory_info().rss - child_rss < 32 * 2**20
        assert mgr.stats.committed == 1050
    assert _new_shared_memory(shm_before) == []
    assert ckptio.load(tmp_path / "checkpoint_epoch_1_batch_1049.pth")["step"] == 1049


TRAINER_WITH_WORKER = TRAINER.replace(
    "print(mgr._writer.pid, flush=True)\n",
    "worker = os.fork()  # like a DataLoader worker: it inherits every descriptor of the trainer\n"
    "if worker == 0:\n"
    "    time.sleep(600)\n"
    "    os._exit(0)\n"
    "print(mgr._writer.pid, worker, flush=True)\n",
).replace("import sys, time", "import os, sys, time")


def test_a_forked_worker_that_outlives_the_killed_trainer_does_not_keep_the_writer_alive(tmp_path) -> None:
    assert "os.fork()" in TRAINER_WITH_WORKER and "import os, sys, time" in TRAINER_WITH_WORKER
    env = dict(os.environ, PYTHONPATH=str(Path(ckptio.__file__).resolve().parent.parent))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER_WITH_WORKER, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True, env=env)
    pids: list[int] = []
    try:
        pids = [int(p) for p in trainer.stdout.readline().split()]  # type: ignore[union-attr]
        writer, worker = pids
        trainer.kill()
        trainer.wait(TIMEOUT)
        wait_for(lambda: not psutil.pid_exists(writer) or psutil.Process(writer).status() == psutil.STATUS_ZOMBIE,
                 "the orphaned writer to finish and exit while the worker still runs")
        assert psutil.pid_exists(worker)
    finally:
        trainer.kill()
        trainer.wait(TIMEOUT)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    path = tmp_path / "checkpoint_epoch_1_batch_7.safetensors"
    assert ckptio.verify(path).files[0].status == "verified"


class _FakeCopyEvent:
    """Stands in for the CUDA event of a device-to-host copy: it fails, or blocks until released."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.released = threading.Event()
        self.waiting = threading.Event()
        if error is not None:
            self.released.set()

    def synchronize(self) -> None:
        self.waiting.set()
        assert self.released.wait(TIMEOUT)
        if self.error is not None:
            raise self.error


def _copy_events(monkeypatch: pytest.MonkeyPatch, events: list[_FakeCopyEvent]) -> None:
    """The next snapshots look as if their device-to-host copies were still in flight, one event each."""
    real = ckptio.snapshot.BufferSlot.take

    def take(self: Any, state: Any) -> Any:
        snapshot = real(self, state)
        if events:
            snapshot.copy_done = events.pop(0)
        return snapshot

    monkeypatch.setattr(ckptio.snapshot.BufferSlot, "take", take)


def test_a_failed_device_copy_fails_that_save_only_and_later_saves_keep_working(tmp_path, monkeypatch) -> None:
    failing = _FakeCopyEvent(RuntimeError("CUDA error: an illegal memory access was encountered"))
    _copy_events(monkeypatch, [failing])
    with CheckpointManager(tmp_path, writer="process", max_pending=1) as mgr:
        first = mgr.save(state_of(1.0), name="first")
        assert first is not None
        error = first.exception(timeout=TIMEOUT)
        assert isinstance(error, CheckpointWriteError) and "illegal memory access" in str(error)
        assert mgr._writer is not None and mgr._writer.alive()
        with pytest.raises(CheckpointWriteError, match="illegal memory access"):  # surfaced on the next call
            mgr.save(state_of(2.0), name="second")
        later = []
        for i, event in enumerate([_FakeCopyEvent(), _FakeCopyEvent()]):
            event.released.set()
            _copy_events(monkeypatch, [event])
            later.append(mgr.save(state_of(3.0 + i), name=f"later_{i}"))
        mgr.wait()
        assert all(f is not None and f.result(timeout=TIMEOUT) is not None for f in later)
    assert visible(tmp_path) == {"later_0.pth", "later_1.pth"}
    assert_same(ckptio.load(tmp_path / "later_1.pth"), state_of(4.0))


class _ThreadKilled(BaseException):
    """Not an Exception: nothing in the hand-off thread may catch it, so the thread really ends."""


def test_a_dead_hand_off_thread_makes_the_writer_not_alive_and_wait_raises_instead_of_hanging(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's death is the point here
    _copy_events(monkeypatch, [_FakeCopyEvent(_ThreadKilled())])
    mgr = CheckpointManager(tmp_path, writer="process", max_pending=1)
    try:
        mgr.save(state_of(1.0), name="lost")
        writer = mgr._writer
        assert writer is not None and writer._handoff_thread is not None  # type: ignore[attr-defined]
        writer._handoff_thread.join(TIMEOUT)  # type: ignore[attr-defined]
        assert not writer.alive()
        with pytest.raises(CheckpointWriteError, match="died"):
            mgr.wait()
    finally:
        mgr._tickets.clear()  # the lost save can never be answered; let close() finish
        with contextlib.suppress(CheckpointWriteError):  # the writer process says it never answered that save
            mgr.close()


def test_a_save_waiting_for_its_copy_when_the_writer_dies_is_never_sent_to_the_next_writer(
        tmp_path, monkeypatch) -> None:
    held = _FakeCopyEvent()
    _copy_events(monkeypatch, [held])
    with CheckpointManager(tmp_path, writer="process", max_pending=1) as mgr:
        doomed = mgr.save(state_of(1.0), name="one")
        assert doomed is not None and held.waiting.wait(TIMEOUT)
        os.kill(writer_pid(mgr), signal.SIGKILL)
        assert isinstance(doomed.exception(timeout=TIMEOUT), CheckpointWriteError)  # failed, its slot freed
        with pytest.raises(CheckpointWriteError, match="lost"):
            mgr.save(state_of(2.0), name="two")  # the death is reported first
        # Both slots are taken again by newer saves, one of them the slot "one" was copied into; they queue
        # behind "one" in the hand-off while a new writer process starts.
        two = mgr.save(state_of(2.0), name="two")
        three = mgr.save(state_of(3.0), name="three")
        held.released.set()
        mgr.wait()
        assert two is not None and three is not None
        assert two.result(timeout=TIMEOUT) is not None and three.result(timeout=TIMEOUT) is not None
    assert visible(tmp_path) == {"two.pth", "three.pth"}, "the lost save was written after all"
    assert_same(ckptio.load(tmp_path / "three.pth"), state_of(3.0))
    assert_same(ckptio.load(tmp_path / "two.pth"), state_of(2.0))


def test_prepare_pins_with_the_device_of_the_states_tensors_current_not_the_callers(tmp_path, monkeypatch) -> None:
    fake = FakeCuda().install(monkeypatch)
    made_current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the caller's device: not the state's
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    state = {"w": fake.tensor(torch.ones(4), 3), "step": 1}
    with CheckpointManager(tmp_path, writer="thread") as mgr:
        mgr.prepare(state)
        assert mgr._stager is not None and mgr._stager.wait_idle(TIMEOUT)
    assert made_current == [3]


def test_prepare_also_stages_this_ranks_shard_and_the_shard_save_uses_those_buffers(tmp_path) -> None:
    shard = {"optimizer_shard": {"m": torch.arange(10.0), "v": torch.ones(3, 3)}, "rank": 1}
    with CheckpointManager(tmp_path, rank=1, world_size=2, writer="thread", max_pending=1) as mgr:
        mgr.prepare(None, shard=shard)
        assert mgr._stager is not None and mgr._stager.wait_idle(TIMEOUT)
        prepared = [slot.shard.prepared for slot in mgr._slots]
        assert all(p is not None and p.shape == state_shape(shard) for p in prepared)
        assert all(slot.main.prepared is None for slot in mgr._slots)
        mgr.save(None, name="step_1", shard=shard, token="run:1").result(timeout=TIMEOUT)
        used = [slot.shard.staging for slot in mgr._slots if slot.shard.staging is not None]
        assert len(used) == 1 and any(used[0] is p for p in prepared)  # adopted: the save allocated nothing
class _NoDescriptorsLeft:
    """Stands in for ``subprocess.Popen`` in a process that has run out of file descriptors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_a_writer_process_that_cannot_start_fails_the_save_and_frees_its_slot(tmp_path, monkeypatch) -> None:
    # on_full="skip": a slot that was never given back shows as a skipped save instead of a hang
    with CheckpointManager(tmp_path, writer="process", max_pending=1, on_full="skip") as mgr:
        mgr.save({"w": torch.ones(3)}, name="a").result(timeout=TIMEOUT)
        os.kill(writer_pid(mgr), signal.SIGKILL)
        wait_for(lambda: mgr._writer._generation.dead, "the death to be noticed")  # type: ignore[union-attr]
        with monkeypatch.context() as patch:
            patch.setattr(ckptio.writer_process.subprocess, "Popen", _NoDescriptorsLeft)
            for _ in range(3):  # more tries than slots: each one's slot came back
                with pytest.raises(OSError) as raised:
                    mgr.save({"w": torch.ones(3)}, name="b")
                assert raised.value.errno == errno.EMFILE
            assert mgr.pending == 0
            mgr.wait()  # returns: nothing is waiting for a report that can never come
        mgr.save({"w": torch.full((3,), 2.0)}, name="b").result(timeout=TIMEOUT)  # descriptors again: a new writer
    assert visible(tmp_path) == {"a.pth", "b.pth"}
    assert torch.equal(ckptio.load(tmp_path / "b.pth")["w"], torch.full((3,), 2.0))


# Loaded by every Python process started with this directory on PYTHONPATH (the trainer, and its writer process,
# which inherits the environment): each checkpoint write stops just before its rename, with its temporary file on
# disk, until the test creates the file "release" in the gate directory.
GATED_SITE = textwrap.dedent("""
    import contextlib, os, time
    import ckptio.fileio

    _gate = os.environ["CKPTIO_TEST_GATE"]
    _real = ckptio.fileio.atomic_write

    @contextlib.contextmanager
    def _gated(final, **kwargs):
        with _real(final, **kwargs) as file:
            yield file
            open(os.path.join(_gate, "entered"), "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(_gate, "release")) and time.monotonic() < deadline:
                time.sleep(0.01)

    ckptio.fileio.atomic_write = _gated
""")

GATED_TRAINER = textwrap.dedent("""
    import sys, time, torch, ckptio
    mgr = ckptio.CheckpointManager(sys.argv[1], writer="process")
    mgr.save({"step": 7, "w": torch.arange(1000.0)}, name="checkpoint_epoch_1_batch_7")
    print("returned", flush=True)
    time.sleep(600)
""")


class _Waiting(logging.Handler):
    """Sets ``seen`` when a manager says it waits for an earlier run's writer."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "locked by the writer of an earlier run" in record.getMessage():
            self.seen.set()


def test_a_restart_right_after_kill_9_waits_for_the_old_writer_and_loses_no_returned_save(tmp_path,
                                                                                         monkeypatch) -> None:
    site, gate, directory = tmp_path / "site", tmp_path / "gate", tmp_path / "run"
    site.mkdir()
    gate.mkdir()
    (site / "sitecustomize.py").write_text(GATED_SITE)
    root = str(Path(ckptio.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(site), root)), CKPTIO_TEST_GATE=str(gate))
    trainer = subprocess.Popen([sys.executable, "-c", GATED_TRAINER, str(directory)], stdout=subprocess.PIPE,
                               text=True, env=env)
    waiting = _Waiting()
    logging.getLogger("ckptio").addHandler(waiting)
    opened: list[Any] = []
    restart = threading.Thread(target=lambda: opened.append(_open_or_error(directory)))
    try:
        assert trainer.stdout.readline().strip() == "returned"  # type: ignore[union-attr]
        wait_for(lambda: (gate / "entered").exists(), "the writer to be mid-write")
        trainer.kill()  # SIGKILL: the save had returned; its writer still holds the temporary file
        trainer.wait(TIMEOUT)
        monkeypatch.setattr(ckptio.dirlock, "EARLIER_WRITER_WAIT", 0.2)
        with pytest.raises(CheckpointDirectoryLockedError, match="writer of an earlier run"):
            CheckpointManager(directory)  # bounded: gives up with a message that says what holds it
        assert any(is_temporary(p.name) for p in directory.iterdir()), "a live writer's file was swept"
        monkeypatch.setattr(ckptio.dirlock, "EARLIER_WRITER_WAIT", TIMEOUT)
        restart.start()
        assert waiting.seen.wait(TIMEOUT), "the restarted manager did not wait for the old writer"
        assert any(is_temporary(p.name) for p in directory.iterdir()), "a live writer's file was swept"
        (gate / "release").touch()
        restart.join(TIMEOUT)
    finally:
        (gate / "release").touch()
        logging.getLogger("ckptio").removeHandler(waiting)
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(TIMEOUT)
        if restart.is_alive():
            restart.join(TIMEOUT)
    assert opened and isinstance(opened[0], CheckpointManager), opened
    opened[0].close()
    path = directory / "checkpoint_epoch_1_batch_7.pth"
    assert ckptio.verify(path).files[0].status == "verified"
    assert ckptio.load(path)["step"] == 7
    assert not any(is_temporary(p.name) for p in directory.iterdir())


def _open_or_error(directory: Path) -> CheckpointManager | BaseException:
    try:
        return CheckpointManager(directory)
    except BaseException as exc:
        return exc
