"""The order in which a run visits its data, and how the processes of a distributed run share it.

Everything here is a pure function of the seed, the epoch and the position, so a resumed run (at any number of
processes) visits exactly the samples an uninterrupted one would have, in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .distributed import World

__all__ = ["augmentation_seed", "epoch_permutation", "mix_in", "share"]


def epoch_permutation(seed: int, epoch: int, indices: Sequence[int]) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``indices`` (an int64 tensor of dataset indices)."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(indices))
    return torch.as_tensor(np.asarray(indices, dtype=np.int64)[order])


def mix_in(order: torch.Tensor, *, seed: int, epoch: int, every: int, first: int, count: int) -> torch.Tensor:
    """``order`` with one of the indices ``first .. first + count - 1`` after each ``every`` of its own.

    The indices put in follow a permutation of that range drawn from ``(seed, epoch)`` (cycled when an epoch
    needs more of them than there are), so a mixed epoch is as reproducible as an unmixed one.
    """
    if every < 1 or count < 1:
        raise ValueError(f"need every >= 1 and count >= 1, got {every=}, {count=}")
    groups = math.ceil(len(order) / every)
    picks = np.resize(np.random.default_rng([seed, epoch, 0x313C]).permutation(count), groups) + first
    out = np.empty(len(order) + groups, dtype=np.int64)
    mixed_at = np.arange(groups) * (every + 1) + every  # after each full group ...
    if groups:
        mixed_at[-1] = len(out) - 1  # ... and after the last, maybe shorter, one
    own = np.ones(len(out), dtype=bool)
    own[mixed_at] = False
    out[own] = order.numpy()
    out[mixed_at] = picks
    return torch.from_numpy(out)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, 0xA06]).generate_state(1, dtype=np.uint32)[0])


def share(permutation: list[int], position: int, batch_size: int, world: World) -> list[int]:
    """This process's samples for the rest of the epoch, step by step from ``position``.

    Step ``s`` takes the next ``batch_size x world.size`` samples of the epoch's order and gives process ``r``
    the ``r``-th slice, so the order is the same for any number of processes. A process left without samples
    in a short final step gets one sample from the epoch's start (as DistributedSampler pads).
    """
    if world.size == 1:
        return permutation[position:]
    step = batch_size * world.size
    mine: list[int] = []
    for start in range(position, len(permutation), step):
        part = permutation[start : start + step][world.rank * batch_size : (world.rank + 1) * batch_size]
        mine.extend(part or permutation[world.rank % len(permutation) : world.rank % len(permutation) + 1])
    return mine
