"""The directory lock: one checkpoint manager per directory and rank, and waiting out a killed run's writer.

Rank 0 holds ``.ckptio.lock``, other ranks ``.ckptio.lock.rankN``; each lock file records its holder's process
id. A holder that is gone is the writer process of a killed trainer, still committing what it was given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import psutil

from .atomic import lock_exclusive, open_lock
from .errors import CheckpointDirectoryLockedError
from .naming import LOCK_NAME

__all__ = ["EARLIER_WRITER_WAIT", "lock_directory", "release_lock", "wait_until_released"]

log = logging.getLogger("ckptio")


EARLIER_WRITER_WAIT = 600.0
"""Seconds a new manager waits for the writer process of an earlier run whose trainer is gone (killed) to commit
the saves it was given and release the directory; a lock held by a running process is refused at once."""


def wait_until_released(directory: str | os.PathLike[str], *, rank: int = 0) -> None:
    """Return once no writer of an earlier, killed run still works in ``directory`` (waiting up to
    :data:`EARLIER_WRITER_WAIT` seconds); raise :class:`~ckptio.CheckpointDirectoryLockedError` if a running
    manager holds it. Call it before choosing a checkpoint to resume from: the saves an earlier run's ``save()``
    had returned are then all committed (``CheckpointManager`` itself waits the same way)."""
    directory = Path(directory).absolute()
    if directory.is_dir():
        os.close(lock_directory(directory, rank, register=False))


def lock_directory(directory: Path, rank: int, register: bool = True) -> int:
    # Ranks of a sharded checkpoint share the directory, each with its own lock; rank 0 owns the directory.
    lock_path = directory / (LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank}")
    fd = open_lock(lock_path)  # never through a symlink: it would truncate the file it points to
    try:
        _wait_for_lock(fd, directory)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    if register:
        _held_locks.add(fd)
    return fd


def _wait_for_lock(fd: int, directory: Path) -> None:
    """Take the lock. A holder whose recorded process is gone is the writer process of a killed trainer, still
    committing the saves it was given: wait for it (bounded), never share the directory with it."""
    deadline = None
    while True:
        try:
            lock_exclusive(fd)
            return
        except BlockingIOError:
            pass
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        if _is_running(holder):
            raise CheckpointDirectoryLockedError(
                f"{directory} is already being written by another checkpoint manager (process {holder}); "
                "stop that run or choose another directory")
        if deadline is None:
            deadline = time.monotonic() + EARLIER_WRITER_WAIT
            log.warning("%s is still locked by the writer of an earlier run (its trainer, process %s, is gone): "
                        "waiting up to %gs for it to commit the saves it was given", directory, holder,
                        EARLIER_WRITER_WAIT)
        if time.monotonic() > deadline:
            raise CheckpointDirectoryLockedError(
                f"{directory} is still locked by the writer of an earlier run (its trainer, process {holder}, is "
                f"gone) after {EARLIER_WRITER_WAIT:g}s; wait for it to finish, or stop the ckptio.writer_process "
                "that holds it, and start again")
        time.sleep(0.05)


def _is_running(pid: str) -> bool:
    """Whether ``pid`` (read from a lock file) names a live process; anything unreadable counts as live."""
    if not pid.isdigit():
        return True
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


# A forked child (a DataLoader worker) shares the lock's open file, and with it the flock: after a kill -9 of the
# trainer, its workers would keep the directory locked until they notice and exit (seconds). In the child the
# descriptor is pointed at /dev/null (not closed: the inherited manager would later close whatever file reused
# the number), which drops the child's hold on the lock and leaves the parent's untouched.
_held_locks: set[int] = set()


def _release_locks_in_fork() -> None:
    for fd in list(_held_locks):
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(null, fd)
            os.close(null)
    _held_locks.clear()


os.register_at_fork(after_in_child=_release_locks_in_fork)


def release_lock(fd: int) -> None:
    """Close a lock taken with :func:`lock_directory` (the directory is then free for the next manager)."""
    _held_locks.discard(fd)
    os.close(fd)
