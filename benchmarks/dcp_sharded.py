"""Sharded (FSDP2) checkpoints through torch.distributed.checkpoint: torch's FileSystemWriter against ckptio.dcp.

One FSDP2 state (an MLP of 1024x1024 layers and its Adam moments, CPU, gloo) is saved by N processes with:

* ``dcp.save`` + ``FileSystemWriter`` (synchronous: blocking time = durable time);
* ``dcp.async_save`` with its defaults (a blocking copy to fresh host memory, then a thread);
* ``dcp.async_save`` in its best mode (writer process, shared-memory ``DefaultStager`` cached across saves,
  plan caching): its blocking time is until ``staging_completion``, as torchtitan waits for it;
* ``dcp.save`` + ``ckptio.dcp.Writer``, and ``dcp.async_save`` + ``ckptio.dcp.Writer(cache_staged_state_dict=True)``;
* ``ckptio.dcp_manager.ShardedCheckpointManager`` (retention on): its staging slot and writer thread, and with
  ``writer="process"`` its writer process fed through one shared segment (whose memory is not counted).

For each: blocking time, time until durable (committed), and the growth of the training process's resident
memory during the save (the host copies; a writer process's memory is not counted). Then the checkpoints saved
at 2 processes are loaded at 1 and 2 processes with ``FileSystemReader`` and ``ckptio.dcp.Reader`` (digests
checked). Times are the slowest rank's, medians over ``--reps``; files come from the page cache (the machine is
shared: its cache is not dropped).

    python benchmarks/dcp_sharded.py                      # 2 processes, 96 MB state, 3 reps (~2-4 min on 2 cores)
    python benchmarks/dcp_sharded.py --worlds 1 2 4       # the scaling table
    python benchmarks/dcp_sharded.py --state-mb 12 --reps 1 --no-best   # a smoke run

Results go to ``--out`` (``bench_out/dcp_sharded`` by default): ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAVE_MODES = ["FileSystemWriter dcp.save", "FileSystemWriter dcp.async_save", "dcp best (process, shm stager)",
              "ckptio Writer dcp.save", "ckptio Writer dcp.async_save", "ckptio ShardedCheckpointManager",
              "ckptio ShardedCheckpointManager (process)"]
LOAD_MODES = ["FileSystemReader", "ckptio Reader (digests)"]
WIDTH = 1024


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2], help="process counts that save (default 2)")
    parser.add_argument("--state-mb", type=float, default=96.0, help="parameters + Adam moments, MB (default 96)")
    parser.add_argument("--reps", type=int, default=3, help="saves per method (default 3)")
    parser.add_argument("--no-best", action="store_true", help="leave out DCP's best mode (it spawns a process)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "dcp_sharded")
    # a rank of a run (set by the launcher)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--action", choices=["save", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.state_mb <= 0 or any(w < 1 for w in args.worlds):
        parser.error("--reps, --state-mb and --worlds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.rank is not None:
        return _rank_main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dcp_sharded_", dir=args.out))
    doc: dict[str, Any] = {"state_mb": args.state_mb, "reps": args.reps, "saves": {}, "loads": {},
                           "machine": {"logical_cores": os.cpu_count(), "python": sys.version.split()[0]}}
    try:
        for world in args.worlds:
            work = scratch / f"save{world}"
            work.mkdir()
            doc["saves"][world] = _launch(args, "save", world, work)
            if world == 2 or len(args.worlds) == 1:
                for loaders in (1, 2):
                    doc["loads"][f"saved by {world}, loaded by {loaders}"] = _launch(args, "load", loaders, work)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=2))
    table = _table(doc)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


def _launch(args: argparse.Namespace, action: str, world: int, work: Path) -> dict[str, Any]:
    rendezvous = work / f"rendezvous-{action}-{world}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--action", action, "--world", str(world), "--workdir", str(work),
               "--state-mb", str(args.state_mb), "--reps", str(args.reps)] + (["--no-best"] if args.no_best else [])
    ranks = [subprocess.Popen([*command, "--rank", str(rank), "--out", str(rendezvous)], env=env)
             for rank in range(world)]
    try:
        codes = [rank.wait(timeout=1800) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    if any(codes):
        raise SystemExit(f"a rank of the {action} run at {world} process(es) failed: exit codes {codes}")
    return json.loads((work / f"{action}-{world}.json").read_text())


# -- one rank -------------------------------------------------------------------------------------------------


def _rank_main(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{args.out}", rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=1800))
    try:
        result = _saves(args) if args.action == "save" else _loads(args)
        if args.rank == 0:
            (args.workdir / f"{args.action}-{args.world}.json").write_text(json.dumps(result, indent=2))
        dist.barrier()
    finally:
        if args.action == "save" and not args.no_best:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from save_latency import stop_dcp_writer_process

            stop_dcp_writer_process()
        dist.destroy_process_group()
    return 0


def _model(state_mb: float, world: int) -> tuple[Any, Any]:
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = max(1, round(state_mb * 1e6 / (3 * 4 * WIDTH * (WIDTH + 1))))  # weights + bias, and 2 Adam moments
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, optimizer


def _state(args: argparse.Namespace, *, train: bool) -> tuple[dict[str, Any], Any, Any]:
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _model(args.state_mb, args.world)
    if train:
        model(torch.randn(8, WIDTH)).square().mean().backward()
        optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}, model, optimizer


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _saves(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import ckptio.dcp

    state, _, _ = _state(args, train=True)
    modes = [m for m in SAVE_MODES if not (args.no_best and m.startswith("dcp best"))]
    best: dict[str, Any] = {}
    if "dcp best (process, shm stager)" in modes:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        best = {"async_checkpointer_type": AsyncCheckpointerType.PROCESS,
                "async_stager": DefaultStager(StagingOptions(False, True, True, False)),
                "planner": dcp.DefaultSavePlanner(enable_plan_caching=True)}
    from ckptio.dcp_manager import ShardedCheckpointManager

    ckptio_writer = ckptio.dcp.Writer(args.workdir / "unused", cache_staged_state_dict=True)
    managers = {"ckptio ShardedCheckpointManager": ShardedCheckpointManager(args.workdir / "managed", keep_count=2),
                "ckptio ShardedCheckpointManager (process)": ShardedCheckpointManager(
                    args.workdir / "managed-process", keep_count=2, writer="process")}
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    # One uncounted warm-up round (writer process start, plan caches, first allocations), then --reps rounds;
    # methods alternate within each round so that a slow phase of the machine is shared.
    for rep in range(args.reps + 1):
        for mode in modes:
            target = args.workdir / f"{mode.split()[0]}_{rep}_{modes.index(mode)}"
            dist.barrier()
            rss = _rss()
            started = time.perf_counter()
            if mode == "FileSystemWriter dcp.save":
                dcp.save(state, storage_writer=dcp.FileSystemWriter(target))
                blocking = time.perf_counter() - started
                grown = _rss() - rss
            elif mode == "ckptio Writer dcp.save":
                dcp.save(state, storage_writer=ckptio.dcp.Writer(target))
                blocking = time.perf_counter() - started
                grown = _rss() - rss
            elif mode in managers:
                manager = managers[mode]
                manager.save(state, name=f"checkpoint_epoch_1_batch_{rep}")
                blocking = time.perf_counter() - started
                grown = _rss() - rss
                manager.wait()
            else:
                if mode == "FileSystemWriter dcp.async_save":
                    response = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(target))
                elif mode == "ckptio Writer dcp.async_save":
                    ckptio_writer.reset(target)
                    response = dcp.async_save(state, storage_writer=ckptio_writer)
                else:
                    response = dcp.async_save(state, checkpoint_id=str(target),
                                              storage_writer=dcp.FileSystemWriter(target), **best)
                staging = getattr(response, "staging_completion", None)
                if staging is not None:
                    staging.result()
                blocking = time.perf_counter() - started
                grown = _rss() - rss
                getattr(response, "upload_completion", response).result()
            durable = time.perf_counter() - started
            sample = {"blocking_s": _slowest(blocking), "durable_s": _slowest(durable),
                      "rss_growth_mb": _slowest(grown / 1e6)}
            if rep > 0:
                samples[mode].append(sample)
            dist.barrier()
            keep = rep == args.reps and mode in ("FileSystemWriter dcp.save", "ckptio Writer dcp.save")
            if args.rank == 0 and not keep:
                shutil.rmtree(target, ignore_errors=True)
            elif args.rank == 0:  # what the load runs read
                final = args.workdir / ("plain" if mode.startswith("FileSystemWriter") else "ckptio")
                target.rename(final)
    if best:
        best["async_stager"].close()
    ckptio_writer.close()
    for manager in managers.values():
        manager.close()
    size = sum(f.stat().st_size for f in (args.workdir / "ckptio").iterdir()) if args.rank == 0 else 0
    return {"world": args.world, "checkpoint_bytes": size, "results": {
        mode: {key: statistics.median(s[key] for s in rows) for key in rows[0]} for mode, rows in samples.items()}}


def _loads(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import ckptio.dcp

    state, _, _ = _state(args, train=False)
    samples: dict[str, list[float]] = {m: [] for m in LOAD_MODES}
    for rep in range(args.reps + 1):
        for mode in LOAD_MODES:
            dist.barrier()
            started = time.perf_counter()
            if mode == "FileSystemReader":
                dcp.load(state, storage_reader=dcp.FileSystemReader(args.workdir / "plain"))
            else:
                dcp.load(state, storage_reader=ckptio.dcp.Reader(args.workdir / "ckptio"))
            seconds = _slowest(time.perf_counter() - started)
            if rep > 0:
                samples[mode].append(seconds)
    return {"world": args.world, "results": {mode: {"load_s": statistics.median(rows)}
                                             for mode, rows in samples.items()}}


# -- report ---------------------------------------------------------------------------------------------------


def _table(doc: dict[str, Any]) -> str:
    lines = [f"State: {doc['state_mb']:g} MB (FSDP2 MLP + Adam, CPU, gloo), median of {doc['reps']} rep(s), "
             f"slowest rank; {doc['machine']['logical_cores']} logical cores.", "",
             "| processes | method | blocking ms | durable ms | RSS growth MB |", "|---|---|---|---|---|"]
    for world, run in doc["saves"].items():
        for mode, row in run["results"].items():
            lines.append(f"| {world} | {mode} | {row['blocking_s'] * 1e3:.0f} | {row['durable_s'] * 1e3:.0f} | "
                         f"{row['rss_growth_mb']:.0f} |")
    lines += ["", "| load | reader | ms |", "|---|---|---|"]
    for label, run in doc["loads"].items():
        for mode, row in run["results"].items():
            lines.append(f"| {label} | {mode} | {row['load_s'] * 1e3:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
