"""A checkpoint directory's files: their names, listing them cheaply (newest first), shard directories, and the
leftovers of interrupted saves (orphan shards, temporary files) with the rule for when they may go.

Each file's integrity state comes from the directory index (:mod:`ckptio.dir_index`), never from reading it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import TEMP_NAME_OVERHEAD, is_temporary, remove_leftovers
from .dir_index import read_index
from .suffixes import file_name, split_suffix

__all__ = [
    "LOCK_NAME",
    "SHARDS_SUFFIX",
    "CheckpointEntry",
    "OrphanShards",
    "delete_checkpoint",
    "file_name",
    "live_ranks",
    "make_shard_directory",
    "orphan_shards",
    "parse_checkpoint_name",
    "plan_orphan_removal",
    "prune_orphan_shards",
    "remove_orphan",
    "remove_orphan_shards",
    "remove_stale_orphan_shards",
    "scan",
    "shard_directory",
    "shard_file_name",
    "split_suffix",
    "stale_orphan_shards",
    "sweep_leftovers",
    "validate_name",
]

SHARDS_SUFFIX = ".shards"
LOCK_NAME = ".ckptio.lock"
# fullmatch with [0-9]: "$" would also match before a trailing newline, and \d any Unicode digit ("١" is 1)
_BATCH_NAME = re.compile(r"checkpoint_epoch_([0-9]+)_batch_([0-9]+)")
_NAME_MAX = 255  # bytes in one file name on ext4, xfs, btrfs, tmpfs (os.pathconf's PC_NAME_MAX)


def shard_directory(checkpoint: Path) -> Path:
    """Where the shards of a sharded checkpoint live: ``NAME.shards/`` beside its manifest ``NAME.pth``."""
    parts = split_suffix(checkpoint.name)
    stem = parts[0] if parts else checkpoint.name
    return checkpoint.parent / f"{stem}{SHARDS_SUFFIX}"


def shard_file_name(rank: int, world_size: int, fmt: str, compression: str | None) -> str:
    return file_name(f"rank{rank:05d}-of-{world_size:05d}", fmt, compression)


def make_shard_directory(checkpoint: Path) -> Path:
    """``NAME.shards/`` for ``checkpoint``, created if needed; a symlink or non-directory there is refused, so
    that no shard is ever written outside the checkpoint directory."""
    directory = shard_directory(checkpoint)
    with contextlib.suppress(FileExistsError):
        directory.mkdir()
    if not _is_real_directory(directory):
        raise OSError(errno.EEXIST, f"{directory} is not a directory of shards (a symlink or a file); remove it "
                      "so that the shards can be written", str(directory))
    return directory


def _is_real_directory(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def delete_checkpoint(path: Path) -> None:
    """Remove a checkpoint and, for a sharded one, its shards (the manifest first: it is what makes it valid).

    Nothing is followed: a symlink named like the checkpoint or its shard directory is removed as a link.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _remove_shard_directory(shard_directory(path))


def _remove_shard_directory(shards: Path) -> None:
    if holds_only_shards(shards):
        shutil.rmtree(shards, ignore_errors=True)  # rmtree never follows a symlink inside the tree
    elif shards.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            shards.unlink()


def _shards_size(checkpoint: Path) -> int:
    return _tree_size(shard_directory(checkpoint))[0]


def _tree_size(directory: Path) -> tuple[int, int]:
    """Bytes of the entries of a real directory (symlinks count as themselves) and the newest mtime among it
    and them, in ns; ``(0, 0)`` for anything but a real directory."""
    if not _is_real_directory(directory):
        return 0, 0
    total, newest = 0, 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as it:
        newest = os.lstat(directory).st_mtime_ns
        for item in it:
            with contextlib.suppress(FileNotFoundError):
                info = item.stat(follow_symlinks=False)
                total += info.st_size
                newest = max(newest, info.st_mtime_ns)
    return total, newest


def validate_name(name: str, fmt: str = "safetensors", compression: str | None = "zstd") -> None:
    """Refuse a name that is not a plain file stem, or too long for the file (and its temporary name) to be
    created: found here, in ``save()``, rather than as ENAMETOOLONG from the background."""
    if not name or name != name.strip() or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(
            f"checkpoint name {name!r} must be a plain file stem such as 'checkpoint_epoch_1_batch_100' "
            "(no path separators, not empty, not starting with '.')"
        )
    limit = _NAME_MAX - TEMP_NAME_OVERHEAD - len(file_name("", fmt, compression))
    size = len(os.fsencode(name))
    if size > limit:
        raise ValueError(
            f"checkpoint name {name[:40]!r}... is {size} bytes; with its suffix and the temporary name used while "
            f"writing it, a {fmt}{'+' + compression if compression else ''} checkpoint name may be at most {limit} "
            f"bytes (file names are limited to {_NAME_MAX}); choose a shorter name"
        )


def parse_checkpoint_name(stem: str) -> tuple[int, int] | None:
    """``(epoch, batch)`` for ``checkpoint_epoch_{epoch}_batch_{batch}``."""
    match = _BATCH_NAME.fullmatch(stem)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint file as seen by ``stat`` (no byte of it read)."""

    path: Path
    name: str
    suffix: str
    size: int
    mtime_ns: int
    protected: bool
    shard_bytes: int = 0
    """Bytes of the shards of a sharded checkpoint (``size`` is its manifest's)."""
    written: int | None = None
    """Its place in the order in which ckptio wrote this directory's checkpoints (from the index), if known."""

    @property
    def total_size(self) -> int:
        return self.size + self.shard_bytes

    @property
    def epoch_batch(self) -> tuple[int, int] | None:
        return parse_checkpoint_name(self.name)

    @property
    def order_key(self) -> tuple[bool, int, int, tuple[int, int], str]:
        """Newest last: by the order the index says the files were written in, never by a clock that may have been
        stepped back; files the index does not know (copied in, or the index lost) come first, by mtime."""
        return (self.written is not None, self.written or 0, self.mtime_ns, self.epoch_batch or (-1, -1), self.name)


def scan(directory: str | os.PathLike[str],
         protected_names: tuple[str, ...] = ("best_model",)) -> list[CheckpointEntry]:
    """Checkpoint files in ``directory``, newest first (temporary files of writers in progress excluded): in the
    order ckptio wrote them, as its index records it, then files it did not record, by mtime."""
    directory = Path(directory)
    index = read_index(directory)
    entries = []
    with os.scandir(directory) as it:
        for item in it:
            if is_temporary(item.name) or item.name.startswith("."):
                continue
            parts = split_suffix(item.name)
            if parts is None:
                continue
            try:
                if not item.is_file(follow_symlinks=False):
                    continue
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted by a concurrent clean or retention pass
                continue
            entries.append(CheckpointEntry(
                path=Path(item.path), name=parts[0], suffix=parts[1], size=info.st_size,
                mtime_ns=info.st_mtime_ns, protected=parts[0] in protected_names,
                shard_bytes=_shards_size(Path(item.path)), written=index.get(item.name, {}).get("written"),
            ))
    entries.sort(key=lambda e: e.order_key, reverse=True)
    return entries


def integrity_state(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> str:
    """``verified``, ``corrupt`` or ``unverified``, from the index alone."""
    record = index.get(entry.path.name)
    if not record or record.get("size") != entry.size or record.get("mtime_ns") != entry.mtime_ns:
        return "unverified"
    status = record.get("status")
    return status if status in ("verified", "corrupt") else "unverified"


# -- leftovers of interrupted saves ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OrphanShards:
    """A ``NAME.shards/`` directory whose manifest ``NAME`` was never committed (or is gone)."""

    path: Path
    name: str
    size: int
    mtime_ns: int
    """The newest modification among the directory and its entries: a rank writing there keeps it recent."""

    @property
    def epoch_batch(self) -> tuple[int, int] | None:
        return parse_checkpoint_name(self.name)


def orphan_shards(directory: Path) -> list[OrphanShards]:
    """Shard directories without a committed manifest beside them that hold only ckptio's files."""
    manifests: set[str] = set()
    candidates: list[os.DirEntry[str]] = []
    with os.scandir(directory) as it:
        for item in it:
            if item.name.startswith("."):
                continue
            if item.name.endswith(SHARDS_SUFFIX) and len(item.name) > len(SHARDS_SUFFIX):
                candidates.append(item)
                continue
            parts = split_suffix(item.name)
            if parts is not None:
                manifests.add(parts[0])
    orphans = []
    for item in candidates:
        name = item.name[: -len(SHARDS_SUFFIX)]
        if name in manifests or not holds_only_shards(Path(item.path)):
            continue
        size, mtime_ns = _tree_size(Path(item.path))
        orphans.append(OrphanShards(Path(item.path), name, size, mtime_ns))
    return orphans


_SHARD_FILE = re.compile(r"rank[0-9]{5,}-of-[0-9]{5,}\.(pth|safetensors)(\.zst)?")


def holds_only_shards(path: Path) -> bool:
    """Whether ``path`` is a real directory holding nothing but what ckptio writes there (shard files, temporary
    files). Only those are ours to delete: a user's ``my_dataset.shards/``, or a symlink under such a name, is
    never touched (a save that needs the name fails with a message instead)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        with os.scandir(path) as it:
            return all(_SHARD_FILE.fullmatch(item.name) or is_temporary(item.name) for item in it)
    except OSError:
        return False


def plan_orphan_removal(directory: Path, *, older_than: tuple[int, int] | None = None, when_idle: bool = False,
                        holding_lock: bool = False) -> list[OrphanShards]:
    """The orphan shard directories that no rank can still be writing: what :func:`remove_orphan_shards`
    deletes, and what a dry run reports.

    A rank that runs ahead writes its shards of a save before rank 0 commits the manifest, so an orphan is
    deleted only if one of these holds:

    * ``older_than=(epoch, batch)``: it is a periodic checkpoint older than one committed (ranks write their
      saves in order, so none of them still writes an older one) - what retention removes during a run;
    * ``when_idle``: no manager of any rank holds a lock on the directory (:func:`live_ranks`; with
      ``holding_lock`` the caller is rank 0 and its own lock is not counted) - what a new manager and
      ``ckptio clean`` remove.
    """
    idle = when_idle and not [n for n in live_ranks(directory) if not (holding_lock and n == LOCK_NAME)]
    return [orphan for orphan in orphan_shards(directory)
            if idle or (older_than is not None and orphan.epoch_batch is not None and orphan.epoch_batch < older_than)]


def remove_orphan_shards(directory: Path, *, older_than: tuple[int, int] | None = None, when_idle: bool = False,
                         holding_lock: bool = False) -> list[OrphanShards]:
    """Delete the orphans :func:`plan_orphan_removal` chooses; return them."""
    removed = plan_orphan_removal(directory, older_than=older_than, when_idle=when_idle, holding_lock=holding_lock)
    for orphan in removed:
        remove_orphan(orphan)
    return removed


def remove_orphan(orphan: OrphanShards) -> None:
    """Delete one orphan shard directory (nothing but ckptio's files: checked again right before)."""
    _remove_shard_directory(orphan.path)


def stale_orphan_shards(directory: Path) -> list[OrphanShards]:
    """What ``ckptio clean`` removes: orphans older than the newest committed periodic checkpoint, and every
    orphan when no manager of any rank has the directory open."""
    positions = [e.epoch_batch for e in scan(directory, ()) if e.epoch_batch is not None]
    return plan_orphan_removal(directory, older_than=max(positions, default=None), when_idle=True)


def remove_stale_orphan_shards(directory: Path) -> list[OrphanShards]:
    """Delete what :func:`stale_orphan_shards` plans; return it."""
    removed = stale_orphan_shards(directory)
    for orphan in removed:
        remove_orphan(orphan)
    return removed


def prune_orphan_shards(directory: Path, committed: str) -> int:
    """Retention's step after committing checkpoint ``committed``: remove the orphan shard directories older
    than it; return the bytes of those left (saves still in progress), which count towards the budget."""
    position = parse_checkpoint_name(committed)
    if position is not None:
        remove_orphan_shards(directory, older_than=position)
    return sum(orphan.size for orphan in orphan_shards(directory))


def live_ranks(directory: Path) -> list[str]:
    """Names of the lock files in ``directory`` held right now by a running manager (any rank, rank 0 included
    unless the caller holds it: a lock held through another descriptor of this process counts as held)."""
    held = []
    for item in os.scandir(directory):
        if not (item.name == LOCK_NAME or item.name.startswith(LOCK_NAME + ".rank")):
            continue
        try:
            fd = os.open(item.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(item.name)
        finally:
            os.close(fd)
    return held


def sweep_leftovers(directory: Path, *, orphans: bool = False) -> list[Path]:
    """What rank 0 removes when it opens ``directory`` (holding its lock): temporary files of interrupted
    saves, in the directory and in each real shard directory (a symlinked one is never entered; none while another
    rank's lock is held), and with ``orphans`` the shard directories of saves never committed, unless a rank is
    already running."""
    removed = [orphan.path for orphan in remove_orphan_shards(directory, when_idle=True, holding_lock=True)
               ] if orphans else []
    removed += remove_leftovers(directory)
    if [name for name in live_ranks(directory) if name != LOCK_NAME]:
        return removed  # another rank (or its writer process, of this run or an earlier one) may be writing there
    for item in os.scandir(directory):
        if item.name.endswith(SHARDS_SUFFIX) and item.is_dir(follow_symlinks=False):
            removed += remove_leftovers(Path(item.path))
    return removed
