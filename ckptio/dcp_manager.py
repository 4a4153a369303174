"""``ShardedCheckpointManager``: periodic sharded (DCP) checkpoints with ckptio's retention rules.

Each save is one ``ckptio.dcp`` checkpoint directory ``DIRECTORY/NAME`` (the format of :class:`ckptio.dcp.Writer`,
loadable with :class:`ckptio.dcp.Reader` at any process count), written through ckptio's own staging slot and
writer, with no collective once the manager exists:

* ``save()`` plans locally with DCP's ``DefaultSavePlanner`` and copies the tensors this rank writes into one
  reusable staging slot (with ``writer="process"``: one shared-memory segment, handed to the writer process
  once). That copy, and pickling the few non-tensor values, is all the training thread pays.
* The writer (a thread, or a helper process) writes this rank's data file into the save's hidden staging
  directory; rank 0's writer waits for every rank's part, writes the metadata and the seal last, renames the
  directory into place and applies retention (:mod:`ckptio.dcp_job`).

Each rank writes the shards of its DTensors (a replicated DTensor's chunk: the ranks at coordinate 0 of its
replicated mesh dimensions). Plain tensors and other values are written by rank 0 only: like DCP, the manager
takes them to be equal on every rank; a key that another rank has and rank 0 has not fails the save (it would
be missing from the checkpoint).

After a save is committed, rank 0 applies ``keep_count`` and ``disk_budget`` over the DCP directories, with the
rules of :mod:`ckptio.retention`: only periodic checkpoints (``checkpoint_epoch_E_batch_B``) are deleted, never the
newest committed one, and never a save in flight (it is a hidden staging directory until its commit, not a
checkpoint). With ``min_free`` it makes room before each save the same way. A name that is not periodic
(``best_model``) is saved again by committing the new directory under a hidden name and swapping the two in one
rename.

A failed save raises :class:`~ckptio.CheckpointWriteError` on the next ``save()``, ``wait()`` or ``close()`` on
every rank alike: the other ranks' writers wait for rank 0's verdict on the save (committed, or failed and
why) and report it, so ranks never disagree on whether a checkpoint was committed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from .atomic import TEMP_SUFFIX
from .config import CheckpointOptions, parse_size
from .dcp import Reader, checkpoint_entries, delete_dcp_directory, remove_dcp_leftovers, verify_directory
from .dcp_commit import NEXT_SUFFIX, restore_set_aside
from .dcp_job import DECISION_SUFFIX, OUTCOME_SUFFIX, DcpJob, refuse, settle_lost
from .errors import CheckpointWriteError, InsufficientSpaceError
from .naming import parse_checkpoint_name, validate_name
from .snapshot import BufferSlot
from .writer import JobRunner, Report, WriteJob, WriterBackend
from .zstd_body import zstandard_module

__all__ = ["ShardedCheckpointManager", "latest"]


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """The newest committed checkpoint directory in ``directory`` whose every item verifies, or ``None``.

    The one answer to "what does ``--resume auto`` resume": a newer directory that is damaged is passed over
    for the previous one.
    """
    if not Path(directory).is_dir():
        return None
    for entry in checkpoint_entries(directory):
        if verify_directory(entry.path).ok:
            return entry.path
    return None


class ShardedCheckpointManager:
    """Sharded checkpoints in ``directory``, one DCP directory per save.

    Created on every rank (it is a collective: the ranks agree on a run id); ``save()``, ``wait()`` and
    ``close()`` are called by every rank in the same order.

    Args:
        directory: where the checkpoint directories live (created if needed).
        keep_count: periodic checkpoints to keep (``None``: all). Must be at least 1.
        disk_budget: bytes (or ``"2GB"``) the checkpoint directories may take; the oldest periodic ones go first.
        min_free: bytes (or ``"5GB"``) the volume must keep free after a save: before each save, the oldest
            periodic checkpoints (never the newest) are deleted until the save fits; if it cannot, the save
            raises :class:`~ckptio.InsufficientSpaceError` on every rank and nothing is written.
        async_save: ``save()`` returns after the copy into the staging slot and the writer commits in the
            background; ``False``: ``save()`` returns when the checkpoint is committed.
        compression: ``None`` or ``"zstd"``.
        writer: where background writes run, as :attr:`ckptio.CheckpointOptions.writer`: ``"thread"`` (in this
            process) or ``"process"`` (a helper process fed through one shared-memory segment).
        timeout: seconds rank 0's writer waits for the other ranks' parts before the save fails (the other
            ranks wait twice as long for rank 0's verdict).
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_count: int | None = None,
                 disk_budget: int | str | None = None, min_free: int | str | None = None, async_save: bool = True,
                 compression: str | None = None, writer: Literal["thread", "process"] = "thread",
                 timeout: float = 600.0) -> None:
        if keep_count is not None and (type(keep_count) is not int or keep_count < 1):
            raise ValueError(f"keep_count={keep_count!r}: keep at least 1 checkpoint (the newest is what a resume "
                             "needs), or None to keep all")
        if compression not in (None, "zstd"):
            raise ValueError(f"compression={compression!r}: use None or 'zstd'")
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise ValueError(f"timeout={timeout!r}: give the seconds rank 0 may wait for the other ranks' parts "
                             "(a positive number, e.g. 600)")
        if compression == "zstd":
            zstandard_module()  # raises with the install hint if zstandard is missing
        self.directory = Path(directory).absolute()
        self.keep_count = keep_count
        self.disk_budget = parse_size(disk_budget, what="disk_budget")
        self.min_free = parse_size(min_free, what="min_free")
        self.async_save = async_save
        self.compression = compression
        self._rank = _rank()
        self._world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        # Validates writer and timeout, and is what the writer (thread or process) runs its jobs with.
        self._options = CheckpointOptions(writer=writer, async_save=async_save, rank=self._rank,
                                          world_size=self._world, shard_timeout=timeout)
        self.timeout = timeout
        self._error: BaseException | None = None
        self._closed = False
        self._pending: tuple[int, str] | None = None
        self._reports: dict[int, Report] = {}
        self._in_flight: dict[int, DcpJob] = {}  # what a writer process that dies leaves to settle
        self._reported = threading.Condition()
        self._tickets = itertools.count()
        # The collectives left (min_free's agreement, load, the barriers here) run on a group of their own, so
        # that they never interleave with the training's own collectives.
        self._group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
        run_id = [uuid.uuid4().hex[:16]]
        if self._group is not None:
            dist.broadcast_object_list(run_id, src=0, group=self._group)  # names every save's staging directory
        self._run_id = run_id[0]
        if self._rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_dcp_leftovers(self.directory)  # saves that crashed before this run: their locks are gone
            restore_set_aside(self.directory)
            for stale in self.directory.glob(".*" + NEXT_SUFFIX):  # a replacement that crashed before its swap
                delete_dcp_directory(stale)
        _barrier(self._group)
        in_process = async_save and writer == "process"
        if in_process:
            from .shm import shared_staging

            self._slot = BufferSlot(allocator=functools.partial(shared_staging, key="dcp"))
        else:
            self._slot = BufferSlot()
        self._runner = JobRunner(self.directory, self._options)
        self._writer: WriterBackend | None = None
        if in_process:
            from .writer_process import ProcessWriter

            self._writer = ProcessWriter(self.directory, self._options, self._on_report, self._on_lost)
        elif async_save:
            from .writer_thread import ThreadWriter

            self._writer = ThreadWriter(self._runner, self._on_report, name=f"ckptio-dcp-writer:{self.directory}")

    def save(self, state: dict[str, Any], *, name: str) -> None:
        """Start saving ``state`` (a DCP state dict: DTensors, tensors, plain values) as ``directory/name``.

        Returns once this rank's tensors are copied into the staging slot (``async_save``), or once the
        checkpoint is committed. A periodic name (``checkpoint_epoch_E_batch_B``) must be new. Any other name
        (``best_model``) may exist: the new directory is committed beside it and the two are swapped in one atomic
        rename, so that a crash leaves either the old one or the new one under the name, never neither.
        """
        self._check_open()
        validate_name(name)
        self.wait()  # one save in flight: the next copy would overwrite the slot it is written from
        # Once, before min_free counts the bytes: a Stateful's tensors are what is written.
        state = {key: value.state_dict() if isinstance(value, Stateful) else value for key, value in state.items()}
        if self.min_free is not None:
            self._make_room(state)
        target = self.directory / name
        if not parse_checkpoint_name(name):
            target = self.directory / f".{name}{NEXT_SUFFIX}"
        elif os.path.lexists(target):  # refused before any copy, as DCP's planning refuses it on every rank
            raise CheckpointWriteError(f"{target} already exists; a periodic checkpoint is never replaced: save "
                                       "under a new name, or delete the old one")
        ticket = next(self._tickets)
        token = f"{self._run_id}-{ticket}"
        try:
            flat, job = self._plan(state, name, target, token)
            snapshot = self._slot.take(flat)
        except Exception as exc:
            refuse(self._job(name, target, token, [], [], {}, None), exc)  # the other ranks' writers wait for it
            raise CheckpointWriteError(f"saving {self.directory / name} failed: {exc}") from exc
        write_job = WriteJob(ticket, name, snapshot, None, dcp=job)
        if self._writer is None:
            report = self._runner.run(write_job)
            if report.outcome == "failed":
                raise CheckpointWriteError(f"saving {self.directory / name} failed: {report.error}") from report.error
            return
        self._pending = (ticket, name)
        self._in_flight[ticket] = job
        try:
            self._writer.submit(write_job)
        except BaseException as exc:
            self._pending = None
            self._in_flight.pop(ticket, None)
            refuse(job, exc)  # never taken: the other ranks' writers must not wait for it until their timeout
            raise

    def wait(self) -> None:
        """Wait for the save in flight; raise its error (once) if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            ticket, name = pending
            with self._reported:
                while ticket not in self._reports:
                    if self._writer is not None and not self._writer.alive():
                        self._reports[ticket] = Report(ticket, "failed", error=CheckpointWriteError(
                            "the checkpoint writer thread died; see the log"))
                        break
                    self._reported.wait(timeout=1.0)
                report = self._reports.pop(ticket)
            if report.outcome == "failed" and self._error is None:
                self._error = report.error or CheckpointWriteError(f"{name}: failed")
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointWriteError(f"a background save into {self.directory} failed: {error}") from error

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
            self._slot.release()
            if self._group is not None:
                _barrier(self._group)  # every rank has read the outcome of the last save
                dist.destroy_process_group(self._group)
                self._group = None
            if self._rank == 0:
                with contextlib.suppress(OSError):
                    _remove_outcomes(self.directory, self._run_id)

    def __enter__(self) -> ShardedCheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checkpoints(self) -> list[Path]:
        """Committed checkpoint directories, newest first."""
        return [entry.path for entry in checkpoint_entries(self.directory)]

    def latest(self) -> Path | None:
        """The newest checkpoint whose every item verifies (what ``--resume auto`` resumes from), or ``None``."""
        return latest(self.directory)

    def load(self, state: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Path:
        """Load ``path`` (default: :meth:`latest`) into ``state`` in place, at this run's process count."""
        target = Path(path) if path is not None else self.latest()
        if target is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint that verifies")
        dcp.load(state, storage_reader=Reader(target), process_group=self._group)
        return target

    def _plan(self, state: dict[str, Any], name: str, target: Path, token: str
              ) -> tuple[dict[str, torch.Tensor], DcpJob]:
        """DCP's local plan, cut to the items this rank writes; the tensors to stage and what the writer needs."""
        planner = DefaultSavePlanner()
        planner.set_up_planner(state, is_coordinator=self._rank == 0)
        plan = planner.create_local_plan()
        items, sources, blobs, flat, left = [], [], {}, {}, []
        for item in plan.items:
            value = planner.state_dict[item.index.fqn]
            if not _writes_here(value, self._rank):
                if not isinstance(value, DTensor):
                    left.append(item.index.fqn)  # rank 0's commit checks that it has this value itself
                continue
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                blobs[len(items)] = data.getvalue()  # small values, pickled now: the caller may change them
                sources.append(None)
            else:
                key = str(len(flat))
                flat[key] = data
                sources.append(key)
            items.append(item)
        return flat, self._job(name, target, token, items, sources, blobs, plan.planner_data, left)

    def _job(self, name: str, target: Path, token: str, items: list[Any], sources: list[str | None],
             blobs: dict[int, bytes], planner_data: Any, left_to_rank_0: list[str] | None = None) -> DcpJob:
        return DcpJob(directory=str(self.directory), name=name, target=str(target), token=token, rank=self._rank,
                      world_size=self._world, items=items, sources=sources, blobs=blobs, planner_data=planner_data,
                      left_to_rank_0=left_to_rank_0 or [], compression=self.compression, timeout=self.timeout,
                      keep_count=self.keep_count, disk_budget=self.disk_budget)

    def _on_report(self, report: Report) -> None:
        self._in_flight.pop(report.ticket, None)
        with self._reported:
            self._reports[report.ticket] = report
            self._reported.notify_all()

    def _on_lost(self, tickets: list[int], reason: str) -> None:
        for ticket in tickets:
            job = self._in_flight.get(ticket)
            try:
                if job is None:
                    raise CheckpointWriteError(f"{reason}; the save was lost (the previous checkpoint is intact)")
                # Its part may be written and rank 0 committing: report what every other rank reports.
                settle_lost(job, reason)
            except BaseException as exc:
                self._on_report(Report(ticket, "failed", error=exc))
            else:
                self._on_report(Report(ticket, "committed", path=self.directory / job.name))

    def _make_room(self, state: dict[str, Any]) -> None:
        """Rank 0 deletes the oldest periodic checkpoints until this save and ``min_free`` fit; all ranks agree."""
        need = torch.tensor([_tensor_bytes(state)], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(need, group=self._group)  # every rank writes its own part
        verdict = [None]
        if _rank() == 0:
            verdict = [self._free_up(int(need.item()))]
        if self._group is not None:
            dist.broadcast_object_list(verdict, src=0, group=self._group)
        if verdict[0] is not None:
            raise InsufficientSpaceError(errno.ENOSPC, verdict[0])

    def _free_up(self, save_bytes: int) -> str | None:
        assert self.min_free is not None
        needed = save_bytes + self.min_free
        free = _free_bytes(self.directory)
        entries = checkpoint_entries(self.directory)
        periodic = [e for e in entries if parse_checkpoint_name(e.name)]
        victims = []
        for entry in reversed(periodic[1:]):  # oldest first; the newest periodic one is what a resume needs
            if free >= needed:
                break
            victims.append(entry)
            free += entry.size
        if free < needed:
            return (f"{self.directory}: a save needs about {save_bytes} bytes and min_free keeps {self.min_free}, "
                    f"but only {_free_bytes(self.directory)} bytes are free even after deleting every "
                    "periodic checkpoint but the newest; free space or lower min_free")
        for entry in victims:
            delete_dcp_directory(entry.path)
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ShardedCheckpointManager is closed; create a new one")


def _writes_here(value: Any, rank: int) -> bool:
    """Whether this rank writes the item planned for ``value``: its own shard of a DTensor (of a replicated
    mesh dimension, the rank at coordinate 0), anything else on rank 0 only."""
    if isinstance(value, DTensor):
        coordinate = value.device_mesh.get_coordinate()
        if coordinate is None:
            return False
        return all(c == 0 for c, placement in zip(coordinate, value.placements, strict=True)
                   if not placement.is_shard())
    return rank == 0


def _remove_outcomes(directory: Path, run_id: str) -> None:
    """This run's verdict files: another manager on the same directory may have ranks waiting for its own (a run
    that crashed leaves at most one, a few bytes)."""
    for path in directory.glob(f".{run_id}-*.ckptio-*"):
        if path.name.endswith((OUTCOME_SUFFIX, DECISION_SUFFIX, TEMP_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _tensor_bytes(state: Any) -> int:
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, list | tuple):
        return sum(_tensor_bytes(value) for value in state)
    if isinstance(state, torch.Tensor):
        local = getattr(state, "_local_tensor", state)  # a DTensor: this rank's shard
        return local.numel() * local.element_size()
    return 0


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
