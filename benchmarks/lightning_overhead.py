"""The same Lightning run with three CheckpointIO plugins: what does each cost the training loop?

Plugins: Lightning's ``TorchCheckpointIO`` (``torch.save`` in the training thread), Lightning's
``AsyncCheckpointIO`` (a clone of every tensor, then ``torch.save`` in a thread) and ``ckptio.lightning``'s
``CheckpointIO`` (a copy into reusable host buffers, then a sealed, fsynced write in a thread; ``ckptio-process``:
in its writer process, on request); ``none`` trains
without checkpoints, for the step time. An MLP (``--width`` x ``--width`` layers, Adam: a checkpoint is about 3x
the weights) trains ``--steps`` steps on the CPU with ``ModelCheckpoint(every_n_train_steps=--every,
save_top_k=2, monitor="loss", save_last=True)``. Each plugin runs in its own process, so that its peak memory is
its own; the order of the runs is shuffled per round.

Per plugin: blocking time per save (the time ``save_checkpoint`` held the training thread), step-time overhead
(the mean step time less ``none``'s, times the steps, per save), peak host memory (the process's peak RSS
above its RSS before ``fit``), time to durable (from a save's call to its file being complete: the end of the
call, the end of the background ``torch.save``, or ckptio's ``on_saved``) and, on CUDA, peak device memory.

``TorchCheckpointIO`` writes with Lightning's ``_atomic_save``, which does not fsync; ckptio fsyncs each file and
its directory, so its durable time includes work the others skip.

Run ``python benchmarks/lightning_overhead.py [--quick] [--out DIR]``; writes ``DIR/lightning_overhead.json``
and ``DIR/lightning_overhead.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLUGINS", "main", "markdown_table", "summarize"]

PLUGINS = ("none", "torch", "async", "ckptio", "ckptio-process")
DEFAULT_PLUGINS = PLUGINS[:4]


def _run_one(plugin_name: str, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """One training run in this process (the child side)."""
    import lightning as L
    import psutil
    import torch
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, CheckpointIO

    import ckptio.lightning

    torch.manual_seed(0)
    started: dict[str, float] = {}
    durable: dict[str, float] = {}
    blocked: list[float] = []

    class RecordingTorchIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            super().save_checkpoint(checkpoint, path, storage_options)
            durable[str(path)] = time.perf_counter()

    class Timed(CheckpointIO):
        def __init__(self, inner: CheckpointIO) -> None:
            self.inner = inner

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            t = time.perf_counter()
            started.setdefault(str(path), t)
            self.inner.save_checkpoint(checkpoint, path, storage_options)
            blocked.append(time.perf_counter() - t)

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

        def remove_checkpoint(self, path: Any) -> None:
            self.inner.remove_checkpoint(path)

        def teardown(self) -> None:
            self.inner.teardown()

    inner: CheckpointIO | None = None
    if plugin_name == "torch":
        inner = RecordingTorchIO()
    elif plugin_name == "async":
        inner = AsyncCheckpointIO(RecordingTorchIO())
    elif plugin_name.startswith("ckptio"):
        inner = ckptio.lightning.CheckpointIO(
            writer="process" if plugin_name == "ckptio-process" else "thread",
            on_saved=lambda saved: durable.__setitem__(str(saved.path), time.perf_counter()))

    step_ends: list[float] = []

    class StepClock(Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            step_ends.append(time.perf_counter())

    width, layers = args.width, args.layers

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.net(batch[0]).pow(2).mean()
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    data = torch.utils.data.TensorDataset(torch.randn(args.batch * args.steps, width))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch)
    callbacks: list[Any] = [StepClock()]
    if inner is not None:
        callbacks.append(ModelCheckpoint(dirpath=directory, every_n_train_steps=args.every, save_top_k=2,
                                         monitor="loss", save_last=True))
    trainer = L.Trainer(max_steps=args.steps, plugins=[Timed(inner)] if inner else None, callbacks=callbacks,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="auto",
                        devices=1, enable_checkpointing=inner is not None, default_root_dir=directory)
    model = MLP()
    rss_before = psutil.Process().memory_info().rss
    fit_started = time.perf_counter()
    trainer.fit(model, loader)  # teardown waits for pending writes
    fit_seconds = time.perf_counter() - fit_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = [b - a for a, b in itertools.pairwise(step_ends)]
    device_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {
        "plugin": plugin_name,
        "saves": len(blocked),
        "blocked_s": blocked,
        "durable_s": [durable[p] - started[p] for p in started if p in durable],
        "step_s": steps[1:],  # the first step after the first includes Lightning's warm-up
        "fit_s": fit_seconds,
        "peak_rss_above_start_bytes": max(0, peak - rss_before),
        "device_peak_bytes": device_peak,
        "checkpoint_bytes": sum(p.stat().st_size for p in directory.glob("*.ckpt") if not p.is_symlink()) //
        max(1, len(list(directory.glob("*.ckpt")))),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per plugin, over its rounds: median blocking, step overhead per save, memory and durable times."""
    by_plugin: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_plugin.setdefault(run["plugin"], []).append(run)
    baseline = statistics.fmean(s for run in by_plugin.get("none", []) for s in run["step_s"]) \
        if "none" in by_plugin else None
    table = {}
    for name, group in by_plugin.items():
        steps = [s for run in group for s in run["step_s"]]
        saves = sum(run["saves"] for run in group)
        row: dict[str, Any] = {
            "rounds": len(group),
            "saves": saves,
            "step_median_s": statistics.median(steps),
            "step_mean_s": statistics.fmean(steps),
            "peak_rss_above_start_mb": statistics.median(r["peak_rss_above_start_bytes"] for r in group) / 2**20,
            "device_peak_mb": (statistics.median(r["device_peak_bytes"] for r in group) / 2**20
                               if group[0]["device_peak_bytes"] is not None else None),
        }
        if saves:
            blocked = [b for run in group for b in run["blocked_s"]]
            durable = [d for run in group for d in run["durable_s"]]
            row.update(blocked_median_s=statistics.median(blocked), blocked_max_s=max(blocked),
                       durable_median_s=statistics.median(durable) if durable else None,
                       checkpoint_mb=statistics.median(r["checkpoint_bytes"] for r in group) / 2**20)
            if baseline is not None:
                # Means, not medians: a save slows a few steps a lot, and a median would not see them.
                row["step_overhead_per_save_s"] = (statistics.fmean(steps) - baseline) * len(steps) / saves
        table[name] = row
    return table


def markdown_table(table: dict[str, dict[str, Any]]) -> str:
    def fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    lines = ["| plugin | saves | blocking per save, median (max) ms | step overhead per save ms | step median ms |"
             " time to durable, median ms | peak host RSS above start MB | checkpoint MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name in PLUGINS:
        row = table.get(name)
        if row is None:
            continue
        lines.append(
            f"| {name} | {row['saves']} | {fmt(row.get('blocked_median_s'), 1e3, 1)} "
            f"({fmt(row.get('blocked_max_s'), 1e3, 1)}) | {fmt(row.get('step_overhead_per_save_s'), 1e3, 1)} | "
            f"{fmt(row['step_median_s'], 1e3, 1)} | {fmt(row.get('durable_median_s'), 1e3, 1)} | "
            f"{fmt(row['peak_rss_above_start_mb'], 1, 0)} | {fmt(row.get('checkpoint_mb'), 1, 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16, help="Linear layers of width x width (16: 16.8M params)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plugins", default=",".join(DEFAULT_PLUGINS),
                        help=f"comma-separated, of {', '.join(PLUGINS)} (ckptio-process: its writer process)")
    parser.add_argument("--quick", action="store_true", help="4 layers, 12 steps, one round (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--summarize", type=Path, help="recompute the tables from a lightning_overhead.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.steps, args.every, args.rounds = 4, 12, 4, 1
    plugins = [p for p in args.plugins.split(",") if p]
    unknown = set(plugins) - set(PLUGINS)
    if unknown:
        print(f"lightning_overhead: unknown plugins {sorted(unknown)}; choose from {', '.join(PLUGINS)}",
              file=sys.stderr)
        return 2
    if args.summarize:
        table = summarize(json.loads(args.summarize.read_text())["runs"])
        print(markdown_table(table))
        return 0
    if args.child:
        directory = Path(tempfile.mkdtemp(prefix="lightning_overhead_", dir=args.out))
        result = _run_one(args.child, args, directory)
        for item in directory.iterdir():
            item.unlink()
        directory.rmdir()
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    order_rng = random.Random(0)
    passed = list(argv if argv is not None else sys.argv[1:])
    for round_number in range(args.rounds):
        order = list(plugins)
        order_rng.shuffle(order)
        for name in order:
            command = [sys.executable, os.path.abspath(__file__), *passed, "--child", name]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"lightning_overhead: the {name} run failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            runs.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"round {round_number + 1}: {name} done", file=sys.stderr)
    table = summarize(runs)
    (args.out / "lightning_overhead.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                   "summary": table, "runs": runs}, indent=1))
    text = markdown_table(table)
    (args.out / "lightning_overhead.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
