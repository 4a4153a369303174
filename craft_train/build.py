"""Set-up of a run: the save directory checked, then data, model, optimizer, schedule and scaler in one :func:`build`.

:class:`Run` holds what :func:`build` made; its :meth:`Run.state_dict` and :meth:`Run.load_state_dict` are the
training objects' part of a checkpoint (the loop's own part is :class:`craft_train.state.TrainState`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptio import scan

from .config import ConfigError, TrainConfig
from .data import IcdarDataset, MixedDataset, SyntheticTextDataset, split_indices
from .distributed import World
from .model import CRAFT, load_pretrained, load_pretrained_backbone
from .order import epoch_permutation
from .state import CHECKPOINT_KIND

__all__ = ["Run", "build", "check_save_dir", "checked_optimizer_state", "datasets", "device_kind", "epoch_order"]


def device_kind(config: TrainConfig) -> str:
    return "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"


def check_save_dir(config: TrainConfig) -> None:
    """Fail early, with the flag to change, when checkpoints could not be written or would mix with another run's.

    A fresh run (no ``resume``) into a directory that already holds checkpoints would put its files beside
    another run's, replace its ``best_model`` and make ``--resume auto`` pick whichever is newest: it stops
    unless ``reuse_save_dir`` says that is meant.
    """
    directory = Path(config.save_dir)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--save-dir {directory} is a file, not a directory; choose another --save-dir")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(f"--save-dir {directory}: checkpoints cannot be written there "
                          f"({exc.strerror or exc}); choose a writable --save-dir") from None
    if config.resume is None and not config.reuse_save_dir:
        existing = scan(directory)
        if existing:
            raise ConfigError(
                f"--save-dir {directory} already holds {len(existing)} checkpoint(s) of an earlier run (newest: "
                f"{existing[0].path.name}). To continue that run add --resume auto; to start a new run use another "
                "--save-dir; to start a new run beside those files anyway add --reuse-save-dir")


@dataclass(eq=False)
class Run:
    """Everything a run trains with, as :func:`build` set it up."""

    config: TrainConfig
    world: World
    device: torch.device
    use_amp: bool
    train_set: Any
    val_set: Any
    train_indices: list[int]
    val_indices: list[int]
    step_samples: int
    """Samples one optimizer step consumes, over all processes."""
    total_batches: int
    model: torch.nn.Module
    trained: torch.nn.Module
    """The module the step runs: ``model``, or its DistributedDataParallel wrapper."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sharded: bool
    """Whether each process keeps (and checkpoints) only its shard of the Adam state (``--zero``)."""

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The order in which epoch ``epoch`` visits the training samples (the same for any number of processes)."""
        return epoch_order(self.config, self.train_set, self.train_indices, epoch)

    def state_dict(self) -> dict[str, Any]:
        """The training objects' states (a sharded optimizer's go in each process's shard instead)."""
        return {
            "model_state_dict": self.model.state_dict(),
            **({} if self.sharded else {"optimizer_state_dict": self.optimizer.state_dict()}),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
        }

    def run_fields(self) -> dict[str, Any]:
        """What a checkpoint records of the run itself, which a resume checks before it loads anything."""
        return {"world_size": self.world.size, "sharded": self.sharded, "config": self.config.to_dict(),
                "kind": CHECKPOINT_KIND}

    def optimizer_shard(self) -> dict[str, Any]:
        """This process's part of a sharded (``--zero``) checkpoint."""
        return {"optimizer_shard": self.optimizer.optim.state_dict(), "rank": self.world.rank}  # type: ignore[attr-defined]

    def has_optimizer_state(self) -> bool:
        """Whether the optimizer has stepped and holds its per-parameter state (Adam's moments)."""
        inner = getattr(self.optimizer, "optim", self.optimizer)  # ZeroRedundancyOptimizer: this process's shard
        return bool(inner.state)

    def load_state_dict(self, state: dict[str, Any], path: Path, say: Callable[[str], None],
                        shard: Callable[[], dict[str, Any]]) -> None:
        """Load what :meth:`state_dict` wrote (``shard`` reads this process's optimizer shard), checked against
        this model; a misfit raises :class:`ConfigError` naming ``path``."""
        try:
            self.model.load_state_dict(state["model_state_dict"])
        except (RuntimeError, TypeError) as exc:  # missing, misshapen or no weights: a damaged or foreign file
            reason = " ".join(str(exc).split())[:300]
            raise ConfigError(f"{path}: its model weights do not fit CRAFT ({reason}); resume from another "
                              "checkpoint") from None
        if state.get("sharded") and not (self.sharded and state.get("world_size") == self.world.size):
            # --zero shards written at another process count (or resumed without --zero), made whole
            from .zero import whole_optimizer_state

            self.optimizer.load_state_dict(whole_optimizer_state(path, state["world_size"], self.model))
            checked_optimizer_state(getattr(self.optimizer, "optim", self.optimizer), path)
        elif self.sharded and state.get("sharded"):
            inner = self.optimizer.optim  # type: ignore[attr-defined]
            inner.load_state_dict(shard()["optimizer_shard"])
            checked_optimizer_state(inner, path)
        else:  # a whole Adam state: ZeroRedundancyOptimizer keeps its own process's part of it
            self.optimizer.load_state_dict(state["optimizer_state_dict"])
            checked_optimizer_state(getattr(self.optimizer, "optim", self.optimizer), path)
        self.scheduler.load_state_dict(state["scheduler_state_dict"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        _restore_scaler(self.scaler, state["scaler_state_dict"], say)


def _restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any], say: Callable[[str], None]) -> None:
    """Load the AMP scaler's state; a checkpoint written without AMP (on the CPU, or with ``--no-amp``) has
    none, and a run that uses AMP then starts its scaler fresh, as a new run would."""
    if scaler.is_enabled() and not saved:
        say("the checkpoint was written without AMP (on the CPU or with --no-amp): the AMP gradient scaler "
            "starts fresh (its first steps may be skipped while it finds its scale)")
        return
    scaler.load_state_dict(saved)  # a scaler without AMP ignores a saved state


def epoch_order(config: TrainConfig, train_set: Any, train_indices: list[int], epoch: int) -> torch.Tensor:
    """The dataset indices epoch ``epoch`` visits, in order (the same for any number of processes)."""
    order = epoch_permutation(config.seed, epoch, train_indices)
    return train_set.epoch_order(order, seed=config.seed, epoch=epoch) if config.mix_synthetic else order


def datasets(config: TrainConfig) -> tuple[Any, Any, list[int], list[int]]:
    """Training and validation sets and their indices. With weak supervision the training samples carry word
    crops that the training step labels with the model (craft_train.weak); the validation loss keeps the even
    split, which needs no model."""
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
    return train_set, val_set, train_indices, val_indices


def build(config: TrainConfig, world: World, *, say: Callable[[str], None] = print) -> Run:
    """Device, data, model, optimizer, schedule and AMP scaler for ``config`` in this process of ``world``."""
    kind = device_kind(config)
    device = torch.device(kind, world.local_rank) if kind == "cuda" else torch.device("cpu")
    use_amp = config.amp and device.type == "cuda"
    torch.manual_seed(config.seed)
    try:
        train_set, val_set, train_indices, val_indices = datasets(config)
    except ValueError as exc:  # a missing, empty or malformed data directory: the user's to fix
        raise ConfigError(str(exc)) from exc
    step_samples = config.batch_size * world.size  # one optimizer step consumes this many samples in all
    total_batches = math.ceil(len(epoch_order(config, train_set, train_indices, 1)) / step_samples)
    if total_batches == 0:
        raise ConfigError("no training images left after the validation split; lower --val-fraction")
    model = CRAFT().to(device)
    try:
        if config.pretrained:
            say(f"--pretrained {config.pretrained}: {load_pretrained(model, config.pretrained).source}")
        elif config.pretrained_backbone:
            load_pretrained_backbone(model, config.pretrained_backbone)
    except ValueError as exc:  # a missing, unreadable or foreign weights file
        raise ConfigError(str(exc)) from exc
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
    return Run(config=config, world=world, device=device, use_amp=use_amp, train_set=train_set, val_set=val_set,
               train_indices=train_indices, val_indices=val_indices, step_samples=step_samples,
               total_batches=total_batches, model=model, trained=trained, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler, sharded=sharded)


def checked_optimizer_state(optimizer: torch.optim.Optimizer, path: Path | str) -> None:
    """Check the optimizer state just loaded from ``path`` against the parameters it belongs to.

    A file's tensors are only what it declares: a per-parameter state (Adam's moments) that is missing, not a
    tensor, or of another shape than its parameter would fail inside the first step with a traceback, and one
    whose elements overlap in memory (a zero or odd stride, built with ``expand`` or ``as_strided``) would be
    updated in place wrongly. The first are refused with :class:`ConfigError` naming the file; the second is replaced
    by a dense copy of the same values.
    """
    required = {"exp_avg", "exp_avg_sq"} if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) else set()
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            slots = optimizer.state.get(param)
            if not slots:
                continue
            where = f"{path}: the optimizer state of parameter {param_index} (group {group_index})"
            missing = sorted(required - set(slots))
            if missing:
                raise ConfigError(f"{where} lacks {', '.join(missing)}: the file is damaged; resume from another "
                                 "checkpoint")
            for name, value in list(slots.items()):
                if name == "step":
                    if not (isinstance(value, int | float) or (isinstance(value, torch.Tensor) and value.numel() == 1)):
                        raise ConfigError(f"{where} has a step counter that is not a number: the file is damaged; "
                                         "resume from another checkpoint")
                    continue
                if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ConfigError(
                        f"{where}: {name!r} is {shape}, the model's parameter {tuple(param.shape)}: the file is "
                        "damaged or belongs to another model; resume from another checkpoint")
                if not value.is_contiguous():
                    slots[name] = value.contiguous()
