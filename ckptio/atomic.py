"""The one place that makes a file appear durably: temporary file, fsync, rename, fsync of the directory.

A reader never sees a partly written file under its final name: until the rename, the bytes live under a
hidden temporary name that :func:`remove_leftovers` deletes when a writer next opens the directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_SUFFIX", "atomic_write", "fsync_directory", "is_temporary", "remove_leftovers"]

TEMP_SUFFIX = ".ckptio-tmp"
_WRITE_BUFFER = 4 * 2**20  # torch.save issues many small writes; batch them into large ones


def is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(final: Path, *, fsync: bool = True, drop_page_cache: bool = False) -> Iterator[BinaryIO]:
    """Yield a file to write ``final``'s bytes into; they appear under ``final`` only if the block succeeds.

    The bytes go to ``final``'s name inside a private hidden directory beside it (so that a writer which names
    its records after the file, as ``torch.save`` does, writes exactly what it would write to ``final``), and
    are renamed into place. On any error (ENOSPC included) the temporary file is removed and the previous
    ``final``, if any, is kept.
    """
    workspace = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    workspace.mkdir(mode=0o700)
    tmp = workspace / final.name
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
    except BaseException:
        shutil.rmtree(workspace, ignore_errors=True)
        raise
    file.temp_path = tmp  # type: ignore[attr-defined]  # for writers that must open the file by name
    try:
        yield file
        file.flush()
        if fsync:
            os.fsync(file.fileno())
        if drop_page_cache and hasattr(os, "posix_fadvise"):
            # A checkpoint is not read back soon; keep its pages from evicting the training data's.
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        file.close()
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            file.close()
        shutil.rmtree(workspace, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        workspace.rmdir()
    if fsync:
        fsync_directory(final.parent)


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete temporary files a crashed writer left behind; call only while holding the directory's lock."""
    removed = []
    for entry in os.scandir(directory):
        if not is_temporary(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
