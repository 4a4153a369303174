"""How long does saving a checkpoint stall training, and how long until it is durable?

Compares, on the same states and the same disk, interleaved round-robin:

* ``torch.save`` + fsync and ``safetensors.torch.save_file`` + fsync (synchronous baselines);
* ``torch.distributed.checkpoint.async_save`` (DCP) with its defaults, and in its best mode (torchtitan's
  ``async_with_pinned_mem``: a persistent writer process, pinned shared-memory staging cached across saves and
  filled from a background thread, plan caching, a gloo process group of one);
* ``ckptio.CheckpointManager`` sync and async (thread writer, and the process writer where ckptio has one),
  ``torch`` and ``safetensors`` formats, raw and zstd;
* two floors measured in the same run: copying the state into preallocated memory (on CUDA: a pinned
  device-to-host copy; the least a snapshot can cost) and one plain ``write`` + ``fsync`` of the same number of
  bytes (the least a durable file costs).

``--device cuda`` puts the states on the GPU. Every method's first and second saves are recorded apart from the
steady state (they are where buffers get allocated and pinned), and so is the host memory each method holds.

Run ``python benchmarks/save_latency.py [--quick] [--device cuda] [--out DIR]``; results go to ``DIR/results.json``,
``DIR/results.md`` and ``DIR/save_latency.png``. See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import faulthandler
import functools
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from ckptio.atomic import fsync_directory

__all__ = [
    "BenchState",
    "DcpBestSetup",
    "MethodTimeout",
    "Sample",
    "build_methods",
    "craft_state",
    "flatten_tensors",
    "machine_info",
    "main",
    "markdown_table",
    "process_writer_available",
    "run_benchmark",
    "run_bounded",
    "stop_dcp_writer_process",
    "synthetic_state",
]

MB = 10**6
FULL_STATES = ("10MB", "100MB", "craft", "1GB")
QUICK_STATES = ("10MB", "100MB")
ZSTD_STATES = ("100MB", "craft")
FLOOR_MEMCPY = "floor: memcpy into preallocated"
FLOOR_D2H = "floor: pinned D2H copy into preallocated"
SNAPSHOT_FLOORS = (FLOOR_MEMCPY, FLOOR_D2H)
DCP_DEFAULT = "dcp.async_save"
DCP_BEST = "dcp best (process, pinned shm stager)"
FLOOR_WRITE = "floor: write+fsync one buffer"
_WRITE_CHUNK = 64 * 2**20
_RSS_INTERVAL_S = 0.002
BUSY_THRESHOLD = 0.3
"""A round is disturbed when other processes used more cores than this, on average, while it ran."""
METHOD_TIMEOUT_S = 180.0
"""The longest one step of a method (set-up, one save, close) may take before the method is reported as timed out
and left out of the remaining rounds (``--method-timeout``)."""


# ---- states -----------------------------------------------------------------------------------------------


@dataclass
class BenchState:
    """One state to save: the nested object a trainer passes, and its flat name -> tensor view."""

    name: str
    state: Any
    flat: dict[str, torch.Tensor]
    """Every distinct tensor under a dotted name (what ``safetensors.torch.save_file`` needs)."""
    description: str

    @property
    def tensors(self) -> list[torch.Tensor]:
        return list(self.flat.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())


def flatten_tensors(state: Any) -> dict[str, torch.Tensor]:
    """``{"a.b.0": tensor}`` for every tensor in a nesting of dicts/lists/tuples; tensors that share storage
    with an earlier one are left out (``safetensors.save_file`` refuses shared tensors)."""
    flat: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()

    def visit(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape))
            if obj.numel() and key in seen:
                return
            seen.add(key)
            flat[path or "tensor"] = obj.detach().contiguous()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{path}.{i}" if path else str(i))

    visit(state, "")
    return flat


def synthetic_state(total_bytes: int, *, seed: int = 0, name: str | None = None) -> BenchState:
    """A trainer-like nested state of about ``total_bytes``: a few big tensors (fp32 and bf16) holding most
    of the bytes, and hundreds of small ones of a few KB (biases, norms, optimizer moments, 0-d step counters)."""
    gen = torch.Generator().manual_seed(seed)
    n_small = 50 if total_bytes < 5 * MB else 200 if total_bytes < 50 * MB else 400 if total_bytes < 500 * MB else 800
    small_sizes = (256, 512, 1024, 768)  # elements: 1-4 KB in fp32
    model: dict[str, torch.Tensor] = {}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    small_bytes = 0
    for i in range(n_small // 2):
        numel = small_sizes[i % len(small_sizes)]
        model[f"blocks.{i}.norm.weight"] = torch.randn(numel, generator=gen)
        opt_state[i] = {"step": torch.tensor(float(i)), "exp_avg": torch.randn(numel, generator=gen) * 1e-3}
        small_bytes += 2 * numel * 4 + 4
    remaining = max(total_bytes - small_bytes, 0)
    big_plan = ((0.40, torch.float32), (0.25, torch.float32), (0.15, torch.float32), (0.12, torch.bfloat16),
                (0.08, torch.float32))
    for j, (share, dtype) in enumerate(big_plan):
        element_size = torch.empty((), dtype=dtype).element_size()
        rows = max(int(remaining * share) // (1024 * element_size), 1)
        model[f"layers.{j}.weight"] = torch.empty(rows, 1024).normal_(generator=gen).to(dtype)
    state = {
        "model": model,
        "optimizer": {"state": opt_state, "param_groups": [{"lr": 1e-4, "params": list(opt_state)}]},
        "epoch": 3,
        "global_step": 12345,
        "train_loss": 0.125,
    }
    flat = flatten_tensors(state)
    label = name or _size_label(total_bytes)
    big = sum(1 for t in flat.values() if t.numel() >= 2**16)
    desc = f"synthetic: {len(flat)} tensors ({big} big fp32/bf16, {len(flat) - big} of <= 4 KB)"
    return BenchState(label, state, flat, desc)


def craft_state() -> BenchState:
    """The trainer's checkpoint dict for the real CRAFT model with Adam state after one optimizer step."""
    from craft_train.config import TrainConfig
    from craft_train.loss import craft_loss
    from craft_train.model import CRAFT
    from craft_train.state import capture_rng

    torch.manual_seed(0)
    model = CRAFT()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10000, gamma=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler = torch.amp.GradScaler("cuda", enabled=False)
    prediction, _ = model(torch.randn(1, 3, 64, 64))
    targets = [torch.rand(1, 32, 32), torch.rand(1, 32, 32), torch.ones(1, 32, 32)]
    loss, _, _ = craft_loss(prediction.float(), *targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    config = TrainConfig(image_size=128, batch_size=2, workers=0)
    state = {
        "epoch": 1, "batch": 1, "total_batches": 450, "global_step": 1,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "scaler_state_dict": scaler.state_dict(),
        "train_loss": loss.detach().item(), "cls_loss": 0.0, "geo_loss": 0.0,
        "loss_sums": {"train": loss.detach().item(), "cls": 0.0, "geo": 0.0, "batches": 1},
        "errors": 0, "best_val_loss": math.inf,
        "rng_state": capture_rng(),
        "data_order": {"epoch": 1, "permutation": torch.randperm(900), "position": 2},
        "world_size": 1, "sharded": False,
        "config": config.to_dict(),
        "kind": "craft_train",
    }
    flat = flatten_tensors(state)
    params = sum(p.numel() for p in model.parameters())
    desc = f"CRAFT ({params / 1e6:.1f}M params) + Adam after one step, trainer's dict: {len(flat)} tensors"
    return BenchState("craft", state, flat, desc)


def _size_label(n: int) -> str:
    if n >= 10**9 and n % 10**9 == 0:
        return f"{n // 10**9}GB"
    if n >= MB and n % MB == 0:
        return f"{n // MB}MB"
    return f"{n}B"


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def make_state(spec: str, device: str = "cpu") -> BenchState:
    """A state by name (``craft`` or a size such as ``100MB``), its tensors on ``device``."""
    if spec == "craft":
        bench = craft_state()
    else:
        from ckptio import parse_size

        size = parse_size(spec, what="state size")
        assert size is not None
        bench = synthetic_state(size, name=spec)
    if device == "cpu":
        return bench
    # Every tensor moves, RNG states and the data order included: what a CUDA trainer holds on the host stays
    # small, and moving it all makes the device-to-host path carry every byte that the floor counts.
    state = _to_device(bench.state, torch.device(device))
    return BenchState(bench.name, state, flatten_tensors(state), f"{bench.description}; on {device}")


# ---- measurement ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    stall: float
    """Seconds until control returned to the caller."""
    durable: float
    """Seconds until the bytes were fsynced and the file committed (as far as the method goes)."""
    size: int
    """Bytes on disk."""
    rss_delta: int = 0
    anon_delta: int = 0
    returned: float | None = None
    """Seconds until the call returned, where that differs from ``stall`` (DCP's best mode returns before its
    staging completes; the caller must wait for that before changing the state)."""


class RssSampler:
    """Peak resident set size above the level at start, sampled in a thread; also its anonymous part (RSS minus
    file-backed and shared pages: a mapped file's pages count in RSS but are page cache, not new memory)."""

    def __init__(self, interval: float = _RSS_INTERVAL_S) -> None:
        self.interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.baseline = self.peak = self.anon_baseline = self.anon_peak = 0
        self._thread: threading.Thread | None = None
        self._children: list[psutil.Process] = []

    def _read(self) -> tuple[int, int]:
        rss = anon = 0
        for process in (self._process, *self._children):
            with contextlib.suppress(psutil.Error):
                info = process.memory_info()
                rss += info.rss
                anon += info.rss - getattr(info, "shared", 0)
        return rss, anon

    def _sample(self) -> None:
        rss, anon = self._read()
        self.peak = max(self.peak, rss)
        self.anon_peak = max(self.anon_peak, anon)

    def __enter__(self) -> RssSampler:
        # Writer processes (ckptio's, DCP's) count: their memory is the method's too. Shared memory that both
        # sides map counts twice in RSS; the anonymous part excludes it.
        self._children = self._process.children(recursive=True)
        self.baseline, self.anon_baseline = self._read()
        self.peak, self.anon_peak = self.baseline, self.anon_baseline
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._sample()

    @property
    def delta(self) -> int:
        return max(self.peak - self.baseline, 0)

    @property
    def anon_delta(self) -> int:
        return max(self.anon_peak - self.anon_baseline, 0)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def held_memory() -> int:
    """Proportional set size of this process and its children (PSS counts shared memory once across them;
    RSS where PSS is unavailable): what a method's long-lived buffers and helper processes cost the host."""
    total = 0
    for process in (psutil.Process(), *psutil.Process().children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            try:
                total += process.memory_full_info().pss
            except (AttributeError, psutil.AccessDenied):
                total += process.memory_info().rss
    return total


def pinned_host_bytes() -> int | None:
    """Bytes of pinned host memory held by PyTorch's caching host allocator (CUDA only; memory pinned with
    cudaHostRegister, as shared-memory stagers do, is not in it)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    try:
        stats = torch.cuda.host_memory_stats()
    except RuntimeError:
        return None
    value = stats.get("allocated_bytes.current", stats.get("allocated_bytes.all.current"))
    return int(value) if value is not None else None


def _synchronize(bench: BenchState) -> None:
    if any(t.is_cuda for t in bench.tensors):
        torch.cuda.synchronize()


class MethodTimeout(RuntimeError):
    """A benchmark method did not finish one of its steps within its bound."""


def run_bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``fn()`` in a daemon thread, waited for at most ``timeout_s`` seconds; its exception is re-raised here.

    A stuck call cannot be interrupted from Python; left behind in a daemon thread, it keeps neither the benchmark
    from reporting and finishing nor the interpreter from exiting. Raises :class:`MethodTimeout` naming ``what``.
    A call stuck in native code that holds the interpreter lock (torch's FileStore retrying a missing directory
    does) blocks this thread too: for that case a faulthandler watchdog, armed at twice the bound, prints every
    thread's traceback and ends the process with exit status 1, so that no run hangs silently."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"benchmark: {what}", daemon=True)
    faulthandler.dump_traceback_later(2 * timeout_s + 10, exit=True)
    try:
        thread.start()
        thread.join(timeout_s)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if thread.is_alive():
        raise MethodTimeout(f"{what} did not finish within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class Method:
    """One way of saving; ``run`` saves once and returns its timings; files are removed in ``cleanup``."""

    name = ""
    kind = "baseline"  # "floor", "baseline", "ckptio"
    durability = ""
    is_async = False
    warmups = 2
    """Runs before the measured rounds: the first and second saves, reported apart from the steady state."""

    def prepare(self, bench: BenchState, workdir: Path) -> None:
        self.bench = bench
        self.workdir = workdir / _slug(self.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._leftovers: list[Path] = []

    def run(self, tag: str) -> Sample:
        raise NotImplementedError

    def cleanup(self) -> None:
        for path in self._leftovers:
            _remove(path)
        if self._leftovers:
            # Commit the deletions now, outside any timed region: on a filesystem mounted with `discard` the
            # freed blocks are trimmed at the next journal commit, which the next fsync would otherwise pay for.
            for directory in {p.parent for p in self._leftovers if p.parent.is_dir()}:
                fsync_directory(directory)
        self._leftovers = []

    def close(self) -> None:
        self.cleanup()


class MemcpyFloor(Method):
    """The cheaper of two ways to copy every tensor into preallocated ones: a plain single-threaded memcpy
    (``ctypes.memmove``) and ``Tensor.copy_`` (which splits big tensors over the intra-op threads, fast on an
    idle machine, slow when another process holds a core and a thread of the pool has to wait for it)."""

    name = FLOOR_MEMCPY
    kind = "floor"
    durability = "memory only"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        if device != "cpu":
            self.name = FLOOR_D2H

    def prepare(self, bench: BenchState, workdir: Path) -> None:
        super().prepare(bench, workdir)
        self.sources = [t.contiguous() for t in bench.tensors]
        cuda = self.device != "cpu"
        self.buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in self.sources]
        self.variants: dict[str, list[float]] = (
            {"pinned copy_(non_blocking)": []} if cuda else {"ctypes.memmove": [], "Tensor.copy_": []})
        self._runs = 0

    def _device_to_host(self) -> float:
        # All copies queued on the current stream into pinned memory, then one synchronize: the fastest a
        # snapshot of device tensors can be done from the training thread.
        torch.cuda.synchronize()
        started = time.perf_counter()
        for dst, src in zip(self.buffers, self.sources, strict=True):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def _memmove(self) -> float:
        started = time.perf_counter()
        for dst, src in zip(self.buffers, self.sources, strict=True):
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
        return time.perf_counter() - started

    def _copy(self) -> float:
        started = time.perf_counter()
        for dst, src in zip(self.buffers, self.sources, strict=True):
            dst.copy_(src)
        return time.perf_counter() - started

    def run(self, tag: str) -> Sample:
        if self.device != "cpu":
            elapsed = self._device_to_host()
            self.variants["pinned copy_(non_blocking)"].append(elapsed)
            return Sample(elapsed, elapsed, 0)
        self._runs += 1
        first, second = (self._memmove, self._copy) if self._runs % 2 else (self._copy, self._memmove)
        timings = {first: first(), second: second()}
        self.variants["ctypes.memmove"].append(timings[self._memmove])
        self.variants["Tensor.copy_"].append(timings[self._copy])
        best = min(timings.values())
        return Sample(best, best, 0)

    @property
    def notes(self) -> list[str]:
        medians = {k: statistics.median(v) for k, v in self.variants.items() if v}
        return [f"{self.name} variants (median, first saves included): "
                + ", ".join(f"{k} {_ms(v)} ms" for k, v in medians.items())]

    def close(self) -> None:
        self.buffers = []


class WriteFloor(Method):
    name = FLOOR_WRITE
    kind = "floor"
    durability = "fsync of the file (no rename, no directory fsync)"

    def prepare(self, bench: BenchState, workdir: Path) -> None:
        super().prepare(bench, workdir)
        # The state's own bytes, in one preallocated buffer (resident, not lazily zero-filled pages).
        self.buffer = torch.cat([t.reshape(-1).view(torch.uint8).cpu() for t in bench.tensors if t.numel()])

    def run(self, tag: str) -> Sample:
        path = self.workdir / f"floor_{tag}.bin"
        self._leftovers.append(path)
        view = memoryview(self.buffer.numpy()).cast("B")
        started = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done: done + _WRITE_CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed, len(view))

    def close(self) -> None:
        super().close()
        self.buffer = torch.empty(0, dtype=torch.uint8)


class TorchSave(Method):
    name = "torch.save + fsync"
    durability = "fsync of the file (no rename, no directory fsync)"

    def run(self, tag: str) -> Sample:
        path = self.workdir / f"{tag}.pth"
        self._leftovers.append(path)
        _synchronize(self.bench)
        started = time.perf_counter()
        torch.save(self.bench.state, path)
        _fsync_path(path)
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed, path.stat().st_size)


class SafetensorsSave(Method):
    name = "safetensors.save_file + fsync"
    durability = "fsync of the file (no rename, no directory fsync)"

    def run(self, tag: str) -> Sample:
        import safetensors.torch

        path = self.workdir / f"{tag}.safetensors"
        self._leftovers.append(path)
        flat = self.bench.flat  # flattened once, outside the timed region
        started = time.perf_counter()
        safetensors.torch.save_file(flat, str(path))
        _fsync_path(path)
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed, path.stat().st_size)


class DcpAsyncSave(Method):
    name = DCP_DEFAULT
    kind = "baseline"
    is_async = True
    durability = "fsync of data and .metadata files, .metadata renamed into place, no directory fsync"
    notes: list[str]

    def __init__(self) -> None:
        self.notes = []

    def run(self, tag: str) -> Sample:
        import torch.distributed.checkpoint as dcp

        checkpoint_dir = self.workdir / f"dcp_{tag}"
        self._leftovers.append(checkpoint_dir)
        writer = dcp.FileSystemWriter(str(checkpoint_dir))  # defaults: sync_files=True, one writer thread
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            future = dcp.async_save(self.bench.state, checkpoint_id=str(checkpoint_dir), storage_writer=writer)
            returned = time.perf_counter()
            future.result()
            finished = time.perf_counter()
        _note_warnings(self.notes, caught)
        if not getattr(writer, "sync_files", False):
            self.notes.append("FileSystemWriter.sync_files is False: DCP did not fsync")
        return Sample(returned - started, finished - started, _dir_bytes(checkpoint_dir))


def _note_warnings(notes: list[str], caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        text = str(w.message).strip()
        if text not in notes:
            notes.append(text)


class DcpBestSetup:
    """What DCP's best mode needs around ``async_save``, built once and reused by every save: torchtitan's
    ``async_with_pinned_mem`` is ``AsyncCheckpointerType.PROCESS`` (one persistent spawned writer process),
    ``DefaultStager(StagingOptions(True, True, True, True))`` (pinned shared-memory staging buffers cached across
    saves, filled from a background thread with non-blocking copies), ``DefaultSavePlanner(enable_plan_caching=
    True)``, in a gloo process group (it needs one even for a single process). An option the installed torch
    lacks, or that cannot work here (pinning and non-blocking copies need CUDA), is left out and said so in
    ``notes``. ``close()`` ends the writer process and the group it created."""

    def __init__(self, *, cuda: bool, store: Path) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.notes: list[str] = []
        self.kwargs: dict[str, Any] = {}
        self.stager: Any = None
        self._owns_group = False
        if not dist.is_initialized():
            # A file store: no port to collide with another run on the machine. Given as a store object, not a
            # file:// URL: the URL of a relative path (`--out bench_out`, the default) reads its first component
            # as a host name, and FileStore then retries a directory that does not exist until its 300 s timeout.
            store = store.resolve()
            store.parent.mkdir(parents=True, exist_ok=True)
            dist.init_process_group("gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
            self._owns_group = True
        try:
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

            self.kwargs["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
        except ImportError:
            self._note("this torch has no AsyncCheckpointerType: DCP writes from a thread, not a process")
        try:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            if not cuda:
                self._note("CPU state: StagingOptions(use_pinned_memory=False, use_shared_memory=True, "
                           "use_async_staging=True, use_non_blocking_copy=False); pinning and non-blocking copies "
                           "need CUDA")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.stager = DefaultStager(StagingOptions(cuda, True, True, cuda))
            _note_warnings(self.notes, caught)
            self.kwargs["async_stager"] = self.stager
        except ImportError:
            self._note("this torch has no DefaultStager/StagingOptions: DCP's default staging (a fresh CPU copy per "
                       "save, in the caller) is used")
        try:
            self.kwargs["planner"] = dcp.DefaultSavePlanner(enable_plan_caching=True)
        except TypeError:
            self.kwargs["planner"] = dcp.DefaultSavePlanner()
            self._note("this torch's DefaultSavePlanner has no enable_plan_caching: plans are not cached")

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def save(self, state: Any, checkpoint_dir: Path) -> tuple[Any, Any]:
        """Start a save; returns (staging future or None, upload future)."""
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            response = dcp.async_save(state, checkpoint_id=str(checkpoint_dir),
                                      storage_writer=dcp.FileSystemWriter(str(checkpoint_dir)), **self.kwargs)
        _note_warnings(self.notes, caught)
        return getattr(response, "staging_completion", None), getattr(response, "upload_completion", response)

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        stop_dcp_writer_process()
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False


class DcpBestMode(Method):
    """DCP in its best mode (see :class:`DcpBestSetup`).

    Its stall is the time until ``staging_completion`` is done, not until ``async_save`` returns: torchtitan
    waits for it before the next optimizer step, because the state must not change while it is being staged.
    """

    name = DCP_BEST
    kind = "baseline"
    is_async = True
    durability = "fsync of data and .metadata files, .metadata renamed into place, no directory fsync"

    def __init__(self) -> None:
        self.setup: DcpBestSetup | None = None
        self._closed_notes: list[str] = []

    @property
    def notes(self) -> list[str]:
        return self.setup.notes if self.setup is not None else self._closed_notes

    def prepare(self, bench: BenchState, workdir: Path) -> None:
        super().prepare(bench, workdir)
        self.setup = DcpBestSetup(cuda=any(t.is_cuda for t in bench.tensors), store=self.workdir / "pg_store")

    def run(self, tag: str) -> Sample:
        assert self.setup is not None
        checkpoint_dir = self.workdir / f"dcp_{tag}"
        self._leftovers.append(checkpoint_dir)
        _synchronize(self.bench)
        started = time.perf_counter()
        staging, upload = self.setup.save(self.bench.state, checkpoint_dir)
        returned = time.perf_counter()
        if staging is not None:
            staging.result()
        staged = time.perf_counter()
        upload.result()
        finished = time.perf_counter()
        return Sample(staged - started, finished - started, _dir_bytes(checkpoint_dir),
                      returned=returned - started)

    def close(self) -> None:
        super().close()
        if self.setup is not None:
            notes = self.setup.notes
            self.setup.close()
            self.setup = None
            self._closed_notes = notes

def stop_dcp_writer_process(timeout: float = 30.0) -> None:
    """End DCP's persistent writer process. DCP keeps it in a module global for the life of the interpreter and
    has no public way to stop it; a benchmark (and its tests) must not leave it behind."""
    with contextlib.suppress(ImportError):
        from torch.distributed.checkpoint import _async_process_executor as executor

        process = getattr(executor, "_CHECKPOINT_PROCESS", None)
        if process is None:
            return
        executor._CHECKPOINT_PROCESS = None
        child = process._save_process
        with contextlib.suppress(OSError, ValueError):
            process._send(executor._CheckpointSaveProcessControlOpts.TERMINATE)
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join(5)


class CkptioMethod(Method):
    kind = "ckptio"
    durability = "fsync of the file, atomic rename, directory fsync, index updated (fsynced)"

    def __init__(self, fmt: str, compression: str | None, async_save: bool, writer: str | None = None) -> None:
        self.fmt, self.compression, self.async_save, self.writer = fmt, compression, async_save, writer
        self.is_async = async_save
        # "async" is the thread writer (the name it has had since before the process writer existed).
        mode = "sync" if not async_save else "process" if writer == "process" else "async"
        self.name = f"ckptio {mode} {fmt}" + (" +zstd" if compression else "")
        self.manager: Any = None
        self.notes: list[str] = []

    @property
    def warmups(self) -> int:  # type: ignore[override]
        # An async manager rotates through max_pending + 1 buffer slots, each filled on its first use (unless
        # prepare() filled them): the first saves cover them all, and at least two, as for every method.
        slots = self.manager.options.max_pending + 1 if self.async_save and self.manager is not None else 1
        return max(slots, 2)

    def prepare(self, bench: BenchState, workdir: Path) -> None:
        import ckptio

        super().prepare(bench, workdir)
        # One long-lived manager per method, as in training: its snapshot buffers are reused by every save.
        extra = {"writer": self.writer} if self.writer else {}
        self.manager = ckptio.CheckpointManager(self.workdir, format=self.fmt, compression=self.compression,
                                                async_save=self.async_save, fsync=True, **extra)
        # A trainer calls prepare() before its first step, so that no save allocates (or pins) buffers.
        if self.async_save and hasattr(self.manager, "prepare"):
            self.manager.prepare(bench.state)
            # A trainer's first save comes many steps after prepare(); here it would come at once, so wait for
            # the background allocation (ckptio has no public wait for it; bounded).
            stager = getattr(self.manager, "_stager", None)
            ready = stager.wait_idle(60.0) if hasattr(stager, "wait_idle") else None
            self.notes.append("prepare(state) called when the manager was created"
                              + ("; the first save waited for it to finish" if ready else ""))

    def run(self, tag: str) -> Sample:
        name = f"bench_{tag}"
        self._leftovers.append(self.manager.path_for(name))
        _synchronize(self.bench)
        started = time.perf_counter()
        future = self.manager.save(self.bench.state, name=name)
        returned = time.perf_counter()
        saved = future.result()
        finished = time.perf_counter()
        return Sample(returned - started, finished - started, saved.size)

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager = None
        super().close()


def process_writer_available() -> bool:
    """Whether this ckptio has ``CheckpointManager(writer="process")`` (older versions had only the thread writer)."""
    import ckptio

    return "writer" in {f.name for f in dataclasses.fields(ckptio.CheckpointOptions)}


def zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def build_methods(with_zstd: bool, *, device: str = "cpu", dcp_best: bool = True,
                  process_writer: bool | None = None) -> list[Method]:
    """Every method, in a fixed order (rounds shuffle it). ``process_writer=None`` includes ckptio's process
    writer when ckptio has one."""
    if process_writer is None:
        process_writer = process_writer_available()
    methods: list[Method] = [MemcpyFloor(device), WriteFloor(), TorchSave(), SafetensorsSave(), DcpAsyncSave()]
    if dcp_best:
        methods.append(DcpBestMode())
    writers = ("thread", "process") if process_writer else ("thread",)
    for async_save in (False, True):
        for fmt in ("torch", "safetensors"):
            for compression in (None, "zstd") if with_zstd else (None,):
                for writer in writers if async_save else (None,):
                    # Named explicitly once ckptio has a choice: its default may change with measurements.
                    methods.append(CkptioMethod(fmt, compression, async_save, writer if process_writer else None))
    return methods


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def _summary(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3,
            "samples": list(values)}


def _save_once(method: Method, tag: str) -> Sample:
    with RssSampler() as rss:
        sample = method.run(tag)
    sample.rss_delta, sample.anon_delta = rss.delta, rss.anon_delta
    method.cleanup()
    return sample


def measure_state(bench: BenchState, methods: list[Method], reps: int, workdir: Path,
                  log: Callable[[str], None], *, max_rounds: int | None = None, quiet_wait_s: float = 0.0,
                  busy_threshold: float = BUSY_THRESHOLD,
                  method_timeout_s: float = METHOD_TIMEOUT_S) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Warm every method up, then rounds in which every method saves once, in a new random order each round.

    A round during which other processes used more than ``busy_threshold`` cores on average is *disturbed*;
    rounds go on (up to ``max_rounds``) until ``reps`` undisturbed ones are in. Before each round it waits for
    the machine to be quiet, ``quiet_wait_s`` seconds at most in all. Statistics use the undisturbed rounds when
    there are at least two (or ``reps``, if fewer), else every round.

    Each set-up, save and close is bounded by ``method_timeout_s``: a method that overruns is logged, left out of
    the remaining rounds and of the rows, and listed in the returned info's ``timed_out``.
    """
    max_rounds = max(max_rounds or reps, reps)
    import torch.distributed.checkpoint  # noqa: F401  (imported now, not inside the first timed DCP save)

    samples: dict[str, list[tuple[int, Sample]]] = {m.name: [] for m in methods}
    early: dict[str, list[Sample]] = {m.name: [] for m in methods}
    memory: dict[str, dict[str, int | None]] = {}
    rounds: list[dict[str, Any]] = []
    timed_out: dict[str, str] = {}

    def give_up(method: Method, exc: MethodTimeout) -> None:
        timed_out[method.name] = str(exc)
        log(f"  {bench.name}: TIMED OUT: {exc}; {method.name} is left out of the remaining rounds")

    # Long-lived objects (torch, the state) leave the collector's view, so that the gc.collect() before each
    # run is quick and little cyclic garbage is left for a collection inside a timed region.
    gc.collect()
    gc.freeze()
    try:
        rep, waited = -1, 0.0
        while rep < max_rounds and (rep < reps or sum(not r["disturbed"] for r in rounds) < reps):
            # A fresh random order each round (seeded): a plain rotation keeps every method's predecessor fixed,
            # so after-effects of one method (writeback, trims of deleted files) would always hit the same next one.
            order = list(methods)
            if rep >= 0:
                random.Random(rep).shuffle(order)
            if rep >= 0 and quiet_wait_s > waited:
                waited += wait_for_quiet(min(quiet_wait_s - waited, 20.0), threshold=busy_threshold)
            watch = CpuWatch()
            for method in order:
                if method.name in timed_out:
                    continue
                try:
                    if rep < 0:  # each method is set up right before its first saves, so that what it holds shows
                        gc.collect()
                        held, pinned = held_memory(), pinned_host_bytes()
                        run_bounded(functools.partial(method.prepare, bench, workdir), method_timeout_s,
                                    f"{method.name}: set-up")
                    for run in range(1 if rep >= 0 else method.warmups):
                        gc.collect()
                        tag = f"r{rep + 1}" if rep >= 0 else f"first{run}"
                        sample = run_bounded(functools.partial(_save_once, method, tag), method_timeout_s,
                                             f"{method.name}: save {tag}")
                        if rep >= 0:
                            samples[method.name].append((rep, sample))
                        else:
                            early[method.name].append(sample)
                except MethodTimeout as exc:
                    give_up(method, exc)
                    continue
                if rep < 0:
                    gc.collect()
                    after = pinned_host_bytes()
                    memory[method.name] = {
                        "held_bytes": held_memory() - held,
                        "pinned_bytes": None if after is None or pinned is None else after - pinned}
            load = watch.report()
            if rep >= 0:
                rounds.append({"round": rep, **load, "disturbed": load["other_processes_cores"] > busy_threshold})
            log(f"  {bench.name}: {'warm-up' if rep < 0 else f'round {rep + 1}'} done in {load['wall_s']}s, "
                f"other processes used {load['other_processes_cores']} cores and wrote about "
                f"{load['other_disk_writes_mb']} MB"
                + (" (disturbed)" if rep >= 0 and rounds[-1]["disturbed"] else ""))
            rep += 1
    finally:
        gc.unfreeze()
        for method in methods:
            try:
                run_bounded(method.close, method_timeout_s, f"{method.name}: close")
            except MethodTimeout as exc:
                timed_out.setdefault(method.name, str(exc))
                log(f"  {bench.name}: TIMED OUT: {exc}")
    clean = [r["round"] for r in rounds if not r["disturbed"]]
    used = set(clean) if len(clean) >= min(2, reps) else {r["round"] for r in rounds}
    info = {"rounds": len(rounds), "rounds_used": len(used), "disturbed": len(rounds) - len(clean),
            "busy_threshold_cores": busy_threshold, "waited_for_quiet_s": round(waited, 1), "round_load": rounds,
            "timed_out": timed_out}
    rows = []
    for method in methods:
        if method.name in timed_out:
            continue
        got = [sample for rep, sample in samples[method.name] if rep in used]
        rows.append({
            "state": bench.name,
            "method": method.name,
            "kind": method.kind,
            "durability": method.durability,
            "reps": len(got),
            "stall_s": _summary([s.stall for s in got]),
            "durable_s": _summary([s.durable for s in got]),
            "bytes_on_disk": int(statistics.median([s.size for s in got])),
            "peak_rss_delta_bytes": _summary([float(s.rss_delta) for s in got]),
            "peak_anon_rss_delta_bytes": _summary([float(s.anon_delta) for s in got]),
            "returned_s": _summary([s.returned for s in got]) if all(s.returned is not None for s in got) else None,
            "first_saves": [{"stall_s": s.stall, "durable_s": s.durable, "returned_s": s.returned,
                             "peak_rss_delta_bytes": s.rss_delta} for s in early[method.name]],
            **memory.get(method.name, {"held_bytes": 0, "pinned_bytes": None}),
            "is_async": method.is_async,
            "notes": list(getattr(method, "notes", [])),
        })
    memcpy = next((r["stall_s"]["median"] for r in rows if r["method"] in SNAPSHOT_FLOORS), 0.0)
    write = next((r["durable_s"]["median"] for r in rows if r["method"] == FLOOR_WRITE), 0.0)
    for row in rows:
        row["stall_over_memcpy_floor"] = row["stall_s"]["median"] / memcpy if memcpy > 0 else None
        row["durable_over_write_floor"] = row["durable_s"]["median"] / write if write > 0 else None
    return rows, info


def run_benchmark(state_specs: Sequence[str], *, reps: int, reps_large: int | None = None,
                  zstd_states: Sequence[str] = ZSTD_STATES, workdir: Path, adaptive: bool = True,
                  device: str = "cpu", dcp_best: bool = True, process_writer: bool | None = None,
                  method_timeout_s: float = METHOD_TIMEOUT_S, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every method on every state; returns the document written to ``results.json``."""
    results: list[dict[str, Any]] = []
    states: dict[str, Any] = {}
    for spec in state_specs:
        started = time.perf_counter()
        bench = make_state(spec, device)
        n_reps = reps_large if reps_large is not None and bench.tensor_bytes >= 5 * 10**8 else reps
        log(f"state {bench.name}: {bench.tensor_bytes / MB:.1f} MB of tensors, {bench.description} "
            f"(built in {time.perf_counter() - started:.1f}s); {n_reps} repetitions")
        methods = build_methods(with_zstd=spec in zstd_states and zstd_available(), device=device,
                                dcp_best=dcp_best, process_writer=process_writer)
        rows, rounds = measure_state(bench, methods, n_reps, workdir, log,
                                     max_rounds=n_reps * 2 if adaptive else n_reps,
                                     quiet_wait_s=60.0 if adaptive else 0.0, method_timeout_s=method_timeout_s)
        results += rows
        states[bench.name] = {"tensor_bytes": bench.tensor_bytes, "tensors": len(bench.flat),
                              "description": bench.description, "reps": n_reps, **rounds}
        del bench
        gc.collect()
    return {"states": states, "results": results}


# ---- machine and reporting --------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _filesystem(path: Path) -> str:
    best, fstype = "", "?"
    with contextlib.suppress(OSError):
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and target.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], f"{parts[2]} on {parts[0]}"
    return fstype


def gpu_name() -> str | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"


def machine_info(path: Path) -> dict[str, Any]:
    import safetensors

    try:
        import zstandard

        zstd_version = zstandard.__version__
    except ImportError:
        zstd_version = "not installed"
    usage = shutil.disk_usage(path)
    return {
        "cpu": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "zstandard": zstd_version,
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "disk": str(path.resolve()),
        "filesystem": _filesystem(path),
        "disk_free_gb": round(usage.free / 1e9, 1),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


class CpuWatch:
    """How much CPU other processes used while the benchmark ran: the machine may be shared."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.started = time.perf_counter()
        self._busy = self._busy_seconds()
        self._own = self._own_seconds()
        self._disk, self._own_disk = self._disk_writes()

    def _disk_writes(self) -> tuple[int, int]:
        try:
            disk = psutil.disk_io_counters()
            own = self._process.io_counters().write_bytes
        except (AttributeError, OSError, RuntimeError):
            return 0, 0
        return (disk.write_bytes if disk else 0), own

    @staticmethod
    def _busy_seconds() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _own_seconds(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    def report(self, *, precise: bool = False) -> dict[str, float]:
        wall = time.perf_counter() - self.started
        busy = self._busy_seconds() - self._busy
        own = self._own_seconds() - self._own
        digits = 3 if precise else 1
        disk, own_disk = self._disk_writes()
        return {"wall_s": round(wall, digits), "own_cpu_s": round(own, digits),
                "other_processes_cpu_s": round(busy - own, digits),
                "other_processes_cores": round(max(busy - own, 0.0) / wall, 2) if wall > 0 else 0.0,
                # Device writes minus what this process dirtied: a rough sign of other writers (writeback lags).
                "other_disk_writes_mb": round(max((disk - self._disk) - (own_disk - self._own_disk), 0) / MB, 1)}


def wait_for_quiet(max_wait: float, *, threshold: float = BUSY_THRESHOLD, window: float = 1.0) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use less than ``threshold`` cores over two
    consecutive ``window``-second periods; returns the seconds waited."""
    started = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - started < max_wait:
        watch = CpuWatch()
        time.sleep(window)
        quiet = quiet + 1 if watch.report(precise=True)["other_processes_cores"] < threshold else 0
    return time.perf_counter() - started


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['cpu']}, {info['logical_cores']} logical cores ({info['torch_threads']} torch threads), "
            f"{info['ram_gb']} GB RAM; Python {info['python']}, torch {info['torch']}, safetensors "
            f"{info['safetensors']}, zstandard {info['zstandard']}; "
            + (f"GPU {info['gpu']}; " if info.get("gpu") else "")
            + f"disk {info['disk']} ({info['filesystem']}), "
            f"{info['disk_free_gb']} GB free; load average at start {info['loadavg_start']}"
            + (f", other processes used {info['cpu_watch']['other_processes_cores']} cores on average during the run"
               if "cpu_watch" in info else ""))


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _first_two(r: dict[str, Any], key: str = "stall_s") -> str:
    early = [_ms(s[key]) for s in r.get("first_saves", [])[:2]]
    return " / ".join(early) if early else "—"


def _memory(r: dict[str, Any]) -> str:
    held = f"{r.get('held_bytes', 0) / MB:.0f}"
    pinned = r.get("pinned_bytes")
    return held + (f" ({pinned / MB:.0f} pinned)" if pinned else "")


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| state | method | stall ms: 1st / 2nd save | stall ms steady, median [min–max] "
        "| durable ms median [min–max] | MB on disk | host MB held | peak RSS Δ MB (anon) "
        "| stall / snapshot floor | durable / write floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stall, durable = r["stall_s"], r["durable_s"]
        lines.append(
            f"| {r['state']} | {r['method']} | {_first_two(r)} "
            f"| {_ms(stall['median'])} [{_ms(stall['min'])}–{_ms(stall['max'])}] "
            f"| {_ms(durable['median'])} [{_ms(durable['min'])}–{_ms(durable['max'])}] "
            f"| {r['bytes_on_disk'] / MB:.1f} | {_memory(r)} | {r['peak_rss_delta_bytes']['median'] / MB:.0f} "
            f"({r['peak_anon_rss_delta_bytes']['median'] / MB:.0f}) "
            f"| {_ratio(r['stall_over_memcpy_floor'])} | {_ratio(r['durable_over_write_floor'])} |"
        )
    return "\n".join(lines)


def goals(results: list[dict[str, Any]], states: dict[str, Any]) -> list[str]:
    """The project's targets, checked against this run (states of at least 100 MB)."""
    lines = []
    by = {(r["state"], r["method"]): r for r in results}
    for state, info in states.items():
        floor = next((r for r in results if r["state"] == state and r["method"] in SNAPSHOT_FLOORS), None)
        if info["tensor_bytes"] < 99 * MB or floor is None or (state, TorchSave.name) not in by \
                or by.get((state, FLOOR_WRITE)) is None:
            continue  # too small to judge, or a reference timed out
        torch_save = by[(state, TorchSave.name)]["stall_s"]["median"]
        floor_ms = floor["stall_s"]["median"]
        gpu = floor["method"] == FLOOR_D2H
        for r in results:
            if r["state"] != state or r["kind"] != "ckptio" or not r.get("is_async"):
                continue
            stall, durable = r["stall_s"]["median"], r["durable_s"]["median"]
            worst = max([stall, *(s["stall_s"] for s in r.get("first_saves", []))])
            checks = [
                (f"stall ≤ 1.5× {'D2H' if gpu else 'memcpy'} floor", r["stall_over_memcpy_floor"] <= 1.5,
                 f"{r['stall_over_memcpy_floor']:.2f}×"),
                ("every save incl. the first two ≤ 1.5× floor + 2 ms", worst <= 1.5 * floor_ms + 0.002,
                 f"worst {_ms(worst)} ms vs {_ms(1.5 * floor_ms + 0.002)} ms"),
                ("stall ≤ 1/10 torch.save+fsync", stall <= torch_save / 10, f"{stall / torch_save:.3f}"),
                (f"durable ≤ {1.3 if gpu else 1.2}× write floor",
                 r["durable_over_write_floor"] <= (1.3 if gpu else 1.2), f"{r['durable_over_write_floor']:.2f}×"),
            ]
            for dcp_name in (DCP_DEFAULT, DCP_BEST):
                dcp = by.get((state, dcp_name))
                if dcp is None:
                    continue
                checks += [
                    (f"stall < {dcp_name} stall", stall < dcp["stall_s"]["median"],
                     f"{_ms(stall)} vs {_ms(dcp['stall_s']['median'])} ms"),
                    (f"durable < {dcp_name} durable", durable < dcp["durable_s"]["median"],
                     f"{_ms(durable)} vs {_ms(dcp['durable_s']['median'])} ms"),
                ]
            text = "; ".join(f"{name}: {'PASS' if ok else 'FAIL'} ({value})" for name, ok, value in checks)
            lines.append(f"- {state} / {r['method']}: {text}")
    return lines


def write_chart(doc: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the chart (pip install matplotlib)"
    states = list(doc["states"])
    fig, axes = plt.subplots(len(states), 1, figsize=(10, 3.2 * len(states) + 0.5), squeeze=False)
    for ax, state in zip(axes[:, 0], states, strict=True):
        rows = [r for r in doc["results"] if r["state"] == state]
        labels = [r["method"] for r in rows]
        ys = range(len(rows))
        stall = [r["stall_s"]["median"] * 1000 for r in rows]
        durable = [r["durable_s"]["median"] * 1000 for r in rows]
        ax.barh([y + 0.2 for y in ys], durable, height=0.4, color="#9ecae1", label="until durable")
        ax.barh([y - 0.2 for y in ys], stall, height=0.4, color="#08519c", label="training stall")
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(left=min(stall + durable) / 2)
        ax.set_xlabel("milliseconds (median, log scale)")
        info = doc["states"][state]
        ax.set_title(f"{state}: {info['tensor_bytes'] / MB:.0f} MB, {info['tensors']} tensors", fontsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def write_outputs(doc: dict[str, Any], out: Path, *, chart: bool = True) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown_table(doc["results"])
    goal_lines = goals(doc["results"], doc["states"])
    md = [
        "# Checkpoint save latency",
        "",
        f"Machine: {machine_line(doc['machine'])}.",
        "",
        f"Mode: {doc['config']['mode']}, device {doc['config'].get('device', 'cpu')}; rounds per state (used / run): "
        + ", ".join(f"{k} {v['rounds_used']}/{v['rounds']}" for k, v in doc["states"].items())
        + ". Each round saves once with every method, in a new (seeded) random order, after uncounted warm-up saves. "
        "A round "
        f"during which other processes used more than {BUSY_THRESHOLD} cores is disturbed and left out when at "
        "least two undisturbed rounds exist; extra rounds (up to twice the repetitions) replace disturbed ones, "
        "and before each round the benchmark waits (at most 60 s per state in all) for the machine to be quiet.",
        "",
        "States:",
        *[f"- {k}: {v['tensor_bytes'] / MB:.1f} MB of tensors; {v['description']}"
          + (" **(every round disturbed by other processes: noisy)**" if v["disturbed"] == v["rounds"] else "")
          for k, v in doc["states"].items()],
        "",
        table,
        "",
        "Goals (ckptio async, states ≥ 100 MB):",
        *(goal_lines or ["- (no state of 100 MB or more in this run)"]),
        "",
        "Notes:",
        *[f"- {n}" for n in doc["notes"]],
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    messages = [f"results: {out / 'results.json'}, {out / 'results.md'}"]
    if chart:
        messages.append(write_chart(doc, out / "save_latency.png"))
    return messages


def _notes(results: list[dict[str, Any]]) -> list[str]:
    dcp_notes = sorted({n for r in results if r["method"] in (DCP_DEFAULT, DCP_BEST) for n in r["notes"]})
    notes = [
        "stall: time until control returned to the caller; durable: time until the method's last fsync "
        "(and, for ckptio, the rename, the directory fsync and the index update) completed, measured from the "
        "same start. For the synchronous methods the two are equal.",
        "The async methods' durable time was measured with the main thread idle, waiting on the future: in "
        "training the writer shares the cores with the training step and takes longer (see train_overhead.py).",
        "safetensors.save_file gets the state flattened to a name -> tensor dict (tensors that share storage "
        "removed) once, outside the timed region; torch.save, DCP and ckptio get the nested state as is.",
        "dcp.async_save (defaults): a thread writer; its default stager allocates a fresh CPU copy of the state "
        "in the caller at every save. When the DCP best mode runs in the same process, both run in the gloo "
        "process group of one that the best mode needs. DCP writes a directory (one data file + .metadata), fsyncs "
        "both files and renames .metadata into place, but does not fsync the directory, so its rename may not "
        "survive a power loss.",
        f"{DCP_BEST}: torchtitan's async_with_pinned_mem: AsyncCheckpointerType.PROCESS (a persistent spawned "
        "writer process, started by the first save), DefaultStager(StagingOptions(True, True, True, True)) "
        "(pinned shared-memory buffers cached across saves, filled from a background thread), "
        "DefaultSavePlanner(enable_plan_caching=True), a gloo process group of one. Its stall is the time until "
        "staging_completion is done (torchtitan waits for it before the next optimizer step); the time until "
        "async_save returned is in results.json (returned_s). Options this torch or machine lacks are listed "
        "below.",
        "stall 1st / 2nd save: the first two saves of each method (uncounted in the steady-state figures): where "
        "buffers are allocated and pinned and helper processes start. host MB held: proportional set size of "
        "this process and its children after those two saves minus before the method was set up (its buffers, "
        "staging copies, writer processes); pinned: PyTorch's pinned host allocator (memory pinned with "
        "cudaHostRegister is not in it).",
        "torch.save and safetensors.save_file baselines: write to the final name, then fsync the file; no "
        "atomic rename and no directory fsync (cheaper, and less safe, than what ckptio does).",
        "ckptio: one long-lived CheckpointManager per method and state, snapshot buffers reused across saves "
        "(the warm-up save allocates them). Its files carry an xxh3-128 digest; drop_page_cache is on (default).",
        "Every save writes a fresh file in a temporary directory under the output directory (same disk); files "
        "are deleted between repetitions, outside the timed region, and the deletion is committed (directory "
        "fsync) before the next save, so that trimming freed blocks (`discard` mount option) does not land in "
        "the next method's fsync. The page cache is not dropped between runs.",
        "peak RSS Δ: highest resident set size (sampled every 2 ms in a thread) above the level just before the "
        "save, until durable (median over the rounds); in brackets its anonymous part (RSS minus file-backed and "
        "shared pages): a file the writer maps (ckptio's torch format hashes its file through mmap) counts in RSS "
        "but is page cache, not new memory. Reused buffers (ckptio, memcpy floor) were allocated during warm-up "
        "and do not show; fresh per-save allocations do, unless the allocator reuses memory freed by an earlier "
        "save (glibc keeps freed blocks below its mmap threshold, up to 32 MB, so DCP's per-save staging copy of "
        "CRAFT, whose largest tensor is 19 MB, shows as 0 after the first save).",
        "memcpy floor: the faster of ctypes.memmove and Tensor.copy_ of every tensor into preallocated tensors of "
        "the same shape, both timed in every repetition (copy_ uses the intra-op thread pool, which stalls when "
        "another process holds a core); write floor: "
        "os.write of the state's tensor bytes from one preallocated buffer to a new file, then fsync. Ratios "
        "use medians; for zstd the write floor is the uncompressed size.",
    ]
    notes += [f"DCP said: {n}" for n in dcp_notes]
    notes += [f"{r['state']}: {n}" for r in results if r["method"] in SNAPSHOT_FLOORS for n in r["notes"]]
    notes += sorted({f"{r['method']}: {n}" for r in results if r["kind"] == "ckptio" for n in r["notes"]})
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 MB and 100 MB states, 2 repetitions (< 1 min)")
    parser.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    parser.add_argument("--states", help="comma-separated states: sizes like 10MB or 1GB, and 'craft' "
                        f"(default: {','.join(FULL_STATES)}; --quick: {','.join(QUICK_STATES)})")
    parser.add_argument("--reps", type=int, help="repetitions per state (default 5; --quick 2)")
    parser.add_argument("--reps-large", type=int, help="repetitions for states of 500 MB or more (default 3)")
    parser.add_argument("--zstd-on", default=",".join(ZSTD_STATES),
                        help=f"states that also get the zstd variants (default: {','.join(ZSTD_STATES)})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the states live: cuda measures device-to-host snapshots (default cpu)")
    parser.add_argument("--no-dcp-best", action="store_true", help="leave out DCP's best mode (it spawns a process)")
    parser.add_argument("--no-chart", action="store_true", help="skip save_latency.png")
    parser.add_argument("--method-timeout", type=float, default=METHOD_TIMEOUT_S,
                        help="seconds one set-up, save or close of a method may take before the method is reported "
                        f"as timed out and left out (default {METHOD_TIMEOUT_S:g})")
    parser.add_argument("--no-extra-rounds", action="store_true",
                        help="neither wait for a quiet machine nor add rounds to replace those disturbed by other "
                        "processes")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (this torch: " + torch.__version__ + ")")

    states = args.states.split(",") if args.states else list(QUICK_STATES if args.quick else FULL_STATES)
    reps = args.reps or (2 if args.quick else 5)
    reps_large = args.reps_large or min(reps, 3)
    zstd_states = [s for s in args.zstd_on.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = machine_info(out)
    print(f"machine: {machine_line(info)}", flush=True)
    setup_notes = []
    if zstd_states and not zstd_available():
        setup_notes.append("zstandard is not installed: the zstd variants were skipped")
    if not process_writer_available():
        setup_notes.append("this ckptio has no writer='process' option yet: the process writer was not measured")
    for note in setup_notes:
        print(f"note: {note}", flush=True)
    started = time.perf_counter()
    watch = CpuWatch()
    workdir = Path(tempfile.mkdtemp(prefix="save_latency_", dir=out))
    try:
        doc = run_benchmark(states, reps=reps, reps_large=reps_large, zstd_states=zstd_states, workdir=workdir,
                            adaptive=not args.no_extra_rounds, device=args.device, dcp_best=not args.no_dcp_best,
                            method_timeout_s=args.method_timeout, log=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_watch"] = watch.report()
    doc = {
        "machine": info,
        "config": {"mode": "quick" if args.quick else "full", "device": args.device, "states": states, "reps": reps,
                   "reps_large": reps_large, "zstd_states": zstd_states, "argv": list(argv or sys.argv[1:]),
                   "seconds": round(time.perf_counter() - started, 1)},
        **doc,
        "notes": setup_notes + _notes(doc["results"]),
    }
    timeouts = [f"{state}: {message} (left out of the results)"
                for state, info_ in doc["states"].items() for message in info_["timed_out"].values()]
    doc["notes"] = [f"TIMED OUT: {t}" for t in timeouts] + doc["notes"]
    messages = write_outputs(doc, out, chart=not args.no_chart)
    print()
    print(markdown_table(doc["results"]))
    print()
    for line in goals(doc["results"], doc["states"]):
        print(line)
    for message in messages:
        print(message)
    print(f"total {doc['config']['seconds']}s; load average at end {info['loadavg_end']}; CPU use {info['cpu_watch']}")
    print(f"machine: {machine_line(info)}")
    for line in timeouts:
        print(f"save_latency: timed out: {line}", file=sys.stderr)
    return 1 if timeouts else 0


if __name__ == "__main__":
    sys.exit(main())
