"""Mirror: a verified copy of each committed checkpoint in a second place (another disk, or S3-compatible storage).

After the writer commits a checkpoint, :class:`Mirror` (a thread of its own, never the training thread) copies
the file to the target and only then counts it as mirrored:

1. the bytes go to the target atomically (a local directory: a temporary name, fsync, rename; S3: one PUT or
   one multipart upload, which the store makes visible only when complete);
2. the target's bytes are read back and their digest compared with the digest sealed in the file, so what is
   checked is what a later download returns, not an ETag;
3. a small manifest (``NAME.mirror.json``: digest, size, summary) is written last. A checkpoint without its
   manifest does not exist for :func:`remote_checkpoints`, ``ckptio list``, ``verify`` or a resume.

Failures (store down, wrong credentials, bucket full) never stop training: the copy is retried with backoff,
each failure is logged and counted, and whatever is still unmirrored when the manager closes is named.
The mirror keeps its own retention (``mirror_keep``): the newest N batch checkpoints and every protected name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write, remove_leftovers
from .fileio import FileCheck, SavedCheckpoint, read_meta, verify_file
from .mirror_pending import clear_pending, pending
from .mirror_target import MirrorError, MirrorTarget
from .naming import parse_checkpoint_name, split_suffix
from .slim import is_slim

__all__ = [
    "LocalTarget",
    "Mirror",
    "MirrorError",
    "MirrorTarget",
    "RemoteEntry",
    "is_remote_url",
    "newest_verified",
    "open_target",
    "pull",
    "remote_checkpoints",
    "upload",
    "verify_remote",
]

log = logging.getLogger("ckptio")
MANIFEST_SUFFIX = ".mirror.json"
_COPY_CHUNK = 8 * 2**20
_STOP_WAIT = 180.0


class LocalTarget(MirrorTarget):
    """A directory (another disk, NFS); it holds the same files as the checkpoint directory, plus manifests,
    so ``ckptio list/verify DIR`` and ``--resume DIR/FILE`` work on it directly."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = directory
        self.url = str(directory)
        self.fsync = fsync

    def _ready(self) -> Path:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MirrorError(f"mirror {self.directory}: cannot create it ({exc.strerror or exc}); choose a writable "
                              "directory") from None
        return self.directory

    def put_file(self, key: str, source: Path) -> None:
        with open(source, "rb") as src, atomic_write(self._ready() / key, fsync=self.fsync) as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK)

    def get_file(self, key: str, destination: Path) -> None:
        shutil.copyfile(self.directory / key, destination)

    def put_bytes(self, key: str, data: bytes) -> None:
        with atomic_write(self._ready() / key, fsync=self.fsync) as out:
            out.write(data)

    def get_bytes(self, key: str) -> bytes:
        return (self.directory / key).read_bytes()

    def list_keys(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(self.directory)
                      if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / key).unlink()

    def check_copy(self, key: str) -> FileCheck:
        return verify_file(self.directory / key)  # the target's own bytes, read back from its disk

    def sweep(self) -> None:
        """Remove temporaries of copies cut short (a killed process); they were never visible."""
        if self.directory.is_dir():
            remove_leftovers(self.directory)


def is_remote_url(text: str) -> bool:
    return text.startswith(("s3://", "file://"))


def open_target(url: str, *, fsync: bool = True) -> MirrorTarget:
    """The target for ``url``: ``s3://bucket/prefix`` (needs boto3: ``pip install ckptio[s3]``), ``file:///path``
    or a plain directory path."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"mirror must be a directory or a URL such as s3://bucket/prefix, not {url!r}")
    if url.startswith("s3://"):
        from .mirror_s3 import S3Target  # only a user of S3 needs its client

        return S3Target(url)
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"mirror {url!r}: unsupported scheme; use a directory, file:///path or s3://bucket/prefix")
    return LocalTarget(Path(url.removeprefix("file://")), fsync=fsync)


@dataclass(frozen=True)
class RemoteEntry:
    """One checkpoint on a mirror, as its manifest describes it."""

    key: str
    name: str
    digest: str
    size: int
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def global_step(self) -> int:
        step = self.summary.get("global_step")
        return step if type(step) is int else -1

    @property
    def order_key(self) -> tuple[int, tuple[int, int], str]:
        return (self.global_step, parse_checkpoint_name(self.name) or (-1, -1), self.name)


def remote_checkpoints(target: MirrorTarget) -> list[RemoteEntry]:
    """The checkpoints on ``target`` whose copy completed (their manifest exists), newest first."""
    keys = set(target.list_keys())
    entries = []
    for manifest in sorted(k for k in keys if k.endswith(MANIFEST_SUFFIX)):
        key = manifest[: -len(MANIFEST_SUFFIX)]
        parts = split_suffix(key)
        if parts is None or key not in keys:
            continue
        try:
            record = json.loads(target.get_bytes(manifest))
            entries.append(RemoteEntry(key, parts[0], str(record["digest"]), int(record["size"]),
                                       record.get("summary") if isinstance(record.get("summary"), dict) else {}))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
            log.warning("mirror %s: ignoring %s, its manifest is unreadable (%s)", target.url, key, exc)
    entries.sort(key=lambda e: e.order_key, reverse=True)
    return entries


def upload(target: MirrorTarget, path: Path) -> RemoteEntry:
    """Copy one committed checkpoint file to ``target``, verify the target's bytes, then write its manifest.

    Raises :class:`MirrorError` (or ``OSError``) when any step fails; the manifest is then absent, so the
    half-done copy is invisible and the next try overwrites it.
    """
    seal, size = read_meta(path)
    if seal is None:
        raise MirrorError(f"{path} carries no digest (unsealed), so its copy could not be verified; not mirrored")
    key = path.name
    target.put_file(key, path)
    check = target.check_copy(key)
    if check.status != "verified" or check.digest != seal.digest:
        raise MirrorError(f"mirror {target.url}: the copy of {key} read back does not match the digest sealed in "
                          f"it ({check.status}: {check.reason or 'a different digest'}); it will be copied again")
    summary = seal.meta.get("summary") if isinstance(seal.meta.get("summary"), dict) else {}
    manifest = {"digest": seal.digest, "size": size, "summary": summary, "mirrored_at": time.time()}
    target.put_bytes(key + MANIFEST_SUFFIX, json.dumps(manifest, sort_keys=True).encode())
    return RemoteEntry(key, split_suffix(key)[0] if split_suffix(key) else key, seal.digest, size, summary)


def verify_remote(target: MirrorTarget, entry: RemoteEntry) -> FileCheck:
    """Re-read ``entry``'s bytes from the target; verified only if they match both their seal and the manifest."""
    check = target.check_copy(entry.key)
    if check.status == "verified" and check.digest != entry.digest:
        return FileCheck(check.path, "corrupt", f"its digest {check.digest} is not the one mirrored ({entry.digest})",
                         check.digest, check.meta, check.size)
    return check


def pull(target: MirrorTarget, entry: RemoteEntry, directory: Path, *, fsync: bool = True) -> Path:
    """Download ``entry`` into ``directory`` (atomically: it appears only once downloaded and verified)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / entry.key
    with tempfile.TemporaryDirectory(prefix=".ckptio-pull-", dir=directory) as scratch:
        path = Path(scratch) / entry.key
        target.get_file(entry.key, path)
        check = verify_file(path)
        if check.status != "verified" or check.digest != entry.digest:
            raise MirrorError(f"{target.url}/{entry.key}: the downloaded copy does not verify ({check.status}: "
                              f"{check.reason or 'a different digest than mirrored'}); not used")
        if fsync:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.replace(path, final)
    return final


def newest_verified(target: MirrorTarget, say: Any = log.info) -> RemoteEntry | None:
    """The newest checkpoint on ``target`` whose bytes verify; newer ones that do not are named and skipped."""
    for entry in remote_checkpoints(target):
        try:
            check = verify_remote(target, entry)
        except OSError as exc:
            say(f"mirror {target.url}: skipping {entry.key}: {exc}")
            continue
        if check.status == "verified" and not is_slim(check.meta or {}):
            return entry
        say(f"mirror {target.url}: skipping {entry.key}: {check.status} ({check.reason}); trying the previous one")
    return None


def plan_mirror_retention(entries: list[RemoteEntry], keep: int, protected_names: tuple[str, ...],
                          must_keep: str) -> list[RemoteEntry]:
    """Which mirrored checkpoints to delete: batch checkpoints beyond the newest ``keep`` (by training progress),
    never a protected name, never ``must_keep`` (the one just mirrored: what a resume from the mirror needs)."""
    periodic = [e for e in entries if e.name not in protected_names and parse_checkpoint_name(e.name) is not None]
    periodic.sort(key=lambda e: e.order_key, reverse=True)
    return [e for e in periodic[keep:] if e.key != must_keep]


@dataclass
class _Item:
    name: str
    path: Path
    attempts: int = 0
    not_before: float = 0.0


class Mirror:
    """Copies committed checkpoints to a target in a background thread, retrying failures with backoff."""

    def __init__(self, url: str, *, keep: int | None = None, protected_names: tuple[str, ...] = ("best_model",),
                 fsync: bool = True, retry_initial: float = 1.0, retry_max: float = 60.0,
                 target: MirrorTarget | None = None, local_directory: Path | None = None) -> None:
        self.target = target if target is not None else open_target(url, fsync=fsync)
        self.url = url
        self.keep = keep
        self.protected_names = protected_names
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.mirrored: list[str] = []
        """Names mirrored (and verified) by this mirror, oldest first."""
        self.failures = 0
        self.last_error: str | None = None
        self._queue: deque[_Item] = deque()
        self._busy: _Item | None = None
        self._changed = threading.Condition()
        self._stopping = False
        if isinstance(self.target, LocalTarget):
            self.target.sweep()
        self.local_directory = local_directory
        if local_directory is not None:  # left unmirrored by an earlier run: copy them first
            for file_name in sorted(pending(local_directory)):
                if (local_directory / file_name).is_file():
                    self._queue.append(_Item(split_suffix(file_name)[0] if split_suffix(file_name) else file_name,
                                             local_directory / file_name))
                else:
                    clear_pending(local_directory, file_name)
        self._thread = threading.Thread(target=self._run, name=f"ckptio-mirror:{url}", daemon=True)
        self._thread.start()

    def submit(self, saved: SavedCheckpoint) -> None:
        with self._changed:
            self._queue.append(_Item(saved.name, saved.path))
            self._changed.notify_all()

    @property
    def unmirrored(self) -> list[str]:
        with self._changed:
            return ([self._busy.name] if self._busy else []) + [item.name for item in self._queue]

    def wait_mirrored(self, name: str, timeout: float) -> bool:
        """Wait until ``name`` is mirrored (or no longer waiting to be); True if it was."""
        with self._changed:
            self._changed.wait_for(lambda: name in self.mirrored or not self._waiting(name), timeout)
            return name in self.mirrored

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every submitted checkpoint is mirrored; False if some were not within ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: self._busy is None and not self._queue, timeout)

    def close(self, timeout: float, *, finish_attempt: bool = True) -> list[str]:
        """Give pending copies up to ``timeout`` seconds, stop, and return the names left unmirrored.

        With ``finish_attempt`` the copy in progress, and the next one if it was never tried, still finish their
        attempt (bounded by the target's own timeouts; at most ``_STOP_WAIT`` seconds more); without it (a
        preempted run out of time) an attempt in progress is abandoned with the process: it was never visible.
        Closing again returns at once."""
        with self._changed:
            closed = self._stopping
        if closed:
            return self.unmirrored
        self.wait(timeout)
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout=_STOP_WAIT if finish_attempt else 0.0)
        left = self.unmirrored
        if left:
            log.warning("not mirrored to %s: %s (the local copies are intact; copy them by hand if the local disk "
                        "is going away)", self.url, ", ".join(left))
        return left

    def _waiting(self, name: str) -> bool:
        return (self._busy is not None and self._busy.name == name) or any(i.name == name for i in self._queue)

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    ready = bool(self._queue) and self._queue[0].not_before <= time.monotonic()
                    # Closing still gives a checkpoint never tried its one attempt, so that the run's end can
                    # say why it was not mirrored.
                    if self._stopping and not (ready and self._queue[0].attempts == 0):
                        return
                    if ready:
                        break
                    self._changed.wait(timeout=self._queue[0].not_before - time.monotonic() if self._queue else None)
                item = self._busy = self._queue.popleft()
            outcome = self._copy(item)
            with self._changed:
                self._busy = None
                if outcome is not None:
                    if outcome == "mirrored":
                        self.mirrored.append(item.name)
                    if self.local_directory is not None:
                        clear_pending(self.local_directory, item.path.name)
                else:
                    item.attempts += 1
                    item.not_before = time.monotonic() + min(self.retry_max,
                                                              self.retry_initial * 2 ** (item.attempts - 1))
                    self._queue.appendleft(item)  # in order: a resume wants the newest, but not a gap before it
                self._changed.notify_all()

    def _copy(self, item: _Item) -> str | None:
        """One attempt: ``mirrored``, ``gone`` (deleted locally first: nothing left to copy) or None (failed)."""
        try:
            upload(self.target, item.path)
        except FileNotFoundError:
            if not item.path.exists():  # local retention deleted it first: there is nothing left to copy
                log.warning("could not mirror %s: it was deleted locally before it was copied", item.path.name)
                return "gone"
            self._failed(item, MirrorError(f"{self.url}: not found (does the bucket or directory exist?)"))
            return None
        except Exception as exc:  # never stop training; retried with backoff
            self._failed(item, exc)
            return None
        log.info("mirrored %s to %s (verified)", item.path.name, self.url)
        if self.keep is not None:
            self._retain(item.path.name)
        return "mirrored"

    def _failed(self, item: _Item, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("mirroring %s to %s failed (attempt %d, retrying): %s", item.name, self.url, item.attempts + 1,
                    exc)

    def _retain(self, just_mirrored: str) -> None:
        assert self.keep is not None
        try:
            entries = remote_checkpoints(self.target)
            for entry in plan_mirror_retention(entries, self.keep, self.protected_names, just_mirrored):
                self.target.delete(entry.key + MANIFEST_SUFFIX)  # invisible first, then gone
                self.target.delete(entry.key)
                log.info("deleted %s from the mirror %s (mirror_keep=%d)", entry.key, self.url, self.keep)
        except Exception as exc:  # the copies are safe; a failed delete is retried after the next copy
            log.warning("mirror %s: retention failed: %s", self.url, exc)


def _global_step(path: Path) -> int:
    try:
        seal, _ = read_meta(path)
    except (OSError, ValueError):
        return -1
    summary = seal.meta.get("summary") if seal is not None else None
    step = summary.get("global_step") if isinstance(summary, dict) else None
    return step if type(step) is int else -1


def newer_from_mirror(local: Path | None, target: MirrorTarget, directory: Path, say: Any = log.info) -> Path | None:
    """``local`` (the newest local checkpoint that verifies, or None), unless the mirror holds a newer one by
    training progress: then that one, downloaded into ``directory`` and verified first. A mirrored copy that does
    not verify is named and the previous one tried; an unreachable mirror leaves ``local``."""
    local_step = _global_step(local) if local is not None else -1
    try:
        entries = remote_checkpoints(target)
    except Exception as exc:
        say(f"--resume auto: the mirror {target.url} could not be listed ({exc}); using the local checkpoints only")
        return local
    for entry in entries:
        if entry.global_step <= local_step:
            break
        try:
            path = pull(target, entry, directory)
        except Exception as exc:
            say(f"--resume auto: skipping {entry.key} on the mirror {target.url}: {exc}; trying the previous one")
            continue
        say(f"--resume auto: {entry.key} (global step {entry.global_step}) from the mirror {target.url} is newer "
            f"than the local checkpoints; downloaded to {path} and verified")
        return path
    return local


# -- what local retention must wait for --------------------------------------------------------------------------
# The writer (thread or process) marks each committed checkpoint as waiting for the mirror before it applies
# retention; the mirror clears the mark once the copy is verified. An empty file per checkpoint, created and
# unlinked atomically, needs no lock between the processes. Marks left by a run that ended first are copied by the
# next run with the same mirror.
