"""Configuration of a :class:`~ckptio.CheckpointManager`: one keyword-only dataclass, validated up front."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["CheckpointOptions", "parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20, "mi": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40,
}


def parse_size(value: int | str | None, *, what: str = "size") -> int | None:
    """Parse ``2GB``, ``500MiB``, ``1.5G`` or a byte count into bytes (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a byte count or a string like '2GB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must not be negative, got {value}")
        return value
    match = _SIZE_RE.match(str(value))
    if match is None or (match.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"{what} {value!r} is not a size: write e.g. '2GB', '500MiB' or a number of bytes")
    return round(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


@dataclass(frozen=True, kw_only=True)
class CheckpointOptions:
    """How a :class:`~ckptio.CheckpointManager` writes, keeps and removes checkpoints."""

    format: Literal["torch", "safetensors"] = "torch"
    """``torch`` writes a ``torch.save`` file (``.pth``) that ``torch.load(weights_only=True)`` reads;
    ``safetensors`` writes a ``.safetensors`` file whose non-tensor structure lives in its metadata."""

    compression: Literal["zstd"] | None = None
    """``zstd`` compresses the file (suffix ``.zst`` after the format's); ``None`` writes it raw."""

    compression_level: int = 1
    """zstd level, 1 (fastest) to 22. On CRAFT weights level 3 saved no more than level 1 (ratio 1.09) and ran
    30% slower, so the default is 1."""

    compression_threads: int = 0
    """zstd worker threads: 0 compresses in the writer thread, -1 uses every core."""

    async_save: bool = True
    """Write in the background (``save()`` returns after the snapshot); ``False`` writes in the caller."""

    writer: Literal["thread", "process"] = "thread"
    """Where background writes run (with ``async_save``). ``thread``: a thread of the training process, whose
    Python work competes with training for the GIL. ``process``: a helper process started with the manager and
    fed through shared-memory slots, which leaves the GIL to training. On 2 busy CPU cores their training
    overhead could not be told apart (README, "Writer process"); the process writer stalls the training thread
    less, which is what counts on a GPU. The default stays ``thread`` because a short-lived manager (a script, a
    test, the CLI) would pay the helper's start-up (1-5 s of CPU, ~230 MB with torch) for nothing; long
    training runs (``craft_train``) choose ``process``."""

    max_pending: int = 1
    """Snapshots that may wait for the writer besides the one being written; host memory is about
    ``(max_pending + 1) x state size``."""

    on_full: Literal["block", "skip"] = "block"
    """When ``max_pending`` snapshots already wait: ``block`` waits for the writer, ``skip`` drops this save."""

    keep_count: int | None = None
    """Keep only the newest N periodic checkpoints after each commit (protected names are never removed)."""

    keep_full: int | None = None
    """Keep the newest N periodic checkpoints complete and slim older ones to their model weights
    (:mod:`ckptio.slim`; about a third of the size with Adam), after each commit, where the save is written: in
    the writer process with ``writer="process"`` (off the training process and its GIL), in the writer thread
    with ``"thread"``, inside ``save()`` without ``async_save``. ``None`` keeps every one complete."""

    disk_budget: int | str | None = None
    """Upper bound on the bytes of all checkpoints in the directory after each save (``"2GB"`` or bytes)."""

    min_free: int | str | None = None
    """Free space the volume must keep after a checkpoint is written (``"5GB"`` or bytes)."""

    on_no_space: Literal["skip", "raise"] = "skip"
    """When a save cannot fit (``min_free``, ENOSPC, EFBIG): ``skip`` warns and training goes on,
    ``raise`` surfaces the error on the next ``save()``, ``wait()`` or ``close()``."""

    protected_names: tuple[str, ...] = ("best_model",)
    """Checkpoint names that retention and the disk budget never delete."""

    rank: int = 0
    """This process's rank when several processes write one sharded checkpoint together (``save(shard=...)``):
    each writes its shard, and rank 0 commits the manifest that ties them together once all are durable."""

    world_size: int = 1
    """How many processes write each sharded checkpoint (1: checkpoints are not sharded)."""

    shard_timeout: float = 600.0
    """Seconds rank 0 waits for the other ranks' shards before it gives the checkpoint up as failed."""

    fsync: bool = True
    """fsync each file and its directory before it counts as committed; turn off only for throwaway runs."""

    drop_page_cache: bool = True
    """Advise the kernel to drop a written checkpoint's pages so that they do not evict training data."""

    mirror: str | None = None
    """Also copy each committed checkpoint to a second place: a directory (``/mnt/backup/run1``,
    ``file:///...``) or S3-compatible storage (``s3://bucket/prefix``; endpoint and credentials from the standard
    AWS environment variables and config). A background thread copies, verifies the target's bytes against the
    sealed digest and retries failures without stopping training (:mod:`ckptio.mirror`)."""

    mirror_keep: int | None = None
    """Keep only the newest N batch checkpoints on the mirror (protected names are kept); ``None`` keeps all."""

    mirror_timeout: float = 60.0
    """Seconds ``close()`` waits for copies still in progress; those left are named in a warning."""

    def __post_init__(self) -> None:
        for name in ("compression_level", "compression_threads", "max_pending", "rank", "world_size"):
            _require_int(name, getattr(self, name))
        for name in ("keep_count", "keep_full"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name))
        for name in ("async_save", "fsync", "drop_page_cache"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if isinstance(self.protected_names, str):
            raise ValueError(f"protected_names must be a tuple of names, e.g. ({self.protected_names!r},)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.shard_timeout <= 0:
            raise ValueError(f"shard_timeout must be positive, got {self.shard_timeout}")
        if self.format not in ("torch", "safetensors"):
            raise ValueError(f"format must be 'torch' or 'safetensors', not {self.format!r}")
        if self.compression not in (None, "zstd"):
            raise ValueError(f"compression must be None or 'zstd', not {self.compression!r}")
        if not 1 <= self.compression_level <= 22:
            raise ValueError(f"compression_level must be between 1 and 22, got {self.compression_level}")
        if self.compression_threads < -1:
            raise ValueError("compression_threads must be -1 (all cores), 0 (writer thread) or a positive count")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1 (one snapshot may wait), got {self.max_pending}")
        if self.writer not in ("thread", "process"):
            raise ValueError(f"writer must be 'thread' or 'process', not {self.writer!r}")
        if self.writer == "process" and not hasattr(os, "memfd_create"):
            raise ValueError("writer='process' needs Linux (its slots are memfd_create segments); use writer='thread'")
        if self.on_full not in ("block", "skip"):
            raise ValueError(f"on_full must be 'block' or 'skip', not {self.on_full!r}")
        if self.on_no_space not in ("skip", "raise"):
            raise ValueError(f"on_no_space must be 'skip' or 'raise', not {self.on_no_space!r}")
        for name in ("keep_count", "keep_full"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (the newest checkpoint is what a resume needs), got "
                                 f"{getattr(self, name)}; None keeps every checkpoint")
        if self.mirror is not None and (not isinstance(self.mirror, str) or not self.mirror):
            raise ValueError(f"mirror must be a directory or a URL such as s3://bucket/prefix, not {self.mirror!r}")
        if self.mirror is not None and self.world_size > 1:
            raise ValueError("mirror copies single-file checkpoints; with world_size > 1 leave mirror unset")
        if self.mirror_keep is not None:
            _require_int("mirror_keep", self.mirror_keep)
            if self.mirror_keep < 1:
                raise ValueError(f"mirror_keep must be at least 1 (a resume from the mirror needs the newest), got "
                                 f"{self.mirror_keep}; None keeps every mirrored checkpoint")
        if not self.mirror_timeout >= 0:
            raise ValueError(f"mirror_timeout must be 0 or more seconds, got {self.mirror_timeout}")
        object.__setattr__(self, "disk_budget", parse_size(self.disk_budget, what="disk_budget"))
        object.__setattr__(self, "min_free", parse_size(self.min_free, what="min_free"))
        if self.disk_budget == 0:
            raise ValueError("disk_budget must be positive (or None for no budget)")
        object.__setattr__(self, "protected_names", tuple(self.protected_names))

    @property
    def budget_bytes(self) -> int | None:
        return self.disk_budget  # type: ignore[return-value]

    @property
    def min_free_bytes(self) -> int | None:
        return self.min_free  # type: ignore[return-value]


def _require_int(name: str, value: object) -> None:
    if type(value) is not int:
        raise ValueError(f"{name} must be a whole number, not {value!r}")
