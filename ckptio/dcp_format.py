"""The on-disk names and per-item records of ckptio's DCP checkpoints, shared by the writer, the reader and
the directory checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DATA_SUFFIX",
    "DIGEST_ALGORITHM",
    "MAX_METADATA_BYTES",
    "MAX_SEAL_BYTES",
    "METADATA_NAME",
    "RESULTS_SUFFIX",
    "SEAL_NAME",
    "WRITING_LOCK_NAME",
    "is_ours",
]

METADATA_NAME = ".metadata"  # DCP's own name: tools that look for a DCP checkpoint (torchtitan's) find ours too
SEAL_NAME = ".ckptio-seal.json"
"""The seal of a ckptio DCP directory: the metadata's digest and every data file's size."""
DATA_SUFFIX = ".distcp"
WRITING_LOCK_NAME = ".ckptio-writing.lock"
DIGEST_ALGORITHM = "xxh3_128"
RESULTS_SUFFIX = ".ckptio-results"
"""A rank's account of what it wrote into a staging directory (its items and their records), read by the
coordinator of a :class:`~ckptio.dcp_manager.ShardedCheckpointManager` save; never part of a committed one."""
# The metadata of a few million items is well under 1 GiB; the seal holds one line per data file.
MAX_METADATA_BYTES = 2**30
MAX_SEAL_BYTES = 16 * 2**20
_FORMAT = "ckptio-dcp/1"


# -- what travels in storage_data ------------------------------------------------------------------------------
# Plain dicts, not a class of ours: the metadata then unpickles without ckptio (torch's own tools can read it).

def _item_record(file: str, offset: int, length: int, digest: str, codec: str | None, raw_length: int,
                 tensor: torch.Tensor | None) -> dict[str, Any]:
    record: dict[str, Any] = {"format": _FORMAT, "file": file, "offset": offset, "length": length,
                              "xxh3": digest, "codec": codec, "raw_length": raw_length}
    if tensor is not None:
        record["dtype"] = str(tensor.dtype).removeprefix("torch.")
        record["shape"] = list(tensor.shape)
    return record


def is_ours(info: Any) -> bool:
    return isinstance(info, dict) and info.get("format") == _FORMAT


@dataclass(frozen=True)
class _SavePlanData:
    """What the coordinator tells every rank in the global plan: where to write, under which file prefix."""

    staging: str
    prefix: str
