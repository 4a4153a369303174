"""``python -m ckptio list|info|load|clean|verify``: the checkpoint manager's command line.

A thin layer over the library: argparse in front, one library call per command, errors mapped to exit codes
(0 fine, 1 something is corrupt or not loadable, 2 usage error or missing path). The listing keeps the layout
and labels of ``manage_batch_checkpoints.py`` from the CRAFT batch-checkpoint guide, which its users know.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpointError
from .fileio import load, read_meta, verify_file
from .layout import (
    CheckpointEntry,
    delete_checkpoint,
    integrity_state,
    parse_checkpoint_name,
    read_index,
    remove_stale_orphan_shards,
    scan,
    update_index,
)
from .retention import beyond_newest
from .verify import verify

__all__ = ["main"]

DEFAULT_DIR = "checkpoints_improved"
EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2
_STATE_LABELS = {"verified": "✅ verified", "unverified": "⚪ unverified", "corrupt": "❌ corrupt"}


class UsageError(Exception):
    """A wrong path or argument: reported without a traceback, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_guide_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
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
        print(f"ckptio: {exc}", file=sys.stderr)
        return EXIT_BAD
    except KeyboardInterrupt:
        return 130


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
    parser = argparse.ArgumentParser(prog="python -m ckptio", description="Inspect and manage checkpoint files.")
    sub = parser.add_subparsers(dest="command")

    def directory_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("directory", nargs="?", help=f"checkpoint directory (default: {DEFAULT_DIR})")
        p.add_argument("--save-dir", dest="save_dir", help="the same, as the guide spells it")

    def file_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", nargs="?", help="checkpoint file (a path, or a name inside --save-dir)")
        p.add_argument("--checkpoint", help="the same, as the guide spells it")
        p.add_argument("--save-dir", dest="save_dir", help=f"where to look up bare names (default: {DEFAULT_DIR})")

    p = sub.add_parser("list", help="list checkpoints with size, time and integrity state")
    directory_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("info", help="show a checkpoint's metadata without loading its tensors")
    file_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("load", help="load a checkpoint fully (digest checked) and summarize it")
    file_arg(p)
    p.set_defaults(run=_cmd_load)

    p = sub.add_parser("clean", help="delete all but the newest N batch checkpoints")
    directory_arg(p)
    p.add_argument("--keep-count", dest="keep_count", type=int, required=True, help="batch checkpoints to keep")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="only show what would be deleted")
    p.set_defaults(run=_cmd_clean)

    p = sub.add_parser("verify", help="re-read checkpoints and check their digests (exit 1 if any is corrupt)")
    p.add_argument("path", nargs="?", help=f"a checkpoint file or directory (default: {DEFAULT_DIR})")
    p.add_argument("--save-dir", dest="save_dir", help="the same, as the guide spells it")
    p.add_argument("--checkpoint", help="one file inside --save-dir")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=_cmd_verify)
    return parser


# -- path resolution ----------------------------------------------------------------------------------------


def _directory(args: argparse.Namespace) -> Path:
    directory = Path(args.directory or args.save_dir or DEFAULT_DIR)
    if not directory.exists():
        raise UsageError(f"{directory}: no such directory (pass the checkpoint directory, e.g. --save-dir DIR)")
    if not directory.is_dir():
        raise UsageError(f"{directory} is a file; pass the directory that holds the checkpoints")
    return directory


def _file(args: argparse.Namespace) -> Path:
    given = args.file or args.checkpoint
    if not given:
        raise UsageError("name a checkpoint file, e.g. `info checkpoints_improved/best_model.pth`")
    candidates = [Path(given)]
    base = Path(args.save_dir or DEFAULT_DIR)
    if not Path(given).is_absolute():
        candidates.append(base / given)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if base.is_dir():  # a bare name without its suffix: checkpoint_epoch_1_batch_100
        for entry in scan(base, ()):
            if entry.name == given:
                return entry.path
    if Path(given).is_dir():
        raise UsageError(f"{given} is a directory; name a checkpoint file inside it")
    raise UsageError(f"{given}: no such checkpoint file (looked in . and {base})")


# -- commands -----------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    directory = _directory(args)
    entries = scan(directory)
    index = read_index(directory)
    rows = [_entry_json(e, index) for e in entries]
    if args.json:
        total = sum(e.total_size for e in entries)
        print(json.dumps({"directory": str(directory), "checkpoints": rows, "count": len(rows),
                          "total_bytes": total}, indent=2))
        return EXIT_OK
    best = [e for e in entries if e.protected]
    batches = [e for e in entries if not e.protected and parse_checkpoint_name(e.name)]
    others = [e for e in entries if not e.protected and not parse_checkpoint_name(e.name)]
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
    states = [integrity_state(e, index) for e in entries]
    print("\n📊 统计信息:")
    print(f"  批次检查点总数: {len(batches)}")
    print(f"  总大小: {_mb(sum(e.total_size for e in entries))}")
    print(f"  完整性: {states.count('verified')} verified, {states.count('unverified')} unverified, "
          f"{states.count('corrupt')} corrupt")
    return EXIT_OK


def _entry_line(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.mtime_ns / 1e9))
    state = _STATE_LABELS[integrity_state(entry, index)]
    shards = " (with shards)" if entry.shard_bytes else ""
    summary = ((index.get(entry.path.name) or {}).get("meta") or {}).get("summary") or {}
    scores = "".join(f" - {key}={summary[key]:.4f}" for key in ("val_loss", "val_hmean")
                     if isinstance(summary.get(key), float))
    return f"  {entry.path.name} - {_mb(entry.total_size)}{shards} - {stamp} - {state}{scores}"


def _entry_json(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> dict[str, Any]:
    record = index.get(entry.path.name) or {}
    return {
        "file": entry.path.name, "name": entry.name, "size": entry.total_size, "mtime": entry.mtime_ns / 1e9,
        "best": entry.protected, "integrity": integrity_state(entry, index),
        "summary": (record.get("meta") or {}).get("summary", {}) if integrity_state(entry, index) != "unverified"
        else {},
    }


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f}MB"


def _cmd_info(args: argparse.Namespace) -> int:
    path = _file(args)
    seal, size = read_meta(path)
    info = path.stat()
    meta = seal.meta if seal else {}
    summary = meta.get("summary", {})
    index = read_index(path.parent)
    entry = CheckpointEntry(path, path.name, "", info.st_size, info.st_mtime_ns, False)
    doc = {
        "file": str(path),
        "size": size,
        "modified": info.st_mtime,
        "format": meta.get("format", "torch" if ".pth" in path.name else "safetensors"),
        "compression": meta.get("compression", "zstd" if path.name.endswith(".zst") else None),
        "digest": f"xxh3_128:{seal.digest}" if seal else None,
        "integrity": integrity_state(entry, index) if seal else "unsealed (no digest recorded)",
        "resume_point": {k: summary.get(k) for k in ("epoch", "batch", "global_step") if k in summary},
        "summary": summary,
        "tensors": meta.get("tensors"),
        "elements": meta.get("elements"),
        "parameters": meta.get("model_elements"),
        "tensor_bytes": meta.get("tensor_bytes"),
        "raw_size": meta.get("raw_size"),
        "created": meta.get("created"),
        "metadata": meta.get("user", {}),
    }
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    print(f"📄 {path}")
    modified = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.st_mtime))
    print(f"  size: {_mb(size)} ({size} bytes), modified {modified}")
    print(f"  format: {doc['format']}, compression: {doc['compression'] or 'none'}")
    print(f"  digest: {doc['digest'] or 'none (not written by ckptio)'} [{doc['integrity']}]")
    if doc["resume_point"]:
        print("  resume point: " + ", ".join(f"{k}={v}" for k, v in doc["resume_point"].items()))
    for key in ("epoch", "batch", "total_batches", "train_loss", "cls_loss", "geo_loss"):
        if key in summary:
            print(f"  {key}: {summary[key]}")
    for key, value in summary.items():
        if key not in ("epoch", "batch", "total_batches", "train_loss", "cls_loss", "geo_loss", "global_step"):
            print(f"  {key}: {value}")
    for key, value in doc["metadata"].items():
        print(f"  {key}: {value}")
    if seal:
        print(f"  tensors: {doc['tensors']}, elements: {doc['elements']:,}"
              + (f", model parameters: {doc['parameters']:,}" if doc["parameters"] is not None else ""))
    return EXIT_OK


def _cmd_load(args: argparse.Namespace) -> int:
    path = _file(args)
    started = time.perf_counter()
    state = load(path, map_location="cpu")
    seconds = time.perf_counter() - started
    print(f"✅ loaded {path} in {seconds:.2f}s (digest checked)")
    if isinstance(state, dict):
        for key, value in state.items():
            print(f"  {key}: {_describe(value)}")
    else:
        print(f"  {_describe(state)}")
    return EXIT_OK


def _describe(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, dict):
        tensors = _count_tensors(value)
        return f"{type(value).__name__} with {len(value)} entries" + (
            f", {tensors[0]} tensors, {tensors[1]:,} elements" if tensors[0] else "")
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return repr(value)


def _count_tensors(value: Any) -> tuple[int, int]:
    from .snapshot import walk_tensors

    tensors = list(walk_tensors(value))
    return len(tensors), sum(t.numel() for t in tensors)


def _cmd_clean(args: argparse.Namespace) -> int:
    directory = _directory(args)
    if args.keep_count < 0:
        raise UsageError("--keep-count must be 0 or more")
    # Only batch checkpoints are counted and deleted; best_model and other names are the user's to manage.
    entries = [e for e in scan(directory) if not e.protected and parse_checkpoint_name(e.name)]
    newest_valid = _newest_valid(entries)
    victims = beyond_newest(entries, args.keep_count, newest_valid)
    verb = "would delete" if args.dry_run else "deleted"
    freed = 0
    forgotten: dict[str, dict[str, Any] | None] = {}
    for entry in victims:
        if not args.dry_run:
            delete_checkpoint(entry.path)  # a training run's own retention may have got there first: fine
            forgotten[entry.path.name] = None
        freed += entry.total_size
        print(f"  {verb}: {entry.path.name} - {_mb(entry.total_size)}")
    if forgotten:
        update_index(directory, forgotten)
    for orphan in [] if args.dry_run else remove_stale_orphan_shards(directory):
        print(f"  {verb}: {orphan.path.name} (shards of a save never committed) - {_mb(orphan.size)}")
    kept = len(entries) - len(victims)
    if not entries:
        print(f"no batch checkpoints in {directory}")
    print(f"🧹 {verb} {len(victims)} checkpoint(s), {_mb(freed)}; kept {kept}"
          + (f" (newest valid: {newest_valid.name})" if newest_valid else ""))
    return EXIT_OK


def _newest_valid(entries: list[CheckpointEntry]) -> Path | None:
    for entry in entries:
        if not entry.protected and verify_file(entry.path).ok:
            return entry.path
    return None


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.checkpoint:
        target = Path(args.save_dir or DEFAULT_DIR) / args.checkpoint
    else:
        target = Path(args.path or args.save_dir or DEFAULT_DIR)
    if not target.exists():
        raise UsageError(f"{target}: no such file or directory")
    if target.is_file():
        try:
            read_meta(target)
        except ValueError as exc:
            if not isinstance(exc, CorruptCheckpointError):
                raise UsageError(str(exc)) from None
    report = verify(target)
    if args.json:
        print(json.dumps({"path": str(target), "ok": report.ok, "files": [
            {"file": str(c.path), "status": c.status, "reason": c.reason, "digest": c.digest, "size": c.size}
            for c in report.files]}, indent=2))
    else:
        for check in report.files:
            mark = {"verified": "✅", "unsealed": "⚪", "corrupt": "❌"}[check.status]
            print(f"{mark} {check.path.name}: {check.status} - {check.reason}")
        bad = report.corrupt
        print(f"{len(report.files)} file(s) checked, {len(bad)} corrupt")
    return EXIT_OK if report.ok else EXIT_BAD
