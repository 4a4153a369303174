"""Validation at each epoch's end: the held-out images' loss and, with ``val_hmean``, the words detected in them.

Also how an unreadable sample is named (the first few of a run) rather than only counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from .config import TrainConfig
from .data import IcdarDataset, MixedDataset, SyntheticTextDataset, collate
from .evaluate import evaluate_model
from .loss import craft_loss
from .postprocess import Thresholds

__all__ = ["NAMED_BAD_SAMPLES", "describe", "name_bad_samples", "validate", "validate_all"]

NAMED_BAD_SAMPLES = 5
"""Unreadable samples named (path and reason) in a run; later ones are only counted (``errors=``)."""


def _silent(_: str) -> None:
    pass


def name_bad_samples(dataset: IcdarDataset | SyntheticTextDataset | MixedDataset, indices: list[int],
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


def validate(model: torch.nn.Module, dataset: Any, indices: list[int], config: TrainConfig,
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
                name_bad_samples(dataset, indices[number * config.batch_size : (number + 1) * config.batch_size],
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


def validate_all(model: torch.nn.Module, dataset: Any, indices: list[int], config: TrainConfig,
                  device: torch.device, use_amp: bool, say: Callable[[str], None] = _silent) -> dict[str, float]:
    """Validation loss and, with ``val_hmean``, the precision/recall/H-mean of the words the model detects."""
    scores = {"val_loss": validate(model, dataset, indices, config, device, use_amp, say)}
    if config.val_hmean:
        thresholds = Thresholds(config.text_threshold, config.link_threshold, config.low_text)
        found = evaluate_model(model, dataset, indices, device, image_size=config.image_size, thresholds=thresholds,
                               use_amp=use_amp)
        scores.update(val_precision=found["precision"], val_recall=found["recall"], val_hmean=found["hmean"])
    return scores


def describe(scores: dict[str, float]) -> str:
    text = f"val_loss={scores['val_loss']:.4f}"
    if "val_hmean" in scores:
        text += (f" val_hmean={scores['val_hmean']:.3f} (precision={scores['val_precision']:.3f} "
                 f"recall={scores['val_recall']:.3f})")
    return text
