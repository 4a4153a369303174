"""What the trainer prints while it trains: the guide's progress line, and what became of each save.

The guide's line is ``Epoch 1 - 训练 [已保存: batch 100]: 8%|…| 100/1250 [02:30<28:45, 1.50s/it, loss=0.4123,
cls=0.2056, geo=0.2067, errors=0, avg_loss=0.4200]``: on a terminal it is a tqdm bar; in a log or a pipe the
same fields come as plain lines. A save is reported only once its outcome is known, which for a background
save is some steps later: "saved" is never printed for a save that was skipped or failed.
"""

from __future__ import annotations

import math
import queue
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ckptio import parse_checkpoint_name

__all__ = ["EpochProgress", "SaveReport", "progress_fields"]

# The plain line carries the bar's fields without the bar itself.
_PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINES_PER_EPOCH = 10

# The label's words, as the guide prints them.
_QUEUED, _SAVED, _SKIPPED, _FAILED = "保存中", "已保存", "未保存", "保存失败"


def progress_fields(loss: float, cls: float, geo: float, errors: int, avg_loss: float) -> str:
    """The guide's postfix, in its order (tqdm would sort keyword fields alphabetically)."""
    return f"loss={loss:.4f}, cls={cls:.4f}, geo={geo:.4f}, errors={errors}, avg_loss={avg_loss:.4f}"


class EpochProgress:
    """One epoch's progress: a tqdm bar on a terminal, otherwise a plain line every tenth of the epoch."""

    def __init__(self, epoch: int, total: int, initial: int, say: Callable[[str], None], *, show: bool) -> None:
        self.epoch, self.total, self.initial, self.n = epoch, total, initial, initial
        self.say = say
        self.bar = tqdm(total=total, initial=initial, desc=self.description(""), file=sys.stderr,
                        dynamic_ncols=True, disable=True if not show else None)
        self.plain = show and bool(self.bar.disable)
        self.every = max(1, math.ceil(total / _LINES_PER_EPOCH))
        self.started = time.monotonic()

    def description(self, label: str) -> str:
        return f"Epoch {self.epoch} - 训练{label}"

    def update(self, label: str, fields: str) -> None:
        """One more batch done; ``label`` is the latest save's (e.g. `` [已保存: batch 100]``)."""
        self.n += 1
        if self.plain:
            # the first line at once: on a CPU a batch can take a minute, and silence looks like a hang
            if self.n == self.initial + 1 or self.n % self.every == 0 or self.n == self.total:
                self.say(tqdm.format_meter(self.n, self.total, time.monotonic() - self.started,
                                           prefix=self.description(label), postfix=fields,
                                           bar_format=_PLAIN_FORMAT, initial=self.initial))
            return
        self.bar.set_description(self.description(label), refresh=False)
        self.bar.set_postfix_str(fields, refresh=False)
        self.bar.update(1)

    def write(self, line: str) -> None:
        """A line of its own, above the bar if there is one."""
        if self.bar.disable:
            self.say(line)
        else:
            with tqdm.external_write_mode(file=sys.stderr):
                self.say(line)

    def close(self) -> None:
        self.bar.close()


@dataclass(frozen=True)
class _Outcome:
    name: str
    what: str
    detail: str = ""
    path: Path | None = None
    freed: int = 0


class SaveReport:
    """Outcomes of saves as they become known (in the writer's thread for background saves), counted and turned
    into lines by the training loop, which alone prints."""

    def __init__(self, keep_full: int | None = None) -> None:
        self._keep_full = keep_full
        self._outcomes: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()
        self._latest: tuple[str, int, int, str] | None = None  # the latest periodic save: name, epoch, batch, word
        self.saved = 0
        self.skipped = 0
        self.failed = 0
        self.slimmed = 0
        self.bytes_slimmed = 0
        self.saved_paths: list[Path] = []

    def queued(self, name: str, future: Future[Any] | None, *, counts: bool = True) -> None:
        """A save was handed to the manager: ``future`` is what ``save()`` returned (``None``: dropped, busy).

        ``counts=False`` for a process that writes only its shard (its future resolves to ``None``).
        """
        where = parse_checkpoint_name(name)
        if where is not None:
            self._latest = (name, where[0], where[1], _QUEUED)
        if future is None:
            self.put(name, "busy")
        elif counts:
            future.add_done_callback(lambda done: self._settle(name, done))

    def _settle(self, name: str, future: Future[Any]) -> None:
        try:
            saved = future.result()
        except BaseException as exc:  # reported by the loop; the manager raises it on the next save or close
            self.put(name, "failed", str(exc))
            return
        if saved is None:
            self.put(name, "no space")
            return
        self.put(name, "saved", f"{saved.size / 1e6:.1f} MB", saved.path)
        # what the writer's keep_full did after this save (ckptio.slim), in the writer, not in this process
        flag = f" (--keep-full {self._keep_full})" if self._keep_full else ""
        for done in saved.slimmed:
            self.put(done.path.name, "slimmed", f"{done.bytes_before / 1e6:.1f} MB -> {done.bytes_after / 1e6:.1f}"
                     f" MB{flag}", freed=done.bytes_saved)
        if saved.slim_error:
            self.put(name, "slim failed", saved.slim_error)

    def put(self, name: str, what: str, detail: str = "", path: Path | None = None, freed: int = 0) -> None:
        """Record an outcome; safe from any thread."""
        self._outcomes.put(_Outcome(name, what, detail, path, freed))

    def label(self, epoch: int) -> str:
        """The progress line's label for the latest periodic save, if it belongs to ``epoch``."""
        if self._latest is None or self._latest[1] != epoch:
            return ""
        _, _, batch, word = self._latest
        return f" [{word}: batch {batch}]"

    def lines(self) -> list[str]:
        """The outcomes known since the last call, as lines to print; updates the counts and the label."""
        out = []
        while True:
            try:
                outcome = self._outcomes.get_nowait()
            except queue.Empty:
                return out
            out.append(self._describe(outcome))

    def _describe(self, outcome: _Outcome) -> str:
        name, what, detail = outcome.name, outcome.what, outcome.detail
        word = {"saved": _SAVED, "no space": _SKIPPED, "busy": _SKIPPED, "failed": _FAILED}.get(what)
        if word is not None and self._latest is not None and self._latest[0] == name:
            self._latest = (*self._latest[:3], word)
        if what == "saved":
            self.saved += 1
            if outcome.path is not None:
                self.saved_paths.append(outcome.path)
            return f"saved {outcome.path.name if outcome.path else name} ({detail})"
        if what == "no space":
            self.skipped += 1
            return f"skipped {name}: not enough disk space (--min-free or a full disk); earlier checkpoints are intact"
        if what == "busy":
            self.skipped += 1
            return f"skipped {name}: the earlier saves are still being written"
        if what == "failed":
            self.failed += 1
            return f"failed to save {name}: {detail}"
        if what == "slimmed":
            self.slimmed += 1
            self.bytes_slimmed += outcome.freed
            return f"slimmed {name} to its model weights: {detail}"
        return f"could not slim an older checkpoint after {name}: {detail}; it stays complete"

    def summary(self) -> str:
        text = f"{self.saved} checkpoints saved, {self.skipped} skipped, {self.failed} failed"
        if self.slimmed:
            text += f", {self.slimmed} slimmed to weights ({self.bytes_slimmed / 1e6:.0f} MB freed)"
        return text
