"""What makes a resume exact: the data order, the RNG states, finding the checkpoint to resume from, and
restoring a run from it (:func:`resume_path`, :func:`load_checkpoint`, :func:`restore`).

The data order of epoch ``e`` is a pure function of ``(seed, e)`` and each sample's augmentation a pure
function of ``(seed, e, index)``, so a resumed run feeds the model exactly the batches an uninterrupted run
would, with any number of DataLoader workers. The permutation is also stored in the checkpoint, so that a
resume does not depend on this module never changing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import ckptio

from .config import ConfigError, TrainConfig, resumed_config
from .determinism import resume_note
from .distributed import World

if TYPE_CHECKING:
    from .build import Run
    from .state import TrainState

__all__ = [
    "augmentation_seed",
    "capture_rng",
    "checked_optimizer_state",
    "epoch_permutation",
    "find_resume_checkpoint",
    "load_checkpoint",
    "mix_in",
    "restore",
    "restore_rng",
    "resume_path",
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
    :class:`ConfigError` names each and why, and nothing is touched (a fresh run there would overwrite files the user
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
    raise ConfigError(
        f"--resume auto: none of the {len(refused)} checkpoint(s) in {directory} can be resumed: "
        + "; ".join(refused) + ". Nothing was changed. Resume from a copy kept elsewhere with --resume FILE, "
        "start from a checkpoint's weights with --pretrained FILE, or start a new run in another --save-dir")


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


def resume_path(config: TrainConfig, say: Callable[[str], None]) -> Path | None:
    """The checkpoint ``config.resume`` names (``auto``: the newest that verifies, here or on the mirror)."""
    if config.resume is None:
        return None
    if config.resume == "auto":
        local = find_resume_checkpoint(config.save_dir, say)
        if config.mirror is None:
            return local
        from ckptio.mirror import newer_from_mirror, open_target

        try:
            target = open_target(config.mirror)
        except ValueError as exc:  # not a directory or a URL it can use
            raise ConfigError(str(exc)) from exc
        return newer_from_mirror(local, target, Path(config.save_dir), say)
    path = Path(config.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file (or use --resume auto)")
    return path


def load_checkpoint(path: Path, config: TrainConfig, world: World, given: Collection[str] | None,
                    say: Callable[[str], None]) -> tuple[dict[str, Any], TrainConfig]:
    """The checkpoint's state and the config the resumed run has (see :func:`craft_train.train.train`'s
    ``given``), once the file is known to be a complete trainer checkpoint that this run can continue."""
    from .state import CHECKPOINT_KIND

    seal, _ = ckptio.read_meta(path)
    if seal is not None and ckptio.is_slim(seal.meta):
        raise ConfigError(
            f"{path} holds the model weights only (slimmed by --keep-full), not the optimizer and data order a "
            "resume needs; resume from one of the newest checkpoints (kept complete), or start a new run from "
            "these weights with --pretrained")
    state = ckptio.load(path, map_location="cpu")
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(
            f"{path} is not a craft_train checkpoint (it lacks the training state); to start from its weights "
            "use --pretrained instead of --resume"
        )
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} lacks the training config a resume needs: the file is damaged; resume from "
                          "another checkpoint")
    try:
        config, notes = resumed_config(saved, config, given)
    except ValueError as exc:
        raise ConfigError(f"cannot resume from {path} with different settings: {exc}. Leave those flags out (a "
                          "resume takes its settings from the checkpoint), or start a new run in another "
                          "--save-dir") from None
    if notes:
        say("resuming with the checkpoint's settings, except " + ", ".join(notes))
    step = state.get("global_step")
    if config.max_steps is not None and type(step) is int and step >= config.max_steps:
        say(f"the run already reached --max-steps {config.max_steps} (global step {step}): nothing to train; give a "
            "larger --max-steps to go on")
    if state.get("sharded") and type(state.get("world_size")) is not int:
        raise ConfigError(f"{path} holds an optimizer sharded with --zero but not over how many processes: the file "
                          "is damaged; resume from another checkpoint")
    return state, config


def restore(run: Run, state: TrainState, checkpoint: dict[str, Any], path: Path,
            say: Callable[[str], None]) -> None:
    """Put ``run``'s objects and the loop's ``state`` where ``checkpoint`` (read from ``path``) left them."""
    world = run.world
    run.load_state_dict(checkpoint, path, say, lambda: ckptio.load_shard(path, world.rank))
    state.load_state_dict(checkpoint)
    say(f"resumed from {path}: epoch {state.epoch}, batch {state.batch}/{checkpoint['total_batches']}, "
        f"global step {state.global_step}")
    note = resume_note(checkpoint["config"], run.config.deterministic)
    if note:
        say(note)
    if state.saved_world_size != world.size:
        assert state.resumed_permutation is not None
        say(f"the checkpoint was written by {state.saved_world_size} process(es), this run has {world.size}: a step "
            f"now takes {run.step_samples} samples instead of {run.config.batch_size * state.saved_world_size}; the "
            f"epoch continues at sample {state.position} of {len(state.resumed_permutation)}, so no sample is "
            "skipped or repeated")
