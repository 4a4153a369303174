"""Digests that travel inside each checkpoint file, and the checks that use them.

Every file ckptio writes carries an xxh3-128 digest of its bytes and a small JSON description ("meta") where
each container allows it without breaking standard readers:

* raw ``.pth`` (a zip): in the zip archive comment, after the end-of-central-directory record;
* raw ``.safetensors``: in the header's ``__metadata__``, as a fixed-width value hashed as zeros;
* ``.zst``: in a zstd skippable frame after the compressed data, which every zstd decoder skips.

The digest covers every byte of the file, the trailer and its meta included, with the 32 hex digits of the
digest itself hashed as ASCII zeros. So a file copied elsewhere can be verified alone, the digest becomes
visible atomically with the file (it is part of it), and the meta can be read from the file's end or header
without reading the tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from .atomic import write_all_at
from .errors import CorruptCheckpointError
from .formats import (
    SAFETENSORS_DIGEST_KEY,
    SAFETENSORS_META_KEY,
    ZIP_END_SIGNATURE,
    ZIP_END_SIZE,
    check_json_cost,
    check_safetensors_header_length,
    find_zip_end,
    read_safetensors_header,
)
from .suffixes import container_of
from .torch_read import LEGACY_TORCH_MAGIC

__all__ = [
    "DIGEST_PLACEHOLDER",
    "ZSTD_LEADING_FRAME",
    "DigestingReader",
    "HashingWriter",
    "Seal",
    "compute_digest",
    "file_digest",
    "read_seal",
    "seal_zip_file",
    "zstd_trailer",
]

DIGEST_ALGORITHM = "xxh3_128"
DIGEST_PLACEHOLDER = "0" * 32
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE_MAGIC = struct.pack("<I", 0x184D2A5E)
TRAILER_MAGIC = b"CKPTIO01"
# A ckptio .zst file starts with this skippable frame, so that one which lost its trailer is known as truncated
# rather than mistaken for zstd data someone else wrote.
ZSTD_LEADING_FRAME = struct.pack("<II", 0x184D2A5C, 8) + TRAILER_MAGIC
_CHUNK = 8 * 2**20
# The largest trailer JSON read from a .zst file's end (ours hold the meta: a few KB; a manifest of thousands of
# shards: a few hundred KB). A forged length beyond it is refused before it is read or parsed.
MAX_TRAILER = 16 * 2**20

ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Seal:
    """A file's recorded digest and meta, and where they sit."""

    digest: str
    meta: dict[str, Any]
    hashed_length: int
    """Bytes ``[0, hashed_length)`` are hashed: the whole file."""
    zeroed: tuple[int, int]
    """The byte range of the digest's own 32 hex digits, hashed as ASCII zeros."""
    body_length: int
    """Where the payload ends: a zstd file's trailer frame follows it; other files are all payload."""
    body_start: int = 0
    """Where the payload starts: after a zstd file's leading frame."""


class HashingWriter:
    """A write-only stream that hashes and counts every byte on its way to ``raw``."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hasher = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    def write_unhashed(self, data: bytes) -> None:
        self.raw.write(data)
        self.size += len(data)

    def seal_with(self, placeholder: bytes, final: Callable[[str], bytes]) -> str:
        """Hash ``placeholder`` (a trailer whose digest is zeros), then write ``final(digest)`` in its place."""
        self.hasher.update(placeholder)
        digest = self.hexdigest()
        trailer = final(digest)
        if len(trailer) != len(placeholder):
            raise RuntimeError("a sealed trailer changed length when its digest was filled in")
        self.write_unhashed(trailer)
        return digest

    def flush(self) -> None:
        """Flushing happens once, when the file is committed; torch.save's frequent flushes are ignored."""

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


def seal_zip_file(fd: int, meta: dict[str, Any]) -> tuple[str, int]:
    """Seal a complete zip file in place: its digest and meta go into the archive comment; returns the digest
    and the sealed file's size."""
    size = os.fstat(fd).st_size
    end = os.pread(fd, ZIP_END_SIZE, size - ZIP_END_SIZE) if size >= ZIP_END_SIZE else b""
    if not end.startswith(ZIP_END_SIGNATURE) or end[20:22] != b"\0\0":
        raise RuntimeError("torch.save did not end with a plain zip end record; cannot seal the file")
    placeholder = _trailer_json(DIGEST_PLACEHOLDER, meta)
    if len(placeholder) > 0xFFFF:
        raise ValueError("checkpoint metadata is too large for a zip comment; save fewer top-level scalars")
    write_all_at(fd, struct.pack("<H", len(placeholder)), size - 2)
    hasher = xxhash.xxh3_128()
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
        hasher.update(mapped)
    hasher.update(placeholder)
    digest = hasher.hexdigest()
    write_all_at(fd, _trailer_json(digest, meta), size)  # on a full disk a pwrite may be short
    return digest, size + len(placeholder)


def _trailer_json(digest: str, meta: dict[str, Any]) -> bytes:
    return json.dumps({"ckptio": 1, "algorithm": DIGEST_ALGORITHM, "digest": digest, "meta": meta},
                      separators=(",", ":"), sort_keys=True).encode()


def zstd_trailer(digest: str, meta: dict[str, Any]) -> bytes:
    """A zstd skippable frame carrying the digest: ``magic, size, json, len(json), TRAILER_MAGIC``."""
    body = _trailer_json(digest, meta)
    if len(body) > MAX_TRAILER:  # never write a file that ckptio.load would refuse
        raise ValueError(f"the checkpoint's metadata is {len(body)} bytes as JSON, more than the {MAX_TRAILER} bytes "
                         "ckptio reads back; pass less metadata= (or fewer top-level scalars)")
    payload = body + struct.pack("<I", len(body)) + TRAILER_MAGIC
    return ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


_TRAILER_DIGEST_MARKER = b'"digest":"'


def _parse_trailer(raw: bytes, path: Path, offset: int, size: int, body_length: int) -> Seal:
    """The seal in trailer JSON ``raw`` found at byte ``offset`` of the file."""
    check_json_cost(raw, path, "the ckptio trailer")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(path, "the ckptio trailer is not valid JSON") from None
    if (not isinstance(doc, dict) or doc.get("algorithm") != DIGEST_ALGORITHM
            or not isinstance(doc.get("digest"), str) or not isinstance(doc.get("meta"), dict)):
        raise CorruptCheckpointError(path, "the ckptio trailer lacks a digest or meta")
    # Keys are sorted and "digest" precedes "meta", so the first occurrence is the trailer's own field.
    at = raw.find(_TRAILER_DIGEST_MARKER) + len(_TRAILER_DIGEST_MARKER)
    start = offset + at
    return Seal(digest=doc["digest"], meta=doc["meta"], hashed_length=size,
                zeroed=(start, start + len(DIGEST_PLACEHOLDER)), body_length=body_length)


def read_seal(path: Path, size: int, read_at: ReadAt) -> Seal | None:
    """The file's seal, ``None`` for a well-formed file that ckptio did not write (no digest to check).

    Raises :class:`CorruptCheckpointError` for bytes that cannot be what the suffix says (truncated files
    included), reading only the file's end or header.
    """
    if size == 0:
        raise CorruptCheckpointError(path, "the file is empty")
    container = container_of(path)
    head = read_at(0, min(size, len(ZSTD_LEADING_FRAME)))
    if container == "zstd":
        if head == ZSTD_LEADING_FRAME:
            seal = _zstd_seal(path, size, read_at)
            if seal is None:
                raise CorruptCheckpointError(path, "the ckptio trailer is missing: the file is truncated")
            return seal
        if head[:4] != ZSTD_MAGIC:
            raise CorruptCheckpointError(path, "not a zstd stream (wrong suffix, or the start is damaged)")
        return _zstd_seal(path, size, read_at)
    if container == "torch":
        if read_at(0, min(size, len(LEGACY_TORCH_MAGIC))) == LEGACY_TORCH_MAGIC:
            return None  # torch.save's pre-zip format (the official CRAFT release): it has no place for a seal
        if head[:4] != b"PK\x03\x04":
            zstd = head[:4] == ZSTD_MAGIC or head == ZSTD_LEADING_FRAME
            what = "a zstd stream; name it .pth.zst" if zstd else "a torch zip file"
            raise CorruptCheckpointError(path, f"not {what} (wrong suffix, or the start is damaged)")
        return _zip_seal(path, size, read_at)
    return _safetensors_seal(path, size, read_at)


def _zstd_seal(path: Path, size: int, read_at: ReadAt) -> Seal | None:
    if size < 20 or read_at(size - 8, 8) != TRAILER_MAGIC:
        return None
    (json_length,) = struct.unpack("<I", read_at(size - 12, 4))
    if json_length > MAX_TRAILER:
        raise CorruptCheckpointError(path, f"the ckptio trailer claims {json_length} bytes; it is damaged")
    start = size - 20 - json_length
    if start < 4 or read_at(start, 8) != ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", json_length + 12):
        raise CorruptCheckpointError(path, "the ckptio trailer frame is damaged")
    seal = _parse_trailer(read_at(start + 8, json_length), path, start + 8, size, body_length=start)
    if read_at(0, len(ZSTD_LEADING_FRAME)) == ZSTD_LEADING_FRAME:
        seal = dataclasses.replace(seal, body_start=len(ZSTD_LEADING_FRAME))
    return seal


def _zip_seal(path: Path, size: int, read_at: ReadAt) -> Seal | None:
    end = find_zip_end(path, size, read_at)
    comment_length = size - end - ZIP_END_SIZE
    if comment_length == 0:
        return None
    return _parse_trailer(read_at(end + ZIP_END_SIZE, comment_length), path, size - comment_length, size,
                          body_length=size)


def _safetensors_seal(path: Path, size: int, read_at: ReadAt) -> Seal | None:
    if size < 8:
        raise CorruptCheckpointError(path, f"safetensors file is {size} bytes, too short for a header")
    (length,) = struct.unpack("<Q", read_at(0, 8))
    check_safetensors_header_length(length, size, path)  # before reading: the length is the file's claim
    raw = read_at(0, 8 + length)
    header = read_safetensors_header(raw, path)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not any(str(key).startswith("ckptio.") for key in metadata):
        return None
    marker = json.dumps(SAFETENSORS_DIGEST_KEY).encode() + b':"'
    at = raw.find(marker)
    if SAFETENSORS_DIGEST_KEY not in metadata or at < 0 or raw.find(marker, at + 1) >= 0:
        raise CorruptCheckpointError(path, "the digest field in the safetensors header is damaged")
    at += len(marker)
    try:
        meta = json.loads(metadata.get(SAFETENSORS_META_KEY, "{}"))
    except (TypeError, ValueError, RecursionError):
        raise CorruptCheckpointError(path, "the ckptio metadata in the safetensors header is damaged") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(path, "the ckptio metadata in the safetensors header is damaged")
    return Seal(digest=str(metadata[SAFETENSORS_DIGEST_KEY]), meta=meta, hashed_length=size,
                zeroed=(at, at + len(DIGEST_PLACEHOLDER)), body_length=size)


def compute_digest(seal: Seal, read_at: ReadAt) -> str:
    hasher = xxhash.xxh3_128()
    position = 0
    while position < seal.hashed_length:
        chunk = read_at(position, min(_CHUNK, seal.hashed_length - position))
        if not chunk:
            break
        start, end = seal.zeroed
        lo, hi = max(start, position), min(end, position + len(chunk))
        if lo < hi:
            chunk = chunk[: lo - position] + b"0" * (hi - lo) + chunk[hi - position :]
        hasher.update(chunk)
        position += len(chunk)
    return hasher.hexdigest()


class DigestingReader:
    """Reads a sealed file front to back, once, hashing every byte as it lands where the caller wants it.

    ``readinto`` fills the caller's buffer (a tensor's memory, say) straight from the file and hashes it while it
    is still in the CPU's cache: one pass over the bytes, no second copy. ``hexdigest`` reads and hashes the
    rest of the hashed range (through one reused buffer) and returns the file's digest, to compare with the seal.
    """

    def __init__(self, fd: int, seal: Seal, path: Path) -> None:
        self._fd, self._seal, self._path = fd, seal, path
        self._hasher = xxhash.xxh3_128()
        self.position = 0
        if hasattr(os, "posix_fadvise"):  # read front to back: a larger readahead window from a cold cache
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def readinto(self, buffer: Any) -> None:
        """Fill ``buffer`` with the next ``len(buffer)`` bytes of the file."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            piece = view[done : done + _CHUNK]
            n = os.preadv(self._fd, [piece], self.position)
            if n <= 0:
                raise CorruptCheckpointError(self._path, "the file became shorter while it was read")
            self._hash(piece[:n])
            done += n
            self.position += n

    def read(self, length: int) -> bytes:
        data = bytearray(length)
        self.readinto(data)
        return bytes(data)

    def _hash(self, chunk: memoryview) -> None:
        offset, limit = self.position, self._seal.hashed_length
        if offset >= limit:
            return
        chunk = chunk[: limit - offset]
        start, end = self._seal.zeroed
        lo, hi = max(start, offset), min(end, offset + len(chunk))
        if lo < hi:  # the digest's own digits are hashed as ASCII zeros
            self._hasher.update(chunk[: lo - offset])
            self._hasher.update(b"0" * (hi - lo))
            self._hasher.update(chunk[hi - offset :])
        else:
            self._hasher.update(chunk)

    def hexdigest(self) -> str:
        """The digest of bytes ``[0, hashed_length)``, reading what the caller has not read yet."""
        remaining = self._seal.hashed_length - self.position
        if remaining > 0:
            buffer = memoryview(bytearray(min(_CHUNK, remaining)))
            while self.position < self._seal.hashed_length:
                piece = buffer[: min(len(buffer), self._seal.hashed_length - self.position)]
                n = os.preadv(self._fd, [piece], self.position)
                if n <= 0:
                    break  # a short file: its digest differs from the recorded one
                self._hash(piece[:n])
                self.position += n
        return self._hasher.hexdigest()


def file_digest(seal: Seal, fd: int, path: Path) -> str:
    """:func:`compute_digest` of an open file, read through one reused buffer (no allocation per chunk)."""
    if not hasattr(os, "preadv"):  # not every platform has it
        return compute_digest(seal, file_reader(fd))
    return DigestingReader(fd, seal, path).hexdigest()


def file_reader(fd: int) -> ReadAt:
    def read_at(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return read_at


def bytes_reader(data: bytes | memoryview) -> ReadAt:
    view = memoryview(data)

    def read_at(offset: int, length: int) -> bytes:
        return bytes(view[offset : offset + length])

    return read_at
