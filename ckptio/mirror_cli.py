"""``python -m ckptio list|info|verify URL`` and ``pull URL/NAME DIR``: the commands for a mirror.

``URL`` is ``s3://bucket/prefix`` or ``file:///path`` (a plain directory is a checkpoint directory, which the
ordinary commands read directly). Only checkpoints whose copy completed (their manifest exists) are shown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .fileio import FileCheck
from .mirror import MirrorTarget, RemoteEntry, is_remote_url, open_target, pull, remote_checkpoints, verify_remote
from .naming import split_suffix

__all__ = ["cmd_pull", "remote_command"]

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


def remote_command(args: argparse.Namespace) -> object | None:
    """The mirror's version of ``args.command`` when its path argument is a URL, else None."""
    given = {"list": "directory", "info": "file", "verify": "path"}.get(args.command)
    value = getattr(args, given, None) if given else None
    if not isinstance(value, str) or not is_remote_url(value):
        return None
    return {"list": _cmd_list, "info": _cmd_info, "verify": _cmd_verify}[args.command]


def _split(url: str) -> tuple[MirrorTarget, str | None]:
    """``(target, key)`` for ``URL/NAME.pth``, ``(target, None)`` for the mirror itself."""
    base, _, last = url.rstrip("/").rpartition("/")
    if split_suffix(last) is not None and "://" in base:
        return open_target(base), last
    return open_target(url.rstrip("/")), None


def _find(target: MirrorTarget, key: str) -> RemoteEntry:
    for entry in remote_checkpoints(target):
        if entry.key == key or entry.name == key:
            return entry
    raise FileNotFoundError(f"{target.url}/{key}: no such checkpoint on the mirror (or its copy never completed); "
                            f"see `python -m ckptio list {target.url}`")


def _cmd_list(args: argparse.Namespace) -> int:
    target, _ = _split(args.directory)
    entries = remote_checkpoints(target)
    if args.json:
        print(json.dumps({"mirror": target.url, "checkpoints": [
            {"file": e.key, "size": e.size, "digest": e.digest, "global_step": e.summary.get("global_step")}
            for e in entries]}, indent=2))
        return EXIT_OK
    print(f"mirror {target.url}: {len(entries)} checkpoint(s), newest first (digests checked on upload; "
          "`verify` re-reads them)")
    for entry in entries:
        step = entry.summary.get("global_step")
        print(f"  {entry.key}  {entry.size / 1e6:.1f} MB" + (f"  step {step}" if step is not None else ""))
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    target, key = _split(args.file)
    if key is None:
        raise ValueError(f"{args.file}: name a checkpoint, e.g. {args.file.rstrip('/')}/best_model.pth")
    entry = _find(target, key)
    record = {"file": f"{target.url}/{entry.key}", "size": entry.size, "digest": entry.digest, **entry.summary}
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        for field, value in record.items():
            print(f"{field}: {value}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    target, key = _split(args.path)
    entries = [_find(target, key)] if key is not None else remote_checkpoints(target)
    checks: list[tuple[RemoteEntry, FileCheck]] = [(entry, verify_remote(target, entry)) for entry in entries]
    bad = [entry for entry, check in checks if check.status != "verified"]
    if args.json:
        print(json.dumps({"mirror": target.url, "ok": not bad and bool(checks), "files": [
            {"file": e.key, "status": c.status, "reason": c.reason} for e, c in checks]}, indent=2))
    else:
        for entry, check in checks:
            mark = "✅" if check.status == "verified" else "❌"
            print(f"{mark} {entry.key}: {check.status} - {check.reason}")
        print(f"{len(checks)} file(s) on {target.url} re-read, {len(bad)} failed")
    return EXIT_OK if checks and not bad else EXIT_BAD


def cmd_pull(args: argparse.Namespace) -> int:
    target, key = _split(args.url)
    if key is None:
        raise ValueError(f"{args.url}: name the checkpoint to pull, e.g. {args.url.rstrip('/')}/best_model.pth")
    path = pull(target, _find(target, key), Path(args.directory))
    print(f"pulled {target.url}/{key} to {path} (verified)")
    return EXIT_OK
