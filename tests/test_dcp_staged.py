"""Sharded saves through ckptio's staging slot and writer (one process): the writer's errors surface on the next
call, the slot's buffers are reused between saves, and the ranks of one save agree on its outcome (two ranks
simulated with two writer threads)."""

from __future__ import annotations

import dataclasses
import errno
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import ckptio
import ckptio.dcp
import ckptio.dcp_commit
import ckptio.dcp_job
import ckptio.dcp_manager
import ckptio.dcp_writer
from ckptio.cli import main as cli_main
from ckptio.dcp_job import DcpJob, outcome_path, run_dcp_job
from ckptio.dcp_manager import ShardedCheckpointManager

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _state(step: int) -> dict[str, Any]:
    return {"model": {"w": torch.arange(48, dtype=torch.float32).reshape(6, 8) + step, "b": torch.ones(3) * step},
            "step": step}


def _load(path: Path) -> dict[str, Any]:
    state = {"model": {"w": torch.zeros(6, 8), "b": torch.zeros(3)}, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=ckptio.dcp.Reader(path), no_dist=True)
    return state


class _Gate:
    """Holds the writer before it writes its part until the test opens it: what happens meanwhile is certain."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        write = ckptio.dcp_job._write_rank

        def gated(*args: Any) -> Any:
            self.entered.set()
            assert self.open.wait(30)
            return write(*args)

        monkeypatch.setattr(ckptio.dcp_job, "_write_rank", gated)


def test_a_save_that_fails_in_the_writer_raises_on_the_next_call_and_the_manager_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = _Gate(monkeypatch)
    with ShardedCheckpointManager(tmp_path, writer="thread") as manager:
        manager.save(_state(1), name="checkpoint_epoch_1_batch_1")
        assert gate.entered.wait(30)
        (tmp_path / "checkpoint_epoch_1_batch_1").mkdir()  # taken after save() returned: the commit must refuse
        gate.open.set()
        with pytest.raises(ckptio.CheckpointWriteError, match="appeared while this checkpoint was written"):
            manager.wait()
        manager.wait()  # raised once
        manager.save(_state(2), name="checkpoint_epoch_1_batch_2")
    assert _load(tmp_path / "checkpoint_epoch_1_batch_2")["step"] == 2
    assert list((tmp_path / "checkpoint_epoch_1_batch_1").iterdir()) == []  # never replaced
    assert not list(tmp_path.glob(f".*{ckptio.dcp_job.OUTCOME_SUFFIX}*"))  # close() cleared the verdicts


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_saves_reuse_the_slot_buffers_and_load_back_bit_for_bit(tmp_path: Path, writer: str) -> None:
    with ShardedCheckpointManager(tmp_path, writer=writer, keep_count=1, compression="zstd") as manager:
        manager.save(_state(1), name="checkpoint_epoch_1_batch_1")
        buffers = [t.data_ptr() for t in manager._slot.buffers]
        segment = manager._slot.staging.segment if manager._slot.staging is not None else None
        state = _state(2)
        manager.save(state, name="checkpoint_epoch_1_batch_2")
        state["model"]["w"].zero_()  # the caller may change its tensors once save() returned
        assert [t.data_ptr() for t in manager._slot.buffers] == buffers
        assert (manager._slot.staging.segment if manager._slot.staging is not None else None) is segment
        if writer == "process":
            assert segment is not None  # one shared segment for the whole slot, not a handle per tensor
        manager.save(_state(3), name="best_model")
    loaded = _load(tmp_path / "checkpoint_epoch_1_batch_2")
    expected = _state(2)
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"]) and loaded["step"] == 2
    assert _load(tmp_path / "best_model")["step"] == 3
    assert [p.name for p in manager.checkpoints()] == ["best_model", "checkpoint_epoch_1_batch_2"]
    assert ckptio.dcp.verify_directory(tmp_path / "checkpoint_epoch_1_batch_2").status == "verified"
    for command in (["verify", str(tmp_path / "best_model")], ["info", str(tmp_path / "checkpoint_epoch_1_batch_2")],
                    ["list", str(tmp_path)]):
        assert cli_main(command) == 0, command


def test_invalid_manager_settings_say_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'thread' or 'process'"):
        ShardedCheckpointManager(tmp_path, writer="fork")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive number"):
        ShardedCheckpointManager(tmp_path, timeout=0)


def _jobs(tmp_path: Path, state: dict[str, Any], name: str, *, timeout: float = 30.0) -> list[DcpJob]:
    """Rank 0 writes every item of a plain state (replicated values are rank 0's); rank 1 has nothing of its own."""
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    plan = planner.create_local_plan()
    sources: list[str | None] = []
    blobs = {}
    for position, item in enumerate(plan.items):
        if item.index.fqn == "step":
            blobs[position] = planner.resolve_data(item).getvalue()
            sources.append(None)
        else:
            sources.append(item.index.fqn)
    common = {"directory": str(tmp_path), "name": name, "target": str(tmp_path / name), "token": f"t-{name}",
              "world_size": 2, "timeout": timeout, "sync": False}
    return [DcpJob(rank=0, items=plan.items, sources=sources, blobs=blobs, planner_data=plan.planner_data, **common),
            DcpJob(rank=1, items=[], sources=[], planner_data=plan.planner_data, **common)]


def _run_ranks(jobs: list[DcpJob], tensors: list[dict[str, torch.Tensor]]) -> list[BaseException | None]:
    outcomes: list[BaseException | None] = [None, None]

    def rank(r: int) -> None:
        try:
            run_dcp_job(jobs[r], tensors[r])
        except BaseException as exc:
            outcomes[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_ranks_agree_a_save_was_committed_and_a_failure_of_rank_0_fails_rank_1_too(tmp_path: Path) -> None:
    state = _state(5)
    flat = {"model.w": state["model"]["w"], "model.b": state["model"]["b"]}
    jobs = _jobs(tmp_path, state, "checkpoint_epoch_1_batch_1")
    assert _run_ranks(jobs, [flat, {}]) == [None, None]
    assert _load(tmp_path / "checkpoint_epoch_1_batch_1")["step"] == 5

    jobs = _jobs(tmp_path, state, "checkpoint_epoch_1_batch_2")
    (tmp_path / "checkpoint_epoch_1_batch_2").mkdir()  # rank 0's commit will refuse to replace it
    errors = _run_ranks(jobs, [flat, {}])
    assert "appeared while this checkpoint was written" in str(errors[0])
    assert isinstance(errors[1], ckptio.CheckpointWriteError)
    assert "rank 0 did not commit checkpoint_epoch_1_batch_2" in str(errors[1]) and "appeared" in str(errors[1])
    assert outcome_path(tmp_path, "t-checkpoint_epoch_1_batch_2").exists()
    assert not outcome_path(tmp_path, "t-checkpoint_epoch_1_batch_1").exists()  # rank 0 cleared the old verdict


def test_a_rank_whose_write_fails_makes_rank_0_give_up_at_once_not_at_its_timeout(tmp_path: Path) -> None:
    state = _state(5)
    flat = {"model.w": state["model"]["w"], "model.b": state["model"]["b"]}
    jobs = _jobs(tmp_path, state, "checkpoint_epoch_1_batch_1", timeout=600.0)
    jobs[1].items, jobs[1].sources = jobs[0].items[:1], ["missing"]  # rank 1 cannot find what it should write
    errors = _run_ranks(jobs, [flat, {}])  # a timeout would leave the threads running past join(60)
    assert "rank 1: KeyError" in str(errors[0]) and "not committed" in str(errors[0])
    assert isinstance(errors[1], KeyError)
    assert not (tmp_path / "checkpoint_epoch_1_batch_1").exists()


def test_a_save_refused_by_rank_0_before_its_writer_got_it_fails_rank_1_at_once(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path, _state(5), "checkpoint_epoch_1_batch_1", timeout=600.0)
    ckptio.dcp_job.refuse(jobs[0], ValueError("cannot pickle this"))
    with pytest.raises(ckptio.CheckpointWriteError, match="rank 0: ValueError: cannot pickle this"):
        run_dcp_job(jobs[1], {})  # without the verdict it would wait 1200 s


def test_a_value_that_cannot_be_saved_raises_in_save_and_the_next_save_works(tmp_path: Path) -> None:
    with ShardedCheckpointManager(tmp_path) as manager:
        with pytest.raises(ckptio.CheckpointWriteError, match="checkpoint_epoch_1_batch_1"):
            manager.save({**_state(1), "hook": lambda: 0}, name="checkpoint_epoch_1_batch_1")
        manager.save(_state(2), name="checkpoint_epoch_1_batch_2")
    assert [p.name for p in manager.checkpoints()] == ["checkpoint_epoch_1_batch_2"]


def test_a_commit_of_another_manager_on_the_same_directory_never_deletes_a_verdict_a_rank_still_waits_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state(5)
    flat = {"model.w": state["model"]["w"], "model.b": state["model"]["b"]}
    ours = _jobs(tmp_path, state, "checkpoint_epoch_1_batch_1", timeout=1.0)
    other = dataclasses.replace(_jobs(tmp_path, state, "checkpoint_epoch_9_batch_9")[0], token="otherrun-7",
                                world_size=1)
    written, resume = threading.Event(), threading.Event()
    await_outcome = ckptio.dcp_job._await_outcome

    def held(job: DcpJob) -> int:  # rank 1 has written its part; it reads the verdict only once told to
        written.set()
        assert resume.wait(30)
        return await_outcome(job)

    monkeypatch.setattr(ckptio.dcp_job, "_await_outcome", held)
    errors: list[BaseException | None] = [None]

    def rank_1() -> None:
        try:
            run_dcp_job(ours[1], {})
        except BaseException as exc:
            errors[0] = exc

    thread = threading.Thread(target=rank_1)
    thread.start()
    assert written.wait(30)
    run_dcp_job(ours[0], flat)  # committed; its verdict waits for rank 1
    run_dcp_job(other, flat)  # a second manager on the same directory commits
    resume.set()
    thread.join(60)
    assert errors == [None]  # rank 1 agrees with rank 0: committed
    assert _load(tmp_path / "checkpoint_epoch_1_batch_1")["step"] == 5


def test_a_plain_value_that_only_a_rank_other_than_0_has_fails_the_save_instead_of_being_dropped(
        tmp_path: Path) -> None:
    with ShardedCheckpointManager(tmp_path, async_save=False) as manager:
        # Two ranks' plans, made by the manager's own planning (one process: its rank is set by hand).
        rank_states = [_state(5), {**_state(5), "rng_rank_1": torch.arange(4)}]
        jobs, tensors = [], []
        for rank, state in enumerate(rank_states):
            manager._rank, manager._world = rank, 2
            flat, job = manager._plan(state, "checkpoint_epoch_1_batch_1", tmp_path / "checkpoint_epoch_1_batch_1",
                                      "t-1")
            jobs.append(dataclasses.replace(job, timeout=30.0, sync=False))
            tensors.append(flat)
        manager._rank, manager._world = 0, 1
        errors = _run_ranks(jobs, tensors)
    assert all(isinstance(error, ckptio.CheckpointWriteError) for error in errors), errors
    assert "rng_rank_1" in str(errors[0]) and "rng_rank_1" in str(errors[1])
    assert not (tmp_path / "checkpoint_epoch_1_batch_1").exists()


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_rank_that_gave_up_waiting_for_rank_0_makes_a_late_rank_0_give_the_save_up_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool) -> None:
    if not hard_links:  # some FUSE mounts: the decision is created exclusively instead
        def no_link(*args: Any) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(ckptio.dcp_job.os, "link", no_link)
    state = _state(5)
    flat = {"model.w": state["model"]["w"], "model.b": state["model"]["b"]}
    jobs = _jobs(tmp_path, state, "checkpoint_epoch_1_batch_1", timeout=0.05)
    # Rank 0 reaches the save long after rank 1 (a rank-0-only evaluation): rank 1's writer has given up by then.
    with pytest.raises(ckptio.CheckpointWriteError, match="not committed"):
        run_dcp_job(jobs[1], {})
    with pytest.raises(ckptio.CheckpointWriteError, match="rank 1 gave up"):
        run_dcp_job(jobs[0], flat)  # rank 1's part is all there, but rank 1 already reported the save failed
    assert not (tmp_path / "checkpoint_epoch_1_batch_1").exists()
    assert _run_ranks(_jobs(tmp_path, state, "checkpoint_epoch_1_batch_2"), [flat, {}]) == [None, None]


class _KilledAfterItsPart:
    """A writer process that writes this rank's part and is killed before it reads rank 0's verdict."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def submit(self, job: Any) -> None:
        self.jobs.append(job)

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _Killed(BaseException):
    pass


def test_a_rank_whose_writer_process_dies_after_its_part_agrees_with_rank_0_on_the_outcome(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state(5)
    flat = {"model.w": state["model"]["w"], "model.b": state["model"]["b"]}

    def killed(job: DcpJob) -> int:
        raise _Killed

    for batch, rank_0_first in ((1, True), (2, False)):
        name = f"checkpoint_epoch_1_batch_{batch}"
        with ShardedCheckpointManager(tmp_path, writer="thread", timeout=30) as manager:
            manager._writer.close()
            manager._writer = writer = _KilledAfterItsPart()  # type: ignore[assignment]
            manager._rank, manager._world = 1, 2  # this manager plays rank 1
            manager.save(state, name=name)
            job = writer.jobs[0]
            with monkeypatch.context() as patch, pytest.raises(_Killed):
                patch.setattr(ckptio.dcp_job, "_await_outcome", killed)
                run_dcp_job(job.dcp, {})  # rank 1's part is written, then its writer is killed
            rank_0 = dataclasses.replace(_jobs(tmp_path, state, name)[0], token=job.dcp.token)
            lost = "the checkpoint writer process 4242 was killed by signal 9"
            if rank_0_first:  # rank 0 commits before rank 1's trainer hears its writer died
                run_dcp_job(rank_0, flat)
                manager._on_lost([job.ticket], lost)
                manager.wait()  # committed, as rank 0 says
            else:  # rank 1's trainer hears it first: the save is given up on every rank
                manager._on_lost([job.ticket], lost)
                with pytest.raises(ckptio.CheckpointWriteError, match="killed by signal 9"):
                    manager.wait()
                with pytest.raises(ckptio.CheckpointWriteError, match="killed by signal 9"):
                    run_dcp_job(rank_0, flat)
            manager._rank, manager._world = 0, 1
    assert _load(tmp_path / "checkpoint_epoch_1_batch_1")["step"] == 5
    assert not (tmp_path / "checkpoint_epoch_1_batch_2").exists()


@pytest.mark.parametrize("dies_in", ["seal_and_rename", "apply_retention"])
def test_rank_0_whose_writer_process_dies_while_committing_reports_what_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_in: str) -> None:
    def killed(*args: Any, **kwargs: Any) -> None:
        raise _Killed

    with ShardedCheckpointManager(tmp_path, writer="thread") as manager:
        manager._writer.close()
        manager._writer = writer = _KilledAfterItsPart()  # type: ignore[assignment]
        manager.save(_state(5), name="checkpoint_epoch_1_batch_1")
        job = writer.jobs[0]
        module = ckptio.dcp_writer if dies_in == "seal_and_rename" else ckptio.dcp_commit
        with monkeypatch.context() as patch, pytest.raises(_Killed):
            patch.setattr(module, dies_in, killed)
            run_dcp_job(job.dcp, job.snapshot.materialize())
        manager._on_lost([job.ticket], "the checkpoint writer process 4242 was killed by signal 9")
        if dies_in == "apply_retention":  # renamed into place before it died: committed, on every rank
            manager.wait()
            assert _load(tmp_path / "checkpoint_epoch_1_batch_1")["step"] == 5
        else:
            with pytest.raises(ckptio.CheckpointWriteError, match="not committed"):
                manager.wait()
            assert not (tmp_path / "checkpoint_epoch_1_batch_1").exists()
        outcome = json.loads(outcome_path(tmp_path, job.dcp.token).read_bytes())
        assert outcome["ok"] is (dies_in == "apply_retention")  # what the other ranks read


class _CannotStart(_KilledAfterItsPart):
    """A writer that cannot take the job (no new writer process could start)."""

    def submit(self, job: Any) -> None:
        raise OSError(11, "Resource temporarily unavailable")


def test_a_save_its_writer_could_not_take_tells_the_other_ranks_at_once_and_the_next_save_works(
        tmp_path: Path) -> None:
    with ShardedCheckpointManager(tmp_path, writer="thread") as manager:
        writer = manager._writer
        manager._writer = _CannotStart()  # type: ignore[assignment]
        with pytest.raises(OSError, match="temporarily unavailable"):
            manager.save(_state(1), name="checkpoint_epoch_1_batch_1")
        # Rank 1's writer, waiting for this save's verdict, hears it now instead of at its timeout.
        verdict = json.loads(outcome_path(tmp_path, f"{manager._run_id}-0").read_bytes())
        assert verdict["ok"] is False and "temporarily unavailable" in verdict["error"]
        manager._writer = writer
        manager.save(_state(2), name="checkpoint_epoch_1_batch_2")
    assert [p.name for p in manager.checkpoints()] == ["checkpoint_epoch_1_batch_2"]


def _only(job: DcpJob, positions: set[int]) -> DcpJob:
    kept = sorted(positions)
    return dataclasses.replace(job, items=[job.items[i] for i in kept], sources=[job.sources[i] for i in kept],
                               blobs={new: job.blobs[old] for new, old in enumerate(kept) if old in job.blobs})


def test_a_rank_part_swept_from_the_staging_directory_before_rank_0_locked_it_fails_the_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state(5)
    flat = {"model.w": state["model"]["w"], "model.b": state["model"]["b"]}
    jobs = _jobs(tmp_path, state, "checkpoint_epoch_1_batch_1", timeout=30.0)
    w = {i for i, item in enumerate(jobs[0].items) if item.index.fqn == "model.w"}
    jobs = [_only(jobs[0], {i for i in range(len(jobs[0].items)) if i not in w}),
            _only(dataclasses.replace(jobs[0], rank=1), w)]  # rank 1 writes w, rank 0 the rest
    written, resume = threading.Event(), threading.Event()
    await_outcome = ckptio.dcp_job._await_outcome

    def held(job: DcpJob) -> int:
        written.set()
        assert resume.wait(30)
        return await_outcome(job)

    monkeypatch.setattr(ckptio.dcp_job, "_await_outcome", held)
    errors: list[BaseException | None] = [None]

    def rank_1() -> None:
        try:
            run_dcp_job(jobs[1], flat)
        except BaseException as exc:
            errors[0] = exc

    thread = threading.Thread(target=rank_1)
    thread.start()
    assert written.wait(30)
    # Another run's start-up sweep (or `ckptio clean`) took the staging directory while rank 0 had not yet locked
    # it; rank 1's results file then landed in the directory rank 0's writer made again.
    [staging] = [p for p in tmp_path.iterdir() if p.name.endswith(".ckptio-tmp")]
    (staging / "__1_0.distcp").unlink()
    with pytest.raises(ckptio.CheckpointWriteError, match="__1_0.distcp"):
        run_dcp_job(jobs[0], flat)
    resume.set()
    thread.join(60)
    assert isinstance(errors[0], ckptio.CheckpointWriteError)
    assert not (tmp_path / "checkpoint_epoch_1_batch_1").exists()


def test_a_retention_that_fails_after_the_commit_says_committed_on_every_rank(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state(5)
    flat = {"model.w": state["model"]["w"], "model.b": state["model"]["b"]}
    assert _run_ranks(_jobs(tmp_path, state, "checkpoint_epoch_1_batch_1"), [flat, {}]) == [None, None]

    def cannot_delete(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ckptio.dcp_commit, "delete_dcp_directory", cannot_delete)
    jobs = [dataclasses.replace(job, keep_count=1) for job in _jobs(tmp_path, state, "checkpoint_epoch_1_batch_2")]
    errors = _run_ranks(jobs, [flat, {}])
    for error in errors:  # the same on both ranks: the new checkpoint is there, the old one could not go
        assert isinstance(error, ckptio.CheckpointWriteError)
        assert "checkpoint_epoch_1_batch_2 was committed" in str(error) and "Permission denied" in str(error)
    assert _load(tmp_path / "checkpoint_epoch_1_batch_2")["step"] == 5
