"""One rank's part of a sharded (DCP) save by :class:`~ckptio.dcp_manager.ShardedCheckpointManager`, as the
writer (thread or process) runs it, with no collective.

Every rank writes its items into the save's staging directory (one data file, the record format of
:class:`ckptio.dcp.Writer`), then a sealed results file: its items, their records and its plan's mappings.

* **Rank 0** waits (polling, bounded by ``timeout``) for every rank's results, builds DCP's ``Metadata`` with
  DCP's own planner, writes ``.metadata`` and the seal last, renames the directory into place, applies the
  sharded retention, and only then writes the save's *outcome file* ``DIRECTORY/.TOKEN.ckptio-outcome``:
  committed, or failed with the error's text.
* **Other ranks** wait (bounded) for that outcome file and report the same outcome. A rank whose own write
  failed says so in its results file, so that rank 0 gives up at once instead of at its timeout.

So every rank's ``wait()`` agrees on whether the checkpoint was committed, and returns after rank 0's
retention: no rank lists a directory that rank 0 is still deleting. Only a rank that dies or hangs makes the
others fail by timeout (the checkpoint is then not committed either).

A rank that gives up waiting must not be overtaken by a rank 0 that was only late: the first *decision* on a
save, ``DIRECTORY/.TOKEN.ckptio-decision`` created without replacing (a hard link), stands. Rank 0 decides
"commit" before its rename; a rank that times out decides "abandon". Whoever finds the other's decision
follows it: a late rank 0 gives the save up, a rank that finds rank 0 committing waits for its outcome.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pickle
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from .atomic import TEMP_SUFFIX, create_new, fsync_directory, open_lock, write_all_at
from .dcp_format import DATA_SUFFIX, RESULTS_SUFFIX, WRITING_LOCK_NAME
from .errors import CheckpointWriteError

__all__ = ["DECISION_SUFFIX", "OUTCOME_SUFFIX", "DcpJob", "decision_path", "outcome_path", "refuse", "run_dcp_job",
           "run_of", "settle_lost", "staging_path"]

OUTCOME_SUFFIX = ".ckptio-outcome"
DECISION_SUFFIX = ".ckptio-decision"
_POLL_SECONDS = 0.02
_DECISION_READS = 250  # 5 s of polls: a decision file is filled in right after it is created


@dataclass
class DcpJob:
    """What a writer needs besides the staged tensors to write one rank's part of a sharded save."""

    directory: str
    """The manager's directory: the checkpoint, its staging directory and the outcome file live there."""
    name: str
    target: str
    """Where the committed directory is renamed to: ``directory/name``, or a hidden name swapped in afterwards
    for a name that is saved again (``best_model``)."""
    token: str
    """Unique per save and equal on every rank, ``RUN-TICKET``: names the staging directory and the outcome file."""
    rank: int
    world_size: int
    items: list[WriteItem]
    """This rank's items, in the order of its data file."""
    sources: list[str | None]
    """Per item: its key in the staged flat state, or ``None`` for a serialized value in ``blobs``."""
    blobs: dict[int, bytes] = field(default_factory=dict)
    planner_data: Any = None
    left_to_rank_0: list[str] = field(default_factory=list)
    """The keys of this rank's plain values (not DTensors), which only rank 0 writes: rank 0 fails the save if
    it has not got one of them, rather than commit a checkpoint without it."""
    compression: str | None = None
    level: int = 1
    sync: bool = True
    timeout: float = 600.0
    keep_count: int | None = None
    disk_budget: int | None = None


def staging_path(directory: Path, target_name: str, token: str) -> Path:
    """The staging directory every rank of one save writes into, named without any exchange between ranks."""
    return directory / f".{target_name}.{token}{TEMP_SUFFIX}"


def outcome_path(directory: Path, token: str) -> Path:
    return directory / f".{token}{OUTCOME_SUFFIX}"


def decision_path(directory: Path, token: str) -> Path:
    return directory / f".{token}{DECISION_SUFFIX}"


def run_of(token: str) -> str:
    """The run (one manager on every rank) a save's token belongs to: tokens are ``RUN-TICKET``."""
    return token.rpartition("-")[0]


def run_dcp_job(job: DcpJob, tensors: dict[str, torch.Tensor]) -> int:
    """Write this rank's part; on rank 0 also commit. Return how many old checkpoints retention deleted; raise
    if the save was not committed (on every rank alike)."""
    directory = Path(job.directory)
    target = Path(job.target)
    staging = staging_path(directory, target.name, job.token)
    lock_fd = None
    try:
        staging.mkdir(mode=0o755, exist_ok=True)
        if job.rank == 0:
            # Held until the outcome is known: a sweep (a restarted run, `ckptio clean`) never takes a save in flight.
            lock_fd = open_lock(staging / WRITING_LOCK_NAME)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            records = _write_rank(job, staging, tensors)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _write_results(staging, job.rank, {"token": job.token, "ok": False,
                                                   "error": f"rank {job.rank}: {type(exc).__name__}: {exc}"},
                               sync=job.sync)
            raise
        _write_results(staging, job.rank, {"token": job.token, "ok": True, "items": job.items,
                                           "results": records, "planner_data": job.planner_data,
                                           "left_to_rank_0": job.left_to_rank_0}, sync=job.sync)
        if job.rank != 0:
            return _await_outcome(job)
        return _commit(job, staging, target)
    except BaseException as exc:
        if job.rank == 0 and not isinstance(exc, _CommittedButRetentionFailed):
            # the other ranks wait for this verdict: they must hear it, not time out
            with contextlib.suppress(OSError):
                _write_outcome(directory, job.token, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            if target != directory / job.name and _saved_by(target, job.token):
                # A replacement that was never swapped in: left under its hidden name, it would block every
                # later save of this name until a restart.
                from .dcp_inspect import delete_dcp_directory

                with contextlib.suppress(OSError):  # the save's own error is what the caller must hear
                    delete_dcp_directory(target)
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def refuse(job: DcpJob, error: BaseException) -> None:
    """This rank gives the save up before its writer got it (e.g. a value that cannot be pickled): tell the other
    ranks now, as a failed write would, so that they fail at once instead of at their timeout."""
    directory = Path(job.directory)
    text = f"rank {job.rank}: {type(error).__name__}: {error}"
    with contextlib.suppress(OSError):
        if job.rank == 0:
            _write_outcome(directory, job.token, {"ok": False, "error": text})
        else:
            staging = staging_path(directory, Path(job.target).name, job.token)
            staging.mkdir(mode=0o755, exist_ok=True)
            _write_results(staging, job.rank, {"token": job.token, "ok": False, "error": text}, sync=False)


def settle_lost(job: DcpJob, reason: str) -> None:
    """This rank's writer died with the save in flight (``reason``): make the save's outcome the one every rank
    reports. Return if it was committed, raise if not."""
    directory = Path(job.directory)
    decision = _decide(directory, job.token, {"commit": False, "error": f"rank {job.rank}: {reason}"})
    if not decision.get("commit"):  # given up before rank 0 began its commit: rank 0 will not commit it either
        with contextlib.suppress(OSError):
            _write_outcome(directory, job.token, {"ok": False, "error": decision.get("error")})
        raise CheckpointWriteError(f"{decision.get('error')}; the save was given up on every rank (the previous "
                                   "checkpoint is intact)")
    if job.rank != 0:
        _await_outcome(job)  # rank 0's writer is committing it
        return
    # Rank 0's own writer died while committing: nothing changes on disk any more, so the name says it.
    committed = _saved_by(directory / job.name, job.token)
    if Path(job.target) != directory / job.name:  # the hidden name of a replacement: the new one or the old one
        from .dcp_inspect import delete_dcp_directory

        delete_dcp_directory(Path(job.target))
    if committed:
        _write_outcome(directory, job.token, {"ok": True})
        return
    error = f"rank 0: {reason} while committing {job.name}"
    _write_outcome(directory, job.token, {"ok": False, "error": error})
    raise CheckpointWriteError(f"{error}; the checkpoint was not committed (the previous one stays valid)")


def _saved_by(path: Path, token: str) -> bool:
    from .dcp_reader import open_directory

    try:
        storage_meta = open_directory(path).metadata.storage_meta
    except (OSError, ValueError):
        return False
    return storage_meta is not None and storage_meta.save_id == token


class _Staged:
    """Hands the writer's item loop what the planner resolved in the training thread, from the staging slot."""

    def __init__(self, job: DcpJob, tensors: dict[str, torch.Tensor]) -> None:
        self._by_index = {item.index: i for i, item in enumerate(job.items)}
        self._job = job
        self._tensors = tensors

    def resolve_data(self, item: WriteItem) -> Any:
        position = self._by_index[item.index]
        key = self._job.sources[position]
        if key is None:
            return io.BytesIO(self._job.blobs[position])
        return self._tensors[key]


def _write_rank(job: DcpJob, staging: Path, tensors: dict[str, torch.Tensor]) -> list[WriteResult]:
    from .dcp_writer import _write_items

    file_name = f"__{job.rank}_0{DATA_SUFFIX}"
    return _write_items(staging / file_name, file_name, job.items, _Staged(job, tensors),  # type: ignore[arg-type]
                        compression=job.compression, level=job.level, sync=job.sync)


def _results_path(staging: Path, rank: int) -> Path:
    return staging / f"__{rank}_0{DATA_SUFFIX}{RESULTS_SUFFIX}"


def _write_results(staging: Path, rank: int, content: dict[str, Any], *, sync: bool) -> None:
    """Written under a temporary name and renamed: rank 0 never reads a partial one."""
    final = _results_path(staging, rank)
    partial = staging / f".{final.name}.{os.getpid()}{TEMP_SUFFIX}"
    _write_whole(partial, pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL), sync=sync)
    os.rename(partial, final)


def _write_outcome(directory: Path, token: str, content: dict[str, Any]) -> None:
    final = outcome_path(directory, token)
    partial = directory / f"{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    _write_whole(partial, json.dumps(content).encode(), sync=True)
    os.rename(partial, final)
    fsync_directory(directory)


def _decide(directory: Path, token: str, content: dict[str, Any]) -> dict[str, Any]:
    """Make ``content`` the decision on this save unless one was made before; return the one that stands."""
    final = decision_path(directory, token)
    data = json.dumps(content).encode()
    partial = directory / f"{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    _write_whole(partial, data, sync=True)
    try:
        os.link(partial, final)  # never replaces: of two ranks deciding at once, one wins and the other reads it
    except FileExistsError:
        return _read_decision(final)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        try:  # a file system without hard links (some FUSE mounts): created exclusively, then filled in
            _write_whole(final, data, sync=True)
        except FileExistsError:
            return _read_decision(final)
    finally:
        os.unlink(partial)
    fsync_directory(directory)
    return content


def _read_decision(path: Path) -> dict[str, Any]:
    """The decision another rank made; without hard links it may still be being filled in."""
    for _ in range(_DECISION_READS):
        with contextlib.suppress(ValueError):
            content = json.loads(path.read_bytes())
            if isinstance(content, dict):
                return content
        time.sleep(_POLL_SECONDS)
    # Its maker died between creating and filling it in: nobody commits what nobody can read.
    return {"commit": False, "error": f"{path.name} could not be read"}


def _write_whole(path: Path, data: bytes, *, sync: bool) -> None:
    fd = create_new(path)
    try:
        write_all_at(fd, data, 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _await_results(job: DcpJob, staging: Path) -> list[dict[str, Any]]:
    """Rank 0: every rank's results for this save, polling the filesystem (never a collective)."""
    deadline = time.monotonic() + job.timeout
    table: dict[int, dict[str, Any]] = {}
    while True:
        for rank in range(job.world_size):
            if rank in table:
                continue
            try:
                content = pickle.loads(_results_path(staging, rank).read_bytes())  # written by our own ranks
            except FileNotFoundError:
                continue
            if content.get("token") != job.token:
                continue
            if not content["ok"]:
                raise CheckpointWriteError(f"{content['error']}; the checkpoint was not committed (the previous "
                                           "one stays valid)")
            table[rank] = content
        if len(table) == job.world_size:
            return [table[rank] for rank in range(job.world_size)]
        if time.monotonic() > deadline:
            missing = sorted(set(range(job.world_size)) - set(table))
            raise CheckpointWriteError(
                f"ranks {missing} did not write their part of {job.name} within {job.timeout}s; the checkpoint "
                "was not committed (the previous one stays valid)")
        time.sleep(_POLL_SECONDS)


def _commit(job: DcpJob, staging: Path, target: Path) -> int:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from .dcp_commit import apply_retention, swap_in
    from .dcp_writer import seal_and_rename

    directory = Path(job.directory)
    ranks = _await_results(job, staging)
    # Every rank has finished its previous save (it wrote this one's results), so it read that save's outcome.
    # Only this run's: another manager on this directory has ranks that may still be waiting for theirs.
    for suffix in (OUTCOME_SUFFIX, DECISION_SUFFIX):
        for stale in directory.glob(f".{run_of(job.token)}-*{suffix}"):
            if not stale.name.startswith(f".{job.token}."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
    # Rank 0 holds the lock only from its own start: a sweep (another run starting, `ckptio clean`) may have
    # taken a part written before then, with the rank's results landing in the directory made again after.
    for rank, content in enumerate(ranks):
        data = staging / f"__{rank}_0{DATA_SUFFIX}"
        wrote = sum(result.size_in_bytes for result in content["results"])
        try:
            found: int | None = data.stat().st_size
        except FileNotFoundError:
            found = None
        if found != wrote:
            now = "is missing" if found is None else f"holds {found}"
            raise CheckpointWriteError(
                f"rank {rank} wrote {wrote} bytes into {data.name}, but it {now} (was the staging directory swept "
                "while this save was in flight?); the checkpoint was not committed (the previous one stays valid)")
    plans = [SavePlan(items=content["items"], planner_data=content["planner_data"] or {}) for content in ranks]
    # DCP's own planner builds the metadata (chunks, mappings) and checks that the chunks cover every tensor.
    _, metadata = DefaultSavePlanner().create_global_plan(plans)
    for rank, content in enumerate(ranks):
        missing = [key for key in content.get("left_to_rank_0", ()) if key not in metadata.state_dict_metadata]
        if missing:
            raise CheckpointWriteError(
                f"rank {rank} has {missing[:5]} but rank 0 has not: plain values (not DTensors) are saved from rank "
                "0 only, so give every rank the same keys (a per-rank value: a DTensor, or one key on every rank); "
                "the checkpoint was not committed (the previous one stays valid)")
    storage: dict[MetadataIndex, Any] = {}
    for content in ranks:
        for result in content["results"]:
            storage.setdefault(result.index, result.storage_data)
    metadata.storage_data = storage
    metadata.storage_meta = StorageMeta(checkpoint_id=str(target), save_id=job.token)
    decision = _decide(directory, job.token, {"commit": True})
    if not decision.get("commit"):
        raise CheckpointWriteError(f"{decision.get('error')}; the checkpoint was not committed (the previous one "
                                   "stays valid)")
    for rank in range(job.world_size):
        os.unlink(_results_path(staging, rank))
    seal_and_rename(staging, target, metadata, sync=job.sync)
    swap_in(directory, job.name)  # a failure here leaves the old one under the name: not committed
    try:
        deleted = apply_retention(directory, job.name, keep_count=job.keep_count,
                                              disk_budget=job.disk_budget)
    except Exception as exc:  # committed all the same: every rank says so, and what went wrong after
        error = f"{job.name} was committed, but deleting old checkpoints failed: {type(exc).__name__}: {exc}"
        _write_outcome(directory, job.token, {"ok": True, "error": error})
        raise _CommittedButRetentionFailed(error) from exc
    _write_outcome(directory, job.token, {"ok": True})
    return deleted


class _CommittedButRetentionFailed(CheckpointWriteError):
    """Rank 0's outcome file already says committed: it must not be overwritten with a failure."""


def _await_outcome(job: DcpJob) -> int:
    """Ranks other than 0: the outcome rank 0 wrote for this save. Rank 0 waits up to ``timeout`` for the
    slowest rank and then commits, so this waits twice as long before it gives up on rank 0."""
    directory = Path(job.directory)
    path = outcome_path(directory, job.token)
    deadline = time.monotonic() + 2 * job.timeout
    committing = False
    while True:
        try:
            content = json.loads(path.read_bytes())
        except FileNotFoundError:
            if time.monotonic() <= deadline:
                time.sleep(_POLL_SECONDS)
                continue
            if committing:
                raise CheckpointWriteError(
                    f"rank 0 began to commit {job.name} but gave no outcome within another {2 * job.timeout}s; "
                    "whether it was committed is unknown on this rank: see the log of rank 0") from None
            error = f"rank {job.rank} gave up waiting {2 * job.timeout}s for rank 0 to commit {job.name}"
            if _decide(directory, job.token, {"commit": False, "error": error}).get("commit"):
                committing = True  # rank 0 decided first and is renaming: its outcome follows
                deadline = time.monotonic() + 2 * job.timeout
                continue
            with contextlib.suppress(OSError):  # the other ranks waiting hear it now
                _write_outcome(directory, job.token, {"ok": False, "error": error})
            raise CheckpointWriteError(f"{error}; this rank's part is written, the checkpoint is not committed (the "
                                       "previous one stays valid)") from None
        if not content.get("ok"):
            raise CheckpointWriteError(f"rank 0 did not commit {job.name}: {content.get('error')}")
        if content.get("error"):
            raise CheckpointWriteError(content["error"])
        return 0

