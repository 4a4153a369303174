"""The run's checkpoints: what a save writes, when the buffers are prepared, and how outcomes are told.

Replicated state is written once, by rank 0; the other processes never wait for it. With ``--zero`` every
process writes its optimizer shard, and rank 0 commits the manifest once all shards are durable.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

import ckptio

from .build import Run
from .config import ConfigError, TrainConfig
from .distributed import World
from .preemption import Preemption, wait_durable
from .progress import SaveReport
from .state import TrainState

__all__ = ["Checkpoints", "checkpoint", "finish_preemption", "mirror_summary"]


def checkpoint(run: Run, state: TrainState) -> dict[str, Any]:
    """The whole training state, as every checkpoint holds it (a sharded optimizer's go in the shards)."""
    return state.state_dict(run.state_dict(), run.run_fields())


def _manager(config: TrainConfig, world: World, sharded: bool) -> ckptio.CheckpointManager | None:
    """This process's checkpoint manager; ``None`` on the ranks that write nothing (replicated state is rank 0's)."""
    if not (world.is_main or sharded):
        return None
    return ckptio.CheckpointManager(
        config.save_dir, format=config.format, compression=config.compression, async_save=config.async_save,
        writer="process",  # leaves the GIL to training (README, "Writer process"); used with async_save only
        keep_count=config.keep_count, keep_full=config.keep_full, disk_budget=config.disk_budget,
        min_free=config.min_free,  # with async_save, keep_full's slimming runs in the writer process
        mirror=config.mirror, mirror_keep=config.mirror_keep, mirror_timeout=config.grace,
        rank=world.rank if sharded else 0, world_size=world.size if sharded else 1,
    )


class Checkpoints:
    """The checkpoint manager of this process (``None`` on ranks that write nothing) and the report of its saves."""

    def __init__(self, config: TrainConfig, world: World, sharded: bool) -> None:
        self.config, self.world, self.sharded = config, world, sharded
        try:
            self.manager = _manager(config, world, sharded)
        except ValueError as exc:  # a setting the manager refuses (say, a mirror URL it cannot use)
            raise ConfigError(str(exc)) from exc
        self.run_id = world.broadcast(uuid.uuid4().hex)
        self.report = SaveReport(keep_full=config.keep_full)
        self.latest: Any = None
        """The newest save's future: what a preemption waits for."""
        self.prepared = False
        """Whether the buffers were prepared for the full training state."""
        self._mirror_failures_told = 0

    def save(self, name: str, run: Run, state: TrainState) -> None:
        if self.manager is None:
            return
        if self.sharded:
            whole = checkpoint(run, state) if self.world.is_main else None
            future = self.manager.save(whole, name=name, shard=run.optimizer_shard(),
                                       token=f"{self.run_id}:{state.global_step}:{name}")
        else:
            future = self.manager.save(checkpoint(run, state), name=name)
        self.report.queued(name, future, counts=self.world.is_main)
        self.latest = future

    def prepare_once(self, run: Run, state: TrainState) -> None:
        """Buffers (pinned on CUDA) for the state as saves will see it: with Adam's moments, which exist only once
        the optimizer really stepped (AMP skips the first steps of most runs)."""
        if self.prepared or self.manager is None or not self.config.async_save or not run.has_optimizer_state():
            return
        self.prepared = True
        self.manager.prepare(checkpoint(run, state) if self.world.is_main else None,
                             shard=run.optimizer_shard() if self.sharded else None)

    def tell(self, write: Callable[[str], None]) -> None:
        """Say how the saves since the last call ended, and whether the mirror failed again."""
        for line in self.report.lines() + self._mirror_lines():
            write(line)

    def _mirror_lines(self) -> list[str]:
        """A line when the mirror failed again since the last one (it retries; training goes on)."""
        mirror = self.manager.mirror if self.manager is not None else None
        if mirror is None or mirror.failures == self._mirror_failures_told:
            return []
        self._mirror_failures_told = mirror.failures
        return [f"mirror {mirror.url}: copying failed ({mirror.failures} attempt(s) so far; last: {mirror.last_error})"
                f"; retrying, training goes on; waiting: {', '.join(mirror.unmirrored) or 'none'}"]

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()

    @property
    def stats(self) -> ckptio.SaveStats:
        return self.manager.stats if self.manager is not None else ckptio.SaveStats()


def mirror_summary(mirror: Any) -> str:
    left = mirror.unmirrored
    text = f"mirror {mirror.url}: {len(mirror.mirrored)} checkpoint(s) copied and verified"
    if mirror.failures:
        text += f", {mirror.failures} failed attempt(s) (last: {mirror.last_error})"
    if left:
        text += f"; not mirrored: {', '.join(left)} (intact in the local directory)"
    return text


def finish_preemption(preemption: Preemption, checkpoints: Checkpoints, global_step: int,
                      say: Callable[[str], None]) -> None:
    """Wait (within ``config.grace`` of the signal) until the last save is durable and mirrored, and say so.

    Past the grace period the process exits at once: the scheduler's SIGKILL is due, and a save cut short leaves
    only a temporary file (the previous checkpoints stay valid)."""
    future, manager, config = checkpoints.latest, checkpoints.manager, checkpoints.config
    if manager is None:  # a process that writes nothing (rank 0 writes the replicated state, and says how it went)
        return
    mirror = manager.mirror if manager is not None else None

    def mirrored(timeout: float) -> bool:
        assert mirror is not None
        return mirror.wait_mirrored(future.result().name, timeout)

    durable, copied, left = wait_durable(future, mirrored if mirror is not None else None, grace=config.grace,
                                         since=preemption.since)
    head = f"stopped by {preemption.stopped_by} at global step {global_step}"
    resume = "continue with --resume auto" + (f" --mirror {mirror.url}" if mirror is not None else "")
    if durable:
        name = future.result().name
        if copied is False:
            assert mirror is not None
            mirror.close(0, finish_attempt=False)  # the grace period is spent: the copy is not waited for
            say(f"{head}: saved {name}, durable here but not mirrored to {mirror.url} within --grace "
                f"{config.grace:g}s; {resume}")
        else:
            say(f"{head}: saved {name}, durable{' and mirrored' if copied else ''} with {max(left, 0):.1f}s of "
                f"--grace {config.grace:g}s left; {resume}")
        return
    if future is None or future.done():  # nothing to save (no step since the last run), or the save failed
        say(f"{head}: no new checkpoint (the save report says why); {resume}")
        return
    say(f"{head}: the checkpoint was not durable within --grace {config.grace:g}s; exiting now (nothing "
        "half-written is left; the previous checkpoint stays valid)")
    sys.stdout.flush()
    os._exit(preemption.exit_code)
