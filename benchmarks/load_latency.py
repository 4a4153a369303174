"""How long does loading a checkpoint back take, digests checked, against torch.load and safetensors?

For each state (the CRAFT trainer's checkpoint dict, a synthetic 1 GB state), the same state is written four
ways: ``torch.save``, ``safetensors.torch.save_file`` (the state flattened to name -> tensor), and ckptio in its
``torch`` and ``safetensors`` formats. Then, interleaved in a new random order each round, each file is loaded:

* ``torch.load`` (weights only, its default) and ``safetensors.torch.load_file`` materialised (its tensors are
  views of a memory map, read on first touch: each is cloned into memory of its own) as the baselines;
* ``ckptio.load`` with its digest checked (the default), which reads and hashes every byte of the file.

Warm: the file is in the page cache (it was just read). Cold: the file's cached pages are dropped before each
load with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (Linux; the file is clean, so the kernel does drop them), so the
load reads from the disk. Ratios compare ckptio with ``torch.load`` of the same state in the same cache state.

Run ``python benchmarks/load_latency.py [--quick] [--out DIR]``; writes ``DIR/load_latency.json`` and
``DIR/load_latency.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoadMethod", "build_methods", "main", "markdown_table", "measure"]

MB = 10**6
FULL_STATES = ("craft", "1GB")
QUICK_STATES = ("craft",)
TORCH_LOAD = "torch.load"
SAFETENSORS_LOAD = "safetensors load_file"
COLD_SUPPORTED = hasattr(os, "posix_fadvise")


def _sibling(name: str) -> Any:
    """Another script of benchmarks/ (they share helpers without being a package)."""
    import importlib

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


@dataclass
class LoadMethod:
    name: str
    path: Path
    load: Callable[[Path], Any]


def drop_cache(path: Path) -> None:
    """Drop the file's pages from the page cache (they are clean: written and fsynced before)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(2**24):
            pass


def _materialised_load_file(path: Path) -> dict[str, torch.Tensor]:
    """``load_file``'s tensors are views of a memory map (pages read on first touch); copied into memory of
    their own, as a restored state is used (and as torch.load and ckptio.load return it)."""
    import safetensors.torch

    return {name: tensor.clone() for name, tensor in safetensors.torch.load_file(path).items()}


def build_methods(bench: Any, directory: Path) -> list[LoadMethod]:
    """Write ``bench``'s state the four ways into ``directory``; one load method per file."""
    import safetensors.torch

    import ckptio

    save_latency = _sibling("save_latency")
    directory.mkdir(parents=True, exist_ok=True)
    torch_path = directory / "plain.pt"
    torch.save(bench.state, torch_path)
    flat = save_latency.flatten_tensors(bench.state)
    seen: set[tuple[int, int]] = set()
    unique = {}
    for name, tensor in flat.items():  # save_file refuses tensors that share storage
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.contiguous()
    st_path = directory / "plain.safetensors"
    safetensors.torch.save_file(unique, st_path)
    methods = [LoadMethod(TORCH_LOAD, torch_path, lambda p: torch.load(p, weights_only=True)),
               LoadMethod(SAFETENSORS_LOAD, st_path, _materialised_load_file)]
    for fmt in ("torch", "safetensors"):
        with ckptio.CheckpointManager(directory / f"ckptio_{fmt}", format=fmt) as manager:
            future = manager.save(bench.state, name="state")
            saved = future.result() if future is not None else None
        assert saved is not None
        methods.append(LoadMethod(f"ckptio.load {fmt} (digest checked)", saved.path, ckptio.load))
    os.sync()  # clean pages, so that dropping them for a cold load really makes it read the disk
    return methods


def measure(methods: list[LoadMethod], *, reps: int, cold: bool, timeout_s: float,
            log: Callable[[str], None]) -> dict[str, list[float]]:
    """``reps`` rounds; each loads every file once, in a new (seeded) random order; seconds per method."""
    save_latency = _sibling("save_latency")
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for rep in range(reps):
        order = list(methods)
        random.Random(rep).shuffle(order)
        for method in order:
            if cold:
                drop_cache(method.path)
            else:
                _warm(method.path)
            gc.collect()

            def once(method: LoadMethod = method) -> float:
                started = time.perf_counter()
                state = method.load(method.path)
                elapsed = time.perf_counter() - started
                del state
                return elapsed

            try:
                times[method.name].append(save_latency.run_bounded(once, timeout_s, f"{method.name}: load"))
            except save_latency.MethodTimeout as exc:
                log(f"TIMED OUT: {exc}")
    return times


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| state | file MB | method | warm ms | × torch.load | cold ms | × torch.load |",
             "|---|---:|---|---:|---:|---:|---:|"]
    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value * 1000:.0f}"

    def times(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    for r in rows:
        lines.append(f"| {r['state']} | {r['file_bytes'] / MB:.0f} | {r['method']} | {ms(r['warm_s'])} | "
                     f"{times(r['warm_ratio'])} | {ms(r['cold_s'])} | {times(r['cold_ratio'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CRAFT state only, 3 repetitions")
    parser.add_argument("--states", help="comma-separated: craft, or sizes like 100MB, 1GB "
                        f"(default {','.join(FULL_STATES)}; --quick {','.join(QUICK_STATES)})")
    parser.add_argument("--reps", type=int, help="repetitions (default 5; --quick 3)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache loads")
    parser.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    parser.add_argument("--method-timeout", type=float, default=180.0,
                        help="seconds one load may take before it is reported as timed out (default 180)")
    args = parser.parse_args(argv)
    save_latency = _sibling("save_latency")
    states = args.states.split(",") if args.states else list(QUICK_STATES if args.quick else FULL_STATES)
    reps = args.reps or (3 if args.quick else 5)
    cold = COLD_SUPPORTED and not args.no_cold
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = save_latency.machine_info(out)
    machine = save_latency.machine_line(info)
    print(f"machine: {machine}", flush=True)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="load_latency_", dir=out))
    try:
        for spec in states:
            bench = save_latency.make_state(spec)
            directory = workdir / bench.name
            methods = build_methods(bench, directory)
            print(f"state {bench.name}: {bench.tensor_bytes / MB:.0f} MB of tensors; files written", flush=True)
            del bench
            gc.collect()
            log = failures.append
            warm = measure(methods, reps=reps, cold=False, timeout_s=args.method_timeout, log=log)
            colds = measure(methods, reps=reps, cold=True, timeout_s=args.method_timeout, log=log) if cold else {}
            base_warm = statistics.median(warm[TORCH_LOAD]) if warm[TORCH_LOAD] else None
            base_cold = statistics.median(colds[TORCH_LOAD]) if colds.get(TORCH_LOAD) else None
            for method in methods:
                w = statistics.median(warm[method.name]) if warm[method.name] else None
                c = statistics.median(colds[method.name]) if colds.get(method.name) else None
                rows.append({"state": spec, "method": method.name, "file_bytes": method.path.stat().st_size,
                             "warm_s": w, "cold_s": c, "warm_samples": warm[method.name],
                             "cold_samples": colds.get(method.name, []),
                             "warm_ratio": w / base_warm if w and base_warm else None,
                             "cold_ratio": c / base_cold if c and base_cold else None})
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = markdown_table(rows)
    notes = [f"median of {reps} loads per method and cache state, interleaved in a new random order each round",
             "cold: posix_fadvise(POSIX_FADV_DONTNEED) on the (clean) file before each load" if cold else
             "cold loads skipped (--no-cold, or no posix_fadvise here)",
             *(f"TIMED OUT: {f}" for f in failures)]
    doc = {"machine": info, "reps": reps, "states": states, "rows": rows, "notes": notes}
    (out / "load_latency.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "load_latency.md").write_text("\n".join(["# Checkpoint load latency", "", f"Machine: {machine}.", "",
                                                    table, "", "Notes:", *[f"- {n}" for n in notes], ""]))
    print()
    print(table)
    print(f"\nresults: {out / 'load_latency.json'}, {out / 'load_latency.md'}; machine: {machine}")
    for failure in failures:
        print(f"load_latency: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
