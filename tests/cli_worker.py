"""One process of a multi-process ``craft_train`` command line, as ``torchrun`` would start it.

Run as ``python tests/cli_worker.py RANK WORLD RENDEZVOUS_FILE CRAFT_TRAIN_ARGS...``. The processes meet through a
file (no port is ever taken); then the command line runs as under torchrun, and the process ends the way
``python -m craft_train`` does: through ``sys.exit`` and the interpreter's teardown, so that a test sees the exit
code a scheduler would, and an abort at exit too.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from craft_train.cli import main

if __name__ == "__main__":
    rank, world, rendezvous, *argv = sys.argv[1:]
    os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank)
    torch.set_num_threads(1)  # several processes share two cores
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=int(rank), world_size=int(world),
                            timeout=datetime.timedelta(minutes=10))
    sys.exit(main(argv))
