"""Which checkpoint is the newest valid one: the one answer that resuming, ``ckptio clean`` and retention share.

Two orders exist, because two questions are asked:

* ``order="written"``: the order ckptio wrote the directory's periodic checkpoints in, as its index records it
  (files it did not record come first, by mtime). An mtime can lie after the clock was stepped back, the
  written order cannot. This is what retention keeps and ``clean`` reports.
* ``order="progress"``: by the training progress each file records (``summary["global_step"]``), then mtime.
  A trainer resumes from the furthest point, whatever the file is called (``best_model`` and hand-saved names
  count too).

A candidate counts only if its digest verifies; newer ones that do not are passed to ``on_skip`` and passed
over, so a damaged newest file falls back to the previous one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .dir_index import read_index
from .fileio import read_meta, verify_file
from .naming import CheckpointEntry, integrity_state, scan
from .retention import owned_by_retention
from .slim import is_slim

__all__ = ["Skipped", "latest", "progress_key"]


@dataclass(frozen=True)
class Skipped:
    """A newer checkpoint that :func:`latest` passed over, and why."""

    path: Path
    status: str
    """``corrupt``, ``unsealed`` (no digest, with ``sealed_only``), ``slim`` (weights only, with ``full_only``)
    or another status of :class:`ckptio.FileCheck`."""
    reason: str


def latest(directory: str | Path, *, order: Literal["written", "progress"] = "written",
           periodic_only: bool = True, sealed_only: bool = False, full_only: bool = False,
           entries: Sequence[CheckpointEntry] | None = None,
           on_skip: Callable[[Skipped], None] | None = None) -> Path | None:
    """The newest checkpoint in ``directory`` that can be loaded, ``None`` if there is none.

    ``order``: ``"written"`` (ckptio's written order) or ``"progress"`` (the recorded ``global_step``), see the
    module doc. ``periodic_only``: only ``checkpoint_epoch_E_batch_B`` files count (``best_model`` and other names
    never do). ``sealed_only``: a file without a digest (written by plain ``torch.save``) does not count.
    ``full_only``: a checkpoint slimmed to its weights (``keep_full``) does not count: it cannot be resumed.
    ``entries``: the listing to choose from (default :func:`ckptio.scan` of ``directory``; DCP checkpoint
    directories, suffix ``"/"``, may be among them). ``on_skip`` hears of every newer candidate passed over.
    """
    directory = Path(directory)
    listing = list(entries) if entries is not None else scan(directory, ())
    candidates = [e for e in listing if owned_by_retention(e)] if periodic_only else listing
    if order == "progress":
        index = read_index(directory)
        candidates = sorted(candidates, key=lambda e: progress_key(e, index), reverse=True)
    else:
        candidates = sorted(candidates, key=lambda e: e.order_key, reverse=True)
    for entry in candidates:
        skipped = _unusable(entry, sealed_only=sealed_only, full_only=full_only)
        if skipped is None:
            return entry.path
        if on_skip is not None:
            on_skip(skipped)
    return None


def _unusable(entry: CheckpointEntry, *, sealed_only: bool, full_only: bool) -> Skipped | None:
    if entry.suffix == "/":  # a DCP checkpoint directory: imported only when one is met (it imports torch's DCP)
        from .dcp import verify_directory

        report = verify_directory(entry.path)
        return None if report.ok else Skipped(entry.path, "corrupt", "its DCP files do not verify")
    check = verify_file(entry.path)
    if check.status == "verified" and full_only and is_slim(check.meta):
        return Skipped(entry.path, "slim", "it holds the model weights only")
    if check.status == "verified" or (check.status == "unsealed" and not sealed_only):
        return None
    return Skipped(entry.path, check.status, check.reason)


def progress_key(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """``(global_step, mtime)`` of a checkpoint, from the directory index or from the file's own trailer.

    The index is a cache: its record counts only for the exact file it was made for (same size and mtime), so
    a stale or planted record cannot make an older checkpoint look newest. Whatever the file's metadata holds
    (a ``summary`` that is not a dict included) ranks it, never raises.
    """
    path = entry.path
    summary = None
    if integrity_state(entry, index) != "unverified":
        summary = index[path.name].get("meta", {}).get("summary")
    if summary is None:
        try:
            seal, _ = read_meta(path)
            summary = seal.meta.get("summary", {}) if seal else {}
        except (ValueError, OSError):
            summary = {}
    step = summary.get("global_step") if isinstance(summary, dict) else None
    return (step if type(step) is int else -1, entry.mtime_ns)
