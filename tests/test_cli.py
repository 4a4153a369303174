"""Tests for ``python -m ckptio``: list, info, load, clean and verify, the guide's spellings, exit codes and errors.

Most commands run in-process through ``ckptio.cli.main`` (fast); the ones whose point is the real command line
(the default directory, exit statuses, no traceback on stderr, a closed pipe) run ``python -m ckptio`` in a
subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    _assert_clear,
    _cli,
    _deep_dict_pickle,
    _safetensors_with_meta,
    _sealed_safetensors,
    _shared_references_pickle,
    _torch_zip_with,
    _write_real,
)

import ckptio
from ckptio import CheckpointManager
from ckptio.cli import main
from ckptio.fileio import write_checkpoint
from ckptio.snapshot import BufferSlot

COMBOS = [("torch", None), ("torch", "zstd"), ("safetensors", None), ("safetensors", "zstd")]
COMBO_IDS = ["pth", "pth.zst", "safetensors", "safetensors.zst"]
SUFFIXES = {("torch", None): ".pth", ("torch", "zstd"): ".pth.zst", ("safetensors", None): ".safetensors",
            ("safetensors", "zstd"): ".safetensors.zst"}
BASE_TIME = 1_700_000_000  # 2023-11-14: an mtime far from "now", set explicitly so that ordering is deterministic
TINY_NET_PARAMETERS = 4 * 3 + 3 + 3 * 2 + 2
STATE_TENSORS = 8  # 4 in the model, 4 momentum buffers in the optimizer

# -- helpers ---------------------------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def train_state(epoch: int = 2, batch: int = 8, *, seed: int = 0) -> dict[str, Any]:
    """A guide-shaped checkpoint: epoch, batch, total_batches, the three losses, model and optimizer state."""
    torch.manual_seed(seed)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return {
        "epoch": epoch,
        "batch": batch,
        "total_batches": 20,
        "train_loss": 0.75,
        "cls_loss": 0.5,
        "geo_loss": 0.25,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
    }


def batch_name(epoch: int, batch: int) -> str:
    return f"checkpoint_epoch_{epoch}_batch_{batch}"


def write_checkpoints(directory: Path, names: list[str], fmt: str = "torch", compression: str | None = None,
                      metadata: dict[str, Any] | None = None) -> list[Path]:
    """Save one checkpoint per name (in this order), each with a distinct mtime, the first the oldest.

    The mtimes are set after writing, so the index is refreshed by a verify pass: every file starts verified.
    """
    paths = []
    with CheckpointManager(directory, format=fmt, compression=compression, async_save=False, fsync=False) as mgr:
        for i, name in enumerate(names):
            match = re.fullmatch(r"checkpoint_epoch_(\d+)_batch_(\d+)", name)
            epoch, batch = (int(match.group(1)), int(match.group(2))) if match else (9, 20)
            mgr.save(train_state(epoch, batch, seed=i), name=name, metadata=metadata)
            paths.append(mgr.path_for(name))
    for i, path in enumerate(paths):
        set_mtime(path, BASE_TIME + 60 * i)
    assert ckptio.verify(directory).ok
    return paths


def set_mtime(path: Path, seconds: int) -> None:
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def temp_names(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".ckptio-tmp")]


def checkpoint_names(directory: Path) -> set[str]:
    return {name for name in os.listdir(directory) if not name.startswith(".")}


def stamp(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime_ns / 1e9))


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "ckptio", *args], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=120, check=False)


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys) -> Cli:
    """Run ``python -m ckptio ARGS`` in-process: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def listed_files(out: str) -> list[str]:
    """Checkpoint file names in the order the text listing shows them."""
    return re.findall(r"^  (\S+\.(?:pth|safetensors)(?:\.zst)?) - ", out, flags=re.MULTILINE)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


# -- list ------------------------------------------------------------------------------------------------------


def test_list_shows_best_model_first_then_batch_checkpoints_newest_first_with_size_time_and_totals(tmp_path,
                                                                                                    cli) -> None:
    directory = tmp_path / "ckpts"
    # Written in an order that differs from both name order and batch order; the mtimes decide "newest".
    names = [batch_name(1, 10), "best_model", batch_name(2, 4), batch_name(1, 20)]
    paths = dict(zip(names, write_checkpoints(directory, names), strict=True))

    code, out, err = cli("list", str(directory))

    assert code == 0, err
    assert listed_files(out) == ["best_model.pth", f"{batch_name(1, 20)}.pth", f"{batch_name(2, 4)}.pth",
                                 f"{batch_name(1, 10)}.pth"]
    assert out.index("最佳模型") < out.index("best_model.pth") < out.index("批次检查点") < out.index(batch_name(1, 20))
    for path in paths.values():
        size = f"{path.stat().st_size / 1e6:.1f}MB"  # MB as the label says: 10^6 bytes
        assert re.search(rf"^  {re.escape(path.name)} - {re.escape(size)} - {re.escape(stamp(path))} - ", out,
                         flags=re.MULTILINE), f"{path.name} lacks its size and time:\n{out}"
    assert re.search(r"批次检查点总数: 3$", out, flags=re.MULTILINE), out
    # The guide's total counts batch checkpoints only; the total with best_model is shown apart, labelled.
    batches = sum(p.stat().st_size for name, p in paths.items() if name != "best_model")
    everything = sum(p.stat().st_size for p in paths.values())
    assert re.search(rf"^  总大小: {re.escape(f'{batches / 1e6:.1f}')}MB \(批次检查点\)$", out, flags=re.MULTILINE), out
    assert f"全部检查点: 4个, {everything / 1e6:.1f}MB (含 best_model" in out
    assert "1 MB = 10^6 bytes" in out


def test_list_shows_each_files_integrity_state_verified_unverified_or_corrupt(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    good, damaged, changed = write_checkpoints(directory, [batch_name(1, 1), batch_name(1, 2), batch_name(1, 3)])
    flip_byte(damaged)
    set_mtime(damaged, BASE_TIME + 60)
    assert not ckptio.verify(damaged).ok  # records the damage in the index
    flip_byte(changed)  # changed (new mtime) after its digest was last checked: unknown until verified again
    set_mtime(changed, BASE_TIME + 180)

    code, out, err = cli("list", str(directory))

    assert code == 0, err
    states = dict(re.findall(r"^  (\S+) - .* - \S+ (verified|unverified|corrupt)$", out, flags=re.MULTILINE))
    assert states == {good.name: "verified", damaged.name: "corrupt", changed.name: "unverified"}, out
    assert "1 verified, 1 unverified, 1 corrupt" in out


def test_list_takes_integrity_states_from_recorded_digests_without_reading_the_files(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    (path,) = write_checkpoints(directory, [batch_name(1, 1)])
    # Damage the bytes but keep the size and mtime the index recorded: only a re-read could notice.
    info = path.stat()
    flip_byte(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))

    code, out, err = cli("list", str(directory))

    assert code == 0, err
    assert re.search(rf"^  {re.escape(path.name)} - .* verified$", out, flags=re.MULTILINE), out
    assert "corrupt" not in out.split("完整性")[0]
    code, out, _ = cli("verify", str(path))  # a re-read does notice
    assert code == 1


def test_list_json_reports_every_file_with_size_time_integrity_and_totals(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    names = [batch_name(1, 4), batch_name(1, 8), "best_model"]
    paths = write_checkpoints(directory, names)
    (directory / "plain.pth").write_bytes(paths[0].read_bytes())  # no record in the index
    set_mtime(directory / "plain.pth", BASE_TIME - 60)

    code, out, err = cli("list", str(directory), "--json")

    assert code == 0, err
    doc = json.loads(out)
    rows = {row["file"]: row for row in doc["checkpoints"]}
    assert set(rows) == {p.name for p in paths} | {"plain.pth"}
    for path in paths:
        row = rows[path.name]
        assert row["size"] == path.stat().st_size
        assert row["mtime"] == pytest.approx(path.stat().st_mtime)
        assert row["integrity"] == "verified"
        assert row["best"] is (path.name == "best_model.pth")
    assert rows[f"{batch_name(1, 8)}.pth"]["summary"]["batch"] == 8
    assert rows["plain.pth"]["integrity"] == "unverified"
    assert doc["count"] == 4
    assert doc["total_bytes"] == sum(row["size"] for row in doc["checkpoints"])


def test_list_defaults_to_checkpoints_improved_in_the_working_directory(tmp_path) -> None:
    write_checkpoints(tmp_path / "checkpoints_improved", [batch_name(1, 5)])
    elsewhere = tmp_path / "elsewhere"
    write_checkpoints(elsewhere, [batch_name(7, 7)])

    result = run_cli(tmp_path, "list")

    assert result.returncode == 0, result.stderr
    assert f"{batch_name(1, 5)}.pth" in result.stdout
    assert batch_name(7, 7) not in result.stdout
    assert "checkpoints_improved" in result.stdout


def test_list_of_a_missing_default_directory_exits_2_with_a_clear_message(tmp_path, cli, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)

    code, out, err = cli("list")

    assert code == 2
    assert out == ""
    assert "checkpoints_improved: no such directory" in err
    assert "--save-dir" in err  # says how to point it elsewhere


def test_list_of_a_file_instead_of_a_directory_exits_2(tmp_path, cli) -> None:
    (path,) = write_checkpoints(tmp_path / "ckpts", [batch_name(1, 1)])

    code, _, err = cli("list", str(path))

    assert code == 2
    assert "is a file" in err and "directory" in err


def test_list_treats_a_damaged_index_as_unknown_state_without_a_traceback(tmp_path, cli) -> None:
    """The index is a cache ("deleting it loses nothing"): a damaged one must not break listing."""
    directory = tmp_path / "ckpts"
    first, second = write_checkpoints(directory, [batch_name(1, 1), batch_name(1, 2)])
    (directory / ".ckptio-index.json").write_text(
        json.dumps({"version": 1, "files": {first.name: "garbage", second.name: {"size": 1, "meta": "garbage"}}}))

    code, out, err = cli("list", str(directory))
    assert code == 0, err
    assert "0 verified, 2 unverified, 0 corrupt" in out
    code, out, err = cli("list", str(directory), "--json")
    assert code == 0, err
    assert {row["integrity"] for row in json.loads(out)["checkpoints"]} == {"unverified"}
    code, out, err = cli("info", str(first))
    assert code == 0, err


def test_list_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path) -> None:
    """``python -m ckptio list | head`` must not end in an error (the CLI's own BrokenPipeError branch)."""
    directory = tmp_path / "many"
    directory.mkdir()
    for i in range(1500):  # more text (~110 KB) than a pipe buffers (64 KiB): the writer blocks until the reader leaves
        (directory / f"{batch_name(1, i)}.pth").write_bytes(b"")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    with subprocess.Popen([sys.executable, "-m", "ckptio", "list", str(directory)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            first_line = proc.stdout.readline()
            proc.stdout.close()
            err = proc.stderr.read().decode()
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()

    assert "扫描目录" in first_line.decode()
    assert "Traceback" not in err
    assert (code, err) == (0, "")


# -- info ------------------------------------------------------------------------------------------------------


def test_info_shows_epoch_batch_losses_format_compression_digest_tensors_parameters_and_size(tmp_path, cli) -> None:
    (path,) = write_checkpoints(tmp_path / "ckpts", [batch_name(2, 8)], metadata={"run": "exp-7"})
    seal, size = ckptio.read_meta(path)
    assert seal is not None

    code, out, err = cli("info", str(path))

    assert code == 0, err
    for line in ("epoch: 2", "batch: 8", "total_batches: 20", "train_loss: 0.75", "cls_loss: 0.5",
                 "geo_loss: 0.25", "run: exp-7", "format: torch, compression: none",
                 f"digest: xxh3_128:{seal.digest} [verified]", f"({size} bytes)",
                 f"tensors: {STATE_TENSORS}", f"model parameters: {TINY_NET_PARAMETERS}"):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "resume point: epoch=2, batch=8" in out


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_info_json_reports_the_metadata_format_compression_and_counts(tmp_path, cli, fmt, compression) -> None:
    (path,) = write_checkpoints(tmp_path / "ckpts", [batch_name(3, 12)], fmt, compression)
    assert path.name.endswith(SUFFIXES[fmt, compression])
    seal, _ = ckptio.read_meta(path)
    assert seal is not None

    code, out, err = cli("info", str(path), "--json")

    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == fmt
    assert doc["compression"] == compression
    assert doc["digest"] == f"xxh3_128:{seal.digest}"
    assert doc["integrity"] == "verified"
    assert doc["size"] == path.stat().st_size
    assert doc["tensors"] == STATE_TENSORS
    assert doc["parameters"] == TINY_NET_PARAMETERS
    assert doc["resume_point"] == {"epoch": 3, "batch": 12}
    assert {k: doc["summary"][k] for k in ("epoch", "batch", "total_batches", "train_loss", "cls_loss",
                                           "geo_loss")} == {"epoch": 3, "batch": 12, "total_batches": 20,
                                                            "train_loss": 0.75, "cls_loss": 0.5, "geo_loss": 0.25}


def test_info_finds_a_name_inside_save_dir_with_or_without_its_suffix(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, 3)], "safetensors", "zstd")

    for args in (["info", f"{batch_name(1, 3)}.safetensors.zst", "--save-dir", str(directory)],
                 ["info", "--checkpoint", batch_name(1, 3), "--save_dir", str(directory)]):
        code, out, err = cli(*args)
        assert code == 0, err
        assert "format: safetensors, compression: zstd" in out
        assert "batch: 3" in out


@pytest.mark.parametrize("command", ["info", "load"])
def test_info_and_load_of_a_missing_file_or_a_directory_exit_2_with_a_clear_message(tmp_path, cli, command) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, 1)])

    code, _, err = cli(command, str(directory / "nope.pth"))
    assert code == 2
    assert "nope.pth: no such checkpoint file" in err
    code, _, err = cli(command, str(directory))
    assert code == 2
    assert "is a directory" in err
    code, _, err = cli(command)
    assert code == 2
    assert "name a checkpoint file" in err


def test_info_of_a_file_with_an_unknown_suffix_exits_2_listing_the_known_ones(tmp_path, cli) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")

    code, _, err = cli("info", str(notes))

    assert code == 2
    assert ".pth" in err and ".safetensors" in err


# -- load ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_load_reads_the_whole_file_checks_its_digest_and_prints_a_summary(tmp_path, cli, fmt, compression) -> None:
    (path,) = write_checkpoints(tmp_path / "ckpts", [batch_name(2, 6)], fmt, compression)

    code, out, err = cli("load", str(path))

    assert code == 0, err
    assert f"loaded {path}" in out and "digest checked" in out
    assert "epoch: 2" in out and "batch: 6" in out and "train_loss: 0.75" in out
    model_line = rf"model_state_dict: (?:Ordered)?[Dd]ict with 4 entries, 4 tensors, {TINY_NET_PARAMETERS} elements"
    assert re.search(model_line, out), out


def test_load_of_a_file_with_a_flipped_byte_exits_1_naming_the_file_and_the_digest_mismatch(tmp_path) -> None:
    (path,) = write_checkpoints(tmp_path / "ckpts", [batch_name(1, 1)])
    flip_byte(path)

    result = run_cli(tmp_path, "load", str(path))

    assert result.returncode == 1
    assert_no_traceback(result)
    assert str(path) in result.stderr
    assert "digest mismatch" in result.stderr


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_load_of_a_file_that_is_not_a_loadable_checkpoint_exits_1_with_a_clear_message(tmp_path, cli,
                                                                                       damage) -> None:
    (path,) = write_checkpoints(tmp_path / "ckpts", [batch_name(1, 1)])
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"hello, I am not a zip"}[damage])

    code, _, err = cli("load", str(path))

    assert code == 1
    assert str(path) in err
    assert {"truncated": "truncated", "empty": "empty", "text": "not a torch zip file"}[damage] in err


# -- clean -----------------------------------------------------------------------------------------------------


def test_clean_keeps_the_newest_n_batch_checkpoints_and_best_model(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    names = ["best_model", *(batch_name(1, b) for b in (2, 4, 6, 8, 10))]  # best_model is the oldest file
    write_checkpoints(directory, names)

    code, out, err = cli("clean", str(directory), "--keep-count", "2")

    assert code == 0, err
    assert checkpoint_names(directory) == {"best_model.pth", f"{batch_name(1, 8)}.pth", f"{batch_name(1, 10)}.pth"}
    for b in (2, 4, 6):
        assert f"deleted: {batch_name(1, b)}.pth" in out
    assert "deleted 3 checkpoint(s)" in out
    index = json.loads((directory / ".ckptio-index.json").read_text())["files"]
    assert set(index) == checkpoint_names(directory)  # the deleted files are forgotten
    assert ckptio.verify(directory).ok


def test_clean_orders_by_modification_time_not_by_name(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    # The batch numbers go down while time goes up (e.g. a run restarted from scratch in the same directory).
    names = [batch_name(3, 30), batch_name(3, 20), batch_name(1, 10)]
    write_checkpoints(directory, names)

    code, _, err = cli("clean", str(directory), "--keep-count", "1")

    assert code == 0, err
    assert checkpoint_names(directory) == {f"{batch_name(1, 10)}.pth"}


def test_clean_dry_run_lists_what_it_would_delete_and_deletes_nothing(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, b) for b in (1, 2, 3)])
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    code, out, err = cli("clean", str(directory), "--keep-count", "1", "--dry-run")

    assert code == 0, err
    assert f"would delete: {batch_name(1, 1)}.pth" in out and f"would delete: {batch_name(1, 2)}.pth" in out
    assert batch_name(1, 3) not in out.split("would delete 2")[0]
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_clean_keeps_the_newest_checkpoint_that_verifies_when_the_newest_file_is_corrupt(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    paths = write_checkpoints(directory, ["best_model", *(batch_name(1, b) for b in (1, 2, 3, 4))])
    newest = paths[-1]
    mtime = newest.stat().st_mtime_ns
    flip_byte(newest)
    os.utime(newest, ns=(mtime, mtime))

    code, out, err = cli("clean", str(directory), "--keep-count", "1")

    assert code == 0, err
    assert checkpoint_names(directory) == {"best_model.pth", newest.name, f"{batch_name(1, 3)}.pth"}
    assert ckptio.verify(directory / f"{batch_name(1, 3)}.pth").ok
    assert f"newest valid: {batch_name(1, 3)}.pth" in out


def test_clean_with_keep_count_0_still_keeps_the_newest_valid_checkpoint_and_best_model(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, ["best_model", batch_name(1, 1), batch_name(1, 2)])

    code, _, err = cli("clean", str(directory), "--keep-count", "0")

    assert code == 0, err
    assert checkpoint_names(directory) == {"best_model.pth", f"{batch_name(1, 2)}.pth"}


def test_clean_never_touches_a_temporary_file_a_running_writer_is_producing(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, b) for b in (1, 2, 3)])
    in_progress = directory / f".{batch_name(1, 4)}.pth.4242.deadbeef.ckptio-tmp"
    in_progress.write_bytes(b"PK\x03\x04 half of a checkpoint")
    set_mtime(in_progress, BASE_TIME - 3600)  # even when it looks like the oldest file

    code, out, err = cli("clean", str(directory), "--keep-count", "1")

    assert code == 0, err
    assert in_progress.read_bytes() == b"PK\x03\x04 half of a checkpoint"
    assert in_progress.name not in out
    assert checkpoint_names(directory) == {f"{batch_name(1, 3)}.pth"}


def test_clean_counts_and_deletes_only_batch_checkpoints(tmp_path, cli) -> None:
    """``clean`` keeps "the newest N batch checkpoints": other checkpoint files neither count nor go."""
    directory = tmp_path / "ckpts"
    names = [batch_name(1, 1), batch_name(1, 2), batch_name(1, 3), "final_model"]  # final_model is the newest
    write_checkpoints(directory, names)

    code, _, err = cli("clean", str(directory), "--keep-count", "2")

    assert code == 0, err
    assert checkpoint_names(directory) == {f"{batch_name(1, 2)}.pth", f"{batch_name(1, 3)}.pth", "final_model.pth"}


@pytest.mark.parametrize(("args", "message"), [
    (["--keep-count", "-1"], "--keep-count must be 0 or more"),
    (["--keep-count", "two"], "invalid int value: 'two'"),
    ([], "--keep-count"),
])
def test_clean_with_a_bad_keep_count_exits_2_and_deletes_nothing(tmp_path, cli, args, message) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, 1), batch_name(1, 2)])

    code, _, err = cli("clean", str(directory), *args)

    assert code == 2
    assert message in err
    assert len(checkpoint_names(directory)) == 2


def test_clean_of_a_missing_directory_exits_2(tmp_path, cli) -> None:
    code, _, err = cli("clean", str(tmp_path / "nope"), "--keep-count", "1")

    assert code == 2
    assert "no such directory" in err


# -- verify ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_verify_exits_0_when_every_file_verifies(tmp_path, cli, fmt, compression) -> None:
    directory = tmp_path / "ckpts"
    paths = write_checkpoints(directory, ["best_model", batch_name(1, 1), batch_name(1, 2)], fmt, compression)

    code, out, err = cli("verify", str(directory))
    assert code == 0, err
    assert "3 file(s) checked, 0 corrupt" in out
    for path in paths:
        assert f"{path.name}: verified" in out
    code, out, err = cli("verify", str(paths[0]))
    assert code == 0, err
    assert "1 file(s) checked, 0 corrupt" in out


def test_verify_exits_1_and_names_a_file_with_a_flipped_byte(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    good, bad = write_checkpoints(directory, [batch_name(1, 1), batch_name(1, 2)])
    flip_byte(bad)

    code, out, err = cli("verify", str(directory))

    assert code == 1, err
    assert re.search(rf"{re.escape(bad.name)}: corrupt - digest mismatch", out), out
    assert f"{good.name}: verified" in out
    assert "2 file(s) checked, 1 corrupt" in out
    code, _, _ = cli("verify", str(bad))
    assert code == 1
    code, _, _ = cli("verify", str(good))
    assert code == 0


@pytest.mark.parametrize(("cut", "reason"), [("half", "truncated"), ("empty", "empty")])
def test_verify_exits_1_and_names_an_incomplete_file_and_why(tmp_path, cli, cut, reason) -> None:
    directory = tmp_path / "ckpts"
    _, short = write_checkpoints(directory, [batch_name(1, 1), batch_name(1, 2)])
    with open(short, "r+b") as f:
        f.truncate(short.stat().st_size // 2 if cut == "half" else 0)

    code, out, _ = cli("verify", str(directory))

    assert code == 1
    assert re.search(rf"{re.escape(short.name)}: corrupt - .*{reason}", out), out


def test_verify_names_each_bad_file_and_why_and_only_those(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    flipped, good, truncated = write_checkpoints(directory, [batch_name(1, 1), batch_name(1, 2), batch_name(1, 3)])
    flip_byte(flipped)
    truncated.write_bytes(truncated.read_bytes()[:-100])

    code, out, _ = cli("verify", str(directory))

    assert code == 1
    bad = dict(re.findall(r"^❌ (\S+): corrupt - (.*)$", out, flags=re.MULTILINE))
    assert set(bad) == {flipped.name, truncated.name}, out
    assert "digest mismatch" in bad[flipped.name]
    assert "truncated" in bad[truncated.name]
    assert f"✅ {good.name}: verified" in out
    assert "3 file(s) checked, 2 corrupt" in out


def test_verify_json_reports_each_files_status_and_reason(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    good, bad = write_checkpoints(directory, [batch_name(1, 1), batch_name(1, 2)], "safetensors", "zstd")
    flip_byte(bad)

    code, out, _ = cli("verify", str(directory), "--json")

    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    files = {Path(f["file"]).name: f for f in doc["files"]}
    assert files[good.name]["status"] == "verified"
    assert files[bad.name]["status"] == "corrupt"
    assert "digest mismatch" in files[bad.name]["reason"] or "zstd" in files[bad.name]["reason"]


def test_verify_ignores_a_temporary_file_a_writer_is_still_producing(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, 1)])
    (directory / f".{batch_name(1, 2)}.pth.4242.deadbeef.ckptio-tmp").write_bytes(b"PK\x03\x04 half")

    code, out, err = cli("verify", str(directory))

    assert code == 0, err
    assert "1 file(s) checked, 0 corrupt" in out


@pytest.mark.parametrize("args", [["verify", "no_such_dir"], ["verify", "--save_dir", "no_such_dir"],
                                  ["verify", "--checkpoint", "nope.pth"], ["verify"]])
def test_verify_of_a_missing_path_exits_2_with_a_clear_message(tmp_path, cli, monkeypatch, args) -> None:
    monkeypatch.chdir(tmp_path)

    code, _, err = cli(*args)

    assert code == 2
    assert "no such file or directory" in err
    assert err.startswith("ckptio: error: ")


@pytest.mark.parametrize("args", [["verify", "--bogus"], ["verify", "a", "b"], ["frobnicate"]])
def test_a_bad_argument_exits_2_with_usage(tmp_path, cli, args) -> None:
    code, _, err = cli(*args)

    assert code == 2
    assert "usage:" in err


def test_no_command_prints_help_and_exits_2(tmp_path, cli) -> None:
    code, _, err = cli()

    assert code == 2
    assert "list" in err and "verify" in err


# -- the guide's spellings -------------------------------------------------------------------------------------


def test_guide_spellings_list_info_load_and_clean_work(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, ["best_model", batch_name(1, 1), batch_name(1, 2), batch_name(1, 3)])

    code, out, err = cli("--action", "list", "--save_dir", str(directory))
    assert code == 0, err
    assert listed_files(out)[:2] == ["best_model.pth", f"{batch_name(1, 3)}.pth"]
    code, out, err = cli("--action", "info", "--save_dir", str(directory), "--checkpoint", f"{batch_name(1, 2)}.pth")
    assert code == 0, err
    assert "batch: 2" in out
    code, out, err = cli("--action", "load", "--save_dir", str(directory), "--checkpoint", "best_model.pth")
    assert code == 0, err
    assert "loaded" in out
    code, out, err = cli("--action", "clean", "--save_dir", str(directory), "--keep_count", "1")
    assert code == 0, err
    assert checkpoint_names(directory) == {"best_model.pth", f"{batch_name(1, 3)}.pth"}
    code, out, err = cli("verify", "--save_dir", str(directory))
    assert code == 0, err


def test_guide_action_form_uses_checkpoints_improved_by_default(tmp_path) -> None:
    write_checkpoints(tmp_path / "checkpoints_improved", ["best_model", batch_name(1, 1)])

    result = run_cli(tmp_path, "--action", "info", "--checkpoint", "best_model.pth")

    assert result.returncode == 0, result.stderr
    assert "checkpoints_improved/best_model.pth" in result.stdout
    assert f"model parameters: {TINY_NET_PARAMETERS}" in result.stdout


def test_guide_flags_given_with_an_equals_sign_work(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, 1), batch_name(1, 2)])

    code, out, err = cli("clean", f"--save_dir={directory}", "--keep_count=1")
    assert code == 0, err
    assert checkpoint_names(directory) == {f"{batch_name(1, 2)}.pth"}
    code, out, err = cli("--action=list", f"--save_dir={directory}")
    assert code == 0, err
    assert listed_files(out) == [f"{batch_name(1, 2)}.pth"]


def test_list_shows_the_validation_scores_recorded_with_a_checkpoint(tmp_path) -> None:
    import torch

    import ckptio

    with ckptio.CheckpointManager(tmp_path / "ck") as mgr:
        mgr.save({"epoch": 1, "val_loss": 0.25, "val_hmean": 0.8125, "w": torch.ones(2)}, name="best_model")
    out = subprocess.run([sys.executable, "-m", "ckptio", "list", "ck"], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert "best_model.pth" in out and "val_loss=0.2500 - val_hmean=0.8125" in out


# -- what a new user trips over --------------------------------------------------------------------------------


def test_verify_of_a_directory_without_checkpoints_says_so_and_exits_1(tmp_path, cli) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()

    code, out, err = cli("verify", str(empty))
    assert code == 1, err
    assert f"no checkpoint found in {empty}" in out
    code, out, _ = cli("verify", str(empty), "--json")
    assert code == 1
    assert json.loads(out)["ok"] is False and json.loads(out)["found"] == 0


def test_verify_takes_a_checkpoint_name_without_its_suffix_like_info_and_load(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, 5)], "safetensors", "zstd")

    code, out, err = cli("--action", "verify", "--checkpoint", batch_name(1, 5), "--save_dir", str(directory))

    assert code == 0, err
    assert f"✅ {batch_name(1, 5)}.safetensors.zst: verified" in out


def test_clean_without_keep_count_says_what_is_missing_and_deletes_nothing(tmp_path, cli) -> None:
    directory = tmp_path / "ckpts"
    write_checkpoints(directory, [batch_name(1, b) for b in (1, 2, 3)])
    before = checkpoint_names(directory)

    code, _, err = cli("--action", "clean", "--save_dir", str(directory))

    assert code == 2
    assert "--keep-count N" in err and "--keep_count 5" in err
    assert checkpoint_names(directory) == before


def test_the_readme_cli_examples_run_as_typed(tmp_path, cli, monkeypatch) -> None:
    """Every ``python -m ckptio`` line of the README's CLI section, on a directory with the files it names."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Managing checkpoints: `python -m ckptio`", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#", 1)[0].split() for line in section.splitlines()
             if line.startswith("python -m ckptio ")]
    assert len(lines) >= 5
    monkeypatch.chdir(tmp_path)
    # batch_100, which the examples name, is the newest file: `clean --keep-count 5` keeps it for the next lines.
    names = ["best_model", *(batch_name(1, b) for b in (200, 300, 400, 500, 600, 100))]
    write_checkpoints(tmp_path / "checkpoints_improved", names)
    for words in lines:
        assert not any(word.startswith("[") for word in words), f"not runnable as typed: {' '.join(words)}"
        code, _, err = cli(*words[3:])
        assert code == 0, f"{' '.join(words)}: {err}"


def test_python_m_ckptio_without_the_environments_packages_says_to_activate_it(tmp_path) -> None:
    """``-S`` drops site-packages, as a shell without the venv activated would."""
    result = subprocess.run([sys.executable, "-S", "-m", "ckptio", "list", str(tmp_path)],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
                            check=False)

    assert result.returncode == 1
    assert_no_traceback(result)
    assert ". .venv/bin/activate" in result.stderr


# -- what a user of someone else's files sees ------------------------------------------------------------------


def test_info_shows_an_infinite_best_loss_as_none_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save({**train_state(), "best_val_loss": float("inf")}, name="checkpoint_epoch_2_batch_8")
    assert main(["info", str(tmp_path / "checkpoint_epoch_2_batch_8.pth")]) == 0
    out = capsys.readouterr().out
    assert "best_val_loss: none yet" in out and ": inf" not in out


def test_info_shows_epoch_batch_and_losses_of_a_checkpoint_the_guides_script_wrote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "checkpoint_epoch_2_batch_8.pth"
    torch.save(train_state(), path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "unsealed" in out
    for line in ("epoch: 2", "batch: 8", "total_batches: 20", "train_loss: 0.75", "cls_loss: 0.5"):
        assert f"  {line}\n" in out, line


def test_load_says_digest_checked_only_for_a_file_with_a_digest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(train_state(), tmp_path / "plain.pth")
    with CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(train_state(), name="sealed")
    assert main(["load", str(tmp_path / "plain.pth")]) == 0
    out = capsys.readouterr().out
    assert "digest checked" not in out and "no digest to check" in out
    assert main(["load", str(tmp_path / "sealed.pth")]) == 0
    assert "(digest checked)" in capsys.readouterr().out


def test_verify_of_a_folder_ckptio_never_wrote_into_leaves_no_index_there(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "ours", async_save=False) as manager:
        manager.save(train_state(), name="checkpoint_epoch_1_batch_1")
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (tmp_path / "ours" / "checkpoint_epoch_1_batch_1.pth").rename(foreign / "checkpoint_epoch_1_batch_1.pth")
    torch.save(train_state(), foreign / "checkpoint_epoch_1_batch_2.pth")
    assert main(["verify", str(foreign)]) == 0
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoint_epoch_1_batch_1.pth",
                                                         "checkpoint_epoch_1_batch_2.pth"]


def test_an_old_format_torch_save_file_is_unsealed_not_corrupt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "craft_mlt_25k.pth"
    torch.save({"module.w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert main(["verify", str(path)]) == 0
    assert "unsealed" in capsys.readouterr().out
    assert torch.equal(ckptio.load(path)["module.w"], torch.ones(3))


def test_an_unexpected_error_prints_its_traceback_and_asks_for_a_report(tmp_path, cli, monkeypatch) -> None:
    import ckptio.cli as ckptio_cli

    def broken(args: object) -> int:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(ckptio_cli, "cmd_list", broken)
    code, _, err = cli("list", str(tmp_path))
    assert code == 1
    assert "Traceback" in err and "RuntimeError: a bug of ours" in err
    assert "unexpected error, please report it with the traceback above" in err


def test_debug_prints_the_traceback_of_an_error_otherwise_told_in_one_line(tmp_path, cli) -> None:
    code, _, err = cli("info", str(tmp_path / "missing.pth"))
    assert code == 2 and "Traceback" not in err
    code, _, err = cli("--debug", "info", str(tmp_path / "missing.pth"))
    assert code == 2 and "Traceback" in err


# -- hostile names, odd metadata and files that change while they are read -------------------------------------


def test_names_and_metadata_that_carry_terminal_escapes_are_printed_as_visible_escapes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a planted name or a summary key holding ESC sequences cleared the screen or retitled the terminal
    # of whoever ran `ckptio list` / `info` / `verify`.
    evil = "\x1b]0;pwned\x07\x1b[2J\u202e"
    path = tmp_path / f"checkpoint_{evil}.safetensors"
    _sealed_safetensors(path, {"summary": {f"loss{evil}": 1.0}, "user": {"note": evil}})
    for command in (["list", str(tmp_path)], ["info", str(path)], ["verify", str(tmp_path)]):
        assert main(command) == 0
        out, err = capsys.readouterr()
        assert not any(c in out + err for c in "\x1b\x07\u202e"), command
        assert "\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in out, command


def test_a_name_with_a_newline_cannot_forge_a_line_in_list_clean_verify_or_info(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a planted file named "x\n✅ checkpoint_epoch_9_batch_900.pth: verified ..." printed a second line
    # that looked like a verified checkpoint the directory does not hold; so did a shard name inside a manifest
    # (quoted by verify's reason) and a summary value (printed by info).
    line = "\u2705 checkpoint_epoch_9_batch_900.pth: verified - digest matches"
    _sealed_safetensors(tmp_path / f"x\n{line}\tend.safetensors", {"summary": {"loss": f"1\n{line}"}})
    # a name that is a batch checkpoint's but for a trailing newline is another (named) checkpoint: list shows it
    # escaped, and clean leaves it alone (its pattern's "$" once matched before the newline)
    older = tmp_path / "checkpoint_epoch_1_batch_1\n.safetensors"
    _sealed_safetensors(older, {"summary": {"loss": 1.0}})
    os.utime(older, (1_000_000_000, 1_000_000_000))
    _sealed_safetensors(tmp_path / "checkpoint_epoch_1_batch_2.safetensors", {"summary": {"loss": 1.0}})
    write_checkpoint(tmp_path / "manifest.pth", BufferSlot().take({"x": torch.zeros(1)}), name="m", fmt="torch",
                     compression=None, fsync=False,
                     shards=[{"rank": 0, "file": f"manifest.shards/r\n{line}", "digest": "0" * 32}])
    planted = str(tmp_path / f"x\n{line}\tend.safetensors")
    for command in (["list", str(tmp_path)], ["verify", str(tmp_path)], ["info", planted],
                    ["clean", str(tmp_path), "--keep-count", "1", "--dry-run"]):
        main(command)
        out, _ = capsys.readouterr()
        assert not any(row.startswith("\u2705 checkpoint_epoch_9") for row in out.splitlines()), (command, out)
        assert f"\\n{line}" in out or command[0] == "clean", (command, out)
        if command[0] == "list":
            assert "checkpoint_epoch_1_batch_1\\n.safetensors" in out, out
        if command[0] == "clean":
            assert "checkpoint_epoch_1_batch_1\\n" not in out, out
    assert older.exists()


@pytest.mark.parametrize("meta", [{"summary": {"epoch": 1}}, {"summary": "text", "user": 5},
                                  {"summary": [1], "user": "x", "tensors": "many", "model_elements": 1.5}])
def test_info_on_sealed_metadata_of_any_shape_prints_what_it_can(tmp_path: Path, capsys, meta: dict) -> None:
    path = tmp_path / "odd.safetensors"
    path.write_bytes(_safetensors_with_meta(meta))

    for args in (("info", str(path)), ("info", str(path), "--json")):
        code, _, err = _cli(capsys, tmp_path, *args)
        assert code == 0, err


def test_info_shows_none_yet_for_the_trainers_placeholders(tmp_path: Path, capsys) -> None:
    path = tmp_path / "best_model.safetensors"
    path.write_bytes(_safetensors_with_meta({"summary": {
        "epoch": 1, "best_val_loss": float("inf"), "best_hmean": -1.0, "val_loss": None, "val_hmean": 0.5}}))

    code, out, err = _cli(capsys, tmp_path, "info", str(path))

    assert code == 0, err
    for line in ("best_val_loss: none yet", "best_hmean: none yet", "val_loss: none yet", "val_hmean: 0.5"):
        assert line in out, out
    assert ": inf" not in out and ": -1.0" not in out and ": None" not in out


def test_load_of_a_deeply_nested_pickle_gives_a_clear_result_not_a_traceback(tmp_path: Path, capsys) -> None:
    path = tmp_path / "deep.pth"
    path.write_bytes(_torch_zip_with(data_pkl=_deep_dict_pickle(100_000)))

    code, out, err = _cli(capsys, tmp_path, "load", str(path))

    _assert_clear(code, err, "load")
    assert code == 0, err  # the unpickler and the printing are both iterative
    assert "a: dict with 1 entries" in out


def test_load_prints_a_state_of_shared_references_without_walking_every_path(tmp_path: Path, capsys) -> None:
    path = tmp_path / "shared.pth"
    path.write_bytes(_torch_zip_with(data_pkl=_shared_references_pickle(60)))  # 2**60 paths

    code, out, err = _cli(capsys, tmp_path, "load", str(path))

    assert code == 0, err
    assert "a: list of 2" in out


def test_one_file_with_odd_metadata_never_breaks_list_for_the_directory(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "ckpts"
    directory.mkdir()
    good = _write_real(directory / "checkpoint_epoch_1_batch_1.pth")
    (directory / "checkpoint_epoch_1_batch_2.safetensors").write_bytes(_safetensors_with_meta({"summary": "x"}))
    os.mkfifo(directory / "checkpoint_epoch_1_batch_3.pth")

    assert ckptio.verify(directory).ok  # the odd summary verifies: the digest is right
    code, out, err = _cli(capsys, directory, "list", str(directory))

    assert code == 0, err
    assert good.name in out and "checkpoint_epoch_1_batch_2.safetensors" in out
    assert "checkpoint_epoch_1_batch_3.pth - unreadable: a FIFO" in out
    code, out, err = _cli(capsys, directory, "list", str(directory), "--json")
    assert code == 0, err
    assert json.loads(out)["unreadable"] == [{"file": "checkpoint_epoch_1_batch_3.pth",
                                              "reason": "a FIFO (named pipe)"}]


def test_a_file_removed_between_listing_and_reading_is_reported_removed_not_corrupt(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    directory = tmp_path / "ckpts"
    directory.mkdir()
    kept = _write_real(directory / "checkpoint_epoch_1_batch_2.pth")
    doomed = _write_real(directory / "checkpoint_epoch_1_batch_1.pth", seed=1)
    real_scan = ckptio.verify.__globals__["scan"]

    def scan_then_retention_deletes(path: Path, protected: tuple[str, ...] = ()) -> list:
        entries = real_scan(path, protected)
        doomed.unlink()  # retention of a live writer, between the listing and the read
        return entries

    monkeypatch.setitem(ckptio.verify.__globals__, "scan", scan_then_retention_deletes)
    report = ckptio.verify(directory)

    assert report.ok
    assert {check.path.name: check.status for check in report.files} == {kept.name: "verified",
                                                                         doomed.name: "removed"}


def test_verify_beside_a_live_writer_with_retention_never_reports_false_corruption(tmp_path: Path) -> None:
    """The real mechanism: a manager saving with keep_count=2 in a thread while verify runs again and again."""
    directory = tmp_path / "ckpts"
    stop, started = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def train() -> None:
        try:
            with CheckpointManager(directory, keep_count=2, async_save=True, fsync=False) as manager:
                step = 0
                while not stop.is_set():
                    # 4 MiB per file: verifying one takes long enough for retention to delete the next
                    # (a verify that trusts its listing reports a deleted file as corrupt in about half the passes).
                    manager.save({"w": torch.full((2**20,), float(step))}, name=f"checkpoint_epoch_1_batch_{step}")
                    step += 1
                    if step == 3:
                        started.set()
                    stop.wait(0.01)  # ~100 saves a second at most: bounded I/O, still a live race
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
            started.set()

    writer = threading.Thread(target=train)
    writer.start()
    try:
        assert started.wait(120)
        reports = [ckptio.verify(directory) for _ in range(40)]
    finally:
        stop.set()
        writer.join(120)

    assert not errors, errors
    assert all(report.files for report in reports)
    assert [check for report in reports for check in report.corrupt] == []


def test_verify_of_an_over_long_path_is_a_usage_error(tmp_path: Path, capsys) -> None:
    for args in (("verify", "x" * 300), ("verify", str(tmp_path / ("y" * 300) / "z.pth")), ("list", "d" * 300),
                 ("info", "i" * 300 + ".pth"), ("load", "l" * 300 + ".pth")):
        code, _, err = _cli(capsys, tmp_path, *args)
        assert code == 2, (args, err)
        assert "too long" in err
