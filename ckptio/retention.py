"""Which checkpoints to delete: small pure policies over a directory listing (newest first).

Nothing here touches the disk. The manager and ``ckptio clean`` apply the plan, and only after the newest
checkpoint is durable, so a crash at any point leaves a loadable newest checkpoint.

The one rule for what may be deleted (:func:`owned_by_retention`): retention owns exactly the periodic
checkpoints, named ``checkpoint_epoch_{E}_batch_{B}`` (:func:`ckptio.naming.parse_checkpoint_name`), less any
name in ``protected_names``. Everything else in the directory - ``best_model``, a hand-saved ``final``,
pretrained weights copied there - is never deleted by ``keep_count``, ``disk_budget``, ``min_free`` or
``ckptio clean``, though it counts towards the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .naming import CheckpointEntry

__all__ = ["RetentionPlan", "beyond_newest", "newest_owned", "over_budget", "owned_by_retention",
           "periodic_newest_first", "plan_retention"]


@dataclass(frozen=True)
class RetentionPlan:
    delete: list[CheckpointEntry]
    keep: list[CheckpointEntry]
    bytes_over_budget: int
    """How far the kept files still exceed the budget (0 when it holds): only never-deleted files remain."""


def owned_by_retention(entry: CheckpointEntry) -> bool:
    """Whether retention may ever delete ``entry``: a periodic checkpoint, not protected (see the module doc)."""
    return not entry.protected and entry.epoch_batch is not None


def periodic_newest_first(entries: Sequence[CheckpointEntry]) -> list[CheckpointEntry]:
    """The periodic checkpoints of a listing, newest first (:attr:`ckptio.naming.CheckpointEntry.order_key`).

    Newest means written last, as the directory's index records it, never by modification time alone: after the
    clock was stepped back, older files have later mtimes, and ordering by them would delete or slim the
    checkpoint just written. Only files the index does not know are ordered by mtime, after those it does.
    """
    periodic = [e for e in entries if owned_by_retention(e)]
    return sorted(periodic, key=lambda e: e.order_key, reverse=True)


def newest_owned(entries: Sequence[CheckpointEntry]) -> Path | None:
    """The newest periodic checkpoint of a listing: what a resume needs, never deleted."""
    return next((e.path for e in periodic_newest_first(entries)), None)


def _deletable(entry: CheckpointEntry, must_keep: Path | None) -> bool:
    return owned_by_retention(entry) and entry.path != must_keep


def beyond_newest(entries: Sequence[CheckpointEntry], keep_count: int, must_keep: Path | None) -> list[CheckpointEntry]:
    """Periodic checkpoints past the newest ``keep_count`` (protected ones and ``must_keep`` excluded)."""
    periodic = periodic_newest_first(entries)
    return [e for e in periodic[keep_count:] if _deletable(e, must_keep)]


def over_budget(entries: Sequence[CheckpointEntry], budget: int, must_keep: Path | None,
                reserve: int = 0) -> list[CheckpointEntry]:
    """Oldest deletable checkpoints to remove until the rest plus ``reserve`` bytes fit in ``budget``."""
    total = sum(e.total_size for e in entries) + reserve
    chosen = []
    for entry in reversed(periodic_newest_first(entries)):  # oldest first; only periodic ones are ever deleted
        if total <= budget:
            break
        if _deletable(entry, must_keep):
            chosen.append(entry)
            total -= entry.total_size
    return chosen


def plan_retention(entries: Sequence[CheckpointEntry], *, keep_count: int | None = None, budget: int | None = None,
                   must_keep: Path | None = None, reserve: int = 0) -> RetentionPlan:
    """Compose the policies: first the count, then the byte budget on what remains.

    ``must_keep`` is the newest valid checkpoint (what a resume needs); ``reserve`` counts bytes about to be
    written, for making room before a save, or on disk outside any checkpoint (shards of saves in progress).
    """
    delete: list[CheckpointEntry] = []
    if keep_count is not None:
        delete += beyond_newest(entries, keep_count, must_keep)
    remaining = [e for e in entries if e not in delete]
    if budget is not None:
        delete += over_budget(remaining, budget, must_keep, reserve)
        remaining = [e for e in entries if e not in delete]
    excess = 0 if budget is None else max(0, sum(e.total_size for e in remaining) + reserve - budget)
    return RetentionPlan(delete=delete, keep=remaining, bytes_over_budget=excess)
