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

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import pickle
import shutil
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
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .atomic import create_new, fsync_directory, is_temporary, open_lock, temp_name, write_all_at
from .errors import CorruptCheckpointError
from .fileio import _file_kind
from .formats import check_json_cost, torch_load_error
from .naming import CheckpointEntry
from .zstd_body import physical_memory, zstandard_module

__all__ = [
    "METADATA_NAME",
    "SEAL_NAME",
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

METADATA_NAME = ".metadata"  # DCP's own name: tools that look for a DCP checkpoint (torchtitan's) find ours too
SEAL_NAME = ".ckptio-seal.json"
"""The seal of a ckptio DCP directory: the metadata's digest and every data file's size."""
DATA_SUFFIX = ".distcp"
WRITING_LOCK_NAME = ".ckptio-writing.lock"
DIGEST_ALGORITHM = "xxh3_128"
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


def _is_ours(info: Any) -> bool:
    return isinstance(info, dict) and info.get("format") == _FORMAT


@dataclass(frozen=True)
class _SavePlanData:
    """What the coordinator tells every rank in the global plan: where to write, under which file prefix."""

    staging: str
    prefix: str


# -- writing ---------------------------------------------------------------------------------------------------


class Writer(BlockingAsyncStager, StorageWriter):
    """A DCP ``StorageWriter`` that writes one ckptio DCP checkpoint directory per save.

    Args:
        path: the checkpoint directory to create. It must not exist yet: committing by rename never replaces a
            checkpoint, so a new save needs a new path (``reset(checkpoint_id)`` or ``checkpoint_id=``).
        compression: ``None`` or ``"zstd"`` (one zstd frame per item, so that resharded loads read items alone).
        level: the zstd level (1 is fast and reaches ~1.1x on trained fp32 state).
        sync_files: fsync data files, metadata and directories. Without it a power loss may lose a checkpoint
            that was reported committed (never the previous one: the rename still commits atomically).
        cache_staged_state_dict: for ``dcp.async_save``: stage into host buffers allocated at the first save and
            reused (pinned when CUDA is available). Wait for a save's future before the next ``async_save``:
            the buffers of the save still being written are the ones the next one would overwrite.
    """

    def __init__(self, path: str | os.PathLike[str], *, compression: str | None = None, level: int = 1,
                 sync_files: bool = True, cache_staged_state_dict: bool = False) -> None:
        if compression not in (None, "zstd"):
            raise ValueError(f"compression={compression!r}: use None or 'zstd'")
        if compression == "zstd":
            zstandard = zstandard_module()
            if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
                raise ValueError(f"level={level}: a zstd level is 1..{zstandard.MAX_COMPRESSION_LEVEL}")
        StorageWriter.__init__(self)
        BlockingAsyncStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict)
        self.path = Path(path)
        self.compression = compression
        self.level = level
        self.sync_files = sync_files
        self.save_id = str(uuid.uuid4())
        self.is_coordinator = False
        self.rank: int | None = None
        self._staging: Path | None = None
        self._lock_fd: int | None = None

    def __del__(self) -> None:
        self._release_lock()

    def _release_lock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def __getstate__(self) -> dict[str, Any]:
        # DCP's process mode sends the writer to its worker before the lock exists; a descriptor never travels.
        state = self.__dict__.copy()
        state["_lock_fd"] = None
        return state

    # DCP's verbs, in the order it calls them -----------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)
        self.save_id = str(uuid.uuid4())
        self._staging = None
        self._release_lock()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True) and _world_size() > 1:
            raise ValueError("ckptio.dcp.Writer commits one directory for all ranks, which needs DCP's rank "
                             "coordination: call dcp.save / dcp.async_save with use_collectives=True (the default)")
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator only: refuse an existing path before any rank writes, create the shared staging
        directory and give each rank its file prefix."""
        final = self.path
        if os.path.lexists(final):
            raise FileExistsError(
                f"{final} already exists; ckptio.dcp.Writer commits a checkpoint by renaming a complete directory "
                "into place and never replaces one: save to a new path (one per step), or delete the old one")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / temp_name(final.name)
        staging.mkdir(mode=0o755)  # mkdir never follows a symlink: a planted one makes it fail
        self._release_lock()
        # Held until the commit (or the next save, or this writer's end): `ckptio clean` sweeps a staging
        # directory only when nobody holds its lock, so a save in flight is never swept, a crashed one always.
        self._lock_fd = open_lock(staging / WRITING_LOCK_NAME)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return [dataclasses.replace(plan, storage_data=_SavePlanData(str(staging), f"__{i}_"))
                for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        data: _SavePlanData = plan.storage_data
        self._staging = Path(data.staging)
        file_name = f"{data.prefix}0{DATA_SUFFIX}"
        results = _write_items(self._staging / file_name, file_name, plan.items, planner,
                               compression=self.compression, level=self.level, sync=self.sync_files)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The commit: metadata and seal into the staging directory, fsync, rename into place, fsync parent."""
        staging = self._staging
        if staging is None:
            raise RuntimeError("finish() before write_data(): DCP calls them in that order on the coordinator")
        storage: dict[MetadataIndex, Any] = {}
        files: dict[str, int] = {}
        for rank_results in results:
            for result in rank_results:
                storage[result.index] = result.storage_data
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        for entry in os.scandir(staging):
            if entry.name != WRITING_LOCK_NAME:
                files[entry.name] = entry.stat(follow_symlinks=False).st_size
        raw = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        _write_file(staging / METADATA_NAME, raw, sync=self.sync_files)
        seal = {"ckptio": 1, "format": _FORMAT, "algorithm": DIGEST_ALGORITHM,
                "metadata": {"size": len(raw), "xxh3": xxhash.xxh3_128_hexdigest(raw)},
                "files": dict(sorted(files.items())), "items": len(storage)}
        _write_file(staging / SEAL_NAME, json.dumps(seal, indent=1).encode(), sync=self.sync_files)
        if self.sync_files:
            fsync_directory(staging)
        if os.path.lexists(self.path):  # appeared while the ranks wrote: never replace it
            raise FileExistsError(f"{self.path} appeared while this checkpoint was written; it was not replaced "
                                  f"(the new one is left in {staging})")
        _rename_no_replace(staging, self.path)
        self._staging = None
        with contextlib.suppress(OSError):
            os.unlink(self.path / WRITING_LOCK_NAME)
        self._release_lock()
        if self.sync_files:
            fsync_directory(self.path.parent)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    @property
    def checkpoint_id(self) -> str:
        return str(self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``dcp.async_save``'s copy to host memory (the only part the training thread waits for)."""
        if not self.cache_staged_state_dict:
            return super().stage(state_dict)
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        if self.state_dict_cache is None:
            # Pinning needs CUDA; on a CPU-only machine plain buffers are what there is.
            self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self.state_dict_cache)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename a directory, failing if ``target`` exists: plain ``rename`` would silently replace an empty
    directory created under the checkpoint's name after the last check."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28: the check just before the rename is what there is
        os.rename(source, target)
        return
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):  # a kernel or file system without the flag
        os.rename(source, target)
        return
    if code == errno.EEXIST:
        raise FileExistsError(code, f"{target} appeared while this checkpoint was written; it was not replaced "
                              f"(the new one is left in {source})", str(target))
    raise OSError(code, os.strerror(code), str(target))


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _write_file(path: Path, data: bytes, *, sync: bool) -> None:
    fd = create_new(path)
    try:
        write_all_at(fd, data, 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy where it is already a dense CPU tensor."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous().reshape(-1)
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.view(torch.uint8).numpy())


def _write_items(path: Path, file_name: str, items: list[WriteItem], planner: SavePlanner, *,
                 compression: str | None, level: int, sync: bool) -> list[WriteResult]:
    compressor = zstandard_module().ZstdCompressor(level=level) if compression == "zstd" else None
    results = []
    fd = create_new(path)
    try:
        offset = 0
        for item in items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(bytes(data))
                tensor = None
            else:
                if not isinstance(data, torch.Tensor):
                    raise TypeError(f"the planner gave a {type(data).__name__} for tensor item {item.index.fqn}")
                tensor = data
                raw = _tensor_bytes(tensor)
            stored: memoryview | bytes = compressor.compress(raw) if compressor is not None else raw
            digest = xxhash.xxh3_128_hexdigest(stored)
            write_all_at(fd, stored, offset)
            length = len(stored) if isinstance(stored, bytes) else stored.nbytes
            record = _item_record(file_name, offset, length, digest, compression, raw.nbytes, tensor)
            results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=record))
            offset += length
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return results


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


def _open_regular(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "missing: the checkpoint directory is incomplete") from None
    except OSError as exc:
        raise CorruptCheckpointError(path, f"cannot be opened ({exc.strerror}; a symlink is never followed)") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CorruptCheckpointError(path, f"it is {_file_kind(mode)}, not a regular file")
    return fd


def _read_bounded(path: Path, limit: int) -> bytes:
    fd = _open_regular(path)
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
        if _is_ours(info):
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
        raise CorruptCheckpointError(path, f"it is {_file_kind(info.st_mode)}, not a regular file")
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
            by_file[info["file"] if _is_ours(info) else info.relative_path][request.storage_index].append(request)
        for name, items in by_file.items():
            path = self.path / name
            fd = _open_regular(path)
            try:
                # Each stored item is read once, whole, and checked, whatever number of ranks share it.
                for index, requests in sorted(items.items(), key=lambda kv: _offset(self.storage_data[kv[0]])):
                    info = self.storage_data[index]
                    value = _read_item(fd, path, index, info, requests[0].type, trusted=self.trusted)
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
    return info["offset"] if _is_ours(info) else info.offset


def _read_item(fd: int, path: Path, index: MetadataIndex, info: Any, kind: LoadItemType, *,
               trusted: bool) -> Any:
    """One stored item: its tensor (whole chunk) or its bytes, checked against its digest where it has one."""
    name = _item_name(index)
    offset, length = (info["offset"], info["length"]) if _is_ours(info) else (info.offset, info.length)
    stored = _pread_exactly(fd, length, offset)
    if stored is None:
        raise CorruptCheckpointError(path, f"item {name} ends beyond the end of the file: it is truncated")
    if not _is_ours(info):
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


# -- inspecting directories (CLI, retention) ------------------------------------------------------------------


def is_dcp_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a committed DCP checkpoint directory (ours or torch's): a real directory, not one of
    our staging directories, holding the metadata file."""
    path = Path(path)
    try:
        return (stat.S_ISDIR(os.lstat(path).st_mode) and not is_temporary(path.name)
                and os.path.lexists(path / METADATA_NAME))
    except OSError:
        return False


@dataclass(frozen=True)
class DirectoryCheck:
    """The outcome of :func:`verify_directory`: ``status`` is ``verified``, ``unsealed`` or ``corrupt``."""

    path: Path
    status: str
    reason: str
    items: int = 0
    size: int = 0
    damaged: tuple[str, ...] = ()
    """``file: reason`` for each damaged file or item."""

    @property
    def ok(self) -> bool:
        return self.status != "corrupt"


def verify_directory(path: str | os.PathLike[str]) -> DirectoryCheck:
    """Re-read every item of a DCP checkpoint directory and check it: the digests of a ckptio directory, the
    structure (every tensor loadable) of a plain one. Every damaged item is listed, not only the first."""
    path = Path(path)
    size = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path)) if path.is_dir() else 0
    try:
        opened = open_directory(path)
    except CorruptCheckpointError as exc:
        return DirectoryCheck(path, "corrupt", str(exc), size=size, damaged=(str(exc),))
    storage = opened.metadata.storage_data
    damaged: list[str] = []
    by_file: dict[str, list[MetadataIndex]] = defaultdict(list)
    for index, info in storage.items():
        by_file[info["file"] if _is_ours(info) else info.relative_path].append(index)
    types = opened.metadata.state_dict_metadata
    for name, indices in sorted(by_file.items()):
        file = path / name
        try:
            fd = _open_regular(file)
        except CorruptCheckpointError as exc:
            damaged.append(str(exc))
            continue
        try:
            for index in indices:
                kind = (LoadItemType.TENSOR if hasattr(types.get(index.fqn), "chunks") else LoadItemType.BYTE_IO)
                try:
                    # pickled values are checked as data (weights-only), never run
                    _read_item(fd, file, index, storage[index], kind, trusted=False)
                except CorruptCheckpointError as exc:
                    damaged.append(str(exc))
        finally:
            os.close(fd)
    if damaged:
        return DirectoryCheck(path, "corrupt", damaged[0], len(storage), size, tuple(damaged))
    if opened.seal is None:
        return DirectoryCheck(path, "unsealed", "loadable, but written without ckptio: no digests to check",
                              len(storage), size)
    return DirectoryCheck(path, "verified", "every item's digest matches", len(storage), size)


def dcp_leftovers(directory: str | os.PathLike[str]) -> list[Path]:
    """Staging directories of DCP saves in ``directory`` that crashed or failed: their coordinator no longer
    holds their lock (a save in flight always does, from before any rank writes until its commit)."""
    found = []
    for entry in os.scandir(directory):
        if is_temporary(entry.name) and entry.is_dir(follow_symlinks=False) and _looks_like_dcp_staging(entry.path):
            if not _held(Path(entry.path) / WRITING_LOCK_NAME):
                found.append(Path(entry.path))
    return found


def remove_dcp_leftovers(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete :func:`dcp_leftovers`; return what was deleted."""
    removed = dcp_leftovers(directory)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)  # never follows a symlink inside the tree
    return removed


def _held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _looks_like_dcp_staging(path: str) -> bool:
    with contextlib.suppress(OSError), os.scandir(path) as it:
        return all(e.name.endswith(DATA_SUFFIX) or e.name in (METADATA_NAME, SEAL_NAME, WRITING_LOCK_NAME)
                   for e in it)
    return False


def delete_dcp_directory(path: Path) -> None:
    """Remove a DCP checkpoint directory: first renamed to a hidden temporary name (from then on it no longer
    passes for a checkpoint, and an interrupted delete is a leftover), then removed."""
    doomed = path.parent / temp_name(path.name)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


@dataclass(frozen=True)
class DcpEntry:
    """A committed DCP checkpoint directory as seen by ``stat`` (no byte of it read)."""

    path: Path
    name: str
    size: int
    mtime_ns: int
    sealed: bool


def scan_dcp(directory: str | os.PathLike[str]) -> list[DcpEntry]:
    """DCP checkpoint directories directly inside ``directory`` (ours and plain), newest first."""
    entries = []
    with os.scandir(directory) as it:
        for item in it:
            if item.name.startswith(".") or not is_dcp_directory(item.path):
                continue
            size, newest = 0, 0
            with contextlib.suppress(OSError), os.scandir(item.path) as inner:
                for sub in inner:
                    info = sub.stat(follow_symlinks=False)
                    size += info.st_size
                    newest = max(newest, info.st_mtime_ns)
            entries.append(DcpEntry(Path(item.path), item.name, size, newest,
                                    os.path.lexists(Path(item.path) / SEAL_NAME)))
    entries.sort(key=lambda e: (e.mtime_ns, e.name), reverse=True)
    return entries


def checkpoint_entries(directory: str | os.PathLike[str],
                       protected_names: tuple[str, ...] = ("best_model",)) -> list[CheckpointEntry]:
    """:func:`scan_dcp` as the listing entries that retention and ``clean`` plan over (newest first); a
    directory's suffix is ``"/"``."""
    entries = [CheckpointEntry(path=e.path, name=e.name, suffix="/", size=e.size, mtime_ns=e.mtime_ns,
                               protected=e.name in protected_names) for e in scan_dcp(directory)]
    entries.sort(key=lambda e: e.order_key, reverse=True)
    return entries
