"""One process of the ``craft_train --fsdp`` tests: CRAFT at 64 px on 8 synthetic images, FSDP2 on CPU, gloo.

Run as ``python tests/fsdp_worker.py RANK WORLD RENDEZVOUS_FILE SAVE_DIR MAX_STEPS OUT [zero|amp]``; with ``zero``
the run uses ``--zero`` (file checkpoints, ZeroRedundancyOptimizer) instead of ``--fsdp``; with ``amp`` the
``--fsdp`` run takes its CUDA path of AMP on the CPU (fp16 autocast and the sharded gradient scaler). The processes meet
through a file (no port is ever taken), then train with ``--resume auto --max-steps MAX_STEPS`` as
``craft_train.train`` does under torchrun. Afterwards rank 0 writes the model's and optimizer's full (unsharded)
state, gathered from every process, to ``OUT``, and whether every process holds the same BatchNorm statistics.
A resume given the step it resumes at trains no step, so ``OUT`` then holds the state exactly as loaded.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from craft_train import distributed, fsdp
from craft_train.config import TrainConfig
from craft_train.train import train


def config(save_dir: str, max_steps: int, zero: bool) -> TrainConfig:
    return TrainConfig(fsdp=not zero, zero=zero, synthetic_size=8, image_size=64, batch_size=1, epochs=3,
                       save_freq=1, workers=0, val_fraction=0.25, val_hmean=False, save_dir=save_dir,
                       resume="auto", max_steps=max_steps, device="cpu")


def main() -> int:
    rank, world, rendezvous, save_dir, max_steps, out = sys.argv[1:7]
    zero, amp = sys.argv[7:] == ["zero"], sys.argv[7:] == ["amp"]
    os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank)
    torch.set_num_threads(1)  # several processes share two cores
    if int(world) > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=int(rank), world_size=int(world),
                                timeout=datetime.timedelta(minutes=10))
        # Keep the group past train(), which closes it when it returns, to gather the full state afterwards.
        distributed.World.close = lambda self: None  # type: ignore[method-assign]
    warnings.simplefilter("ignore")
    if amp:
        fsdp.amp_enabled = lambda config, device: True  # type: ignore[assignment]
    result = train(config(save_dir, int(max_steps), zero), given=None)
    assert result.model is not None and result.optimizer is not None
    if zero:  # the whole Adam state, numbered as model.parameters()
        model_state = result.model.state_dict()
        if hasattr(result.optimizer, "consolidate_state_dict"):
            result.optimizer.consolidate_state_dict(to=0)
        optimizer_state = result.optimizer.state_dict() if int(rank) == 0 else {}
    else:
        model_state, optimizer_state = get_state_dict(
            result.model, result.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Every process must hold the same BatchNorm statistics (rank 0's): otherwise which copy a checkpoint
    # stores would depend on which rank DCP lets write it.
    buffers = torch.cat([b.detach().float().reshape(-1) for b in result.model.buffers()])
    gathered = [torch.empty_like(buffers) for _ in range(int(world))]
    if dist.is_initialized():
        dist.all_gather(gathered, buffers)
    else:
        gathered = [buffers]
    if int(rank) == 0:
        torch.save({"model": model_state, "optim": optimizer_state, "global_step": result.global_step,
                    "buffers_agree": all(torch.equal(g, buffers) for g in gathered)}, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # The work is judged by what it wrote. Once it is done, leave without the interpreter's teardown: there, a
    # gloo thread still joinable at exit can abort the process ("terminate called without an active exception"),
    # seen once in a 3-process run after every result was written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
