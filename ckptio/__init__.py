"""ckptio: asynchronous, atomic, checksummed checkpoints for PyTorch training.

>>> import ckptio
>>> with ckptio.CheckpointManager("checkpoints", async_save=True) as mgr:  # doctest: +SKIP
...     mgr.save(state, name="checkpoint_epoch_1_batch_100")
>>> state = ckptio.load("checkpoints/checkpoint_epoch_1_batch_100.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import sys

try:
    from .config import CheckpointOptions, parse_size
    from .dirlock import wait_until_released
    from .errors import (
        CheckpointDirectoryLockedError,
        CheckpointWriteError,
        CorruptCheckpointError,
        InsufficientSpaceError,
    )
    from .fileio import FileCheck, SavedCheckpoint, load, load_shard, read_meta
    from .manager import CheckpointManager, SaveStats
    from .naming import CheckpointEntry, parse_checkpoint_name, scan
    from .newest import Skipped, latest
    from .slim import is_slim
    from .torch_read import is_legacy_torch
    from .verify import VerifyReport, verify
except ModuleNotFoundError as _missing:  # typically: the project's virtual environment is not active
    _message = (f"ckptio needs the package {_missing.name!r}, which {sys.executable} lacks: run "
                "`. .venv/bin/activate` first (after `make install`), or use .venv/bin/python")
    if sys.argv[:1] == ["-m"]:  # `python -m ckptio`: the package is imported before its __main__ can catch this
        sys.exit(f"ckptio: {_message}")
    raise ModuleNotFoundError(_message, name=_missing.name) from None

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
    "Skipped",
    "VerifyReport",
    "is_legacy_torch",
    "is_slim",
    "latest",
    "load",
    "load_shard",
    "parse_checkpoint_name",
    "parse_size",
    "read_meta",
    "scan",
    "verify",
    "wait_until_released",
]

__version__ = "0.1.0"
