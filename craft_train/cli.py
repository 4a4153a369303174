"""``python -m craft_train``: train CRAFT with batch-level checkpoints (the guide's train script, done properly)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
import typing
from collections.abc import Sequence
from typing import Any

import torch

import ckptio

from .config import ConfigError, TrainConfig, field_docs
from .train import train

__all__ = ["CPU_SIZED", "DEMO", "cpu_advice", "cpu_cost", "main", "next_step"]

# `make demo`: a CPU-friendly run of a few minutes on 2 cores, with several async saves and a best model.
DEMO = {
    "synthetic_size": 64, "image_size": 192, "batch_size": 4, "epochs": 3, "save_freq": 5, "async_save": True,
    "workers": 1, "val_fraction": 0.125, "keep_count": 5, "keep_full": 2, "save_dir": "checkpoints_demo",
}


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every option's default in ``--help`` (argparse's own formatter skips options without a help text), except
    where it would mislead: an on/off switch (``--no-amp`` is off by default, not "True") or no default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


# What a step costs on a CPU, from one measurement: --image-size 512 --batch-size 16 took 74 s a step and 15.4 GB
# on 2 cores. Time and the activations' memory grow with batch x pixels; about 1 GB is there at any size (the
# model, Adam, the interpreter: 2.0 GB measured at 256 px, batch 4).
_CPU_SECONDS_PER_STEP, _CPU_GB_PER_STEP, _BASE_GB, _MEASURED_AT = 74.0, 14.4, 1.0, 16 * 512 * 512
CPU_SIZED = "python -m craft_train --image-size 256 --batch-size 4 --synthetic-size 200 --epochs 5"
"""A first real run that a CPU finishes: 225 steps of about 5 s on 2 cores (about 20 minutes), 2 GB of memory."""


def cpu_cost(config: TrainConfig) -> tuple[float, float, int | None]:
    """Estimated seconds a step and GB of memory on 2 CPU cores, and the run's steps (None for --data-dir)."""
    share = config.batch_size * config.image_size ** 2 / _MEASURED_AT
    steps = None
    if config.data_dir is None:
        train_images = config.synthetic_size - int(config.synthetic_size * config.val_fraction)
        steps = -(-train_images // config.batch_size) * config.epochs
        if config.max_steps is not None:
            steps = min(steps, config.max_steps)
    return _CPU_SECONDS_PER_STEP * share, _BASE_GB + _CPU_GB_PER_STEP * share, steps


def cpu_advice(config: TrainConfig) -> str | None:
    """What this run costs without a GPU, and a CPU-sized command, when a step would take over 10 s; else None."""
    seconds, gigabytes, steps = cpu_cost(config)
    if seconds <= 10:
        return None
    total = f"; {steps} steps: about {seconds * steps / 3600:.0f} hours" if steps else ""
    return (f"no GPU here: at --image-size {config.image_size} --batch-size {config.batch_size} a step takes about "
            f"{seconds:.0f} s on 2 CPU cores and {gigabytes:.0f} GB of memory (estimated){total}. A CPU-sized "
            f"first run (about 5 s a step, 20 minutes, 2 GB): {CPU_SIZED}")


def next_step() -> str:
    """The training command ``make demo`` suggests next: full size with a GPU, CPU-sized without one."""
    import torch

    if torch.cuda.is_available():
        return "python -m craft_train --epochs 50 --batch_size 16    # a real run, into checkpoints_improved"
    return (f"{CPU_SIZED}    # no GPU here: a CPU-sized run, about 20 minutes on 2 cores;\n"
            "  # (--epochs 50 --batch_size 16 at 512 px, the size for a GPU, takes ~74 s a step and 15 GB on 2 cores)")


def _parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field, made from its type, default, docstring and ``flag`` metadata."""
    p = argparse.ArgumentParser(prog="python -m craft_train", description=__doc__, allow_abbrev=False,
                                formatter_class=_HelpWithDefaults)
    hints, docs = typing.get_type_hints(TrainConfig), field_docs(TrainConfig)
    group: Any = p
    for spec in dataclasses.fields(TrainConfig):
        meta = {"name": None, "help": None, "metavar": None, "group": None, **spec.metadata.get("flag", {})}
        if meta["group"]:
            group = p.add_argument_group(meta["group"])
        text = docs.get(spec.name, "") if meta["help"] is None else meta["help"]
        options: dict[str, Any] = {"dest": spec.name, "help": _help_text(text) or None}
        kind = _plain_type(hints[spec.name])
        if kind is bool:
            options["action"] = "store_false" if spec.default else "store_true"
            name = meta["name"] or f"--{'no-' if spec.default else ''}{spec.name.replace('_', '-')}"
        else:
            name = meta["name"] or f"--{spec.name.replace('_', '-')}"
            options["default"] = spec.default
            if isinstance(kind, tuple):
                options["choices"] = kind
            elif kind is not str:
                options["type"] = kind
            if meta["metavar"]:
                options["metavar"] = meta["metavar"]
        group.add_argument(name, **options)
    p.add_argument("--demo", action="store_true", help="a short CPU run on synthetic data (what `make demo` runs)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,  # absent unless given, as the
                   help="print the traceback of any error, not only of an unexpected one")  # config has no field
    for action in p._actions:  # argparse prints no default for an option without a help text
        if action.help is None and action.nargs != 0 and action.default is not None:
            action.help = "(default: %(default)s)"
    return p


def _plain_type(hint: Any) -> Any:
    """``int`` for ``int | None``, the values of a ``Literal`` as a tuple, else the type itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return tuple(args)
    if args:  # an Optional
        return _plain_type(args[0])
    return hint


def _help_text(doc: str) -> str:
    """A docstring as a flag's help: one paragraph, a field named as its flag, without reStructuredText's quotes."""
    for name in (spec.name for spec in dataclasses.fields(TrainConfig)):
        doc = doc.replace(f"``{name}``", f"--{name.replace('_', '-')}")
    return " ".join(doc.replace("``", "").split()).replace("%", "%%")


def _underscores_to_dashes(argv: Sequence[str]) -> list[str]:
    """The guide spells flags ``--batch_size``; accept both."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            flag, sep, value = arg.partition("=")
            arg = flag.replace("_", "-") + sep + value
        out.append(arg)
    return out


def _given(argv: list[str]) -> set[str]:
    """The settings named on the command line (a flag given with its default value counts as given)."""
    parser = _parser()
    for action in parser._actions:  # argparse leaves out what has the SUPPRESS default and was not given
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    typed = _underscores_to_dashes(sys.argv[1:] if argv is None else argv)
    args = vars(parser.parse_args(typed))
    given = _given(typed)
    debug = args.pop("debug", False)
    if args.pop("demo"):
        args.update({k: v for k, v in DEMO.items() if k not in given})
        given |= set(DEMO)
    given -= {"demo", "debug"}
    try:
        config = TrainConfig(**args)
        if config.resume is None and config.device != "cuda" and not torch.cuda.is_available():
            advice = cpu_advice(config)
            if advice:
                print(advice, flush=True)
        result = train(config, given=given)
    except (ConfigError, ckptio.CorruptCheckpointError, FileNotFoundError,
            ckptio.CheckpointDirectoryLockedError) as exc:  # the user's settings or files: say which, and the fix
        return _tell(f"craft_train: error: {exc}", 2, debug)
    except ckptio.CheckpointWriteError as exc:
        return _tell(f"craft_train: a checkpoint could not be written: {exc}", 1, debug)
    except KeyboardInterrupt:  # during start-up, or a second Ctrl-C while queued saves were finishing
        return _tell("craft_train: interrupted; checkpoints already written are intact (a save cut short leaves only "
                     "a hidden temporary file, removed at the next start)", 130, debug)
    except OSError as exc:  # e.g. unreadable data, a disk error outside a checkpoint write
        return _tell(f"craft_train: error: {exc}", 1, debug)
    # Anything else is a bug of ours: it keeps its traceback, which a report needs.
    if result.stopped_by is not None:
        return result.exit_code
    return 130 if result.interrupted else 0


def _tell(message: str, code: int, debug: bool) -> int:
    """One line for an error the user can act on; with ``--debug`` its traceback first."""
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    return code
