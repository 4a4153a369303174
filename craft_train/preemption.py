"""Save on preemption: SIGTERM, SIGINT and SIGUSR1 end the run at the next step boundary with a checkpoint.

What a spot VM, SLURM (``--signal``), Kubernetes and ``docker stop`` send before they kill a job is SIGTERM,
followed after a grace period by SIGKILL. The handler only records the signal; the training loop looks at it
after each optimizer step (:meth:`Preemption.requested`), saves the exact state, waits until the save is
durable (and mirrored, with a mirror) within the grace period, and ends the run with the signal's exit code:
143 for SIGTERM, 130 for SIGINT, 0 for SIGUSR1 (the SLURM requeue convention: the job asked for its own
checkpoint). A second signal ends the process at once: every checkpoint file is written under a temporary name
and renamed when complete, so nothing half-written is left either way.

Under ``torchrun`` the signal may reach every process (SLURM, Kubernetes) or only one. The processes agree once
per step, in one all-reduce, on whether any of them got one (:meth:`Preemption.agree`): all stop at the same
step, all take part in the save of that step, and all exit with the same code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .distributed import World

__all__ = ["EXIT_CODES", "RELAY_WINDOW", "Preemption", "ignore_stop_signals", "wait_durable"]

EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 0}
"""The exit code of a run that a signal ended after saving."""

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

RELAY_WINDOW = 5.0
"""Under torchrun, seconds within which the same signal again is one request, not a second signal: a scheduler
that signals every process of the job (SLURM) also reaches ``torchrun``, which relays the signal to its workers."""

_AGREEMENT_ORDER = (None, "SIGUSR1", "SIGINT", "SIGTERM")
"""When processes got different signals, the run stops for the last one here: SIGTERM's grace period is the
scheduler's, and a job that asked for its own checkpoint (SIGUSR1, exit 0) must not hide that it was killed."""


class Preemption:
    """Records the first SIGTERM/SIGINT/SIGUSR1; a second one ends the process at once.

    ``repeat_window``: seconds after the first signal within which the same signal again is not a second one
    (:data:`RELAY_WINDOW` under torchrun; 0 for one process).
    """

    def __init__(self, *, repeat_window: float = 0.0) -> None:
        self.repeat_window = repeat_window
        self.signal_name: str | None = None
        """The first signal this process got."""
        self.received_at: float | None = None
        self.agreed: str | None = None
        """The signal the run stops for, once :meth:`agree` found that some process got one."""
        self.agreed_at: float | None = None

    @property
    def requested(self) -> bool:
        """Whether this process got a signal (a distributed loop asks :meth:`agree` instead)."""
        return self.signal_name is not None

    @property
    def stopped_by(self) -> str | None:
        """The signal the run stops for: the agreed one, else this process's own (one that came too late to be
        agreed on still sets the exit code)."""
        return self.agreed or self.signal_name

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.stopped_by or "", 0)

    @property
    def since(self) -> float | None:
        """When the grace period began: at this process's signal, or when it learned of another's."""
        return self.received_at if self.received_at is not None else self.agreed_at

    def agree(self, world: World, device: torch.device) -> bool:
        """Whether the run stops at this step: the same answer on every process, which must all call this at the
        same point of each step.

        One all-reduce (MAX) of a small int on the loop's own process group: a signal that reached one process
        stops them all. The answer says only what was known when every process had joined: a signal arriving
        during the call counts at the next one, so no process acts on a stop the others have not seen.
        """
        if not world.distributed:
            if self.signal_name is not None:
                self.agreed = self.agreed or self.signal_name
                self.agreed_at = self.agreed_at or time.monotonic()
            return self.signal_name is not None
        code = torch.tensor([_AGREEMENT_ORDER.index(self.signal_name)], dtype=torch.int32, device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        agreed = _AGREEMENT_ORDER[int(code.item())]
        if agreed is None:
            return False
        if self.agreed is None:  # the first agreed stop sets the run's reason and exit code, as on one process
            self.agreed, self.agreed_at = agreed, time.monotonic()
        return True

    @contextmanager
    def installed(self) -> Iterator[Preemption]:
        """Handle the signals inside the block and restore the previous handlers after it.

        Signal handlers can only be set from the main thread; elsewhere (a trainer run from a worker thread)
        the block runs without them and the signals keep their previous meaning.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in _HANDLED}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self.received_at = name, now
            return
        if name == self.signal_name and self.received_at is not None and now - self.received_at < self.repeat_window:
            return  # the same request, relayed by the launcher
        # The second signal: the user (or the scheduler) will not wait. Files being written are temporaries that
        # the next start removes; the checkpoints already committed are intact.
        _write_stderr(f"craft_train: second signal ({name}) while saving after {self.signal_name}: exiting now; "
                      "checkpoints already written are intact\n")
        os._exit(128 + signum)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: SLURM and ``kill -- -PGID`` signal every process of the job, and torch's
    workers die of SIGTERM (and of SIGUSR1's default action), which would fail the step the trainer is finishing
    before its save. The trainer handles the signals; a worker exits when the trainer does."""
    for signum in _HANDLED:
        signal.signal(signum, signal.SIG_IGN)


def wait_durable(future: Future[Any] | None, mirrored: Callable[[float], bool] | None, *, grace: float,
                 since: float | None) -> tuple[bool, bool | None, float]:
    """Wait for the preemption save to be durable, then (with a mirror) mirrored, within ``grace`` seconds
    counted from ``since`` (when the signal came). Returns (durable, mirrored or None without a mirror, seconds
    left of the grace period)."""
    deadline = (since if since is not None else time.monotonic()) + grace
    durable = future is None
    if future is not None:
        try:
            durable = future.result(timeout=max(0.0, deadline - time.monotonic())) is not None
        except FutureTimeout:
            durable = False
        except Exception:  # the save failed; the trainer reports the failure through its save report
            durable = False
    copied = None
    if mirrored is not None and durable:
        copied = mirrored(max(0.0, deadline - time.monotonic()))
    return durable, copied, deadline - time.monotonic()


def _write_stderr(text: str) -> None:
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):
        pass
