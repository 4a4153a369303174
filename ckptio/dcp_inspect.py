"""DCP checkpoint directories as a directory listing sees them: is it one, does it verify, what is left over
from an interrupted save, and the entries retention and ``ckptio clean`` work on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import (
    LoadItemType,
)

from .atomic import is_temporary, temp_name
from .dcp_format import DATA_SUFFIX, METADATA_NAME, RESULTS_SUFFIX, SEAL_NAME, WRITING_LOCK_NAME, is_ours
from .dcp_reader import open_directory, open_regular, read_item
from .errors import CorruptCheckpointError
from .naming import CheckpointEntry

__all__ = [
    "DcpEntry",
    "DirectoryCheck",
    "checkpoint_entries",
    "dcp_leftovers",
    "delete_dcp_directory",
    "is_dcp_directory",
    "remove_dcp_leftovers",
    "scan_dcp",
    "verify_directory",
]

# -- inspecting directories (CLI, retention) ------------------------------------------------------------------


def is_dcp_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a committed DCP checkpoint directory (ours or torch's): a real directory, not one of
    our staging directories, holding the metadata file."""
    path = Path(path)
    try:
        return (stat.S_ISDIR(os.lstat(path).st_mode) and not is_temporary(path.name)
                and os.path.lexists(path / METADATA_NAME))
    except OSError:
        return False


@dataclass(frozen=True)
class DirectoryCheck:
    """The outcome of :func:`verify_directory`: ``status`` is ``verified``, ``unsealed`` or ``corrupt``."""

    path: Path
    status: str
    reason: str
    items: int = 0
    size: int = 0
    damaged: tuple[str, ...] = ()
    """``file: reason`` for each damaged file or item."""

    @property
    def ok(self) -> bool:
        return self.status != "corrupt"


def verify_directory(path: str | os.PathLike[str]) -> DirectoryCheck:
    """Re-read every item of a DCP checkpoint directory and check it: the digests of a ckptio directory, the
    structure (every tensor loadable) of a plain one. Every damaged item is listed, not only the first."""
    path = Path(path)
    size = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path)) if path.is_dir() else 0
    try:
        opened = open_directory(path)
    except CorruptCheckpointError as exc:
        return DirectoryCheck(path, "corrupt", str(exc), size=size, damaged=(str(exc),))
    storage = opened.metadata.storage_data
    damaged: list[str] = []
    by_file: dict[str, list[MetadataIndex]] = defaultdict(list)
    for index, info in storage.items():
        by_file[info["file"] if is_ours(info) else info.relative_path].append(index)
    types = opened.metadata.state_dict_metadata
    for name, indices in sorted(by_file.items()):
        file = path / name
        try:
            fd = open_regular(file)
        except CorruptCheckpointError as exc:
            damaged.append(str(exc))
            continue
        try:
            for index in indices:
                kind = (LoadItemType.TENSOR if hasattr(types.get(index.fqn), "chunks") else LoadItemType.BYTE_IO)
                try:
                    # pickled values are checked as data (weights-only), never run
                    read_item(fd, file, index, storage[index], kind, trusted=False)
                except CorruptCheckpointError as exc:
                    damaged.append(str(exc))
        finally:
            os.close(fd)
    if damaged:
        return DirectoryCheck(path, "corrupt", damaged[0], len(storage), size, tuple(damaged))
    if opened.seal is None:
        return DirectoryCheck(path, "unsealed", "loadable, but written without ckptio: no digests to check",
                              len(storage), size)
    return DirectoryCheck(path, "verified", "every item's digest matches", len(storage), size)


def dcp_leftovers(directory: str | os.PathLike[str]) -> list[Path]:
    """Staging directories of DCP saves in ``directory`` that crashed or failed: their coordinator no longer
    holds their lock (a save in flight always does, from before any rank writes until its commit)."""
    found = []
    for entry in os.scandir(directory):
        if is_temporary(entry.name) and entry.is_dir(follow_symlinks=False) and _looks_like_dcp_staging(entry.path):
            if not _held(Path(entry.path) / WRITING_LOCK_NAME):
                found.append(Path(entry.path))
    return found


def remove_dcp_leftovers(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete :func:`dcp_leftovers`; return what was deleted."""
    removed = dcp_leftovers(directory)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)  # never follows a symlink inside the tree
    return removed


def _held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _looks_like_dcp_staging(path: str) -> bool:
    with contextlib.suppress(OSError), os.scandir(path) as it:
        return all(e.name.endswith((DATA_SUFFIX, RESULTS_SUFFIX)) or is_temporary(e.name)
                   or e.name in (METADATA_NAME, SEAL_NAME, WRITING_LOCK_NAME) for e in it)
    return False


def delete_dcp_directory(path: Path) -> None:
    """Remove a DCP checkpoint directory: first renamed to a hidden temporary name (from then on it no longer
    passes for a checkpoint, and an interrupted delete is a leftover), then removed."""
    doomed = path.parent / temp_name(path.name)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


@dataclass(frozen=True)
class DcpEntry:
    """A committed DCP checkpoint directory as seen by ``stat`` (no byte of it read)."""

    path: Path
    name: str
    size: int
    mtime_ns: int
    sealed: bool


def scan_dcp(directory: str | os.PathLike[str]) -> list[DcpEntry]:
    """DCP checkpoint directories directly inside ``directory`` (ours and plain), newest first."""
    entries = []
    with os.scandir(directory) as it:
        for item in it:
            if item.name.startswith(".") or not is_dcp_directory(item.path):
                continue
            size, newest = 0, 0
            with contextlib.suppress(OSError), os.scandir(item.path) as inner:
                for sub in inner:
                    info = sub.stat(follow_symlinks=False)
                    size += info.st_size
                    newest = max(newest, info.st_mtime_ns)
            entries.append(DcpEntry(Path(item.path), item.name, size, newest,
                                    os.path.lexists(Path(item.path) / SEAL_NAME)))
    entries.sort(key=lambda e: (e.mtime_ns, e.name), reverse=True)
    return entries


def checkpoint_entries(directory: str | os.PathLike[str],
                       protected_names: tuple[str, ...] = ("best_model",)) -> list[CheckpointEntry]:
    """:func:`scan_dcp` as the listing entries that retention and ``clean`` plan over (newest first); a
    directory's suffix is ``"/"``."""
    entries = [CheckpointEntry(path=e.path, name=e.name, suffix="/", size=e.size, mtime_ns=e.mtime_ns,
                               protected=e.name in protected_names) for e in scan_dcp(directory)]
    entries.sort(key=lambda e: e.order_key, reverse=True)
    return entries
