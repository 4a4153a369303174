"""How much do checkpoints slow CRAFT training down? Steps per second with and without saving.

Runs the trainer's step (``craft_train.train``: synthetic data through a DataLoader with ``workers=0``, CRAFT,
``craft_loss``, Adam, StepLR, GradScaler, the trainer's checkpoint dict and ``ckptio.CheckpointManager``) on the
CPU under several configurations, interleaved: in every round each configuration trains one segment of
``--segment`` steps, in a new random order, so that slow phases of the machine hit all of them alike.

Configurations measured directly: no checkpointing, sync and async saving every step and every 10 steps.
Saving every 100 steps would need 100-step segments (minutes each on a CPU); its overhead is derived from the
per-save cost measured at every 10 steps and the step time, and labelled as derived.

Run ``python benchmarks/train_overhead.py [--quick] [--out DIR]``; writes ``DIR/train_overhead.json`` and
``DIR/train_overhead.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

__all__ = ["Config", "Trainer", "main", "markdown_table", "run_rounds"]

DERIVED_FREQ = 100


@dataclass(frozen=True)
class Config:
    name: str
    save_freq: int
    async_save: bool = False

    @property
    def saves(self) -> bool:
        return self.save_freq > 0


DEFAULT_CONFIGS = (
    Config("no checkpoints", 0),
    Config("sync, every step", 1, False),
    Config("async, every step", 1, True),
    Config("sync, every 10 steps", 10, False),
    Config("async, every 10 steps", 10, True),
)


BUSY_THRESHOLD = 0.3
"""A round is disturbed when other processes used more cores than this, on average, during one of its segments."""


class _OtherCpu:
    """Cores used on average by other processes (and the kernel) since creation: the machine may be shared."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._t0 = time.perf_counter()
        self._busy0, self._own0 = self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _own(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def cores(self) -> float:
        wall = time.perf_counter() - self._t0
        other = (self._busy() - self._busy0) - (self._own() - self._own0)
        return round(max(other, 0.0) / wall, 2) if wall > 0 else 0.0


def _writer_cpu_seconds() -> float:
    """CPU time used so far by every ckptio writer thread of this process."""
    ids = {t.native_id for t in threading.enumerate() if t.name.startswith("ckptio-writer")}
    if not ids:
        return 0.0
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


class Trainer:
    """The training step and checkpoint dict of ``craft_train.train.train``, driven one step at a time.

    Mirrors the trainer line for line (same objects, same calls, same checkpoint dict) without its progress bar
    and validation, so that configurations can take turns on one model.
    """

    def __init__(self, *, image_size: int, batch_size: int, synthetic_size: int, seed: int = 0) -> None:
        from craft_train.config import TrainConfig
        from craft_train.data import SyntheticTextDataset, split_indices
        from craft_train.model import CRAFT

        self.config = TrainConfig(synthetic_size=synthetic_size, image_size=image_size, batch_size=batch_size,
                                  workers=0, device="cpu", seed=seed, save_freq=0, val_fraction=0.1)
        config = self.config
        torch.manual_seed(config.seed)
        self.device = torch.device("cpu")
        self.train_set = SyntheticTextDataset(config.synthetic_size, config.image_size, config.seed, config.augment)
        self.train_indices, _ = split_indices(len(self.train_set), config.val_fraction, config.seed)
        self.total_batches = math.ceil(len(self.train_indices) / config.batch_size)
        self.model = CRAFT().to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.lr_decay_steps,
                                                         gamma=config.lr_gamma)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "GradScaler is enabled, but CUDA is not available" on CPU builds
            self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.epoch, self.batch_in_epoch, self.global_step, self.position = 1, 0, 0, 0
        self.sums: dict[str, float] = {"train": 0.0, "cls": 0.0, "geo": 0.0, "batches": 0}
        self.errors = 0
        self.permutation = torch.empty(0, dtype=torch.int64)
        self._batches = self._batch_stream()

    def _batch_stream(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        from craft_train.data import collate
        from craft_train.resume import augmentation_seed, epoch_permutation

        config = self.config
        while True:
            self.permutation = epoch_permutation(config.seed, self.epoch, self.train_indices)
            keys = [(int(i), augmentation_seed(config.seed, self.epoch, int(i))) for i in self.permutation.tolist()]
            loader = DataLoader(
                self.train_set, batch_size=config.batch_size, sampler=keys, collate_fn=collate,
                num_workers=config.workers, pin_memory=False,
                generator=torch.Generator().manual_seed(config.seed + self.epoch),
            )
            yield from loader
            self.epoch, self.batch_in_epoch, self.position = self.epoch + 1, 0, 0
            self.sums = {"train": 0.0, "cls": 0.0, "geo": 0.0, "batches": 0}

    def step(self) -> None:
        """One batch: the body of the trainer's inner loop, up to the periodic checkpoint."""
        from craft_train.loss import craft_loss

        batch = next(self._batches)
        self.model.train()
        if batch["size"] > 0:
            images = batch["image"].to(self.device, non_blocking=True)
            targets = [batch[k].to(self.device, non_blocking=True) for k in ("region", "affinity", "mask")]
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=False):
                prediction, _ = self.model(images)
            loss, cls_loss, geo_loss = craft_loss(prediction.float(), *targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss * batch.get("weight", 1.0)).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            losses = (loss.item(), cls_loss.item(), geo_loss.item())  # world.mean() of one process
            self.sums["train"] += losses[0]
            self.sums["cls"] += losses[1]
            self.sums["geo"] += losses[2]
            self.sums["batches"] += 1
        self.errors += int(batch["errors"])
        self.batch_in_epoch += 1
        self.global_step += 1
        self.position = min(self.position + self.config.batch_size, len(self.permutation))

    def checkpoint_state(self) -> dict[str, Any]:
        """The dict ``craft_train.train`` saves (same keys, same objects)."""
        from craft_train.resume import capture_rng

        batches = max(self.sums["batches"], 1)
        return {
            "epoch": self.epoch,
            "batch": self.batch_in_epoch,
            "total_batches": self.total_batches,
            "global_step": self.global_step,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "train_loss": self.sums["train"] / batches,
            "cls_loss": self.sums["cls"] / batches,
            "geo_loss": self.sums["geo"] / batches,
            "loss_sums": dict(self.sums),
            "errors": self.errors,
            "best_val_loss": math.inf,
            "rng_state": capture_rng(),
            "data_order": {"epoch": self.epoch, "permutation": self.permutation, "position": self.position},
            "world_size": 1,
            "sharded": False,
            "config": self.config.to_dict(),
            "kind": "craft_train",
        }

    def save(self, manager: Any) -> None:
        manager.save(self.checkpoint_state(), name=f"checkpoint_epoch_{self.epoch}_batch_{self.batch_in_epoch}")


@dataclass
class Segment:
    config: str
    round: int
    steps: int
    seconds: float
    saves: int
    blocked_seconds: float
    final_wait_seconds: float
    writer_cpu_seconds: float
    other_cores: float = 0.0
    """Cores other processes used on average during the segment."""
    abandoned: bool = False
    """Part of a round given up because another process disturbed it (not used in the analysis)."""
    step_seconds: list[float] = field(default_factory=list)


def run_segment(trainer: Trainer, config: Config, manager: Any, steps: int, round_index: int) -> Segment:
    """``steps`` training steps, saving after step ``i`` when ``i % save_freq == 0`` (so that an async save has
    the rest of the segment to finish); the segment ends when every save it started is durable."""
    blocked_before = manager.stats.blocked_seconds if manager else 0.0
    cpu_before = _writer_cpu_seconds()
    others = _OtherCpu()
    saves = 0
    step_seconds = []
    started = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        trainer.step()
        step_seconds.append(time.perf_counter() - t0)
        if manager is not None and i % config.save_freq == 0:
            trainer.save(manager)
            saves += 1
    wait_started = time.perf_counter()
    if manager is not None:
        manager.wait()
    finished = time.perf_counter()
    return Segment(
        config=config.name, round=round_index, steps=steps, seconds=finished - started, saves=saves,
        blocked_seconds=(manager.stats.blocked_seconds - blocked_before) if manager else 0.0,
        final_wait_seconds=finished - wait_started, writer_cpu_seconds=_writer_cpu_seconds() - cpu_before,
        other_cores=others.cores(), step_seconds=step_seconds,
    )


def run_rounds(trainer: Trainer, configs: Sequence[Config], *, rounds: int, segment: int, workdir: Path,
               budget_s: float = math.inf, keep_count: int = 2, warmup_steps: int = 3,
               busy_threshold: float = BUSY_THRESHOLD, wait: Callable[[float], float] | None = None,
               log: Callable[[str], None] = print) -> list[Segment]:
    """Rounds until ``rounds`` undisturbed ones are in or the budget is spent.

    Before a round, ``wait(seconds)`` may wait for the machine to be quiet. A round in which a segment is
    disturbed (other processes used more than ``busy_threshold`` cores) is abandoned at once, except while no
    round has completed yet and 40% of the budget is spent: then it is finished anyway, so that every run ends
    with at least one complete round.
    """
    import ckptio

    managers: dict[str, Any] = {}
    for config in configs:
        if config.saves:
            managers[config.name] = ckptio.CheckpointManager(
                workdir / config.name.replace(" ", "_").replace(",", ""), format=trainer.config.format,
                compression=trainer.config.compression, async_save=config.async_save, keep_count=keep_count,
            )
    segments: list[Segment] = []
    started = time.perf_counter()
    try:
        for _ in range(warmup_steps):
            trainer.step()
        for manager in managers.values():  # fill every buffer slot once, as a long run would have
            for _ in range(manager.options.max_pending + 1 if manager.options.async_save else 1):
                trainer.save(manager)
                manager.wait()
        log(f"warm-up: {warmup_steps} steps and {len(managers)} managers' first saves in "
            f"{time.perf_counter() - started:.1f}s")
        r, clean, complete, round_seconds = 0, 0, 0, math.inf
        while clean < rounds:
            elapsed = time.perf_counter() - started
            expected = round_seconds if math.isfinite(round_seconds) else 0.0
            if complete and elapsed + expected > budget_s:
                break
            if wait is not None and elapsed + expected < budget_s:
                waited = wait(min(60.0, budget_s - elapsed - expected))
                if waited > 2.5:
                    log(f"waited {waited:.0f}s for other processes to quiet down")
            forced = not complete and time.perf_counter() - started > 0.4 * budget_s
            round_started = time.perf_counter()
            # A fresh random order each round (seeded): a plain rotation would keep every configuration's
            # predecessor fixed, so after-effects of one (trims of deleted checkpoints) would always hit the same one.
            order = list(configs)
            random.Random(r).shuffle(order)
            mine: list[Segment] = []
            for config in order:
                seg = run_segment(trainer, config, managers.get(config.name), segment, r)
                mine.append(seg)
                log(f"round {r + 1} {config.name:24s} {seg.steps} steps in {seg.seconds:6.1f}s "
                    f"({seg.steps / seg.seconds:.3f} steps/s), {seg.saves} saves, blocked {seg.blocked_seconds:.2f}s, "
                    f"other processes {seg.other_cores} cores")
                if seg.other_cores > busy_threshold and not forced:
                    break
            disturbed = max(seg.other_cores for seg in mine) > busy_threshold
            finished = len(mine) == len(configs)
            for seg in mine:
                seg.abandoned = not finished
            segments += mine
            if finished:
                complete += 1
                clean += not disturbed
                if not disturbed:
                    round_seconds = min(round_seconds, time.perf_counter() - round_started)
            state = ("abandoned: disturbed by other processes" if not finished else
                     "undisturbed" if not disturbed else
                     "completed although disturbed (kept: no complete round yet)" if forced else
                     "completed, but its last segment was disturbed")
            log(f"round {r + 1}: {state} ({clean} of {rounds} undisturbed rounds, "
                f"{time.perf_counter() - started:.0f}s elapsed)")
            r += 1
    finally:
        for manager in managers.values():
            manager.close()
    return segments


# ---- analysis ---------------------------------------------------------------------------------------------


def analyse(segments: list[Segment], configs: Sequence[Config], *,
            busy_threshold: float = BUSY_THRESHOLD) -> dict[str, Any]:
    """Overheads from the undisturbed rounds (every round if none was undisturbed)."""
    baseline = configs[0].name
    all_rounds: dict[int, dict[str, Segment]] = {}
    for seg in segments:
        if not seg.abandoned:
            all_rounds.setdefault(seg.round, {})[seg.config] = seg
    all_rounds = {r: segs for r, segs in all_rounds.items() if len(segs) == len(configs)}
    abandoned = len({seg.round for seg in segments if seg.abandoned})
    clean = {r: segs for r, segs in all_rounds.items()
             if max(seg.other_cores for seg in segs.values()) <= busy_threshold}
    by_round = clean or all_rounds
    if not by_round:
        raise ValueError("no complete round: every round was abandoned (raise --budget, or --no-wait on a busy "
                         "machine)")
    segments = [seg for segs in by_round.values() for seg in segs.values()]
    base_steps = sum(s.steps for s in segments if s.config == baseline)
    base_seconds = sum(s.seconds for s in segments if s.config == baseline)
    step_time = base_seconds / base_steps
    rows = []
    for config in configs:
        mine = [s for s in segments if s.config == config.name]
        steps, seconds = sum(s.steps for s in mine), sum(s.seconds for s in mine)
        saves = sum(s.saves for s in mine)
        per_round = [(r[config.name].seconds / r[baseline].seconds - 1) * 100
                     for r in by_round.values() if config.name in r and baseline in r]
        cost_per_save = [(r[config.name].seconds - r[baseline].seconds) / r[config.name].saves
                         for r in by_round.values() if config.name in r and baseline in r and r[config.name].saves]
        rows.append({
            "config": config.name, "save_freq": config.save_freq, "async_save": config.async_save,
            "derived": False, "steps": steps, "seconds": seconds, "steps_per_second": steps / seconds,
            "overhead_percent": (seconds / steps / step_time - 1) * 100,
            "overhead_percent_rounds": {"min": min(per_round), "max": max(per_round),
                                        "median": statistics.median(per_round)},
            "saves": saves,
            "blocked_per_save_s": sum(s.blocked_seconds for s in mine) / saves if saves else 0.0,
            "writer_cpu_per_save_s": sum(s.writer_cpu_seconds for s in mine) / saves if saves else 0.0,
            "final_wait_s": sum(s.final_wait_seconds for s in mine),
            "cost_per_save_s": statistics.median(cost_per_save) if cost_per_save else 0.0,
            "step_seconds_median": statistics.median([x for s in mine for x in s.step_seconds]),
        })
    derived = []
    for mode, is_async in (("sync", False), ("async", True)):
        source = max((r for r in rows if r["save_freq"] and r["async_save"] == is_async),
                     key=lambda r: r["save_freq"], default=None)
        if source is None:
            continue
        period = DERIVED_FREQ * step_time
        measured = source["cost_per_save_s"]
        blocked = source["blocked_per_save_s"]
        upper = blocked + source["writer_cpu_per_save_s"] if is_async else blocked
        derived.append({
            "config": f"{mode}, every {DERIVED_FREQ} steps", "save_freq": DERIVED_FREQ, "async_save": is_async,
            "derived": True, "from": source["config"],
            "overhead_percent": 100 * measured / period,
            "overhead_percent_blocked_only": 100 * blocked / period,
            "overhead_percent_blocked_plus_writer_cpu": 100 * upper / period,
            "steps_per_second": 1 / (step_time + max(measured, 0.0) / DERIVED_FREQ),
            "cost_per_save_s": measured, "blocked_per_save_s": blocked,
            "writer_cpu_per_save_s": source["writer_cpu_per_save_s"],
        })
    return {"step_seconds": step_time, "rows": rows, "derived": derived, "rounds": len(all_rounds),
            "rounds_used": len(by_round), "rounds_disturbed": len(all_rounds) - len(clean),
            "rounds_abandoned": abandoned,
            "busy_threshold_cores": busy_threshold}


def markdown_table(analysis: dict[str, Any]) -> str:
    lines = [
        "| configuration | steps/s | overhead vs none [per-round min–max] | saves | blocked per save | "
        "writer CPU per save | cost per save (Δ time) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in analysis["rows"]:
        spread = r["overhead_percent_rounds"]
        overhead = "—" if not r["save_freq"] else (
            f"{r['overhead_percent']:+.1f}% [{spread['min']:+.1f}…{spread['max']:+.1f}]")
        extra = ("—", "—", "—") if not r["save_freq"] else (
            f"{r['blocked_per_save_s'] * 1000:.0f} ms", f"{r['writer_cpu_per_save_s'] * 1000:.0f} ms",
            f"{r['cost_per_save_s'] * 1000:.0f} ms")
        lines.append(f"| {r['config']} | {r['steps_per_second']:.3f} | {overhead} | {r['saves']} | "
                     f"{extra[0]} | {extra[1]} | {extra[2]} |")
    for d in analysis["derived"]:
        lines.append(
            f"| {d['config']} (**derived** from {d['from']}) | {d['steps_per_second']:.3f} | "
            f"{d['overhead_percent']:+.2f}% (blocked only: {d['overhead_percent_blocked_only']:.2f}%, blocked + "
            f"writer CPU: {d['overhead_percent_blocked_plus_writer_cpu']:.2f}%) | — | "
            f"{d['blocked_per_save_s'] * 1000:.0f} ms | {d['writer_cpu_per_save_s'] * 1000:.0f} ms | "
            f"{d['cost_per_save_s'] * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def _notes(args: argparse.Namespace, analysis: dict[str, Any]) -> list[str]:
    return [
        f"CRAFT on the CPU, synthetic {args.image_size}×{args.image_size} images, batch {args.batch_size}, "
        f"DataLoader workers 0, fp32, {torch.get_num_threads()} torch threads; format torch, no compression, "
        "fsync on, keep_count 2 (bounds the disk); "
        f"mean step time without checkpoints {analysis['step_seconds'] * 1000:.0f} ms.",
        f"{analysis['rounds_used']} rounds used of {analysis['rounds']} complete ones "
        f"({analysis['rounds_disturbed']} complete but disturbed, left out when an undisturbed one exists; "
        f"{analysis['rounds_abandoned']} more abandoned). A round is disturbed when other processes used more than "
        f"{analysis['busy_threshold_cores']} cores during one of its segments; on this 2-core machine that slows "
        "a step up to ~10x. Before each round the benchmark waits (up to 60 s) for a quiet machine; it stops after "
        f"{args.rounds} undisturbed rounds or when the next would exceed {args.budget:.0f} s. In each round every "
        f"configuration trains {args.segment} steps (new seeded random order each round). A segment saves after its "
        "step i "
        "when i % save_freq == 0, and ends with manager.wait(), so every "
        "save it started is durable inside its own time (this charges the last async write of a segment to it).",
        "overhead = (time per step with saving) / (time per step without) - 1, over the rounds used; the bracket is "
        "the range of the per-round ratios (same round, adjacent segments).",
        "blocked per save: time the training thread spent inside manager.save() (CheckpointManager.stats); "
        "writer CPU per save: CPU time of the ckptio writer thread (psutil), which on 2 cores competes with the "
        "training step; cost per save: median over rounds of (segment time - no-checkpoint segment time) / saves.",
        f"every {DERIVED_FREQ} steps is DERIVED, not measured: cost per save measured at the least frequent "
        f"measured setting, divided by {DERIVED_FREQ} × the no-checkpoint step time. The bracketing figures use "
        "only the blocked time (a lower bound) and blocked time plus the writer thread's CPU time (roughly an "
        "upper bound on 2 cores).",
        "Warm-up (uncounted): a few steps, then each manager's first saves (one per buffer slot) so that "
        "snapshot buffers are allocated, as in any run longer than a couple of saves.",
        "The machine may be shared: see the load averages; per-round spreads show how much noise there was.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64x64 images, 2 rounds, at most ~2 minutes")
    parser.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    parser.add_argument("--rounds", type=int, help="undisturbed rounds wanted (default 8; --quick 2)")
    parser.add_argument("--budget", type=float,
                        help="seconds after which no new round starts (default 540; --quick 90)")
    parser.add_argument("--segment", type=int, default=10, help="steps per configuration per round (default 10)")
    parser.add_argument("--image-size", type=int, help="side of the square crops (default 128; --quick 64)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other processes to quiet down")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's own choice, as the trainer uses)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 8)
    args.budget = args.budget or (90.0 if args.quick else 540.0)
    args.image_size = args.image_size or (64 if args.quick else 128)
    if args.segment % 10:
        parser.error("--segment must be a multiple of 10 (the every-10-steps configurations need whole periods)")

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from save_latency import CpuWatch, machine_info, machine_line, wait_for_quiet

    info = machine_info(out)
    print(f"machine: {machine_line(info)}", flush=True)
    started = time.perf_counter()
    watch = CpuWatch()
    trainer = Trainer(image_size=args.image_size, batch_size=args.batch_size, synthetic_size=1000)
    workdir = Path(tempfile.mkdtemp(prefix="train_overhead_", dir=out))
    try:
        segments = run_rounds(trainer, DEFAULT_CONFIGS, rounds=args.rounds, segment=args.segment, workdir=workdir,
                              budget_s=args.budget, wait=None if args.no_wait else wait_for_quiet,
                              log=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_watch"] = watch.report()
    try:
        analysis = analyse(segments, DEFAULT_CONFIGS)
    except ValueError as exc:
        (out / "train_overhead.json").write_text(json.dumps({"machine": info, "error": str(exc),
                                                             "segments": [seg.__dict__ for seg in segments]}, indent=2))
        print(f"train_overhead: {exc}", file=sys.stderr)
        return 1
    doc = {
        "machine": info,
        "config": {"mode": "quick" if args.quick else "full", "rounds_wanted": args.rounds, "budget_s": args.budget,
                   "segment": args.segment,
                   "image_size": args.image_size, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                   "seconds": round(time.perf_counter() - started, 1)},
        "analysis": analysis,
        "segments": [seg.__dict__ for seg in segments],
        "notes": _notes(args, analysis),
    }
    (out / "train_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown_table(analysis)
    warning = []
    if analysis["rounds_used"] == analysis["rounds_disturbed"]:
        warning = ["**Warning: every complete round was disturbed by other processes: these figures measure the "
                   "neighbours as much as the checkpoints. Rerun on a quiet machine.**", ""]
    md = ["# Training overhead of checkpointing", "", f"Machine: {machine_line(info)}; load average at end "
          f"{info['loadavg_end']}.", "", *warning, table, "", "Notes:", *[f"- {n}" for n in doc["notes"]], ""]
    (out / "train_overhead.md").write_text("\n".join(md))
    print()
    print("\n".join(warning) + table)
    print(f"\nresults: {out / 'train_overhead.json'}, {out / 'train_overhead.md'}; "
          f"total {doc['config']['seconds']}s")
    print(f"machine: {machine_line(info)}; load average at end {info['loadavg_end']}")
    with contextlib.suppress(ValueError):
        sys.path.remove(str(Path(__file__).resolve().parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
