"""The CRAFT training loop: read it top to bottom.

Every ``save_freq`` batches the full training state goes to ``checkpoint_epoch_{epoch}_batch_{batch}``
through :class:`ckptio.CheckpointManager` (in the background with ``async_save``); ``best_model`` whenever the
validation loss improves (or, with ``best_metric="hmean"``, the H-mean of the words detected in the validation
images). Any of them resumes the run exactly where it stopped.

Set-up is :func:`craft_train.build.build`; what a checkpoint holds is :class:`craft_train.state.TrainState` (the
loop's counters) and :meth:`craft_train.build.Run.state_dict` (the training objects); restoring them is
:func:`craft_train.resume.restore`; saving, :class:`craft_train.saving.Checkpoints`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch.utils.data import DataLoader

from .build import Run, build, check_save_dir, device_kind
from .config import ConfigError, TrainConfig
from .data import collate
from .determinism import deterministic_mode
from .distributed import World, setup_world
from .loss import craft_loss
from .order import augmentation_seed, share
from .preemption import RELAY_WINDOW, Preemption, ignore_stop_signals
from .progress import EpochProgress, progress_fields
from .resume import load_checkpoint, restore, resume_path
from .saving import Checkpoints, finish_preemption, mirror_summary
from .state import TrainResult, TrainState
from .stepping import step_optimizer
from .validation import NAMED_BAD_SAMPLES, describe, name_bad_samples, validate_all
from .validation import validate as _validate  # noqa: F401 (the tests reach the validation loss here)
from .weak import pseudo_targets

__all__ = ["TrainResult", "train"]

def train(config: TrainConfig, *, say: Callable[[str], None] = print,
          given: Collection[str] | None = None) -> TrainResult:
    """Train CRAFT as ``config`` says; under ``torchrun`` every process calls this and rank 0 saves.

    ``given`` names the settings the user gave explicitly (the command line's flags): a resume takes every other
    one from the checkpoint's config (:func:`craft_train.config.resumed_config`). ``None`` counts every setting
    as given, so that a resume with any other value of a setting that decides the experiment is refused.
    """
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    if not config.fsdp:  # FSDP2 hook: a --fsdp run's checkpoint directories need --fsdp (craft_train.fsdp)
        from .fsdp import refuse_sharded_checkpoints

        refuse_sharded_checkpoints(config)
    check_save_dir(config)  # before any model or data is set up
    with deterministic_mode(config.deterministic):  # before CUDA, cuBLAS or the model exist; undone afterwards
        world = setup_world(device_kind(config))
        try:
            if config.fsdp:  # FSDP2 hook: sharded model and DCP checkpoints, a loop of its own (craft_train.fsdp)
                from .fsdp import train_fsdp

                return train_fsdp(config, world, say if world.is_main else _silent, given)
            return _train(config, world, say if world.is_main else _silent, given)
        finally:
            world.close()


def _silent(_: str) -> None:
    pass


def _train(config: TrainConfig, world: World, say: Callable[[str], None],
           given: Collection[str] | None) -> TrainResult:
    started = time.perf_counter()
    # ---- the checkpoint to resume from: first, since its config decides the data and the model -------------
    resume_from = world.broadcast(resume_path(config, say) if world.is_main else None)
    saved: dict[str, Any] | None = None
    if resume_from is not None:
        saved, config = load_checkpoint(resume_from, config, world, given, say)

    # ---- data, model, optimizer, schedule; then where the checkpoint left them -----------------------------
    run = build(config, world, say=say)
    state = TrainState(total_batches=run.total_batches)
    if saved is not None:
        assert resume_from is not None
        restore(run, state, saved, resume_from, say)
        saved = None  # the loaded tensors are in the model and optimizer now
    result = TrainResult(model=run.model, optimizer=run.optimizer, global_step=state.global_step,
                         start_step=state.global_step, epoch=state.epoch, batch=state.batch)
    checkpoints = Checkpoints(config, world, run.sharded)

    # ---- the loop -----------------------------------------------------------------------------------------
    stop = config.max_steps is not None and state.global_step >= config.max_steps  # resumed at its last step
    last_saved_step = state.global_step
    # A signal stops the run at a step boundary; under torchrun every process asks preemption.agree() at the same
    # points, so that all stop at the same step and take part in its save.
    preemption = Preemption(repeat_window=RELAY_WINDOW if world.distributed else 0.0)
    signals = contextlib.ExitStack()
    signals.enter_context(preemption.installed())
    progress: EpochProgress | None = None
    try:
        while state.epoch <= config.epochs and not stop:
            permutation = state.start_epoch(run.epoch_order)
            keys, loader = _epoch_loader(run, state)
            epoch_batches = state.batch + math.ceil((len(permutation) - state.position) / run.step_samples)
            progress = EpochProgress(state.epoch, epoch_batches, state.batch, say, show=world.is_main)
            for loaded, batch in enumerate(loader):
                losses, errors, trained = _train_step(run, batch)
                state.errors += errors
                if batch["errors"] and len(result.bad_samples) < NAMED_BAD_SAMPLES:
                    batch_keys = keys[loaded * config.batch_size : (loaded + 1) * config.batch_size]
                    name_bad_samples(run.train_set, [i for i, _ in batch_keys], result.bad_samples, progress.write)
                if trained:
                    state.add_losses(losses)
                state.batch += 1
                state.global_step += 1
                state.position = min(state.position + run.step_samples, len(permutation))
                checkpoints.prepare_once(run, state)

                # periodic checkpoint: every save_freq steps of training, counted across epochs (so that epochs
                # shorter than save_freq save too), named after the epoch and the batch within it as in the guide
                if config.save_freq and state.global_step % config.save_freq == 0:
                    checkpoints.save(f"checkpoint_epoch_{state.epoch}_batch_{state.batch}", run, state)
                    last_saved_step = state.global_step
                checkpoints.tell(progress.write)  # above the progress bar

                # progress, in the guide's words and order
                progress.update(checkpoints.report.label(state.epoch), progress_fields(
                    losses[0], losses[1], losses[2], state.errors, state.mean_train_loss))
                # stop: a signal to any process (agreed by all, every step), or the last step
                preempted = preemption.agree(world, run.device)
                if preempted or (config.max_steps is not None and state.global_step >= config.max_steps):
                    stop = True
                    break
            progress.close()
            progress = None
            checkpoints.tell(say)

            # validation and best model, at each epoch's end (rank 0 validates and tells the others, which all
            # take part in a sharded best_model save); a resumed best_model holds this epoch's validation
            if not stop and run.val_indices and not state.validated:
                scores = world.broadcast(validate_all(run.model, run.val_set, run.val_indices, config, run.device,
                                                      run.use_amp, say) if world.is_main else None)
                improved = state.record_validation(scores, config.best_metric)
                say(f"Epoch {state.epoch} - 验证: train_loss={state.mean_train_loss:.4f} {describe(scores)}"
                    + (" - best so far, saving best_model" if improved else ""))
                if improved:
                    checkpoints.save("best_model", run, state)
                checkpoints.tell(say)
            stop = preemption.agree(world, run.device) or stop  # a signal during validation
            if not stop:
                state.epoch, state.batch, state.validated = state.epoch + 1, 0, False

        # a final checkpoint, so that the last steps are never lost (and the one a signal asked for, even one that
        # came during the last step's save or validation)
        preempted = preemption.agree(world, run.device)
        if (config.save_freq or preempted) and state.global_step > last_saved_step:
            if state.batch == 0:  # finished the last epoch, validation included: describe it as its end
                state.epoch, state.batch, state.validated = state.epoch - 1, run.total_batches, True
            checkpoints.save(f"checkpoint_epoch_{state.epoch}_batch_{state.batch}", run, state)
        if preemption.stopped_by is not None:
            finish_preemption(preemption, checkpoints, state.global_step, say)
            if preempted:  # every process stops here (a signal after the agreement may have reached one only)
                # torchrun stops every process as soon as one exits with a code other than 0: none may leave
                # before the save of every process is durable
                world.barrier()
            result.stopped_by, result.exit_code = preemption.stopped_by, preemption.exit_code
    except KeyboardInterrupt:
        result.interrupted = True
        say("interrupted: finishing the checkpoints already queued, nothing half-written is left")
    finally:
        if progress is not None:  # interrupted mid-epoch
            progress.close()
        try:
            checkpoints.close()
        finally:
            signals.close()  # a second signal while close() finishes the saves still exits at once
            checkpoints.tell(say)  # background outcomes (and a failure about to be raised) are printed first
    return _summary(result, state, checkpoints, config, time.perf_counter() - started, say)


def _summary(result: TrainResult, state: TrainState, checkpoints: Checkpoints, config: TrainConfig,
             seconds: float, say: Callable[[str], None]) -> TrainResult:
    """Fill in what the run did, and say it."""
    report = checkpoints.report
    result.saves, result.skipped_saves, result.failed_saves = report.saved, report.skipped, report.failed
    result.slimmed, result.saved_paths = report.slimmed, report.saved_paths
    result.global_step, result.epoch, result.batch = state.global_step, state.epoch, state.batch
    result.errors, result.best_val_loss, result.best_hmean = state.errors, state.best_val_loss, state.best_hmean
    result.last_validation = state.last_validation
    result.seconds = seconds
    manager = checkpoints.manager
    if manager is not None and manager.mirror is not None:
        say(mirror_summary(manager.mirror))
    stats = checkpoints.stats
    result.save_blocked_seconds = stats.blocked_seconds
    resumed_note = f", resumed at {result.start_step}" if result.start_step else ""
    say(f"done: {state.global_step - result.start_step} steps in {result.seconds:.1f}s (global step "
        f"{state.global_step}{resumed_note}); {report.summary()}; training blocked {stats.blocked_seconds:.2f}s "
        f"in saves ({100 * stats.blocked_seconds / max(result.seconds, 1e-9):.1f}% of the run); "
        f"errors={result.errors}; checkpoints in {config.save_dir}")
    return result


def _epoch_loader(run: Run, state: TrainState) -> tuple[list[tuple[int, int]], DataLoader[Any]]:
    """This process's (index, augmentation seed) keys for the rest of the epoch, and the loader over them."""
    config = run.config
    assert state.permutation is not None
    order = share(state.permutation.tolist(), state.position, config.batch_size, run.world)
    keys = [(i, augmentation_seed(config.seed, state.epoch, i)) for i in order]
    loader = DataLoader(
        run.train_set, batch_size=config.batch_size, sampler=keys, collate_fn=collate,
        num_workers=config.workers, pin_memory=run.device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed + state.epoch),  # leaves the global RNG alone
        worker_init_fn=ignore_stop_signals,  # a job-wide SIGTERM is the trainer's to handle
    )
    return keys, loader


def _train_step(run: Run, batch: dict[str, Any]) -> tuple[list[float], int, bool]:
    """Forward, backward and optimizer step on one batch: the losses and unreadable samples of every process,
    and whether a batch was trained on (a process whose samples all failed trains on nothing)."""
    run.model.train()
    device = run.device
    if batch["size"] == 0 and run.world.distributed:
        batch = _stand_in_batch(batch, run.config.image_size)  # every process must join the all-reduce
    if batch["size"] > 0:
        batch = pseudo_targets(run.model, batch, device)  # no-op without word-level words
        images = batch["image"].to(device, non_blocking=True)
        targets = [batch[k].to(device, non_blocking=True) for k in ("region", "affinity", "mask")]
        with torch.autocast(device.type, dtype=torch.float16, enabled=run.use_amp):
            prediction, _ = run.trained(images)
        loss, cls_loss, geo_loss = craft_loss(prediction.float(), *targets)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss * batch.get("weight", 1.0)).backward()
        step_optimizer(run.optimizer, run.scaler, run.scheduler)
        local = [loss.item(), cls_loss.item(), geo_loss.item()]
    else:  # one process only: every process of a distributed run has a batch (see above)
        local = [math.nan, math.nan, math.nan]
    losses, errors = run.world.step_totals(local, int(batch["errors"]), device)
    return losses, errors, batch["size"] > 0


def _stand_in_batch(batch: dict[str, Any], image_size: int) -> dict[str, Any]:
    """One blank image whose loss is weighted 0, for a process whose samples all failed to load."""
    half = image_size // 2
    return {"image": torch.zeros(1, 3, image_size, image_size), "region": torch.zeros(1, half, half),
            "affinity": torch.zeros(1, half, half), "mask": torch.zeros(1, half, half),
            "errors": batch["errors"], "size": 1, "weight": 0.0}
