"""The directory's integrity index (``.ckptio-index.json``): per file, the size and mtime it had when its digest
was last checked, the outcome, and its place in the order ckptio wrote the directory's checkpoints.

It is only a cache: deleting it loses nothing but that state, and anything doubtful in it reads as a miss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import create_new, open_lock, temp_name
from .errors import CorruptCheckpointError
from .formats import check_json_cost

__all__ = [
    "INDEX_LOCK_SECONDS",
    "INDEX_NAME",
    "MAX_INDEX_BYTES",
    "WRITTEN_NOW",
    "index_record",
    "read_index",
    "update_index",
]

INDEX_NAME = ".ckptio-index.json"
_INDEX_LOCK_NAME = ".ckptio-index.lock"
INDEX_LOCK_SECONDS = 5.0
"""How long an index update waits for another process's update before it gives up (the index is a cache)."""


@contextlib.contextmanager
def _index_lock(directory: Path, wait: float | None = None) -> Iterator[None]:
    # Bounded: a process that holds the lock forever (hung, or hostile) must not hang a writer on a mere cache.
    wait = INDEX_LOCK_SECONDS if wait is None else wait
    fd = open_lock(directory / _INDEX_LOCK_NAME)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(errno.EWOULDBLOCK, f"{directory / _INDEX_LOCK_NAME} stayed locked for "
                                  f"{wait:g}s; the index (a cache) was not updated") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


# The index holds a few KB per checkpoint; a larger one is damage (or not ours): it reads as empty and the next
# update rewrites it, instead of being parsed at any cost.
MAX_INDEX_BYTES = 16 * 2**20


def read_index(directory: Path) -> dict[str, dict[str, Any]]:
    """The index's well-formed records. Anything doubtful (not a regular file, too large, not JSON, a record of
    the wrong shape) is a cache miss, never an error: the index is only a cache, rebuilt by the next update."""
    try:
        # O_NONBLOCK and O_NOFOLLOW: a FIFO or a symlink planted under the index's name must not block or redirect.
        fd = os.open(directory / INDEX_NAME, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_INDEX_BYTES:
            return {}
        raw = os.read(fd, MAX_INDEX_BYTES + 1)
    except OSError:
        return {}
    finally:
        os.close(fd)
    try:
        check_json_cost(raw, directory / INDEX_NAME, "the index")  # 16 MiB of "{}," would cost GBs to parse
        doc = json.loads(raw)
    except (ValueError, RecursionError, CorruptCheckpointError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        return {}
    return {name: record for name, record in files.items() if isinstance(name, str) and _valid_record(record)}


def _valid_record(record: Any) -> bool:
    """The shape ``index_record`` writes: every reader may then use the fields without checking them again."""
    if not isinstance(record, dict):
        return False
    meta = record.get("meta", {})
    return (type(record.get("size")) is int and type(record.get("mtime_ns")) is int
            and type(record.get("written", 0)) is int
            and isinstance(record.get("status"), str) and isinstance(record.get("digest"), (str, type(None)))
            and isinstance(meta, dict) and isinstance(meta.get("summary", {}), dict)
            and isinstance(meta.get("user", {}), dict))


def update_index(directory: Path, changes: dict[str, dict[str, Any] | None], *, wait: float | None = None) -> None:
    """Apply ``changes`` (file name -> record, or ``None`` to forget it) to the index, atomically; ``OSError``
    if another process holds the index lock for longer than ``wait`` seconds (default :data:`INDEX_LOCK_SECONDS`).

    Not fsynced: the index is a cache. After a power loss it may be stale or gone, which only turns states
    into "unverified" until the next ``verify``; two more fsyncs per save would buy nothing.
    """
    if not changes:
        return
    with _index_lock(directory, wait):
        try:
            files = read_index(directory)
        except Exception:  # any doubt about a cache means rebuilding it, never a failed save
            files = {}
        last = max((record.get("written", 0) for record in files.values()), default=0)
        for filename, record in changes.items():
            if record is None:
                files.pop(filename, None)
                continue
            record = dict(record)
            if record.get("written") == WRITTEN_NOW:  # a new save: after every file written so far
                last += 1
                record["written"] = last
            elif "written" not in record and "written" in files.get(filename, {}):
                record["written"] = files[filename]["written"]  # re-verified or slimmed: keeps its place
            files[filename] = record
        existing = {e.name for e in os.scandir(directory)}
        files = {k: v for k, v in files.items() if k in existing}
        # An unpredictable new name, never through a symlink: a planted file cannot redirect the write.
        tmp = directory / temp_name(INDEX_NAME)
        try:
            with os.fdopen(create_new(tmp), "w") as out:
                json.dump({"version": 1, "files": files}, out, separators=(",", ":"))
            try:
                os.replace(tmp, directory / INDEX_NAME)
            except FileNotFoundError:  # a writer opening the directory swept it as a leftover; only a cache
                return
        except BaseException:  # a full disk (or anything else): the temporary file goes at once, not at next start
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


WRITTEN_NOW = "now"
"""``index_record(..., written=WRITTEN_NOW)``: the record of a checkpoint just written, placed after all others."""


def index_record(size: int, mtime_ns: int, status: str, digest: str | None, meta: dict[str, Any] | None,
                 reason: str = "", *, written: str | None = None) -> dict[str, Any]:
    record = {"size": size, "mtime_ns": mtime_ns, "status": status, "digest": digest, "meta": meta or {},
              "reason": reason}
    if written is not None:
        record["written"] = written
    return record
