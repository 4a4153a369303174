"""The CLI's view of DCP checkpoint directories (``ckptio.dcp``'s and torch's plain ones): ``list``, ``info``,
``verify`` and ``clean`` call in here, so that ``cli`` keeps one branch per command.

``ckptio.dcp`` imports ``torch.distributed.checkpoint``; it is imported here only when a command meets a
directory that holds DCP checkpoints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .naming import CheckpointEntry, integrity_state, parse_checkpoint_name
from .verify import record_in_index

__all__ = ["dcp_entries", "delete", "has_dcp", "info", "is_dcp_directory", "list_lines", "sweep", "verify_lines"]

_STATES = {"verified": "✅ verified", "unsealed": "⚪ unsealed (plain DCP, no digests)",
           "unverified": "❔ unverified", "corrupt": "❌ CORRUPT"}


def is_dcp_directory(path: Path) -> bool:
    from .dcp import is_dcp_directory as check

    return check(path)


def has_dcp(directory: Path) -> bool:
    """Whether ``directory`` holds a DCP checkpoint directory or the staging directory of a DCP save."""
    try:
        with os.scandir(directory) as it:
            return any(item.is_dir(follow_symlinks=False)
                       and (os.path.lexists(os.path.join(item.path, ".metadata")) or item.name.endswith(".ckptio-tmp"))
                       for item in it)
    except OSError:
        return False


def dcp_entries(directory: Path) -> list[CheckpointEntry]:
    """DCP checkpoint directories as the listing entries retention and ``clean`` work on (newest first)."""
    from .dcp import checkpoint_entries

    return checkpoint_entries(directory)


def _state(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> str:
    state = integrity_state(entry, index)
    if state == "unverified" and not os.path.lexists(entry.path / ".ckptio-seal.json"):
        return "unsealed"
    return state


def list_lines(directory: Path, index: dict[str, dict[str, Any]], mb: Callable[[int], str],
               one_line: Callable[[str], str]) -> tuple[list[str], list[dict[str, Any]]]:
    """The text lines and JSON records ``list`` shows for the DCP checkpoints in ``directory``."""
    entries = dcp_entries(directory)
    lines, records = [], []
    for entry in entries:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.mtime_ns / 1e9))
        state = _state(entry, index)
        lines.append(f"  {one_line(entry.name)}/ - {mb(entry.size)} - {stamp} - {_STATES[state]}")
        records.append({"directory": entry.name, "size": entry.size, "mtime": entry.mtime_ns / 1e9,
                        "integrity": state, "periodic": parse_checkpoint_name(entry.name) is not None})
    return lines, records


def info(path: Path) -> dict[str, Any]:
    """What ``info`` shows of a DCP checkpoint directory: read from its metadata, no tensor read."""
    from .dcp import DcpEntry, open_directory, scan_dcp

    opened = open_directory(path)
    metadata = opened.metadata
    tensors = {fqn: md for fqn, md in metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
    elements = 0
    for md in tensors.values():
        count = 1
        for dim in md.size:
            count *= dim
        elements += count
    files = sorted({(info["file"] if isinstance(info, dict) else info.relative_path)
                    for info in metadata.storage_data.values()})
    entry: DcpEntry | None = next((e for e in scan_dcp(path.parent) if e.path.name == path.name), None)
    codecs = {info.get("codec") for info in metadata.storage_data.values() if isinstance(info, dict)}
    return {
        "directory": str(path), "kind": "ckptio DCP" if opened.seal else "plain DCP (torch FileSystemWriter)",
        "sealed": opened.seal is not None, "size": entry.size if entry else None,
        "entries": len(metadata.state_dict_metadata), "tensors": len(tensors), "elements": elements,
        "stored_items": len(metadata.storage_data), "data_files": files,
        "compression": "zstd" if "zstd" in codecs else None,
        "save_id": getattr(metadata.storage_meta, "save_id", None), "dcp_version": metadata.version,
    }


def verify_lines(path: Path, *, record: bool = True) -> tuple[bool, list[str], list[dict[str, Any]]]:
    """Verify ``path`` (one DCP directory) or every DCP directory in it: ``(ok, lines, json records)``."""
    from .dcp import verify_directory

    targets = [path] if is_dcp_directory(path) else [e.path for e in dcp_entries(path)]
    ok, lines, records = True, [], []
    changes: dict[str, dict[str, Any] | None] = {}
    for target in targets:
        check = verify_directory(target)
        ok = ok and check.ok
        mark = {"verified": "✅", "unsealed": "⚪", "corrupt": "❌"}[check.status]
        lines.append(f"{mark} {target.name}/: {check.status} - {check.items} item(s) - {check.reason.splitlines()[0]}")
        lines += [f"    damaged: {reason}" for reason in check.damaged[1:]]
        records.append({"directory": str(target), "status": check.status, "reason": check.reason,
                        "items": check.items, "damaged": list(check.damaged)})
        entry = next((e for e in dcp_entries(target.parent) if e.path.name == target.name), None)
        if entry is not None and check.status in ("verified", "corrupt"):
            changes[target.name] = {"size": entry.size, "mtime_ns": entry.mtime_ns, "status": check.status,
                                    "digest": None, "meta": {}, "reason": check.reason[:500]}
    if record and changes:
        record_in_index(path if not is_dcp_directory(path) else path.parent, changes)
    return ok, lines, records


def valid(entry: CheckpointEntry) -> bool:
    from .dcp import verify_directory

    return verify_directory(entry.path).ok


def delete(entry: CheckpointEntry) -> None:
    from .dcp import delete_dcp_directory

    delete_dcp_directory(entry.path)


def sweep(directory: Path, *, dry_run: bool) -> list[Path]:
    """Staging directories of DCP saves that crashed or failed (a save in flight holds a lock on its own)."""
    from .dcp import dcp_leftovers, remove_dcp_leftovers

    return dcp_leftovers(directory) if dry_run else remove_dcp_leftovers(directory)
