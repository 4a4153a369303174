"""ckptio: asynchronous, atomic, checksummed checkpoints for PyTorch training.

>>> import ckptio
>>> with ckptio.CheckpointManager("checkpoints", async_save=True) as mgr:  # doctest: +SKIP
...     mgr.save(state, name="checkpoint_epoch_1_batch_100")
>>> state = ckptio.load("checkpoints/checkpoint_epoch_1_batch_100.pth")  # doctest: +SKIP
"""

from __future__ import annotations

from .config import CheckpointOptions, parse_size
from .errors import (
    CheckpointDirectoryLockedError,
    CheckpointWriteError,
    CorruptCheckpointError,
    InsufficientSpaceError,
)
from .fileio import FileCheck, SavedCheckpoint, load, load_shard, read_meta
from .layout import CheckpointEntry
from .manager import CheckpointManager, SaveStats
from .verify import VerifyReport, verify

__all__ = [
    "CheckpointDirectoryLockedError",
    "CheckpointEntry",
    "CheckpointManager",
    "CheckpointOptions",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "FileCheck",
    "InsufficientSpaceError",
    "SaveStats",
    "SavedCheckpoint",
    "VerifyReport",
    "load",
    "load_shard",
    "parse_size",
    "read_meta",
    "verify",
]

__version__ = "0.1.0"
