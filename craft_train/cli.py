"""``python -m craft_train``: train CRAFT with batch-level checkpoints (the guide's train script, done properly)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

import ckptio

from .config import TrainConfig
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
    p = argparse.ArgumentParser(prog="python -m craft_train", description=__doc__, allow_abbrev=False,
                                formatter_class=_HelpWithDefaults)
    defaults = TrainConfig()
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help="ICDAR2015-style directory; omit for the built-in synthetic dataset")
    data.add_argument("--synthetic-size", type=int, default=defaults.synthetic_size)
    data.add_argument("--synthetic-labels", choices=("char", "word"), default=defaults.synthetic_labels,
                      help="synthetic annotations: exact character boxes, or word boxes only (as real data)")
    data.add_argument("--weak-supervision", choices=("auto", "on", "off"), default=defaults.weak_supervision,
                      help="character boxes of word-level annotations proposed by the model being trained "
                           "(CRAFT paper 3.2) instead of an even split; auto: on for word-level data")
    data.add_argument("--mix-synthetic", type=int, default=defaults.mix_synthetic, metavar="N",
                      help="after every N training images of word-level data, one character-level synthetic image "
                           "(the CRAFT paper: 5); keeps weak supervision from drifting toward merged characters")
    data.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    data.add_argument("--image-size", type=int, default=defaults.image_size)
    data.add_argument("--no-augment", dest="augment", action="store_false")
    data.add_argument("--workers", type=int, default=defaults.workers)
    val = p.add_argument_group("validation")
    val.add_argument("--no-val-hmean", dest="val_hmean", action="store_false",
                     help="validation loss only: skip detecting words and scoring precision/recall/H-mean")
    val.add_argument("--best-metric", choices=("val_loss", "hmean"), default=defaults.best_metric,
                     help="what best_model tracks")
    val.add_argument("--text-threshold", type=float, default=defaults.text_threshold)
    val.add_argument("--link-threshold", type=float, default=defaults.link_threshold)
    val.add_argument("--low-text", type=float, default=defaults.low_text)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=defaults.epochs)
    opt.add_argument("--batch-size", type=int, default=defaults.batch_size)
    opt.add_argument("--lr", type=float, default=defaults.lr)
    opt.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    opt.add_argument("--lr-decay-steps", type=int, default=defaults.lr_decay_steps)
    opt.add_argument("--lr-gamma", type=float, default=defaults.lr_gamma)
    opt.add_argument("--max-steps", type=int)
    opt.add_argument("--seed", type=int, default=defaults.seed)
    opt.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults.device)
    opt.add_argument("--no-amp", dest="amp", action="store_false", help="full precision on CUDA")
    opt.add_argument("--deterministic", action="store_true",
                     help="deterministic CUDA kernels: a resumed run is bit-identical to an uninterrupted one")
    opt.add_argument("--zero", action="store_true",
                     help="under torchrun, shard the optimizer state across processes (each saves its shard)")
    opt.add_argument("--fsdp", action="store_true",  # FSDP2 hook (craft_train.fsdp)
                     help="under torchrun, shard model and optimizer with FSDP2; checkpoints are directories that "
                          "resume at any number of processes")
    opt.add_argument("--pretrained", help="CRAFT weights to fine-tune (e.g. craft_mlt_25k.pth)")
    opt.add_argument("--pretrained-backbone", help="torchvision-style VGG16-BN weights for the backbone")
    ck = p.add_argument_group("checkpoints")
    ck.add_argument("--save-dir", default=defaults.save_dir)
    ck.add_argument("--save-freq", type=int, default=defaults.save_freq,
                    help="batches between checkpoints; 0 writes no batch checkpoints at all, not even a final "
                         "one (best_model is still written after each validation that improves)")
    ck.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    ck.add_argument("--format", choices=("torch", "safetensors"), default=defaults.format)
    ck.add_argument("--compression", choices=("zstd",))
    ck.add_argument("--keep-count", type=int, help="keep only the newest N batch checkpoints")
    ck.add_argument("--keep-full", type=int,
                    help="keep the newest N batch checkpoints complete (resumable); slim older ones to the model "
                         "weights (about a third of the size)")
    ck.add_argument("--reuse-save-dir", action="store_true",
                    help="start a fresh run even though --save-dir holds another run's checkpoints")
    ck.add_argument("--disk-budget", help="cap on the checkpoints' total size, e.g. 2GB")
    ck.add_argument("--min-free", help="free space to keep on the volume, e.g. 5GB")
    ck.add_argument("--resume", help="checkpoint to resume from, or 'auto' for the newest valid one")
    ck.add_argument("--mirror", metavar="URL",
                    help="also copy each checkpoint, verified, to a directory or s3://bucket/prefix; "
                         "--resume auto looks there too")
    ck.add_argument("--mirror-keep", type=int, help="keep only the newest N batch checkpoints on the mirror")
    ck.add_argument("--grace", type=float, default=defaults.grace,
                    help="seconds after SIGTERM/SIGINT/SIGUSR1 to make the last checkpoint durable (and mirrored)")
    p.add_argument("--demo", action="store_true", help="a short CPU run on synthetic data (what `make demo` runs)")
    for action in p._actions:  # argparse prints no default for an option without a help text
        if action.help is None and action.nargs != 0 and action.default is not None:
            action.help = "(default: %(default)s)"
    return p


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
    if args.pop("demo"):
        args.update({k: v for k, v in DEMO.items() if k not in given})
        given |= set(DEMO)
    given.discard("demo")
    try:
        config = TrainConfig(**args)
        if config.resume is None and config.device != "cuda" and not torch.cuda.is_available():
            advice = cpu_advice(config)
            if advice:
                print(advice, flush=True)
        result = train(config, given=given)
    except (ValueError, FileNotFoundError, ckptio.CheckpointDirectoryLockedError) as exc:
        print(f"craft_train: error: {exc}", file=sys.stderr)
        return 2
    except ckptio.CheckpointWriteError as exc:
        print(f"craft_train: a checkpoint could not be written: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # during start-up, or a second Ctrl-C while queued saves were finishing
        print("craft_train: interrupted; checkpoints already written are intact (a save cut short leaves only a "
              "hidden temporary file, removed at the next start)", file=sys.stderr)
        return 130
    except OSError as exc:  # e.g. unreadable data, a disk error outside a checkpoint write
        print(f"craft_train: error: {exc}", file=sys.stderr)
        return 1
    if result.stopped_by is not None:
        return result.exit_code
    return 130 if result.interrupted else 0
