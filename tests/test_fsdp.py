"""craft_train --fsdp: CRAFT sharded with FSDP2 (CPU, gloo), checkpointed as DCP directories that resume at any
process count, with the model, the optimizer and the BatchNorm statistics exactly as saved.

The multi-process runs start real processes through ``tests/fsdp_worker.py`` (file rendezvous) and, for the
command line, ``torchrun --standalone``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from fsdp_worker import config as worker_config
from helpers import assert_same

import ckptio.dcp
import craft_train.fsdp as fsdp_module
from ckptio.dcp_manager import latest
from craft_train.config import TrainConfig
from craft_train.fsdp import check_config, read_progress, refuse_sharded_checkpoints
from craft_train.train import train

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
ROOT = WORKER.parent.parent
GROUP_TIMEOUT = 900  # generous: a busy 2-core machine starts each process's interpreter and torch slowly


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _run_group(world: int, save_dir: Path, max_steps: int, out: Path, tag: str, *extra: str) -> None:
    rendezvous = save_dir.parent / f"rendezvous-{tag}"
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(rendezvous), str(save_dir),
                               str(max_steps), str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env()) for rank in range(world)]
    results = []
    try:
        for rank in ranks:
            output, _ = rank.communicate(timeout=GROUP_TIMEOUT)
            results.append((rank.returncode, output))
    finally:  # never leave a process behind, whatever failed
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    assert all(code == 0 for code, _ in results), results


def _saved_state(directory: Path, like: dict[str, Any]) -> dict[str, Any]:
    """The model and optimizer state in checkpoint ``directory``, read whole (unsharded) in this process."""
    state = {"model": {k: torch.zeros_like(v) for k, v in like["model"].items()},
             "optim": {"state": {fqn: {k: torch.zeros_like(v) for k, v in slots.items()}
                                 for fqn, slots in like["optim"]["state"].items()},
                       "param_groups": like["optim"]["param_groups"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=ckptio.dcp.Reader(directory), no_dist=True)
    return state


@pytest.mark.slow
def test_a_run_saved_at_two_processes_resumes_at_one_and_three_exactly_as_saved_and_continues_at_two(
        tmp_path: Path) -> None:
    save_dir = tmp_path / "checkpoints"
    # 6 training images, 1 a process a step: 3 steps an epoch at 2 processes, then best_model, then step 4.
    _run_group(2, save_dir, 4, tmp_path / "saved.pt", "save")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert saved["global_step"] == 4 and saved["buffers_agree"]
    newest = latest(save_dir)
    assert newest is not None and newest.name == "checkpoint_epoch_2_batch_1"
    assert {p.name for p in save_dir.iterdir()} >= {"best_model", "checkpoint_epoch_1_batch_3", newest.name}
    # What the 2 processes held in memory is what the checkpoint holds (BatchNorm statistics included: every
    # process had rank 0's, so the one copy stored is theirs).
    assert any(".running_mean" in key for key in saved["model"])
    assert_same(_saved_state(newest, saved), {"model": saved["model"], "optim": saved["optim"]})
    progress = read_progress(newest)
    assert (progress["epoch"], progress["batch"], progress["position"], progress["world_size"]) == (2, 1, 2, 2)

    # Resumed at the step it was saved at, a run trains nothing: what it holds is what it loaded.
    for world in (1, 3):  # 3 processes shard CRAFT's last convolution (2 output channels) unevenly
        _run_group(world, save_dir, 4, tmp_path / f"resumed{world}.pt", f"resume{world}")
        resumed = torch.load(tmp_path / f"resumed{world}.pt", weights_only=True)
        assert resumed["global_step"] == 4
        assert_same({"model": resumed["model"], "optim": resumed["optim"]},
                    {"model": saved["model"], "optim": saved["optim"]}, f"resumed at {world}")
    assert latest(save_dir) == newest  # a resume that trained nothing wrote nothing

    # The command line under torchrun, at the same process count: continues from sample 2 of epoch 2.
    done = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2", "-m",
         "craft_train", "--fsdp", "--save-dir", str(save_dir), "--resume", "auto", "--max-steps", "6",
         "--device", "cpu"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=GROUP_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {newest}: epoch 2, batch 1, global step 4" in done.stdout, done.stdout
    final = latest(save_dir)
    assert final is not None and final.name == "checkpoint_epoch_2_batch_3"
    progress = read_progress(final)
    assert (progress["global_step"], progress["position"]) == (6, 6)
    assert ckptio.dcp.verify_directory(final).ok

    # At the same process count the resumed run is the uninterrupted one, bit for bit.
    _run_group(2, tmp_path / "straight", 6, tmp_path / "straight.pt", "straight")
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    assert_same(_saved_state(final, straight), {"model": straight["model"], "optim": straight["optim"]})


def test_fsdp_refuses_settings_it_does_not_support_and_says_what_to_drop() -> None:
    for options, words in [({"zero": True}, "drop --zero"), ({"keep_full": 2}, "--keep-full"),
                           ({"mirror": "/tmp/m"}, "--mirror"), ({"format": "safetensors"}, "--format"),
                           ({"synthetic_labels": "word"}, "--weak-supervision off")]:
        with pytest.raises(ValueError, match=words.replace("-", r"\-")):
            check_config(TrainConfig(fsdp=True, **options))


def test_a_progress_document_that_is_not_a_craft_train_fsdp_one_is_refused_with_the_path(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"progress": json.dumps({"kind": "other"}), "w": torch.ones(2)},
                 storage_writer=ckptio.dcp.Writer(tmp_path / "foreign"), no_dist=True)
    with pytest.raises(ValueError, match="not a craft_train --fsdp checkpoint"):
        read_progress(tmp_path / "foreign")


def test_a_run_without_fsdp_is_told_to_add_it_for_the_checkpoint_directories_of_a_fsdp_run(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2)}, storage_writer=ckptio.dcp.Writer(tmp_path / "checkpoint_epoch_1_batch_1"),
                 no_dist=True)
    for resume in (None, "auto", str(tmp_path / "checkpoint_epoch_1_batch_1")):
        with pytest.raises(ValueError, match="add --fsdp"):
            refuse_sharded_checkpoints(TrainConfig(save_dir=str(tmp_path), resume=resume))
    refuse_sharded_checkpoints(TrainConfig(save_dir=str(tmp_path / "elsewhere")))  # a fresh directory: fine


@pytest.mark.slow
def test_amp_skips_steps_on_every_process_together_and_its_scale_and_optimizer_resume_with_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # AMP is for CUDA; its code path (fp16 autocast, FSDP2's sharded gradient scaler) runs on the CPU just as well.
    save_dir = tmp_path / "checkpoints"
    _run_group(2, save_dir, 2, tmp_path / "amp.pt", "amp", "amp")
    # fp16 overflows at the initial scale (2**16) on both steps: the sharded scaler found it in some process's
    # slice and every process skipped the step and halved the scale, twice; Adam has no state yet.
    saved = read_progress(save_dir / "checkpoint_epoch_1_batch_2")
    assert (saved["scaler"]["scale"], saved["scaler"]["_growth_tracker"]) == (2.0**14, 0)
    assert not torch.load(tmp_path / "amp.pt", weights_only=True)["optim"]["state"]

    # One more step in this process (the model whole, torch's own scaler), from the scale the 2 processes left,
    # with an optimizer that has no state, as theirs had none.
    monkeypatch.setattr(fsdp_module, "amp_enabled", lambda config, device: True)
    result = train(worker_config(str(save_dir), 3, zero=False), given=None)
    assert result.start_step == 2 and result.global_step == 3
    resumed = read_progress(save_dir / "checkpoint_epoch_1_batch_3")["scaler"]
    assert (resumed["scale"], resumed["_growth_tracker"]) == (2.0**14, 1)  # a fresh scaler would be at 2**16
