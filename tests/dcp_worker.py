"""One rank of the multi-process DCP tests (and the DCP benchmark): FSDP2 over a small model on CPU, gloo.

Run as ``python tests/dcp_worker.py ACTION RANK WORLD RENDEZVOUS_FILE DIR``; ranks meet through a file, so no
port is ever taken. Actions:

* ``save``: train 2 Adam steps at this world size, ``dcp.save`` through ``ckptio.dcp.Writer`` into ``DIR/ckpt``;
  rank 0 also writes the full (unsharded) state to ``DIR/expected.pt`` for the loaders to compare with.
* ``load``: build the model from a different seed, ``dcp.load`` ``DIR/ckpt`` through ``ckptio.dcp.Reader`` at this
  world size, and compare the full state with ``DIR/expected.pt`` bit for bit (exit 3 on a difference).
* ``load DIR CHECKPOINT EXPECTED``: the same, from ``DIR/CHECKPOINT`` against ``DIR/EXPECTED``.
* ``manage``: two saves through ``ShardedCheckpointManager(DIR/managed, keep_count=1)``, the first with the writer
  process, the second with the writer thread and rank 0's deletes slowed; every rank checks that only the second
  is left and that it is the latest (exit 4 otherwise); rank 0 writes its full state to ``DIR/expected-managed.pt``.
* ``crash``: save ``DIR/crashed``, and rank 1 kills itself with SIGKILL half way through writing its data file.
"""

from __future__ import annotations

import datetime
import itertools
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptio.dcp

# Row counts 7, 5 and 3 shard unevenly over 2 and 3 processes (FSDP2 splits dim 0).
SIZES = (11, 7, 5, 3)


def build(seed: int, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(SIZES):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    model = nn.Sequential(*layers)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        inputs = torch.randn(4, SIZES[0], generator=generator)
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": model_sd, "optim": optim_sd}


def bits_equal(actual: Any, expected: Any, where: str = "") -> list[str]:
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or actual.dtype != expected.dtype or actual.shape != expected.shape:
            return [f"{where}: {actual!r} is not like {expected!r}"]
        a = actual.detach().contiguous().reshape(-1).view(torch.uint8)
        e = expected.detach().contiguous().reshape(-1).view(torch.uint8)
        return [] if torch.equal(a, e) else [f"{where}: tensor bytes differ"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return [f"{where}: keys differ"]
        return [d for key in expected for d in bits_equal(actual[key], expected[key], f"{where}/{key}")]
    if isinstance(expected, (list, tuple)):
        if len(actual) != len(expected):
            return [f"{where}: lengths differ"]
        pairs = enumerate(zip(actual, expected, strict=True))
        return [d for i, (a, e) in pairs for d in bits_equal(a, e, f"{where}/{i}")]
    return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]


class _DyingWriter(ckptio.dcp.Writer):
    """Rank 1 dies by SIGKILL with its data file half written: nothing after that point runs."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        if dist.get_rank() == 1:
            staging = Path(plan.storage_data.staging)
            with open(staging / f"{plan.storage_data.prefix}0.distcp", "wb") as half:
                half.write(b"\0" * 100)
                half.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write_data(plan, planner)


def main() -> int:
    action, rank, world, rendezvous, directory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
        Path(sys.argv[5])
    source, expected_name = (sys.argv[6], sys.argv[7]) if len(sys.argv) > 7 else ("ckpt", "expected.pt")
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        if action in ("save", "crash"):
            model, optimizer = build(seed=0, world=world)
            train(model, optimizer, rank)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd, "step": 2}
            if action == "save":
                dcp.save(state, storage_writer=ckptio.dcp.Writer(directory / "ckpt"))
                expected = full_state(model, optimizer)
                if rank == 0:
                    torch.save(expected, directory / "expected.pt")
            else:
                dcp.save(state, storage_writer=_DyingWriter(directory / "crashed"))
            dist.barrier()  # a rank that leaves while another still talks to it aborts in gloo
            return 0
        if action == "load":
            model, optimizer = build(seed=1, world=world)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd, "step": 0}
            dcp.load(state, storage_reader=ckptio.dcp.Reader(directory / source))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            actual = full_state(model, optimizer)
            if rank == 0:
                expected = torch.load(directory / expected_name, weights_only=True)
                differences = bits_equal(actual, expected) + ([] if state["step"] == 2 else ["step"])
                if differences:
                    print("\n".join(differences[:20]), file=sys.stderr)
                    return 3
                print(f"loaded bit for bit at {world} process(es)")
            dist.barrier()
            return 0
        if action == "manage":
            from ckptio import dcp_manager
            from ckptio.dcp_manager import ShardedCheckpointManager

            model, optimizer = build(seed=0, world=world)
            for batch, writer in ((1, "process"), (2, "thread")):
                with ShardedCheckpointManager(directory / "managed", keep_count=1, writer=writer) as manager:
                    if rank == 0 and writer == "thread":  # a slow delete: rank 1 must still see only what is left
                        slow_delete = dcp_manager.delete_dcp_directory

                        def delete_slowly(path: Path, slow_delete: Any = slow_delete) -> None:
                            time.sleep(3)
                            slow_delete(path)

                        dcp_manager.delete_dcp_directory = delete_slowly
                    train(model, optimizer, rank)
                    model_sd, optim_sd = get_state_dict(model, optimizer)
                    manager.save({"model": model_sd, "optim": optim_sd, "step": batch},
                                 name=f"checkpoint_epoch_1_batch_{batch}")
                    manager.wait()
                    names = [path.name for path in manager.checkpoints()]
                    latest = manager.latest()
            expected = full_state(model, optimizer)
            if rank == 0:
                torch.save(expected, directory / "expected-managed.pt")
            if names != ["checkpoint_epoch_1_batch_2"] or latest is None or latest.name != names[0]:
                print(f"rank {rank}: {names}, latest {latest}", file=sys.stderr)
                return 4
            print(f"managed: {names}")
            dist.barrier()
            return 0
        raise SystemExit(f"unknown action {action!r}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
