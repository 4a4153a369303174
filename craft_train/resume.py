"""What makes a resume exact: the data order, the RNG states, and finding the checkpoint to resume from.

The data order of epoch ``e`` is a pure function of ``(seed, e)`` and each sample's augmentation a pure
function of ``(seed, e, index)``, so a resumed run feeds the model exactly the batches an uninterrupted run
would, with any number of DataLoader workers. The permutation is also stored in the checkpoint, so that a
resume does not depend on this module never changing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckptio

__all__ = [
    "augmentation_seed",
    "capture_rng",
    "checked_optimizer_state",
    "epoch_permutation",
    "find_resume_checkpoint",
    "mix_in",
    "restore_rng",
]


def epoch_permutation(seed: int, epoch: int, indices: Sequence[int]) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``indices`` (an int64 tensor of dataset indices)."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(indices))
    return torch.as_tensor(np.asarray(indices, dtype=np.int64)[order])


def mix_in(order: torch.Tensor, *, seed: int, epoch: int, every: int, first: int, count: int) -> torch.Tensor:
    """``order`` with one of the indices ``first .. first + count - 1`` after each ``every`` of its own.

    The indices put in follow a permutation of that range drawn from ``(seed, epoch)`` (cycled when an epoch
    needs more of them than there are), so a mixed epoch is as reproducible as an unmixed one.
    """
    if every < 1 or count < 1:
        raise ValueError(f"need every >= 1 and count >= 1, got {every=}, {count=}")
    groups = math.ceil(len(order) / every)
    picks = np.resize(np.random.default_rng([seed, epoch, 0x313C]).permutation(count), groups) + first
    out = np.empty(len(order) + groups, dtype=np.int64)
    mixed_at = np.arange(groups) * (every + 1) + every  # after each full group ...
    if groups:
        mixed_at[-1] = len(out) - 1  # ... and after the last, maybe shorter, one
    own = np.ones(len(out), dtype=bool)
    own[mixed_at] = False
    out[own] = order.numpy()
    out[mixed_at] = picks
    return torch.from_numpy(out)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, 0xA06]).generate_state(1, dtype=np.uint32)[0])


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


def find_resume_checkpoint(save_dir: str | Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint in ``save_dir`` (by training progress) whose digest verifies.

    A newer checkpoint that is corrupt or incomplete is reported and skipped in favour of the previous one. The
    writer of an earlier run that was killed commits the saves it was given first (ckptio waits for it): a save
    that had returned is never passed over by an immediate restart. ``None`` (a fresh run, said so) only when the
    directory is missing or holds no checkpoint at all: when it holds checkpoints and none can be resumed,
    ``ValueError`` names each and why, and nothing is touched (a fresh run there would overwrite files the user
    may still want to rescue).
    """
    directory = Path(save_dir)
    if not directory.is_dir():
        say(f"--resume auto: {directory} does not exist; starting a fresh run")
        return None
    ckptio.wait_until_released(directory)
    entries = ckptio.scan(directory, ())
    if not entries:
        say(f"--resume auto: {directory} holds no checkpoint; starting a fresh run")
        return None
    refused = []

    def skip(skipped: ckptio.Skipped) -> None:
        reason = ("it holds the model weights only (--keep-full)" if skipped.status == "slim"
                  else f"{skipped.status} ({skipped.reason})")
        refused.append(f"{skipped.path.name}: {reason}")
        say(f"--resume auto: skipping {skipped.path.name}: {reason}; trying the previous one")

    found = ckptio.latest(directory, order="progress", periodic_only=False, sealed_only=True, full_only=True,
                          entries=entries, on_skip=skip)
    if found is not None:
        return found
    raise ValueError(
        f"--resume auto: none of the {len(refused)} checkpoint(s) in {directory} can be resumed: "
        + "; ".join(refused) + ". Nothing was changed. Resume from a copy kept elsewhere with --resume FILE, "
        "start from a checkpoint's weights with --pretrained FILE, or start a new run in another --save-dir")


def checked_optimizer_state(optimizer: torch.optim.Optimizer, path: Path | str) -> None:
    """Check the optimizer state just loaded from ``path`` against the parameters it belongs to.

    A file's tensors are only what it declares: a per-parameter state (Adam's moments) that is missing, not a
    tensor, or of another shape than its parameter would fail inside the first step with a traceback, and one
    whose elements overlap in memory (a zero or odd stride, built with ``expand`` or ``as_strided``) would be
    updated in place wrongly. The first are refused with ``ValueError`` naming the file; the second is replaced
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
                raise ValueError(f"{where} lacks {', '.join(missing)}: the file is damaged; resume from another "
                                 "checkpoint")
            for name, value in list(slots.items()):
                if name == "step":
                    if not (isinstance(value, int | float) or (isinstance(value, torch.Tensor) and value.numel() == 1)):
                        raise ValueError(f"{where} has a step counter that is not a number: the file is damaged; "
                                         "resume from another checkpoint")
                    continue
                if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(
                        f"{where}: {name!r} is {shape}, the model's parameter {tuple(param.shape)}: the file is "
                        "damaged or belongs to another model; resume from another checkpoint")
                if not value.is_contiguous():
                    slots[name] = value.contiguous()
