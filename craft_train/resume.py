"""What makes a resume exact: the data order, the RNG states, finding the checkpoint to resume from, and
restoring a run from it (:func:`resume_path`, :func:`load_checkpoint`, :func:`restore`).

The data order of epoch ``e`` is a pure function of ``(seed, e)`` and each sample's augmentation a pure
function of ``(seed, e, index)``, so a resumed run feeds the model exactly the batches an uninterrupted run
would, with any number of DataLoader workers. The permutation is also stored in the checkpoint, so that a
resume does not depend on this module never changing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ckptio

from .config import ConfigError, TrainConfig, resumed_config
from .determinism import resume_note
from .distributed import World

if TYPE_CHECKING:
    from .build import Run
    from .state import TrainState

__all__ = [
    "find_resume_checkpoint",
    "load_checkpoint",
    "restore",
    "resume_path",
]


def find_resume_checkpoint(save_dir: str | Path, say: Callable[[str], None], *,
                           otherwise: str = "starting a fresh run") -> Path | None:
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
        say(f"--resume auto: {directory} does not exist; {otherwise}")
        return None
    ckptio.wait_until_released(directory)
    entries = ckptio.scan(directory, ())
    if not entries:
        say(f"--resume auto: {directory} holds no checkpoint; {otherwise}")
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


def resume_path(config: TrainConfig, say: Callable[[str], None]) -> Path | None:
    """The checkpoint ``config.resume`` names (``auto``: the newest that verifies, here or on the mirror)."""
    if config.resume is None:
        return None
    if config.resume == "auto":
        if config.mirror is None:
            return find_resume_checkpoint(config.save_dir, say)
        local = find_resume_checkpoint(config.save_dir, say, otherwise=f"looking on the mirror {config.mirror}")
        from ckptio.mirror import newer_from_mirror, open_target

        try:
            target = open_target(config.mirror)
        except ValueError as exc:  # not a directory or a URL it can use
            raise ConfigError(str(exc)) from exc
        found = newer_from_mirror(local, target, Path(config.save_dir), say)
        if found is None:
            say(f"--resume auto: no checkpoint on the mirror {config.mirror} either; starting a fresh run")
        return found
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
