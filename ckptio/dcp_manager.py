"""``ShardedCheckpointManager``: periodic sharded (DCP) checkpoints with ckptio's retention rules.

Each save is one ``ckptio.dcp`` checkpoint directory ``DIRECTORY/NAME``, written by every rank through
``dcp.async_save`` (or ``dcp.save``) and committed by the coordinator's rename. After a save is committed, the
coordinator (rank 0) applies ``keep_count`` and ``disk_budget`` over the DCP directories, with the rules of
:mod:`ckptio.retention`: only periodic checkpoints (``checkpoint_epoch_E_batch_B``) are deleted, never the newest
committed one, and never a save in flight (it is a hidden staging directory until its commit, not a checkpoint).

A failed save raises :class:`~ckptio.CheckpointWriteError` on the next ``save()``, ``wait()`` or ``close()`` on
every rank alike: DCP broadcasts the coordinator's commit outcome, so ranks never disagree on whether a
checkpoint was committed.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .config import parse_size
from .dcp import Reader, Writer, checkpoint_entries, delete_dcp_directory, remove_dcp_leftovers, verify_directory
from .errors import CheckpointWriteError
from .naming import validate_name
from .retention import plan_retention

__all__ = ["ShardedCheckpointManager"]


class ShardedCheckpointManager:
    """Sharded checkpoints in ``directory``, one DCP directory per save.

    Args:
        directory: where the checkpoint directories live (created if needed).
        keep_count: periodic checkpoints to keep (``None``: all). Must be at least 1.
        disk_budget: bytes (or ``"2GB"``) the checkpoint directories may take; the oldest periodic ones go first.
        async_save: save through ``dcp.async_save`` (returns after the copy into reused host buffers) or
            ``dcp.save`` (returns when committed).
        compression: ``None`` or ``"zstd"``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_count: int | None = None,
                 disk_budget: int | str | None = None, async_save: bool = True,
                 compression: str | None = None) -> None:
        if keep_count is not None and (type(keep_count) is not int or keep_count < 1):
            raise ValueError(f"keep_count={keep_count!r}: keep at least 1 checkpoint (the newest is what a resume "
                             "needs), or None to keep all")
        self.directory = Path(directory)
        self.keep_count = keep_count
        self.disk_budget = parse_size(disk_budget, what="disk_budget")
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
        _barrier()

    def save(self, state: dict[str, Any], *, name: str) -> None:
        """Start saving ``state`` (a DCP state dict: DTensors, tensors, plain values) as ``directory/name``."""
        self._check_open()
        validate_name(name)
        self.wait()  # one save in flight: the next copy would overwrite the host buffers it is written from
        self._writer.reset(self.directory / name)
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
        for path in self.checkpoints():
            if verify_directory(path).ok:
                return path
        return None

    def load(self, state: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Path:
        """Load ``path`` (default: :meth:`latest`) into ``state`` in place, at this run's process count."""
        target = Path(path) if path is not None else self.latest()
        if target is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint that verifies")
        dcp.load(state, storage_reader=Reader(target), process_group=self._group)
        return target

    def _after_commit(self, name: str) -> None:
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

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ShardedCheckpointManager is closed; create a new one")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier(group: Any = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
