"""One call on a GPU machine: CUDA ordering, the FSDP2 path, save latency (CRAFT, 2 GB), training overhead.

Meant for the few minutes of a lent GPU (about 5 minutes on an H100/H200), so it runs everything once, in order
of importance, and prints one markdown report that names the GPU and can go into the README as is:

1. **Ordering** (both formats, thread and process writers, several trials): a chain of kernels that changes a
   tensor, queued before ``save()`` and still running when it is called, is in the file; changes queued right
   after ``save()`` returns are not.
2. **Sharded** (FSDP2): a DTensor on a one-process mesh (nccl) saved through ``ShardedCheckpointManager`` with
   the thread and the process writer: the same ordering check through the pinned staging slot, a load back, and
   the time ``save()`` blocks for a 256 MB shard.
3. **Save latency** (``save_latency.py``'s methods on CUDA states: the pinned device-to-host and write+fsync
   floors, torch.save + fsync, DCP default and best mode, ckptio thread and process writers): CRAFT + Adam and a
   2 GB state, first / second / steady-state stall, durable time, host memory.
4. **Training overhead** (``train_overhead.py`` on CUDA: CRAFT 512 px, batch 8, AMP; a save every 25 and every
   100 steps; the main thread's Python pace while a write runs).

``--quick --device cpu`` runs the same code on the CPU with tiny sizes (a smoke test: the tests run it). Without
zstandard (the GPU image lacks it) the zstd cases are skipped with a note. Exit code 1 if the ordering check,
the sharded check or a CUDA test fails, 0 otherwise.

Run ``python benchmarks/gpu_check.py [--out DIR]`` (``--skip-train`` / ``--skip-latency`` to shorten it).
``make gpu-check`` adds ``--with-tests`` (``pytest -m cuda tests/test_cuda.py`` right after the ordering check)
and ``--budget 280``: sections that would not fit the time left are shortened or skipped, and say so, so that one
call on a lent GPU ends within five minutes. The report starts with one table: each section, its outcome, its time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_ordering", "check_sharded", "main"]


_BENCHMARKS = Path(__file__).resolve().parent
_CHECKOUT = _BENCHMARKS.parent


def _use_this_checkout() -> None:
    """Import ckptio and the other benchmarks from this checkout: the GPU image has only the dependencies
    installed, not the project, and ``python benchmarks/gpu_check.py`` puts only ``benchmarks/`` on the path."""
    for path in (str(_BENCHMARKS), str(_CHECKOUT)):
        if path not in sys.path:
            sys.path.insert(0, path)


def _sibling(name: str) -> Any:
    _use_this_checkout()
    return importlib.import_module(name)


def _delay(device: torch.device) -> None:
    """Keep the stream busy for a while (tens of ms on a GPU), so that what is queued next is still pending
    when ``save()`` runs: the check must catch a snapshot that does not wait for it."""
    if device.type == "cuda" and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(50_000_000)


def check_ordering(device: str, workdir: Path, *, trials: int = 3, numel: int = 1 << 24,
                   chain: int = 50, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """For each format and writer: ``trials`` saves of a tensor that a chain of ``chain`` in-place additions
    changes right before ``save()`` (queued, maybe still running) and again right after it returns. The file
    must hold exactly the value before the second chain; the tensor in memory the value after it."""
    _use_this_checkout()
    import ckptio

    results = []
    dev = torch.device(device)
    writers = ["thread", "process"] if _sibling("save_latency").process_writer_available() else [None]
    for fmt in ("safetensors", "torch"):
        for writer in writers:
            extra = {"writer": writer} if writer else {}
            directory = workdir / f"order_{fmt}_{writer or 'default'}"
            label = f"{fmt}, {writer or 'default'} writer"
            passed = 0
            details = []
            with ckptio.CheckpointManager(directory, format=fmt, async_save=True, **extra) as manager:
                x = torch.zeros(numel, device=dev)
                bias = torch.zeros(3, device=dev)
                for trial in range(trials):
                    x.zero_()
                    bias.zero_()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    _delay(dev)
                    for _ in range(chain):  # queued before save(): must be in the file
                        x.add_(1.0)
                    bias.add_(trial + 1.0)
                    future = manager.save({"model": {"x": x, "bias": bias}, "step": trial}, name=f"order_{trial}")
                    for _ in range(chain):  # queued right after save() returned: must not be
                        x.add_(1.0)
                    bias.mul_(-1.0)
                    saved = future.result()
                    state = ckptio.load(saved.path)
                    file_x, file_bias = state["model"]["x"], state["model"]["bias"]
                    ok = (bool(torch.all(file_x == chain)) and bool(torch.all(file_bias == trial + 1.0))
                          and bool(torch.all(x == 2 * chain)) and bool(torch.all(bias == -(trial + 1.0))))
                    passed += ok
                    if not ok:
                        details.append(f"trial {trial}: file x in [{file_x.min().item()}, {file_x.max().item()}] "
                                       f"(expected {chain}), bias {file_bias.tolist()} (expected {trial + 1.0})")
            results.append({"case": label, "passed": passed, "trials": trials, "details": details})
            log(f"ordering {label}: {passed}/{trials}" + (f" FAILED: {details}" if details else ""))
    return results


def check_sharded(device: str, workdir: Path, *, trials: int = 2, numel: int = 1 << 24,
                  chain: int = 50, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The FSDP2 path on this device: a DTensor sharded over a one-process mesh (nccl on CUDA, gloo on the CPU)
    saved by ``ShardedCheckpointManager`` with each writer, and loaded back. As in :func:`check_ordering`, a
    chain of in-place additions is queued right before ``save()`` (it must be in the checkpoint: the copy into
    the pinned staging slot waits for it) and another right after it returns (it must not be). Also reports the
    time ``save()`` blocked and the time until the save was committed, for ``numel`` float32 elements."""
    _use_this_checkout()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ckptio.dcp_manager import ShardedCheckpointManager

    dev = torch.device(device)
    started_group = not dist.is_initialized()
    if started_group:
        store = workdir / "sharded_rendezvous"
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                                world_size=1)
    results = []
    try:
        mesh = init_device_mesh(dev.type, (1,))
        for writer in ("thread", "process"):
            directory = workdir / f"sharded_{writer}"
            passed, details, blocked, durable = 0, [], [], []
            with ShardedCheckpointManager(directory, writer=writer) as manager:
                x = distribute_tensor(torch.zeros(numel, device=dev), mesh, [Shard(0)])
                for trial in range(trials):
                    x.zero_()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    _delay(dev)
                    for _ in range(chain):  # queued before save(): must be in the checkpoint
                        x.add_(1.0)
                    name = f"checkpoint_epoch_1_batch_{trial + 1}"
                    since = time.perf_counter()
                    manager.save({"x": x, "trial": trial}, name=name)
                    blocked.append(time.perf_counter() - since)
                    for _ in range(chain):  # queued right after save() returned: must not be
                        x.add_(1.0)
                    manager.wait()
                    durable.append(time.perf_counter() - since)
                    loaded = {"x": distribute_tensor(torch.zeros(numel, device=dev), mesh, [Shard(0)]), "trial": -1}
                    manager.load(loaded, directory / name)
                    ok = (bool(torch.all(loaded["x"].to_local() == chain)) and loaded["trial"] == trial
                          and bool(torch.all(x.to_local() == 2 * chain)))
                    passed += ok
                    if not ok:
                        local = loaded["x"].to_local()
                        details.append(f"trial {trial}: checkpoint x in [{local.min().item()}, "
                                       f"{local.max().item()}] (expected {chain}), trial {loaded['trial']}")
            label = f"FSDP2 mesh of 1 ({'nccl' if dev.type == 'cuda' else 'gloo'}), {writer} writer"
            results.append({"case": label, "passed": passed, "trials": trials, "details": details,
                            "blocked_ms": 1000 * min(blocked), "durable_ms": 1000 * min(durable)})
            log(f"sharded {label}: {passed}/{trials}, save() blocked {1000 * min(blocked):.1f} ms, committed "
                f"after {1000 * min(durable):.1f} ms" + (f" FAILED: {details}" if details else ""))
    finally:
        if started_group:
            dist.destroy_process_group()
    return results


def run_cuda_tests(out: Path, timeout_s: float, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], str]:
    """``pytest -m cuda tests/test_cuda.py`` in a child process (its CUDA state stays out of the measurements);
    one row per test (name, outcome, seconds) from its JUnit report, and the outcome of the whole run."""
    import subprocess
    import xml.etree.ElementTree as ElementTree

    report = out / "cuda_tests.xml"
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}"]
    try:
        done = subprocess.run(command, cwd=_CHECKOUT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        log(f"pytest -m cuda: stopped after {timeout_s:.0f} s")
        tail = (exc.stdout or b"")[-2000:]
        log(tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
        return [], f"timed out after {timeout_s:.0f} s"
    log("pytest -m cuda: " + (done.stdout.strip().splitlines() or ["(no output)"])[-1])
    if done.returncode not in (0, 5):  # 5: nothing collected
        log(done.stdout[-4000:] + done.stderr[-2000:])
    rows = []
    if report.exists():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "FAILED"
                elif child.tag == "skipped":
                    outcome = "skipped: " + (child.get("message") or "").split(": ", 1)[-1][:60]
            rows.append({"test": case.get("name", "?"), "outcome": outcome,
                         "seconds": float(case.get("time") or 0.0)})
    passed = sum(r["outcome"] == "passed" for r in rows)
    failed = sum(r["outcome"] == "FAILED" for r in rows)
    verdict = f"{passed} passed, {failed} failed, {len(rows) - passed - failed} skipped"
    if done.returncode not in (0, 5) and not failed:
        verdict += f" (pytest exited with {done.returncode})"
    return rows, verdict


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _latency(device: str, states: Sequence[str], reps: int, workdir: Path, log: Callable[[str], None]
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    save_latency = _sibling("save_latency")
    rows: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    for spec in states:
        bench = save_latency.make_state(spec, device)
        log(f"state {bench.name}: {bench.tensor_bytes / 1e6:.0f} MB on {device}, {bench.description}")
        # No safetensors.save_file or ckptio sync rows: the lent minutes go to what the goals compare.
        methods = [m for m in save_latency.build_methods(with_zstd=False, device=device)
                   if m.name != "safetensors.save_file + fsync" and not m.name.startswith("ckptio sync")]
        # Fewer rounds for a large state: each of its saves takes seconds, and the lent minutes are few.
        n = reps if bench.tensor_bytes < 10**9 else max(1, reps - 1)
        state_rows, info = save_latency.measure_state(bench, methods, n, workdir, log)
        rows += state_rows
        infos[bench.name] = {"tensor_bytes": bench.tensor_bytes, "tensors": len(bench.flat),
                             "description": bench.description, "reps": n, **info}
        del bench
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, infos


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (a smoke test of the script; with --device cpu it runs anywhere)")
    parser.add_argument("--out", default="bench_out/gpu_check", help="output directory")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--with-tests", action="store_true",
                        help="also run pytest -m cuda tests/test_cuda.py (after the ordering check)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="shorten or skip the later sections so that the whole check ends within this time")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on the GPU machine, or use --quick --device cpu for a "
              "smoke test", file=sys.stderr)
        return 2
    save_latency = _sibling("save_latency")
    train_overhead = _sibling("train_overhead")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = save_latency.machine_info(out)
    gpu = info.get("gpu") or "no GPU (CPU run)"
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {text}", flush=True)

    def left() -> float:
        return math.inf if args.budget is None else args.budget - (time.perf_counter() - started)

    summary: list[tuple[str, str, float]] = []  # section, outcome, seconds

    def section_done(name: str, outcome: str, since: float) -> None:
        summary.append((name, outcome, time.perf_counter() - since))

    report = [f"### {'GPU' if args.device == 'cuda' else 'CPU smoke'} check: {gpu}", "",
              f"Machine: {save_latency.machine_line(info)}.", ""]
    notes: list[str] = []
    if not save_latency.zstd_available():
        notes.append("zstandard is not installed here: zstd cases skipped")
    if not save_latency.process_writer_available():
        notes.append("this ckptio has no process writer: only the thread writer was measured")
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=out))
    ordering_ok = True
    sharded_ok = True
    tests_ok = True
    try:
        since = time.perf_counter()
        ordering = check_ordering(args.device, workdir, trials=2 if args.quick else 3,
                                  numel=1 << (12 if args.quick else 24), chain=5 if args.quick else 50, log=log)
        ordering_ok = all(r["passed"] == r["trials"] for r in ordering)
        report += ["Ordering (kernels queued before save() are in the file, after are not): "
                   + "; ".join(f"{r['case']} {r['passed']}/{r['trials']}" for r in ordering), ""]
        section_done("ordering", "; ".join(f"{r['case']} {r['passed']}/{r['trials']}" for r in ordering), since)

        if args.with_tests:
            since = time.perf_counter()
            # What is left after the tests goes to the measurements: at least 90 s of them, if the budget allows.
            tests, verdict = run_cuda_tests(out, max(30.0, min(240.0, left() - 90)), log)
            tests_ok = "FAILED" not in {r["outcome"] for r in tests} and "timed out" not in verdict
            report += ["CUDA tests (`pytest -m cuda tests/test_cuda.py`):", "",
                       _markdown(["test", "outcome", "s"],
                                 [(r["test"], r["outcome"], f"{r['seconds']:.1f}") for r in tests]), ""]
            section_done("pytest -m cuda", verdict, since)

        since = time.perf_counter()
        sharded = check_sharded(args.device, workdir, trials=2, numel=1 << (12 if args.quick else 26),
                                chain=5 if args.quick else 50, log=log)
        sharded_ok = all(r["passed"] == r["trials"] for r in sharded)
        report += [f"Sharded (FSDP2 DTensor of {4 << (12 if args.quick else 26)} bytes through "
                   "`ShardedCheckpointManager`, saved and loaded back):", "",
                   _markdown(["case", "ordering", "save() blocked ms", "committed ms"],
                             [(r["case"], f"{r['passed']}/{r['trials']}", f"{r['blocked_ms']:.1f}",
                               f"{r['durable_ms']:.1f}") for r in sharded]), ""]
        section_done("sharded (FSDP2)", "; ".join(f"{r['case']} {r['passed']}/{r['trials']}" for r in sharded),
                     since)

        if not args.skip_latency and left() < 45:
            notes.append(f"save latency skipped: {max(left(), 0):.0f} s of the budget left")
        elif not args.skip_latency:
            since = time.perf_counter()
            states = ["1MB"] if args.quick else ["craft", "2GB"]
            if not args.quick and left() < 150:
                states = ["craft"]
                notes.append(f"save latency of the 2 GB state skipped: {left():.0f} s of the budget left")
            rows, infos = _latency(args.device, states, 1 if args.quick else 3, workdir, log)
            report += ["Save latency:", "", save_latency.markdown_table(rows), "",
                       *save_latency.goals(rows, infos), ""]
            for row in rows:
                for note in row["notes"]:
                    note = note if note.startswith(row["method"]) else f"{row['method']}: {note}"
                    if note not in notes:
                        notes.append(note)
            section_done("save latency", ", ".join(states), since)

        train_budget = min(60.0 if args.quick else 150.0, left() - 15)
        if not args.skip_train and train_budget < 30:
            notes.append(f"training overhead skipped: {max(left(), 0):.0f} s of the budget left")
        elif not args.skip_train:
            since = time.perf_counter()
            cuda = args.device == "cuda"
            freqs = (25, 100) if cuda and not args.quick else (1, 2)
            methods = ["async", "dcp-best"]
            if save_latency.process_writer_available():
                methods.insert(1, "process")
            configs = train_overhead.build_configs(methods, freqs)
            trainer = train_overhead.Trainer(image_size=512 if cuda and not args.quick else 32,
                                             batch_size=8 if cuda and not args.quick else 2, synthetic_size=200,
                                             device=args.device, workers=4 if cuda else 0)
            probes: list[dict[str, Any]] = []
            segments = train_overhead.run_rounds(
                trainer, configs, rounds=1 if args.quick else 2, segment=max(freqs), workdir=workdir / "train",
                budget_s=train_budget, probes=probes, notes=notes, log=log)
            analysis = train_overhead.analyse(segments, configs)
            report += [f"Training overhead (CRAFT {trainer.config.image_size} px, batch {trainer.config.batch_size}"
                       f"{', AMP' if trainer.use_amp else ''}; {analysis['step_seconds'] * 1000:.1f} ms/step "
                       "without checkpoints):", "", train_overhead.markdown_table(analysis), "",
                       *train_overhead.goals(analysis, cuda=trainer.device.type == "cuda"), "",
                       "Main thread's Python pace while one save is written:", "",
                       train_overhead.pace_table(probes), ""]
            section_done("training overhead", f"{analysis['step_seconds'] * 1000:.1f} ms/step without checkpoints",
                         since)
    finally:
        save_latency.stop_dcp_writer_process()
        shutil.rmtree(workdir, ignore_errors=True)
    report += [f"Total {time.perf_counter() - started:.0f} s.", "", "Notes:", *[f"- {n}" for n in notes], ""]
    table = _markdown(["section", "outcome", "s"], [(name, outcome, f"{seconds:.0f}")
                                                   for name, outcome, seconds in summary])
    report[4:4] = [table, ""]  # after the title and the machine line: the one table to read first
    text = "\n".join(report)
    (out / "gpu_check.md").write_text(text)
    print()
    print(text)
    print(f"report: {out / 'gpu_check.md'}")
    with contextlib.suppress(ValueError):
        sys.path.remove(str(_BENCHMARKS))
    if not ordering_ok:
        print("gpu_check: the ordering check FAILED (see above)", file=sys.stderr)
    if not sharded_ok:
        print("gpu_check: the sharded (FSDP2) check FAILED (see above)", file=sys.stderr)
    if not tests_ok:
        print("gpu_check: pytest -m cuda FAILED (see above)", file=sys.stderr)
    return 0 if ordering_ok and sharded_ok and tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
