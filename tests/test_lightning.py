"""ckptio.lightning.CheckpointIO with the real Lightning: ModelCheckpoint, resume, removes racing writes, errors,
kill -9, DDP on CPU and Fabric."""

from __future__ import annotations

import collections
import configparser
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning_run import Tiny, trainer  # noqa: E402

import ckptio  # noqa: E402
import ckptio.lightning  # noqa: E402
import ckptio.writer  # noqa: E402
from ckptio import CheckpointWriteError  # noqa: E402
from ckptio.cli import main as ckptio_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
Point = collections.namedtuple("Point", "x y")


class GatedWrites:
    """A slow fake storage: every write waits until the test opens the gate, so saves pile up behind it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: str | None = None) -> None:
        self.gate = threading.Event()
        self.started = 0
        self.fail = fail
        real = ckptio.writer.write_checkpoint

        def write(path: Path, *args: object, **kwargs: object) -> object:
            self.started += 1
            self.gate.wait()
            if fail is not None and path.name.startswith(fail):
                raise OSError(5, "Input/output error (a fake disk)", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(ckptio.writer, "write_checkpoint", write)


def files(directory: Path) -> list[str]:
    """What a user sees in the directory (ckptio's lock and index are hidden files)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_import_ckptio_does_not_import_lightning() -> None:
    code = ("import sys, ckptio, ckptio.cli, ckptio.manager\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_lightning_extra_is_declared_and_pinned_to_the_installed_version() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "lightning" in setup["options.extras_require"]["lightning"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["lightning"] == L.__version__
    assert "lightning" in (ROOT / "Makefile").read_text().split(".[test,bench,")[1].split("]")[0]


def test_invalid_options_and_remote_paths_are_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="save_top_k"):
        ckptio.lightning.CheckpointIO(keep_count=2)
    with pytest.raises(ValueError, match="format"):
        ckptio.lightning.CheckpointIO(format="pickle")
    with pytest.raises(ValueError, match="local path"):
        ckptio.lightning.CheckpointIO().save_checkpoint({"step": 1}, "s3://bucket/a.ckpt")


def test_top_k_last_and_every_n_steps_write_verified_files_and_resume_at_the_step(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, monitor="score", every_n_train_steps=2, save_top_k=2,
                                  save_last=True)
    trainer(str(tmp_path), 12, ckptio.lightning.CheckpointIO(), checkpoints).fit(Tiny())
    # the checkpoints of steps 2..12 score 1.01, 3.03, 0.05, 2.07, 4.09, 1.11: the best two are steps 6 and 2
    assert files(tmp_path) == ["epoch=0-step=2.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    for name in files(tmp_path):
        assert ckptio.verify(tmp_path / name).files[0].status == "verified"
        assert ckptio_main(["verify", str(tmp_path / name)]) == 0
    # Lightning's own loaders read the files too
    assert Tiny.load_from_checkpoint(tmp_path / "last.ckpt").hparams.lr == 0.05
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 12

    resumed = Tiny()
    plugin = ckptio.lightning.CheckpointIO()
    again = ModelCheckpoint(dirpath=tmp_path, monitor="score", every_n_train_steps=2, save_top_k=2, save_last=True)
    run = trainer(str(tmp_path), 16, plugin, again)
    run.fit(resumed, ckpt_path="last")
    assert resumed.started_at == 12
    assert run.global_step == 16
    assert tmp_path / "last.ckpt" in plugin._loaded  # the resume went through the plugin


def test_save_last_link_points_at_a_durable_checkpoint(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path, monitor="score", every_n_train_steps=2, save_top_k=2,
                                  save_last="link")
    trainer(str(tmp_path), 8, ckptio.lightning.CheckpointIO(), checkpoints).fit(Tiny())
    link = tmp_path / "last.ckpt"
    assert link.is_symlink() and link.resolve().name == "epoch=0-step=6.ckpt"  # step 8 was not in the top 2
    assert ckptio.verify(link.resolve()).files[0].status == "verified"
    resumed = Tiny()
    trainer(str(tmp_path), 10, ckptio.lightning.CheckpointIO()).fit(resumed, ckpt_path=str(link))
    assert resumed.started_at == 6


def test_top_k_removes_racing_slow_writes_never_delete_a_file_being_written_nor_leave_a_partial_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = GatedWrites(monkeypatch)

    class OpenGateAtTheEnd(Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # Every save and every top-k remove of this run happened while no write had finished.
            self.started, self.visible = storage.started, files(tmp_path)
            storage.gate.set()

    plugin = ckptio.lightning.CheckpointIO(max_pending=16)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, monitor="score", every_n_train_steps=2, save_top_k=2,
                                  save_last=True)
    at_end = OpenGateAtTheEnd()
    trainer(str(tmp_path), 12, plugin, checkpoints, at_end).fit(Tiny())
    assert at_end.started == 1 and at_end.visible == []  # all 12 saves and 4 removes raced the first write
    assert files(tmp_path) == ["epoch=0-step=2.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        ".ckptio-index.json", ".ckptio-index.lock", ".ckptio.lock"]  # no temporary or half-renamed file
    for name in files(tmp_path):
        assert ckptio.verify(tmp_path / name).files[0].status == "verified"
    assert plugin.pending == 0


def test_removing_a_pending_write_drops_it_when_it_lands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = GatedWrites(monkeypatch)
    plugin = ckptio.lightning.CheckpointIO(max_pending=4)
    first = plugin.save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "a.ckpt")
    plugin.save_checkpoint({"step": 2, "w": torch.ones(3)}, tmp_path / "b.ckpt")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    storage.gate.set()
    plugin.wait()
    assert first.exception() is None  # it was written, then dropped: never under its name
    assert files(tmp_path) == ["b.ckpt"]
    plugin.teardown()


def test_the_same_remove_of_a_pending_write_resurrects_the_file_with_lightnings_async_plugin(tmp_path: Path) -> None:
    """The race the test above rules out, shown with Lightning's AsyncCheckpointIO and the same slow storage."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    gate = threading.Event()

    class SlowTorchIO(TorchCheckpointIO):
        def save_checkpoint(self, *args: object, **kwargs: object) -> None:
            gate.wait()
            super().save_checkpoint(*args, **kwargs)

    plugin = AsyncCheckpointIO(SlowTorchIO())
    plugin.save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "a.ckpt")
    plugin.save_checkpoint({"step": 2, "w": torch.ones(3)}, tmp_path / "b.ckpt")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    gate.set()
    plugin.teardown()
    assert files(tmp_path) == ["a.ckpt", "b.ckpt"]  # top-k believes a.ckpt is gone


def test_the_newest_durable_checkpoint_is_removed_only_once_a_newer_one_lands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = GatedWrites(monkeypatch, fail="c.ckpt")
    storage.gate.set()
    plugin = ckptio.lightning.CheckpointIO(max_pending=4)
    plugin.save_checkpoint({"step": 1}, tmp_path / "a.ckpt")
    plugin.wait()
    storage.gate.clear()
    plugin.save_checkpoint({"step": 2}, tmp_path / "b.ckpt")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    assert files(tmp_path) == ["a.ckpt"]  # b is not durable yet: a is what a resume needs
    storage.gate.set()
    plugin.wait()
    assert files(tmp_path) == ["b.ckpt"]

    plugin.save_checkpoint({"step": 3}, tmp_path / "c.ckpt")  # this one fails: b must stay
    plugin.remove_checkpoint(tmp_path / "b.ckpt")
    with pytest.raises(CheckpointWriteError, match=r"c\.ckpt"):
        plugin.wait()
    assert files(tmp_path) == ["b.ckpt"]
    plugin.teardown()


def test_the_checkpoint_a_run_loaded_is_never_removed(tmp_path: Path) -> None:
    plugin = ckptio.lightning.CheckpointIO()
    plugin.save_checkpoint({"step": 1}, tmp_path / "a.ckpt")
    plugin.save_checkpoint({"step": 2}, tmp_path / "b.ckpt")
    assert plugin.load_checkpoint(tmp_path / "a.ckpt") == {"step": 1}
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    plugin.remove_checkpoint(tmp_path / "b.ckpt")
    plugin.teardown()
    assert files(tmp_path) == ["a.ckpt"]


def test_load_waits_for_the_pending_write_of_that_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = GatedWrites(monkeypatch)
    plugin = ckptio.lightning.CheckpointIO()
    plugin.save_checkpoint({"step": 7, "w": torch.arange(4.0)}, tmp_path / "a.ckpt")
    assert files(tmp_path) == []
    real_wait = plugin.wait

    def wait(path: object = None) -> None:  # the write can finish only once load has started waiting for it
        storage.gate.set()
        real_wait(path)

    monkeypatch.setattr(plugin, "wait", wait)
    loaded = plugin.load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["step"] == 7 and torch.equal(loaded["w"], torch.arange(4.0))
    plugin.teardown()


def test_plain_torch_save_checkpoints_and_lightning_objects_load(tmp_path: Path) -> None:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.fabric.utilities.data import AttributeDict

    TorchCheckpointIO().save_checkpoint({"step": 3, "w": torch.ones(2)}, tmp_path / "old.ckpt")
    plugin = ckptio.lightning.CheckpointIO()
    old = plugin.load_checkpoint(tmp_path / "old.ckpt")
    assert old["step"] == 3 and torch.equal(old["w"], torch.ones(2))

    state = {"hyper_parameters": AttributeDict(lr=0.1), "path": Path("/data"), "tags": {"a"}, "p": Point(1, 2),
             "sparse": torch.eye(2).to_sparse(), "w": torch.ones(2)}
    plugin.save_checkpoint(state, tmp_path / "new.ckpt")
    new = plugin.load_checkpoint(tmp_path / "new.ckpt", weights_only=False)
    assert new["hyper_parameters"] == {"lr": 0.1} and new["path"] == Path("/data") and new["tags"] == {"a"}
    assert new["p"] == Point(1, 2) and torch.equal(new["sparse"].to_dense(), torch.eye(2))
    assert type(state["hyper_parameters"]) is AttributeDict  # the caller's objects are not changed
    plugin.teardown()


def test_compressed_checkpoints_need_their_suffix_and_then_round_trip(tmp_path: Path) -> None:
    plugin = ckptio.lightning.CheckpointIO(compression="zstd")
    with pytest.raises(ValueError, match=r"FILE_EXTENSION = '\.pth\.zst'"):
        plugin.save_checkpoint({"step": 1}, tmp_path / "a.ckpt")
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True)
    checkpoints.FILE_EXTENSION = ".pth.zst"
    trainer(str(tmp_path), 8, plugin, checkpoints).fit(Tiny())
    assert files(tmp_path) == ["epoch=0-step=8.pth.zst", "last.pth.zst"]
    resumed = Tiny()
    trainer(str(tmp_path), 10, ckptio.lightning.CheckpointIO(compression="zstd"), checkpoints).fit(
        resumed, ckpt_path=str(tmp_path / "last.pth.zst"))
    assert resumed.started_at == 8


def test_a_failed_write_surfaces_once_in_the_next_step_with_its_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = GatedWrites(monkeypatch, fail="epoch=0-step=4.ckpt")
    storage.gate.set()
    plugin = ckptio.lightning.CheckpointIO()
    failing = tmp_path / "epoch=0-step=4.ckpt"

    class LetTheWriteFinish(Callback):  # the failure is certain to have happened before the next step starts
        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            self.step = trainer.global_step
            future = plugin.future(failing)
            if future is not None:
                future.exception()

    finish = LetTheWriteFinish()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(CheckpointWriteError, match=r"saving .*epoch=0-step=4\.ckpt failed: .*Input/output error"):
        trainer(str(tmp_path), 12, plugin, finish, plugin.callback(), checkpoints).fit(Tiny())
    assert finish.step == 4  # raised at the start of the step after the failed save
    plugin.raise_error()  # cleared: not raised a second time (teardown ran during fit's error handling)
    assert files(tmp_path) == ["epoch=0-step=2.ckpt"]


def test_kill_9_mid_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "lightning_run.py"), "kill", str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "HALFWAY"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert files(tmp_path) == ["first.ckpt"]
    assert ckptio.verify(tmp_path / "first.ckpt").files[0].status == "verified"
    plugin = ckptio.lightning.CheckpointIO()
    assert plugin.load_checkpoint(tmp_path / "first.ckpt")["step"] == 1
    plugin.save_checkpoint({"step": 3}, tmp_path / "third.ckpt")  # opening the directory sweeps the half file
    plugin.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".ckptio-index.json", ".ckptio-index.lock", ".ckptio.lock", "first.ckpt", "third.ckpt"]


def test_fabric_save_and_load_go_through_the_plugin(tmp_path: Path) -> None:
    from lightning.fabric import Fabric

    plugin = ckptio.lightning.CheckpointIO()
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = fabric.setup(model, optimizer)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    fabric.save(tmp_path / "state.ckpt", {"model": model, "optimizer": optimizer, "step": 5})
    assert plugin.future(tmp_path / "state.ckpt").result().digest

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    fresh, fresh_optimizer = fabric.setup(fresh, fresh_optimizer)
    remainder = fabric.load(tmp_path / "state.ckpt", {"model": fresh, "optimizer": fresh_optimizer})
    assert remainder == {"step": 5}
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


@pytest.mark.slow
def test_ddp_on_cpu_writes_on_rank_0_only_and_resumes_on_both(tmp_path: Path) -> None:
    def run(steps: int) -> str:
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_run.py"), "ddp", str(tmp_path),
                               str(steps)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    first = run(4)
    assert "rank 0 started at 0 ended at 4" in first and "rank 1 started at 0 ended at 4" in first
    # ModelCheckpoint puts files on rank 0 only, and the plugin on rank 1 never opened a writer
    assert files(tmp_path) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert not (tmp_path / ".ckptio.lock.rank1").exists()
    for name in files(tmp_path):
        assert ckptio.verify(tmp_path / name).files[0].status == "verified"
    second = run(6)
    assert "rank 0 started at 4 ended at 6" in second and "rank 1 started at 4 ended at 6" in second


def test_lightning_overhead_summary_charges_each_save_the_step_time_above_the_run_without_checkpoints() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import lightning_overhead
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    run = {"device_peak_bytes": None, "peak_rss_above_start_bytes": 2**20, "checkpoint_bytes": 2**20}
    table = lightning_overhead.summarize([
        {**run, "plugin": "none", "saves": 0, "blocked_s": [], "durable_s": [], "step_s": [0.1, 0.1, 0.1]},
        {**run, "plugin": "ckptio", "saves": 2, "blocked_s": [0.01, 0.03], "durable_s": [0.5, 0.7],
         "step_s": [0.1, 0.3, 0.2]},
    ])
    assert table["ckptio"]["step_overhead_per_save_s"] == pytest.approx(0.15)
    assert table["ckptio"]["blocked_median_s"] == pytest.approx(0.02)
    assert table["ckptio"]["durable_median_s"] == pytest.approx(0.6)
    assert "| ckptio | 2 | 20.0 (30.0) | 150.0 |" in lightning_overhead.markdown_table(table)


@pytest.mark.parametrize("options", [{"async_save": False}, {"writer": "process"}], ids=["sync", "process"])
def test_synchronous_saves_and_the_process_writer_put_files_in_place(tmp_path: Path, options: dict) -> None:
    plugin = ckptio.lightning.CheckpointIO(**options)
    future = plugin.save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path / "a.ckpt")
    if options.get("async_save") is False:
        assert future.done() and files(tmp_path) == ["a.ckpt"]  # durable before save_checkpoint returned
    assert future.result().path == tmp_path / "a.ckpt"
    assert plugin.load_checkpoint(tmp_path / "a.ckpt")["step"] == 1
    plugin.teardown()
    assert files(tmp_path) == ["a.ckpt"]
