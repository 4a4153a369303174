"""The CRAFT training loop: read it top to bottom.

Every ``save_freq`` batches the full training state goes to ``checkpoint_epoch_{epoch}_batch_{batch}``
through :class:`ckptio.CheckpointManager` (in the background with ``async_save``); ``best_model`` whenever the
validation loss improves (or, with ``best_metric="hmean"``, the H-mean of the words detected in the validation
images). Any of them resumes the run exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import ckptio
from ckptio import is_slim, scan

from .config import TrainConfig, resumed_config
from .data import IcdarDataset, MixedDataset, SyntheticTextDataset, collate, split_indices
from .determinism import deterministic_mode, resume_note
from .distributed import World, setup_world
from .evaluate import evaluate_model
from .loss import craft_loss
from .model import CRAFT, load_pretrained, load_pretrained_backbone
from .postprocess import Thresholds
from .preemption import Preemption, ignore_stop_signals, wait_durable
from .progress import EpochProgress, SaveReport, progress_fields
from .resume import (
    augmentation_seed,
    capture_rng,
    checked_optimizer_state,
    epoch_permutation,
    find_resume_checkpoint,
    restore_rng,
)
from .weak import pseudo_targets

__all__ = ["TrainResult", "train"]

CHECKPOINT_KIND = "craft_train"
VALIDATION_FIELDS = ("val_loss", "val_precision", "val_recall", "val_hmean")
NAMED_BAD_SAMPLES = 5
"""Unreadable samples named (path and reason) in a run; later ones are only counted (``errors=``)."""


@dataclass
class TrainResult:
    """What a run did; the CLI prints it, tests inspect it."""

    global_step: int = 0
    start_step: int = 0
    """The global step this run started from (0, or the resumed checkpoint's)."""
    epoch: int = 1
    batch: int = 0
    seconds: float = 0.0
    saves: int = 0
    """Checkpoints written and durable in this run (skipped and failed saves not counted)."""
    skipped_saves: int = 0
    failed_saves: int = 0
    slimmed: int = 0
    """Older checkpoints slimmed to their weights (``keep_full``)."""
    bad_samples: list[str] = field(default_factory=list)
    """The first unreadable samples, ``"path: reason"``."""
    save_blocked_seconds: float = 0.0
    best_val_loss: float = math.inf
    best_hmean: float = -1.0
    """Highest validation H-mean so far; -1 before the first one."""
    last_validation: dict[str, float] = field(default_factory=dict)
    """The latest validation's ``val_loss`` and, unless ``val_hmean`` is off, ``val_precision/recall/hmean``."""
    interrupted: bool = False
    stopped_by: str | None = None
    """The signal (``SIGTERM``, ``SIGINT``, ``SIGUSR1``) that ended the run after saving, if one did."""
    exit_code: int = 0
    errors: int = 0
    saved_paths: list[Path] = field(default_factory=list)
    model: torch.nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)


def train(config: TrainConfig, *, say: Callable[[str], None] = print,
          given: Collection[str] | None = None) -> TrainResult:
    """Train CRAFT as ``config`` says; under ``torchrun`` every process calls this and rank 0 saves.

    ``given`` names the settings the user gave explicitly (the command line's flags): a resume takes every other
    one from the checkpoint's config (:func:`craft_train.config.resumed_config`). ``None`` counts every setting
    as given, so that a resume with any other value of a setting that decides the experiment is refused.
    """
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    _check_save_dir(config)  # before any model or data is set up
    device_kind = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    with deterministic_mode(config.deterministic):  # before CUDA, cuBLAS or the model exist; undone afterwards
        world = setup_world(device_kind)
        try:
            return _train(config, world, say if world.is_main else _silent, given)
        finally:
            world.close()


def _silent(_: str) -> None:
    pass


def _check_save_dir(config: TrainConfig) -> None:
    """Fail early, with the flag to change, when checkpoints could not be written or would mix with another run's.

    A fresh run (no ``resume``) into a directory that already holds checkpoints would put its files beside
    another run's, replace its ``best_model`` and make ``--resume auto`` pick whichever is newest: it stops
    unless ``reuse_save_dir`` says that is meant.
    """
    directory = Path(config.save_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--save-dir {directory} is a file, not a directory; choose another --save-dir")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ValueError(f"--save-dir {directory}: checkpoints cannot be written there "
                         f"({exc.strerror or exc}); choose a writable --save-dir") from None
    if config.resume is None and not config.reuse_save_dir:
        existing = scan(directory)
        if existing:
            raise ValueError(
                f"--save-dir {directory} already holds {len(existing)} checkpoint(s) of an earlier run (newest: "
                f"{existing[0].path.name}). To continue that run add --resume auto; to start a new run use another "
                "--save-dir; to start a new run beside those files anyway add --reuse-save-dir")


def _train(config: TrainConfig, world: World, say: Callable[[str], None],
           given: Collection[str] | None) -> TrainResult:
    started = time.perf_counter()

    # ---- the checkpoint to resume from: first, since its config decides the data and the model -------------
    resume_path = world.broadcast(_resume_path(config, say) if world.is_main else None)
    state: dict[str, Any] = {}
    if resume_path is not None:
        state, config = _load_resume_state(resume_path, config, world, given, say)

    # ---- device -------------------------------------------------------------------------------------------
    device_kind = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    device = torch.device(device_kind, world.local_rank) if device_kind == "cuda" else torch.device("cpu")
    use_amp = config.amp and device.type == "cuda"
    torch.manual_seed(config.seed)

    # ---- data ---------------------------------------------------------------------------------------------
    # With weak supervision the training samples carry word crops that the training step labels with the model
    # (craft_train.weak); the validation loss keeps the even split, which needs no model.
    weak = config.uses_weak_supervision
    if config.data_dir is not None:
        train_set: Any = IcdarDataset(config.data_dir, config.image_size, augment=config.augment,
                                      weak_supervision=weak)
        val_set: Any = IcdarDataset(config.data_dir, config.image_size, augment=False)
    else:
        labels = config.synthetic_labels
        train_set = SyntheticTextDataset(config.synthetic_size, config.image_size, config.seed, config.augment,
                                         labels=labels, weak_supervision=weak)
        val_set = SyntheticTextDataset(config.synthetic_size, config.image_size, config.seed, augment=False,
                                       labels=labels)
    train_indices, val_indices = split_indices(len(train_set), config.val_fraction, config.seed)
    if config.mix_synthetic:  # character-level images after the run's own indices (the CRAFT paper's 1:5)
        train_set = MixedDataset.with_synthetic(train_set, every=config.mix_synthetic, count=config.synthetic_size,
                                                seed=config.seed, augment=config.augment, weak_supervision=weak)

    def epoch_order(epoch: int) -> torch.Tensor:
        order = epoch_permutation(config.seed, epoch, train_indices)
        return train_set.epoch_order(order, seed=config.seed, epoch=epoch) if config.mix_synthetic else order

    step_samples = config.batch_size * world.size  # one optimizer step consumes this many samples in all
    total_batches = math.ceil(len(epoch_order(1)) / step_samples)
    if total_batches == 0:
        raise ValueError("no training images left after the validation split; lower --val-fraction")

    # ---- model, optimizer, schedule -----------------------------------------------------------------------
    model = CRAFT().to(device)
    if config.pretrained:
        say(f"--pretrained {config.pretrained}: {load_pretrained(model, config.pretrained).source}")
    elif config.pretrained_backbone:
        load_pretrained_backbone(model, config.pretrained_backbone)
    sharded = config.zero and world.distributed
    if config.zero and not world.distributed:
        say("--zero shards the optimizer across processes; with one process it has no effect")
    optimizer: torch.optim.Optimizer
    if sharded:  # each process keeps (and checkpoints) only its shard of the Adam state
        from torch.distributed.optim import ZeroRedundancyOptimizer  # imported late: it drags in TorchScript

        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=config.lr,
                                            weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_steps, gamma=config.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    trained = model
    if world.distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- resume -------------------------------------------------------------------------------------------
    result = TrainResult(model=model, optimizer=optimizer)
    epoch, batch_in_epoch, global_step, position = 1, 0, 0, 0
    sums = {"train": 0.0, "cls": 0.0, "geo": 0.0, "batches": 0}
    resumed_permutation: torch.Tensor | None = None
    validated = False  # whether this epoch's validation has run (a best_model checkpoint is written after it)
    if resume_path is not None:
        try:
            model.load_state_dict(state["model_state_dict"])
        except (RuntimeError, TypeError) as exc:  # missing, misshapen or no weights: a damaged or foreign file
            reason = " ".join(str(exc).split())[:300]
            raise ValueError(f"{resume_path}: its model weights do not fit CRAFT ({reason}); resume from another "
                             "checkpoint") from None
        if sharded:
            optimizer.optim.load_state_dict(ckptio.load_shard(resume_path, world.rank)["optimizer_shard"])
            checked_optimizer_state(optimizer.optim, resume_path)
        else:
            optimizer.load_state_dict(state["optimizer_state_dict"])
            checked_optimizer_state(optimizer, resume_path)
        scheduler.load_state_dict(state["scheduler_state_dict"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        _restore_scaler(scaler, state["scaler_state_dict"], say)
        restore_rng(state["rng_state"])
        epoch, batch_in_epoch, global_step = state["epoch"], state["batch"], state["global_step"]
        sums = dict(state["loss_sums"])
        result.errors = state["errors"]
        result.best_val_loss = state["best_val_loss"]
        result.best_hmean = state.get("best_hmean", -1.0)  # checkpoints written before the H-mean lack it
        result.last_validation = {k: state[k] for k in VALIDATION_FIELDS if state.get(k) is not None}
        resumed_permutation = state["data_order"]["permutation"]
        position = state["data_order"]["position"]
        validated = bool(state.get("epoch_validated", False))
        saved_world = state.get("world_size", 1)
        say(f"resumed from {resume_path}: epoch {epoch}, batch {batch_in_epoch}/{state['total_batches']}, "
            f"global step {global_step}")
        note = resume_note(state["config"], config.deterministic)
        if note:
            say(note)
        if saved_world != world.size:
            say(f"the checkpoint was written by {saved_world} process(es), this run has {world.size}: a step now "
                f"takes {step_samples} samples instead of {config.batch_size * saved_world}; the epoch continues "
                f"at sample {position} of {len(resumed_permutation)}, so no sample is skipped or repeated")
    result.global_step, result.epoch, result.batch = global_step, epoch, batch_in_epoch
    result.start_step = global_step

    def checkpoint_state(permutation: torch.Tensor) -> dict[str, Any]:
        batches = max(sums["batches"], 1)
        return {
            "epoch": epoch,
            "batch": batch_in_epoch,
            "total_batches": total_batches,
            "global_step": global_step,
            "model_state_dict": model.state_dict(),
            **({} if sharded else {"optimizer_state_dict": optimizer.state_dict()}),
            "scheduler_state_dict": scheduler.state_dict(),
            "scaler_state_dict": scaler.state_dict(),
            "train_loss": sums["train"] / batches,
            "cls_loss": sums["cls"] / batches,
            "geo_loss": sums["geo"] / batches,
            "loss_sums": dict(sums),
            "errors": result.errors,
            "best_val_loss": result.best_val_loss,
            "best_hmean": result.best_hmean,
            # The latest validation (None before the first), top-level so that `ckptio list/info` shows it.
            **{k: result.last_validation.get(k) for k in VALIDATION_FIELDS},
            "rng_state": capture_rng(),
            "data_order": {"epoch": epoch, "permutation": permutation, "position": position},
            "epoch_validated": validated,
            "world_size": world.size,
            "sharded": sharded,
            "config": config.to_dict(),
            "kind": CHECKPOINT_KIND,
        }

    # ---- checkpoints --------------------------------------------------------------------------------------
    # Replicated state is written once, by rank 0; the other processes never wait for it. With --zero every
    # process writes its optimizer shard, and rank 0 commits the manifest once all shards are durable.
    manager = ckptio.CheckpointManager(
        config.save_dir, format=config.format, compression=config.compression, async_save=config.async_save,
        writer="process",  # leaves the GIL to training (README, "Writer process"); used with async_save only
        keep_count=config.keep_count, keep_full=config.keep_full, disk_budget=config.disk_budget,
        min_free=config.min_free,  # with async_save, keep_full's slimming runs in the writer process
        mirror=config.mirror, mirror_keep=config.mirror_keep, mirror_timeout=config.grace,
        rank=world.rank if sharded else 0, world_size=world.size if sharded else 1,
    ) if world.is_main or sharded else None
    run_id = world.broadcast(uuid.uuid4().hex)

    latest_save: list[Any] = [None]  # the newest save's future: what a preemption waits for

    def save(name: str, permutation: torch.Tensor) -> None:
        if manager is None:
            return
        if sharded:
            state = checkpoint_state(permutation) if world.is_main else None
            future = manager.save(state, name=name, shard=_optimizer_shard(optimizer, world),
                                  token=f"{run_id}:{global_step}:{name}")
        else:
            future = manager.save(checkpoint_state(permutation), name=name)
        report.queued(name, future, counts=world.is_main)
        latest_save[0] = future

    report = SaveReport(keep_full=config.keep_full)

    progress: EpochProgress | None = None

    mirror_failures_told = [0]

    def mirror_lines() -> list[str]:
        """A line when the mirror failed again since the last one (it retries; training goes on)."""
        mirror = manager.mirror if manager is not None else None
        if mirror is None or mirror.failures == mirror_failures_told[0]:
            return []
        mirror_failures_told[0] = mirror.failures
        return [f"mirror {mirror.url}: copying failed ({mirror.failures} attempt(s) so far; last: {mirror.last_error})"
                f"; retrying, training goes on; waiting: {', '.join(mirror.unmirrored) or 'none'}"]

    def report_saves() -> None:
        for line in report.lines() + mirror_lines():
            if progress is not None:  # above the progress bar, if there is one
                progress.write(line)
            else:
                say(line)

    # ---- the loop -----------------------------------------------------------------------------------------
    stop = config.max_steps is not None and global_step >= config.max_steps  # resumed at its last step: done
    prepared = False  # whether the checkpoint buffers were prepared for the full training state
    last_saved_step = global_step
    # Every process of a distributed run would have to agree on the step to stop at; there the signals keep
    # their default meaning.
    preemption = Preemption()
    signals = contextlib.ExitStack()
    if not world.distributed:
        signals.enter_context(preemption.installed())
    try:
        while epoch <= config.epochs and not stop:
            if batch_in_epoch == 0:
                sums = {"train": 0.0, "cls": 0.0, "geo": 0.0, "batches": 0}
                position = 0
            if resumed_permutation is not None:
                permutation, resumed_permutation = resumed_permutation, None
            else:
                permutation = epoch_order(epoch)
            order = _share(permutation.tolist(), position, config.batch_size, world)
            keys = [(i, augmentation_seed(config.seed, epoch, i)) for i in order]
            epoch_batches = batch_in_epoch + math.ceil((len(permutation) - position) / step_samples)
            loader = DataLoader(
                train_set, batch_size=config.batch_size, sampler=keys, collate_fn=collate,
                num_workers=config.workers, pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(config.seed + epoch),  # leaves the global RNG alone
                worker_init_fn=ignore_stop_signals,  # a job-wide SIGTERM is the trainer's to handle
            )
            progress = EpochProgress(epoch, epoch_batches, batch_in_epoch, say, show=world.is_main)
            for loaded, batch in enumerate(loader):
                # forward and backward
                model.train()
                if batch["size"] == 0 and world.distributed:
                    batch = _stand_in_batch(batch, config.image_size)  # every process must join the all-reduce
                if batch["size"] > 0:
                    batch = pseudo_targets(model, batch, device)  # no-op without word-level words
                    images = batch["image"].to(device, non_blocking=True)
                    targets = [batch[k].to(device, non_blocking=True) for k in ("region", "affinity", "mask")]
                    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                        prediction, _ = trained(images)
                    loss, cls_loss, geo_loss = craft_loss(prediction.float(), *targets)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss * batch.get("weight", 1.0)).backward()
                    _step_optimizer(optimizer, scaler, scheduler)
                    local = [loss.item(), cls_loss.item(), geo_loss.item()]
                else:  # one process only: every process of a distributed run has a batch (see above)
                    local = [math.nan, math.nan, math.nan]
                losses, errors = world.step_totals(local, int(batch["errors"]), device)
                result.errors += errors
                if batch["errors"] and len(result.bad_samples) < NAMED_BAD_SAMPLES:
                    batch_keys = keys[loaded * config.batch_size : (loaded + 1) * config.batch_size]
                    _name_bad_samples(train_set, [i for i, _ in batch_keys], result.bad_samples, progress.write)
                if batch["size"] > 0:
                    sums["train"] += losses[0]
                    sums["cls"] += losses[1]
                    sums["geo"] += losses[2]
                    sums["batches"] += 1
                batch_in_epoch += 1
                global_step += 1
                position = min(position + step_samples, len(permutation))
                if not prepared and manager is not None and config.async_save and _has_optimizer_state(optimizer):
                    # Buffers (pinned on CUDA) for the state as saves will see it: with Adam's moments, which exist
                    # only once the optimizer really stepped (AMP skips the first steps of most runs).
                    prepared = True
                    manager.prepare(checkpoint_state(permutation) if world.is_main else None,
                                    shard=_optimizer_shard(optimizer, world) if sharded else None)

                # periodic checkpoint: every save_freq steps of training, counted across epochs (so that epochs
                # shorter than save_freq save too), named after the epoch and the batch within it as in the guide
                if config.save_freq and global_step % config.save_freq == 0:
                    save(f"checkpoint_epoch_{epoch}_batch_{batch_in_epoch}", permutation)
                    last_saved_step = global_step
                report_saves()

                # progress, in the guide's words and order
                progress.update(report.label(epoch), progress_fields(
                    losses[0], losses[1], losses[2], result.errors, sums["train"] / max(sums["batches"], 1)))
                if preemption.requested or (config.max_steps is not None and global_step >= config.max_steps):
                    stop = True
                    break
            progress.close()
            progress = None
            report_saves()

            # validation and best model, at each epoch's end (rank 0 validates and tells the others, which all
            # take part in a sharded best_model save)
            if not stop and val_indices and not validated:  # a resumed best_model holds this validation
                result.last_validation = world.broadcast(
                    _validate_all(model, val_set, val_indices, config, device, use_amp, say)
                    if world.is_main else None)
                val_loss, val_hmean = result.last_validation["val_loss"], result.last_validation.get("val_hmean")
                if config.best_metric == "hmean":
                    improved = val_hmean is not None and val_hmean > result.best_hmean
                else:
                    improved = val_loss < result.best_val_loss
                result.best_val_loss = min(result.best_val_loss, val_loss)
                if val_hmean is not None:
                    result.best_hmean = max(result.best_hmean, val_hmean)
                validated = True
                say(f"Epoch {epoch} - 验证: train_loss={sums['train'] / max(sums['batches'], 1):.4f} "
                    f"{_describe(result.last_validation)}" + (" - best so far, saving best_model" if improved else ""))
                if improved:
                    save("best_model", permutation)
                report_saves()
            stop = stop or preemption.requested
            if not stop:
                epoch, batch_in_epoch, validated = epoch + 1, 0, False

        # a final checkpoint, so that the last steps are never lost
        if (config.save_freq or preemption.requested) and global_step > last_saved_step:
            if batch_in_epoch == 0:  # finished the last epoch, validation included: describe it as its end
                epoch, batch_in_epoch, validated = epoch - 1, total_batches, True
            save(f"checkpoint_epoch_{epoch}_batch_{batch_in_epoch}", permutation)
        if preemption.requested:
            _finish_preemption(preemption, latest_save[0], manager, config, global_step, say)
            result.stopped_by, result.exit_code = preemption.signal_name, preemption.exit_code
    except KeyboardInterrupt:
        result.interrupted = True
        say("interrupted: finishing the checkpoints already queued, nothing half-written is left")
    finally:
        if progress is not None:  # interrupted mid-epoch
            progress.close()
            progress = None
        try:
            if manager is not None:
                manager.close()
        finally:
            signals.close()  # a second signal while close() finishes the saves still exits at once
            report_saves()  # background outcomes (and a failure about to be raised) are printed first
    result.saves, result.skipped_saves, result.failed_saves = report.saved, report.skipped, report.failed
    result.slimmed = report.slimmed
    result.saved_paths = report.saved_paths

    # ---- summary ------------------------------------------------------------------------------------------
    result.global_step, result.epoch, result.batch = global_step, epoch, batch_in_epoch
    result.seconds = time.perf_counter() - started
    if manager is not None and manager.mirror is not None:
        say(_mirror_summary(manager.mirror))
    stats = manager.stats if manager is not None else ckptio.SaveStats()
    result.save_blocked_seconds = stats.blocked_seconds
    resumed_note = f", resumed at {result.start_step}" if result.start_step else ""
    say(f"done: {global_step - result.start_step} steps in {result.seconds:.1f}s (global step {global_step}"
        f"{resumed_note}); {report.summary()}; training blocked {stats.blocked_seconds:.2f}s "
        f"in saves ({100 * stats.blocked_seconds / max(result.seconds, 1e-9):.1f}% of the run); "
        f"errors={result.errors}; checkpoints in {config.save_dir}")
    return result


def _mirror_summary(mirror: Any) -> str:
    left = mirror.unmirrored
    text = f"mirror {mirror.url}: {len(mirror.mirrored)} checkpoint(s) copied and verified"
    if mirror.failures:
        text += f", {mirror.failures} failed attempt(s) (last: {mirror.last_error})"
    if left:
        text += f"; not mirrored: {', '.join(left)} (intact in the local directory)"
    return text


def _finish_preemption(preemption: Preemption, future: Any, manager: ckptio.CheckpointManager | None,
                       config: TrainConfig, global_step: int, say: Callable[[str], None]) -> None:
    """Wait (within ``config.grace`` of the signal) until the last save is durable and mirrored, and say so.

    Past the grace period the process exits at once: the scheduler's SIGKILL is due, and a save cut short leaves
    only a temporary file (the previous checkpoints stay valid)."""
    mirror = manager.mirror if manager is not None else None

    def mirrored(timeout: float) -> bool:
        assert mirror is not None
        return mirror.wait_mirrored(future.result().name, timeout)

    durable, copied, left = wait_durable(future, mirrored if mirror is not None else None, grace=config.grace,
                                         since=preemption.received_at)
    head = f"stopped by {preemption.signal_name} at global step {global_step}"
    resume = "continue with --resume auto" + (f" --mirror {mirror.url}" if mirror is not None else "")
    if durable:
        name = future.result().name
        if copied is False:
            assert mirror is not None
            mirror.close(0, finish_attempt=False)  # the grace period is spent: the copy is not waited for
            say(f"{head}: saved {name}, durable here but not mirrored to {mirror.url} within --grace "
                f"{config.grace:g}s; {resume}")
        else:
            say(f"{head}: saved {name}, durable{' and mirrored' if copied else ''} with {max(left, 0):.1f}s of "
                f"--grace {config.grace:g}s left; {resume}")
        return
    if future is None or future.done():  # nothing to save (no step since the last run), or the save failed
        say(f"{head}: no new checkpoint (the save report says why); {resume}")
        return
    say(f"{head}: the checkpoint was not durable within --grace {config.grace:g}s; exiting now (nothing "
        "half-written is left; the previous checkpoint stays valid)")
    sys.stdout.flush()
    os._exit(preemption.exit_code)


def _step_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> bool:
    """One optimizer step through the AMP scaler; the schedule advances only if the optimizer really stepped.

    With AMP the scaler skips ``optimizer.step()`` when the gradients hold inf/NaN (and halves its scale), as it
    does on the first steps of most runs. Stepping the scheduler anyway would shift the schedule by the number of
    skipped steps and makes PyTorch warn. So the learning rate follows optimizer steps taken, and since the
    scheduler's and scaler's state are both in every checkpoint, a resume reproduces the same schedule.
    """
    # The scaler calls optimizer.step() only when the gradients are finite: a hook sees whether it did, with no
    # host sync of its own (reading the scale before and after the step would add one every step).
    stepped: list[bool] = []
    hook = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    try:
        scaler.step(optimizer)
    finally:
        hook.remove()
    scaler.update()
    if stepped:
        scheduler.step()
    return bool(stepped)


def _restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any], say: Callable[[str], None]) -> None:
    """Load the AMP scaler's state; a checkpoint written without AMP (on the CPU, or with ``--no-amp``) has
    none, and a run that uses AMP then starts its scaler fresh, as a new run would."""
    if scaler.is_enabled() and not saved:
        say("the checkpoint was written without AMP (on the CPU or with --no-amp): the AMP gradient scaler "
            "starts fresh (its first steps may be skipped while it finds its scale)")
        return
    scaler.load_state_dict(saved)  # a scaler without AMP ignores a saved state


def _has_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer has stepped and holds its per-parameter state (Adam's moments)."""
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: this process's shard
    return bool(inner.state)


def _optimizer_shard(optimizer: Any, world: World) -> dict[str, Any]:
    """This process's part of a sharded (``--zero``) checkpoint."""
    return {"optimizer_shard": optimizer.optim.state_dict(), "rank": world.rank}


def _name_bad_samples(dataset: IcdarDataset | SyntheticTextDataset | MixedDataset, indices: list[int],
                      named: list[str], write: Callable[[str], None]) -> None:
    """Say which samples of a batch could not be read, and why, until :data:`NAMED_BAD_SAMPLES` are named.

    The loader only counts them (a worker process skips what it cannot read); the reason is found again by
    reading each of the batch's samples here, which costs a read only for the first few batches with errors.
    """
    for index in indices:
        if len(named) >= NAMED_BAD_SAMPLES:
            return
        try:
            dataset.load(index)
        except Exception as exc:  # the same failures the dataset skips; anything else would have stopped training
            named.append(f"{dataset.describe(index)}: {exc}")
            write(f"skipped an unreadable sample: {named[-1]}" + (
                " (further ones are only counted, errors= in the progress line)"
                if len(named) == NAMED_BAD_SAMPLES else ""))


def _share(permutation: list[int], position: int, batch_size: int, world: World) -> list[int]:
    """This process's samples for the rest of the epoch, step by step from ``position``.

    Step ``s`` takes the next ``batch_size x world.size`` samples of the epoch's order and gives process ``r``
    the ``r``-th slice, so the order is the same for any number of processes. A process left without samples
    in a short final step gets one sample from the epoch's start (as DistributedSampler pads).
    """
    if world.size == 1:
        return permutation[position:]
    step = batch_size * world.size
    mine: list[int] = []
    for start in range(position, len(permutation), step):
        part = permutation[start : start + step][world.rank * batch_size : (world.rank + 1) * batch_size]
        mine.extend(part or permutation[world.rank % len(permutation) : world.rank % len(permutation) + 1])
    return mine


def _stand_in_batch(batch: dict[str, Any], image_size: int) -> dict[str, Any]:
    """One blank image whose loss is weighted 0, for a process whose samples all failed to load."""
    half = image_size // 2
    return {"image": torch.zeros(1, 3, image_size, image_size), "region": torch.zeros(1, half, half),
            "affinity": torch.zeros(1, half, half), "mask": torch.zeros(1, half, half),
            "errors": batch["errors"], "size": 1, "weight": 0.0}


def _validate(model: torch.nn.Module, dataset: Any, indices: list[int], config: TrainConfig,
              device: torch.device, use_amp: bool, say: Callable[[str], None] = _silent) -> float:
    """Mean loss over the held-out images (no augmentation, fixed order): deterministic.

    An unreadable image is left out of the loss, counted and (the first few) named, as in training.
    """
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=[(i, 0) for i in indices],
                        collate_fn=collate, num_workers=0)
    model.eval()
    total, count, errors = 0.0, 0, 0
    named: list[str] = []
    with torch.no_grad():
        for number, batch in enumerate(loader):
            if batch["errors"]:
                errors += int(batch["errors"])
                _name_bad_samples(dataset, indices[number * config.batch_size : (number + 1) * config.batch_size],
                                  named, lambda _: None)
            if batch["size"] == 0:
                continue
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                prediction, _ = model(batch["image"].to(device))
            loss, _, _ = craft_loss(prediction.float(), *(batch[k].to(device) for k in ("region", "affinity", "mask")))
            total += loss.item() * batch["size"]
            count += batch["size"]
    model.train()
    if errors:
        say(f"validation left out {errors} unreadable image(s) of {len(indices)}: " + "; ".join(named)
            + (" ..." if errors > len(named) else ""))
    return total / count if count else math.inf


def _validate_all(model: torch.nn.Module, dataset: Any, indices: list[int], config: TrainConfig,
                  device: torch.device, use_amp: bool, say: Callable[[str], None] = _silent) -> dict[str, float]:
    """Validation loss and, with ``val_hmean``, the precision/recall/H-mean of the words the model detects."""
    scores = {"val_loss": _validate(model, dataset, indices, config, device, use_amp, say)}
    if config.val_hmean:
        thresholds = Thresholds(config.text_threshold, config.link_threshold, config.low_text)
        found = evaluate_model(model, dataset, indices, device, image_size=config.image_size, thresholds=thresholds,
                               use_amp=use_amp)
        scores.update(val_precision=found["precision"], val_recall=found["recall"], val_hmean=found["hmean"])
    return scores


def _describe(scores: dict[str, float]) -> str:
    text = f"val_loss={scores['val_loss']:.4f}"
    if "val_hmean" in scores:
        text += (f" val_hmean={scores['val_hmean']:.3f} (precision={scores['val_precision']:.3f} "
                 f"recall={scores['val_recall']:.3f})")
    return text


def _resume_path(config: TrainConfig, say: Callable[[str], None]) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        local = find_resume_checkpoint(config.save_dir, say)
        if config.mirror is None:
            return local
        from ckptio.mirror import newer_from_mirror, open_target

        return newer_from_mirror(local, open_target(config.mirror), Path(config.save_dir), say)
    path = Path(config.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file (or use --resume auto)")
    return path


def _load_resume_state(path: Path, config: TrainConfig, world: World, given: Collection[str] | None,
                       say: Callable[[str], None]) -> tuple[dict[str, Any], TrainConfig]:
    """The checkpoint's state and the config the resumed run has (see :func:`train`'s ``given``)."""
    seal, _ = ckptio.read_meta(path)
    if seal is not None and is_slim(seal.meta):
        raise ValueError(
            f"{path} holds the model weights only (slimmed by --keep-full), not the optimizer and data order a "
            "resume needs; resume from one of the newest checkpoints (kept complete), or start a new run from "
            "these weights with --pretrained")
    state = ckptio.load(path, map_location="cpu")
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise ValueError(
            f"{path} is not a craft_train checkpoint (it lacks the training state); to start from its weights "
            "use --pretrained instead of --resume"
        )
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{path} lacks the training config a resume needs: the file is damaged; resume from "
                         "another checkpoint")
    try:
        config, notes = resumed_config(saved, config, given)
    except ValueError as exc:
        raise ValueError(f"cannot resume from {path} with different settings: {exc}. Leave those flags out (a "
                         "resume takes its settings from the checkpoint), or start a new run in another "
                         "--save-dir") from None
    if notes:
        say("resuming with the checkpoint's settings, except " + ", ".join(notes))
    step = state.get("global_step")
    if config.max_steps is not None and type(step) is int and step >= config.max_steps:
        say(f"the run already reached --max-steps {config.max_steps} (global step {step}): nothing to train; give a "
            "larger --max-steps to go on")
    if state.get("sharded") and (not config.zero or state.get("world_size") != world.size):
        raise ValueError(
            f"{path} holds an optimizer sharded over {state.get('world_size')} processes (--zero); resume it with "
            f"--zero and --nproc-per-node {state.get('world_size')}")
    if not state.get("sharded") and config.zero and world.distributed:
        raise ValueError(f"{path} holds a whole optimizer state; resume it without --zero")
    return state, config
