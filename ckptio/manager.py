"""``CheckpointManager``: the one class a trainer needs.

``save()`` copies the state into reusable host buffers and returns; a background writer (a thread, or a helper
process: :mod:`ckptio.writer_thread`, :mod:`ckptio.writer_process`) serializes, writes atomically, seals with a
digest, records it in the directory's index and applies retention, and reports back; the manager applies the
reports (futures, counters, freed slots). Errors from the background never vanish: they are logged and raised by
the next ``save()``, ``wait()`` or ``close()``.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import CheckpointOptions
from .dirlock import lock_directory, release_lock
from .errors import CheckpointWriteError
from .fileio import SavedCheckpoint
from .formats import check_supported
from .naming import CheckpointEntry, file_name, scan, sweep_leftovers, validate_name
from .snapshot import BufferSlot, StateShape, heap_staging, state_shape, walk_tensors
from .writer import JobRunner, Report, WriteJob, WriterBackend

if TYPE_CHECKING:
    from .mirror import Mirror

__all__ = ["CheckpointManager", "SaveStats"]

log = logging.getLogger("ckptio")


@dataclass
class SaveStats:
    """Counters a trainer can print; updated as the writer reports each save."""

    requested: int = 0
    committed: int = 0
    skipped_busy: int = 0
    skipped_no_space: int = 0
    failed: int = 0
    deleted: int = 0
    slimmed: int = 0
    """Older checkpoints slimmed to their weights (``keep_full``)."""
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
class _Ticket:
    """A save the writer has been given: what to resolve, and which slot to free, when its report comes."""

    name: str
    slot: _Slot
    future: Future[SavedCheckpoint | None]


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
        # Absolute once and for all: a later os.chdir() must not send saves, sweeps and retention to another
        # directory that was never locked (the writer process, started now or restarted later, gets this path).
        self.directory = Path(directory).absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(f"{self.directory} exists and is not a directory; choose another path") from None
        self._lock_fd = lock_directory(self.directory, self.options.rank)
        try:
            self._start()
        except BaseException:
            release_lock(self._lock_fd)
            raise

    def _start(self) -> None:
        if self.options.rank == 0:
            leftovers = sweep_leftovers(self.directory, orphans=True)
            for leftover in leftovers:
                log.warning("removed %s, left behind by an interrupted save", leftover)
        self.stats = SaveStats()
        self._errors: list[BaseException] = []
        self._errors_lock = threading.Lock()
        options = self.options
        self._runner = JobRunner(self.directory, options)
        in_process = options.async_save and options.writer == "process"
        slot_count = options.max_pending + 1 if options.async_save else 1
        self._slots = [_new_slot(i, in_process) for i in range(slot_count)]
        self._free_slots: queue.Queue[_Slot] = queue.Queue()
        for slot in self._slots:
            self._free_slots.put(slot)
        self._tickets: dict[int, _Ticket] = {}
        self._ticket_numbers = itertools.count()
        self._idle = threading.Condition()
        self._save_lock = threading.Lock()  # one save() at a time, and close() never cuts into one
        self._closed = False
        self._stager: _Stager | None = None
        self._writer: WriterBackend | None = None
        self.mirror: Mirror | None = None
        """The background copier to ``options.mirror`` (None without one); its ``unmirrored`` names what waits."""
        if options.mirror is not None and options.rank == 0:
            from .mirror import Mirror

            self.mirror = Mirror(options.mirror, keep=options.mirror_keep, protected_names=options.protected_names,
                                 fsync=options.fsync, local_directory=self.directory)
        if in_process:
            from .writer_process import ProcessWriter

            self._writer = ProcessWriter(self.directory, options, self._on_report, self._on_lost, self._lock_fd)
        elif options.async_save:
            from .writer_thread import ThreadWriter

            self._writer = ThreadWriter(self._runner, self._on_report, name=f"ckptio-writer:{self.directory}")
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
        with self._save_lock:  # a close() from another thread waits until this save is handed over
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
            ticket = _Ticket(name, slot, Future())
            number = next(self._ticket_numbers)
            try:
                snapshot = slot.main.take(state) if state is not None else None
                shard_snapshot = slot.shard.take(shard) if shard is not None else None
                for part, buffers, source in (("main", slot.main, state), ("shard", slot.shard, shard)):
                    if buffers.needs_prepare and buffers.staging is not None:  # pinned for the next saves, off-thread
                        self._stage(part, buffers.staging.shape, _cuda_device(source))
                job = WriteJob(number, name, snapshot, dict(metadata) if metadata else None, shard_snapshot, token)
                with self._idle:
                    self._tickets[number] = ticket
                if self._writer is not None:
                    self._writer.submit(job)  # may raise, e.g. EMFILE when a new writer process must start
            except BaseException:
                # Nothing was handed over: no report will ever come, so the save is forgotten and its slot freed
                # here, or wait() and close() would wait for it forever and the next save would lack a slot.
                with self._idle:
                    registered = self._tickets.pop(number, None) is not None
                    self._idle.notify_all()
                self._free_slots.put(slot)
                if registered:
                    self.stats.failed += 1
                raise
            if self._writer is None:
                self._on_report(self._runner.run(job))
            del job, snapshot, shard_snapshot
            self.stats.blocked_seconds += time.perf_counter() - started
        if self._writer is None:
            self._raise_background_error()
        return ticket.future

    def prepare(self, state: Any, *, shard: Any = None) -> None:
        """Allocate every slot's buffers for ``state`` (and ``shard``, this process's part of a sharded
        checkpoint) in the background, pinned for CUDA tensors; returns at once.

        Call it before the first step, and again when the state's tensors change (it is also done for you after
        a save whose state shape was new). A save that comes before the buffers are ready allocates pageable
        buffers for itself instead of waiting. Host memory: up to one more copy of the state per slot while
        buffers of an old state shape are still in use. Ranks other than 0 of a sharded checkpoint pass
        ``state=None``.
        """
        self._check_open()
        for part, source in (("main", state), ("shard", shard)):
            if source is not None:
                self._stage(part, state_shape(source), _cuda_device(source))

    def wait(self) -> None:
        """Block until every queued save is durable; raise the first background error, if any."""
        if self._writer is not None and not self._closed:
            with self._idle:
                while self._tickets:
                    if not self._writer.alive():
                        raise CheckpointWriteError("the checkpoint writer thread died; see the log")
                    self._idle.wait(timeout=1.0)
        self._raise_background_error()

    def close(self) -> None:
        """Finish pending saves, stop the writer and release the directory; raises background errors.

        A save running in another thread when close() is called is written first (close waits for it)."""
        with self._save_lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._writer is not None:
                self._writer.close()
            if self._stager is not None:
                self._stager.close()
        finally:
            if self.mirror is not None:
                self.mirror.close(self.options.mirror_timeout)
            for slot in self._slots:
                slot.main.release()
                slot.shard.release()
            _open_managers.discard(self)
            release_lock(self._lock_fd)
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
        return len(self._tickets)

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
                if self._writer is not None and not self._writer.alive():
                    raise CheckpointWriteError("the checkpoint writer thread died; see the log") from None

    def _stage(self, part: str, spec: StateShape, device: int | None) -> None:
        if self._stager is None:
            self._stager = _Stager(self._slots)
        self._stager.request(part, spec, device)

    def _on_report(self, report: Report) -> None:
        """Apply one report from the writer (its thread, or the receiver of the writer process)."""
        ticket = self._tickets.get(report.ticket)
        if ticket is None:
            return
        stats = self.stats
        stats.deleted += report.deleted
        saved = report.saved
        if saved is not None:
            stats.committed += 1
            stats.write_seconds += saved.seconds
            stats.bytes_written += saved.size
            stats.slimmed += len(saved.slimmed)
            stats.last = saved
            if self.mirror is not None:
                self.mirror.submit(saved)  # copied by the mirror's own thread, not this one
        try:
            if report.error is not None:
                self._fail(ticket, report.path or self.path_for(ticket.name), report.error)
            elif report.outcome == "skipped_no_space":
                stats.skipped_no_space += 1
                ticket.future.set_result(None)
            else:
                ticket.future.set_result(saved)
        finally:
            self._retire(report.ticket)

    def _on_lost(self, tickets: list[int], reason: str) -> None:
        """The writer process died: every save it had not reported fails, and the next call says so."""
        names = [self._tickets[t].name for t in tickets if t in self._tickets]
        lost = (f"these saves were lost: {', '.join(names)} (unless the writer had committed one before it died: "
                "a file under its name is complete and verifies, never partial; earlier checkpoints are intact)"
                if names else "no save was lost")
        error = CheckpointWriteError(f"{reason}; {lost}; the next save starts a new writer process")
        if not names:  # nothing to report to the caller: training goes on, the next save starts a new writer
            log.warning("%s", error)
            return
        log.error("%s", error)
        with self._errors_lock:
            self._errors.append(error)
        for number in tickets:
            ticket = self._tickets.get(number)
            if ticket is None:
                continue
            self.stats.failed += 1
            ticket.future.set_exception(error)
            self._retire(number)

    def _retire(self, number: int) -> None:
        ticket = self._tickets[number]
        self._free_slots.put(ticket.slot)
        with self._idle:
            del self._tickets[number]
            self._idle.notify_all()

    def _fail(self, ticket: _Ticket, path: Path, exc: BaseException) -> None:
        if ticket.future.done():
            return
        self.stats.failed += 1
        log.error("saving %s failed: %s", path, exc)
        wrapped = CheckpointWriteError(f"saving {path} failed: {exc}")
        wrapped.__cause__ = exc
        with self._errors_lock:
            self._errors.append(wrapped)
        ticket.future.set_exception(wrapped)

    def _raise_background_error(self) -> None:
        with self._errors_lock:
            if not self._errors:
                return
            first, self._errors = self._errors[0], []
        raise first


def _new_slot(index: int, shared: bool) -> _Slot:
    if not shared:
        return _Slot()
    from .shm import shared_staging

    return _Slot(BufferSlot(allocator=functools.partial(shared_staging, key=f"{index}.main")),
                 BufferSlot(allocator=functools.partial(shared_staging, key=f"{index}.shard")))


def _cuda_device(state: Any) -> int | None:
    """The device of the state's first CUDA tensor: its pinned buffers are allocated with that device current
    (under another device, pinning would create a stray context there)."""
    for tensor in walk_tensors(state):
        if tensor.is_cuda:
            index = tensor.device.index
            return index if index is not None else torch.cuda.current_device()
    return None


class _Stager:
    """Allocates (and pins) buffers for a state shape in a background thread and offers them to every slot.

    Each part of a slot (``"main"``, ``"shard"``) has its own wanted, busy and done state shape."""

    def __init__(self, slots: list[_Slot]) -> None:
        self._slots = slots
        self._changed = threading.Condition()
        self._wanted: dict[str, tuple[StateShape, int | None]] = {}
        self._busy: dict[str, StateShape] = {}
        self._done: dict[str, StateShape] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ckptio-stager", daemon=True)
        self._thread.start()

    def request(self, part: str, spec: StateShape, device: int | None = None) -> None:
        with self._changed:
            if part not in self._wanted and spec in (self._busy.get(part), self._done.get(part)):
                return
            self._wanted[part] = (spec, device)
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """For tests: wait until every requested state shape is staged."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._wanted and not self._busy, timeout)

    def close(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._wanted) or self._stopping)
                if self._stopping:
                    return
                part = next(iter(self._wanted))
                spec, device = self._wanted.pop(part)
                self._busy[part] = spec
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                for slot in self._slots:
                    buffers = slot.main if part == "main" else slot.shard
                    allocate = buffers.allocator or heap_staging
                    buffers.offer(allocate(spec, True))
            except Exception as exc:  # saves still work (they allocate for themselves); say why they may stall
                log.warning("could not prepare checkpoint buffers in the background: %s", exc)
            with self._changed:
                del self._busy[part]
                self._done[part] = spec
                self._changed.notify_all()


_open_managers: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    """Pending saves finish when the interpreter exits normally, even if nobody called ``close()``."""
    for manager in list(_open_managers):
        try:
            manager.close()
        except Exception as exc:
            log.error("while closing %s at exit: %s", manager.directory, exc)
