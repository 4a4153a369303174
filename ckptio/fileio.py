"""Write one snapshot to one sealed checkpoint file; read, describe and verify such files."""

from __future__ import annotations

import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import formats
from .atomic import atomic_write, write_all_at
from .errors import CorruptCheckpointError
from .integrity import (
    DIGEST_PLACEHOLDER,
    ZSTD_LEADING_FRAME,
    DigestingReader,
    HashingWriter,
    Seal,
    container_of,
    file_digest,
    file_reader,
    read_seal,
    seal_zip_file,
    zstd_trailer,
)
from .records import SavedCheckpoint
from .snapshot import Snapshot
from .suffixes import format_of
from .torch_read import read_torch
from .zstd_body import MAX_ZSTD_EXPANSION, decompress, zstandard_module

__all__ = [
    "MAX_ZSTD_EXPANSION",
    "FileCheck",
    "SavedCheckpoint",
    "file_kind_of",
    "inner_format",
    "load",
    "load_shard",
    "read_meta",
    "verify_file",
    "write_checkpoint",
]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileCheck:
    """The outcome of verifying one file."""

    path: Path
    status: Literal["verified", "corrupt", "unsealed", "removed"]
    """``removed``: the file vanished while it was being verified (retention or ``clean``); not a fault."""
    reason: str
    digest: str | None = None
    meta: dict[str, Any] | None = None
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "corrupt"


def inner_format(path: Path) -> str:
    """``torch`` or ``safetensors``: the format inside the file, compressed or not."""
    return format_of(path)[0]


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
            compressor = zstandard_module().ZstdCompressor(level=level, threads=threads, write_checksum=True)
            counter = _CountingWriter()
            sink.write(ZSTD_LEADING_FRAME)
            with compressor.stream_writer(sink, closefd=False, write_size=2**20) as zstd_stream:
                tee = _Tee(zstd_stream, counter)
                if fmt == "torch":
                    formats.write_torch(snapshot, tee)  # type: ignore[arg-type]
                else:
                    formats.write_safetensors(snapshot, tee, meta)  # type: ignore[arg-type]
            meta["raw_size"] = counter.size
            placeholder = zstd_trailer(DIGEST_PLACEHOLDER, meta)
            _check_trailer_cost(placeholder)
            digest = sink.seal_with(placeholder, lambda d: zstd_trailer(d, meta))
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


def _check_trailer_cost(trailer: bytes) -> None:
    """Never write a trailer that reading refuses: its length is checked where it is built, its parse cost here."""
    try:
        formats.check_json_cost(trailer, "the new checkpoint", "its metadata")
    except CorruptCheckpointError:
        raise ValueError("the checkpoint's metadata= nests too many small values for ckptio to read back (it limits "
                         "what parsing a trailer may cost); pass flatter or less metadata") from None


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
    """Open a regular file for reading; never blocks (a FIFO, even behind a symlink) and never reads a device."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path} is a directory; name a checkpoint file inside it") from None
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory; name a checkpoint file inside it")
    raise CorruptCheckpointError(path, f"it is {file_kind_of(mode)}, not a regular file; only regular files are read")


def file_kind_of(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


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
    return _verify(Path(path), as_shard=False)


def _verify(path: Path, *, as_shard: bool) -> FileCheck:
    try:
        fd = _open_for_reading(path)
    except CorruptCheckpointError as exc:
        return FileCheck(path, "corrupt", exc.reason)
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
                _load_open(path, fd, None, verify=False, as_shard=as_shard)
            except CorruptCheckpointError as exc:
                return FileCheck(path, "corrupt", exc.reason, size=size)
            return FileCheck(path, "unsealed", "loadable, but it carries no ckptio digest to check", size=size)
        actual = file_digest(seal, fd, path)
        if actual != seal.digest:
            return FileCheck(path, "corrupt", f"digest mismatch: recorded {seal.digest}, computed {actual}",
                             digest=seal.digest, meta=seal.meta, size=size)
        problem = _shard_problem(path, seal, full=True, as_shard=as_shard)
        if problem:
            return FileCheck(path, "corrupt", problem, digest=seal.digest, meta=seal.meta, size=size)
        return FileCheck(path, "verified", "digest matches", digest=seal.digest, meta=seal.meta, size=size)
    finally:
        os.close(fd)


def _shard_problem(manifest: Path, seal: Seal, *, full: bool, as_shard: bool = False) -> str | None:
    """Why a sharded checkpoint is incomplete (a shard missing, damaged or not the one recorded), or None.

    A shard is data, never a manifest itself: following manifests from shards would let a chain of tiny files
    cost exponential time.
    """
    shards = seal.meta.get("shards")
    if not shards:
        return None
    if as_shard:
        return "it is a shard that lists shards of its own; a shard must hold data, not a manifest"
    if not isinstance(shards, list):
        return "the shard table in the manifest is damaged"
    seen: set[str] = set()
    # Two names of one file (symlinks, hard links) count as the file listed twice: otherwise a table of 200 links
    # to one 50 MB shard made verify hash 10 GB from 50 MB on disk (and a 16 MiB table allows 100,000 links).
    seen_files: set[tuple[int, int]] = set()
    for record in shards:
        if _shard_file(record) is None:
            return "the shard table in the manifest is damaged"
        if record["file"] in seen:
            return f"the shard table lists {record['file']} twice: damaged"
        seen.add(record["file"])
        shard = manifest.parent / record["file"]
        try:
            info = os.stat(shard)
        except (OSError, ValueError):  # missing, or a name no file can have (too long): not a table we wrote
            return f"shard {record['file']} is missing"
        if not stat.S_ISREG(info.st_mode):
            return f"shard {record['file']} is missing"
        if (info.st_dev, info.st_ino) in seen_files:
            return f"the shard table names one file twice ({record['file']} is another name of an earlier one)"
        seen_files.add((info.st_dev, info.st_ino))
        if full:
            check = _verify(shard, as_shard=True)
            if check.status != "verified":
                return f"shard {record['file']} is {check.status}: {check.reason}"
            digest = check.digest
        else:
            try:
                shard_seal, _ = read_meta(shard)
            except (ValueError, OSError) as exc:
                return f"shard {record['file']} is damaged: {exc}"
            if shard_seal is not None and shard_seal.meta.get("shards"):
                return f"shard {record['file']} lists shards of its own; a shard must hold data, not a manifest"
            digest = shard_seal.digest if shard_seal else None
        if digest != record.get("digest"):
            return f"shard {record['file']} is not the one this manifest recorded (digest {digest})"
    return None


def _shard_file(record: Any) -> str | None:
    """A shard record's ``NAME.shards/FILE``, or ``None`` when it is not one (a path that could leave the
    checkpoint directory, or not a string)."""
    name = record.get("file") if isinstance(record, dict) else None
    parts = name.split("/") if isinstance(name, str) else []
    return name if len(parts) == 2 and not any(part in ("", ".", "..") for part in parts) else None


def load_shard(path: str | os.PathLike[str], rank: int, map_location: Any = None) -> Any:
    """Load rank ``rank``'s shard of the sharded checkpoint whose manifest is ``path`` (digests checked)."""
    path = Path(path)
    seal, _ = read_meta(path)
    shards = seal.meta.get("shards") if seal else None
    if not shards or not isinstance(shards, list):
        raise ValueError(f"{path} is not a sharded checkpoint; load it with ckptio.load")
    record = next((r for r in shards if isinstance(r, dict) and r.get("rank") == rank), None)
    if record is None:
        raise ValueError(f"{path} has no shard for rank {rank}; it was written by {len(shards)} processes")
    if _shard_file(record) is None:
        raise CorruptCheckpointError(path, "the shard table in the manifest is damaged")
    shard = path.parent / record["file"]
    try:
        fd = _open_for_reading(shard)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, f"shard {record['file']} is missing") from None
    try:
        shard_seal = read_seal(shard, os.fstat(fd).st_size, file_reader(fd))
        if shard_seal is None or shard_seal.digest != record.get("digest"):
            raise CorruptCheckpointError(path, f"shard {record['file']} is not the one this manifest recorded")
        return _load_open(shard, fd, map_location, verify=True, as_shard=True)
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str], map_location: Any = None, *, verify: bool = True) -> Any:
    """Load a checkpoint written by ckptio (or a plain torch/safetensors file) after checking its digest.

    Raises :class:`CorruptCheckpointError` naming the file when its bytes do not match the recorded digest or
    its structure is broken. Never runs code from the file. Its structure is checked before anything the file
    declares (a header length, a raw size, a zip record's size) decides how much is read or allocated; see
    :data:`MAX_ZSTD_EXPANSION` for the one bound a legitimate file can meet.
    """
    path = Path(path)
    fd = _open_for_reading(path)
    try:
        return _load_open(path, fd, map_location, verify=verify, as_shard=False)
    finally:
        os.close(fd)


def _load_open(path: Path, fd: int, map_location: Any, *, verify: bool, as_shard: bool) -> Any:
    size = os.fstat(fd).st_size
    read_at = file_reader(fd)
    seal = read_seal(path, size, read_at)  # the first bytes and the seal only
    container = container_of(path)
    if seal is not None and verify and container == "safetensors" and hasattr(os, "preadv"):
        state = _read_safetensors_verified(path, fd, size, seal, map_location)
        if state is not _NOT_ONE_PASS:
            _check_shard(path, seal, as_shard)
            return state
    if seal is not None and verify:
        _check_digest(path, seal, file_digest(seal, fd, path))  # streamed through one reused buffer
    if seal is not None:
        _check_shard(path, seal, as_shard)
    if container == "zstd":
        raw = decompress(path, read_at, size, seal)
        if inner_format(path) == "safetensors":
            # Its layout first: a second copy of bytes its tensors do not cover would double a bomb's cost.
            formats.check_safetensors_layout(path, len(raw), lambda offset, size: bytes(raw[offset : offset + size]))
            data = bytes(raw)  # safetensors reads only bytes; free the other copy before it parses
            del raw
            return formats.read_safetensors(data, path, map_location)
        return read_torch(raw, path, map_location)
    if container == "safetensors":
        formats.check_safetensors_layout(path, size, read_at)  # before the file is read whole
        return formats.read_safetensors(_read_all(fd, size), path, map_location)
    # torch.load reads record by record from the file: no copy of the whole file is ever held.
    stream = open(fd, "rb", closefd=False)
    try:
        stream.seek(0)
        return read_torch(stream, path, map_location)
    finally:
        stream.close()


def _check_digest(path: Path, seal: Seal, actual: str) -> None:
    if actual != seal.digest:
        raise CorruptCheckpointError(
            path, f"digest mismatch: recorded {seal.digest}, computed {actual}; the file was damaged after "
            "it was written; load an older checkpoint"
        )


def _check_shard(path: Path, seal: Seal, as_shard: bool) -> None:
    problem = _shard_problem(path, seal, full=False, as_shard=as_shard)
    if problem:
        raise CorruptCheckpointError(path, f"{problem}; the sharded checkpoint is incomplete")


_NOT_ONE_PASS = object()


def _read_safetensors_verified(path: Path, fd: int, size: int, seal: Seal, map_location: Any) -> Any:
    """A sealed safetensors file read in one pass: each tensor's bytes go from the file straight into the
    tensor and are hashed there, then the digest is compared before anything is returned (a damaged file
    reports its digest mismatch first, whatever else is wrong with it). ``_NOT_ONE_PASS`` when its layout
    is not the plain one ckptio writes (it is then hashed first and parsed by safetensors)."""
    formats.check_safetensors_layout(path, size, file_reader(fd))  # its header's cost, before the data is read
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    reader = DigestingReader(fd, seal, path)
    header = formats.read_safetensors_header(reader.read(8 + length), path)
    plan = formats.safetensors_plan(header)
    if plan is None:
        return _NOT_ONE_PASS
    problem: CorruptCheckpointError | None = None
    try:
        state = formats.read_safetensors_tensors_into(reader, header, plan, path, map_location)
    except CorruptCheckpointError as exc:
        problem, state = exc, None
    _check_digest(path, seal, reader.hexdigest())
    if problem is not None:
        raise problem
    return state


def _read_all(fd: int, size: int) -> bytes:
    """The file's ``size`` bytes as one buffer (no second copy while reading)."""
    with open(fd, "rb", buffering=0, closefd=False) as raw:
        raw.seek(0)
        return raw.read(size)
