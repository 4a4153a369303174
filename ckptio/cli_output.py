"""How ``python -m ckptio`` shows what it found: one line per value, terminal controls escaped, sizes in MB.

Nothing a file holds may forge a line of output or act on the terminal: every value read from a file passes
through :func:`one_line` (line breaks escaped) and the :class:`Printable` stream (controls escaped), and a
loaded state is described within a node budget.
"""

from __future__ import annotations

import math
import reprlib
import stat
import time
from typing import Any

from .naming import CheckpointEntry, integrity_state
from .slim import is_slim

__all__ = [
    "CONTROLS",
    "DESCRIBE_BUDGET",
    "LINE_BREAKS",
    "NOT_FINITE",
    "SHORT",
    "STATE_LABELS",
    "Printable",
    "as_count",
    "as_dict",
    "count_tensors",
    "describe",
    "entry_json",
    "entry_line",
    "file_kind",
    "mb",
    "number",
    "one_line",
    "recorded_slim",
    "recorded_summary",
    "shown",
]

STATE_LABELS = {"verified": "✅ verified", "unverified": "⚪ unverified", "corrupt": "❌ corrupt"}
# Printing a loaded state visits at most this many objects (a small pickle of shared references can describe
# an exponentially large tree).
DESCRIBE_BUDGET = 100_000
NOT_FINITE = ("inf", "-inf", "nan")
SHORT = reprlib.Repr()
SHORT.maxstring = SHORT.maxother = 120


# Characters a file name or a value read from a file may carry that would act on the user's terminal instead of
# showing (cursor moves, screen clears, window titles: ESC and other C0/C1 controls; bidi overrides that reorder
# a name on screen): printed as visible escapes. Newlines and tabs pass (our own output is made of lines).
CONTROLS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
             for c in (*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
             if c not in (0x09, 0x0A)}


LINE_BREAKS = str.maketrans({"\n": "\\n", "\t": "\\t"})


def one_line(name: str) -> str:
    """Text from a file or a file name, for one line of output: a newline or tab in it is shown escaped, so that
    it cannot forge a line (say, a checkpoint that looks verified) in what ``list``, ``clean``, ``verify`` or
    ``info`` print."""
    return name.translate(LINE_BREAKS)


class Printable:
    """A text stream that writes terminal control characters as visible escapes (see ``CONTROLS``)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text.translate(CONTROLS))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link (checkpoints must be regular files)"),
             (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def entry_line(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.mtime_ns / 1e9))
    state = STATE_LABELS[integrity_state(entry, index)]
    shards = " (with shards)" if entry.shard_bytes else ""
    shards += " (slim: weights only)" if recorded_slim(entry, index) else ""
    summary = recorded_summary(entry, index)
    scores = "".join(f" - {key}={summary[key]:.4f}" for key in ("val_loss", "val_hmean")
                     if isinstance(summary.get(key), float) and math.isfinite(summary[key]))
    return f"  {one_line(entry.path.name)} - {mb(entry.total_size)}{shards} - {stamp} - {state}{scores}"


def recorded_summary(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary the index recorded for this exact file (``read_index`` has checked its shape), else ``{}``."""
    if integrity_state(entry, index) == "unverified":
        return {}
    return index[entry.path.name].get("meta", {}).get("summary", {})


def recorded_slim(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> bool:
    """Whether the index's record of this exact file marks it slimmed to its model weights (``ckptio.slim``)."""
    return integrity_state(entry, index) != "unverified" and is_slim(index[entry.path.name].get("meta"))


def entry_json(entry: CheckpointEntry, index: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "file": entry.path.name, "name": entry.name, "size": entry.total_size, "mtime": entry.mtime_ns / 1e9,
        "best": entry.protected, "integrity": integrity_state(entry, index),
        "summary": recorded_summary(entry, index), "slim": recorded_slim(entry, index),
    }


def mb(size: int) -> str:
    return f"{size / 1e6:.1f}MB"


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_count(value: Any) -> int | None:
    return value if type(value) is int else None


def shown(key: str, value: Any) -> str:
    """A summary value as a user reads it, on one line: the trainer's "nothing yet" placeholders say so."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value in NOT_FINITE:
        return "none yet"  # a summary stores a non-finite float as its repr: the trainer's inf is "no loss yet"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 and (
            key.endswith(("hmean", "precision", "recall"))):
        return "none yet"  # an H-mean lies in [0, 1]: the trainer's -1.0 means "not measured yet"
    return SHORT.repr(value) if not isinstance(value, (int, float, str)) else one_line(str(value)[:200])


def number(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def describe(value: Any, budget: list[int]) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, dict):
        tensors, elements, complete = count_tensors(value, budget)
        counted = f", {tensors} tensors, {elements:,} elements" if tensors else ""
        return (f"{type(value).__name__} with {len(value)} entries{counted}"
                + ("" if complete else " (too many objects to count them all)"))
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"{type(value).__name__} of {len(value)}"
    return SHORT.repr(value)


def count_tensors(value: Any, budget: list[int]) -> tuple[int, int, bool]:
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


