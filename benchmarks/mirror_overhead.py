"""What a mirror costs: the caller's blocking time in ``save()`` with and without one, the time from ``save()`` to
"mirrored and verified", and the mirror's upload throughput against the store's raw ``put`` of the same bytes.

Targets: a local directory (always), and with ``--s3`` an S3-compatible server: the one named by
``AWS_ENDPOINT_URL``, or, when that is unset, moto's server started on 127.0.0.1 for the run (in-memory, so its
throughput is a floor of what the client does, not a store's).

Run ``python benchmarks/mirror_overhead.py [--mb 64] [--saves 6] [--s3] [--out DIR]``; results go to
``DIR/mirror_overhead.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import ckptio
from ckptio.mirror import open_target

__all__ = ["main", "measure"]


def _state(mb: int, seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"weights": torch.randn(mb * 2**20 // 4, generator=generator), "step": seed}


def _compute(seconds: float) -> int:
    """Stand-in training work for ``seconds``: matrix products; returns how many were done."""
    a = torch.randn(256, 256)
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)
        done += 1
    return done


def measure(directory: Path, mirror: str | None, *, mb: int, saves: int, interval: float) -> dict[str, float]:
    """A loop that "trains" for ``interval`` seconds between async saves while the mirror copies in the
    background: the caller's blocking seconds per save (the first, which allocates buffers, left out) and the
    training work done per second. Then, one save at a time, seconds from save() to its copy being verified."""
    blocked, work = [], 0
    loop_started = time.perf_counter()
    with ckptio.CheckpointManager(directory, async_save=True, mirror=mirror) as manager:
        for i in range(saves + 1):
            work += _compute(interval)
            started = time.perf_counter()
            manager.save(_state(mb, i), name=f"checkpoint_epoch_1_batch_{i + 1}")
            blocked.append(time.perf_counter() - started)
        loop_seconds = time.perf_counter() - loop_started
        to_mirrored = []
        if manager.mirror is not None:
            manager.wait()
            assert manager.mirror.wait(timeout=600), manager.mirror.last_error
            for i in range(3):
                started = time.perf_counter()
                future = manager.save(_state(mb, 100 + i), name=f"checkpoint_epoch_2_batch_{i + 1}")
                assert future is not None
                assert manager.mirror.wait_mirrored(future.result().name, timeout=600), manager.mirror.last_error
                to_mirrored.append(time.perf_counter() - started)
    result = {"blocked_median_s": statistics.median(blocked[1:]), "work_per_s": work / loop_seconds}
    if to_mirrored:
        result["to_mirrored_median_s"] = statistics.median(to_mirrored)
    return result


def throughput(url: str, path: Path, repeats: int = 3) -> dict[str, float]:
    """MB/s of the mirror's upload (put, read back, verify, manifest) against a raw put of the same file."""
    from ckptio.mirror import upload

    target = open_target(url)
    size = path.stat().st_size / 1e6
    mirrored, raw = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        upload(target, path)
        mirrored.append(time.perf_counter() - started)
        started = time.perf_counter()
        _raw_put(url, path)
        raw.append(time.perf_counter() - started)
    return {"mirror_MBps": size / statistics.median(mirrored), "raw_put_MBps": size / statistics.median(raw),
            "file_MB": size}


def _raw_put(url: str, path: Path) -> None:
    if url.startswith("s3://"):
        import boto3

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        with open(path, "rb") as data:
            boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/raw-{path.name}", Body=data)
    else:
        destination = Path(url.removeprefix("file://")) / f"raw-{path.name}"
        shutil.copyfile(path, destination)
        with open(destination, "rb") as f:
            os.fsync(f.fileno())


@contextmanager
def _s3_endpoint() -> Iterator[str]:
    """A bucket on ``AWS_ENDPOINT_URL``, or on moto's server started here on 127.0.0.1."""
    process = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}"), ("AWS_ACCESS_KEY_ID", "bench"),
                            ("AWS_SECRET_ACCESS_KEY", "bench"), ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(name, value)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.05)
    import boto3

    bucket = f"ckptio-bench-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}/bench"
    finally:
        if process is not None:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="state size in MB")
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds of stand-in training between saves")
    parser.add_argument("--s3", action="store_true", help="also measure an S3-compatible target")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"mb": args.mb, "saves": args.saves}
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        root = Path(scratch)
        sizes = {"mb": args.mb, "saves": args.saves, "interval": args.interval}
        results["no_mirror"] = measure(root / "plain", None, **sizes)
        results["local_mirror"] = measure(root / "local", str(root / "backup"), **sizes)
        sample = next((root / "local").glob("*.pth"))
        (root / "tput").mkdir()
        results["local_throughput"] = throughput(str(root / "tput"), sample)
        if args.s3:
            with _s3_endpoint() as url:
                results["s3_mirror"] = measure(root / "s3", url, **sizes)
                results["s3_throughput"] = throughput(url, sample)
    (out / "mirror_overhead.json").write_text(json.dumps(results, indent=2))
    base = results["no_mirror"]
    for name in ("no_mirror", "local_mirror", "s3_mirror"):
        if name in results:
            row = results[name]
            print(f"{name:13s} blocked median {row['blocked_median_s'] * 1e3:7.1f} ms "
                  f"({row['blocked_median_s'] / base['blocked_median_s']:.2f}x), training work "
                  f"{row['work_per_s'] / base['work_per_s']:.2f}x"
                  + (f", save() to mirrored {row['to_mirrored_median_s']:.2f} s" if "to_mirrored_median_s" in row
                     else ""))
    for name in ("local_throughput", "s3_throughput"):
        if name in results:
            row = results[name]
            print(f"{name:17s} mirror {row['mirror_MBps']:.0f} MB/s (put + read back + verify) vs raw put "
                  f"{row['raw_put_MBps']:.0f} MB/s, {row['file_MB']:.0f} MB file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
