"""Slim old checkpoints to their model weights, keeping the newest ones complete.

A resumable checkpoint holds the model *and* the optimizer state (for Adam, two more copies of every weight),
so it is about three times the size of the weights alone. Only the newest checkpoints are ever resumed from;
older ones are kept to compare or to deploy, and for that the weights suffice. :func:`slim_checkpoint`
rewrites one checkpoint as a new sealed file through the same write path as every save (temporary file,
fsync, rename, digest), verifies it, and records ``"slim"`` in its metadata, so that ``list`` and ``info``
show it and a trainer refuses to resume from it. :func:`plan_slimming` says which files to slim.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .atomic import TEMP_SUFFIX, fsync_directory, replace_if_unchanged
from .dir_index import index_record, read_index, update_index
from .fileio import load, read_meta, verify_file, write_checkpoint
from .naming import CheckpointEntry, scan
from .records import SlimResult
from .retention import periodic_newest_first
from .snapshot import BufferSlot, walk_tensors
from .suffixes import format_of

__all__ = ["SlimResult", "UnslimmableError", "is_slim", "plan_slimming", "slim_checkpoint", "slim_older_checkpoints"]

SLIM_KEY = "slim"
"""Key of the record in a checkpoint's user metadata that marks it slim (what was dropped, the size before)."""


class UnslimmableError(ValueError):
    """What a checkpoint's own content makes impossible to slim (no weights under the kept keys, not a dict,
    a structure ckptio never writes): the same file gets the same answer every time, so the writer remembers it
    in the index rather than reading the file again at each save."""


UNSLIMMABLE_KEY = "unslimmable"
"""Key of an index record holding why that file (at that size and mtime) cannot be slimmed."""


def is_slim(meta: dict[str, Any] | None) -> bool:
    """Whether a checkpoint's seal metadata (``read_meta(path)[0].meta`` or an index record's ``meta``) marks
    it slim."""
    user = (meta or {}).get("user")
    return isinstance(user, dict) and isinstance(user.get(SLIM_KEY), dict)


def plan_slimming(entries: Sequence[CheckpointEntry], keep_full: int, slim_names: set[str], *,
                  keep_count: int | None = None) -> list[CheckpointEntry]:
    """The periodic checkpoints to slim: all but the newest ``keep_full`` of them, except those already slim.

    ``entries`` newest first (as :func:`ckptio.naming.scan` returns them). Only periodic checkpoints
    (``checkpoint_epoch_E_batch_B``) are slimmed; protected ones (``best_model``) and sharded ones (their
    optimizer state lives in separate shard files) never are. With retention's ``keep_count`` the oldest kept
    checkpoint is left alone: the next save's retention deletes it, so rewriting it would be wasted work.
    """
    if keep_full < 1:
        raise ValueError(f"keep_full must be at least 1 (the newest checkpoint is what a resume needs), "
                         f"got {keep_full}")
    periodic = periodic_newest_first(entries)  # in written order: an mtime may lie (a clock stepped back)
    if keep_count is not None:
        periodic = periodic[: keep_count - 1]
    return [e for e in periodic[keep_full:] if not e.shard_bytes and e.path.name not in slim_names]


def slim_checkpoint(path: str | os.PathLike[str], *, keep: Sequence[str] = ("model_state_dict",),
                    fsync: bool = True) -> SlimResult:
    """Replace the checkpoint at ``path`` by one holding only the tensors under the top-level keys ``keep``.

    Top-level entries without tensors (epoch, batch, losses, configuration...) stay, so listings still show
    them; every other entry holding tensors (optimizer, RNG states, data order) is dropped. The original is read
    with its digest checked. The new file is written through ckptio's write path into a hidden temporary
    directory beside it, sealed, verified and compared tensor by tensor with the original, and only then renamed
    over it: a reader sees the old file or the verified new one, never a mix, and a crash leaves a temporary
    directory that the next writer sweeps. The modification time is kept, so that the file keeps its place in
    the checkpoints' order (retention and ``list`` sort by it).

    Raises :class:`ValueError` for a file that is not a dict checkpoint, is sharded, or is already slim, and
    :class:`~ckptio.CorruptCheckpointError` when the original does not verify (it is then left alone).
    """
    path = Path(path)
    seal, before = read_meta(path)
    if seal is None:
        raise UnslimmableError(f"{path} carries no ckptio seal; only checkpoints written by ckptio are slimmed")
    meta = seal.meta
    if is_slim(meta):
        raise ValueError(f"{path} is already slim")
    if meta.get("shards"):
        raise UnslimmableError(f"{path} is a sharded checkpoint; its shards are not slimmed")
    original = path.stat()
    original_mtime = original.st_mtime_ns
    state = load(path, map_location="cpu")
    if not isinstance(state, dict):
        raise UnslimmableError(f"{path} does not hold a dict of entries; nothing to slim")
    _refuse_shared_containers(path, state)
    _refuse_overlapping_tensors(path, state)
    missing = [k for k in keep if k not in state]
    if missing:
        raise UnslimmableError(f"{path} has no {', '.join(missing)}; it cannot be slimmed to it")
    kept = {k: v for k, v in state.items() if k in keep or next(walk_tensors(v), None) is None}
    dropped = tuple(str(k) for k in state if k not in kept)
    user = dict(meta["user"]) if isinstance(meta.get("user"), dict) else {}
    user[SLIM_KEY] = {"dropped": list(dropped), "bytes_before": before}
    # The same file name inside the workspace: the format is read from the name, and torch names its records
    # after it.
    workspace = path.parent / f".{path.name}.slim.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    workspace.mkdir(mode=0o700)
    try:
        candidate = workspace / path.name
        fmt, compression = format_of(path)
        saved = write_checkpoint(candidate, BufferSlot().take(kept), name=meta.get("name", path.stem),
                                 fmt=fmt, compression=compression, fsync=fsync, user_meta=user)
        check = verify_file(candidate)
        if check.status != "verified" or check.digest != saved.digest:
            raise ValueError(f"the slimmed copy of {path} does not verify ({check.status}: {check.reason}); "
                             "the original is kept")
        reread = load(candidate, map_location="cpu")
        for key in keep:
            _assert_same_tensors(state[key], reread[key], f"{path}: {key}")
        os.utime(candidate, ns=(original_mtime, original_mtime))
        # Only over the very file that was read: one deleted meanwhile (`ckptio clean`) must not come back.
        replace_if_unchanged(candidate, path, original)
        if fsync:
            fsync_directory(path.parent)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    info = path.stat()
    try:
        update_index(path.parent, {path.name: index_record(info.st_size, info.st_mtime_ns, "verified", saved.digest,
                                                           saved.meta)})
    except OSError:  # the index is a cache; the file carries its own digest and metadata
        pass
    return SlimResult(path=path, bytes_before=before, bytes_after=info.st_size, dropped=dropped)


def slim_older_checkpoints(directory: str | os.PathLike[str], keep_full: int, *, keep_count: int | None = None,
                           fsync: bool = True, protected_names: tuple[str, ...] = ("best_model",),
                           on_error: Callable[[Path, Exception], None] | None = None) -> list[SlimResult]:
    """Slim every periodic checkpoint of ``directory`` but the newest ``keep_full`` (see :func:`plan_slimming`).

    Run it where nothing else writes or deletes in the directory at the same time (ckptio's writer runs it after
    each save, after retention: ``CheckpointOptions.keep_full``). A file deleted meanwhile is passed over. A file
    that cannot be slimmed stays as it was: without ``on_error`` the error is raised at once; with it, each one is
    handed to ``on_error(path, error)`` and the other files are still slimmed (and returned).
    """
    directory = Path(directory)
    index = read_index(directory)
    slim_names = {name for name, record in index.items() if is_slim(record.get("meta"))}
    done = []
    for entry in plan_slimming(scan(directory, protected_names), keep_full, slim_names, keep_count=keep_count):
        record = index.get(entry.path.name)
        if (record is not None and isinstance(record.get(UNSLIMMABLE_KEY), str)
                and (record["size"], record["mtime_ns"]) == (entry.size, entry.mtime_ns)):
            continue  # told once already; the file has not changed since
        try:
            seal, _ = read_meta(entry.path)  # the index is a cache: the file's own metadata decides
            if seal is None or is_slim(seal.meta) or seal.meta.get("shards"):
                continue
            done.append(slim_checkpoint(entry.path, fsync=fsync))
        except (FileNotFoundError, FileExistsError):  # deleted (retention, `ckptio clean`) or replaced meanwhile
            continue
        except UnslimmableError as exc:
            _remember_unslimmable(entry, record, str(exc))
            if on_error is None:
                raise
            on_error(entry.path, exc)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(entry.path, exc)
    return done


def _remember_unslimmable(entry: CheckpointEntry, record: dict[str, Any] | None, reason: str) -> None:
    """Record in the index that ``entry``, as it is now, cannot be slimmed (the index is a cache: best effort)."""
    if record is None or (record["size"], record["mtime_ns"]) != (entry.size, entry.mtime_ns):
        record = index_record(entry.size, entry.mtime_ns, "unverified", None, None)
    try:
        update_index(entry.path.parent, {entry.path.name: {**record, UNSLIMMABLE_KEY: reason[:500]}})
    except OSError:
        pass


def _refuse_shared_containers(path: Path, state: Any) -> None:
    """Refuse a state in which one dict, list or tuple is reached twice (or contains itself).

    Every other step walks the state path by path; a pickle can share containers, so a 2.6 KB file of 60 levels
    of ``[x, x]`` has 2**60 paths and hung the writer. ckptio builds every container it saves afresh, so its
    files never share one; this walk visits each container once, its cost bounded by the file's size.
    """
    seen: set[int] = set()
    pending = [state]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if id(node) in seen:
            raise UnslimmableError(f"{path} holds a container reached by two paths (shared or nested in itself); "
                                   "ckptio never writes such a file, so it is not slimmed")
        seen.add(id(node))
        pending.extend(children)


def _refuse_overlapping_tensors(path: Path, state: Any) -> None:
    """Refuse a state whose tensors need more bytes than the storages they view: ckptio writes every tensor with
    bytes of its own, and rewriting overlapping ones copies each (a 2 KB file holding zeros(1).expand(250M) was
    rewritten as 1 GB, 2.1 GB RSS; 1,000 shifted views of one 20 MB storage would be 20 GB)."""
    views: set[tuple[Any, ...]] = set()
    storages: dict[int, int] = {}
    needed = 0
    for tensor in walk_tensors(state):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in views:
            continue  # the same tensor twice (tied weights) is written once
        views.add(key)
        storages[storage.data_ptr()] = storage.nbytes()
        needed += tensor.numel() * tensor.element_size()
    if needed > sum(storages.values()):
        raise UnslimmableError(f"{path} holds tensors whose elements overlap ({needed} bytes of elements in "
                         f"{sum(storages.values())} bytes of storage); ckptio never writes such a file, so it is "
                         "not slimmed")


def _assert_same_tensors(expected: Any, actual: Any, where: str) -> None:
    want, got = list(walk_tensors(expected)), list(walk_tensors(actual))
    if len(want) != len(got) or not all(
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(want, got, strict=True)):
        raise ValueError(f"{where} changed while slimming")
