"""One optimizer step through the AMP scaler, shared by the single-file loop (:mod:`craft_train.train`) and the
``--fsdp`` loop (:mod:`craft_train.fsdp`)."""

from __future__ import annotations

import torch

__all__ = ["step_optimizer"]


def step_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> bool:
    """One optimizer step through the AMP scaler; the schedule advances only if the optimizer really stepped.

    With AMP the scaler skips ``optimizer.step()`` when the gradients hold inf/NaN (and halves its scale), as it
    does on the first steps of most runs. Stepping the scheduler anyway would shift the schedule by the number of
    skipped steps and makes PyTorch warn. So the learning rate follows optimizer steps taken, and since the
    scheduler's and scaler's state are both in every checkpoint, a resume reproduces the same schedule.
    """
    # The scaler calls optimizer.step() only when the gradients are finite: a hook sees whether it did, with no
    # host sync of its own (reading the scale before and after the step would add one every step).
    stepped: list[bool] = []
    hook = optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    try:
        scaler.step(optimizer)
    finally:
        hook.remove()
    scaler.update()
    if stepped:
        scheduler.step()
    return bool(stepped)
