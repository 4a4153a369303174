"""``CheckpointManager``: the one class a trainer needs.

``save()`` copies the state into reusable host buffers and returns; a background thread serializes, writes
atomically, seals with a digest, records it in the directory's index and applies retention. Errors from the
background never vanish: they are logged and raised by the next ``save()``, ``wait()`` or ``close()``.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .atomic import open_lock
from .config import CheckpointOptions
from .errors import CheckpointDirectoryLockedError, CheckpointWriteError, InsufficientSpaceError
from .fileio import SavedCheckpoint, read_meta, write_checkpoint
from .formats import check_supported
from .layout import (
    LOCK_NAME,
    CheckpointEntry,
    delete_checkpoint,
    file_name,
    index_record,
    make_shard_directory,
    prune_orphan_shards,
    scan,
    shard_file_name,
    sweep_leftovers,
    update_index,
    validate_name,
)
from .retention import newest_owned, owned_by_retention, plan_retention
from .snapshot import BufferSlot, Snapshot

__all__ = ["CheckpointManager", "SaveStats"]

log = logging.getLogger("ckptio")
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# Room for the zip/safetensors framing and our trailer on top of the tensor bytes.
_FRAMING_BYTES = 2**20


@dataclass
class SaveStats:
    """Counters a trainer can print; updated by the writer thread."""

    requested: int = 0
    committed: int = 0
    skipped_busy: int = 0
    skipped_no_space: int = 0
    failed: int = 0
    deleted: int = 0
    blocked_seconds: float = 0.0
    """Time the caller spent inside ``save()`` (snapshot copy, waiting for a free buffer, sync writes)."""
    write_seconds: float = 0.0
    bytes_written: int = 0
    last: SavedCheckpoint | None = field(default=None, repr=False)


@dataclass
class _Slot:
    """Reusable buffers for one queued save: the state, and this process's shard of a sharded checkpoint."""

    main: BufferSlot = field(default_factory=BufferSlot)
    shard: BufferSlot = field(default_factory=BufferSlot)


@dataclass
class _Job:
    name: str
    snapshot: Snapshot | None
    slot: _Slot
    future: Future[SavedCheckpoint | None]
    metadata: dict[str, Any] | None
    shard: Snapshot | None = None
    token: str | None = None


class CheckpointManager:
    """Write checkpoints of a training run into one directory, asynchronously and safely.

    >>> with CheckpointManager("checkpoints", format="torch", async_save=True) as mgr:  # doctest: +SKIP
    ...     mgr.save(state, name="checkpoint_epoch_1_batch_100")

    Keyword arguments are the fields of :class:`~ckptio.CheckpointOptions` (or pass ``options=``).
    """

    def __init__(self, directory: str | os.PathLike[str] = "checkpoints", *,
                 options: CheckpointOptions | None = None, **option_fields: Any) -> None:
        if options is not None and option_fields:
            raise ValueError("pass either options=CheckpointOptions(...) or keyword options, not both")
        self.options = options if options is not None else CheckpointOptions(**option_fields)
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(f"{self.directory} exists and is not a directory; choose another path") from None
        self._lock_fd = _lock_directory(self.directory, self.options.rank)
        try:
            self._start()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _start(self) -> None:
        if self.options.rank == 0:
            leftovers = sweep_leftovers(self.directory, orphans=True)
            for leftover in leftovers:
                log.warning("removed %s, left behind by an interrupted save", leftover)
        self.stats = SaveStats()
        self._errors: list[BaseException] = []
        self._errors_lock = threading.Lock()
        slot_count = self.options.max_pending + 1 if self.options.async_save else 1
        self._free_slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(slot_count):
            self._free_slots.put(_Slot())
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.options.async_save:
            self._thread = threading.Thread(target=self._run, name=f"ckptio-writer:{self.directory}", daemon=True)
            self._thread.start()
        _open_managers.add(self)

    # -- public API -----------------------------------------------------------------------------------------

    def save(self, state: Any, *, name: str, metadata: dict[str, Any] | None = None, shard: Any = None,
             token: str | None = None) -> Future[SavedCheckpoint | None] | None:
        """Snapshot ``state`` and queue it to be written as ``name`` (plus the format's suffix).

        Returns once the snapshot is taken; the caller may then change its tensors. Returns ``None`` when the
        save was dropped because the queue was full and ``on_full="skip"``; otherwise a future that resolves
        to the :class:`~ckptio.SavedCheckpoint` (or ``None`` if it was skipped for lack of space).

        Sharded checkpoints (``world_size > 1``): every rank passes its own part as ``shard`` and the same
        ``token`` (unique per save, e.g. run id and step); rank 0 also passes the replicated ``state`` (other
        ranks pass ``None``). Each shard goes to ``NAME.shards/``; rank 0 commits ``NAME`` last, once every
        shard is durable, so the checkpoint is valid only when complete. No collective is issued.
        """
        self._check_open()
        self._raise_background_error()
        validate_name(name, self.options.format, self.options.compression)
        check_supported(self.options.format, state, shard)
        options = self.options
        if options.world_size > 1:
            if shard is None or token is None:
                raise ValueError("with world_size > 1 every rank passes shard=<its part> and the same token=...")
            if (state is None) != (options.rank != 0):
                raise ValueError("rank 0 passes the replicated state; the other ranks pass state=None")
        elif shard is not None:
            raise ValueError("shard= needs world_size > 1 (and rank=) in the manager's options")
        started = time.perf_counter()
        self.stats.requested += 1
        slot = self._acquire_slot()
        if slot is None:
            self.stats.skipped_busy += 1
            self.stats.blocked_seconds += time.perf_counter() - started
            log.warning("skipped saving %s: %d earlier saves are still being written (on_full='skip')",
                        name, self.options.max_pending + 1)
            return None
        try:
            snapshot = slot.main.take(state) if state is not None else None
            shard_snapshot = slot.shard.take(shard) if shard is not None else None
        except BaseException:
            self._free_slots.put(slot)
            raise
        job = _Job(name, snapshot, slot, Future(), dict(metadata) if metadata else None, shard_snapshot, token)
        if self._thread is not None:
            self._jobs.put(job)
        else:
            self._process(job)
        self.stats.blocked_seconds += time.perf_counter() - started
        if self._thread is None:
            self._raise_background_error()
        return job.future

    def wait(self) -> None:
        """Block until every queued save is durable; raise the first background error, if any."""
        if self._thread is not None and not self._closed:
            while self._jobs.unfinished_tasks and self._thread.is_alive():
                with self._jobs.all_tasks_done:
                    self._jobs.all_tasks_done.wait(timeout=1.0)
            if self._jobs.unfinished_tasks:
                raise CheckpointWriteError("the checkpoint writer thread died; see the log")
        self._raise_background_error()

    def close(self) -> None:
        """Finish pending saves, stop the writer and release the directory; raises background errors."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
        finally:
            _open_managers.discard(self)
            os.close(self._lock_fd)
        self._raise_background_error()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:  # drain, but never hide the exception that ended the block
            self.close()
        except Exception as background:
            log.error("a background save also failed: %s", background)

    @property
    def pending(self) -> int:
        """Saves queued or being written."""
        return self._jobs.unfinished_tasks if self._thread is not None else 0

    def checkpoints(self) -> list[CheckpointEntry]:
        """The directory's checkpoint files, newest first."""
        return scan(self.directory, self.options.protected_names)

    def path_for(self, name: str) -> Path:
        return self.directory / file_name(name, self.options.format, self.options.compression)

    # -- internals ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the checkpoint manager for {self.directory} is closed; create a new one")

    def _acquire_slot(self) -> _Slot | None:
        if self.options.on_full == "skip":
            try:
                return self._free_slots.get_nowait()
            except queue.Empty:
                return None
        while True:
            try:
                return self._free_slots.get(timeout=1.0)
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive():
                    raise CheckpointWriteError("the checkpoint writer thread died; see the log") from None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._process(job)
            except BaseException as exc:  # never let the writer die silently: the caller must hear of it
                self._fail(job, self.path_for(job.name), exc) if job is not None else None
            finally:
                self._jobs.task_done()

    def _process(self, job: _Job) -> None:
        options = self.options
        path = self.path_for(job.name)
        try:
            if options.min_free_bytes is not None:
                self._make_room(job, path)
            shards = None
            if job.shard is not None:
                self._write(self._shard_path(job.name, options.rank), job.shard, f"{job.name} shard {options.rank}",
                            {"token": job.token, "rank": options.rank, "world_size": options.world_size})
                if options.rank != 0:
                    job.future.set_result(None)
                    return
                shards = self._await_shards(job.name, job.token)
            assert job.snapshot is not None
            saved = self._write(path, job.snapshot, job.name, job.metadata, shards)
        except OSError as exc:
            if exc.errno in _NO_SPACE_ERRNOS and options.on_no_space == "skip":
                self.stats.skipped_no_space += 1
                log.warning("skipped saving %s: %s; earlier checkpoints are intact, training continues",
                            path, exc.strerror or exc)
                job.future.set_result(None)
            else:
                self._fail(job, path, exc)
        except BaseException as exc:
            self._fail(job, path, exc)
        else:
            self.stats.committed += 1
            self.stats.write_seconds += saved.seconds
            self.stats.bytes_written += saved.size
            self.stats.last = saved
            try:
                self._record(saved)
                self._apply_retention(saved)
            except Exception as exc:  # the checkpoint is safe on disk; housekeeping failed, so say so
                self._fail(job, path, exc)
            else:
                job.future.set_result(saved)
        finally:
            self._free_slots.put(job.slot)

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

    def _fail(self, job: _Job, path: Path, exc: BaseException) -> None:
        if job.future.done():
            return
        self.stats.failed += 1
        log.error("saving %s failed: %s", path, exc)
        wrapped = CheckpointWriteError(f"saving {path} failed: {exc}")
        wrapped.__cause__ = exc
        with self._errors_lock:
            self._errors.append(wrapped)
        job.future.set_exception(wrapped)

    def _raise_background_error(self) -> None:
        with self._errors_lock:
            if not self._errors:
                return
            first, self._errors = self._errors[0], []
        raise first

    def _record(self, saved: SavedCheckpoint) -> None:
        try:
            info = saved.path.stat()
            record = index_record(info.st_size, info.st_mtime_ns, "verified", saved.digest, saved.meta)
            update_index(self.directory, {saved.path.name: record})
        except OSError as exc:  # the index is a cache; the file itself carries its digest
            log.warning("could not update the index of %s: %s", self.directory, exc)

    def _apply_retention(self, saved: SavedCheckpoint) -> None:
        options = self.options
        if options.keep_count is None and options.budget_bytes is None:
            return
        entries = self.checkpoints()
        # The newest periodic checkpoint is what a resume needs; saving best_model must not cost it.
        newest = saved.path if saved.name not in options.protected_names else newest_owned(entries)
        in_progress = prune_orphan_shards(self.directory, saved.name)  # shards of uncommitted saves count too
        plan = plan_retention(entries, keep_count=options.keep_count, budget=options.budget_bytes, must_keep=newest,
                              reserve=in_progress)
        self._delete(plan.delete, "retention")
        if plan.bytes_over_budget:
            log.warning("%s holds %d bytes more than disk_budget=%d even after deleting every periodic checkpoint "
                        "but the newest; raise disk_budget", self.directory, plan.bytes_over_budget,
                        options.budget_bytes)

    def _delete(self, entries: list[CheckpointEntry], why: str) -> None:
        forgotten: dict[str, dict[str, Any] | None] = {}
        for entry in entries:
            try:
                delete_checkpoint(entry.path)
            except OSError as exc:  # a failed delete must not stop training; the next pass retries
                log.warning("could not delete %s (%s): %s", entry.path, why, exc)
                continue
            self.stats.deleted += 1
            forgotten[entry.path.name] = None
            log.info("deleted %s (%s)", entry.path.name, why)
        try:
            update_index(self.directory, forgotten)
        except OSError as exc:
            log.warning("could not update the index of %s: %s", self.directory, exc)

    def _make_room(self, job: _Job, path: Path) -> None:
        pending_bytes = sum(s.tensor_bytes for s in (job.snapshot, job.shard) if s is not None)
        needed = pending_bytes + _FRAMING_BYTES + (self.options.min_free_bytes or 0)
        free = psutil.disk_usage(str(self.directory)).free
        if free >= needed:
            return
        entries = [e for e in self.checkpoints() if e.path != path]
        newest_periodic = newest_owned(entries)
        victims = []
        for entry in reversed(entries):
            if free >= needed:
                break
            if owned_by_retention(entry) and entry.path != newest_periodic:
                victims.append(entry)
                free += entry.total_size
        if free < needed:
            raise InsufficientSpaceError(
                errno.ENOSPC,
                f"{self.directory} has {psutil.disk_usage(str(self.directory)).free} bytes free; saving {job.name} "
                f"needs about {pending_bytes + _FRAMING_BYTES} and min_free keeps "
                f"{self.options.min_free_bytes} (free space, or lower min_free)",
            )
        self._delete(victims, "min_free")


def _lock_directory(directory: Path, rank: int) -> int:
    # Ranks of a sharded checkpoint share the directory, each with its own lock; rank 0 owns the directory.
    lock_path = directory / (LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank}")
    fd = open_lock(lock_path)  # never through a symlink: it would truncate the file it points to
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CheckpointDirectoryLockedError(
            f"{directory} is already being written by another checkpoint manager (process {holder}); "
            "stop that run or choose another directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


_open_managers: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    """Pending saves finish when the interpreter exits normally, even if nobody called ``close()``."""
    for manager in list(_open_managers):
        try:
            manager.close()
        except Exception as exc:
            log.error("while closing %s at exit: %s", manager.directory, exc)
