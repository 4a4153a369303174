"""The trainer's whole configuration: one keyword-only dataclass, validated up front."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math
import textwrap
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptio import parse_size

__all__ = [
    "RESUME_MUST_MATCH", "RUN_LOCAL", "ConfigError", "TrainConfig", "field_docs", "flag", "incompatible_changes",
    "resumed_config",
]


class ConfigError(ValueError):
    """A setting, file or directory the user gave cannot be used; the message names it and what to do.

    The CLI reports these in one line (exit 2); any other exception is a bug and keeps its traceback.
    """


def flag(*, name: str | None = None, help: str | None = None, metavar: str | None = None,
         group: str | None = None) -> dict[str, Any]:
    """A field's command-line flag, as ``field(metadata=flag(...))``; ``craft_train.cli`` builds its parser from it.

    ``name``: the flag (default ``--`` and the field's name with dashes; an on-by-default switch is ``--no-...``).
    ``help``: the flag's text where it is not the field's docstring (a ``--no-...`` switch says what it turns
    off; ``""``: only the default is shown). ``group``: the ``--help`` section that starts at this field (later
    fields stay in it).
    """
    return {"flag": {"name": name, "help": help, "metavar": metavar, "group": group}}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on. Stored in every checkpoint, so that a resume can check it."""

    # -- data --
    data_dir: str | None = field(default=None, metadata=flag(group="data"))
    """ICDAR2015-style directory (images + ``gt_<image>.txt``); ``None`` uses the built-in synthetic data."""
    synthetic_size: int = 1000
    """Number of synthetic images when no ``data_dir`` is given (and of the images ``mix_synthetic`` draws from)."""
    synthetic_labels: Literal["char", "word"] = "char"
    """The synthetic data's annotations: exact character boxes, or only word boxes and transcriptions (as real
    data), to measure weak supervision against the truth."""
    weak_supervision: Literal["auto", "on", "off"] = "auto"
    """Character boxes of word-level annotations proposed by the model being trained (CRAFT paper, sec. 3.2;
    ``craft_train.weak``) instead of an even split of the word box. ``auto``: on for word-level data
    (``data_dir``, ``synthetic_labels="word"``), off for character-level data."""
    mix_synthetic: int = field(default=0, metadata=flag(metavar="N"))
    """After every this many training images of word-level data, one image of the built-in character-level
    synthetic data (the CRAFT paper fine-tunes with SynthText at 1:5): its exact character boxes keep the region
    score separating characters, which weak supervision alone lets drift toward merged ones. Drawn from
    ``synthetic_size`` images (rendered after the run's own synthetic ones, when it has those); validation
    stays on the run's own data. 0 mixes nothing."""
    val_fraction: float = 0.1
    """Share of the images held out for validation (0 disables validation and best_model)."""
    image_size: int = field(default=512, metadata=flag(help=""))  # shown as the guide's users know it
    """Side of the square training crops, a multiple of 32."""
    augment: bool = field(default=True, metadata=flag(help="train without random scale, crop, rotation and colour "
                                                           "jitter"))
    """Random scale, crop, rotation and colour jitter for training images."""
    workers: int = 2
    """DataLoader worker processes (0 loads in the training process)."""

    # -- validation --
    val_hmean: bool = field(default=True, metadata=flag(
        group="validation", help="validation loss only: skip detecting words and scoring precision/recall/H-mean"))
    """Also detect words in the validation images at each epoch's end and report precision, recall and H-mean."""
    best_metric: Literal["val_loss", "hmean"] = "val_loss"
    """What ``best_model`` tracks: the lowest validation loss, or the highest validation H-mean."""
    text_threshold: float = 0.7
    """Post-processing thresholds for the validation H-mean (official CRAFT defaults)."""
    link_threshold: float = 0.4
    low_text: float = 0.4

    # -- optimisation --
    epochs: int = field(default=50, metadata=flag(group="optimisation"))
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 5e-4
    lr_decay_steps: int = 10000
    """Multiply the learning rate by ``lr_gamma`` every this many steps (as the official CRAFT training)."""
    lr_gamma: float = 0.8
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (across resumes); ``None`` runs all epochs."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = field(default=True, metadata=flag(help="full precision on CUDA"))
    """Mixed precision on CUDA (ignored on CPU)."""
    deterministic: bool = False
    """Deterministic cuDNN/cuBLAS/PyTorch kernels (``craft_train.determinism``), so that a CUDA run resumed from
    a checkpoint is bit-identical to an uninterrupted one (CPU runs are without it). A resume that drops or adds
    it warns and continues."""
    zero: bool = False
    """Under torchrun, shard the Adam state across processes (ZeroRedundancyOptimizer); each process writes
    its shard of every checkpoint."""
    fsdp: bool = False
    """Under torchrun, shard the model and the Adam state with FSDP2 (``craft_train.fsdp``); checkpoints are
    DCP directories that resume at any number of processes. Excludes ``zero``."""
    pretrained: str | None = None
    """Full CRAFT weights to fine-tune from (e.g. ``craft_mlt_25k.pth``)."""
    pretrained_backbone: str | None = None
    """torchvision-style VGG16-BN ImageNet weights for the backbone."""

    # -- checkpoints --
    save_dir: str = field(default="checkpoints_improved", metadata=flag(group="checkpoints"))
    save_freq: int = 100
    """Save ``checkpoint_epoch_{epoch}_batch_{batch}`` every this many batches, and once more at the end of the
    run. 0 writes no batch checkpoints at all, not even the final one (``best_model`` is still written after
    each validation that improves)."""
    async_save: bool = False
    """Write checkpoints in the background (a writer process, which leaves the GIL to training); training
    continues after the snapshot copy."""
    format: Literal["torch", "safetensors"] = "torch"
    compression: Literal["zstd"] | None = None
    keep_count: int | None = None
    """Keep only the newest N batch checkpoints (``best_model`` is never deleted); ``None`` keeps all."""
    keep_full: int | None = None
    """Keep the newest N batch checkpoints complete (resumable) and slim older ones to the model weights
    (``ckptio.slim``; about a third of the size with Adam); ``None`` keeps every checkpoint complete."""
    disk_budget: str | None = None
    """Cap on the checkpoints' total size, e.g. ``2GB``."""
    min_free: str | None = None
    """Free space to keep on the volume, e.g. ``5GB``."""
    resume: str | None = None
    """A checkpoint path, or ``auto`` for the newest checkpoint in ``save_dir`` that verifies."""
    mirror: str | None = field(default=None, metadata=flag(metavar="URL"))
    """Copy each committed checkpoint to a second place (a directory, ``file://...`` or ``s3://bucket/prefix``),
    verified end to end, in the background (``ckptio.mirror``); ``resume="auto"`` also looks there."""
    mirror_keep: int | None = None
    """Keep only the newest N batch checkpoints on the mirror (``best_model`` is kept); ``None`` keeps all."""
    grace: float = 25.0
    """Seconds after SIGTERM/SIGINT/SIGUSR1 within which the preemption checkpoint must be durable (and mirrored,
    with a mirror); past it the run exits at once."""
    reuse_save_dir: bool = False
    """Start a fresh run even though ``save_dir`` holds checkpoints (of another run); without it such a run
    stops before training and says how to continue instead."""

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % 32:
            raise ConfigError(f"--image-size must be a positive multiple of 32 (CRAFT halves it 5 times), "
                             f"got {self.image_size}")
        for name in ("epochs", "batch_size", "lr_decay_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.save_freq < 0:
            raise ConfigError(f"--save-freq must be 0 (off) or a number of batches, got {self.save_freq}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {self.max_steps}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if isinstance(self.mix_synthetic, bool) or not isinstance(self.mix_synthetic, int) or self.mix_synthetic < 0:
            raise ConfigError(f"--mix-synthetic must be 0 (off) or a number of training images per synthetic "
                             f"one (the CRAFT paper uses 5), got {self.mix_synthetic!r}")
        if self.mix_synthetic and self.data_dir is None and self.synthetic_labels == "char":
            raise ConfigError("--mix-synthetic mixes character-level synthetic images into word-level data; the "
                             "character-level synthetic data needs none: drop it, or train on --data-dir or "
                             "--synthetic-labels word")
        if (self.data_dir is None or self.mix_synthetic) and self.synthetic_size < 1:
            raise ConfigError(f"--synthetic-size must be at least 1, got {self.synthetic_size}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.synthetic_labels not in ("char", "word"):
            raise ConfigError(f"--synthetic-labels must be char or word, not {self.synthetic_labels!r}")
        if self.weak_supervision not in ("auto", "on", "off"):
            raise ConfigError(f"--weak-supervision must be auto, on or off, not {self.weak_supervision!r}")
        if self.best_metric not in ("val_loss", "hmean"):
            raise ConfigError(f"--best-metric must be val_loss or hmean, not {self.best_metric!r}")
        if self.best_metric == "hmean" and not self.val_hmean:
            raise ConfigError("--best-metric hmean needs the validation H-mean; drop --no-val-hmean")
        for name in ("text_threshold", "link_threshold", "low_text"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        for name in ("keep_count", "keep_full"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (the newest checkpoint is what a "
                                 f"resume needs), got {value}; leave it out to keep every checkpoint")
        if not (isinstance(self.grace, int | float) and math.isfinite(self.grace) and self.grace > 0):
            raise ConfigError(f"--grace must be a positive number of seconds, got {self.grace!r}")
        if self.mirror_keep is not None and (isinstance(self.mirror_keep, bool) or self.mirror_keep < 1):
            raise ConfigError(f"--mirror-keep must be at least 1, got {self.mirror_keep}; leave it out to keep all")
        if self.mirror_keep is not None and self.mirror is None:
            raise ConfigError("--mirror-keep needs --mirror URL")
        try:
            parse_size(self.disk_budget, what="--disk-budget")
            parse_size(self.min_free, what="--min-free")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def uses_weak_supervision(self) -> bool:
        """Whether word-level words get pseudo character boxes (``weak_supervision`` with ``auto`` resolved)."""
        if self.weak_supervision == "auto":
            return self.data_dir is not None or self.synthetic_labels == "word"
        return self.weak_supervision == "on"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body), read from the source; ``{}`` without it."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): flags keep their names and defaults
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


# Settings that decide what the weights and the data order are: changing them mid-run would make the resumed
# run a different experiment, so a resume refuses. Everything else (save frequency, max steps, epochs, workers,
# device, checkpoint options) can change freely.
RESUME_MUST_MATCH = (
    "data_dir", "synthetic_size", "val_fraction", "image_size", "augment", "batch_size", "lr", "weight_decay",
    "lr_decay_steps", "lr_gamma", "seed", "synthetic_labels", "weak_supervision", "mix_synthetic",
)


def incompatible_changes(saved: dict[str, Any], current: TrainConfig, *, every: bool = False) -> list[str]:
    """Human-readable differences in :data:`RESUME_MUST_MATCH` between a checkpoint's config and this run's.

    A setting that the checkpoint's config lacks (it was written before the setting existed) counts as its
    default, which is what that run did: resuming it with, say, ``--mix-synthetic 5`` is a change like any other.
    With ``every``, one entry per setting, ``""`` where it matches.
    """
    defaults = TrainConfig()
    changes = []
    for name in RESUME_MUST_MATCH:
        was = saved.get(name, getattr(defaults, name))
        if was != getattr(current, name):
            changes.append(f"{name}: checkpoint has {was!r}, this run has {getattr(current, name)!r}")
        elif every:
            changes.append("")
    return changes


# Settings of this invocation, not of the run: a resume never takes them from the checkpoint. (Where the files
# go, which device, and the weights a fresh run would start from, which a resume replaces with its own;
# ``deterministic`` is set up before the checkpoint is read, and a resume that changes it says so.)
RUN_LOCAL = ("resume", "save_dir", "reuse_save_dir", "device", "pretrained", "pretrained_backbone", "deterministic")


def resumed_config(saved: dict[str, Any], current: TrainConfig,
                   given: Collection[str] | None) -> tuple[TrainConfig, list[str]]:
    """The config a resume runs with: the checkpoint's, with the settings in ``given`` taken from ``current``.

    ``given`` names the settings the user gave explicitly (``None``: all of them, as a library caller passes a
    whole config). A given setting of :data:`RESUME_MUST_MATCH` that differs from the checkpoint's would make
    the resumed run another experiment: :class:`ConfigError` lists them all. Other given settings that differ (say
    ``max_steps``, ``epochs``, ``save_freq``) are taken; the returned notes say what changed.
    """
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    chosen = set(fields) if given is None else set(given) | set(RUN_LOCAL)
    defaults = TrainConfig()
    changes = [change for change, name in zip(incompatible_changes(saved, current, every=True), RESUME_MUST_MATCH,
                                              strict=True) if change and name in chosen]
    if changes:
        raise ConfigError("; ".join(changes))
    values, notes = {}, []
    for name in fields:
        was = saved.get(name, getattr(defaults, name))
        if name in chosen:
            values[name] = getattr(current, name)
            if name not in RUN_LOCAL and given is not None and was != values[name]:
                notes.append(f"--{name.replace('_', '-')} {values[name]} (the checkpoint had {was})")
        else:
            values[name] = was
    return TrainConfig(**values), notes
