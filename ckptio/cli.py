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
import errno
import json
import math
import os
import reprlib
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import cli_dcp
from .atomic import is_temporary
from .errors import CorruptCheckpointError
from .fileio import load, read_meta
from .naming import (
    CheckpointEntry,
    delete_checkpoint,
    integrity_state,
    parse_checkpoint_name,
    read_index,
    remove_orphan,
    scan,
    split_suffix,
    stale_orphan_shards,
)
from .newest import latest
from .retention import periodic_newest_first, plan_retention
from .slim import is_slim
from .suffixes import format_of
from .verify import record_in_index, verify

__all__ = ["main"]

DEFAULT_DIR = "checkpoints_improved"
EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2
_STATE_LABELS = {"verified": "✅ verified", "unverified": "⚪ unverified", "corrupt": "❌ corrupt"}
_VERIFY_MARKS = {"verified": "✅", "unsealed": "⚪", "corrupt": "❌", "removed": "➖"}
# Errors about the path the user typed, not about a file's contents: usage errors (exit 2).
_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.ENOENT}
# Printing a loaded state visits at most this many objects (a small pickle of shared references can describe
# an exponentially large tree).
_DESCRIBE_BUDGET = 100_000
_NOT_FINITE = ("inf", "-inf", "nan")
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120


class UsageError(Exception):
    """A wrong path or argument: reported without a traceback, exit status 2."""


# Characters a file name or a value read from a file may carry that would act on the user's terminal instead of
# showing (cursor moves, screen clears, window titles: ESC and other C0/C1 controls; bidi overrides that reorder
# a name on screen): printed as visible escapes. Newlines and tabs pass (our own output is made of lines).
_CONTROLS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
             for c in (*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
             if c not in (0x09, 0x0A)}


_LINE_BREAKS = str.maketrans({"\n": "\\n", "\t": "\\t"})


def _one_line(name: str) -> str:
    """Text from a file or a file name, for one line of output: a newline or tab in it is shown escaped, so that
    it cannot forge a line (say, a checkpoint that looks verified) in what ``list``, ``clean``, ``verify`` or
    ``info`` print."""
    return name.translate(_LINE_BREAKS)


class _Printable:
    """A text stream that writes terminal control characters as visible escapes (see ``_CONTROLS``)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text.translate(_CONTROLS))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; what it prints passes through :class:`_Printable` (names and metadata come from files)."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Printable(sys.stdout), _Printable(sys.stderr)
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
        print(f"ckptio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except CorruptCheckpointError as exc:
        print(f"ckptio: {exc}", file=sys.stderr)
        return EXIT_BAD
    except (ValueError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"ckptio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"ckptio: {'error: ' if exc.errno in _PATH_ERRNOS else ''}{exc}", file=sys.stderr)
        return EXIT_USAGE if exc.errno in _PATH_ERRNOS else EXIT_BAD
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug of ours: still no traceback for the user, but say it plainly
        print(f"ckptio: unexpected error, please report it: {type(exc).__name__}: {_SHORT.repr(str(exc))}",
              file=sys.stderr)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ckptio", description="Inspect and manage checkpoint files.",
                                     allow_abbrev=False)
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
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("info", allow_abbrev=False, help="show a checkpoint's metadata without loading its tensors")
    file_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("load", allow_abbrev=False, help="load a checkpoint fully (digest checked) and summarize it")
    file_arg(p)
    p.set_defaults(run=_cmd_load)

    p = sub.add_parser("clean", allow_abbrev=False, help="delete all but the newest N batch checkpoints")
    directory_arg(p)
    p.add_argument("--keep-count", dest="keep_count", type=int, help="batch checkpoints to keep (required)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="only show what would be deleted")
    p.set_defaults(run=_cmd_clean)

    p = sub.add_parser("verify", allow_abbrev=False,
                       help="re-read checkpoints and check their digests (exit 1 if any is corrupt)")
    p.add_argument("path", nargs="?", help=f"a checkpoint file or directory, or a mirror's URL or URL/NAME (its "
                   f"copies are downloaded and checked) (default: {DEFAULT_DIR})")
    p.add_argument("--save-dir", dest="save_dir", help="the same, as the guide spells it")
    p.add_argument("--checkpoint", help="one file inside --save-dir (its suffix may be left out)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_cmd_verify)

    from .mirror_cli import cmd_pull

    p = sub.add_parser("pull", help="download a checkpoint from a mirror (s3://..., file://...) and verify it")
    p.add_argument("url", help="the mirror's URL and the checkpoint's file name, e.g. s3://bucket/run1/best_model.pth")
    p.add_argument("directory", help="where to put it")
    p.set_defaults(run=cmd_pull)
    return parser


# -- path resolution ----------------------------------------------------------------------------------------


def _lstat(path: Path) -> os.stat_result | None:
    """``lstat``, or ``None`` for a path that does not exist; a path the system cannot even look up is a usage
    error (too long, a file used as a directory, a symlink loop)."""
    try:
        return path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in _PATH_ERRNOS:
            raise UsageError(f"{_SHORT.repr(str(path))}: {exc.strerror}") from None
        raise


def _is_dir(path: Path) -> bool:
    info = _lstat(path)
    if info is not None and stat.S_ISLNK(info.st_mode):
        try:
            info = path.stat()
        except OSError:
            return False
    return info is not None and stat.S_ISDIR(info.st_mode)


def _directory(args: argparse.Namespace) -> Path:
    directory = Path(args.directory or args.save_dir or DEFAULT_DIR)
    if _lstat(directory) is None:
        raise UsageError(f"{directory}: no such directory (pass the checkpoint directory, e.g. --save-dir DIR)")
    if not _is_dir(directory):
        raise UsageError(f"{directory} is a file; pass the directory that holds the checkpoints")
    return directory


def _file(args: argparse.Namespace) -> Path:
    given = args.file or args.checkpoint
    if not given:
        raise UsageError("name a checkpoint file, e.g. `info checkpoints_improved/best_model.pth`")
    return _resolve_file(given, Path(args.save_dir or DEFAULT_DIR))


def _resolve_file(given: str, base: Path) -> Path:
    """``given`` as a path, or inside ``base``, or a bare name there without its suffix."""
    candidates = [Path(given)]
    if not Path(given).is_absolute():
        candidates.append(base / given)
    for candidate in candidates:
        # Anything but a directory is returned, FIFOs and devices included: reading it says what it is.
        if _lstat(candidate) is not None and not _is_dir(candidate):
            return candidate
    if _is_dir(base):  # a bare name without its suffix: checkpoint_epoch_1_batch_100
        for entry in scan(base, ()):
            if entry.name == given:
                return entry.path
    if _is_dir(Path(given)):
        raise UsageError(f"{given} is a directory; name a checkpoint file inside it")
    raise UsageError(f"{given}: no such checkpoint file (looked in . and {base})")


# -- commands -----------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    directory = _directory(args)
    entries = scan(directory)
    index = read_index(directory)
    odd = _unreadable_entries(directory)
    best = [e for e in entries if e.protected]
    batches = [e for e in entries if not e.protected and parse_checkpoint_name(e.name)]
    others = [e for e in entries if not e.protected and not parse_checkpoint_name(e.name)]
    batch_bytes = sum(e.total_size for e in batches)
    total = sum(e.total_size for e in entries)
    dcp_lines, dcp_records = cli_dcp.list_lines(directory, index, _mb, _one_line) if cli_dcp.has_dcp(directory) \
        else ([], [])
    if args.json:
        print(json.dumps({"directory": str(directory), "checkpoints": [_entry_json(e, index) for e in entries],
                          "dcp_checkpoints": dcp_records,
                          "count": len(entries), "total_bytes": total, "batch_count": len(batches),
                          "batch_bytes": batch_bytes,
                          "unreadable": [{"file": name, "reason": why} for name, why in odd]}, indent=2))
        return EXIT_OK
    print(f"🔍 扫描目录: {directory}\n")
    print("📋 检查点文件列表:\n")
    if best:
        print("🏆 最佳模型:")
        for entry in best:
            print(_entry_line(entry, index))
        print()
    print(f"🔄 批次检查点 ({len(batches)}个):")
    for entry in batches:
        print(_entry_line(entry, index))
    if others:
        print(f"\n📦 其他检查点 ({len(others)}个):")
        for entry in others:
            print(_entry_line(entry, index))
    if dcp_lines:
        print(f"\n🧩 DCP 检查点目录 ({len(dcp_lines)}个, 分片, 可在任意进程数加载):")
        print("\n".join(dcp_lines))
    if odd:
        print(f"\n⚠️ 无法读取 ({len(odd)}个, 不计入统计):")
        for name, why in odd:
            print(f"  {_one_line(name)} - unreadable: {why}")
    states = [integrity_state(e, index) for e in entries]
    print("\n📊 统计信息:")
    print(f"  批次检查点总数: {len(batches)}")
    print(f"  总大小: {_mb(batch_bytes)} (批次检查点)")
    print(f"  全部检查点: {len(entries)}个, {_mb(total)} (含 best_model 与其他检查点)")
    print(f"  完整性: {states.count('verified')} verified, {states.count('unverified')} unverified, "
          f"{states.count('corrupt')} corrupt")
    print("  (1 MB = 10^6 bytes)")
    return EXIT_OK


def _unreadable_entries(directory: Path) -> list[tuple[str, str]]:
    """Entries named like checkpoints that are not regular files (scan skips them): shown, never read."""
    odd = []
    with os.scandir(directory) as it:
        for item in it:
            if item.name.startswith(".") or is_temporary(item.name) or split_suffix(item.name) is None:
                continue
            try:
                mode = item.stat(follow_symlinks=False).st_mode
            except OSError:
                continue  # removed since the listing
            if not stat.S_ISREG(mode):
                odd.append((item.name, _kind(mode)))
    return sorted(odd)


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link (checkpoints must be regular files)"),
             (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _entry_line(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.mtime_ns / 1e9))
    state = _STATE_LABELS[integrity_state(entry, index)]
    shards = " (with shards)" if entry.shard_bytes else ""
    shards += " (slim: weights only)" if _recorded_slim(entry, index) else ""
    summary = _recorded_summary(entry, index)
    scores = "".join(f" - {key}={summary[key]:.4f}" for key in ("val_loss", "val_hmean")
                     if isinstance(summary.get(key), float) and math.isfinite(summary[key]))
    return f"  {_one_line(entry.path.name)} - {_mb(entry.total_size)}{shards} - {stamp} - {state}{scores}"


def _recorded_summary(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary the index recorded for this exact file (``read_index`` has checked its shape), else ``{}``."""
    if integrity_state(entry, index) == "unverified":
        return {}
    return index[entry.path.name].get("meta", {}).get("summary", {})


def _recorded_slim(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> bool:
    """Whether the index's record of this exact file marks it slimmed to its model weights (``ckptio.slim``)."""
    return integrity_state(entry, index) != "unverified" and is_slim(index[entry.path.name].get("meta"))


def _entry_json(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "file": entry.path.name, "name": entry.name, "size": entry.total_size, "mtime": entry.mtime_ns / 1e9,
        "best": entry.protected, "integrity": integrity_state(entry, index),
        "summary": _recorded_summary(entry, index), "slim": _recorded_slim(entry, index),
    }


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}MB"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int | None:
    return value if type(value) is int else None


def _shown(key: str, value: Any) -> str:
    """A summary value as a user reads it, on one line: the trainer's "nothing yet" placeholders say so."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value in _NOT_FINITE:
        return "none yet"  # a summary stores a non-finite float as its repr: the trainer's inf is "no loss yet"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 and (
            key.endswith(("hmean", "precision", "recall"))):
        return "none yet"  # an H-mean lies in [0, 1]: the trainer's -1.0 means "not measured yet"
    return _SHORT.repr(value) if not isinstance(value, (int, float, str)) else _one_line(str(value)[:200])


def _cmd_info(args: argparse.Namespace) -> int:
    given = args.file or args.checkpoint
    for candidate in ([Path(given), Path(args.save_dir or DEFAULT_DIR) / given] if given else []):
        if cli_dcp.is_dcp_directory(candidate):
            return _dcp_info(candidate, as_json=args.json)
    path = _file(args)
    seal, size = read_meta(path)
    info = path.stat()
    # The meta is whatever the file says: every field is checked before it is formatted.
    meta = seal.meta if seal else {}
    summary = _dict(meta.get("summary")) if seal else _unsealed_summary(path)
    index = read_index(path.parent)
    entry = CheckpointEntry(path, path.name, "", info.st_size, info.st_mtime_ns, False)
    doc = {
        "file": str(path),
        "size": size,
        "modified": info.st_mtime,
        "format": meta.get("format", format_of(path)[0]),
        "compression": meta.get("compression", format_of(path)[1]),
        "digest": f"xxh3_128:{seal.digest}" if seal else None,
        "integrity": integrity_state(entry, index) if seal else "unsealed (no digest recorded)",
        "resume_point": {k: summary.get(k) for k in ("epoch", "batch", "global_step") if k in summary},
        "summary": summary,
        "tensors": _count(meta.get("tensors")),
        "elements": _count(meta.get("elements")),
        "parameters": _count(meta.get("model_elements")),
        "tensor_bytes": _count(meta.get("tensor_bytes")),
        "raw_size": _count(meta.get("raw_size")),
        "created": meta.get("created"),
        "metadata": _dict(meta.get("user")),
    }
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    print(f"📄 {_one_line(str(path))}")
    modified = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.st_mtime))
    print(f"  size: {_mb(size)} ({size} bytes), modified {modified}")
    print(f"  format: {_SHORT.repr(doc['format'])[1:-1] if isinstance(doc['format'], str) else '?'}, "
          f"compression: {doc['compression'] if isinstance(doc['compression'], str) else 'none'}")
    print(f"  digest: {_one_line(str(doc['digest'] or 'none (not written by ckptio)'))} [{doc['integrity']}]")
    if doc["resume_point"]:
        print("  resume point: " + ", ".join(f"{k}={_shown(k, v)}" for k, v in doc["resume_point"].items()))
    first = ("epoch", "batch", "total_batches", "train_loss", "cls_loss", "geo_loss")
    for key in first:
        if key in summary:
            print(f"  {key}: {_shown(key, summary[key])}")
    for key, value in summary.items():
        if key not in (*first, "global_step"):
            print(f"  {_one_line(str(key))}: {_shown(key, value)}")
    for key, value in doc["metadata"].items():
        print(f"  {_one_line(str(key))}: {_shown(key, value)}")
    if seal:
        counts = [f"tensors: {_number(doc['tensors'])}", f"elements: {_number(doc['elements'])}"]
        if doc["parameters"] is not None:
            counts.append(f"model parameters: {doc['parameters']:,}")
        print("  " + ", ".join(counts))
    return EXIT_OK


def _dcp_info(path: Path, *, as_json: bool) -> int:
    doc = cli_dcp.info(path)
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    print(f"🧩 {_one_line(str(path))}/ - {doc['kind']}")
    print(f"  size: {_mb(doc['size'] or 0)}, {len(doc['data_files'])} data file(s), "
          f"compression: {doc['compression'] or 'none'}")
    print(f"  entries: {doc['entries']:,} ({doc['tensors']:,} tensors, {doc['elements']:,} elements), "
          f"stored items: {doc['stored_items']:,}")
    print(f"  digests: {'xxh3_128 per item (ckptio verify checks them)' if doc['sealed'] else 'none (plain DCP)'}")
    return EXIT_OK


def _unsealed_summary(path: Path) -> dict[str, Any]:
    """The top-level numbers (epoch, batch, losses) of a file ckptio did not write, such as the guide script's
    ``torch.save`` checkpoints: they have no metadata to read, so the file is loaded (weights only, as ``load``)."""
    try:
        state = load(path, map_location="cpu", verify=False)
    except (ValueError, OSError, RecursionError):
        return {}  # info shows what it can; `load` and `verify` say what is wrong with the file
    if not isinstance(state, dict):
        return {}
    return {key: value for key, value in state.items()
            if isinstance(key, str) and type(value) in (int, float, bool, str) and len(str(value)) <= 200}


def _number(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def _cmd_load(args: argparse.Namespace) -> int:
    path = _file(args)
    started = time.perf_counter()
    try:
        sealed = read_meta(path)[0] is not None
        state = load(path, map_location="cpu")
    except RecursionError:
        raise CorruptCheckpointError(path, "its objects are nested too deeply to load") from None
    seconds = time.perf_counter() - started
    checked = "digest checked" if sealed else "no digest to check: not written by ckptio"
    print(f"✅ loaded {path} in {seconds:.2f}s ({checked})")
    if isinstance(state, dict):
        budget = [_DESCRIBE_BUDGET]
        for key, value in state.items():
            shown = _SHORT.repr(key) if not isinstance(key, str) else _one_line(key[:200])
            print(f"  {shown}: {_one_line(_describe(value, budget))}")
            if budget[0] <= 0:
                print(f"  ... (stopped describing after {_DESCRIBE_BUDGET:,} objects)")
                break
    else:
        print(f"  {_describe(state, [_DESCRIBE_BUDGET])}")
    return EXIT_OK


def _describe(value: Any, budget: list[int]) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, dict):
        tensors, elements, complete = _count_tensors(value, budget)
        counted = f", {tensors} tensors, {elements:,} elements" if tensors else ""
        return (f"{type(value).__name__} with {len(value)} entries{counted}"
                + ("" if complete else " (too many objects to count them all)"))
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"{type(value).__name__} of {len(value)}"
    return _SHORT.repr(value)


def _count_tensors(value: Any, budget: list[int]) -> tuple[int, int, bool]:
    """Distinct tensors and their elements under ``value``: iterative, each object visited once, at most
    ``budget[0]`` objects in all (shared references and deep nesting cost nothing extra)."""
    import torch

    seen: set[int] = set()
    stack = [value]
    tensors = elements = 0
    while stack:
        if budget[0] <= 0:
            return tensors, elements, False
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        budget[0] -= 1
        if isinstance(item, torch.Tensor):
            tensors += 1
            elements += item.numel()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return tensors, elements, True


def _cmd_clean(args: argparse.Namespace) -> int:
    directory = _directory(args)
    if args.keep_count is None:
        raise UsageError("clean needs --keep-count N: how many of the newest batch checkpoints to keep "
                         "(e.g. `clean --save_dir DIR --keep_count 5`; add --dry-run to preview)")
    if args.keep_count < 0:
        raise UsageError("--keep-count must be 0 or more")
    # Only batch checkpoints are counted and deleted; best_model and other names are the user's to manage.
    listing = scan(directory)
    if cli_dcp.has_dcp(directory):  # DCP checkpoint directories follow the same rule as files
        listing += cli_dcp.dcp_entries(directory)
    entries = periodic_newest_first(listing)  # in written order: an mtime may lie (a clock stepped back)
    newest_valid = latest(directory, entries=entries)  # what a resume needs is never deleted
    victims = plan_retention(entries, keep_count=args.keep_count, must_keep=newest_valid).delete
    verb = "would delete" if args.dry_run else "deleted"
    freed = 0
    forgotten: dict[str, dict[str, Any] | None] = {}
    for entry in victims:
        if not args.dry_run and entry.suffix == "/":
            cli_dcp.delete(entry)
        elif not args.dry_run:
            delete_checkpoint(entry.path)  # a training run's own retention may have got there first: fine
            forgotten[entry.path.name] = None
        freed += entry.total_size
        print(f"  {verb}: {_one_line(entry.path.name)} - {_mb(entry.total_size)}")
    if forgotten:
        record_in_index(directory, forgotten)  # gives up after 2 s if another process holds the index lock
    for orphan in stale_orphan_shards(directory):
        if not args.dry_run:
            remove_orphan(orphan)
        print(f"  {verb}: {_one_line(orphan.path.name)} (shards of a save never committed) - {_mb(orphan.size)}")
    for staging in cli_dcp.sweep(directory, dry_run=args.dry_run) if cli_dcp.has_dcp(directory) else []:
        print(f"  {verb}: {_one_line(staging.name)} (a DCP save that never committed)")
    kept = len(entries) - len(victims)
    if not entries:
        print(f"no batch checkpoints in {directory}")
    print(f"🧹 {verb} {len(victims)} checkpoint(s), {_mb(freed)}; kept {kept}"
          + (f" (newest valid: {_one_line(newest_valid.name)})" if newest_valid else ""))
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    base = Path(args.save_dir or DEFAULT_DIR)
    target = Path(args.checkpoint or args.path or args.save_dir or DEFAULT_DIR)
    if _lstat(target) is None and (args.checkpoint or args.path):
        try:  # a name inside --save-dir, with or without its suffix, as info and load take it
            target = _resolve_file(str(target), base)
        except UsageError:
            raise UsageError(f"{target}: no such file or directory (looked in . and {base})") from None
    if _lstat(target) is None:
        raise UsageError(f"{target}: no such file or directory")
    if cli_dcp.is_dcp_directory(target):
        return _verify_dcp(target, as_json=args.json)
    if not _is_dir(target):
        try:
            read_meta(target)
        except ValueError as exc:
            if not isinstance(exc, CorruptCheckpointError):
                raise UsageError(str(exc)) from None
        except OSError:
            pass  # verify reports it for the file
    report = verify(target)
    dcp_ok, dcp_lines, dcp_records = cli_dcp.verify_lines(target) if _is_dir(target) and cli_dcp.has_dcp(target) \
        else (True, [], [])
    found = bool(report.files) or bool(dcp_records)
    if args.json:
        print(json.dumps({"path": str(target), "ok": report.ok and dcp_ok and found, "found": len(report.files),
                          "files": [{"file": str(c.path), "status": c.status, "reason": c.reason, "digest": c.digest,
                                     "size": c.size} for c in report.files],
                          "dcp_directories": dcp_records}, indent=2))
    elif not found:
        print(f"no checkpoint found in {target} (files named NAME.pth or NAME.safetensors, optionally + .zst)")
    else:
        for check in report.files:
            print(f"{_VERIFY_MARKS[check.status]} {_one_line(check.path.name)}: {check.status} - "
                  f"{_one_line(check.reason)}")  # a reason may quote a shard name from the file
        bad = report.corrupt
        removed = sum(check.status == "removed" for check in report.files)
        for line in dcp_lines:
            print(_one_line(line))
        print(f"{len(report.files)} file(s) checked, {len(bad)} corrupt"
              + (f", {removed} removed while checking" if removed else "")
              + (f"; {len(dcp_records)} DCP director(ies), {sum(r['status'] == 'corrupt' for r in dcp_records)} "
                 "corrupt" if dcp_records else ""))
    return EXIT_OK if report.ok and dcp_ok and found else EXIT_BAD


def _verify_dcp(target: Path, *, as_json: bool) -> int:
    ok, lines, records = cli_dcp.verify_lines(target)
    if as_json:
        print(json.dumps({"path": str(target), "ok": ok, "dcp_directories": records}, indent=2))
    else:
        for line in lines:
            print(_one_line(line))
    return EXIT_OK if ok else EXIT_BAD
