"""File names in a checkpoint directory, listing them cheaply, and the directory's integrity index.

The index (``.ckptio-index.json``) caches, per file, the size and mtime it had when its digest was last
checked and the outcome, so that listing a directory shows each file's integrity state without reading any
checkpoint. It is only a cache: deleting it loses nothing but that state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import TEMP_SUFFIX, is_temporary

__all__ = [
    "INDEX_NAME",
    "LOCK_NAME",
    "SHARDS_SUFFIX",
    "CheckpointEntry",
    "delete_checkpoint",
    "file_name",
    "parse_checkpoint_name",
    "read_index",
    "scan",
    "shard_directory",
    "shard_file_name",
    "split_suffix",
    "update_index",
    "validate_name",
]

INDEX_NAME = ".ckptio-index.json"
SHARDS_SUFFIX = ".shards"
LOCK_NAME = ".ckptio.lock"
_INDEX_LOCK_NAME = ".ckptio-index.lock"
_SUFFIXES = (".pth.zst", ".safetensors.zst", ".pth", ".safetensors")
_BATCH_NAME = re.compile(r"^checkpoint_epoch_(\d+)_batch_(\d+)$")


def file_name(name: str, fmt: str, compression: str | None) -> str:
    return name + (".pth" if fmt == "torch" else ".safetensors") + (".zst" if compression else "")


def shard_directory(checkpoint: Path) -> Path:
    """Where the shards of a sharded checkpoint live: ``NAME.shards/`` beside its manifest ``NAME.pth``."""
    parts = split_suffix(checkpoint.name)
    stem = parts[0] if parts else checkpoint.name
    return checkpoint.parent / f"{stem}{SHARDS_SUFFIX}"


def shard_file_name(rank: int, world_size: int, fmt: str, compression: str | None) -> str:
    return file_name(f"rank{rank:05d}-of-{world_size:05d}", fmt, compression)


def delete_checkpoint(path: Path) -> None:
    """Remove a checkpoint and, for a sharded one, its shards (the manifest first: it is what makes it valid)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    shards = shard_directory(path)
    if shards.is_dir():
        shutil.rmtree(shards, ignore_errors=True)


def _shards_size(checkpoint: Path) -> int:
    directory = shard_directory(checkpoint)
    if not directory.is_dir():
        return 0
    total = 0
    with os.scandir(directory) as it:
        for item in it:
            with contextlib.suppress(FileNotFoundError):
                total += item.stat(follow_symlinks=False).st_size
    return total


def validate_name(name: str) -> None:
    if not name or name != name.strip() or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(
            f"checkpoint name {name!r} must be a plain file stem such as 'checkpoint_epoch_1_batch_100' "
            "(no path separators, not empty, not starting with '.')"
        )


def split_suffix(filename: str) -> tuple[str, str] | None:
    """``("best_model", ".pth.zst")`` for a checkpoint file name, ``None`` for anything else."""
    for suffix in _SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], suffix
    return None


def parse_checkpoint_name(stem: str) -> tuple[int, int] | None:
    """``(epoch, batch)`` for ``checkpoint_epoch_{epoch}_batch_{batch}``."""
    match = _BATCH_NAME.match(stem)
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

    @property
    def total_size(self) -> int:
        return self.size + self.shard_bytes

    @property
    def epoch_batch(self) -> tuple[int, int] | None:
        return parse_checkpoint_name(self.name)

    @property
    def order_key(self) -> tuple[int, tuple[int, int], str]:
        return (self.mtime_ns, self.epoch_batch or (-1, -1), self.name)


def scan(directory: Path, protected_names: tuple[str, ...] = ("best_model",)) -> list[CheckpointEntry]:
    """Checkpoint files in ``directory``, newest first (temporary files of writers in progress excluded)."""
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
                shard_bytes=_shards_size(Path(item.path)),
            ))
    entries.sort(key=lambda e: e.order_key, reverse=True)
    return entries


@contextlib.contextmanager
def _index_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory / _INDEX_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_index(directory: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads((directory / INDEX_NAME).read_text())
    except (FileNotFoundError, ValueError, OSError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        return {}
    # A damaged record means "state unknown", never a crash: the index is only a cache.
    return {name: record for name, record in files.items()
            if isinstance(record, dict) and isinstance(record.get("meta", {}), dict)}


def update_index(directory: Path, changes: dict[str, dict[str, Any] | None]) -> None:
    """Apply ``changes`` (file name -> record, or ``None`` to forget it) to the index, atomically.

    Not fsynced: the index is a cache. After a power loss it may be stale or gone, which only turns states
    into "unverified" until the next ``verify``; two more fsyncs per save would buy nothing.
    """
    if not changes:
        return
    with _index_lock(directory):
        files = read_index(directory)
        for filename, record in changes.items():
            if record is None:
                files.pop(filename, None)
            else:
                files[filename] = record
        existing = {e.name for e in os.scandir(directory)}
        files = {k: v for k, v in files.items() if k in existing}
        tmp = directory / f"{INDEX_NAME}.{os.getpid()}{TEMP_SUFFIX}"
        with open(tmp, "w") as out:
            json.dump({"version": 1, "files": files}, out, separators=(",", ":"))
            out.flush()
        try:
            os.replace(tmp, directory / INDEX_NAME)
        except FileNotFoundError:  # a writer opening the directory swept it as a leftover; the index is a cache
            return


def index_record(size: int, mtime_ns: int, status: str, digest: str | None, meta: dict[str, Any] | None,
                 reason: str = "") -> dict[str, Any]:
    return {"size": size, "mtime_ns": mtime_ns, "status": status, "digest": digest, "meta": meta or {},
            "reason": reason}


def integrity_state(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> str:
    """``verified``, ``corrupt`` or ``unverified``, from the index alone."""
    record = index.get(entry.path.name)
    if not record or record.get("size") != entry.size or record.get("mtime_ns") != entry.mtime_ns:
        return "unverified"
    return "corrupt" if record.get("status") == "corrupt" else "verified"
