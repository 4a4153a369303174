"""What only a GPU can show: side-stream snapshot ordering, pinned buffers, AMP scaler state, deterministic resume.

Marked ``cuda`` and skipped without a CUDA device (CI has none): run ``pytest -m cuda tests/test_cuda.py`` on a GPU
machine. The CPU side of the same properties is tested elsewhere (``tests/test_deterministic.py`` runs the
4 + resume + 4 == 8 check on the CPU).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptio
from craft_train.config import TrainConfig
from craft_train.train import TrainResult, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CHECKOUT = Path(__file__).resolve().parent.parent
WRITERS = ["thread", "process"] if "writer" in {f.name for f in dataclasses.fields(ckptio.CheckpointOptions)} \
    else [None]


def _manager(directory: Path, writer: str | None, **options: object) -> ckptio.CheckpointManager:
    return ckptio.CheckpointManager(directory, async_save=True, **({"writer": writer} if writer else {}),
                                    **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("writer", WRITERS)
def test_kernels_queued_before_save_are_in_the_file_and_those_queued_after_are_not(
        tmp_path: Path, fmt: str, writer: str | None) -> None:
    x = torch.zeros(1 << 24, device="cuda")  # 64 MB: each add is a real kernel, the chain takes a while
    with _manager(tmp_path, writer, format=fmt) as manager:
        for trial in range(3):
            x.zero_()
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)  # the stream is still busy when save() is called
            for _ in range(50):
                x.add_(1.0)
            future = manager.save({"x": x, "trial": trial}, name=f"order_{trial}")
            for _ in range(50):
                x.add_(1.0)
            saved = future.result()
            assert saved is not None
            in_file = ckptio.load(saved.path)["x"]
            assert torch.all(in_file == 50), f"trial {trial}: the file holds {in_file.min()}..{in_file.max()}"
            assert torch.all(x == 100)


@pytest.mark.parametrize("writer", WRITERS)
def test_pinned_host_buffers_are_allocated_once_and_reused_by_later_saves(tmp_path: Path, writer: str | None) -> None:
    if not hasattr(torch.cuda, "host_memory_stats"):
        pytest.skip("this torch has no torch.cuda.host_memory_stats")
    state = {"w": torch.randn(1 << 20, device="cuda"), "b": torch.randn(7, device="cuda")}
    with _manager(tmp_path, writer, keep_count=2) as manager:
        if hasattr(manager, "prepare"):
            manager.prepare(state)
        for i in range(4):  # every slot used at least once: buffers exist (pinned, or shared and registered)
            manager.save(state, name=f"warm_{i}")
            manager.wait()
        requests = torch.cuda.host_memory_stats().get("allocations.allocated", 0)
        for i in range(6):
            state["w"].add_(1.0)
            manager.save(state, name=f"steady_{i}")
            manager.wait()
        assert torch.cuda.host_memory_stats().get("allocations.allocated", 0) == requests, \
            "a steady-state save asked the pinned allocator for memory"
        last = ckptio.load(manager.path_for("steady_5"))
        assert torch.equal(last["w"], state["w"].cpu())


def test_the_amp_scaler_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 1).cuda()
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=2)  # small: no overflow but step 1's
    for step in range(7):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(4, 8, device="cuda")).float().sum() * (float("inf") if step == 1 else 1.0)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    with _manager(tmp_path, WRITERS[0], format="torch") as manager:
        manager.save({"scaler": scaler.state_dict()}, name="scaler").result()
    restored = torch.amp.GradScaler("cuda")
    restored.load_state_dict(ckptio.load(manager.path_for("scaler"))["scaler"])
    assert restored.state_dict() == scaler.state_dict()
    assert restored.get_scale() == scaler.get_scale() == 2.0**11  # halved by the inf step, doubled twice since


@pytest.mark.parametrize("writer", WRITERS)
def test_conjugate_and_negative_views_on_the_device_are_saved_resolved(tmp_path: Path, writer: str | None) -> None:
    values = torch.randn(1 << 20, dtype=torch.complex64, device="cuda")
    state = {"conj": values.conj(), "neg": torch._neg_view(values)}
    expected = {k: v.resolve_conj().resolve_neg().cpu() for k, v in state.items()}
    with _manager(tmp_path, writer, format="torch") as manager:
        for i in range(3):
            torch.cuda._sleep(20_000_000)  # the copy is still queued when save() returns
            manager.save(state, name=f"views_{i}")
        manager.wait()
    for i in range(3):
        loaded = ckptio.load(manager.path_for(f"views_{i}"))
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def _quiet(_: str) -> None:
    pass


@pytest.mark.slow
def test_a_checkpoint_written_on_the_cpu_resumes_on_cuda_with_amp(tmp_path: Path) -> None:
    base = dict(synthetic_size=8, image_size=64, batch_size=2, epochs=2, val_fraction=0.0, seed=5, workers=0)
    first = train(TrainConfig(**base, device="cpu", save_dir=str(tmp_path), save_freq=2, max_steps=2), say=_quiet)
    messages: list[str] = []
    resumed = train(TrainConfig(**base, device="cuda", amp=True, save_dir=str(tmp_path), save_freq=2, max_steps=4,
                                resume=str(first.saved_paths[-1])), say=messages.append)
    assert resumed.start_step == 2 and resumed.global_step == 4
    assert any("starts fresh" in m for m in messages), messages
    assert ckptio.load(resumed.saved_paths[-1])["scaler_state_dict"]["scale"] > 0


def _assert_bit_identical(a: TrainResult, b: TrainResult) -> None:
    assert a.model is not None and b.model is not None
    mine, theirs = a.model.state_dict(), b.model.state_dict()
    different = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not different, f"{len(different)} of {len(mine)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_deterministic_ten_steps_resume_ten_steps_equals_twenty_bit_for_bit_on_cuda(tmp_path: Path) -> None:
    base = dict(synthetic_size=24, image_size=256, batch_size=4, epochs=10, val_fraction=0.0, seed=5, workers=2,
                device="cuda", deterministic=True)
    straight = train(TrainConfig(**base, save_dir=str(tmp_path / "straight"), save_freq=0, max_steps=20), say=_quiet)
    first = train(TrainConfig(**base, save_dir=str(tmp_path / "split"), save_freq=100, max_steps=10), say=_quiet)
    resumed = train(TrainConfig(**base, save_dir=str(tmp_path / "split"), save_freq=100, max_steps=20,
                                resume=str(first.saved_paths[-1])), say=_quiet)
    assert resumed.global_step == 20
    _assert_bit_identical(straight, resumed)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_with_nccl_on_two_gpus_saves_once_per_checkpoint(tmp_path: Path) -> None:
    if shutil.which("torchrun") is None and not hasattr(torch.distributed, "run"):
        pytest.skip("torchrun is not available")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "craft_train", "--device", "cuda", "--synthetic-size", "32", "--image-size", "128",
               "--batch-size", "2", "--workers", "0", "--val-fraction", "0", "--save-freq", "2", "--max-steps", "4",
               "--keep-count", "2", "--save-dir", str(tmp_path)]
    # The checkout, for machines where the project is not installed (the GPU image).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, output
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    report = subprocess.run([sys.executable, "-m", "ckptio", "verify", str(tmp_path)], capture_output=True,
                            text=True, timeout=120, env=env)
    assert report.returncode == 0, report.stdout + report.stderr
