"""How much do checkpoints slow CRAFT training down? Steps per second with and without saving.

Runs the trainer's step (``craft_train.train``: synthetic data through a DataLoader with ``workers=0``, CRAFT,
``craft_loss``, Adam, StepLR, GradScaler, the trainer's checkpoint dict and ``ckptio.CheckpointManager``) on the
CPU under several configurations, interleaved: in every round each configuration trains one segment of
``--segment`` steps, in a new random order, so that slow phases of the machine hit all of them alike.

Methods (``--methods``): ckptio sync, ckptio async with its thread writer and with its process writer,
``dcp.async_save`` with its defaults and in its best mode (torchtitan's ``async_with_pinned_mem``; the training
loop waits for its ``staging_completion`` before the next optimizer step, as torchtitan does), and
``torch.save`` + fsync. Each is measured at every save frequency of ``--save-freqs``. On the CPU the defaults
are every step and every 10 steps (100-step segments would take minutes each); every 100 steps is then derived
from the per-save cost and the step time, and labelled as derived. With ``--device cuda`` (CRAFT at 512 px,
batch 8, AMP) the defaults are every 25 and every 100 steps, measured directly.

After the rounds, a *pace probe* per asynchronous method: one save, then the main thread runs a plain Python loop
until the write is durable, counting iterations and the gaps longer than 2 ms. Its rate against the same loop's
idle rate is the share of the interpreter the training thread keeps while the writer works (the GIL share).

Run ``python benchmarks/train_overhead.py [--quick] [--device cuda] [--out DIR]``; writes
``DIR/train_overhead.json`` and ``DIR/train_overhead.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
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

__all__ = ["Config", "Trainer", "build_configs", "main", "markdown_table", "pace_probe", "run_rounds"]

DERIVED_FREQ = 100
METHODS = ("sync", "async", "process", "dcp", "dcp-best", "torch.save")
"""``sync``/``async``: ckptio without/with its thread writer; ``process``: ckptio's process writer; ``dcp``:
``dcp.async_save`` with its defaults; ``dcp-best``: DCP's best mode; ``torch.save``: torch.save + fsync."""
SYNC_METHODS = ("sync", "torch.save")


@dataclass(frozen=True)
class Config:
    name: str
    save_freq: int
    method: str = "none"

    @property
    def saves(self) -> bool:
        return self.save_freq > 0

    @property
    def async_save(self) -> bool:
        return self.saves and self.method not in SYNC_METHODS


def build_configs(methods: Sequence[str], freqs: Sequence[int]) -> tuple[Config, ...]:
    """No checkpoints first (the baseline), then every method at every frequency."""
    configs = [Config("no checkpoints", 0)]
    for freq in freqs:
        for method in methods:
            configs.append(Config(f"{method}, every {'step' if freq == 1 else f'{freq} steps'}", freq, method))
    return tuple(configs)


DEFAULT_CONFIGS = build_configs(("sync", "async"), (1, 10))


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
        # This process and its descendants (writer processes, DataLoader workers) are the benchmark, not "others":
        # counting a writer process as disturbance abandoned every round that used one.
        times = self._process.cpu_times()
        total = times.user + times.system
        for child in self._process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
        return total

    def cores(self) -> float:
        wall = time.perf_counter() - self._t0
        other = (self._busy() - self._busy0) - (self._own() - self._own0)
        return round(max(other, 0.0) / wall, 2) if wall > 0 else 0.0


_WRITER_PROCESSES = ("ckptio.writer_process", "spawn_main")
"""Command-line marks of writer processes: ckptio's, and DCP's (started with spawn). DataLoader workers are
forked, so they carry the parent's command line and are not counted."""


def _writer_cpu_seconds() -> float:
    """CPU time used so far by every ckptio writer thread of this process and by the writer processes it
    started (ckptio's and DCP's)."""
    ids = {t.native_id for t in threading.enumerate() if t.name.startswith("ckptio-writer")}
    own = psutil.Process()
    total = sum(t.user_time + t.system_time for t in own.threads() if t.id in ids) if ids else 0.0
    for child in own.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(mark in " ".join(child.cmdline()) for mark in _WRITER_PROCESSES):
                times = child.cpu_times()
                total += times.user + times.system
    return total


def _sibling(name: str) -> Any:
    """Another script of benchmarks/ (they share helpers without being a package)."""
    import importlib

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


class Saver:
    """One way of checkpointing the trainer's state, with the time the training thread spent blocked in it."""

    def __init__(self, method: str, directory: Path) -> None:
        self.method, self.directory = method, directory
        self.blocked_seconds = 0.0
        self.notes: list[str] = []
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def first_saves(self) -> int:
        return 2

    def prepare(self, state: dict[str, Any]) -> None:
        """Called once before the first save (ckptio's prepare())."""

    def save(self, state: dict[str, Any], name: str) -> None:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called right before every optimizer step (DCP's best mode waits for its staging here)."""

    def busy(self) -> bool:
        return False

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


class CkptioSaver(Saver):
    def __init__(self, method: str, directory: Path, *, fmt: str, compression: str | None, keep_count: int) -> None:
        import ckptio

        super().__init__(method, directory)
        extra: dict[str, Any] = {}
        if method == "process":
            extra["writer"] = "process"
        elif method == "async" and "writer" in {f.name for f in dataclasses.fields(ckptio.CheckpointOptions)}:
            extra["writer"] = "thread"
        self.manager = ckptio.CheckpointManager(directory, format=fmt, compression=compression,
                                                async_save=method != "sync", keep_count=keep_count, **extra)

    @property
    def first_saves(self) -> int:
        return self.manager.options.max_pending + 1 if self.manager.options.async_save else 2

    def prepare(self, state: dict[str, Any]) -> None:
        if self.manager.options.async_save and hasattr(self.manager, "prepare"):
            self.manager.prepare(state)

    def save(self, state: dict[str, Any], name: str) -> None:
        before = self.manager.stats.blocked_seconds
        self.manager.save(state, name=name)
        self.blocked_seconds += self.manager.stats.blocked_seconds - before

    def busy(self) -> bool:
        return self.manager.pending > 0

    def wait(self) -> None:
        self.manager.wait()

    def close(self) -> None:
        self.manager.close()


class TorchSaveSaver(Saver):
    def __init__(self, method: str, directory: Path, *, keep_count: int) -> None:
        super().__init__(method, directory)
        self.keep_count, self.paths = keep_count, []

    def save(self, state: dict[str, Any], name: str) -> None:
        path = self.directory / f"{name}_{len(self.paths)}.pth"
        started = time.perf_counter()
        torch.save(state, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.blocked_seconds += time.perf_counter() - started
        self.paths.append(path)
        while len(self.paths) > self.keep_count:
            self.paths.pop(0).unlink(missing_ok=True)


class DcpSaver(Saver):
    """``dcp.async_save`` with its defaults, or (``best``) in its best mode. As in torchtitan, the training
    thread waits for the best mode's staging before the next optimizer step, and a save waits for the previous
    one to be written (both count as blocked). Old checkpoint directories beyond ``keep_count`` are deleted once
    written."""

    def __init__(self, method: str, directory: Path, *, keep_count: int, cuda: bool) -> None:
        super().__init__(method, directory)
        self.keep_count = keep_count
        self.uploads: list[tuple[Path, Any]] = []
        self.staging: Any = None
        self.setup: Any = None
        if method == "dcp-best":
            self.setup = _sibling("save_latency").DcpBestSetup(cuda=cuda, store=directory / "pg_store")
            self.notes = self.setup.notes

    def save(self, state: dict[str, Any], name: str) -> None:
        import torch.distributed.checkpoint as dcp

        path = self.directory / f"{name}_{len(self.uploads)}"
        self.before_optimizer_step()  # counts its own blocked time
        started = time.perf_counter()
        # As torchtitan does: the previous save must be written before the next starts (the best mode's cached
        # staging buffers would otherwise be overwritten while its writer process reads them).
        for _, previous in self.uploads:
            previous.result()
        if self.setup is not None:
            self.staging, upload = self.setup.save(state, path)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming a single process" without a process group
                upload = dcp.async_save(state, checkpoint_id=str(path),
                                        storage_writer=dcp.FileSystemWriter(str(path)))
        self.blocked_seconds += time.perf_counter() - started
        self.uploads.append((path, upload))
        self._prune()

    def before_optimizer_step(self) -> None:
        if self.staging is not None:
            started = time.perf_counter()
            self.staging.result()
            self.staging = None
            self.blocked_seconds += time.perf_counter() - started

    def _prune(self) -> None:
        done = [(p, f) for p, f in self.uploads if f.done()]
        for path, future in done[: max(len(self.uploads) - self.keep_count, 0)]:
            future.result()  # a failed write must not go unnoticed
            shutil.rmtree(path, ignore_errors=True)
            self.uploads.remove((path, future))

    def busy(self) -> bool:
        return self.staging is not None or any(not f.done() for _, f in self.uploads)

    def wait(self) -> None:
        self.before_optimizer_step()
        for _, future in self.uploads:
            future.result()
        self._prune()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wait()
        if self.setup is not None:
            self.setup.close()


def make_saver(method: str, directory: Path, *, fmt: str, compression: str | None, keep_count: int,
               cuda: bool) -> Saver:
    if method in ("sync", "async", "process"):
        return CkptioSaver(method, directory, fmt=fmt, compression=compression, keep_count=keep_count)
    if method == "torch.save":
        return TorchSaveSaver(method, directory, keep_count=keep_count)
    if method in ("dcp", "dcp-best"):
        return DcpSaver(method, directory, keep_count=keep_count, cuda=cuda)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


class Trainer:
    """The training step and checkpoint dict of ``craft_train.train.train``, driven one step at a time.

    Mirrors the trainer line for line (same objects, same calls, same checkpoint dict) without its progress bar
    and validation, so that configurations can take turns on one model.
    """

    def __init__(self, *, image_size: int, batch_size: int, synthetic_size: int, seed: int = 0,
                 device: str = "cpu", workers: int = 0) -> None:
        from craft_train.config import TrainConfig
        from craft_train.data import SyntheticTextDataset, split_indices
        from craft_train.model import CRAFT

        self.config = TrainConfig(synthetic_size=synthetic_size, image_size=image_size, batch_size=batch_size,
                                  workers=workers, device=device, seed=seed, save_freq=0, val_fraction=0.1)
        config = self.config
        torch.manual_seed(config.seed)
        self.device = torch.device(device)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.saver: Saver | None = None
        """The saver of the segment being trained (DCP's best mode waits for its staging before each step)."""
        self.train_set = SyntheticTextDataset(config.synthetic_size, config.image_size, config.seed, config.augment)
        self.train_indices, _ = split_indices(len(self.train_set), config.val_fraction, config.seed)
        self.total_batches = math.ceil(len(self.train_indices) / config.batch_size)
        self.model = CRAFT().to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.lr_decay_steps,
                                                         gamma=config.lr_gamma)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "GradScaler is enabled, but CUDA is not available" on CPU builds
            self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.epoch, self.batch_in_epoch, self.global_step, self.position = 1, 0, 0, 0
        self.sums: dict[str, float] = {"train": 0.0, "cls": 0.0, "geo": 0.0, "batches": 0}
        self.errors = 0
        self.permutation = torch.empty(0, dtype=torch.int64)
        self._batches = self._batch_stream()

    def _batch_stream(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        from craft_train.data import collate
        from craft_train.order import augmentation_seed, epoch_permutation

        config = self.config
        while True:
            self.permutation = epoch_permutation(config.seed, self.epoch, self.train_indices)
            keys = [(int(i), augmentation_seed(config.seed, self.epoch, int(i))) for i in self.permutation.tolist()]
            loader = DataLoader(
                self.train_set, batch_size=config.batch_size, sampler=keys, collate_fn=collate,
                num_workers=config.workers, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(config.seed + self.epoch),
            )
            yield from loader
            self.epoch, self.batch_in_epoch, self.position = self.epoch + 1, 0, 0
            self.sums = {"train": 0.0, "cls": 0.0, "geo": 0.0, "batches": 0}

    def step(self) -> None:
        """One batch: the body of the trainer's inner loop, up to the periodic checkpoint."""
        from craft_train.loss import craft_loss
        from craft_train.stepping import step_optimizer

        batch = next(self._batches)
        self.model.train()
        if batch["size"] > 0:
            images = batch["image"].to(self.device, non_blocking=True)
            targets = [batch[k].to(self.device, non_blocking=True) for k in ("region", "affinity", "mask")]
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                prediction, _ = self.model(images)
            loss, cls_loss, geo_loss = craft_loss(prediction.float(), *targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss * batch.get("weight", 1.0)).backward()
            if self.saver is not None:
                self.saver.before_optimizer_step()
            step_optimizer(self.optimizer, self.scaler, self.scheduler)
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
        from craft_train.state import capture_rng

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

    def save(self, saver: Saver) -> None:
        saver.save(self.checkpoint_state(), name=f"checkpoint_epoch_{self.epoch}_batch_{self.batch_in_epoch}")


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


def run_segment(trainer: Trainer, config: Config, manager: Saver | None, steps: int, round_index: int) -> Segment:
    """``steps`` training steps, saving after step ``i`` when ``i % save_freq == 0`` (so that an async save has
    the rest of the segment to finish); the segment ends when every save it started is durable."""
    trainer.saver = manager
    blocked_before = manager.blocked_seconds if manager else 0.0
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
        blocked_seconds=(manager.blocked_seconds - blocked_before) if manager else 0.0,
        final_wait_seconds=finished - wait_started, writer_cpu_seconds=_writer_cpu_seconds() - cpu_before,
        other_cores=others.cores(), step_seconds=step_seconds,
    )


def run_rounds(trainer: Trainer, configs: Sequence[Config], *, rounds: int, segment: int, workdir: Path,
               budget_s: float = math.inf, keep_count: int = 2, warmup_steps: int = 3,
               busy_threshold: float = BUSY_THRESHOLD, wait: Callable[[float], float] | None = None,
               probes: list[dict[str, Any]] | None = None, notes: list[str] | None = None,
               timed_out: dict[str, str] | None = None, method_timeout_s: float | None = None,
               log: Callable[[str], None] = print) -> list[Segment]:
    """Rounds until ``rounds`` undisturbed ones are in or the budget is spent.

    Before a round, ``wait(seconds)`` may wait for the machine to be quiet. A round in which a segment is
    disturbed (other processes used more than ``busy_threshold`` cores) is abandoned at once, except while no
    round has completed yet and 40% of the budget is spent: then it is finished anyway, so that every run ends
    with at least one complete round.

    Each configuration's set-up and first saves, each segment, pace probe and close is bounded by
    ``method_timeout_s`` (default: ``save_latency.METHOD_TIMEOUT_S``). A configuration whose set-up overruns is
    left out; a segment or probe that overruns ends the rounds (its thread may still hold the trainer), and the
    analysis uses the rounds completed before. Each is logged and recorded in ``timed_out`` (name -> message).
    """
    bounded = _sibling("save_latency")
    limit = bounded.METHOD_TIMEOUT_S if method_timeout_s is None else method_timeout_s
    timed_out = {} if timed_out is None else timed_out
    managers: dict[str, Saver] = {}
    segments: list[Segment] = []
    started = time.perf_counter()

    def give_up(name: str, exc: Exception) -> None:
        timed_out[name] = str(exc)
        log(f"TIMED OUT: {exc}")

    def set_up(config: Config) -> Saver:
        manager = make_saver(
            config.method, workdir / "".join(c if c.isalnum() else "_" for c in config.name),
            fmt=trainer.config.format, compression=trainer.config.compression, keep_count=keep_count,
            cuda=trainer.device.type == "cuda")
        managers[config.name] = manager  # closed below even when its first saves overrun
        manager.prepare(trainer.checkpoint_state())  # as a trainer does before its first step
        return manager

    def first_saves(manager: Saver) -> None:  # buffer slots filled, writer processes started; uncounted
        for _ in range(manager.first_saves):
            trainer.save(manager)
            manager.wait()

    try:
        for config in configs:
            if config.saves:
                try:
                    bounded.run_bounded(functools.partial(set_up, config), limit, f"{config.name}: set-up")
                except bounded.MethodTimeout as exc:
                    give_up(config.name, exc)
        for _ in range(warmup_steps):
            trainer.step()
        for config in configs:
            manager = managers.get(config.name)
            if manager is None or config.name in timed_out:
                continue
            try:
                bounded.run_bounded(functools.partial(first_saves, manager), limit, f"{config.name}: first saves")
            except bounded.MethodTimeout as exc:
                give_up(config.name, exc)
        configs = [c for c in configs if c.name not in timed_out]
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
            before_round = len(timed_out)
            mine: list[Segment] = []
            for config in order:
                try:
                    seg = bounded.run_bounded(
                        functools.partial(run_segment, trainer, config, managers.get(config.name), segment, r),
                        limit, f"{config.name}: segment of round {r + 1}")
                except bounded.MethodTimeout as exc:
                    give_up(config.name, exc)
                    break
                mine.append(seg)
                log(f"round {r + 1} {config.name:24s} {seg.steps} steps in {seg.seconds:6.1f}s "
                    f"({seg.steps / seg.seconds:.3f} steps/s), {seg.saves} saves, blocked {seg.blocked_seconds:.2f}s, "
                    f"other processes {seg.other_cores} cores")
                if seg.other_cores > busy_threshold and not forced:
                    break
            if len(timed_out) > before_round:
                for seg in mine:
                    seg.abandoned = True
                segments += mine
                log(f"round {r + 1}: abandoned, and no round follows: a segment timed out")
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
        if probes is not None and not any(c.name in timed_out for c in configs):
            # One pace probe per asynchronous method, on its least frequent configuration.
            probed: set[str] = set()
            for config in sorted(configs, key=lambda c: -c.save_freq):
                if config.async_save and config.method not in probed:
                    probed.add(config.method)
                    try:
                        probes.append(bounded.run_bounded(
                            functools.partial(pace_probe, trainer, managers[config.name]), limit,
                            f"{config.method}: pace probe"))
                    except bounded.MethodTimeout as exc:
                        give_up(f"{config.method} pace probe", exc)
                        break
                    log(f"pace probe {config.method}: {probes[-1]}")
    finally:
        trainer.saver = None
        for name, manager in managers.items():
            if notes is not None:
                notes += [f"{name}: {n}" for n in manager.notes if f"{name}: {n}" not in notes]
            try:
                bounded.run_bounded(manager.close, limit, f"{name}: close")
            except bounded.MethodTimeout as exc:
                timed_out.setdefault(name, str(exc))
                log(f"TIMED OUT: {exc}")
    return segments


def pace_probe(trainer: Trainer, saver: Saver, *, idle_seconds: float = 1.0, limit_s: float = 60.0,
               gap_s: float = 0.002) -> dict[str, Any]:
    """The main thread's Python pace while one save is written: a plain loop (no torch) runs from the moment
    ``save()`` returns until the write is durable; its iteration rate is compared with the same loop's rate
    just before, with nothing being written. Gaps are intervals between two iterations longer than ``gap_s``:
    time the main thread did not get the interpreter (or a core)."""

    def spin(until: Callable[[], bool]) -> tuple[int, float, float, float]:
        iterations, gaps, longest = 0, 0.0, 0.0
        started = last = time.perf_counter()
        while True:
            for _ in range(200):
                now = time.perf_counter()
                if now - last > gap_s:
                    gaps += now - last
                    longest = max(longest, now - last)
                last = now
                iterations += 1
            if until() or now - started > limit_s:
                return iterations, now - started, gaps, longest

    trainer.saver = saver
    state = trainer.checkpoint_state()
    idle_until = time.perf_counter() + idle_seconds
    idle = spin(lambda: time.perf_counter() >= idle_until)
    blocked_before = saver.blocked_seconds
    saver.save(state, name=f"pace_probe_{trainer.global_step}")
    saver.before_optimizer_step()
    blocked = saver.blocked_seconds - blocked_before
    busy = spin(lambda: not saver.busy())
    saver.wait()
    trainer.saver = None
    idle_rate, busy_rate = idle[0] / idle[1], busy[0] / busy[1] if busy[1] > 0 else 0.0
    return {"method": saver.method, "blocked_s": blocked, "write_s": busy[1],
            "pace_percent": 100 * busy_rate / idle_rate if idle_rate else 0.0,
            "gaps_over_2ms_s": busy[2], "longest_gap_s": busy[3], "idle_gaps_over_2ms_s": idle[2]}


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
            "config": config.name, "method": config.method, "save_freq": config.save_freq,
            "async_save": config.async_save,
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
    for mode in dict.fromkeys(c.method for c in configs if c.saves):
        mine = [r for r in rows if r["save_freq"] and r["method"] == mode]
        if any(r["save_freq"] == DERIVED_FREQ for r in mine):
            continue  # measured directly
        source = max(mine, key=lambda r: r["save_freq"], default=None)
        if source is None:
            continue
        is_async = source["async_save"]
        period = DERIVED_FREQ * step_time
        measured = source["cost_per_save_s"]
        blocked = source["blocked_per_save_s"]
        upper = blocked + source["writer_cpu_per_save_s"] if is_async else blocked
        derived.append({
            "config": f"{mode}, every {DERIVED_FREQ} steps", "method": mode, "save_freq": DERIVED_FREQ,
            "async_save": is_async,
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


def goals(analysis: dict[str, Any], *, cuda: bool) -> list[str]:
    """The project's training-overhead goals at a save every 100 steps (measured, or derived on the CPU): at most
    0.5% on a GPU / 1% on this CPU machine, and less than DCP's best mode."""
    limit = 0.5 if cuda else 1.0
    # Noise can make an overhead negative or flip an order: say when no round was free of other processes.
    caveat = " (every round disturbed by other processes: not conclusive)" \
        if analysis["rounds_used"] == analysis["rounds_disturbed"] else ""
    at_100 = {r["method"]: r for r in [*analysis["rows"], *analysis["derived"]]
              if r["save_freq"] == DERIVED_FREQ and r.get("method")}
    lines = []
    best = at_100.get("dcp-best")
    for method in ("async", "process"):
        row = at_100.get(method)
        if row is None:
            continue
        overhead = row["overhead_percent"]
        how = "derived" if row.get("derived") else "measured"
        text = f"- {method}, every {DERIVED_FREQ} steps ({how}): overhead ≤ {limit}%: " \
               f"{'PASS' if overhead <= limit else 'FAIL'} ({overhead:+.2f}%)"
        if best is not None:
            text += (f"; below dcp-best: {'PASS' if overhead < best['overhead_percent'] else 'FAIL'} "
                     f"({overhead:+.2f}% vs {best['overhead_percent']:+.2f}%)")
        lines.append(text + caveat)
    return lines


def pace_table(probes: list[dict[str, Any]]) -> str:
    lines = ["| method | blocked ms | write ms (until durable) | main-thread Python pace vs idle | "
             "gaps > 2 ms during the write, ms | longest gap ms |", "|---|---|---|---|---|---|"]
    for p in probes:
        lines.append(f"| {p['method']} | {p['blocked_s'] * 1000:.1f} | {p['write_s'] * 1000:.0f} | "
                     f"{p['pace_percent']:.0f}% | {p['gaps_over_2ms_s'] * 1000:.0f} | "
                     f"{p['longest_gap_s'] * 1000:.1f} |")
    return "\n".join(lines)


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
    where = (f"on {args.device}" + (", AMP (fp16 autocast + GradScaler)" if args.device == "cuda" else ", fp32"))
    return [
        f"CRAFT {where}, synthetic {args.image_size}×{args.image_size} images, batch {args.batch_size}, "
        f"DataLoader workers {args.workers}, {torch.get_num_threads()} torch threads; format torch, no compression, "
        "fsync on, keep_count 2 (bounds the disk); "
        f"mean step time without checkpoints {analysis['step_seconds'] * 1000:.0f} ms.",
        "Methods: sync / async / process = ckptio without a writer / with its thread writer / with its process "
        "writer (prepare(state) called before the first save where ckptio has it); dcp = dcp.async_save with its "
        "defaults; dcp-best = torchtitan's async_with_pinned_mem (process writer, pinned shared-memory stager, plan "
        "caching, gloo group of one), the training thread waiting for staging_completion before the next "
        "optimizer step (counted as blocked); torch.save = torch.save + fsync in the training thread.",
        "Pace probe: after the rounds, one save per asynchronous method, then a plain Python loop on the main "
        "thread until the write is durable; pace = its iteration rate against the same loop's rate just before "
        "(100% = the writer takes nothing from the training thread's interpreter); gaps = time between "
        "iterations longer than 2 ms.",
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
    parser.add_argument("--quick", action="store_true", help="64x64 images, 2 rounds, at most ~2 minutes (CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: CRAFT at 512 px, batch 8, AMP; saves every 25 and 100 steps (default cpu)")
    parser.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: sync,async, "
                        "process where ckptio has it, dcp, dcp-best; --quick: async, process, dcp-best)")
    parser.add_argument("--save-freqs", help="comma-separated steps between saves (default 1,10; cuda 25,100)")
    parser.add_argument("--rounds", type=int, help="undisturbed rounds wanted (default 8; --quick 2; cuda 3)")
    parser.add_argument("--budget", type=float,
                        help="seconds after which no new round starts (default 540; --quick 90)")
    parser.add_argument("--segment", type=int, help="steps per configuration per round (default: the largest "
                        "save frequency, at least 10)")
    parser.add_argument("--image-size", type=int, help="side of the square crops (default 128; --quick 64; cuda 512)")
    parser.add_argument("--batch-size", type=int, help="default 2; cuda 8")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default 0; cuda 4)")
    parser.add_argument("--no-probe", action="store_true", help="skip the main-thread pace probe")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for other processes to quiet down")
    parser.add_argument("--method-timeout", type=float,
                        help="seconds one set-up, segment, probe or close may take before it is reported as timed "
                        "out (default 180)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's own choice, as the trainer uses)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device is available (this torch: {torch.__version__})")
    save_latency = _sibling("save_latency")
    if args.methods:
        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    else:
        methods = ["async", "dcp-best"] if args.quick else ["sync", "async", "dcp", "dcp-best"]
        if save_latency.process_writer_available():
            methods.insert(methods.index("async") + 1, "process")
    freqs = [int(f) for f in (args.save_freqs or ("25,100" if cuda else "1,10")).split(",") if f]
    args.segment = args.segment or max(10, *freqs)
    if any(args.segment % f for f in freqs):
        parser.error(f"--segment {args.segment} must be a multiple of every save frequency ({freqs})")
    args.rounds = args.rounds or (2 if args.quick else 3 if cuda else 8)
    args.budget = args.budget or (90.0 if args.quick else 540.0)
    args.image_size = args.image_size or (512 if cuda else 64 if args.quick else 128)
    args.batch_size = args.batch_size or (8 if cuda else 2)
    args.workers = args.workers if args.workers is not None else (4 if cuda else 0)
    configs = build_configs(methods, freqs)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = save_latency.machine_info(out)
    print(f"machine: {save_latency.machine_line(info)}", flush=True)
    started = time.perf_counter()
    watch = save_latency.CpuWatch()
    trainer = Trainer(image_size=args.image_size, batch_size=args.batch_size, synthetic_size=1000,
                      device=args.device, workers=args.workers)
    workdir = Path(tempfile.mkdtemp(prefix="train_overhead_", dir=out))
    probes: list[dict[str, Any]] = []
    saver_notes: list[str] = []
    timed_out: dict[str, str] = {}
    try:
        segments = run_rounds(trainer, configs, rounds=args.rounds, segment=args.segment, workdir=workdir,
                              budget_s=args.budget, wait=None if args.no_wait else save_latency.wait_for_quiet,
                              probes=None if args.no_probe else probes, notes=saver_notes, timed_out=timed_out,
                              method_timeout_s=args.method_timeout, log=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    timeouts = [f"{name}: {message}" for name, message in timed_out.items()]
    for line in timeouts:
        print(f"train_overhead: timed out: {line}", file=sys.stderr)
    configs = tuple(c for c in configs if c.name not in timed_out)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_watch"] = watch.report()
    try:
        analysis = analyse(segments, configs)
    except ValueError as exc:
        (out / "train_overhead.json").write_text(json.dumps({"machine": info, "error": str(exc),
                                                             "segments": [seg.__dict__ for seg in segments]}, indent=2))
        print(f"train_overhead: {exc}", file=sys.stderr)
        return 1
    doc = {
        "machine": info,
        "config": {"mode": "quick" if args.quick else "full", "device": args.device, "methods": methods,
                   "save_freqs": freqs, "rounds_wanted": args.rounds, "budget_s": args.budget,
                   "segment": args.segment, "image_size": args.image_size, "batch_size": args.batch_size,
                   "workers": args.workers, "threads": torch.get_num_threads(),
                   "seconds": round(time.perf_counter() - started, 1)},
        "analysis": analysis,
        "pace_probes": probes,
        "segments": [seg.__dict__ for seg in segments],
        "notes": [f"TIMED OUT: {t} (left out of the results)" for t in timeouts] + _notes(args, analysis)
        + saver_notes,
    }
    (out / "train_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown_table(analysis)
    warning = []
    if analysis["rounds_used"] == analysis["rounds_disturbed"]:
        warning = ["**Warning: every complete round was disturbed by other processes: these figures measure the "
                   "neighbours as much as the checkpoints. Rerun on a quiet machine.**", ""]
    pace = ["", "Main thread's Python pace while one save is written:", "", pace_table(probes)] if probes else []
    pace += ["", "Goals:", *(goals(analysis, cuda=cuda) or ["- (no async ckptio method in this run)"])]
    machine = save_latency.machine_line(info)
    md = ["# Training overhead of checkpointing", "", f"Machine: {machine}; load average at end "
          f"{info['loadavg_end']}.", "", *warning, table, *pace, "", "Notes:", *[f"- {n}" for n in doc["notes"]], ""]
    (out / "train_overhead.md").write_text("\n".join(md))
    print()
    print("\n".join(warning) + table + "\n".join(pace))
    print(f"\nresults: {out / 'train_overhead.json'}, {out / 'train_overhead.md'}; "
          f"total {doc['config']['seconds']}s")
    print(f"machine: {machine}; load average at end {info['loadavg_end']}")
    return 1 if timeouts else 0


if __name__ == "__main__":
    sys.exit(main())
