"""The one reader of model weights, for ``--pretrained``, ``--pretrained-backbone`` and ``craft_train.detect``.

Whatever file a CRAFT user has is taken: a checkpoint written by this trainer (complete or slimmed), one written
by the guide's ``train_with_your_data_improved.py`` (its ``model_state_dict``), a bare state dict, or the
official ``craft_mlt_25k.pth`` (``module.``-prefixed keys, torch's legacy pre-zip format). Every file is read
through :func:`ckptio.load`: weights-only unpickling, the zip layout checked before torch trusts a size in it,
and the digest checked when ckptio sealed the file. What was found is described in words, for the user.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import ckptio

__all__ = ["Weights", "read_weights"]

_MAX_LISTED = 5


@dataclass(frozen=True)
class Weights:
    """A file's model weights, what kind of file held them, and the training config stored beside them."""

    state_dict: dict[str, torch.Tensor]
    """Parameter and buffer names (any ``module.`` prefix removed) to tensors."""
    source: str
    """What the file was, in words: e.g. ``a craft_train checkpoint (epoch 2, batch 40), digest checked``."""
    config: dict[str, Any] = field(default_factory=dict)
    """The training config the checkpoint recorded (``{}`` for a bare state dict)."""


def read_weights(path: str | Path) -> Weights:
    """The model weights in ``path``; ``ValueError`` naming the file and what is wrong with it otherwise."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"weights file {str(path)!r} does not exist or is not a file")
    except OSError:
        raise ValueError(f"weights file {str(path)!r} does not exist or is not a file") from None
    try:
        seal, _ = ckptio.read_meta(path)
        obj: Any = ckptio.load(path, map_location="cpu")
    except ckptio.CorruptCheckpointError as exc:
        raise ValueError(f"cannot read weights file {str(path)!r}: {exc.reason}") from None
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot read weights file {str(path)!r}: {exc}") from None
    notes = []
    if ckptio.is_legacy_torch(path):
        notes.append("PyTorch's legacy format")
    notes.append("digest checked" if seal is not None else "no ckptio digest to check")
    if seal is not None and ckptio.is_slim(seal.meta):
        notes.insert(0, "slimmed to its weights")

    if isinstance(obj, Mapping) and isinstance(obj.get("model_state_dict"), Mapping):
        kind = "a craft_train checkpoint" if obj.get("kind") == "craft_train" else "a training checkpoint"
        where = ", ".join(f"{k} {obj[k]}" for k in ("epoch", "batch") if type(obj.get(k)) is int)
        source = f"{kind}'s model_state_dict" + (f" ({where})" if where else "")
        config = obj.get("config")
        state = _tensors(obj["model_state_dict"], path, "its model_state_dict")
        return Weights(_strip_module(state)[0], f"{source}, " + ", ".join(notes),
                       dict(config) if isinstance(config, Mapping) else {})
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights file {str(path)!r} holds a {type(obj).__name__}, expected a state dict or a "
                         "checkpoint with a model_state_dict")
    state, prefixed = _strip_module(_tensors(obj, path, "it"))
    source = ("a state dict with module.-prefixed keys (as the official craft_mlt_25k.pth)" if prefixed
              else "a bare state dict")
    return Weights(state, f"{source}, " + ", ".join(notes))


def _tensors(obj: Mapping[Any, Any], path: Path, what: str) -> dict[str, torch.Tensor]:
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        shown = ", ".join(bad[:_MAX_LISTED]) + (f", ... ({len(bad)} in total)" if len(bad) > _MAX_LISTED else "")
        raise ValueError(
            f"weights file {str(path)!r}: {what} is neither a state dict of tensors nor a checkpoint with a "
            f"model_state_dict (non-tensor entries: {shown}); save model.state_dict() or a checkpoint with "
            "'model_state_dict'")
    return dict(obj)


def _strip_module(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    # DataParallel checkpoints (the official release among them) prefix every key.
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}, True
    return state, False


