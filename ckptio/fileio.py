"""Write one snapshot to one sealed checkpoint file; read, describe and verify such files."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zstandard

from . import formats
from .atomic import atomic_write, write_all_at
from .errors import CorruptCheckpointError
from .integrity import (
    DIGEST_PLACEHOLDER,
    ZSTD_LEADING_FRAME,
    HashingWriter,
    Seal,
    bytes_reader,
    compute_digest,
    container_of,
    file_reader,
    read_seal,
    seal_zip_file,
    zstd_trailer,
)
from .snapshot import Snapshot

__all__ = [
    "FileCheck",
    "SavedCheckpoint",
    "inner_format",
    "load",
    "load_shard",
    "read_meta",
    "verify_file",
    "write_checkpoint",
]

FORMAT_VERSION = 1
# A declared-size cap for zstd data we did not write (no recorded size): generous, but bounded.
_UNSEALED_EXPANSION_LIMIT = 64


@dataclass(frozen=True)
class SavedCheckpoint:
    """A committed checkpoint: durable under ``path``, with the digest recorded inside it."""

    path: Path
    name: str
    digest: str
    size: int
    meta: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class FileCheck:
    """The outcome of verifying one file."""

    path: Path
    status: Literal["verified", "corrupt", "unsealed"]
    reason: str
    digest: str | None = None
    meta: dict[str, Any] | None = None
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "corrupt"


def inner_format(path: Path) -> str:
    name = path.name[:-4] if path.name.endswith(".zst") else path.name
    return "safetensors" if name.endswith(".safetensors") else "torch"


def write_checkpoint(path: Path, snapshot: Snapshot, *, name: str, fmt: str, compression: str | None,
                     level: int = 1, threads: int = 0, fsync: bool = True, drop_page_cache: bool = False,
                     user_meta: dict[str, Any] | None = None,
                     shards: list[dict[str, Any]] | None = None) -> SavedCheckpoint:
    """Serialize ``snapshot`` into ``path`` atomically and durably, sealed with its digest."""
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "name": name,
        "format": fmt,
        "compression": compression,
        "created": time.time(),
        "summary": snapshot.summary,
        "tensors": len(snapshot.tensors),
        "elements": snapshot.element_count,
        "tensor_bytes": snapshot.tensor_bytes,
        "model_elements": snapshot.model_elements,
        "user": user_meta or {},
    }
    if shards:
        meta["shards"] = shards  # a manifest: valid only together with these files and digests
    with atomic_write(path, fsync=fsync, drop_page_cache=drop_page_cache) as file:
        sink = HashingWriter(file)
        if compression == "zstd":
            compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
            counter = _CountingWriter()
            sink.write(ZSTD_LEADING_FRAME)
            with compressor.stream_writer(sink, closefd=False, write_size=2**20) as zstd_stream:
                tee = _Tee(zstd_stream, counter)
                if fmt == "torch":
                    formats.write_torch(snapshot, tee)  # type: ignore[arg-type]
                else:
                    formats.write_safetensors(snapshot, tee, meta)  # type: ignore[arg-type]
            meta["raw_size"] = counter.size
            digest = sink.seal_with(zstd_trailer(DIGEST_PLACEHOLDER, meta), lambda d: zstd_trailer(d, meta))
        elif fmt == "torch":
            # Straight into our file, not through the hasher: the zip is sealed in place once complete.
            formats.write_torch(snapshot, file)  # type: ignore[arg-type]
            file.flush()
            meta["raw_size"] = os.fstat(file.fileno()).st_size
            digest, written = seal_zip_file(file.fileno(), meta)
            sink.size = written
        else:
            meta["raw_size"] = None  # the file itself; its size is known from stat
            placeholder_at = formats.write_safetensors(snapshot, sink, meta, digest_placeholder=DIGEST_PLACEHOLDER)
            digest = sink.hexdigest()
            file.flush()
            assert placeholder_at is not None
            write_all_at(file.fileno(), digest.encode(), placeholder_at)
        size = sink.size
    return SavedCheckpoint(path=path, name=name, digest=digest, size=size, meta=meta,
                           seconds=time.perf_counter() - started)


class _CountingWriter:
    size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n


@dataclass
class _Tee:
    main: Any
    counter: _CountingWriter

    def write(self, data: Any) -> int:
        self.counter.write(data)
        return self.main.write(data)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


def _open_for_reading(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        fd = None
    if fd is None or stat.S_ISDIR(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise IsADirectoryError(f"{path} is a directory; name a checkpoint file inside it")
    return fd


def read_meta(path: str | os.PathLike[str]) -> tuple[Seal | None, int]:
    """The file's seal (digest and meta) and size, reading only its end or header."""
    path = Path(path)
    fd = _open_for_reading(path)
    try:
        size = os.fstat(fd).st_size
        return read_seal(path, size, file_reader(fd)), size
    finally:
        os.close(fd)


def verify_file(path: str | os.PathLike[str]) -> FileCheck:
    """Re-read every byte and compare with the recorded digest (a full structural load for unsealed files)."""
    path = Path(path)
    try:
        fd = _open_for_reading(path)
    except OSError as exc:
        return FileCheck(path, "corrupt", str(exc))
    try:
        size = os.fstat(fd).st_size
        read_at = file_reader(fd)
        try:
            seal = read_seal(path, size, read_at)
        except (CorruptCheckpointError, ValueError) as exc:
            return FileCheck(path, "corrupt", getattr(exc, "reason", str(exc)), size=size)
        if seal is None:
            try:
                load(path, verify=False)
            except CorruptCheckpointError as exc:
                return FileCheck(path, "corrupt", exc.reason, size=size)
            return FileCheck(path, "unsealed", "loadable, but it carries no ckptio digest to check", size=size)
        actual = compute_digest(seal, read_at)
        if actual != seal.digest:
            return FileCheck(path, "corrupt", f"digest mismatch: recorded {seal.digest}, computed {actual}",
                             digest=seal.digest, meta=seal.meta, size=size)
        problem = _shard_problem(path, seal, full=True)
        if problem:
            return FileCheck(path, "corrupt", problem, digest=seal.digest, meta=seal.meta, size=size)
        return FileCheck(path, "verified", "digest matches", digest=seal.digest, meta=seal.meta, size=size)
    finally:
        os.close(fd)


def _shard_problem(manifest: Path, seal: Seal, *, full: bool) -> str | None:
    """Why a sharded checkpoint is incomplete (a shard missing, damaged or not the one recorded), or None."""
    shards = seal.meta.get("shards")
    if not shards:
        return None
    if not isinstance(shards, list):
        return "the shard table in the manifest is damaged"
    for record in shards:
        if not isinstance(record, dict) or not isinstance(record.get("file"), str) or "/" not in record["file"]:
            return "the shard table in the manifest is damaged"
        shard = manifest.parent / record["file"]
        if shard.parent.parent != manifest.parent or not shard.is_file():
            return f"shard {record['file']} is missing"
        if full:
            check = verify_file(shard)
            if check.status != "verified":
                return f"shard {record['file']} is {check.status}: {check.reason}"
            digest = check.digest
        else:
            try:
                shard_seal, _ = read_meta(shard)
            except (ValueError, OSError) as exc:
                return f"shard {record['file']} is damaged: {exc}"
            digest = shard_seal.digest if shard_seal else None
        if digest != record.get("digest"):
            return f"shard {record['file']} is not the one this manifest recorded (digest {digest})"
    return None


def load_shard(path: str | os.PathLike[str], rank: int, map_location: Any = None) -> Any:
    """Load rank ``rank``'s shard of the sharded checkpoint whose manifest is ``path`` (digests checked)."""
    path = Path(path)
    seal, _ = read_meta(path)
    shards = seal.meta.get("shards") if seal else None
    if not shards:
        raise ValueError(f"{path} is not a sharded checkpoint; load it with ckptio.load")
    record = next((r for r in shards if isinstance(r, dict) and r.get("rank") == rank), None)
    if record is None:
        raise ValueError(f"{path} has no shard for rank {rank}; it was written by {len(shards)} processes")
    shard = path.parent / record["file"]
    if not shard.is_file():
        raise CorruptCheckpointError(path, f"shard {record['file']} is missing")
    shard_seal, _ = read_meta(shard)
    if shard_seal is None or shard_seal.digest != record.get("digest"):
        raise CorruptCheckpointError(path, f"shard {record['file']} is not the one this manifest recorded")
    return load(shard, map_location)


def load(path: str | os.PathLike[str], map_location: Any = None, *, verify: bool = True) -> Any:
    """Load a checkpoint written by ckptio (or a plain torch/safetensors file) after checking its digest.

    Raises :class:`CorruptCheckpointError` naming the file when its bytes do not match the recorded digest or
    its structure is broken. Never runs code from the file.
    """
    path = Path(path)
    fd = _open_for_reading(path)
    try:
        data = _read_all(fd)
    finally:
        os.close(fd)
    seal = read_seal(path, len(data), bytes_reader(data))
    verified = seal is not None and verify
    if verified:
        assert seal is not None
        actual = compute_digest(seal, bytes_reader(data))
        if actual != seal.digest:
            raise CorruptCheckpointError(
                path, f"digest mismatch: recorded {seal.digest}, computed {actual}; the file was damaged after "
                "it was written; load an older checkpoint"
            )
    if seal is not None:
        problem = _shard_problem(path, seal, full=False)
        if problem:
            raise CorruptCheckpointError(path, f"{problem}; the sharded checkpoint is incomplete")
    if container_of(path) == "zstd":
        data = _decompress(path, data, seal, verified)
    if inner_format(path) == "safetensors":
        return formats.read_safetensors(data, path, map_location)
    return formats.read_torch(data, path, map_location)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 64 * 2**20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _decompress(path: Path, data: bytes, seal: Seal | None, verified: bool) -> bytes:
    body = memoryview(data)[seal.body_start : seal.body_length] if seal else memoryview(data)
    declared = seal.meta.get("raw_size") if seal else None
    if verified and isinstance(declared, int) and declared >= 0:
        # The digest vouches for every byte, so the frame is complete and the recorded size is true.
        try:
            result = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True).read(declared + 1)
        except zstandard.ZstdError as exc:
            raise CorruptCheckpointError(path, f"zstd data is broken ({exc})") from None
        if len(result) != declared:
            raise CorruptCheckpointError(path, f"zstd data expands to {len(result)} bytes, {declared} were recorded")
        return result
    return _decompress_untrusted(path, body, declared)


def _decompress_untrusted(path: Path, body: memoryview, declared: Any) -> bytes:
    """Decompress bytes no digest vouches for: bounded output, and the frame must really end."""
    limit = len(body) * _UNSEALED_EXPANSION_LIMIT + 2**20
    if isinstance(declared, int) and declared >= 0:
        limit = min(limit, declared)
    out = bytearray()
    # Small input chunks bound what one call can produce (zstd expands at most ~32768x).
    chunk = 4096
    decoder = zstandard.ZstdDecompressor().decompressobj()
    position = 0
    try:
        while position < len(body):
            out += decoder.decompress(body[position : position + chunk])
            position += chunk
            if len(out) > limit:
                raise CorruptCheckpointError(
                    path, f"zstd data expands beyond the {limit} bytes allowed for it; refusing to decompress further")
            if decoder.eof and (decoder.unused_data or position < len(body)):
                body = memoryview(bytes(decoder.unused_data) + bytes(body[position:]))
                position = 0
                decoder = zstandard.ZstdDecompressor().decompressobj()
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(path, f"zstd data is broken ({exc})") from None
    if not decoder.eof:
        raise CorruptCheckpointError(path, "the zstd stream ends early: the file is truncated")
    if isinstance(declared, int) and len(out) != declared:
        raise CorruptCheckpointError(path, f"zstd data expands to {len(out)} bytes, {declared} were recorded")
    return bytes(out)
