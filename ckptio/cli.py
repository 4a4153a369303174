"""``python -m ckptio list|info|load|clean|verify``: the checkpoint manager's command line.

A thin layer over the library: argparse in front, one library call per command, errors mapped to exit codes
(0 fine, 1 something is corrupt or not loadable, or ``verify`` found no checkpoint; 2 usage error or missing
path). The listing keeps the layout and labels of ``manage_batch_checkpoints.py`` from the CRAFT
batch-checkpoint guide, which its users know. Sizes labelled MB are 10^6 bytes.

Nothing a file or directory holds may produce a traceback: every value read from a file is checked before it
is formatted, and printing a loaded state walks it with a visited set and a node budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from .cli_commands import (
    DEFAULT_DIR,
    EXIT_BAD,
    EXIT_OK,
    EXIT_USAGE,
    PATH_ERRNOS,
    UsageError,
    cmd_clean,
    cmd_info,
    cmd_list,
    cmd_load,
    cmd_verify,
)
from .cli_output import SHORT, Printable
from .errors import CorruptCheckpointError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; what it prints passes through :class:`Printable` (names and metadata come from files)."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Printable(sys.stdout), Printable(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(_guide_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        from .mirror_cli import remote_command

        return int((remote_command(args) or args.run)(args))  # type: ignore[operator]
    except UsageError as exc:
        _trace(args)
        print(f"ckptio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except CorruptCheckpointError as exc:
        _trace(args)
        print(f"ckptio: {exc}", file=sys.stderr)
        return EXIT_BAD
    except (ValueError, FileNotFoundError, IsADirectoryError) as exc:
        _trace(args)
        print(f"ckptio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        _trace(args)
        print(f"ckptio: {'error: ' if exc.errno in PATH_ERRNOS else ''}{exc}", file=sys.stderr)
        return EXIT_USAGE if exc.errno in PATH_ERRNOS else EXIT_BAD
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug of ours: the traceback is what a report needs, then one plain line
        traceback.print_exc()
        print(f"ckptio: unexpected error, please report it with the traceback above: {type(exc).__name__}: "
              f"{SHORT.repr(str(exc))}", file=sys.stderr)
        return EXIT_BAD


def _guide_spelling(argv: list[str]) -> list[str]:
    """Accept ``manage_batch_checkpoints.py``'s ``--action list --save_dir D`` form and underscore flags."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            flag, sep, value = arg.partition("=")
            flag = flag.replace("_", "-")
            if flag == "--action" and sep:
                out += [flag, value]
                continue
            arg = flag + sep + value
        out.append(arg)
    if "--action" in out:
        at = out.index("--action")
        if at + 1 < len(out):
            out = [out[at + 1], *out[:at], *out[at + 2 :]]
    return out


def _trace(args: argparse.Namespace) -> None:
    """With ``--debug``, the traceback of an error that is otherwise told in one line."""
    if getattr(args, "debug", False):
        traceback.print_exc()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ckptio", description="Inspect and manage checkpoint files.",
                                     allow_abbrev=False)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of any error, not only of an unexpected one (before the command)")
    sub = parser.add_subparsers(dest="command")

    def directory_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("directory", nargs="?", help=f"checkpoint directory, or a mirror's URL (s3://bucket/prefix, "
                       f"file:///path) for list (default: {DEFAULT_DIR})")
        p.add_argument("--save-dir", dest="save_dir", help="the same, as the guide spells it")

    def file_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", nargs="?", help="checkpoint file (a path, a name inside --save-dir, or for info a "
                       "mirror's URL/NAME)")
        p.add_argument("--checkpoint", help="the same, as the guide spells it")
        p.add_argument("--save-dir", dest="save_dir", help=f"where to look up bare names (default: {DEFAULT_DIR})")

    p = sub.add_parser("list", allow_abbrev=False, help="list checkpoints with size, time and integrity state")
    directory_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("info", allow_abbrev=False, help="show a checkpoint's metadata without loading its tensors")
    file_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("load", allow_abbrev=False, help="load a checkpoint fully (digest checked) and summarize it")
    file_arg(p)
    p.set_defaults(run=cmd_load)

    p = sub.add_parser("clean", allow_abbrev=False, help="delete all but the newest N batch checkpoints")
    directory_arg(p)
    p.add_argument("--keep-count", dest="keep_count", type=int, help="batch checkpoints to keep (required)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="only show what would be deleted")
    p.set_defaults(run=cmd_clean)

    p = sub.add_parser("verify", allow_abbrev=False,
                       help="re-read checkpoints and check their digests (exit 1 if any is corrupt)")
    p.add_argument("path", nargs="?", help=f"a checkpoint file or directory, or a mirror's URL or URL/NAME (its "
                   f"copies are downloaded and checked) (default: {DEFAULT_DIR})")
    p.add_argument("--save-dir", dest="save_dir", help="the same, as the guide spells it")
    p.add_argument("--checkpoint", help="one file inside --save-dir (its suffix may be left out)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=cmd_verify)

    from .mirror_cli import cmd_pull

    p = sub.add_parser("pull", help="download a checkpoint from a mirror (s3://..., file://...) and verify it")
    p.add_argument("url", help="the mirror's URL and the checkpoint's file name, e.g. s3://bucket/run1/best_model.pth")
    p.add_argument("directory", help="where to put it")
    p.set_defaults(run=cmd_pull)
    return parser


