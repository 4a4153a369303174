"""``verify``: re-read checkpoints and compare them with the digests recorded inside them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .fileio import FileCheck, verify_file
from .layout import index_record, scan, update_index

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

    With ``record``, each outcome is written to the directory's index so that ``ckptio list`` can show it.
    Raises ``FileNotFoundError`` for a path that does not exist.
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
        before = _stat(file)
        check = verify_file(file)
        checks.append(check)
        after = _stat(file)
        if before is not None and before == after and check.status != "unsealed":
            changes[file.name] = index_record(before[0], before[1], check.status, check.digest, check.meta,
                                              check.reason if check.status == "corrupt" else "")
    if record and changes:
        try:
            update_index(directory, changes)
        except OSError as exc:  # read-only media can still be verified
            log.info("could not record results in %s: %s", directory, exc)
    return VerifyReport(path=path, files=checks)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns
