"""Reading a DCP checkpoint: :class:`Reader`, ckptio's ``StorageReader`` (bounded reads, digests checked,
metadata unpickled with an allowlist, pickled values weights-only). See :mod:`ckptio.dcp`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import xxhash
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .dcp_format import DIGEST_ALGORITHM, MAX_METADATA_BYTES, MAX_SEAL_BYTES, METADATA_NAME, SEAL_NAME, is_ours
from .errors import CorruptCheckpointError
from .fileio import file_kind_of
from .formats import check_json_cost
from .torch_read import torch_load_error
from .zstd_body import physical_memory, zstandard_module

__all__ = [
    "Reader",
    "open_directory",
    "open_regular",
    "read_item",
]

# -- reading ---------------------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and nothing else: a planted ``.metadata`` cannot run code."""

    _ALLOWED: ClassVar[dict[str, set[str]]] = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "PurePosixPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata; refusing to build it")


def open_regular(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "missing: the checkpoint directory is incomplete") from None
    except OSError as exc:
        raise CorruptCheckpointError(path, f"cannot be opened ({exc.strerror}; a symlink is never followed)") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CorruptCheckpointError(path, f"it is {file_kind_of(mode)}, not a regular file")
    return fd


def _read_bounded(path: Path, limit: int) -> bytes:
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptCheckpointError(path, f"{size} bytes, more than the {limit} bytes allowed for it")
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise CorruptCheckpointError(path, "the file became shorter while it was read")
        return data
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Opened:
    metadata: Metadata
    seal: dict[str, Any] | None


def _read_seal(directory: Path) -> dict[str, Any] | None:
    path = directory / SEAL_NAME
    if not os.path.lexists(path):
        return None
    raw = _read_bounded(path, MAX_SEAL_BYTES)
    check_json_cost(raw, path, "the seal")
    try:
        seal = json.loads(raw)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(path, "the seal is not valid JSON") from None
    files = seal.get("files") if isinstance(seal, dict) else None
    meta = seal.get("metadata") if isinstance(seal, dict) else None
    if (not isinstance(files, dict) or not isinstance(meta, dict) or seal.get("algorithm") != DIGEST_ALGORITHM
            or type(meta.get("size")) is not int or not isinstance(meta.get("xxh3"), str)
            or not all(_plain_name(k) and type(v) is int for k, v in files.items())):
        raise CorruptCheckpointError(path, "the seal lacks the metadata digest or the file table")
    return seal


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def open_directory(directory: Path) -> _Opened:
    """The directory's metadata, checked against its seal when it has one."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    seal = _read_seal(directory)
    meta_path = directory / METADATA_NAME
    raw = _read_bounded(meta_path, MAX_METADATA_BYTES)
    if seal is not None:
        recorded = seal["metadata"]
        if len(raw) != recorded["size"]:
            raise CorruptCheckpointError(meta_path, f"{len(raw)} bytes, the seal records {recorded['size']}")
        actual = xxhash.xxh3_128_hexdigest(raw)
        if actual != recorded["xxh3"]:
            raise CorruptCheckpointError(meta_path, f"digest mismatch: recorded {recorded['xxh3']}, computed {actual}")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # pickle raises many types for damaged bytes
        raise CorruptCheckpointError(meta_path, f"not loadable DCP metadata ({str(exc)[:300]})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CorruptCheckpointError(meta_path, "not DCP metadata with a storage table")
    _check_storage_table(directory, metadata, seal)
    return _Opened(metadata, seal)


def _check_storage_table(directory: Path, metadata: Metadata, seal: dict[str, Any] | None) -> None:
    """Every item names a plain file of this directory and lies inside it: reads are bounded by the table."""
    meta_path = directory / METADATA_NAME
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if is_ours(info):
            fields = (info.get("offset"), info.get("length"), info.get("raw_length"))
            name = info.get("file")
            good = (all(type(v) is int and v >= 0 for v in fields) and isinstance(info.get("xxh3"), str)
                    and info.get("codec") in (None, "zstd"))
        else:
            name = getattr(info, "relative_path", None)
            fields = (getattr(info, "offset", None), getattr(info, "length", None))
            good = all(type(v) is int and v >= 0 for v in fields)
        if not good or not _plain_name(name):
            raise CorruptCheckpointError(meta_path, f"the storage record of item {_item_name(index)} is damaged")
        if name not in sizes:
            if seal is not None and name not in seal["files"]:
                raise CorruptCheckpointError(meta_path, f"item {_item_name(index)} names {name}, which the seal "
                                             "does not list")
            sizes[name] = _file_size(directory / name, seal)
        offset, length = fields[0], fields[1]
        if offset + length > sizes[name]:
            raise CorruptCheckpointError(
                directory / name, f"item {_item_name(index)} lies at bytes {offset}..{offset + length}, beyond the "
                f"file's {sizes[name]} bytes: the file is truncated")


def _file_size(path: Path, seal: dict[str, Any] | None) -> int:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "missing: the checkpoint directory is incomplete") from None
    if not stat.S_ISREG(info.st_mode):
        raise CorruptCheckpointError(path, f"it is {file_kind_of(info.st_mode)}, not a regular file")
    if seal is not None and info.st_size != seal["files"][path.name]:
        raise CorruptCheckpointError(path, f"{info.st_size} bytes, the seal records {seal['files'][path.name]}"
                                     + (": the file is truncated" if info.st_size < seal["files"][path.name] else ""))
    return info.st_size


def _item_name(index: MetadataIndex) -> str:
    offset = getattr(index, "offset", None)
    return f"{index.fqn!r}" + (f" (chunk at {list(offset)})" if offset is not None else "")


class Reader(StorageReader):
    """A DCP ``StorageReader`` for ckptio DCP directories (every item's digest checked) and plain ones written
    by torch's ``FileSystemWriter`` (structure checked; they carry no digest).

    Args:
        path: the checkpoint directory.
        trusted: allow pickled non-tensor values that a weights-only load refuses (arbitrary Python objects,
            whose loading can run code). Off by default: only plain data (numbers, strings, containers,
            tensors) is loaded.
    """

    def __init__(self, path: str | os.PathLike[str], *, trusted: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.trusted = trusted
        self.storage_data: dict[MetadataIndex, Any] = {}
        self.sealed = False
        self.load_id = str(uuid.uuid4())

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.load_id = str(uuid.uuid4())

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        opened = open_directory(self.path)
        self.sealed = opened.seal is not None
        metadata = opened.metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # Every rank reads the metadata that the coordinator read and broadcast: check it against this rank's
        # view of the directory too (a rank on a node whose copy is short).
        _check_storage_table(self.path, metadata, _read_seal(self.path))
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, dict[MetadataIndex, list[ReadItem]]] = defaultdict(lambda: defaultdict(list))
        for request in plan.items:
            info = self.storage_data[request.storage_index]
            by_file[info["file"] if is_ours(info) else info.relative_path][request.storage_index].append(request)
        for name, items in by_file.items():
            path = self.path / name
            fd = open_regular(path)
            try:
                # Each stored item is read once, whole, and checked, whatever number of ranks share it.
                for index, requests in sorted(items.items(), key=lambda kv: _offset(self.storage_data[kv[0]])):
                    info = self.storage_data[index]
                    value = read_item(fd, path, index, info, requests[0].type, trusted=self.trusted)
                    for request in requests:
                        _deliver(planner, request, value, path)
            finally:
                os.close(fd)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @property
    def checkpoint_id(self) -> str:
        return str(self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _offset(info: Any) -> int:
    return info["offset"] if is_ours(info) else info.offset


def read_item(fd: int, path: Path, index: MetadataIndex, info: Any, kind: LoadItemType, *,
               trusted: bool) -> Any:
    """One stored item: its tensor (whole chunk) or its bytes, checked against its digest where it has one."""
    name = _item_name(index)
    offset, length = (info["offset"], info["length"]) if is_ours(info) else (info.offset, info.length)
    stored = _pread_exactly(fd, length, offset)
    if stored is None:
        raise CorruptCheckpointError(path, f"item {name} ends beyond the end of the file: it is truncated")
    if not is_ours(info):
        return _read_plain_item(path, name, info, bytes(stored), kind, trusted=trusted)
    actual = xxhash.xxh3_128_hexdigest(stored)
    if actual != info["xxh3"]:
        raise CorruptCheckpointError(path, f"item {name}: digest mismatch (recorded {info['xxh3']}, computed "
                                     f"{actual}); the checkpoint is damaged")
    raw: bytes | bytearray = stored
    if info["codec"] == "zstd":
        raw = _decompress_item(path, name, stored, info["raw_length"])
    elif len(stored) != info["raw_length"]:
        raise CorruptCheckpointError(path, f"item {name}: stored {len(stored)} bytes, recorded {info['raw_length']}")
    if kind == LoadItemType.BYTE_IO:
        return _check_pickle(path, name, bytes(raw), trusted=trusted)
    return _tensor_from(path, name, raw, info)


def _pread_exactly(fd: int, length: int, offset: int) -> bytearray | None:
    """``length`` bytes at ``offset`` in a writable buffer that a tensor can then share (no second copy); ``None``
    if the file ends first."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    done = 0
    while done < length:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            return None
        done += count
    return buffer


def _decompress_item(path: Path, name: str, stored: bytes | bytearray, raw_length: int) -> bytes:
    if raw_length > physical_memory():
        raise CorruptCheckpointError(path, f"item {name} claims {raw_length} bytes, more than physical memory")
    zstandard = zstandard_module()
    try:
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(path, f"item {name}: zstd data is broken ({exc})") from None
    if len(raw) != raw_length:
        raise CorruptCheckpointError(path, f"item {name}: expands to {len(raw)} bytes, {raw_length} recorded")
    return raw


def _tensor_from(path: Path, name: str, raw: bytes | bytearray, info: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, str(info.get("dtype")), None)
    shape = info.get("shape")
    if not isinstance(dtype, torch.dtype) or not isinstance(shape, list) or not all(
            type(d) is int and d >= 0 for d in shape):
        raise CorruptCheckpointError(path, f"item {name}: its dtype or shape record is damaged")
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != len(raw):
        raise CorruptCheckpointError(path, f"item {name}: {len(raw)} bytes cannot hold {shape} of {dtype}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: a writable buffer, so that torch shares it instead of warning about read-only memory
    buffer = raw if isinstance(raw, bytearray) else bytearray(raw)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _check_pickle(path: Path, name: str, raw: bytes, *, trusted: bool) -> bytes:
    if not trusted:
        try:
            torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as exc:  # torch raises many types for refused or broken pickles
            raise CorruptCheckpointError(path, f"item {name}: {torch_load_error(exc)} (pass trusted=True to "
                                         "ckptio.dcp.Reader only for a checkpoint you wrote yourself)") from None
    return raw


def _read_plain_item(path: Path, name: str, info: Any, stored: bytes, kind: LoadItemType, *,
                     trusted: bool) -> Any:
    """An item of a torch ``FileSystemWriter`` directory: raw pickled bytes or one ``torch.save``d tensor."""
    if getattr(info, "transform_descriptors", None):
        raise CorruptCheckpointError(path, f"item {name} was written through stream extensions "
                                     f"{list(info.transform_descriptors)}; load it with torch's FileSystemReader")
    if kind == LoadItemType.BYTE_IO:
        return _check_pickle(path, name, stored, trusted=trusted)
    try:
        tensor = torch.load(io.BytesIO(stored), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptCheckpointError(path, f"item {name}: not a loadable tensor ({torch_load_error(exc)})") from None
    if not isinstance(tensor, torch.Tensor):
        raise CorruptCheckpointError(path, f"item {name}: holds a {type(tensor).__name__}, not a tensor")
    return tensor


def _deliver(planner: LoadPlanner, request: ReadItem, value: Any, path: Path) -> None:
    if request.type == LoadItemType.BYTE_IO:
        planner.load_bytes(request, io.BytesIO(value))
        return
    piece = value
    for dim, (start, size) in enumerate(zip(request.storage_offsets, request.lengths, strict=True)):
        if start + size > value.size(dim):
            raise CorruptCheckpointError(path, f"a read of {_item_name(request.storage_index)} reaches "
                                         "beyond the stored chunk; the metadata is damaged")
        if size < value.size(dim):
            piece = piece.narrow(dim, start, size)
    target = planner.resolve_tensor(request).detach()
    if target.size() != piece.size():
        raise CorruptCheckpointError(path, f"item {_item_name(request.storage_index)}: stored chunk "
                                     f"{list(piece.size())} does not fit the target {list(target.size())}")
    target.copy_(piece)
    planner.commit_tensor(request, target)
