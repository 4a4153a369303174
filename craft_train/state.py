"""Where a run stands: the loop's counters, written into every checkpoint and read back from it in one class.

:class:`TrainState` is the part of a checkpoint that the loop itself keeps (epoch, batch, step, data position,
loss sums, best scores, RNG states); the model's, optimizer's, scheduler's and scaler's own states come from
:meth:`craft_train.build.Run.state_dict`. :meth:`TrainState.state_dict` and :meth:`TrainState.load_state_dict`
are the one place that names the checkpoint's fields.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_KIND", "VALIDATION_FIELDS", "TrainResult", "TrainState", "capture_rng", "restore_rng"]

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


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and every CUDA device's RNG state, as tensors and scalars only."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        for i, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)
