"""``verify``: re-read checkpoints and compare them with the digests recorded inside them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dir_index import INDEX_NAME, index_record, update_index
from .fileio import FileCheck, verify_file
from .naming import scan

__all__ = ["VerifyReport", "verify"]

log = logging.getLogger("ckptio")


@dataclass(frozen=True)
class VerifyReport:
    """Per-file results of :func:`verify`."""

    path: Path
    files: list[FileCheck]

    @property
    def ok(self) -> bool:
        """No file is corrupt (unsealed files, which carry no digest, are reported but do not fail)."""
        return all(check.ok for check in self.files)

    @property
    def corrupt(self) -> list[FileCheck]:
        return [check for check in self.files if not check.ok]


def verify(path: str | os.PathLike[str], *, record: bool = True) -> VerifyReport:
    """Verify one checkpoint file, or every checkpoint file in a directory (newest first).

    With ``record``, each outcome is written to the directory's index so that ``ckptio list`` can show it; only
    where ckptio keeps an index already (a folder a manager wrote into), so that verifying someone else's folder
    leaves no file in it. Raises ``FileNotFoundError`` for a path that does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        directory, files = path, [entry.path for entry in scan(path, ())]
    else:
        directory, files = path.parent, [path]
    checks = []
    changes = {}
    for file in files:
        check, seen = _check_unchanging(file)
        checks.append(check)
        if seen is not None and check.status in ("verified", "corrupt"):
            changes[file.name] = index_record(seen[0], seen[1], check.status, check.digest, check.meta,
                                              check.reason if check.status == "corrupt" else "")
    if record and changes and (directory / INDEX_NAME).exists():
        record_in_index(directory, changes)
    return VerifyReport(path=path, files=checks)


# How long verify waits to record its results in the index. The index lock is held for milliseconds by a writer,
# but any process that can read the lock file can hold it forever (flock needs no write permission): verify then
# returns without recording, instead of hanging.
INDEX_WAIT_SECONDS = 2.0


def record_in_index(directory: Path, changes: dict[str, dict[str, Any] | None]) -> None:
    """Record ``changes`` in the index (only a cache), giving up after :data:`INDEX_WAIT_SECONDS`."""
    try:
        update_index(directory, changes, wait=INDEX_WAIT_SECONDS)
    except OSError as exc:  # read-only media, or an index lock held by another process: verify still answers
        log.info("could not record results in %s: %s", directory, exc)


def _check_unchanging(file: Path) -> tuple[FileCheck, tuple[int, int, int] | None]:
    """Verify ``file``, telling a file that vanished or was replaced while it was read from a damaged one.

    Beside a live writer, retention may delete a file between the listing and the read, or a save may replace
    it under the same name: neither is corruption. Returns the check and the ``stat`` it is valid for (``None``
    when the file changed while it was read, so that the result is not recorded).
    """
    check = FileCheck(file, "removed", REMOVED_REASON)
    for _ in range(3):
        before = _stat(file)
        check = verify_file(file)
        after = _stat(file)
        if after is None:
            return FileCheck(file, "removed", REMOVED_REASON), None
        if before == after:
            return check, after
    return check, None


REMOVED_REASON = "deleted while verify ran (by retention or clean); not a fault of the file"


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns, info.st_ino
