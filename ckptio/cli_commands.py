"""The commands of ``python -m ckptio``: ``list``, ``info``, ``load``, ``clean`` and ``verify``, each one library
call behind the path checks that turn a wrong path into a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from . import cli_dcp
from .atomic import is_temporary
from .cli_output import (
    DESCRIBE_BUDGET,
    SHORT,
    as_count,
    as_dict,
    describe,
    entry_json,
    entry_line,
    file_kind,
    mb,
    number,
    one_line,
    shown,
)
from .dir_index import read_index
from .errors import CorruptCheckpointError
from .fileio import load, read_meta
from .naming import (
    CheckpointEntry,
    delete_checkpoint,
    integrity_state,
    parse_checkpoint_name,
    remove_orphan,
    scan,
    split_suffix,
    stale_orphan_shards,
)
from .newest import latest
from .retention import periodic_newest_first, plan_retention
from .suffixes import format_of
from .verify import record_in_index, verify

__all__ = ["DEFAULT_DIR", "EXIT_BAD", "EXIT_OK", "EXIT_USAGE", "PATH_ERRNOS", "UsageError", "cmd_clean", "cmd_info",
           "cmd_list", "cmd_load", "cmd_verify"]

DEFAULT_DIR = "checkpoints_improved"
EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2
_VERIFY_MARKS = {"verified": "✅", "unsealed": "⚪", "corrupt": "❌", "removed": "➖"}
# Errors about the path the user typed, not about a file's contents: usage errors (exit 2).
PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.ENOENT}


class UsageError(Exception):
    """A wrong path or argument: reported without a traceback, exit status 2."""


# -- path resolution ----------------------------------------------------------------------------------------


def _lstat(path: Path) -> os.stat_result | None:
    """``lstat``, or ``None`` for a path that does not exist; a path the system cannot even look up is a usage
    error (too long, a file used as a directory, a symlink loop)."""
    try:
        return path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in PATH_ERRNOS:
            raise UsageError(f"{SHORT.repr(str(path))}: {exc.strerror}") from None
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


def cmd_list(args: argparse.Namespace) -> int:
    directory = _directory(args)
    entries = scan(directory)
    index = read_index(directory)
    odd = _unreadable_entries(directory)
    best = [e for e in entries if e.protected]
    batches = [e for e in entries if not e.protected and parse_checkpoint_name(e.name)]
    others = [e for e in entries if not e.protected and not parse_checkpoint_name(e.name)]
    batch_bytes = sum(e.total_size for e in batches)
    total = sum(e.total_size for e in entries)
    dcp_lines, dcp_records = cli_dcp.list_lines(directory, index, mb, one_line) if cli_dcp.has_dcp(directory) \
        else ([], [])
    if args.json:
        print(json.dumps({"directory": str(directory), "checkpoints": [entry_json(e, index) for e in entries],
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
            print(entry_line(entry, index))
        print()
    print(f"🔄 批次检查点 ({len(batches)}个):")
    for entry in batches:
        print(entry_line(entry, index))
    if others:
        print(f"\n📦 其他检查点 ({len(others)}个):")
        for entry in others:
            print(entry_line(entry, index))
    if dcp_lines:
        print(f"\n🧩 DCP 检查点目录 ({len(dcp_lines)}个, 分片, 可在任意进程数加载):")
        print("\n".join(dcp_lines))
    if odd:
        print(f"\n⚠️ 无法读取 ({len(odd)}个, 不计入统计):")
        for name, why in odd:
            print(f"  {one_line(name)} - unreadable: {why}")
    states = [integrity_state(e, index) for e in entries]
    print("\n📊 统计信息:")
    print(f"  批次检查点总数: {len(batches)}")
    print(f"  总大小: {mb(batch_bytes)} (批次检查点)")
    print(f"  全部检查点: {len(entries)}个, {mb(total)} (含 best_model 与其他检查点)")
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
                odd.append((item.name, file_kind(mode)))
    return sorted(odd)


def cmd_info(args: argparse.Namespace) -> int:
    given = args.file or args.checkpoint
    for candidate in ([Path(given), Path(args.save_dir or DEFAULT_DIR) / given] if given else []):
        if cli_dcp.is_dcp_directory(candidate):
            return _dcp_info(candidate, as_json=args.json)
    path = _file(args)
    seal, size = read_meta(path)
    info = path.stat()
    # The meta is whatever the file says: every field is checked before it is formatted.
    meta = seal.meta if seal else {}
    summary = as_dict(meta.get("summary")) if seal else _unsealed_summary(path)
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
        "tensors": as_count(meta.get("tensors")),
        "elements": as_count(meta.get("elements")),
        "parameters": as_count(meta.get("model_elements")),
        "tensor_bytes": as_count(meta.get("tensor_bytes")),
        "raw_size": as_count(meta.get("raw_size")),
        "created": meta.get("created"),
        "metadata": as_dict(meta.get("user")),
    }
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    print(f"📄 {one_line(str(path))}")
    modified = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.st_mtime))
    print(f"  size: {mb(size)} ({size} bytes), modified {modified}")
    print(f"  format: {SHORT.repr(doc['format'])[1:-1] if isinstance(doc['format'], str) else '?'}, "
          f"compression: {doc['compression'] if isinstance(doc['compression'], str) else 'none'}")
    print(f"  digest: {one_line(str(doc['digest'] or 'none (not written by ckptio)'))} [{doc['integrity']}]")
    if doc["resume_point"]:
        print("  resume point: " + ", ".join(f"{k}={shown(k, v)}" for k, v in doc["resume_point"].items()))
    first = ("epoch", "batch", "total_batches", "train_loss", "cls_loss", "geo_loss")
    for key in first:
        if key in summary:
            print(f"  {key}: {shown(key, summary[key])}")
    for key, value in summary.items():
        if key not in (*first, "global_step"):
            print(f"  {one_line(str(key))}: {shown(key, value)}")
    for key, value in doc["metadata"].items():
        print(f"  {one_line(str(key))}: {shown(key, value)}")
    if seal:
        counts = [f"tensors: {number(doc['tensors'])}", f"elements: {number(doc['elements'])}"]
        if doc["parameters"] is not None:
            counts.append(f"model parameters: {doc['parameters']:,}")
        print("  " + ", ".join(counts))
    return EXIT_OK


def _dcp_info(path: Path, *, as_json: bool) -> int:
    doc = cli_dcp.info(path)
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    print(f"🧩 {one_line(str(path))}/ - {doc['kind']}")
    print(f"  size: {mb(doc['size'] or 0)}, {len(doc['data_files'])} data file(s), "
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


def cmd_load(args: argparse.Namespace) -> int:
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
        budget = [DESCRIBE_BUDGET]
        for key, value in state.items():
            shown = SHORT.repr(key) if not isinstance(key, str) else one_line(key[:200])
            print(f"  {shown}: {one_line(describe(value, budget))}")
            if budget[0] <= 0:
                print(f"  ... (stopped describing after {DESCRIBE_BUDGET:,} objects)")
                break
    else:
        print(f"  {describe(state, [DESCRIBE_BUDGET])}")
    return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
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
        print(f"  {verb}: {one_line(entry.path.name)} - {mb(entry.total_size)}")
    if forgotten:
        record_in_index(directory, forgotten)  # gives up after 2 s if another process holds the index lock
    for orphan in stale_orphan_shards(directory):
        if not args.dry_run:
            remove_orphan(orphan)
        print(f"  {verb}: {one_line(orphan.path.name)} (shards of a save never committed) - {mb(orphan.size)}")
    for staging in cli_dcp.sweep(directory, dry_run=args.dry_run) if cli_dcp.has_dcp(directory) else []:
        print(f"  {verb}: {one_line(staging.name)} (a DCP save that never committed)")
    kept = len(entries) - len(victims)
    if not entries:
        print(f"no batch checkpoints in {directory}")
    print(f"🧹 {verb} {len(victims)} checkpoint(s), {mb(freed)}; kept {kept}"
          + (f" (newest valid: {one_line(newest_valid.name)})" if newest_valid else ""))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
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
            print(f"{_VERIFY_MARKS[check.status]} {one_line(check.path.name)}: {check.status} - "
                  f"{one_line(check.reason)}")  # a reason may quote a shard name from the file
        bad = report.corrupt
        removed = sum(check.status == "removed" for check in report.files)
        for line in dcp_lines:
            print(one_line(line))
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
            print(one_line(line))
    return EXIT_OK if ok else EXIT_BAD
