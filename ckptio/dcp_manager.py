"""``ShardedCheckpointManager``: periodic sharded (DCP) checkpoints with ckptio's retention rules.

Each save is one ``ckptio.dcp`` checkpoint directory ``DIRECTORY/NAME``, written by every rank through
``dcp.async_save`` (or ``dcp.save``) and committed by the coordinator's rename. After a save is committed, the
coordinator (rank 0) applies ``keep_count`` and ``disk_budget`` over the DCP directories, with the rules of
:mod:`ckptio.retention`: only periodic checkpoints (``checkpoint_epoch_E_batch_B``) are deleted, never the newest
committed one, and never a save in flight (it is a hidden staging directory until its commit, not a checkpoint).
With ``min_free`` it makes room before each save the same way. A name that is not periodic (``best_model``) is
saved again by committing the new directory under a hidden name and swapping the two in one rename.

A failed save raises :class:`~ckptio.CheckpointWriteError` on the next ``save()``, ``wait()`` or ``close()`` on
every rank alike: DCP broadcasts the coordinator's commit outcome, so ranks never disagree on whether a
checkpoint was committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .atomic import fsync_directory, temp_name
from .config import parse_size
from .dcp import Reader, Writer, checkpoint_entries, delete_dcp_directory, remove_dcp_leftovers, verify_directory
from .errors import CheckpointWriteError, InsufficientSpaceError
from .naming import parse_checkpoint_name, validate_name
from .retention import plan_retention

__all__ = ["ShardedCheckpointManager", "latest"]


def latest(directory: str | os.PathLike[str]) -> Path | None:
    """The newest committed checkpoint directory in ``directory`` whose every item verifies, or ``None``.

    The one answer to "what does ``--resume auto`` resume": a newer directory that is damaged is passed over
    for the previous one.
    """
    if not Path(directory).is_dir():
        return None
    for entry in checkpoint_entries(directory):
        if verify_directory(entry.path).ok:
            return entry.path
    return None


class ShardedCheckpointManager:
    """Sharded checkpoints in ``directory``, one DCP directory per save.

    Args:
        directory: where the checkpoint directories live (created if needed).
        keep_count: periodic checkpoints to keep (``None``: all). Must be at least 1.
        disk_budget: bytes (or ``"2GB"``) the checkpoint directories may take; the oldest periodic ones go first.
        min_free: bytes (or ``"5GB"``) the volume must keep free after a save: before each save, the oldest
            periodic checkpoints (never the newest) are deleted until the save fits; if it cannot, the save
            raises :class:`~ckptio.InsufficientSpaceError` on every rank and nothing is written.
        async_save: save through ``dcp.async_save`` (returns after the copy into reused host buffers) or
            ``dcp.save`` (returns when committed).
        compression: ``None`` or ``"zstd"``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_count: int | None = None,
                 disk_budget: int | str | None = None, min_free: int | str | None = None, async_save: bool = True,
                 compression: str | None = None) -> None:
        if keep_count is not None and (type(keep_count) is not int or keep_count < 1):
            raise ValueError(f"keep_count={keep_count!r}: keep at least 1 checkpoint (the newest is what a resume "
                             "needs), or None to keep all")
        self.directory = Path(directory)
        self.keep_count = keep_count
        self.disk_budget = parse_size(disk_budget, what="disk_budget")
        self.min_free = parse_size(min_free, what="min_free")
        self.async_save = async_save
        self._writer = Writer(self.directory / ".unused", compression=compression, cache_staged_state_dict=True)
        self._future: Future[Any] | None = None
        self._pending_name: str | None = None
        self._error: BaseException | None = None
        self._closed = False
        # DCP's background save runs collectives (plan, commit) while training runs its own: on one process group
        # they would interleave and mismatch, so saves get a group of their own (gloo: it carries CPU objects).
        self._group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_dcp_leftovers(self.directory)  # saves that crashed before this run: their locks are gone
            for stale in self.directory.glob(".*" + _NEXT_SUFFIX):  # a replacement that crashed before its swap
                delete_dcp_directory(stale)
        _barrier()

    def save(self, state: dict[str, Any], *, name: str) -> None:
        """Start saving ``state`` (a DCP state dict: DTensors, tensors, plain values) as ``directory/name``.

        A periodic name (``checkpoint_epoch_E_batch_B``) must be new. Any other name (``best_model``) may exist:
        the new directory is committed beside it and the two are swapped in one atomic rename, so that a crash
        leaves either the old one or the new one under the name, never neither.
        """
        self._check_open()
        validate_name(name)
        self.wait()  # one save in flight: the next copy would overwrite the host buffers it is written from
        if self.min_free is not None:
            self._make_room(state)
        target = self.directory / name
        if not parse_checkpoint_name(name):
            target = self.directory / f".{name}{_NEXT_SUFFIX}"
        self._writer.reset(target)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
            try:
                # DCP plans in the caller (async_save included): a refused plan raises here, on every rank.
                if self.async_save:
                    response = dcp.async_save(state, storage_writer=self._writer, process_group=self._group)
                    self._future = getattr(response, "upload_completion", response)
                    self._pending_name = name
                    return
                dcp.save(state, storage_writer=self._writer, process_group=self._group)
            except (Exception, CheckpointException) as exc:
                raise CheckpointWriteError(f"saving {self.directory / name} failed: {exc}") from exc
        self._after_commit(name)

    def wait(self) -> None:
        """Wait for the save in flight; raise its error (once) if it failed."""
        future, name = self._future, self._pending_name
        self._future = self._pending_name = None
        if future is not None:
            try:
                future.result()
            except (Exception, CheckpointException) as exc:  # DCP's error is a BaseException
                self._error = exc
            else:
                assert name is not None
                self._after_commit(name)
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointWriteError(f"a background save into {self.directory} failed: {error}") from error

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._writer.close()
            if self._group is not None:
                dist.destroy_process_group(self._group)
                self._group = None

    def __enter__(self) -> ShardedCheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checkpoints(self) -> list[Path]:
        """Committed checkpoint directories, newest first."""
        return [entry.path for entry in checkpoint_entries(self.directory)]

    def latest(self) -> Path | None:
        """The newest checkpoint whose every item verifies (what ``--resume auto`` resumes from), or ``None``."""
        return latest(self.directory)

    def load(self, state: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Path:
        """Load ``path`` (default: :meth:`latest`) into ``state`` in place, at this run's process count."""
        target = Path(path) if path is not None else self.latest()
        if target is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint that verifies")
        dcp.load(state, storage_reader=Reader(target), process_group=self._group)
        return target

    def _after_commit(self, name: str) -> None:
        if not parse_checkpoint_name(name):
            if _rank() == 0:
                _swap_into_place(self.directory / f".{name}{_NEXT_SUFFIX}", self.directory / name)
            _barrier(self._group)
        if self.keep_count is None and self.disk_budget is None:
            return
        if _rank() == 0:
            entries = checkpoint_entries(self.directory)
            plan = plan_retention(entries, keep_count=self.keep_count, budget=self.disk_budget,
                                  must_keep=self.directory / name)
            for entry in plan.delete:
                delete_dcp_directory(entry.path)
        # Every rank returns from save()/wait() seeing the same directory: none lists a checkpoint that rank 0
        # is still deleting.
        _barrier(self._group)

    def _make_room(self, state: dict[str, Any]) -> None:
        """Rank 0 deletes the oldest periodic checkpoints until this save and ``min_free`` fit; all ranks agree."""
        need = torch.tensor([_tensor_bytes(state)], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(need, group=self._group)  # every rank writes its own part
        verdict = [None]
        if _rank() == 0:
            verdict = [self._free_up(int(need.item()))]
        if self._group is not None:
            dist.broadcast_object_list(verdict, src=0, group=self._group)
        if verdict[0] is not None:
            raise InsufficientSpaceError(errno.ENOSPC, verdict[0])

    def _free_up(self, save_bytes: int) -> str | None:
        assert self.min_free is not None
        needed = save_bytes + self.min_free
        free = _free_bytes(self.directory)
        entries = checkpoint_entries(self.directory)
        periodic = [e for e in entries if parse_checkpoint_name(e.name)]
        victims = []
        for entry in reversed(periodic[1:]):  # oldest first; the newest periodic one is what a resume needs
            if free >= needed:
                break
            victims.append(entry)
            free += entry.size
        if free < needed:
            return (f"{self.directory}: a save needs about {save_bytes} bytes and min_free keeps {self.min_free}, "
                    f"but only {_free_bytes(self.directory)} bytes are free even after deleting every "
                    "periodic checkpoint but the newest; free space or lower min_free")
        for entry in victims:
            delete_dcp_directory(entry.path)
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ShardedCheckpointManager is closed; create a new one")


_NEXT_SUFFIX = ".next-ckptio"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _swap_into_place(new: Path, final: Path) -> None:
    """Put the committed directory ``new`` under ``final``'s name; the one it replaces is deleted.

    With Linux's ``renameat2(RENAME_EXCHANGE)`` the two trade places in one step. Without it, the old one is
    first renamed to a hidden leftover name, so a crash between the two renames leaves the old checkpoint
    aside (swept at the next start) and the new one under its hidden name (deleted at the next start).
    """
    if not os.path.lexists(final):
        os.rename(new, final)
    else:
        swapped = False
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            swapped = libc.renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(final),
                                     _RENAME_EXCHANGE) == 0
        if swapped:
            delete_dcp_directory(new)  # now holds the previous one
        else:
            aside = final.parent / temp_name(final.name)
            os.rename(final, aside)
            os.rename(new, final)
            shutil.rmtree(aside, ignore_errors=True)
    fsync_directory(final.parent)


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _tensor_bytes(state: Any) -> int:
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, list | tuple):
        return sum(_tensor_bytes(value) for value in state)
    if isinstance(state, torch.Tensor):
        local = getattr(state, "_local_tensor", state)  # a DTensor: this rank's shard
        return local.numel() * local.element_size()
    return 0


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
