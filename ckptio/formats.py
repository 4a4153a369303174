"""The two on-disk formats: a standard ``torch.save`` zip and a standard safetensors file.

Both are written as a stream (never a second full copy of the state in memory) and read from bytes. Reading
never runs code from the file: torch files are loaded with ``weights_only=True`` and safetensors holds no code.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any, BinaryIO

import safetensors.torch
import torch

from .errors import CorruptCheckpointError
from .snapshot import Snapshot, rebuild, walk_tensors

__all__ = [
    "SAFETENSORS_DIGEST_KEY",
    "SAFETENSORS_META_KEY",
    "SAFETENSORS_SKELETON_KEY",
    "check_supported",
    "read_safetensors",
    "read_safetensors_header",
    "read_torch",
    "write_safetensors",
    "write_torch",
]

SAFETENSORS_DIGEST_KEY = "ckptio.digest"
SAFETENSORS_META_KEY = "ckptio.meta"
SAFETENSORS_SKELETON_KEY = "ckptio.skeleton"
# The largest header we accept when reading: far above any real state, far below what would exhaust memory.
MAX_SAFETENSORS_HEADER = 256 * 2**20

_DTYPE_CODES = {dtype: code for code, dtype in safetensors.torch._TYPES.items()}


def check_supported(fmt: str, *states: Any) -> None:
    """Refuse, in the caller's thread, tensors the format cannot store (rather than failing in the background)."""
    if fmt != "safetensors":
        return
    for state in states:
        for tensor in walk_tensors(state):
            if tensor.dtype not in _DTYPE_CODES:
                raise ValueError(f"a tensor of dtype {tensor.dtype} cannot be stored in safetensors; "
                                 "save with format='torch' (which stores every dtype)")


def write_torch(snapshot: Snapshot, stream: BinaryIO) -> None:
    """``torch.save`` into our own stream (zero-copy: torch hands it memoryviews), which writes every byte or
    raises the OS's error; torch's C++ writer given a path reports a failed write without its errno."""
    torch.save(snapshot.materialize(), stream)


def write_safetensors(snapshot: Snapshot, stream: BinaryIO, meta: dict[str, Any], *,
                      digest_placeholder: str | None = None) -> int | None:
    """Write ``snapshot`` as safetensors; returns the byte offset of ``digest_placeholder`` if one was given.

    The placeholder is a fixed-width value in the header's metadata that the caller overwrites with the file's
    digest once every byte has been written (the digest cannot be known before the data it covers).
    """
    header: dict[str, Any] = {}
    offset = 0
    names = _unique_names(snapshot.names)
    for name, tensor in zip(names, snapshot.tensors, strict=False):
        code = _DTYPE_CODES.get(tensor.dtype)
        if code is None:
            raise ValueError(
                f"{name} has dtype {tensor.dtype}, which safetensors cannot store; use format='torch' for it"
            )
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    metadata = {
        SAFETENSORS_META_KEY: json.dumps(meta, separators=(",", ":")),
        SAFETENSORS_SKELETON_KEY: json.dumps({"tensors": names, "tree": snapshot.skeleton}, separators=(",", ":")),
    }
    if digest_placeholder is not None:
        metadata[SAFETENSORS_DIGEST_KEY] = digest_placeholder
    header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
    placeholder_at = None
    if digest_placeholder is not None:
        marker = json.dumps(SAFETENSORS_DIGEST_KEY).encode() + b':"'
        placeholder_at = 8 + encoded.index(marker) + len(marker)
    stream.write(struct.pack("<Q", len(encoded)))
    stream.write(encoded)
    snapshot.wait_until_copied()
    for tensor in snapshot.tensors:
        if tensor.numel():
            stream.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return placeholder_at


def _unique_names(names: list[str]) -> list[str]:
    taken: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken or candidate == "__metadata__":
            n += 1
            candidate = f"{name}#{n}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def read_safetensors_header(data: bytes | memoryview, path: Any) -> dict[str, Any]:
    if len(data) < 8:
        raise CorruptCheckpointError(path, f"safetensors file is {len(data)} bytes, too short for a header")
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    if length > min(MAX_SAFETENSORS_HEADER, len(data) - 8):
        raise CorruptCheckpointError(
            path, f"safetensors header claims {length} bytes but the file has {len(data) - 8} after it"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "safetensors header is not a JSON object")
    return header


def read_safetensors(data: bytes, path: Any, map_location: Any = None) -> Any:
    header = read_safetensors_header(data, path)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the Rust parser raises its own error type for every structural problem
        raise CorruptCheckpointError(path, f"safetensors data is broken ({exc})") from None
    if map_location is not None:
        tensors = {name: t.to(map_location) for name, t in tensors.items()}
    skeleton_json = metadata.get(SAFETENSORS_SKELETON_KEY) if isinstance(metadata, dict) else None
    if skeleton_json is None:
        return tensors  # a safetensors file that ckptio did not write: its flat name -> tensor mapping
    try:
        skeleton = json.loads(skeleton_json)
        return rebuild(skeleton["tree"], [tensors[name] for name in skeleton["tensors"]])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"ckptio structure in the safetensors metadata is broken ({exc})") from None


def read_torch(data: bytes, path: Any, map_location: Any = None) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types (RuntimeError, UnpicklingError, EOFError...) for bad bytes
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptCheckpointError(path, f"not a loadable torch file ({message})") from None
