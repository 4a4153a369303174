"""What rank 0's writer does with a committed sharded (DCP) checkpoint directory: put a replacement (a
``best_model`` saved again) in place of the one it replaces, and apply ``keep_count`` / ``disk_budget``.

Used by :mod:`ckptio.dcp_job` (the writer) and :mod:`ckptio.dcp_manager` (which, at its start, puts back a
directory a crash left set aside).
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import exchange, fsync_directory
from .dcp import checkpoint_entries, delete_dcp_directory
from .naming import parse_checkpoint_name
from .retention import plan_retention

__all__ = ["NEXT_SUFFIX", "apply_retention", "restore_set_aside", "swap_in"]

def swap_in(directory: Path, name: str) -> None:
    """Rank 0's writer, once ``name`` is sealed under its hidden name because it replaces one: swap it in."""
    if not parse_checkpoint_name(name):
        _swap_into_place(directory / f".{name}{NEXT_SUFFIX}", directory / name)


def apply_retention(directory: Path, name: str, *, keep_count: int | None, disk_budget: int | None) -> int:
    """Rank 0's writer, once ``name`` is committed: delete what ``keep_count`` and ``disk_budget`` drop. Return
    how many were deleted."""
    if keep_count is None and disk_budget is None:
        return 0
    plan = plan_retention(checkpoint_entries(directory), keep_count=keep_count, budget=disk_budget,
                          must_keep=directory / name)
    for entry in plan.delete:
        delete_dcp_directory(entry.path)
    return len(plan.delete)


NEXT_SUFFIX = ".next-ckptio"
_PREV_SUFFIX = ".prev-ckptio"


def _swap_into_place(new: Path, final: Path) -> None:
    """Put the committed directory ``new`` under ``final``'s name; the one it replaces is deleted.

    With Linux's ``renameat2(RENAME_EXCHANGE)`` the two trade places in one step. Without it (NFS, no glibc),
    the old one is first renamed to a fixed hidden name: a crash between the two renames leaves no directory
    under the name, and the next start puts the old one back (:func:`restore_set_aside`); the save was never
    reported committed, so the old one is the right one.
    """
    if not os.path.lexists(final):
        os.rename(new, final)
    elif exchange(new, final):
        delete_dcp_directory(new)  # now holds the previous one
    else:
        aside = final.parent / f".{final.name}{_PREV_SUFFIX}"
        delete_dcp_directory(aside)  # an old one that a crash left after its replacement was in place
        os.rename(final, aside)
        try:
            os.rename(new, final)
        except BaseException:
            os.rename(aside, final)  # the save failed; the old one stays under its name meanwhile
            raise
        delete_dcp_directory(aside)
    fsync_directory(final.parent)


def restore_set_aside(directory: Path) -> None:
    """After a crash inside :func:`_swap_into_place`'s two renames: an old checkpoint set aside whose name is
    empty goes back under it; one whose replacement is in place is deleted."""
    for aside in directory.glob(".*" + _PREV_SUFFIX):
        final = directory / aside.name[1:-len(_PREV_SUFFIX)]
        if os.path.lexists(final):
            delete_dcp_directory(aside)
        else:
            os.rename(aside, final)
            fsync_directory(directory)
