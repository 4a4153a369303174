"""What a checkpoint writer does with one queued save, wherever it runs, and the interface of the backends.

:class:`JobRunner` is the one piece of code that turns a snapshot into a committed checkpoint: make room
(``min_free``), write this rank's shard and wait for the others', write and seal the file, record it in the
index, apply retention and slim older checkpoints (``keep_full``). It returns a :class:`Report` instead of
touching futures or counters, so that the same code runs in the trainer's writer thread
(:mod:`ckptio.writer_thread`) and in a writer process (:mod:`ckptio.writer_process`), whose reports travel back
through a pipe. The manager applies every report.
"""

from __future__ import annotations

import errno
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import psutil

from .config import CheckpointOptions
from .dir_index import WRITTEN_NOW, index_record, update_index
from .errors import CheckpointWriteError, InsufficientSpaceError
from .fileio import SavedCheckpoint, read_meta, write_checkpoint
from .mirror_pending import mark_pending, pending, plan_local_retention
from .naming import (
    CheckpointEntry,
    delete_checkpoint,
    file_name,
    make_shard_directory,
    prune_orphan_shards,
    scan,
    shard_file_name,
)
from .retention import newest_owned, plan_retention
from .slim import slim_older_checkpoints
from .snapshot import Snapshot

__all__ = ["JobRunner", "Report", "WriteJob", "WriterBackend"]

log = logging.getLogger("ckptio")
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# Room for the zip/safetensors framing and our trailer on top of the tensor bytes.
_FRAMING_BYTES = 2**20


@dataclass
class WriteJob:
    """One save as the writer sees it: snapshots whose copies are complete (or will be, see ``copy_done``)."""

    ticket: int
    name: str
    snapshot: Snapshot | None
    metadata: dict[str, Any] | None
    shard: Snapshot | None = None
    token: str | None = None
    dcp: Any = None
    """A :class:`ckptio.dcp_job.DcpJob`: this rank's part of a sharded DCP save, its tensors in ``snapshot``."""


@dataclass
class Report:
    """What became of one job. ``saved`` and ``error`` may both be set: committed, but housekeeping failed."""

    ticket: int
    outcome: Literal["committed", "shard_written", "skipped_no_space", "failed"]
    saved: SavedCheckpoint | None = None
    error: BaseException | None = None
    deleted: int = 0
    path: Path | None = field(default=None)


class WriterBackend(ABC):
    """Runs jobs in the background and hands each :class:`Report` to ``on_report``, in submission order.

    ``on_report`` is called from a background thread; ``on_lost(tickets, reason)`` is called once when the
    backend died with jobs that will never report.
    """

    @abstractmethod
    def submit(self, job: WriteJob) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Finish every submitted job, then stop."""

    @abstractmethod
    def alive(self) -> bool:
        """False when jobs already submitted may never be reported (the manager then stops waiting)."""


ReportSink = Callable[[Report], None]


class JobRunner:
    """Write jobs into ``directory`` under ``options``; never raises, always reports."""

    def __init__(self, directory: Path, options: CheckpointOptions) -> None:
        self.directory = directory
        self.options = options

    def path_for(self, name: str) -> Path:
        return self.directory / file_name(name, self.options.format, self.options.compression)

    def run(self, job: WriteJob) -> Report:
        if job.dcp is not None:
            return self._run_dcp(job)
        options = self.options
        path = self.path_for(job.name)
        deleted = 0
        try:
            job_bytes = sum(s.tensor_bytes for s in (job.snapshot, job.shard) if s is not None)
            if options.min_free_bytes is not None:
                deleted += self._make_room(job.name, path, job_bytes)
            shards = None
            if job.shard is not None:
                self._write(self._shard_path(job.name, options.rank), job.shard, f"{job.name} shard {options.rank}",
                            {"token": job.token, "rank": options.rank, "world_size": options.world_size})
                if options.rank != 0:
                    return Report(job.ticket, "shard_written", path=path, deleted=deleted)
                shards = self._await_shards(job.name, job.token)
            assert job.snapshot is not None
            saved = self._write(path, job.snapshot, job.name, job.metadata, shards)
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS and options.on_no_space == "skip":
                log.warning("skipped saving %s: %s; earlier checkpoints are intact, training continues",
                            path, exc.strerror or exc)
                return Report(job.ticket, "skipped_no_space", path=path, deleted=deleted)
            return Report(job.ticket, "failed", error=exc, path=path, deleted=deleted)
        except BaseException as exc:  # the caller must hear of every failure; the writer itself goes on
            return Report(job.ticket, "failed", error=exc, path=path, deleted=deleted)
        try:
            if options.mirror is not None:  # before retention: a checkpoint not yet mirrored is kept
                mark_pending(self.directory, saved.path.name)
            self._record(saved)
            deleted += self._apply_retention(saved)
        except Exception as exc:  # the checkpoint is safe on disk; housekeeping failed, so say so
            return Report(job.ticket, "committed", saved=saved, error=exc, path=path, deleted=deleted)
        return Report(job.ticket, "committed", saved=self._slim_older(saved), path=path, deleted=deleted)

    def _run_dcp(self, job: WriteJob) -> Report:
        """A sharded DCP save (:mod:`ckptio.dcp_job`); its retention is the DCP directories', not ours."""
        path = Path(job.dcp.target)
        try:
            from .dcp_job import run_dcp_job

            assert job.snapshot is not None
            deleted = run_dcp_job(job.dcp, job.snapshot.materialize())
        except BaseException as exc:  # the caller must hear of every failure; the writer itself goes on
            return Report(job.ticket, "failed", error=exc, path=path)
        return Report(job.ticket, "committed", path=path, deleted=deleted)

    def _write(self, path: Path, snapshot: Snapshot, name: str, metadata: dict[str, Any] | None,
               shards: list[dict[str, Any]] | None = None) -> SavedCheckpoint:
        options = self.options
        return write_checkpoint(
            path, snapshot, name=name, fmt=options.format, compression=options.compression,
            level=options.compression_level, threads=options.compression_threads, fsync=options.fsync,
            drop_page_cache=options.drop_page_cache, user_meta=metadata, shards=shards,
        )

    def _shard_path(self, name: str, rank: int) -> Path:
        options = self.options
        directory = make_shard_directory(self.path_for(name))
        return directory / shard_file_name(rank, options.world_size, options.format, options.compression)

    def _await_shards(self, name: str, token: str | None) -> list[dict[str, Any]]:
        """Rank 0: wait (polling the filesystem, never a collective) until every rank's shard of this save is
        durable, and return their digests for the manifest."""
        options = self.options
        deadline = time.monotonic() + options.shard_timeout
        table: dict[int, dict[str, Any]] = {}
        while True:
            for rank in range(options.world_size):
                if rank in table:
                    continue
                path = self._shard_path(name, rank)
                try:
                    seal, size = read_meta(path)
                except (FileNotFoundError, ValueError):
                    continue
                if seal is not None and seal.meta.get("user", {}).get("token") == token:
                    table[rank] = {"rank": rank, "file": f"{path.parent.name}/{path.name}", "digest": seal.digest,
                                   "size": size}
            if len(table) == options.world_size:
                return [table[rank] for rank in range(options.world_size)]
            if time.monotonic() > deadline:
                missing = sorted(set(range(options.world_size)) - set(table))
                raise CheckpointWriteError(
                    f"ranks {missing} did not write their shards of {name} within {options.shard_timeout}s;"
                    " the checkpoint was not committed (the previous one stays valid)")
            time.sleep(0.02)

    def _record(self, saved: SavedCheckpoint) -> None:
        try:
            info = saved.path.stat()
            record = index_record(info.st_size, info.st_mtime_ns, "verified", saved.digest, saved.meta,
                                  written=WRITTEN_NOW)
            update_index(self.directory, {saved.path.name: record})
        except OSError as exc:  # the index is a cache; the file itself carries its digest
            log.warning("could not update the index of %s: %s", self.directory, exc)

    def checkpoints(self) -> list[CheckpointEntry]:
        return scan(self.directory, self.options.protected_names)

    def _apply_retention(self, saved: SavedCheckpoint) -> int:
        """Delete what the retention plan drops after ``saved`` was committed; return how many were deleted."""
        options = self.options
        if options.keep_count is None and options.budget_bytes is None:
            return 0
        entries = self.checkpoints()
        # The newest periodic checkpoint is what a resume needs; saving best_model must not cost it.
        newest = saved.path if saved.name not in options.protected_names else newest_owned(entries)
        in_progress = prune_orphan_shards(self.directory, saved.name)  # shards of uncommitted saves count too
        if options.mirror is not None:
            plan, forced = plan_local_retention(entries, pending(self.directory), keep_count=options.keep_count,
                                                budget=options.budget_bytes, must_keep=newest, reserve=in_progress)
            if forced:
                log.warning("disk_budget forces deleting %s before it was mirrored to %s",
                            ", ".join(e.path.name for e in forced), options.mirror)
        else:
            plan = plan_retention(entries, keep_count=options.keep_count, budget=options.budget_bytes,
                                  must_keep=newest, reserve=in_progress)
        deleted = self._delete(plan.delete, "retention")
        if plan.bytes_over_budget:
            log.warning("%s holds %d bytes more than disk_budget=%d even after deleting every periodic checkpoint "
                        "but the newest; raise disk_budget", self.directory, plan.bytes_over_budget,
                        options.budget_bytes)
        return deleted

    def _slim_older(self, saved: SavedCheckpoint) -> SavedCheckpoint:
        """``keep_full``: slim the periodic checkpoints older than the newest ``keep_full`` (after retention, so
        that nothing about to be deleted is rewritten). A checkpoint that cannot be slimmed stays complete and the
        others are still slimmed: the save itself stands, and the failures are told with it rather than raised."""
        options = self.options
        if options.keep_full is None:
            return saved
        failures: list[str] = []

        def failed(path: Path, exc: Exception) -> None:
            log.warning("could not slim %s: %s; it stays complete", path, exc)
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}")

        try:
            slimmed = slim_older_checkpoints(self.directory, options.keep_full, keep_count=options.keep_count,
                                             fsync=options.fsync, protected_names=options.protected_names,
                                             on_error=failed)
        except Exception as exc:  # the directory could not be listed: nothing was slimmed
            slimmed = []
            failed(self.directory, exc)
        for done in slimmed:
            log.info("slimmed %s to its model weights: %d -> %d bytes", done.path.name, done.bytes_before,
                     done.bytes_after)
        return replace(saved, slimmed=tuple(slimmed), slim_error="; ".join(failures) or None)

    def _delete(self, entries: list[CheckpointEntry], why: str) -> int:
        """Delete ``entries``; return how many went (a failed delete is logged and retried by the next pass)."""
        forgotten: dict[str, dict[str, Any] | None] = {}
        for entry in entries:
            try:
                delete_checkpoint(entry.path)
            except OSError as exc:  # a failed delete must not stop training; the next pass retries
                log.warning("could not delete %s (%s): %s", entry.path, why, exc)
                continue
            forgotten[entry.path.name] = None
            log.info("deleted %s (%s)", entry.path.name, why)
        try:
            update_index(self.directory, forgotten)
        except OSError as exc:
            log.warning("could not update the index of %s: %s", self.directory, exc)
        return len(forgotten)

    def _make_room(self, name: str, path: Path, job_bytes: int) -> int:
        """Delete the oldest periodic checkpoints until ``min_free`` holds after this save; return how many."""
        needed = job_bytes + _FRAMING_BYTES + (self.options.min_free_bytes or 0)
        free = psutil.disk_usage(str(self.directory)).free
        if free >= needed:
            return 0
        entries = [e for e in self.checkpoints() if e.path != path]
        # The retention planner with a byte budget that frees the shortfall: oldest periodic checkpoints first, never
        # the newest one (what a resume needs).
        budget = sum(e.total_size for e in entries) - (needed - free)
        victims = plan_retention(entries, budget=budget, must_keep=newest_owned(entries)).delete
        free += sum(e.total_size for e in victims)
        if free < needed:
            raise InsufficientSpaceError(
                errno.ENOSPC,
                f"{self.directory} has {psutil.disk_usage(str(self.directory)).free} bytes free; saving {name} "
                f"needs about {job_bytes + _FRAMING_BYTES} and min_free keeps "
                f"{self.options.min_free_bytes} (free space, or lower min_free)",
            )
        return self._delete(victims, "min_free")
