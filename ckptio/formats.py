"""The two on-disk formats: a standard ``torch.save`` zip and a standard safetensors file.

Both are written as a stream (never a second full copy of the state in memory) and read from bytes. Reading
never runs code from the file: torch files are loaded with ``weights_only=True`` and safetensors holds no code.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import safetensors.torch
import torch

from .errors import CorruptCheckpointError
from .snapshot import Snapshot, rebuild

__all__ = [
    "SAFETENSORS_DIGEST_KEY",
    "SAFETENSORS_META_KEY",
    "SAFETENSORS_SKELETON_KEY",
    "check_json_cost",
    "check_safetensors_header_length",
    "check_safetensors_layout",
    "check_supported",
    "check_torch_zip",
    "find_zip_end",
    "read_safetensors",
    "read_safetensors_header",
    "read_safetensors_tensors_into",
    "safetensors_plan",
    "write_safetensors",
    "write_torch",
]

SAFETENSORS_DIGEST_KEY = "ckptio.digest"
SAFETENSORS_META_KEY = "ckptio.meta"
SAFETENSORS_SKELETON_KEY = "ckptio.skeleton"
# The largest header we accept when reading. ckptio's header lists each tensor in ~270 bytes with 50-character
# names (its path twice, as the tensor's name and in the structure): 100,000 tensors take 26 MB, and parsing them
# ~120 MiB (counted by :func:`check_json_cost`, which bounds what a forged header costs). Above this a header is
# refused unread, and ckptio refuses to write one. (safetensors' own limit is 100 MB.)
MAX_SAFETENSORS_HEADER = 32 * 2**20
# The fewest header bytes a tensor takes beyond twice its path: its record and its place in the structure.
_HEADER_BYTES_PER_TENSOR = 64
# A zip central directory larger than this is refused before it is read or parsed (torch.save writes ~150 bytes
# per tensor: this is over 200,000 tensors). Parsing one costs ~3 us per 46-byte entry here and as much again in
# torch.load: 256 MiB of crafted entries took 17 s and 480 MB for an unsealed file; 32 MiB takes ~2 s.
MAX_ZIP_DIRECTORY = 32 * 2**20
ZIP_END_SIGNATURE = b"PK\x05\x06"
ZIP_END_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_END = b"PK\x06\x06"
_ZIP_ENTRY = b"PK\x01\x02"
_ZIP_ENTRY_SIZE = 46

_DTYPE_CODES = {dtype: code for code, dtype in safetensors.torch._TYPES.items()}


def check_supported(fmt: str, *states: Any) -> None:
    """Refuse, in the caller's thread, tensors the format cannot store and states whose safetensors header would
    certainly pass :data:`MAX_SAFETENSORS_HEADER` (rather than failing in the background; the writer checks the
    exact header too, so no file that ckptio cannot read back is ever written)."""
    if fmt != "safetensors":
        return
    for state in states:
        tensors, path_bytes = _count_tensors(state, 0)
        least = tensors * _HEADER_BYTES_PER_TENSOR + 2 * path_bytes
        if least > MAX_SAFETENSORS_HEADER:
            raise ValueError(
                f"the state's {tensors} tensors need a safetensors header of at least {least} bytes, more than the "
                f"{MAX_SAFETENSORS_HEADER} bytes ckptio reads back; use format='torch' for this state")


def _count_tensors(obj: Any, path_length: int) -> tuple[int, int]:
    """The tensors in ``obj`` and the summed lengths of their paths (``a/b/0``), checking each dtype."""
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in _DTYPE_CODES:
            raise ValueError(f"a tensor of dtype {obj.dtype} cannot be stored in safetensors; "
                             "save with format='torch' (which stores every dtype)")
        return 1, path_length
    if isinstance(obj, dict):
        items: Any = ((str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), value) for i, value in enumerate(obj))
    else:
        return 0, 0
    count = total = 0
    for key, value in items:
        n, length = _count_tensors(value, path_length + len(key) + bool(path_length))
        count += n
        total += length
    return count, total


def write_torch(snapshot: Snapshot, stream: BinaryIO) -> None:
    """``torch.save`` into our own stream (zero-copy: torch hands it memoryviews), which writes every byte or
    raises the OS's error; torch's C++ writer given a path reports a failed write without its errno.

    Raises ValueError, before the file is committed, when its zip directory passes :data:`MAX_ZIP_DIRECTORY`:
    ckptio never writes a file that it refuses to read back.
    """
    tail = _Tail(stream)
    torch.save(snapshot.materialize(), tail)  # type: ignore[arg-type]
    directory = _zip_directory_size(bytes(tail.last))
    if directory > MAX_ZIP_DIRECTORY:
        raise ValueError(
            f"the torch file's zip directory would be {directory} bytes ({len(snapshot.tensors)} tensors), more "
            f"than the {MAX_ZIP_DIRECTORY} bytes ckptio reads back; save fewer, larger tensors (e.g. concatenate "
            "them) or use format='safetensors'")


class _Tail:
    """Passes writes on and keeps the last bytes: a zip's end records, which say how large its directory is."""

    KEEP = ZIP_END_SIZE + 20 + 56  # the end record, the zip64 locator and the zip64 end record

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last = bytearray()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.last += view[-self.KEEP :]
        del self.last[: -self.KEEP]
        self.stream.write(view)
        return view.nbytes

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


def _zip_directory_size(tail: bytes) -> int:
    """The central directory's size, from the last bytes of a zip without a comment (as torch.save ends)."""
    end = tail[-ZIP_END_SIZE:]
    if not end.startswith(ZIP_END_SIGNATURE):
        raise RuntimeError("torch.save did not end with a plain zip end record")
    (size,) = struct.unpack("<I", end[12:16])
    zip64 = tail[: -ZIP_END_SIZE - 20]
    if size == 0xFFFFFFFF and zip64[-56:].startswith(_ZIP64_END):
        (size,) = struct.unpack("<Q", zip64[-56:][40:48])
    return size


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
    if len(encoded) > MAX_SAFETENSORS_HEADER:  # never write a file that ckptio.load would refuse
        raise ValueError(
            f"the safetensors header would be {len(encoded)} bytes ({len(names)} tensors and the state's structure), "
            f"more than the {MAX_SAFETENSORS_HEADER} bytes ckptio reads back; use format='torch' for this state")
    try:
        check_json_cost(encoded, "the new checkpoint", "its safetensors header")
    except CorruptCheckpointError:
        raise ValueError(f"the safetensors header of {len(names)} tensors would cost more to parse than ckptio "
                         "allows when reading; use format='torch' for this state") from None
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


# Parsing JSON costs Python objects, not bytes: ~160 bytes per object or array and ~64 per further value. A
# header or trailer of ``{},`` repeated costs ~50x its size (15 MB of it: 750 MB and 8 s for `ckptio info`); one
# that ckptio writes costs at most ~10x (16 MiB: ~160 MiB). Refused before parsing when the estimate exceeds this.
MAX_JSON_COST = 192 * 2**20


def check_json_cost(raw: bytes, path: Any, what: str) -> None:
    """Refuse JSON text whose parse would cost more than :data:`MAX_JSON_COST`, counting structure in C first."""
    cost = 160 * (raw.count(b"{") + raw.count(b"[")) + 64 * raw.count(b",")
    if cost > MAX_JSON_COST:
        raise CorruptCheckpointError(
            path, f"{what} would cost about {cost >> 20} MiB to parse (ckptio allows {MAX_JSON_COST >> 20} MiB; "
            "what it writes costs far less): it is damaged or built to exhaust memory")


def read_safetensors_header(data: bytes | bytearray | memoryview, path: Any) -> dict[str, Any]:
    if len(data) < 8:
        raise CorruptCheckpointError(path, f"safetensors file is {len(data)} bytes, too short for a header")
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    check_safetensors_header_length(length, len(data), path)
    raw = bytes(data[8 : 8 + length])
    check_json_cost(raw, path, "the safetensors header")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "safetensors header is not a JSON object")
    return header


def check_safetensors_header_length(length: int, size: int, path: Any) -> None:
    """Refuse a declared header length before any of it is read: it must fit the file and our cap."""
    if length > size - 8:
        raise CorruptCheckpointError(
            path, f"the safetensors header is longer than the file ({length} bytes claimed, {size - 8} present): "
            "truncated or damaged")
    if length > MAX_SAFETENSORS_HEADER:
        raise CorruptCheckpointError(
            path, f"the safetensors header claims {length} bytes, more than the {MAX_SAFETENSORS_HEADER} bytes "
            "ckptio reads; it is damaged or not a checkpoint")


def check_safetensors_layout(path: Any, size: int, read_at: ReadAt) -> None:
    """Refuse a safetensors file whose tensors do not cover its data section exactly, reading only its header.

    safetensors refuses such a file too, but only once every byte is in memory: a one-tensor header in front of
    gigabytes of (sparse) padding would cost gigabytes first. After this check, reading the whole file costs
    what its tensors declare.
    """
    if size < 8:
        raise CorruptCheckpointError(path, f"safetensors file is {size} bytes, too short for a header")
    (length,) = struct.unpack("<Q", read_at(0, 8))
    check_safetensors_header_length(length, size, path)
    header = read_safetensors_header(read_at(0, 8 + length), path)
    end = 0
    for name, record in header.items():
        if name == "__metadata__":
            continue
        offsets = record.get("data_offsets") if isinstance(record, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CorruptCheckpointError(path, f"safetensors entry {str(name)[:80]!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if end != size - 8 - length:
        raise CorruptCheckpointError(
            path, f"the safetensors tensors cover {end} bytes, but {size - 8 - length} follow the header: the file "
            "is truncated, damaged or padded")


def read_safetensors(data: bytes, path: Any, map_location: Any = None) -> Any:
    header = read_safetensors_header(data, path)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the Rust parser raises its own error type for every structural problem
        raise CorruptCheckpointError(path, f"safetensors data is broken ({exc})") from None
    return _assemble_safetensors(header, tensors, path, map_location)


_SAFETENSORS_DTYPES = {
    name: dtype for name, dtype in (
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
        ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8),
        ("BOOL", torch.bool), ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None)), ("U16", getattr(torch, "uint16", None)),
        ("U32", getattr(torch, "uint32", None)), ("U64", getattr(torch, "uint64", None)),
    ) if dtype is not None
}


def safetensors_plan(header: dict[str, Any]) -> list[tuple[str, torch.dtype, list[int], int]] | None:
    """(name, dtype, shape, byte length) of each tensor in file order, when the tensors tile the data section
    front to back with nothing between them and every dtype is one torch has; ``None`` otherwise (then the
    file goes to safetensors' own parser, whose errors name the problem). Little-endian machines only."""
    if sys.byteorder != "little":
        return None
    entries = []
    for name, record in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(record, dict):
            return None
        dtype, shape, offsets = _SAFETENSORS_DTYPES.get(record.get("dtype")), record.get("shape"), record.get(
            "data_offsets")
        if dtype is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)):
            return None
        if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
            return None
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for start, end, *_ in entries:
        if start != position:
            return None
        position = end
    return [(name, dtype, shape, end - start) for start, end, name, dtype, shape in entries]


def read_safetensors_tensors_into(stream: Any, header: dict[str, Any], plan: list[tuple[str, torch.dtype, list[int],
                                  int]], path: Any, map_location: Any = None) -> Any:
    """Read the tensors of a safetensors file whose ``stream`` stands at the start of its data section straight
    into tensors of their own (one copy from the file, no whole-file buffer), then assemble the state.
    ``stream.readinto(buffer)`` must fill the buffer or raise."""
    tensors = {}
    for name, dtype, shape, length in plan:
        tensor = torch.empty(shape, dtype=dtype)
        if length:
            stream.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
        tensors[name] = tensor
    # The same mapping safetensors.torch.load returns: its names in sorted order.
    return _assemble_safetensors(header, {name: tensors[name] for name in sorted(tensors)}, path, map_location)


def _assemble_safetensors(header: dict[str, Any], tensors: dict[str, torch.Tensor], path: Any,
                          map_location: Any) -> Any:
    metadata = header.get("__metadata__") or {}
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


ReadAt = Callable[[int, int], bytes]


def find_zip_end(path: Any, size: int, read_at: ReadAt) -> int:
    """The offset of the zip end-of-central-directory record: the last one whose comment reaches the file's end."""
    window = min(size, ZIP_END_SIZE + 0xFFFF)
    tail = read_at(size - window, window)
    at = tail.rfind(ZIP_END_SIGNATURE)
    while at >= 0:
        if at + ZIP_END_SIZE <= len(tail):
            (comment_length,) = struct.unpack("<H", tail[at + 20 : at + 22])
            if at + ZIP_END_SIZE + comment_length == len(tail):
                return size - window + at
        at = tail.rfind(ZIP_END_SIGNATURE, 0, at)
    raise CorruptCheckpointError(path, "no zip end record: the file is truncated or damaged at its end")


def check_torch_zip(path: Any, size: int, read_at: ReadAt) -> None:
    """Refuse a zip that ``torch.save`` would never write, before ``torch.load`` trusts any size in it.

    ``torch.save`` stores every record uncompressed, so a record that is compressed (a DEFLATE bomb expands
    ~1000x), encrypted, larger than the file, or a central directory that does not fit the file, is damage or
    forgery. Reads only the end record and the central directory.
    """
    if size < 4 or read_at(0, 4) != b"PK\x03\x04":
        raise CorruptCheckpointError(path, "not a torch zip file (wrong suffix, or the start is damaged)")
    end = find_zip_end(path, size, read_at)
    record = read_at(end, ZIP_END_SIZE)
    entries, directory_size, directory_at = struct.unpack("<HII", record[10:20])
    if end >= 20 + 56 and read_at(end - 20, 4) == _ZIP64_LOCATOR:
        (end64,) = struct.unpack("<Q", read_at(end - 20 + 8, 8))
        record64 = read_at(end64, 56) if end64 <= end - 20 - 56 else b""
        if len(record64) != 56 or record64[:4] != _ZIP64_END:
            raise CorruptCheckpointError(path, "the zip64 end record is damaged")
        entries, directory_size, directory_at = struct.unpack("<QQQ", record64[32:56])
        end = end64
    if directory_at + directory_size > end or directory_size > MAX_ZIP_DIRECTORY:
        raise CorruptCheckpointError(path, "the zip central directory does not fit in the file: damaged")
    if entries > directory_size // _ZIP_ENTRY_SIZE:
        raise CorruptCheckpointError(path, "the zip end record claims more entries than its directory holds")
    directory = read_at(directory_at, directory_size)
    position = 0
    extents: list[tuple[int, int, str]] = []
    for _ in range(entries):
        fixed = directory[position : position + _ZIP_ENTRY_SIZE]
        if len(fixed) != _ZIP_ENTRY_SIZE or fixed[:4] != _ZIP_ENTRY:
            raise CorruptCheckpointError(path, "the zip central directory is damaged")
        flags, method = struct.unpack("<HH", fixed[8:12])
        compressed, raw, name_length, extra_length, comment_length = struct.unpack("<IIHHH", fixed[20:34])
        (local_at,) = struct.unpack("<I", fixed[42:46])
        extra_at = position + _ZIP_ENTRY_SIZE + name_length
        name = bytes(directory[position + _ZIP_ENTRY_SIZE : extra_at]).decode("utf-8", "replace")
        raw, compressed, local_at = _zip64_sizes(directory[extra_at : extra_at + extra_length], raw, compressed,
                                                 local_at)
        position = extra_at + extra_length + comment_length
        if position > len(directory):
            raise CorruptCheckpointError(path, "the zip central directory is damaged")
        if method != 0 or flags & 1:
            raise CorruptCheckpointError(
                path, f"zip record {name!r} is compressed or encrypted (method {method}); torch.save stores every "
                "record plainly, so this file is not one it wrote")
        if compressed != raw or local_at + 30 + name_length + compressed > directory_at:
            raise CorruptCheckpointError(path, f"zip record {name!r} claims more bytes than the file holds")
        extents.append((local_at, local_at + 30 + name_length + compressed, name))
    # Records that share bytes: a directory pointing 20 names at one 20 MB record made a 20 MB file load as 400 MB
    # (torch.load reads each name's record anew). torch.save writes them one after another.
    extents.sort()
    for (_, end_at, name), (next_at, _, next_name) in itertools.pairwise(extents):
        if end_at > next_at:
            raise CorruptCheckpointError(path, f"zip records {name!r} and {next_name!r} overlap; torch.save writes "
                                         "each record once, so this file is not one it wrote")


def _zip64_sizes(extra: bytes, raw: int, compressed: int, local_at: int) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF sizes and offset by their 64-bit values from a zip64 extra field (id 1)."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack("<HH", extra[at : at + 4])
        if tag == 1:
            values = iter(struct.unpack(f"<{length // 8}Q", extra[at + 4 : at + 4 + length // 8 * 8]))
            raw = next(values, raw) if raw == 0xFFFFFFFF else raw
            compressed = next(values, compressed) if compressed == 0xFFFFFFFF else compressed
            local_at = next(values, local_at) if local_at == 0xFFFFFFFF else local_at
            break
        at += 4 + length
    return raw, compressed, local_at
