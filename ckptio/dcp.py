"""ckptio as the storage layer of ``torch.distributed.checkpoint`` (DCP): sharded state (FSDP2, DTensor) saved
with our digests and atomic commit, loaded back at any process count.

>>> import torch.distributed.checkpoint as dcp
>>> import ckptio.dcp
>>> dcp.save(state, storage_writer=ckptio.dcp.Writer("ckpt/step_100"))  # doctest: +SKIP
>>> dcp.load(state, storage_reader=ckptio.dcp.Reader("ckpt/step_100"))  # doctest: +SKIP

DCP plans and reshards; this module only moves bytes, and adds inside DCP's contract what it lacks:

* every item's stored bytes carry an xxh3-128 digest in its ``storage_data`` (which DCP keeps in the metadata),
  checked on every read: a resharded load reads whole items, so it always can;
* a checkpoint is a directory committed atomically: every rank writes into one hidden temporary directory
  beside the final one, and the coordinator's ``finish()`` writes the metadata and the seal last, fsyncs them
  and the directory, renames it into place and fsyncs the parent. Until that rename nothing carries the final
  name; an interrupted save leaves only a temporary directory, which ``ckptio clean`` (and a manager opening
  the parent directory) sweeps;
* items may be compressed with zstd, one frame per item, so that a resharded load still reads one item alone;
* reads are bounded by the recorded sizes, the metadata is unpickled with an allowlist of DCP's own classes, and
  pickled (non-tensor) values are loaded weights-only: a checkpoint cannot run code.

Directories written by torch's ``FileSystemWriter`` load through :class:`Reader` as well (their structure is
checked; they carry no digest, so :func:`verify_directory` reports them as ``unsealed``).

This module imports ``torch.distributed.checkpoint`` and is therefore not imported by ``import ckptio``.
"""

from __future__ import annotations

from .dcp_format import METADATA_NAME, SEAL_NAME, WRITING_LOCK_NAME
from .dcp_inspect import (
    DcpEntry,
    DirectoryCheck,
    checkpoint_entries,
    dcp_leftovers,
    delete_dcp_directory,
    is_dcp_directory,
    remove_dcp_leftovers,
    scan_dcp,
    verify_directory,
)
from .dcp_reader import Reader, open_directory
from .dcp_writer import Writer

__all__ = [
    "METADATA_NAME",
    "SEAL_NAME",
    "WRITING_LOCK_NAME",
    "DcpEntry",
    "DirectoryCheck",
    "Reader",
    "Writer",
    "checkpoint_entries",
    "dcp_leftovers",
    "delete_dcp_directory",
    "is_dcp_directory",
    "open_directory",
    "remove_dcp_leftovers",
    "scan_dcp",
    "verify_directory",
]
