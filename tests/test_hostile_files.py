"""Hostile files and directories on the read side: whatever is placed in a checkpoint directory, every CLI command
and ``ckptio.load`` / ``ckptio.verify`` return promptly, with a clear message and exit code, no traceback, and
memory bounded by what docs/guarantees.md documents (256 MiB plus twice the checkpoint's legitimate data).

The first tests are regressions, one per way a file attacked the reader; then a property suite (hypothesis) over
random bytes, truncations, crafted headers of each format, special files and damaged indexes; then one child
process that measures peak memory on files built to make a trusting reader allocate gigabytes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptio
from ckptio import CheckpointManager, CorruptCheckpointError
from ckptio.cli import main
from ckptio.fileio import MAX_ZSTD_EXPANSION, write_checkpoint
from ckptio.integrity import DIGEST_PLACEHOLDER, HashingWriter, seal_zip_file, zstd_trailer
from ckptio.snapshot import BufferSlot

SUFFIXES = [".pth", ".safetensors", ".pth.zst", ".safetensors.zst"]
SECONDS = 30  # "returns promptly": generous for a loaded 2-core machine; a hang is what this catches


# -- builders of hostile files ----------------------------------------------------------------------------------


def _state(seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {"epoch": 1, "batch": 2, "w": torch.randn(16, 8, generator=generator), "b": torch.arange(5)}


def _write_real(path: Path, seed: int = 0) -> Path:
    name = path.name
    fmt = "safetensors" if ".safetensors" in name else "torch"
    write_checkpoint(path, BufferSlot().take(_state(seed)), name=name.split(".")[0], fmt=fmt,
                     compression="zstd" if name.endswith(".zst") else None, fsync=False)
    return path


def _sealed_zstd(body: bytes, meta: dict[str, Any]) -> bytes:
    """A .zst file with a trailer and a digest computed by the forger: only limits on claims can stop it."""
    buffer = io.BytesIO()
    sink = HashingWriter(buffer)
    sink.write(body)
    sink.seal_with(zstd_trailer(DIGEST_PLACEHOLDER, meta), lambda digest: zstd_trailer(digest, meta))
    return buffer.getvalue()


def _sealed_torch(obj: Any, meta: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with tempfile.NamedTemporaryFile() as file:
        file.write(buffer.getvalue())
        file.flush()
        seal_zip_file(file.fileno(), meta)
        file.seek(0)
        return file.read()


def _torch_zip_with(data_pkl: bytes | None = None, compress: int = zipfile.ZIP_STORED) -> bytes:
    """A torch.save archive whose pickle is replaced, or whose records are re-compressed."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2**16)}, buffer)  # a 256 KiB record of zeros: DEFLATE shrinks it ~1000x
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as target:
        for info in source.infolist():
            data = data_pkl if data_pkl is not None and info.filename.endswith("data.pkl") else source.read(info)
            target.writestr(info.filename, data, compress_type=compress)
    return out.getvalue()


def _deep_dict_pickle(depth: int) -> bytes:
    """``{"a": {"a": ...}}`` nested ``depth`` times, built by the unpickler without recursion."""
    key = b"X\x01\x00\x00\x00a"
    return b"\x80\x02}" + (key + b"}") * depth + b"s" * depth + b"."


def _shared_references_pickle(depth: int) -> bytes:
    """``{"a": [x, x]}`` where each ``x`` is the level below: 2**depth paths in a few hundred bytes."""
    level: Any = []
    for _ in range(depth):
        level = [level, level]
    return pickle.dumps({"a": level}, protocol=2)  # the pickler's memo writes each level once


def _safetensors_with_meta(meta: Any) -> bytes:
    """A sealed safetensors file whose ckptio meta is ``meta`` (a correct digest: only shape checks catch it)."""
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "__metadata__": {"ckptio.digest": DIGEST_PLACEHOLDER, "ckptio.meta": json.dumps(meta)}}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    buffer = io.BytesIO()
    sink = HashingWriter(buffer)
    sink.write(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 16)
    return buffer.getvalue().replace(DIGEST_PLACEHOLDER.encode(), sink.hexdigest().encode(), 1)


_ZERO_BOMB = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * 2**20))  # 64 MiB in ~2 KB


def _crafted(kind: str) -> tuple[str, bytes]:
    """(suffix, bytes) of one crafted file."""
    if kind.startswith("zstd-raw-size="):
        claim: Any = json.loads(kind.split("=", 1)[1])
        return ".pth.zst", _sealed_zstd(_ZERO_BOMB, {"raw_size": claim, "summary": {}})
    if kind == "zstd-trailer-length":
        return ".pth.zst", _ZERO_BOMB + struct.pack("<I", 0xFFFFFFF0) + b"CKPTIO01"
    if kind == "safetensors-header-length":
        return ".safetensors", struct.pack("<Q", 2**31) + b"{}" * 64
    if kind == "safetensors-odd-meta":
        return ".safetensors", _safetensors_with_meta({"summary": "a string", "user": [1, 2], "tensors": "x"})
    if kind == "safetensors-meta-list":
        return ".safetensors", _safetensors_with_meta([1, 2, 3])
    if kind == "pth-deflate":
        return ".pth", _torch_zip_with(compress=zipfile.ZIP_DEFLATED)
    if kind == "pth-odd-meta":
        return ".pth", _sealed_torch({"w": torch.zeros(2)}, {"summary": "s", "user": 5, "shards": "nope",
                                                             "elements": "many"})
    if kind == "pth-odd-shards":
        return ".pth", _sealed_torch({"w": torch.zeros(2)}, {"shards": [{"file": "../../etc/passwd"}, 7]})
    if kind == "pth-long-shard-name":
        return ".pth", _sealed_torch({"w": torch.zeros(2)}, {"shards": [{"file": "s" * 300 + "/x.pth", "rank": 0}]})
    if kind == "pth-deep-pickle":
        return ".pth", _torch_zip_with(data_pkl=_deep_dict_pickle(100_000))
    if kind == "pth-shared-references":
        return ".pth", _torch_zip_with(data_pkl=_shared_references_pickle(60))
    if kind == "zip-end-only":
        return ".pth", b"PK\x03\x04" + b"\0" * 64 + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 65535, 65535,
                                                                                2**31, 0, 0)
    if kind == "zip64-locator-nowhere":
        return ".pth", (b"PK\x03\x04" + b"\0" * 64 + b"PK\x06\x07" + struct.pack("<IQI", 0, 2**60, 1)
                        + b"PK\x05\x06" + b"\xff" * 16 + b"\0\0")
    raise AssertionError(kind)


CRAFTED = ["zstd-raw-size=3221225472", f"zstd-raw-size={2**62}", f"zstd-raw-size={2**70}", "zstd-raw-size=-1",
           'zstd-raw-size="big"', "zstd-raw-size=true", "zstd-trailer-length", "safetensors-header-length",
           "safetensors-odd-meta", "safetensors-meta-list", "pth-deflate", "pth-odd-meta", "pth-odd-shards",
           "pth-long-shard-name", "pth-deep-pickle", "pth-shared-references", "zip-end-only", "zip64-locator-nowhere"]
SPECIAL = ["fifo", "symlink-to-fifo", "symlink-to-dev-zero", "directory", "dangling-symlink", "symlink-loop",
           "symlink-to-checkpoint"]
# Random bytes behind each format's magic, so that the parsers behind the first check are exercised too.
PREFIXES = [b"PK\x03\x04", b"\x28\xb5\x2f\xfd", struct.pack("<II", 0x184D2A5C, 8) + b"CKPTIO01",
            struct.pack("<Q", 40) + b'{"__metadata__":{"ckptio.meta":"{}"}, "w":']


def _place_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-fifo":
        os.mkfifo(path.parent / "pipe")
        path.symlink_to(path.parent / "pipe")
    elif kind == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling-symlink":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "symlink-to-checkpoint":
        path.symlink_to(_write_real(path.parent / f"elsewhere{''.join(path.suffixes)}"))
    else:
        path.symlink_to(path)


def _damage_index(directory: Path, kind: str, victim: str) -> None:
    index = directory / ".ckptio-index.json"
    if kind == "garbage":
        index.write_bytes(b"\xff{not json")
    elif kind == "deep":
        index.write_text('{"files":' + "[" * 200_000 + "]" * 200_000 + "}")
    elif kind == "odd-records":
        index.write_text(json.dumps({"version": 1, "files": {victim: {
            "size": "big", "mtime_ns": [], "status": 3, "meta": {"summary": "s", "user": 1}}, "x": 5}}))
    elif kind == "plausible-but-wrong":
        info = (directory / victim).lstat()
        index.write_text(json.dumps({"version": 1, "files": {victim: {
            "size": info.st_size, "mtime_ns": info.st_mtime_ns, "status": "verified", "digest": None,
            "meta": {"summary": {"val_loss": "low", "val_hmean": None, "epoch": {"deep": [1]}}}}}}))
    elif kind == "huge":
        index.write_text(json.dumps({"version": 1, "files": {}, "padding": "x" * (17 * 2**20)}))
    elif kind == "fifo":
        index.unlink(missing_ok=True)
        os.mkfifo(index)
    elif kind == "directory":
        index.unlink(missing_ok=True)
        index.mkdir()


# -- running a command that might block -------------------------------------------------------------------------


def _within(seconds: float, call: Callable[[], Any], directory: Path) -> Any:
    """``call()``'s result, failing the test (not hanging it) if it has not returned after ``seconds``.

    A call blocked opening a FIFO for reading is released by opening the FIFO's write end, so no thread is left
    behind."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed back to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in directory.rglob("*"):
            if fifo.is_fifo():
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"{call} did not return within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _cli(capsys: pytest.CaptureFixture[str], directory: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()

    def run() -> int:
        try:
            return main(list(args))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1

    code = _within(SECONDS, run, directory)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clear(code: int, err: str, *args: str) -> None:
    assert code in (0, 1, 2), (args, code, err)
    assert "Traceback" not in err and "unexpected error" not in err, (args, err)


# -- a zstd trailer's claims never set how much memory is spent -------------------------------------------------------


@pytest.mark.parametrize("claim", [2**62, 2**70])
def test_a_zstd_raw_size_beyond_physical_memory_is_refused_before_decompressing(tmp_path: Path, claim: int) -> None:
    path = tmp_path / "bomb.pth.zst"
    path.write_bytes(_sealed_zstd(_ZERO_BOMB, {"raw_size": claim, "summary": {}}))
    assert ckptio.verify(path).ok  # the forger computed a correct digest: it vouches for nothing

    with pytest.raises(CorruptCheckpointError, match="records a raw size"):
        ckptio.load(path)


@pytest.mark.parametrize("claim", [3 * 2**30, 64 * 2**20])
def test_a_sealed_zstd_bomb_that_claims_a_large_raw_size_is_refused_by_its_first_bytes(tmp_path: Path,
                                                                                       claim: int) -> None:
    path = tmp_path / "bomb.pth.zst"
    path.write_bytes(_sealed_zstd(_ZERO_BOMB, {"raw_size": claim, "summary": {}}))
    assert claim > MAX_ZSTD_EXPANSION * len(_ZERO_BOMB) + 2**20

    with pytest.raises(CorruptCheckpointError, match="does not start a torch zip"):
        ckptio.load(path)


def test_a_sealed_zstd_file_expanding_past_its_recorded_raw_size_stops_there(tmp_path: Path) -> None:
    inner = _torch_zip_with(compress=zipfile.ZIP_STORED)
    body = zstandard.ZstdCompressor(level=19).compress(inner + b"\0" * (64 * 2**20))
    path = tmp_path / "long.pth.zst"
    path.write_bytes(_sealed_zstd(body, {"raw_size": len(inner), "summary": {}}))

    with pytest.raises(CorruptCheckpointError, match="expands beyond the .* bytes allowed"):
        ckptio.load(path)


def test_an_unsealed_zstd_bomb_is_still_refused_at_the_expansion_limit(tmp_path: Path) -> None:
    inner = _torch_zip_with(compress=zipfile.ZIP_STORED)
    path = tmp_path / "unsealed.pth.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(inner + b"\0" * (64 * 2**20)))

    with pytest.raises(CorruptCheckpointError, match="expands beyond the .* bytes allowed"):
        ckptio.load(path)


def test_a_zstd_file_within_the_expansion_limit_still_loads(tmp_path: Path) -> None:
    path = _write_real(tmp_path / "fine.pth.zst")

    assert set(ckptio.load(path)) == {"epoch", "batch", "w", "b"}


# -- structure checked before anything declared is trusted ------------------------------------------------------------


def test_a_pth_with_a_deflate_compressed_record_is_refused_as_not_written_by_torch_save(tmp_path: Path) -> None:
    path = tmp_path / "deflated.pth"
    path.write_bytes(_torch_zip_with(compress=zipfile.ZIP_DEFLATED))
    assert torch.load(path, weights_only=True)["w"].numel() == 2**16  # torch itself would expand it

    with pytest.raises(CorruptCheckpointError, match="compressed or encrypted"):
        ckptio.load(path)
    assert ckptio.verify(path).files[0].status == "corrupt"


def test_a_sparse_file_named_pth_is_refused_by_its_first_bytes_without_reading_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "sparse.pth"
    with open(path, "wb") as file:
        file.truncate(2**40)  # a terabyte that occupies no disk: reading it whole would never end

    with pytest.raises(CorruptCheckpointError, match="not a torch zip file"):
        _within(SECONDS, lambda: ckptio.load(path), tmp_path)


def test_a_safetensors_header_length_beyond_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", 2**39))
        file.truncate(2**40)  # the claim fits the file, so only the cap can refuse it

    with pytest.raises(CorruptCheckpointError, match="more than the .* bytes ckptio reads"):
        _within(SECONDS, lambda: ckptio.read_meta(path), tmp_path)
    assert "more than" in _within(SECONDS, lambda: ckptio.verify(path), tmp_path).files[0].reason


# -- only regular files are read, never in a way that blocks ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo", "symlink-to-dev-zero"])
def test_a_special_file_named_like_a_checkpoint_is_refused_without_blocking(tmp_path: Path, capsys,
                                                                            kind: str) -> None:
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    _place_special(path, kind)

    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        _within(SECONDS, lambda: ckptio.load(path), tmp_path)
    assert _within(SECONDS, lambda: ckptio.verify(path), tmp_path).files[0].status == "corrupt"
    code, out, err = _cli(capsys, tmp_path, "verify", str(path))
    assert code == 1, err
    assert "not a regular file" in out


def test_python_m_ckptio_verify_of_a_symlink_to_a_fifo_returns_at_once_with_exit_1(tmp_path: Path) -> None:
    """The command a user types, in its own process (``subprocess.run`` kills it if it hangs); one start-up only,
    the in-process tests above cover the other special files."""
    _place_special(tmp_path / "best_model.pth", "symlink-to-fifo")

    result = subprocess.run([sys.executable, "-m", "ckptio", "verify", str(tmp_path / "best_model.pth")],
                            capture_output=True, text=True, timeout=120, check=False,
                            cwd=Path(__file__).resolve().parents[1])

    assert result.returncode == 1, result.stderr
    assert "not a regular file" in result.stdout and "Traceback" not in result.stderr


# -- a shard is data, not a manifest ----------------------------------------------------------------------------------


def _nested_manifests(directory: Path, depth: int, fan_out: int = 4) -> Path:
    """A chain of manifests, each level listing every file of the next level: fan_out**depth paths."""
    directory.mkdir(parents=True, exist_ok=True)

    def level(where: Path, remaining: int) -> list[dict[str, Any]]:
        shards = where / "L.shards"
        shards.mkdir()
        below = level(shards, remaining - 1) if remaining > 1 else None
        records = []
        for i in range(fan_out):
            saved = write_checkpoint(shards / f"s{i}.pth", BufferSlot().take({"x": torch.zeros(1)}), name=f"s{i}",
                                     fmt="torch", compression=None, fsync=False, shards=below)
            records.append({"rank": i, "file": f"L.shards/s{i}.pth", "digest": saved.digest})
        return records

    records = level(directory, depth)
    manifest = directory / "L.pth"
    write_checkpoint(manifest, BufferSlot().take({"x": torch.zeros(1)}), name="L", fmt="torch", compression=None,
                     fsync=False, shards=records)
    return manifest


def test_a_shard_that_is_itself_a_manifest_is_refused_instead_of_followed(tmp_path: Path) -> None:
    manifest = _nested_manifests(tmp_path / "d", depth=3)

    check = ckptio.verify(manifest).files[0]
    assert check.status == "corrupt"
    assert "a shard must hold data" in check.reason
    with pytest.raises(CorruptCheckpointError, match="a shard must hold data"):
        ckptio.load(manifest)
    with pytest.raises(CorruptCheckpointError, match="a shard must hold data"):
        ckptio.load_shard(manifest, 0)


def test_a_shard_table_listing_one_file_twice_is_damaged(tmp_path: Path) -> None:
    shard_dir = tmp_path / "M.shards"
    shard_dir.mkdir()
    saved = write_checkpoint(shard_dir / "s.pth", BufferSlot().take({"x": torch.zeros(1)}), name="s", fmt="torch",
                             compression=None, fsync=False)
    record = {"rank": 0, "file": "M.shards/s.pth", "digest": saved.digest}
    write_checkpoint(tmp_path / "M.pth", BufferSlot().take({"x": torch.zeros(1)}), name="M", fmt="torch",
                     compression=None, fsync=False, shards=[record] * 100)

    assert "twice" in ckptio.verify(tmp_path / "M.pth").files[0].reason


def test_a_shard_name_too_long_for_the_file_system_is_a_missing_shard_not_an_os_error(tmp_path: Path) -> None:
    suffix, data = _crafted("pth-long-shard-name")
    path = tmp_path / f"M{suffix}"
    path.write_bytes(data)

    assert "is missing" in ckptio.verify(path).files[0].reason
    with pytest.raises(CorruptCheckpointError, match="is missing"):
        ckptio.load(path)


# -- no traceback from any CLI command; the index is validated as it is read ------------------------------------------


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


@pytest.mark.parametrize("damage", ["garbage", "deep", "odd-records", "plausible-but-wrong", "huge", "fifo"])
def test_a_damaged_index_is_a_cache_miss_for_list_and_rebuilt_by_the_next_save(tmp_path: Path, capsys,
                                                                              damage: str) -> None:
    directory = tmp_path / "ckpts"
    with CheckpointManager(directory, async_save=False, fsync=False) as manager:
        manager.save(_state(), name="checkpoint_epoch_1_batch_1")
    _damage_index(directory, damage, "checkpoint_epoch_1_batch_1.pth")

    code, out, err = _cli(capsys, directory, "list", str(directory))
    assert code == 0, err
    assert "checkpoint_epoch_1_batch_1.pth" in out
    with CheckpointManager(directory, async_save=False, fsync=False) as manager:
        manager.save(_state(1), name="checkpoint_epoch_1_batch_2")  # raises if the save reports failure
    if damage != "fifo":  # a FIFO stays a FIFO until someone removes it; the index then just stays empty
        code, out, err = _cli(capsys, directory, "list", str(directory))
        assert code == 0, err
        assert "checkpoint_epoch_1_batch_2.pth - " in out and "✅ verified" in out


# -- verify beside a live writer --------------------------------------------------------------------------------------


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
                    # (before the fix, 22 of 40 passes reported a deleted file as corrupt).
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


# -- exit codes -------------------------------------------------------------------------------------------------------


def test_verify_of_an_over_long_path_is_a_usage_error(tmp_path: Path, capsys) -> None:
    for args in (("verify", "x" * 300), ("verify", str(tmp_path / ("y" * 300) / "z.pth")), ("list", "d" * 300),
                 ("info", "i" * 300 + ".pth"), ("load", "l" * 300 + ".pth")):
        code, _, err = _cli(capsys, tmp_path, *args)
        assert code == 2, (args, err)
        assert "too long" in err


# -- the property suite --------------------------------------------------------------------------------------------

CONTENT = st.one_of(
    st.tuples(st.just("bytes"), st.sampled_from(SUFFIXES), st.binary(max_size=4096)),
    st.tuples(st.just("bytes"), st.sampled_from(SUFFIXES),
              st.builds(lambda prefix, rest: prefix + rest, st.sampled_from(PREFIXES), st.binary(max_size=512))),
    st.tuples(st.just("truncated"), st.sampled_from(SUFFIXES), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flipped"), st.sampled_from(SUFFIXES), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("crafted"), st.sampled_from(CRAFTED), st.floats(0, 1)),
    st.tuples(st.just("special"), st.sampled_from(SPECIAL), st.sampled_from(SUFFIXES)),
)
COMMANDS = [("list", "{d}"), ("list", "{d}", "--json"), ("info", "{f}"), ("info", "{f}", "--json"),
            ("load", "{f}"), ("verify", "{f}"), ("verify", "{d}", "--json"), ("verify", "{d}"),
            ("clean", "{d}", "--keep-count", "0", "--dry-run"), ("clean", "{d}", "--keep-count", "2")]


def _hostile_file(directory: Path, stem: str, content: tuple) -> Path:
    kind, what, amount = content
    if kind == "special":
        path = directory / f"{stem}{amount}"
        _place_special(path, what)
        return path
    if kind == "crafted":
        suffix, data = _crafted(what)
        if amount < 0.5:  # also the crafted file with its tail cut off
            data = data[: int(len(data) * (0.5 + amount))]
    else:
        suffix = what
        data = amount if kind == "bytes" else _write_real(directory / f"real{suffix}").read_bytes()
        (directory / f"real{suffix}").unlink(missing_ok=True)
        if kind == "truncated":
            data = data[: int(len(data) * amount)]
        elif kind == "flipped":
            data = bytearray(data)
            data[int(len(data) * amount)] ^= 0x5A
            data = bytes(data)
    path = directory / f"{stem}{suffix}"
    path.write_bytes(data)
    return path


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(content=CONTENT, stem=st.sampled_from(["checkpoint_epoch_9_batch_9", "best_model", "final"]),
       index_damage=st.sampled_from([None, "garbage", "deep", "odd-records", "plausible-but-wrong", "directory"]))
def test_any_file_in_a_checkpoint_directory_gets_a_clear_answer_from_every_command(capsys, content: tuple,
                                                                                   stem: str,
                                                                                   index_damage: str | None) -> None:
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp) / "ckpts"
        directory.mkdir()
        good = _write_real(directory / "checkpoint_epoch_1_batch_1.pth")
        os.utime(good, (1_700_000_000, 1_700_000_000))  # older than the hostile file: never its victim
        path = _hostile_file(directory, stem, content)
        if index_damage:
            _damage_index(directory, index_damage, path.name)

        try:
            _within(SECONDS, lambda: ckptio.load(path), directory)
        except (CorruptCheckpointError, ValueError, OSError) as exc:
            assert str(path.name) in str(exc) or isinstance(exc, OSError), exc
        report = _within(SECONDS, lambda: ckptio.verify(directory), directory)
        assert good.name in {check.path.name for check in report.files}
        for command in COMMANDS:
            args = [arg.format(d=directory, f=path) for arg in command]
            code, out, err = _cli(capsys, directory, *args)
            _assert_clear(code, err, *args)
            if command[0] == "list":
                assert code == 0 and good.name in out, (args, out, err)
        assert good.exists()  # clean kept the newest two batch checkpoints, whatever else is there


# -- peak memory on files built to make a trusting reader allocate gigabytes ---------------------------------------

_MEMORY_CHILD = textwrap.dedent("""
    import os, sys
    import psutil
    import ckptio
    from ckptio.cli import main
    directory = sys.argv[1]
    baseline = psutil.Process().memory_info().rss
    for name, calls in [
        ("sparse.pth", ["load"]), ("sparse.safetensors", ["load", "info", "verify"]),
        ("bomb.pth.zst", ["load", "info", "verify"]), ("claim.safetensors.zst", ["load", "verify"]),
    ]:
        path = os.path.join(directory, name)
        for call in calls:
            try:
                if call == "load":
                    ckptio.load(path)
                else:
                    main([call, path])
            except ckptio.CorruptCheckpointError:
                pass
    # VmHWM, not ru_maxrss: the latter keeps the peak of the parent that forked this process.
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(peak - baseline)
""")


def test_files_built_to_exhaust_memory_are_refused_within_the_documented_bound(tmp_path: Path) -> None:
    """256 MiB over the process's size before the calls (the README's bound; these files hold no legitimate
    data). Before the fix each of them cost more than 1 GiB."""
    with open(tmp_path / "sparse.pth", "wb") as file:
        file.truncate(3 * 2**30)
    with open(tmp_path / "sparse.safetensors", "wb") as file:
        file.write(struct.pack("<Q", 2**31))
        file.truncate(3 * 2**30)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * 2**30)  # 1 GiB in ~32 KB
    (tmp_path / "bomb.pth.zst").write_bytes(_sealed_zstd(bomb, {"raw_size": 2**30, "summary": {}}))
    (tmp_path / "claim.safetensors.zst").write_bytes(_sealed_zstd(bomb, {"raw_size": 2**62, "summary": {}}))
    child = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True,
                           timeout=300, check=False, cwd=Path(__file__).resolve().parents[1])

    assert child.returncode == 0, child.stderr
    assert "Traceback" not in child.stderr
    assert int(child.stdout.strip().splitlines()[-1]) < 256 * 2**20, child.stdout
