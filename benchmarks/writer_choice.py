"""Which background writer, at which priority, costs training least: the measurement behind the defaults.

A CPU training loop (an MLP whose step syncs with ``loss.item()``, as CRAFT's does) runs segments of steps with a
save every ``--every`` steps, one configuration after another in shuffled order, several rounds; each
configuration's step time is compared with the no-save segments of the same rounds, so that load from other
processes affects all configurations alike. The state padded to ``--state-mb`` in ``--tensors`` tensors
(CRAFT + Adam: 249 MB in 436 tensors).

    python benchmarks/writer_choice.py --state-mb 100 --rounds 3

Two smaller measurements, thread and process writer alternating in one run:

    python benchmarks/writer_choice.py --stalls torch   # main-thread stalls > 2 ms while one save is written
    python benchmarks/writer_choice.py --first-save     # blocking time of the first saves, with/without prepare()
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import ckptio
import ckptio.writer_process

# name, writer, nice, I/O class (None: inherit; (2, 7): lowest best-effort; (3, 0): idle)
CONFIGS: list[tuple[str, str | None, int, tuple[int, int] | None]] = [
    ("no saves", None, 0, None),
    ("thread writer", "thread", 0, None),
    ("process writer", "process", 0, None),
    ("process, nice 10", "process", 10, None),
    ("process, nice 19", "process", 19, (2, 7)),
    ("process, nice 19, I/O idle", "process", 19, (3, 0)),
]


def build(state_mb: int, tensors: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU()) for _ in range(4)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    per = max(1, state_mb * 2**20 // 4 // tensors)
    padding = {f"buffer{i}": torch.rand(per) for i in range(tensors)}
    return model, optimizer, padding


def segment(model: torch.nn.Module, optimizer: torch.optim.Optimizer, padding: dict[str, torch.Tensor],
            mgr: ckptio.CheckpointManager | None, steps: int, every: int, first: int,
            durable: list[float]) -> tuple[list[float], float]:
    times = []
    blocked = 0.0
    x = torch.randn(64, 512)
    for step in range(first, first + steps):
        started = time.perf_counter()
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        if mgr is not None and step % every == 0:
            state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "pad": padding}
            before = time.perf_counter()
            future = mgr.save(state, name=f"checkpoint_epoch_1_batch_{step}")
            returned = time.perf_counter()
            blocked += returned - before
            if future is not None:  # time to durable: from save()'s return to the commit (all writes fsync)
                future.add_done_callback(lambda _, t=returned: durable.append(time.perf_counter() - t))
        times.append(time.perf_counter() - started)
    return times, blocked


def stalls(fmt: str, state_mb: int, tensors: int, repeats: int = 6) -> None:
    """How long the main thread, spinning in Python, is held up (gaps > 2 ms) while one save is written."""
    state = {"model": {f"t{i}": torch.rand(state_mb * 2**20 // 4 // tensors) for i in range(tensors)}}
    rows: dict[str, list[tuple[float, float]]] = {"thread": [], "process": []}
    with tempfile.TemporaryDirectory(prefix="writer_choice.") as scratch:
        managers = {w: ckptio.CheckpointManager(Path(scratch) / w, writer=w, format=fmt, keep_count=1) for w in rows}
        try:
            for mgr in managers.values():
                mgr.save(state, name="checkpoint_epoch_0_batch_0").result()  # type: ignore[union-attr]
            for i in range(1, repeats + 1):
                for writer, mgr in managers.items():
                    future = mgr.save(state, name=f"checkpoint_epoch_1_batch_{i}")
                    held = 0.0
                    started = last = time.perf_counter()
                    while not future.done():  # type: ignore[union-attr]
                        now = time.perf_counter()
                        if now - last > 0.002:
                            held += now - last
                        last = now
                    rows[writer].append((time.perf_counter() - started, held))
                    time.sleep(0.2)
        finally:
            for mgr in managers.values():
                mgr.close()
    for writer, r in rows.items():
        print(f"{fmt}, {writer} writer: save {statistics.median(x[0] for x in r) * 1000:.0f} ms, main thread held up "
              f"{statistics.median(x[1] for x in r) * 1000:.0f} ms (median of {repeats})")


def first_saves(state_mb: int, tensors: int, repeats: int = 4) -> None:
    """save() blocking time of a fresh manager's first saves, without prepare() and after it completed."""
    state = {"model": {f"t{i}": torch.rand(state_mb * 2**20 // 4 // tensors) for i in range(tensors)}}
    with tempfile.TemporaryDirectory(prefix="writer_choice.") as scratch:
        for writer in ("thread", "process"):
            rows: dict[str, list[tuple[float, float]]] = {"no prepare": [], "prepared": []}
            for i in range(repeats):
                for mode, r in rows.items():
                    with ckptio.CheckpointManager(Path(scratch) / f"{writer}{mode}{i}", writer=writer,
                                                  fsync=False) as mgr:
                        if mode == "prepared":
                            mgr.prepare(state)
                            mgr._stager.wait_idle(600)  # type: ignore[union-attr]
                        started = time.perf_counter()
                        mgr.save(state, name="a")
                        first = time.perf_counter() - started
                        started = time.perf_counter()
                        mgr.save(state, name="b")
                        r.append((first, time.perf_counter() - started))
            for mode, r in rows.items():
                print(f"{writer} writer, {mode}: first save {statistics.median(x[0] for x in r) * 1000:.0f} ms, "
                      f"second {statistics.median(x[1] for x in r) * 1000:.0f} ms (median of {repeats})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=int, default=100)
    parser.add_argument("--tensors", type=int, default=436)
    parser.add_argument("--steps", type=int, default=40, help="steps per segment")
    parser.add_argument("--every", type=int, default=10, help="a save every N steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--only", nargs="+", metavar="N", type=int,
                        help="run only these configurations (0-based, in the table's order; 0 always runs)")
    parser.add_argument("--stalls", choices=("torch", "safetensors"), help="measure main-thread stalls instead")
    parser.add_argument("--first-save", action="store_true", help="measure the first saves' blocking instead")
    args = parser.parse_args(argv)
    if args.stalls:
        stalls(args.stalls, args.state_mb, args.tensors)
        return 0
    if args.first_save:
        first_saves(args.state_mb, args.tensors)
        return 0
    configs = [c for i, c in enumerate(CONFIGS) if args.only is None or i == 0 or i in args.only]
    model, optimizer, padding = build(args.state_mb, args.tensors)
    segment(model, optimizer, padding, None, 5, args.every, 1, [])  # warm-up: Adam state, allocator
    results: dict[str, dict[str, list[float]]] = {name: {"steps": [], "blocked": [], "ratio": [], "durable": []}
                                                  for name, *_ in CONFIGS}
    step = 1000
    with tempfile.TemporaryDirectory(prefix="writer_choice.") as scratch:
        managers: dict[str, ckptio.CheckpointManager | None] = {}
        for name, writer, nice, io_class in configs:
            if writer is None:
                managers[name] = None
                continue
            ckptio.writer_process.NICE, ckptio.writer_process.IO_CLASS = nice, io_class
            mgr = ckptio.CheckpointManager(Path(scratch) / name.replace(" ", "_").replace(",", ""), writer=writer,
                                           keep_count=2, drop_page_cache=True)
            mgr.save({"x": torch.ones(1)}, name="checkpoint_epoch_0_batch_0")
            mgr.wait()  # started and warm: start-up is not what this measures
            managers[name] = mgr
        try:
            for round_number in range(args.rounds):
                order = list(configs)
                random.Random(round_number).shuffle(order)
                baseline = None
                medians = {}
                for name, *_ in order:
                    mgr = managers[name]
                    times, blocked = segment(model, optimizer, padding, mgr, args.steps, args.every, step,
                                             results[name]["durable"])
                    step += args.steps
                    if mgr is not None:
                        mgr.wait()
                    time.sleep(0.3)
                    medians[name] = statistics.mean(times)
                    results[name]["steps"].append(statistics.mean(times))
                    results[name]["blocked"].append(blocked / max(1, args.steps // args.every))
                    if name == "no saves":
                        baseline = medians[name]
                for name in medians:
                    results[name]["ratio"].append(medians[name] / baseline)  # type: ignore[operator]
                print(f"round {round_number + 1}: " + ", ".join(
                    f"{n} {medians[n] * 1000:.1f} ms" for n, *_ in configs), file=sys.stderr)
        finally:
            for mgr in managers.values():
                if mgr is not None:
                    mgr.close()
    print(f"state {args.state_mb} MB in {args.tensors} tensors, a save every {args.every} steps, "
          f"{args.rounds} rounds x {args.steps} steps; torch threads {torch.get_num_threads()}")
    print("| configuration | mean step | vs no saves (median of rounds) | save() blocked | time to durable |")
    print("|---|---|---|---|---|")
    for name, *_ in configs:
        r = results[name]
        durable = f"{statistics.median(r['durable']) * 1000:.0f} ms" if r["durable"] else "-"
        print(f"| {name} | {statistics.mean(r['steps']) * 1000:.1f} ms | "
              f"{(statistics.median(r['ratio']) - 1) * 100:+.1f}% | {statistics.mean(r['blocked']) * 1000:.1f} ms | "
              f"{durable} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
