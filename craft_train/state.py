"""Where a run stands: the loop's counters, written into every checkpoint and read back from it in one class.

:class:`TrainState` is the part of a checkpoint that the loop itself keeps (epoch, batch, step, data position,
loss sums, best scores, RNG states); the model's, optimizer's, scheduler's and scaler's own states come from
:meth:`craft_train.build.Run.state_dict`. :meth:`TrainState.state_dict` and :meth:`TrainState.load_state_dict`
are the one place that names the checkpoint's fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .resume import capture_rng, restore_rng

__all__ = ["CHECKPOINT_KIND", "VALIDATION_FIELDS", "TrainState"]

CHECKPOINT_KIND = "craft_train"
"""The ``kind`` field of a trainer checkpoint: a resume refuses any other file."""
VALIDATION_FIELDS = ("val_loss", "val_precision", "val_recall", "val_hmean")


def _no_losses() -> dict[str, float]:
    return {"train": 0.0, "cls": 0.0, "geo": 0.0, "batches": 0}


@dataclass
class TrainState:
    """The loop's position and running figures; everything of it a resume needs is in :meth:`state_dict`."""

    total_batches: int = 0
    """Optimizer steps in a whole epoch of this run (recorded in checkpoints, for the resume message)."""
    epoch: int = 1
    batch: int = 0
    """Batches done in this epoch."""
    global_step: int = 0
    position: int = 0
    """Samples of this epoch's order consumed (by every process together)."""
    permutation: torch.Tensor | None = None
    """This epoch's order of sample indices."""
    resumed_permutation: torch.Tensor | None = field(default=None, repr=False)
    """The checkpoint's order for the epoch it stopped in, used instead of recomputing it (then cleared)."""
    loss_sums: dict[str, float] = field(default_factory=_no_losses)
    errors: int = 0
    """Unreadable samples skipped so far, over all processes."""
    best_val_loss: float = math.inf
    best_hmean: float = -1.0
    """Highest validation H-mean so far; -1 before the first one."""
    last_validation: dict[str, float] = field(default_factory=dict)
    validated: bool = False
    """Whether this epoch's validation has run (a best_model checkpoint is written after it)."""
    saved_world_size: int = 1
    """The number of processes that wrote the checkpoint this run resumed from."""

    def start_epoch(self, epoch_order: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """This epoch's order: the resumed one, or ``epoch_order(epoch)``; a new epoch starts its sums at 0."""
        if self.batch == 0:
            self.loss_sums, self.position = _no_losses(), 0
        if self.resumed_permutation is not None:
            self.permutation, self.resumed_permutation = self.resumed_permutation, None
        else:
            self.permutation = epoch_order(self.epoch)
        return self.permutation

    def add_losses(self, losses: list[float]) -> None:
        self.loss_sums["train"] += losses[0]
        self.loss_sums["cls"] += losses[1]
        self.loss_sums["geo"] += losses[2]
        self.loss_sums["batches"] += 1

    @property
    def mean_train_loss(self) -> float:
        return self.loss_sums["train"] / max(self.loss_sums["batches"], 1)

    def record_validation(self, scores: dict[str, float], best_metric: str) -> bool:
        """Take this epoch's validation scores; whether they beat the best so far (by ``best_metric``)."""
        self.last_validation = scores
        val_loss, val_hmean = scores["val_loss"], scores.get("val_hmean")
        if best_metric == "hmean":
            improved = val_hmean is not None and val_hmean > self.best_hmean
        else:
            improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        if val_hmean is not None:
            self.best_hmean = max(self.best_hmean, val_hmean)
        self.validated = True
        return improved

    def state_dict(self, parts: dict[str, Any], run_fields: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint: these fields, with the training objects' ``parts`` and the run's ``run_fields``
        (world size, sharding, config, kind) in the order ``ckptio info`` shows them."""
        batches = max(self.loss_sums["batches"], 1)
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "total_batches": self.total_batches,
            "global_step": self.global_step,
            **parts,
            "train_loss": self.loss_sums["train"] / batches,
            "cls_loss": self.loss_sums["cls"] / batches,
            "geo_loss": self.loss_sums["geo"] / batches,
            "loss_sums": dict(self.loss_sums),
            "errors": self.errors,
            "best_val_loss": self.best_val_loss,
            "best_hmean": self.best_hmean,
            # The latest validation (None before the first), top-level so that `ckptio list/info` shows it.
            **{k: self.last_validation.get(k) for k in VALIDATION_FIELDS},
            "rng_state": capture_rng(),
            "data_order": {"epoch": self.epoch, "permutation": self.permutation, "position": self.position},
            "epoch_validated": self.validated,
            **run_fields,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the fields :meth:`state_dict` wrote (and restore the RNG states they hold)."""
        restore_rng(state["rng_state"])
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.loss_sums = dict(state["loss_sums"])
        self.errors = state["errors"]
        self.best_val_loss = state["best_val_loss"]
        self.best_hmean = state.get("best_hmean", -1.0)  # checkpoints written before the H-mean lack it
        self.last_validation = {k: state[k] for k in VALIDATION_FIELDS if state.get(k) is not None}
        self.resumed_permutation = state["data_order"]["permutation"]
        self.position = state["data_order"]["position"]
        self.validated = bool(state.get("epoch_validated", False))
        self.saved_world_size = state.get("world_size", 1)
