"""Writing a DCP checkpoint: :class:`Writer`, ckptio's ``StorageWriter`` (digests per item, atomic commit of
the whole directory). See :mod:`ckptio.dcp`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .atomic import create_new, fsync_directory, open_lock, temp_name, write_all_at
from .dcp_format import (
    _FORMAT,
    DATA_SUFFIX,
    DIGEST_ALGORITHM,
    METADATA_NAME,
    SEAL_NAME,
    WRITING_LOCK_NAME,
    _item_record,
    _SavePlanData,
)
from .zstd_body import zstandard_module

__all__ = [
    "Writer",
    "seal_and_rename",
]

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
        for rank_results in results:
            for result in rank_results:
                storage[result.index] = result.storage_data
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        seal_and_rename(staging, self.path, metadata, sync=self.sync_files)
        self._staging = None
        self._release_lock()

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


def seal_and_rename(staging: Path, final: Path, metadata: Metadata, *, sync: bool) -> None:
    """The commit of a staging directory whose data files are complete: ``.metadata`` and the seal written
    last, fsync'd with the directory, then renamed to ``final`` (never replacing it) and the parent fsync'd.

    ``metadata.storage_data`` must already hold every item's record."""
    files: dict[str, int] = {}
    for entry in os.scandir(staging):
        if entry.name != WRITING_LOCK_NAME:
            files[entry.name] = entry.stat(follow_symlinks=False).st_size
    raw = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
    _write_file(staging / METADATA_NAME, raw, sync=sync)
    seal = {"ckptio": 1, "format": _FORMAT, "algorithm": DIGEST_ALGORITHM,
            "metadata": {"size": len(raw), "xxh3": xxhash.xxh3_128_hexdigest(raw)},
            "files": dict(sorted(files.items())), "items": len(metadata.storage_data)}
    _write_file(staging / SEAL_NAME, json.dumps(seal, indent=1).encode(), sync=sync)
    if sync:
        fsync_directory(staging)
    if os.path.lexists(final):  # appeared while the ranks wrote: never replace it
        raise FileExistsError(f"{final} appeared while this checkpoint was written; it was not replaced "
                              f"(the new one is left in {staging})")
    _rename_no_replace(staging, final)
    with contextlib.suppress(OSError):
        os.unlink(final / WRITING_LOCK_NAME)
    if sync:
        fsync_directory(final.parent)


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
