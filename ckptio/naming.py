"""File names in a checkpoint directory (naming, listing, shard directories) and the directory's integrity index.

The index (``.ckptio-index.json``) caches, per file, the size and mtime it had when its digest was last
checked and the outcome, so that listing a directory shows each file's integrity state without reading any
checkpoint. It is only a cache: deleting it loses nothing but that state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import TEMP_NAME_OVERHEAD, create_new, is_temporary, open_lock, remove_leftovers, temp_name
from .errors import CorruptCheckpointError
from .formats import check_json_cost
from .suffixes import file_name, split_suffix

__all__ = [
    "INDEX_NAME",
    "LOCK_NAME",
    "SHARDS_SUFFIX",
    "WRITTEN_NOW",
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
    "read_index",
    "remove_orphan",
    "remove_orphan_shards",
    "remove_stale_orphan_shards",
    "scan",
    "shard_directory",
    "shard_file_name",
    "split_suffix",
    "stale_orphan_shards",
    "sweep_leftovers",
    "update_index",
    "validate_name",
]

INDEX_NAME = ".ckptio-index.json"
SHARDS_SUFFIX = ".shards"
LOCK_NAME = ".ckptio.lock"
_INDEX_LOCK_NAME = ".ckptio-index.lock"
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


def scan(directory: Path, protected_names: tuple[str, ...] = ("best_model",)) -> list[CheckpointEntry]:
    """Checkpoint files in ``directory``, newest first (temporary files of writers in progress excluded): in the
    order ckptio wrote them, as its index records it, then files it did not record, by mtime."""
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
