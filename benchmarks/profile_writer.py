"""Where does ckptio's background writer spend its time? cProfile of the writer thread, next to the floors.

``python benchmarks/profile_writer.py [--state craft] [--format torch] [--saves 5]`` saves the state several
times with an async ``CheckpointManager`` (after warm-up saves), profiles the ``ckptio-writer`` thread with
cProfile (wall-clock timer, so blocking system calls such as fsync count) and prints, per save: the
snapshot copy on the caller's thread, the writer's time by component, and for comparison ``torch.save`` to a
path (PyTorch's native file writer), ``safetensors.torch.save_file``, a plain write of the same bytes, and
re-reading the written file from the page cache while hashing it with xxh3-128.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "profile_writer"]

# (label, predicate on pstats' (file, line, function) key), first match wins; tottime is summed per label.
_IDLE = "idle: waiting for the next job (not counted)"
_COMPONENTS: tuple[tuple[str, Callable[[tuple[str, int, str]], bool]], ...] = (
    (_IDLE, lambda k: k[2] == "<method 'acquire' of '_thread.lock' objects>"),
    ("fsync (file, index, directory)", lambda k: k[2] == "<built-in method posix.fsync>"),
    ("posix_fadvise DONTNEED", lambda k: k[2] == "<built-in method posix.posix_fadvise>"),
    ("write() into the page cache",
     lambda k: "of '_io.BufferedWriter' objects" in k[2] or k[2] == "<built-in method posix.write>"),
    ("xxh3 hashing", lambda k: "xxh3_128" in k[2]),
    ("torch zip writer (write_record: CRC32, framing)", lambda k: "write_record" in k[2]),
    ("pickling the skeleton", lambda k: "_pickle.Pickler" in k[2] or "serialization.py" in k[0]),
    ("zstd", lambda k: "zstd" in k[2].lower() or "zstandard" in k[0]),
    ("rename, open, close, scandir, index json", lambda k: any(n in k[2] for n in ("replace", "posix.open", "close",
                                                                                   "scandir", "json", "dump"))),
)


def _attach_profiler(profile: cProfile.Profile) -> Callable[..., Any]:
    def hook(frame: Any, event: str, arg: Any) -> None:
        if threading.current_thread().name.startswith("ckptio-writer"):
            profile.enable()  # replaces this hook in the writer thread only
        else:
            sys.setprofile(None)

    return hook


def _timed(fn: Callable[[], Any], repeat: int) -> float:
    best = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best.append(time.perf_counter() - started)
    best.sort()
    return best[len(best) // 2]


def profile_writer(spec: str, fmt: str, compression: str | None, saves: int, workdir: Path) -> str:
    import safetensors.torch
    import xxhash

    import ckptio

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from save_latency import make_state

    bench = make_state(spec)
    out = io.StringIO()
    w = out.write
    w(f"state {bench.name}: {bench.tensor_bytes / 1e6:.1f} MB, {len(bench.flat)} tensors; format {fmt}"
      f"{' +' + compression if compression else ''}; {saves} profiled saves\n")

    profile = cProfile.Profile()
    threading.setprofile(_attach_profiler(profile))
    try:
        manager = ckptio.CheckpointManager(workdir / "ckptio", format=fmt, compression=compression, async_save=True)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    stalls, durables = [], []
    try:
        for i in range(manager.options.max_pending + 1):  # warm-up: fill every buffer slot
            manager.save(bench.state, name=f"warm{i}").result()
            manager.path_for(f"warm{i}").unlink()
        profile.disable()  # discards nothing; reset the statistics gathered during warm-up:
        profile.clear()
        profile.enable()
        sys.setprofile(None)  # enable() above affected this (main) thread; the writer keeps its own profile
        for i in range(saves):
            started = time.perf_counter()
            future = manager.save(bench.state, name=f"p{i}")
            stalls.append(time.perf_counter() - started)
            future.result()
            durables.append(time.perf_counter() - started)
            manager.path_for(f"p{i}").unlink()
    finally:
        manager.close()
    stats = pstats.Stats(profile)
    buckets: dict[str, float] = {}
    for key, value in stats.stats.items():  # type: ignore[attr-defined]
        label = next((name for name, match in _COMPONENTS if match(key)), "other Python")
        buckets[label] = buckets.get(label, 0.0) + value[2]
    total = sum(seconds for label, seconds in buckets.items() if label != _IDLE)
    stalls.sort()
    durables.sort()
    w(f"caller stall per save (median): {stalls[len(stalls) // 2] * 1000:.1f} ms; "
      f"until durable: {durables[len(durables) // 2] * 1000:.1f} ms\n")
    w(f"writer thread, wall time per save by component (cProfile tottime; total {total / saves * 1000:.1f} ms):\n")
    for label, seconds in sorted(buckets.items(), key=lambda kv: -kv[1]):
        w(f"  {label:50s} {seconds / saves * 1000:8.1f} ms\n")

    # -- reference points on the same bytes ----------------------------------------------------------------
    buffers = [torch.empty_like(t) for t in bench.tensors]

    def memcpy() -> None:
        for dst, src in zip(buffers, bench.tensors, strict=True):
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())

    path = workdir / "ref.bin"
    blob = torch.cat([t.reshape(-1).view(torch.uint8) for t in bench.tensors if t.numel()]).numpy()

    def write_plain(sync: bool) -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(memoryview(blob))
            if sync:
                os.fsync(f.fileno())

    def torch_save(sync: bool) -> None:
        torch.save(bench.state, path)
        if sync:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def hash_back() -> None:
        hasher = xxhash.xxh3_128()
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(8 * 2**20):
                hasher.update(chunk)

    references: list[tuple[str, Callable[[], Any]]] = [
        ("memcpy (ctypes.memmove) into preallocated tensors", memcpy),
        ("plain write, no fsync", lambda: write_plain(False)),
        ("plain write + fsync", lambda: write_plain(True)),
        ("torch.save(state, path), no fsync", lambda: torch_save(False)),
        ("torch.save(state, path) + fsync", lambda: torch_save(True)),
        ("re-read that file from the page cache + xxh3-128", hash_back),
        ("safetensors.save_file(flat), no fsync", lambda: safetensors.torch.save_file(bench.flat, str(path))),
    ]
    w("reference points (median of 3):\n")
    for label, fn in references:
        w(f"  {label:50s} {_timed(fn, 3) * 1000:8.1f} ms\n")
    path.unlink(missing_ok=True)
    w("\ntop functions of the writer thread by own time (all profiled saves):\n")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(15)
    w("\n".join(line for line in text.getvalue().splitlines() if line.strip()) + "\n")
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", default="craft", help="'craft' or a synthetic size such as 100MB")
    parser.add_argument("--format", default="torch", choices=("torch", "safetensors"))
    parser.add_argument("--zstd", action="store_true")
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--out", default="bench_out", help="scratch files go to a temporary directory here")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="profile_writer_", dir=out))
    try:
        print(profile_writer(args.state, args.format, "zstd" if args.zstd else None, args.saves, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
