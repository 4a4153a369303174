"""Tests for ckptio.CheckpointManager: snapshot semantics, the background writer, atomicity, locking, retention."""

from __future__ import annotations

import copy
import errno
import gc
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.nn.functional as F
from helpers import MiB, assert_same, state

import ckptio
import ckptio.atomic
import ckptio.cli
import ckptio.dir_index
import ckptio.formats
import ckptio.manager
import ckptio.naming
from ckptio import CheckpointDirectoryLockedError, CheckpointManager, CheckpointWriteError
from ckptio.fileio import read_meta, write_checkpoint

COMBOS = [("torch", None), ("torch", "zstd"), ("safetensors", None), ("safetensors", "zstd")]
COMBO_IDS = ["pth", "pth.zst", "safetensors", "safetensors.zst"]
GATE_TIMEOUT = 10.0  # a fake never waits longer than this, so that a broken test fails instead of hanging
WRITERS = ["thread", "process"]

# -- helpers ---------------------------------------------------------------------------------------------------




def small_state(value: float = 1.0, size: int = 16) -> dict[str, Any]:
    return {"step": int(value), "weights": {"w": torch.full((size,), value), "b": torch.arange(3)}, "lr": [0.1]}


def visible(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if not p.name.startswith(".")}


def periodic(i: int) -> str:
    return f"checkpoint_epoch_1_batch_{i}"


class GatedWriter:
    """Stands in for ``ckptio.writer.write_checkpoint``: records the call, waits at a gate, then writes for real."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: list[threading.Thread] = []
        self.snapshots: list[Any] = []

    def __call__(self, path: Path, snapshot: Any, **kwargs: Any) -> ckptio.SavedCheckpoint:
        self.threads.append(threading.current_thread())
        self.snapshots.append(snapshot)
        self.entered.set()
        assert self.gate.wait(GATE_TIMEOUT), "the test never opened the gate"
        return write_checkpoint(path, snapshot, **kwargs)


class FailingWriter:
    """Stands in for ``ckptio.writer.write_checkpoint``: every write fails with ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    def __call__(self, path: Path, snapshot: Any, **kwargs: Any) -> ckptio.SavedCheckpoint:
        self.calls += 1
        raise self.error


@pytest.fixture(params=WRITERS)
def writer(request) -> str:
    """Both background writers must behave the same; fakes that patch the writer's code need ``thread``."""
    return request.param


@pytest.fixture
def gated(monkeypatch) -> Any:
    writer = GatedWriter()
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", writer)
    yield writer
    writer.gate.set()  # never leave a writer thread parked


# -- a real training state -------------------------------------------------------------------------------------


def make_training(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> None:
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 6), torch.randn(16, 2)  # drawn from the global RNG, as dropout is
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


# Each writer process costs seconds to start: the process writer runs two combinations here (all four in
# tests/test_writer_process.py, which compares its files with the thread writer's).
@pytest.mark.parametrize(("fmt", "compression", "writer"),
                         [(f, c, "thread") for f, c in COMBOS] + [("torch", None, "process"),
                                                                  ("safetensors", "zstd", "process")],
                         ids=[f"thread-{i}" for i in COMBO_IDS] + ["process-pth", "process-safetensors.zst"])
def test_model_optimizer_scheduler_and_rng_state_round_trip_and_resume_identically(tmp_path, fmt, compression,
                                                                                    writer) -> None:
    model, optimizer, scheduler = make_training(seed=0)
    train(model, optimizer, scheduler, steps=3)
    random.seed(5)
    state = {
        "epoch": 1,
        "batch": 3,
        "loss": 0.5,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "rng_state": torch.get_rng_state(),
        "python_rng_state": random.getstate(),
    }
    expected = copy.deepcopy(state)
    with CheckpointManager(tmp_path, format=fmt, compression=compression, writer=writer) as mgr:
        mgr.save(state, name="checkpoint_epoch_1_batch_3")
        train(model, optimizer, scheduler, steps=3)  # keeps changing the saved tensors while the writer runs
    reference = [p.detach().clone() for p in model.parameters()]
    reference_lr = scheduler.get_last_lr()

    loaded = ckptio.load(mgr.path_for("checkpoint_epoch_1_batch_3"), map_location="cpu")
    assert_same(loaded, expected)
    assert type(loaded["model_state_dict"]) is OrderedDict
    assert list(loaded["optimizer_state_dict"]["state"]) == list(range(len(list(model.parameters()))))
    assert loaded["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.8, 0.99)

    resumed, resumed_optimizer, resumed_scheduler = make_training(seed=123)
    resumed.load_state_dict(loaded["model_state_dict"])
    resumed_optimizer.load_state_dict(loaded["optimizer_state_dict"])
    resumed_scheduler.load_state_dict(loaded["scheduler_state_dict"])
    torch.set_rng_state(loaded["rng_state"])
    random.setstate(loaded["python_rng_state"])
    train(resumed, resumed_optimizer, resumed_scheduler, steps=3)
    for got, want in zip(resumed.parameters(), reference, strict=True):
        assert torch.equal(got, want)
    assert resumed_scheduler.get_last_lr() == reference_lr


# -- snapshot semantics ----------------------------------------------------------------------------------------


def test_save_returns_once_the_snapshot_is_taken_and_wait_makes_it_durable(tmp_path, gated) -> None:
    with CheckpointManager(tmp_path) as mgr:
        future = mgr.save(small_state(), name="c")
        assert gated.entered.wait(GATE_TIMEOUT)
        assert not mgr.path_for("c").exists()
        assert mgr.pending == 1
        assert future is not None and not future.done()
        gated.gate.set()
        mgr.wait()
        assert mgr.pending == 0
        saved = future.result(timeout=0)
        assert saved.path == mgr.path_for("c") and saved.path.exists()
        assert ckptio.verify(saved.path).files[0].status == "verified"
        assert mgr.stats.committed == 1 and mgr.stats.requested == 1
        assert mgr.stats.last == saved


def test_mutation_after_save_does_not_leak_into_the_file(tmp_path, gated) -> None:
    state = {"model": {"w": torch.randn(8, 8), "v": torch.randn(5)}, "steps": [torch.tensor(1)], "epoch": 1}
    expected = copy.deepcopy(state)
    with CheckpointManager(tmp_path, format="safetensors") as mgr:
        mgr.save(state, name="c")
        state["model"]["w"].mul_(-3.0).add_(7.0)
        state["model"]["v"].zero_()
        state["steps"][0].fill_(42)
        state["model"]["extra"] = torch.ones(1)
        state["epoch"] = 2
        gated.gate.set()
    assert_same(ckptio.load(mgr.path_for("c")), expected)


@pytest.mark.parametrize("writer", ["thread", "process"])
@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_a_parameter_loads_back_as_a_parameter_with_its_requires_grad_as_torch_save_keeps_it(
        tmp_path, fmt, compression, writer) -> None:
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    state = {"params": list(model.parameters()), "plain": torch.ones(2)}
    with CheckpointManager(tmp_path, format=fmt, compression=compression, writer=writer, fsync=False) as mgr:
        path = mgr.save(state, name="p").result().path
    reference = io.BytesIO()
    torch.save(state, reference)
    reference.seek(0)
    expected = torch.load(reference, weights_only=True)

    loaded = ckptio.load(path)
    assert [(type(t), t.requires_grad) for t in loaded["params"]] == [
        (type(t), t.requires_grad) for t in expected["params"]] == [
        (torch.nn.Parameter, True), (torch.nn.Parameter, False)]
    assert type(loaded["plain"]) is torch.Tensor
    assert all(torch.equal(a, b) for a, b in zip(loaded["params"], model.parameters(), strict=True))


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_save_never_mutates_or_pops_from_the_callers_containers(tmp_path, fmt, compression) -> None:
    model, optimizer, scheduler = make_training(seed=1)
    train(model, optimizer, scheduler, steps=1)
    state = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "epoch": 1,
        "nested": OrderedDict(a=[1, (2, 3)], b={0: None}),
    }
    before = copy.deepcopy(state)
    identities = {key: id(value) for key, value in state.items()}
    inner = {key: id(value) for key, value in state["optimizer_state_dict"].items()}
    metadata = {"note": "x", "tags": ["a"]}
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        mgr.save(state, name="c", metadata=metadata)
        mgr.wait()
    assert metadata == {"note": "x", "tags": ["a"]}
    assert_same(state, before)
    assert {key: id(value) for key, value in state.items()} == identities
    assert {key: id(value) for key, value in state["optimizer_state_dict"].items()} == inner


def test_unsupported_leaf_raises_value_error_in_save_and_the_manager_keeps_working(tmp_path, writer) -> None:
    with CheckpointManager(tmp_path, max_pending=1, writer=writer) as mgr:
        for _ in range(3):  # more than the number of buffer slots: a failed snapshot must give its slot back
            with pytest.raises(ValueError, match=r"optimizer/seen is a builtins\.set"):
                mgr.save({"optimizer": {"seen": {1, 2}}}, name="c")
        with pytest.raises(ValueError, match=r"emb is a torch\.sparse_coo tensor.*to_dense"):
            mgr.save({"emb": torch.eye(2).to_sparse()}, name="c")
        mgr.save(small_state(), name="c")
        mgr.wait()
    assert visible(tmp_path) == {"c.pth"}


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", " padded", "nul\0"])
def test_a_name_that_is_not_a_plain_file_stem_is_rejected(tmp_path, name) -> None:
    with CheckpointManager(tmp_path) as mgr, pytest.raises(ValueError, match="must be a plain file stem"):
        mgr.save(small_state(), name=name)


# -- the background writer -------------------------------------------------------------------------------------


def test_background_error_surfaces_on_wait_with_its_cause(tmp_path, monkeypatch) -> None:
    failure = RuntimeError("disk on fire")
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", FailingWriter(failure))
    mgr = CheckpointManager(tmp_path)
    future = mgr.save(small_state(), name="c")
    with pytest.raises(CheckpointWriteError, match="disk on fire") as info:
        mgr.wait()
    assert info.value.__cause__ is failure
    assert "c.pth" in str(info.value)
    assert isinstance(future.exception(timeout=GATE_TIMEOUT), CheckpointWriteError)
    assert mgr.stats.failed == 1 and mgr.stats.committed == 0
    mgr.close()


def test_background_error_surfaces_on_the_next_save(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", FailingWriter(RuntimeError("disk on fire")))
    with CheckpointManager(tmp_path) as mgr:
        future = mgr.save(small_state(), name="first")
        future.exception(timeout=GATE_TIMEOUT)  # the failure has happened in the background
        with pytest.raises(CheckpointWriteError, match=r"first\.pth failed: disk on fire"):
            mgr.save(small_state(), name="second")
        monkeypatch.setattr(ckptio.writer, "write_checkpoint", write_checkpoint)
        mgr.save(small_state(), name="third")  # reported once, then the manager goes on
        mgr.wait()
    assert visible(tmp_path) == {"third.pth"}


def test_background_error_surfaces_on_close_and_when_leaving_with(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", FailingWriter(RuntimeError("disk on fire")))
    mgr = CheckpointManager(tmp_path / "a")
    mgr.save(small_state(), name="c")
    with pytest.raises(CheckpointWriteError, match="disk on fire"):
        mgr.close()
    with pytest.raises(CheckpointWriteError, match="disk on fire"), CheckpointManager(tmp_path / "b") as other:
        other.save(small_state(), name="c")


def test_a_real_write_failure_surfaces_once_naming_the_file_and_the_next_save_works(tmp_path, writer) -> None:
    (tmp_path / "c.pth").mkdir()  # the rename onto the final name fails: a real error, in either writer
    (tmp_path / "c.pth" / "keep").write_text("a directory in the way")
    with CheckpointManager(tmp_path, writer=writer) as mgr:
        future = mgr.save(small_state(), name="c")
        with pytest.raises(CheckpointWriteError, match=r"saving .*c\.pth failed") as info:
            mgr.wait()
        assert isinstance(info.value.__cause__, OSError)
        assert isinstance(future.exception(timeout=GATE_TIMEOUT), CheckpointWriteError)
        assert mgr.stats.failed == 1 and mgr.stats.committed == 0
        mgr.save(small_state(2), name="d")  # reported once, then the manager goes on
        mgr.wait()
        assert mgr.stats.committed == 1
    assert ckptio.load(tmp_path / "d.pth")["step"] == 2


def test_metadata_that_cannot_be_stored_fails_that_save_and_the_writer_goes_on(tmp_path, writer) -> None:
    with CheckpointManager(tmp_path, writer=writer) as mgr:
        future = mgr.save(small_state(), name="c", metadata={"callback": lambda: None})
        assert isinstance(future.exception(timeout=60), CheckpointWriteError)
        with pytest.raises(CheckpointWriteError, match="c.pth failed"):
            mgr.wait()
        mgr.save(small_state(2), name="d").result(timeout=60)
    assert visible(tmp_path) == {"d.pth"}


def test_close_from_another_thread_during_a_save_lets_that_save_finish(tmp_path, gated) -> None:
    mgr = CheckpointManager(tmp_path, max_pending=1, on_full="block")
    mgr.save(small_state(1), name="one")
    mgr.save(small_state(2), name="two")
    futures: list[Any] = []
    saving = threading.Thread(target=lambda: futures.append(mgr.save(small_state(3), name="three")))
    saving.start()  # blocks inside save(): both slots are busy until the gate opens
    while mgr.stats.requested < 3:
        threading.Event().wait(0.01)
    closing = threading.Thread(target=mgr.close)
    closing.start()
    gated.gate.set()
    saving.join(GATE_TIMEOUT)
    closing.join(GATE_TIMEOUT)
    assert not saving.is_alive() and not closing.is_alive()
    assert futures and futures[0].result(timeout=GATE_TIMEOUT).path == tmp_path / "three.pth"
    assert visible(tmp_path) == {"one.pth", "two.pth", "three.pth"}
    with pytest.raises(RuntimeError, match="is closed"):
        mgr.save(small_state(), name="late")


def test_leaving_with_because_of_an_exception_does_not_hide_it_behind_a_background_error(tmp_path,
                                                                                          monkeypatch) -> None:
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", FailingWriter(RuntimeError("disk on fire")))
    with pytest.raises(KeyError, match="training bug"), CheckpointManager(tmp_path) as mgr:
        mgr.save(small_state(), name="c")
        raise KeyError("training bug")


def test_sync_mode_raises_a_write_error_from_save_itself(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", FailingWriter(RuntimeError("disk on fire")))
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        with pytest.raises(CheckpointWriteError, match="disk on fire"):
            mgr.save(small_state(), name="c")
        mgr.wait()  # reported once


def test_an_error_after_the_file_is_committed_is_not_swallowed(tmp_path, monkeypatch) -> None:
    def unreadable_directory(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    with CheckpointManager(tmp_path, keep_count=1) as mgr:
        monkeypatch.setattr(ckptio.writer, "scan", unreadable_directory)  # retention cannot list the directory
        future = mgr.save(small_state(), name=periodic(1))
        with pytest.raises(CheckpointWriteError, match="Permission denied"):
            mgr.wait()
        assert future.done()
        monkeypatch.undo()


def test_no_space_with_on_no_space_skip_counts_the_skip_and_training_goes_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ckptio.writer, "write_checkpoint",
                        FailingWriter(OSError(errno.ENOSPC, "No space left on device")))
    with CheckpointManager(tmp_path, on_no_space="skip") as mgr:
        future = mgr.save(small_state(), name="c")
        mgr.wait()
        assert future.result(timeout=0) is None
        assert mgr.stats.skipped_no_space == 1 and mgr.stats.failed == 0


def test_no_space_with_on_no_space_raise_surfaces_the_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ckptio.writer, "write_checkpoint",
                        FailingWriter(OSError(errno.ENOSPC, "No space left on device")))
    with CheckpointManager(tmp_path, on_no_space="raise") as mgr:
        mgr.save(small_state(), name="c")
        with pytest.raises(CheckpointWriteError, match="No space left"):
            mgr.wait()


def test_on_full_skip_drops_saves_while_the_queue_is_full_and_counts_them(tmp_path, gated) -> None:
    with CheckpointManager(tmp_path, max_pending=1, on_full="skip") as mgr:
        first = mgr.save(small_state(1), name="one")
        second = mgr.save(small_state(2), name="two")  # waits while "one" is written
        third = mgr.save(small_state(3), name="three")  # no room: dropped
        assert first is not None and second is not None and third is None
        assert mgr.stats.skipped_busy == 1 and mgr.stats.requested == 3
        gated.gate.set()
        mgr.wait()
        assert mgr.save(small_state(4), name="four") is not None  # room again once the queue drained
        mgr.wait()
        assert mgr.stats.committed == 3 and mgr.stats.skipped_busy == 1
    assert visible(tmp_path) == {"one.pth", "two.pth", "four.pth"}
    assert ckptio.load(tmp_path / "two.pth")["step"] == 2


def test_on_full_skip_with_more_pending_room_accepts_more_saves(tmp_path, gated) -> None:
    with CheckpointManager(tmp_path, max_pending=3, on_full="skip") as mgr:
        results = [mgr.save(small_state(i), name=f"s{i}") for i in range(6)]
        assert [r is not None for r in results] == [True, True, True, True, False, False]
        assert mgr.stats.skipped_busy == 2
        gated.gate.set()


def test_on_full_block_makes_the_caller_wait_for_the_writer(tmp_path, gated) -> None:
    with CheckpointManager(tmp_path, max_pending=1, on_full="block") as mgr:
        mgr.save(small_state(1), name="one")
        mgr.save(small_state(2), name="two")
        returned = threading.Event()

        def third_save() -> None:
            mgr.save(small_state(3), name="three")
            returned.set()

        caller = threading.Thread(target=third_save)
        caller.start()
        assert not returned.wait(0.3), "save() returned although every buffer slot was busy"
        gated.gate.set()
        caller.join(GATE_TIMEOUT)
        assert returned.is_set()
        mgr.wait()
        assert mgr.stats.committed == 3 and mgr.stats.skipped_busy == 0
    assert visible(tmp_path) == {"one.pth", "two.pth", "three.pth"}


def test_one_background_thread_writes_every_async_save(tmp_path, monkeypatch) -> None:
    spy = GatedWriter()
    spy.gate.set()
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", spy)
    with CheckpointManager(tmp_path) as mgr:
        for i in range(4):
            mgr.save(small_state(i), name=f"s{i}")
    assert len(spy.threads) == 4
    assert len(set(spy.threads)) == 1 and spy.threads[0] is not threading.current_thread()


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_sync_mode_writes_in_the_callers_thread_the_same_file_as_async(tmp_path, monkeypatch, fmt,
                                                                         compression) -> None:
    spy = GatedWriter()
    spy.gate.set()
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", spy)
    state = small_state(3.5)
    with CheckpointManager(tmp_path / "sync", async_save=False, format=fmt, compression=compression) as sync:
        sync.save(state, name="c")
        assert sync.path_for("c").exists() and sync.pending == 0  # durable when save() returns
    assert spy.threads == [threading.current_thread()]
    with CheckpointManager(tmp_path / "async", format=fmt, compression=compression) as background:
        background.save(state, name="c")
    assert spy.threads[1] is not threading.current_thread()
    sync_file, async_file = sync.path_for("c"), background.path_for("c")
    assert sync_file.name == async_file.name
    assert_same(ckptio.load(sync_file), ckptio.load(async_file))
    (sync_seal, _), (async_seal, _) = read_meta(sync_file), read_meta(async_file)
    assert sync_seal is not None and async_seal is not None
    assert {k: v for k, v in sync_seal.meta.items() if k != "created"} == {
        k: v for k, v in async_seal.meta.items() if k != "created"
    }
    if fmt == "torch" and compression is None:  # the same zip, up to its comment (the meta, with a time stamp)
        end = sync_file.read_bytes().rfind(b"PK\x05\x06") + 20
        assert sync_file.read_bytes()[:end] == async_file.read_bytes()[:end]


def test_close_drains_the_queue_and_is_idempotent(tmp_path, gated) -> None:
    mgr = CheckpointManager(tmp_path, max_pending=2)
    for i in range(3):
        mgr.save(small_state(i), name=f"s{i}")
    gated.gate.set()
    mgr.close()
    assert visible(tmp_path) == {"s0.pth", "s1.pth", "s2.pth"}
    mgr.close()
    with pytest.raises(RuntimeError, match="is closed"):
        mgr.save(small_state(), name="late")


def test_user_metadata_is_recorded_in_the_file(tmp_path) -> None:
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        saved = mgr.save(small_state(), name="c", metadata={"git": "abc123", "host": "n1"})
    seal, _ = read_meta(saved.result().path)
    assert seal is not None and seal.meta["user"] == {"git": "abc123", "host": "n1"}
    assert seal.meta["summary"] == {"step": 1}


@pytest.mark.parametrize(("fmt", "compression", "suffix"),
                         [(f, c, s) for (f, c), s in zip(COMBOS, [".pth", ".pth.zst", ".safetensors",
                                                                  ".safetensors.zst"], strict=True)],
                         ids=COMBO_IDS)
def test_each_format_gets_its_suffix_and_loads_transparently(tmp_path, fmt, compression, suffix) -> None:
    state = small_state(2.0)
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        mgr.save(state, name="best_model")
    assert visible(tmp_path) == {"best_model" + suffix}
    assert_same(ckptio.load(tmp_path / ("best_model" + suffix)), state)


def test_min_free_that_cannot_be_met_skips_the_save_and_keeps_earlier_checkpoints(tmp_path, writer) -> None:
    with CheckpointManager(tmp_path, async_save=False, fsync=False) as mgr:
        mgr.save(small_state(1), name=periodic(1))
    with CheckpointManager(tmp_path, min_free="1000000TB", on_no_space="skip", writer=writer) as mgr:
        future = mgr.save(small_state(2), name=periodic(2))
        mgr.wait()
        assert future.result(timeout=0) is None
        assert mgr.stats.skipped_no_space == 1
    assert visible(tmp_path) == {f"{periodic(1)}.pth"}


def test_min_free_that_cannot_be_met_raises_with_on_no_space_raise(tmp_path, writer) -> None:
    with CheckpointManager(tmp_path, min_free="1000000TB", on_no_space="raise", writer=writer) as mgr:
        mgr.save(small_state(), name="c")
        with pytest.raises(CheckpointWriteError, match="min_free"):
            mgr.wait()
    assert visible(tmp_path) == set()


def test_a_directory_path_that_is_a_file_is_refused(tmp_path) -> None:
    target = tmp_path / "checkpoints"
    target.write_text("a file")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        CheckpointManager(target)


# -- atomic files, leftovers, locking --------------------------------------------------------------------------


class PausingTorchWriter:
    """Stands in for ``ckptio.formats.write_torch``: writes half the bytes, pauses, then writes the rest."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.halfway = threading.Event()
        self.resume = threading.Event()

    def __call__(self, snapshot: Any, stream: Any) -> None:
        buffer = io.BytesIO()
        self.real(snapshot, buffer)
        data = buffer.getvalue()
        stream.write(data[: len(data) // 2])
        self.halfway.set()
        assert self.resume.wait(GATE_TIMEOUT), "the test never resumed the write"
        stream.write(data[len(data) // 2 :])


def test_no_temporary_file_is_visible_under_a_final_name_while_saving(tmp_path, monkeypatch) -> None:
    pausing = PausingTorchWriter(ckptio.formats.write_torch)
    monkeypatch.setattr(ckptio.formats, "write_torch", pausing)
    try:
        with CheckpointManager(tmp_path, compression="zstd") as mgr:  # zstd: torch.save streams through ckptio
            mgr.save(small_state(1.0, size=4096), name="c")
            assert pausing.halfway.wait(GATE_TIMEOUT)
            assert visible(tmp_path) == set()
            hidden = [p.name for p in tmp_path.iterdir() if p.name.endswith(".ckptio-tmp")]
            assert len(hidden) == 1 and hidden[0].startswith(".c.pth.zst.")
            assert mgr.checkpoints() == []
            assert ckptio.verify(tmp_path).files == []
            pausing.resume.set()
            mgr.wait()
            assert visible(tmp_path) == {"c.pth.zst"}

            pausing.halfway.clear()
            pausing.resume.clear()
            mgr.save(small_state(2.0, size=4096), name="c")  # rewriting a name: the old file stays whole
            assert pausing.halfway.wait(GATE_TIMEOUT)
            assert visible(tmp_path) == {"c.pth.zst"}
            assert ckptio.verify(tmp_path / "c.pth.zst").ok
            assert ckptio.load(tmp_path / "c.pth.zst")["step"] == 1
            pausing.resume.set()
        assert ckptio.load(tmp_path / "c.pth.zst")["step"] == 2
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".ckptio-tmp")]
    finally:
        pausing.resume.set()


def test_leftover_temporary_files_are_removed_when_a_manager_opens_the_directory(tmp_path) -> None:
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(small_state(), name="kept")
    leftovers = [".c.pth.4242.deadbeef.ckptio-tmp", ".ckptio-index.json.4242.ckptio-tmp",
                 ".best_model.safetensors.zst.1.00ff00ff.ckptio-tmp"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / "notes.ckptio-tmp").write_text("not hidden: not ours")
    (tmp_path / "notes.txt").write_text("unrelated")
    with CheckpointManager(tmp_path):
        names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(leftovers)
    assert {"kept.pth", "notes.ckptio-tmp", "notes.txt"} <= names
    assert ckptio.verify(tmp_path / "kept.pth").ok


def test_a_second_manager_on_the_same_directory_is_refused_until_the_first_closes(tmp_path) -> None:
    first = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointDirectoryLockedError, match=rf"process {os.getpid()}"):
        CheckpointManager(tmp_path)
    with pytest.raises(CheckpointDirectoryLockedError):
        CheckpointManager(tmp_path, format="safetensors")
    first.close()
    with CheckpointManager(tmp_path) as second:
        second.save(small_state(), name="c")
    CheckpointManager(tmp_path).close()  # leaving ``with`` released the lock too


def test_a_manager_in_another_process_holds_the_directory(tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(tmp_path / '.ckptio.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointDirectoryLockedError, match=rf"process {holder.pid}"):
            CheckpointManager(tmp_path)
    finally:
        try:
            holder.communicate(timeout=GATE_TIMEOUT)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.communicate()
    CheckpointManager(tmp_path).close()


# -- retention -------------------------------------------------------------------------------------------------


def test_keep_count_keeps_the_newest_periodic_checkpoints_and_never_best_model(tmp_path, writer) -> None:
    with CheckpointManager(tmp_path, keep_count=2, fsync=False, writer=writer) as mgr:
        for i in range(1, 8):
            mgr.save(small_state(i), name=periodic(i))
            if i == 2:
                mgr.save(small_state(0), name="best_model")
            mgr.wait()
            expected = {f"{periodic(j)}.pth" for j in range(max(1, i - 1), i + 1)}
            if i >= 2:
                expected.add("best_model.pth")
            assert visible(tmp_path) == expected, f"after save {i}"
        assert mgr.stats.deleted == 5
    assert ckptio.load(tmp_path / "best_model.pth")["step"] == 0


def test_keep_count_of_one_keeps_only_the_newest_periodic_checkpoint(tmp_path) -> None:
    with CheckpointManager(tmp_path, keep_count=1, fsync=False, async_save=False) as mgr:
        mgr.save(small_state(0), name="best_model")
        for i in range(1, 5):
            mgr.save(small_state(i), name=periodic(i))
            assert visible(tmp_path) == {"best_model.pth", f"{periodic(i)}.pth"}


def test_protected_names_are_configurable(tmp_path) -> None:
    with CheckpointManager(tmp_path, keep_count=1, protected_names=("best_model", "final"), async_save=False,
                           fsync=False) as mgr:
        mgr.save(small_state(), name="final")
        for i in range(1, 4):
            mgr.save(small_state(i), name=periodic(i))
    assert visible(tmp_path) == {"final.pth", f"{periodic(3)}.pth"}


def test_deletions_happen_only_after_the_new_checkpoint_is_committed(tmp_path, monkeypatch) -> None:
    listings: list[set[str]] = []

    def listing_writer(path: Path, snapshot: Any, **kwargs: Any) -> ckptio.SavedCheckpoint:
        listings.append(visible(tmp_path))
        saved = write_checkpoint(path, snapshot, **kwargs)
        listings.append(visible(tmp_path))
        return saved

    monkeypatch.setattr(ckptio.writer, "write_checkpoint", listing_writer)
    with CheckpointManager(tmp_path, keep_count=1, fsync=False) as mgr:
        for i in range(1, 5):
            mgr.save(small_state(i), name=periodic(i))
            mgr.wait()
    for i in range(2, 5):
        before, after = listings[2 * (i - 1)], listings[2 * (i - 1) + 1]
        assert f"{periodic(i - 1)}.pth" in before, "the previous checkpoint was deleted before the new one existed"
        assert {f"{periodic(i - 1)}.pth", f"{periodic(i)}.pth"} <= after
    assert visible(tmp_path) == {f"{periodic(4)}.pth"}


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize(("fmt", "compression", "writer"),
                         [("torch", None, "thread"), ("safetensors", "zstd", "thread"), ("torch", None, "process")],
                         ids=["thread-pth", "thread-st.zst", "process-pth"])
def test_disk_budget_is_never_exceeded_after_a_save_and_keeps_the_newest(tmp_path, fmt, compression, writer) -> None:
    def state(i: int) -> dict[str, Any]:  # random values, so that zstd cannot shrink one file more than another
        return {"step": i, "w": torch.rand(2000, generator=torch.Generator().manual_seed(i))}

    with CheckpointManager(tmp_path / "probe", format=fmt, compression=compression, async_save=False) as probe:
        size = probe.save(state(0), name=periodic(0)).result().size
    budget = int(3.5 * size)
    directory = tmp_path / "run"
    with CheckpointManager(directory, format=fmt, compression=compression, disk_budget=budget, fsync=False,
                           writer=writer) as mgr:
        for i in range(1, 9):
            mgr.save(state(i), name=periodic(i))
            if i == 3:
                mgr.save(state(100), name="best_model")
            mgr.wait()
            assert _directory_bytes(directory) <= budget, f"after save {i}"
            assert mgr.path_for(periodic(i)).exists()
            if i >= 3:
                assert mgr.path_for("best_model").exists()
        assert {e.name for e in mgr.checkpoints()} == {"best_model", periodic(7), periodic(8)}
        assert mgr.stats.deleted == 6


def test_disk_budget_given_as_text_is_honoured(tmp_path) -> None:
    with CheckpointManager(tmp_path, disk_budget="20KB", fsync=False, async_save=False) as mgr:
        for i in range(1, 10):
            mgr.save({"w": torch.rand(1000, generator=torch.Generator().manual_seed(i))}, name=periodic(i))
            assert _directory_bytes(tmp_path) <= 20_000
            assert mgr.path_for(periodic(i)).exists()


def test_keep_count_and_disk_budget_together(tmp_path) -> None:
    with CheckpointManager(tmp_path, keep_count=3, disk_budget=10**9, fsync=False, async_save=False) as mgr:
        for i in range(1, 6):
            mgr.save(small_state(i), name=periodic(i))
    assert visible(tmp_path) == {f"{periodic(i)}.pth" for i in (3, 4, 5)}


# -- memory ----------------------------------------------------------------------------------------------------


def test_snapshot_buffers_are_reused_and_bounded_by_max_pending(tmp_path, monkeypatch) -> None:
    spy = GatedWriter()
    spy.gate.set()
    monkeypatch.setattr(ckptio.writer, "write_checkpoint", spy)
    state = {"a": torch.zeros(64), "b": [torch.zeros(3, 3), torch.zeros(2, dtype=torch.int64)]}
    with CheckpointManager(tmp_path, max_pending=2, fsync=False, keep_count=1) as mgr:
        for i in range(30):
            state["a"].fill_(i)
            mgr.save(state, name=periodic(i))
    assert len(spy.snapshots) == 30
    buffers = {id(t) for snapshot in spy.snapshots for t in snapshot.tensors}
    assert len(buffers) <= (2 + 1) * 3  # (max_pending + 1) slots of 3 buffers, reused by every later save
    assert torch.equal(ckptio.load(mgr.path_for(periodic(29)))["a"], torch.full((64,), 29.0))


@pytest.mark.parametrize(("fmt", "saves"), [("torch", 200), ("safetensors", 100)])
def test_process_memory_stays_flat_over_many_saves(tmp_path, fmt, saves) -> None:
    state = {"model": {f"layer{i}": torch.randn(256, 1024) for i in range(8)}, "step": 0}  # 8 MiB
    process = psutil.Process()
    with CheckpointManager(tmp_path, format=fmt, keep_count=2, fsync=False, drop_page_cache=False) as mgr:
        for i in range(20):  # warm-up: buffers, allocator pools, thread
            state["step"] = i
            mgr.save(state, name=periodic(i))
        mgr.wait()
        gc.collect()
        baseline = peak = process.memory_info().rss
        last = 20 + saves - 1
        for i in range(20, last + 1):
            state["step"] = i
            mgr.save(state, name=periodic(i))  # async: samples include a snapshot still being written
            if i % 10 == 0:
                peak = max(peak, process.memory_info().rss)
        mgr.wait()
        peak = max(peak, process.memory_info().rss)
    growth_mib = (peak - baseline) / 2**20
    assert growth_mib < 48, f"RSS grew by {growth_mib:.0f} MiB over {saves} saves of an 8 MiB state"
    assert ckptio.load(mgr.path_for(periodic(last)))["step"] == last


def test_an_unknown_writer_is_refused_naming_the_choices(tmp_path) -> None:
    with pytest.raises(ValueError, match="writer must be 'thread' or 'process'"):
        CheckpointManager(tmp_path, writer="fork")
    CheckpointManager(tmp_path).close()  # and the directory was not left locked


def test_a_failed_construction_leaves_the_directory_unlocked(tmp_path) -> None:
    with pytest.raises((ValueError, TypeError)):
        CheckpointManager(tmp_path, max_pending=1.5)
    CheckpointManager(tmp_path).close()


# -- the directory is fixed when the manager is created --------------------------------------------------------


def test_a_relative_directory_keeps_meaning_the_same_place_after_chdir(tmp_path, monkeypatch, writer) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    with CheckpointManager("runs", keep_count=1, fsync=False, writer=writer) as mgr:
        mgr.save(small_state(1), name=periodic(1)).result(GATE_TIMEOUT)
        os.chdir(tmp_path / "elsewhere")
        mgr.save(small_state(2), name=periodic(2)).result(GATE_TIMEOUT)
        if writer == "process":  # a writer process started after the chdir writes to the same place
            pid = mgr._writer.pid  # type: ignore[union-attr]
            os.kill(pid, 9)
            deadline = time.monotonic() + 60
            while not mgr._writer._generation.dead and time.monotonic() < deadline:  # type: ignore[union-attr]
                time.sleep(0.01)
        mgr.save(small_state(3), name=periodic(3)).result(GATE_TIMEOUT * 6)
        assert mgr.path_for(periodic(3)) == tmp_path / "runs" / f"{periodic(3)}.pth"
    assert visible(tmp_path / "runs") == {f"{periodic(3)}.pth"}
    assert list((tmp_path / "elsewhere").iterdir()) == []


class _Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> int:
        return index


def test_forked_dataloader_workers_do_not_keep_the_directory_locked(tmp_path) -> None:
    first = CheckpointManager(tmp_path)
    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    batches = iter(loader)
    next(batches)  # both workers are forked now and live until the iterator goes
    try:
        first.close()  # what a kill -9 of the trainer does to its own descriptor; the workers still run
        with CheckpointManager(tmp_path) as second:  # a restart is not refused because of the workers
            second.save(small_state(), name="c")
    finally:
        del batches
    assert visible(tmp_path) == {"c.pth"}


def test_keep_count_and_clean_keep_the_newest_written_when_older_files_have_later_mtimes(tmp_path) -> None:
    with CheckpointManager(tmp_path, async_save=False, fsync=False) as mgr:
        for i in (1, 2, 3):
            mgr.save(small_state(i), name=periodic(i))
    future = time.time_ns() + 3600 * 10**9  # the clock was stepped back after these were written
    for i in (1, 2, 3):
        os.utime(tmp_path / f"{periodic(i)}.pth", ns=(future - i, future - i))  # the oldest looks newest
    assert ckptio.cli.main(["clean", str(tmp_path), "--keep-count", "2"]) == 0
    assert visible(tmp_path) == {f"{periodic(2)}.pth", f"{periodic(3)}.pth"}
    with CheckpointManager(tmp_path, keep_count=1, async_save=False, fsync=False) as mgr:
        mgr.save(small_state(4), name=periodic(4))
    assert visible(tmp_path) == {f"{periodic(4)}.pth"}


# -- signals during a save -------------------------------------------------------------------------------------


def test_signals_arriving_all_through_a_save_do_not_lose_or_damage_it(tmp_path) -> None:
    ticks = []
    previous = signal.signal(signal.SIGALRM, lambda *_: ticks.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        for fmt, compression in COMBOS:
            with CheckpointManager(tmp_path / f"{fmt}-{compression}", format=fmt, compression=compression,
                                   async_save=False) as mgr:
                mgr.save(state(1, elements=4 * MiB), name=periodic(1))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert ticks, "no signal arrived during the saves"
    for fmt, compression in COMBOS:
        assert ckptio.verify(tmp_path / f"{fmt}-{compression}").ok
