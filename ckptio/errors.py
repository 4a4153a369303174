"""Exceptions raised by ckptio.

They subclass built-in exceptions so that callers can catch broadly (``except ValueError``) or precisely.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CheckpointDirectoryLockedError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "InsufficientSpaceError",
]


class CorruptCheckpointError(ValueError):
    """A checkpoint file's bytes do not match its recorded digest, or its structure is broken."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointDirectoryLockedError(RuntimeError):
    """Another process (or another manager in this process) is already writing this directory."""


class CheckpointWriteError(RuntimeError):
    """A save that ran in the background failed; raised on the next ``save()``, ``wait()`` or ``close()``."""


class InsufficientSpaceError(OSError):
    """The volume cannot hold the next checkpoint while keeping the configured free space."""
