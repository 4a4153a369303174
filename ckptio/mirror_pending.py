"""Which checkpoints of a directory are not yet mirrored: a marker file per checkpoint, written before retention
runs and removed once the copy verified, so that local retention never deletes the only copy unasked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

__all__ = ["PENDING_DIRECTORY", "clear_pending", "mark_pending", "pending", "plan_local_retention"]

PENDING_DIRECTORY = ".ckptio-mirror-pending"


def mark_pending(directory: Path, file_name: str) -> None:
    marks = directory / PENDING_DIRECTORY
    marks.mkdir(exist_ok=True)
    (marks / file_name).touch()


def clear_pending(directory: Path, file_name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / PENDING_DIRECTORY / file_name).unlink()


def pending(directory: Path) -> set[str]:
    """File names of local checkpoints not yet mirrored."""
    try:
        return {entry.name for entry in os.scandir(directory / PENDING_DIRECTORY) if not entry.name.startswith(".")}
    except FileNotFoundError:
        return set()


def plan_local_retention(entries: list[Any], waiting: set[str], *, keep_count: int | None, budget: int | None,
                         must_keep: Path | None, reserve: int) -> tuple[Any, list[Any]]:
    """Local retention with a mirror: checkpoints not yet mirrored are kept beyond ``keep_count``; the disk
    budget still applies to them, oldest first, only when deleting every mirrored one was not enough.
    Returns the plan and the unmirrored entries the budget forced out (to be named in a warning)."""
    from .retention import RetentionPlan, over_budget, plan_retention

    held = [e for e in entries if e.path.name in waiting and e.path != must_keep]
    others = [e for e in entries if e not in held]
    plan = plan_retention(others, keep_count=keep_count, budget=budget, must_keep=must_keep,
                          reserve=reserve + sum(e.total_size for e in held))
    if not plan.bytes_over_budget or budget is None:
        return RetentionPlan(plan.delete, plan.keep + held, plan.bytes_over_budget), []
    kept = [e for e in entries if e not in plan.delete]
    forced = over_budget(kept, budget, must_keep, reserve)
    forced = [e for e in forced if e in held]
    remaining = [e for e in kept if e not in forced]
    excess = max(0, sum(e.total_size for e in remaining) + reserve - budget)
    return RetentionPlan(plan.delete + forced, remaining, excess), forced
