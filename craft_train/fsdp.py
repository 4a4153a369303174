"""``--fsdp``: CRAFT sharded with FSDP2 over its blocks, checkpointed as DCP directories that resume at any
process count.

Each process holds a slice of every parameter and of Adam's moments (``torch.distributed.fsdp.fully_shard`` on
a 1-D device mesh: gloo on CPU, nccl on CUDA). Checkpoints go through :class:`ckptio.dcp_manager.
ShardedCheckpointManager`: one directory per save (``checkpoint_epoch_E_batch_B``, ``best_model``), every item
digested, committed atomically by rank 0. ``get_state_dict`` / ``set_state_dict`` (from
``torch.distributed.checkpoint.state_dict``) give the state by parameter name, so DCP reshards it on load: a run
saved at 2 processes continues at 1 or 3 with the parameters and optimizer state exactly as saved.

What is replicated rather than sharded, and how it is kept well defined:

* BatchNorm's running statistics are buffers, not parameters: FSDP2 leaves a full copy on every process, and
  each would drift with its own samples. After every optimizer step rank 0's copy is broadcast to all (as DDP's
  ``broadcast_buffers`` does before each forward), so every process holds the same statistics, the checkpoint
  stores them once, and a resume at any process count gives them to every process.
* The data position: the epoch's order is a pure function of ``(seed, epoch)``, independent of the process
  count; the checkpoint stores the order and how many of its samples were consumed. A resumed run continues at
  that sample with steps of ``batch_size x processes`` samples of the new count: no sample of the epoch is
  skipped or repeated, but the steps after the resume are those of a run at the new count (a different global
  batch than the saving run's, so not bit-identical to an uninterrupted run unless the count is the same).
* The rest of the training state (epoch, batch, step, schedule, loss sums, best validation loss, config) is one
  JSON document stored in the checkpoint beside the tensors.

With one process (plain ``python -m craft_train --fsdp``, or ``torchrun --nproc-per-node 1``) the model is not
wrapped: the same state-dict calls give the same names, so a checkpoint of a sharded run loads into it and back.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ckptio import scan
from ckptio.dcp import checkpoint_entries
from ckptio.dcp_manager import ShardedCheckpointManager, latest

from .build import datasets, device_kind, epoch_order
from .config import TrainConfig, resumed_config
from .data import collate
from .distributed import World
from .loss import craft_loss
from .model import CRAFT, load_pretrained, load_pretrained_backbone
from .order import augmentation_seed, share
from .preemption import RELAY_WINDOW, Preemption, ignore_stop_signals
from .state import TrainResult
from .stepping import step_optimizer  # the same rule as the single-file loop

__all__ = [
    "CHECKPOINT_KIND",
    "amp_enabled",
    "find_resume_directory",
    "get_train_state",
    "grad_scaler",
    "load_train_state",
    "read_progress",
    "refuse_sharded_checkpoints",
    "shard_model",
    "sync_buffers",
    "train_fsdp",
]

CHECKPOINT_KIND = "craft_train_fsdp"

UNSUPPORTED = {
    "zero": "--fsdp already shards the optimizer (and the model); drop --zero",
    "keep_full": "--keep-full slims checkpoint files; sharded checkpoint directories are not slimmed yet: drop it",
    "mirror": "--mirror copies checkpoint files; sharded checkpoint directories are not mirrored yet: drop it",
    "format": "--format safetensors writes files; --fsdp writes DCP directories: drop --format",
}


def check_config(config: TrainConfig) -> None:
    """``ValueError`` naming the setting to drop when ``config`` asks ``--fsdp`` for what it does not do."""
    for name, why in UNSUPPORTED.items():
        value = getattr(config, name)
        if value not in (None, False, "torch"):
            raise ValueError(why)
    if config.uses_weak_supervision:
        # The model labels a batch's word crops only when the batch has some: processes would disagree on
        # whether to join the sharded forward pass.
        raise ValueError("--fsdp does not run weak supervision yet (each process would label a different number "
                         "of word crops); add --weak-supervision off, or train without --fsdp")


def shard_model(model: CRAFT, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` with FSDP2 over each of CRAFT's blocks and the whole (one process: ``model`` itself).

    Sharding block by block lets each block's parameters be gathered just before it runs and freed after,
    instead of the whole model at once.
    """
    if not world.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # A block's input passes through FSDP2's backward hook as a view; a block that begins with an in-place ReLU
    # (torchvision's VGG slices do) would modify that view, which autograd forbids. Same values either way.
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    mesh = init_device_mesh(device.type, (world.size,))
    blocks = [*(getattr(model.basenet, f"slice{i}") for i in range(1, 6)),
              model.upconv1, model.upconv2, model.upconv3, model.upconv4, model.conv_cls]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def amp_enabled(config: TrainConfig, device: torch.device) -> bool:
    """Whether the run trains with AMP (fp16 autocast and a gradient scaler): ``--amp`` on CUDA, as without
    ``--fsdp``; on the CPU it trains in full precision."""
    return config.amp and device.type == "cuda"


def grad_scaler(enabled: bool, world: World, device: torch.device) -> torch.amp.GradScaler:
    """The AMP gradient scaler (disabled: a pass-through). Sharded under torchrun: each process holds a slice of
    every gradient, so an inf/NaN in one slice must make every process skip the step (``ShardedGradScaler``
    all-reduces that finding); one process has whole gradients and torch's own scaler."""
    if world.distributed:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def sync_buffers(model: torch.nn.Module, world: World) -> None:
    """Rank 0's BatchNorm statistics on every process (see the module's docstring)."""
    if not world.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def get_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    progress: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint holds: the model's and optimizer's (sharded) state by name, and ``progress`` as JSON."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optimizer_state,
            "progress": json.dumps({**progress, "kind": CHECKPOINT_KIND}, sort_keys=True)}


def read_progress(path: Path) -> dict[str, Any]:
    """The training progress (epoch, step, data position, config ...) stored in checkpoint directory ``path``.

    Read by each process on its own (no collective): the config it holds decides how the model is built.
    """
    import torch.distributed.checkpoint as dcp

    from ckptio.dcp import Reader

    box: dict[str, Any] = {"progress": ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
            dcp.load(box, storage_reader=Reader(path), no_dist=True)
        progress = json.loads(box["progress"])
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable craft_train --fsdp checkpoint ({' '.join(str(exc).split())[:200]}"
                         "); resume from another checkpoint") from None
    if not isinstance(progress, dict) or progress.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a craft_train --fsdp checkpoint (its training progress is missing); "
                         "resume from another checkpoint")
    return progress


def load_train_state(manager: ShardedCheckpointManager, path: Path, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
    """Load ``path``'s model and optimizer state into ``model`` and ``optimizer`` at this run's process count.

    The optimizer's state exists before the load (``get_state_dict`` creates it), so DCP has every tensor to
    read into, resharded to this run's slices.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict, set_state_dict

    if not _holds_optimizer_state(path):
        # Every step before the save was skipped by the AMP scaler (inf/NaN gradients, as in the first steps of
        # most runs): Adam had no state, and the resumed optimizer starts without any, as the saving run's did.
        model_only = {"model": get_model_state_dict(model)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
            manager.load(model_only, path)
        set_model_state_dict(model, model_only["model"])
        return
    state = get_train_state(model, optimizer, {})
    del state["progress"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        manager.load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _holds_optimizer_state(path: Path) -> bool:
    from ckptio.dcp import Reader

    return any(key.startswith("optim.state.") for key in Reader(path).read_metadata().state_dict_metadata)


def refuse_sharded_checkpoints(config: TrainConfig) -> None:
    """For a run without ``--fsdp``: ``ValueError`` saying to add ``--fsdp`` when it would resume from, or write
    beside, the checkpoint directories of a ``--fsdp`` run (which a run without it neither sees nor loads)."""
    if config.resume not in (None, "auto") and Path(config.resume).is_dir():
        raise ValueError(f"--resume {config.resume} is a checkpoint directory of a --fsdp run; add --fsdp")
    directory = Path(config.save_dir)
    if directory.is_dir() and not scan(directory):
        sharded = checkpoint_entries(directory)
        if sharded:
            raise ValueError(f"--save-dir {directory} holds checkpoint directories of a --fsdp run (newest: "
                             f"{sharded[0].name}); add --fsdp to continue it, or use another --save-dir")


def find_resume_directory(config: TrainConfig, say: Callable[[str], None]) -> Path | None:
    """The checkpoint directory this run resumes from (``--resume auto``: the newest that verifies)."""
    directory = Path(config.save_dir)
    if config.resume is None:
        if not config.reuse_save_dir and directory.is_dir() and checkpoint_entries(directory):
            raise ValueError(f"--save-dir {directory} already holds sharded checkpoints of an earlier run. To "
                             "continue that run add --resume auto; to start a new run use another --save-dir, or "
                             "add --reuse-save-dir")
        return None
    if config.resume != "auto":
        path = Path(config.resume)
        if path.is_file():
            raise ValueError(f"--resume {path} is a checkpoint file written without --fsdp; --fsdp resumes "
                             "checkpoint directories. Resume it without --fsdp")
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint directory (or use --resume auto)")
        return path
    if directory.is_dir() and not checkpoint_entries(directory) and scan(directory):
        raise ValueError(f"--resume auto: {directory} holds checkpoint files written without --fsdp; resume them "
                         "without --fsdp (or start a --fsdp run in another --save-dir)")
    if not directory.is_dir() or not checkpoint_entries(directory):
        say(f"--resume auto: {directory} holds no sharded checkpoint; starting a fresh run")
        return None
    found = latest(directory)
    if found is None:
        raise ValueError(f"--resume auto: no checkpoint directory in {directory} verifies (run `python -m ckptio "
                         "verify` on it to see why); nothing was changed. Start a new run in another --save-dir")
    return found


def train_fsdp(config: TrainConfig, world: World, say: Callable[[str], None],
               given: Collection[str] | None) -> Any:
    """The training loop of ``--fsdp`` (called by :func:`craft_train.train.train` on every process)."""
    from .validation import validate_all

    check_config(config)
    started = time.perf_counter()
    # ---- the checkpoint to resume from: first, since its config decides the model, the data and the saves ----
    resume_path: Path | None = world.broadcast(find_resume_directory(config, say) if world.is_main else None)
    progress: dict[str, Any] = {}
    if resume_path is not None:  # its config decides the model, the data and the checkpoint options
        progress, config = _resumed_settings(resume_path, config, given, say)
    device = torch.device("cuda", world.local_rank) if device_kind(config) == "cuda" else torch.device("cpu")
    use_amp = amp_enabled(config, device)
    manager = ShardedCheckpointManager(config.save_dir, keep_count=config.keep_count,
                                       disk_budget=config.disk_budget, min_free=config.min_free,
                                       async_save=config.async_save, compression=config.compression,
                                       writer="process")  # as the other loops: leaves the GIL to training
    result = TrainResult()
    # A signal to any process stops every one at the same step, which all save (Preemption.agree, every step).
    preemption = Preemption(repeat_window=RELAY_WINDOW if world.distributed else 0.0)
    signals = contextlib.ExitStack()
    signals.enter_context(preemption.installed())
    try:
        # ---- model, optimizer, schedule, AMP scaler; then where the checkpoint left them ---------------------
        torch.manual_seed(config.seed)
        model = CRAFT().to(device)
        if config.pretrained:
            say(f"--pretrained {config.pretrained}: {load_pretrained(model, config.pretrained).source}")
        elif config.pretrained_backbone:
            load_pretrained_backbone(model, config.pretrained_backbone)
        model = shard_model(model, world, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        result.model, result.optimizer = model, optimizer

        epoch, batch_in_epoch, global_step, position = 1, 0, 0, 0
        sums = {"train": 0.0, "batches": 0}
        resumed_order: list[int] | None = None
        validated = False
        if resume_path is not None:
            load_train_state(manager, resume_path, model, optimizer)
            epoch, batch_in_epoch, global_step = progress["epoch"], progress["batch"], progress["global_step"]
            position, resumed_order = progress["position"], progress["order"]
            sums, validated = progress["loss_sums"], progress["epoch_validated"]
            result.best_val_loss = progress["best_val_loss"]
            say(f"resumed from {resume_path}: epoch {epoch}, batch {batch_in_epoch}, global step {global_step}")
            if progress["world_size"] != world.size:
                say(f"the checkpoint was written by {progress['world_size']} process(es), this run has "
                    f"{world.size}: the epoch continues at sample {position} of {len(resumed_order)} with "
                    f"{config.batch_size * world.size} samples a step (no sample skipped or repeated)")
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_steps,
                                                    gamma=config.lr_gamma)
        scaler = grad_scaler(use_amp, world, device)
        if resume_path is not None:
            scheduler.load_state_dict(progress["scheduler"])
            if use_amp and progress.get("scaler"):  # a checkpoint of a full-precision run starts a fresh scale
                scaler.load_state_dict(progress["scaler"])
        result.start_step = global_step

        # ---- data ------------------------------------------------------------------------------------------
        train_set, val_set, train_indices, val_indices = datasets(config)

        step_samples = config.batch_size * world.size

        def save(name: str, order: list[int]) -> None:
            progress = {"epoch": epoch, "batch": batch_in_epoch, "global_step": global_step, "position": position,
                        "order": order, "loss_sums": sums, "epoch_validated": validated,
                        "best_val_loss": result.best_val_loss, "world_size": world.size,
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "config": config.to_dict(),
                        "train_loss": sums["train"] / max(sums["batches"], 1)}
            manager.save(get_train_state(model, optimizer, progress), name=name)
            result.saves += 1

        # ---- the loop ----------------------------------------------------------------------------------------
        stop = config.max_steps is not None and global_step >= config.max_steps
        last_saved_step, last_saved_name = global_step, ""
        order: list[int] = []
        while epoch <= config.epochs and not stop:
            if batch_in_epoch == 0:
                sums, position = {"train": 0.0, "batches": 0}, 0
            order = (resumed_order if resumed_order is not None
                     else [int(i) for i in epoch_order(config, train_set, train_indices, epoch).tolist()])
            resumed_order = None
            mine = share(order, position, config.batch_size, world)
            keys = [(i, augmentation_seed(config.seed, epoch, i)) for i in mine]
            loader = DataLoader(train_set, batch_size=config.batch_size, sampler=keys, collate_fn=collate,
                                num_workers=config.workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(config.seed + epoch),
                                worker_init_fn=ignore_stop_signals)
            for batch in loader:
                loss_total, errors = _train_step(model, optimizer, scheduler, scaler, batch, config, world, device)
                result.errors += errors
                sums["train"] += loss_total
                sums["batches"] += 1
                batch_in_epoch += 1
                global_step += 1
                position = min(position + step_samples, len(order))
                if config.save_freq and global_step % config.save_freq == 0:
                    last_saved_name = f"checkpoint_epoch_{epoch}_batch_{batch_in_epoch}"
                    save(last_saved_name, order)
                    last_saved_step = global_step

                # stop: a signal to any process (agreed by all, every step), or the last step
                preempted = preemption.agree(world, device)
                if preempted or (config.max_steps is not None and global_step >= config.max_steps):
                    stop = True
                    break
            say(f"Epoch {epoch}: batch {batch_in_epoch}, global step {global_step}, "
                f"train_loss={sums['train'] / max(sums['batches'], 1):.4f}")
            if not stop and val_indices and not validated:
                # Every process runs the same validation: each sharded forward pass needs all of them.
                scores = validate_all(model, val_set, val_indices, config, device, use_amp)
                result.last_validation = scores
                improved = scores["val_loss"] < result.best_val_loss
                result.best_val_loss = min(result.best_val_loss, scores["val_loss"])
                validated = True
                say(f"Epoch {epoch} - val_loss={scores['val_loss']:.4f}"
                    + (" - best so far, saving best_model" if improved else ""))
                if improved:
                    save("best_model", order)
            stop = preemption.agree(world, device) or stop  # a signal during validation
            if not stop:
                epoch, batch_in_epoch, validated = epoch + 1, 0, False

        # ---- a final checkpoint, so that the last steps are never lost (and the one a signal asked for) ------
        preempted = preemption.agree(world, device)  # also a signal during the last step's save or validation
        if (config.save_freq or preempted) and global_step > last_saved_step:
            if batch_in_epoch == 0:
                epoch, batch_in_epoch, validated = epoch - 1, math.ceil(len(order) / step_samples), True
            last_saved_name = f"checkpoint_epoch_{epoch}_batch_{batch_in_epoch}"
            save(last_saved_name, order)
        if preemption.stopped_by is not None:
            _finish_preemption(preemption, manager, global_step, last_saved_name, say)
            result.stopped_by, result.exit_code = preemption.stopped_by, preemption.exit_code
    finally:
        try:
            manager.close()
        finally:
            signals.close()  # a second signal while close() finishes the save still exits
    result.global_step, result.epoch, result.batch = global_step, epoch, batch_in_epoch
    result.seconds = time.perf_counter() - started
    say(f"done: {global_step - result.start_step} steps in {result.seconds:.1f}s (global step {global_step}); "
        f"{result.saves} sharded checkpoint(s) in {config.save_dir}")
    return result


def _finish_preemption(preemption: Preemption, manager: ShardedCheckpointManager, global_step: int, name: str,
                       say: Callable[[str], None]) -> None:
    """Wait until the preemption save is committed (by rank 0, once every process's part is durable), and say so.

    Unlike the single-file loop, the wait is not cut at ``--grace``: a process leaving early would fail the others'
    collectives. A SIGKILL past the grace period leaves the previous checkpoint directory intact (the commit is
    one rename).
    """
    manager.wait()
    head = f"stopped by {preemption.stopped_by} at global step {global_step}"
    if name:
        since = preemption.since if preemption.since is not None else time.monotonic()
        say(f"{head}: saved {name}, durable {time.monotonic() - since:.1f}s after the signal; continue with "
            "--resume auto")
    else:
        say(f"{head}: no new checkpoint (no step since the run started); continue with --resume auto")


def _resumed_settings(resume_path: Path, config: TrainConfig, given: Collection[str] | None,
                      say: Callable[[str], None]) -> tuple[dict[str, Any], TrainConfig]:
    """The saved progress record of ``resume_path`` and the run's config taken from it (typed flags compared)."""
    progress = read_progress(resume_path)
    try:
        config, notes = resumed_config(progress["config"], config, given)
    except ValueError as exc:
        raise ValueError(f"cannot resume from {resume_path} with different settings: {exc}. Leave those "
                         "flags out, or start a new run in another --save-dir") from None
    check_config(config)
    if notes:
        say("resuming with the checkpoint's settings, except " + ", ".join(notes))
    return progress, config


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler, batch: dict[str, Any], config: TrainConfig, world: World,
                device: torch.device) -> tuple[float, int]:
    """One optimizer step on every process; returns the step's loss summed over processes and its load errors."""
    model.train()
    # A process whose samples all failed to load still joins the sharded passes, with no weight.
    weight = 1.0 if batch["size"] > 0 else 0.0
    if batch["size"] == 0:
        batch = {**_blank_batch(config.image_size), "errors": batch["errors"]}
    images = batch["image"].to(device, non_blocking=True)
    targets = [batch[k].to(device, non_blocking=True) for k in ("region", "affinity", "mask")]
    with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
        prediction, _ = model(images)
    loss, _, _ = craft_loss(prediction.float(), *targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * weight).backward()
    step_optimizer(optimizer, scaler, scheduler)  # the schedule counts the steps the scaler did not skip
    sync_buffers(model, world)
    losses, errors = world.step_totals([loss.item() if weight else 0.0], int(batch["errors"]), device)
    return losses[0], errors


def _blank_batch(image_size: int) -> dict[str, Any]:
    half = image_size // 2
    return {"image": torch.zeros(1, 3, image_size, image_size), "region": torch.zeros(1, half, half),
            "affinity": torch.zeros(1, half, half), "mask": torch.zeros(1, half, half), "errors": 0, "size": 1}
