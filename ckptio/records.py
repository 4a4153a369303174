"""What a save produces: the committed checkpoint and the older checkpoints slimmed after it.

Plain records, below both the file writer (``fileio``) and the slimmer (``slim``): each of those builds one of
them, and the writer thread joins them, so neither module needs to know the other's types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SavedCheckpoint", "SlimResult"]


@dataclass(frozen=True)
class SlimResult:
    """One slimmed checkpoint: its size before and after, and the top-level entries that were dropped."""

    path: Path
    bytes_before: int
    bytes_after: int
    dropped: tuple[str, ...]

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


@dataclass(frozen=True)
class SavedCheckpoint:
    """A committed checkpoint: durable under ``path``, with the digest recorded inside it."""

    path: Path
    name: str
    digest: str
    size: int
    meta: dict[str, Any]
    seconds: float
    slimmed: tuple[SlimResult, ...] = ()
    """Older checkpoints slimmed to their weights after this one was committed (``keep_full``)."""
    slim_error: str | None = None
    """Why slimming an older checkpoint failed, if it did: that one stays complete (the next save tries again)."""
