"""Attacks on the hostile-file promises that found a path the first fixes missed: one regression test each.

Each builds the hostile file for real (a sparse file, a crafted zip directory, a planted index record, a DEFLATE
record) and checks that the reader refuses it from its header alone, or is not misled by it.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import struct
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard

import ckptio
from ckptio import CorruptCheckpointError, fileio
from ckptio.cli import main
from ckptio.dir_index import INDEX_NAME
from ckptio.fileio import verify_file, write_checkpoint
from ckptio.formats import MAX_ZIP_DIRECTORY
from ckptio.integrity import (
    DIGEST_PLACEHOLDER,
    ZSTD_LEADING_FRAME,
    ZSTD_SKIPPABLE_MAGIC,
    compute_digest,
    file_reader,
    read_seal,
    seal_zip_file,
    zstd_trailer,
)
from ckptio.naming import parse_checkpoint_name
from ckptio.slim import slim_checkpoint
from ckptio.snapshot import BufferSlot
from craft_train.model import load_pretrained
from craft_train.resume import find_resume_checkpoint


def _reseal(path: Path) -> None:
    """Write the right digest into a file that carries a placeholder one: forging a seal is easy, by design."""
    fd = os.open(path, os.O_RDWR)
    try:
        seal = read_seal(path, os.fstat(fd).st_size, file_reader(fd))
        assert seal is not None
        os.pwrite(fd, compute_digest(seal, file_reader(fd)).encode(), seal.zeroed[0])
    finally:
        os.close(fd)


def _sealed_safetensors(path: Path, meta: dict[str, Any], *, padding: int = 0) -> None:
    """A sealed safetensors file of one 4-byte tensor, followed by ``padding`` bytes of sparse zeros."""
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "__metadata__": {"ckptio.meta": json.dumps(meta), "ckptio.digest": "0" * 32}}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 4)
        out.truncate(out.tell() + padding)
    _reseal(path)


def _never_read_whole(*_: Any) -> bytes:
    raise AssertionError("the file was read whole before its layout was checked")


def test_a_sealed_safetensors_file_padded_far_beyond_its_tensor_is_refused_before_it_is_read_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: load read all 1 GB of a sparse file behind a one-tensor header (1.18 GB RSS) before safetensors
    # refused it. (verify, which only streams the digest, says "verified": the digest is not a trust anchor.)
    path = tmp_path / "checkpoint_epoch_1_batch_1.safetensors"
    _sealed_safetensors(path, {"summary": {}}, padding=256 * 2**20)
    monkeypatch.setattr(fileio, "_read_all", _never_read_whole)
    with pytest.raises(CorruptCheckpointError, match="cover 4 bytes"):
        ckptio.load(path)


def test_an_unsealed_safetensors_file_padded_beyond_its_tensor_is_refused_by_verify_without_reading_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        out.truncate(out.tell() + 256 * 2**20)
    monkeypatch.setattr(fileio, "_read_all", _never_read_whole)
    check = verify_file(path)
    assert check.status == "corrupt" and "cover 4 bytes" in check.reason


def test_a_legitimate_safetensors_checkpoint_still_loads_and_verifies(tmp_path: Path) -> None:
    state = {"model_state_dict": {"w": torch.arange(6.0).reshape(2, 3), "e": torch.zeros(0)}, "epoch": 3}
    path = tmp_path / "checkpoint_epoch_3_batch_1.safetensors"
    write_checkpoint(path, BufferSlot().take(state), name=path.name, fmt="safetensors", compression=None,
                     fsync=False)
    assert verify_file(path).status == "verified"
    assert torch.equal(ckptio.load(path)["model_state_dict"]["w"], state["model_state_dict"]["w"])


def test_a_zip_directory_larger_than_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # Before: a 256 MiB directory of crafted 46-byte entries cost 17 s and 480 MB RSS in verify (unsealed).
    path = tmp_path / "big.pth"
    size = 33 * 2**20  # above the cap, far below what reading it whole would have cost before
    assert size > MAX_ZIP_DIRECTORY
    start = 2**20
    with open(path, "wb") as out:
        out.write(b"PK\x03\x04")
        out.seek(start + size)
        end64 = out.tell()
        out.write(b"PK\x06\x06" + struct.pack("<Q", 44) + b"\0" * 20 + struct.pack("<QQQ", 1, size, start))
        out.write(b"PK\x06\x07" + struct.pack("<IQI", 0, end64, 1))
        out.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return real_pread(fd, length, offset)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "pread", counting_pread)
        check = verify_file(path)
    assert check.status == "corrupt" and "central directory does not fit" in check.reason
    assert max(reads) < 2**20


def _periodic(directory: Path, step: int, mtime_ns: int, summary_override: Any = None) -> Path:
    path = directory / f"checkpoint_epoch_1_batch_{step}.safetensors"
    if summary_override is None:
        write_checkpoint(path, BufferSlot().take({"global_step": step, "w": torch.ones(2) * step}), name=path.name,
                         fmt="safetensors", compression=None, fsync=False)
    else:
        _sealed_safetensors(path, {"summary": summary_override})
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_resume_auto_ranks_a_checkpoint_whose_summary_is_not_a_dict_instead_of_crashing(tmp_path: Path) -> None:
    # Before: AttributeError: 'str' object has no attribute 'get', a traceback instead of a resume.
    good = _periodic(tmp_path, 5, 1_000_000_000_000_000_000)
    _periodic(tmp_path, 6, 2_000_000_000_000_000_000, summary_override="not a dict")
    said: list[str] = []
    assert find_resume_checkpoint(tmp_path, said.append) in (good, tmp_path / "checkpoint_epoch_1_batch_6.safetensors")


def test_resume_auto_ignores_an_index_record_made_for_another_file(tmp_path: Path) -> None:
    # Before: a record claiming global_step 999 for the older file (its size and mtime do not match) made
    # --resume auto pick the older checkpoint over the newer one.
    older = _periodic(tmp_path, 5, 1_000_000_000_000_000_000)
    newer = _periodic(tmp_path, 10, 2_000_000_000_000_000_000)
    record = {"size": 1, "mtime_ns": 1, "status": "verified", "digest": None,
              "meta": {"summary": {"global_step": 999}}, "reason": ""}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"version": 1, "files": {older.name: record}}))
    assert find_resume_checkpoint(tmp_path, lambda _: None) == newer


def test_pretrained_weights_with_a_deflate_compressed_record_are_refused_before_loading(tmp_path: Path) -> None:
    # Before: a 1 MB file loaded as 1 GB (2.1 GB RSS, 7 s) through --pretrained, which bypassed ckptio's checks.
    plain = io.BytesIO()
    torch.save({"weight": torch.zeros(4_000_000)}, plain)
    plain.seek(0)
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for name in source.namelist():
            bomb.writestr(name, source.read(name))
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match="compressed or encrypted"):
        load_pretrained(torch.nn.Linear(1, 1), path)


def test_a_trailer_built_of_empty_objects_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    # Before: 15 MB of `{},` in a sealed .pth.zst's trailer cost `ckptio info` 750 MB over its baseline and 8 s
    # (verify 17 s): the 16 MiB cap bounds the text, not the ~50x more that parsing it allocates.
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth.zst"
    meta = {"summary": {}, "user": {"x": [{}] * 1_300_000}}
    with open(path, "wb") as out:
        out.write(ZSTD_LEADING_FRAME + zstandard.ZstdCompressor().compress(b"PK\x03\x04")
                  + zstd_trailer(DIGEST_PLACEHOLDER, meta))
    with pytest.raises(CorruptCheckpointError, match="would cost about"):
        ckptio.read_meta(path)
    assert verify_file(path).status == "corrupt"
    assert main(["info", str(path)]) == 1


def test_a_safetensors_header_built_of_empty_arrays_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    header = b'{"x":[' + b"[]," * 1_300_000 + b'[]]}'
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CorruptCheckpointError, match="would cost about"):
        ckptio.read_meta(path)
    assert main(["verify", str(path)]) == 1


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


@pytest.mark.parametrize("stem", ["checkpoint_epoch_1_batch_1\n", "checkpoint_epoch_\u0661_batch_1",
                                  "checkpoint_epoch_1_batch_\uff11", "checkpoint_epoch_1_batch_1x"])
def test_only_plain_ascii_digits_make_a_batch_checkpoint_name(stem: str) -> None:
    # "\u0661" (Arabic-Indic one) and "\uff11" (fullwidth one) are digits to \d and to int(): such a planted name
    # would pass for checkpoint_epoch_1_batch_1 in retention and in --resume auto's order
    assert parse_checkpoint_name(stem) is None
    assert parse_checkpoint_name("checkpoint_epoch_12_batch_340") == (12, 340)


def test_a_small_sealed_torch_checkpoint_with_a_long_trailer_loads(tmp_path: Path) -> None:
    # Before: torch.load (miniz) failed with "negative seek value" / EINVAL on a zip under ~80 KB behind a comment
    # over 4 KiB: a verified manifest of 50 shards, or a small state with long metadata, could not be loaded.
    path = tmp_path / "small.pth"
    write_checkpoint(path, BufferSlot().take({"x": torch.arange(3.0)}), name="small", fmt="torch", compression=None,
                     fsync=False, user_meta={"note": "n" * 6000})
    assert path.stat().st_size < 10_000
    assert verify_file(path).status == "verified"
    assert torch.equal(ckptio.load(path)["x"], torch.arange(3.0))


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_a_shard_table_naming_one_file_twice_through_links_is_damaged(tmp_path: Path, link: Any) -> None:
    # Before: each link was verified again (200 links to one 50 MB shard: 6 s of hashing for 50 MB on disk; a
    # 16 MiB table allows 100,000 of them).
    shards = tmp_path / "checkpoint_epoch_1_batch_1.shards"
    shards.mkdir()
    real = shards / "rank00000-of-00002.safetensors"
    saved = write_checkpoint(real, BufferSlot().take({"w": torch.ones(8)}), name="s", fmt="safetensors",
                             compression=None, fsync=False)
    link(real.name if link is os.symlink else real, shards / "rank00001-of-00002.safetensors")
    table = [{"rank": rank, "file": f"{shards.name}/rank{rank:05d}-of-00002.safetensors", "digest": saved.digest}
             for rank in range(2)]
    manifest = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    write_checkpoint(manifest, BufferSlot().take({"x": torch.zeros(1)}), name="m", fmt="torch", compression=None,
                     fsync=False, shards=table)
    check = verify_file(manifest)
    assert check.status == "corrupt" and "names one file twice" in check.reason
    with pytest.raises(CorruptCheckpointError, match="names one file twice"):
        ckptio.load(manifest)


def test_verify_returns_when_another_process_holds_the_index_lock_forever(tmp_path: Path) -> None:
    # Before: `ckptio verify DIR` hung for as long as anyone able to read .ckptio-index.lock held a shared flock
    # on it (no write permission needed).
    path = tmp_path / "checkpoint_epoch_1_batch_1.safetensors"
    write_checkpoint(path, BufferSlot().take({"w": torch.ones(2)}), name=path.name, fmt="safetensors",
                     compression=None, fsync=False)
    lock = tmp_path / ".ckptio-index.lock"
    lock.touch()
    holder = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        reports: list[ckptio.VerifyReport] = []
        worker = threading.Thread(target=lambda: reports.append(ckptio.verify(tmp_path)), daemon=True)
        worker.start()
        worker.join(2.0 + 5)  # verify.INDEX_WAIT_SECONDS, and time to spare
        assert reports, "verify still waits for the index lock"
        assert reports[0].ok and [c.status for c in reports[0].files] == ["verified"]
    finally:
        os.close(holder)  # the waiting thread now records the result and ends


def test_clean_returns_when_another_process_holds_the_index_lock_forever(tmp_path: Path) -> None:
    older = _periodic(tmp_path, 5, 1_000_000_000_000_000_000)
    newer = _periodic(tmp_path, 10, 2_000_000_000_000_000_000)
    lock = tmp_path / ".ckptio-index.lock"
    lock.touch()
    holder = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        codes: list[int] = []
        worker = threading.Thread(target=lambda: codes.append(main(["clean", str(tmp_path), "--keep-count", "1"])),
                                  daemon=True)
        worker.start()
        worker.join(2.0 + 5)
        assert codes == [0], "clean still waits for the index lock"
        assert newer.exists() and not older.exists()
    finally:
        os.close(holder)


def _sealed_torch(path: Path, state: Any, meta: dict[str, Any]) -> None:
    torch.save(state, path)
    fd = os.open(path, os.O_RDWR)
    try:
        seal_zip_file(fd, meta)
    finally:
        os.close(fd)


def test_slim_refuses_a_checkpoint_whose_tensor_elements_overlap_instead_of_expanding_it(tmp_path: Path) -> None:
    # Before: a 2 KB sealed file holding zeros(1).expand(250_000_000) was rewritten as a 1 GB file (2.1 GB RSS,
    # 8 s) by the trainer's own slim pass; a larger count fills the disk or memory.
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    _sealed_torch(path, {"model_state_dict": {"w": torch.zeros(1).expand(10**12)}, "opt": torch.zeros(2)},
                  {"summary": {}, "name": "x"})
    with pytest.raises(ValueError, match="elements overlap"):
        slim_checkpoint(path, fsync=False)
    assert path.stat().st_size < 10_000


def test_slim_of_a_checkpoint_whose_user_metadata_is_not_a_dict_slims_it(tmp_path: Path) -> None:
    # Before: ValueError("dictionary update sequence element #0 has length 1; 2 is required").
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    _sealed_torch(path, {"model_state_dict": {"w": torch.ones(3)}, "opt": torch.zeros(2)},
                  {"summary": {}, "name": "x", "user": "not a dict", "compression": "zstd"})
    result = slim_checkpoint(path, fsync=False)
    assert result.dropped == ("opt",)
    assert torch.equal(ckptio.load(path)["model_state_dict"]["w"], torch.ones(3))


def test_clean_keeps_a_users_directory_that_merely_ends_in_shards_and_dry_run_lists_real_orphans(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: `ckptio clean --keep-count 5` deleted my_dataset.shards/ and all it held (its --dry-run said nothing).
    _periodic(tmp_path, 5, 1_000_000_000_000_000_000)
    users = tmp_path / "my_dataset.shards"
    users.mkdir()
    (users / "part-0000.tar").write_bytes(b"precious")
    orphan = tmp_path / "checkpoint_epoch_1_batch_2.shards"
    orphan.mkdir()
    (orphan / "rank00001-of-00002.safetensors").write_bytes(b"\0" * 100)
    (orphan / f".rank00001-of-00002.safetensors.1.{'0' * 16}.ckptio-tmp").write_bytes(b"")
    assert main(["clean", str(tmp_path), "--keep-count", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete: checkpoint_epoch_1_batch_2.shards" in out and "my_dataset" not in out
    assert main(["clean", str(tmp_path), "--keep-count", "5"]) == 0
    assert (users / "part-0000.tar").read_bytes() == b"precious"
    assert not orphan.exists()


def _zip_with_records_sharing_one(count: int, elements: int) -> bytes:
    """``torch.save`` of ``count`` tensors, rewritten so that every ``data/K`` name points at ``data/0``'s record
    (the others dropped): ``count`` tensors' worth of loading from one tensor's bytes."""
    buffer = io.BytesIO()
    torch.save([torch.zeros(elements) for _ in range(count)], buffer)
    raw = buffer.getvalue()
    end = raw.rfind(b"PK\x05\x06")
    entries, _, directory_at = struct.unpack("<HII", raw[end + 10 : end + 20])
    central, position = [], directory_at
    for _ in range(entries):
        name_length, extra_length, comment_length = struct.unpack("<HHH", raw[position + 28 : position + 34])
        size = 46 + name_length + extra_length + comment_length
        name = raw[position + 46 : position + 46 + name_length].decode()
        central.append((name, bytearray(raw[position : position + size]),
                        struct.unpack("<I", raw[position + 42 : position + 46])[0]))
        position += size
    starts = [*sorted(local for _, _, local in central), directory_at]
    extent = {start: starts[i + 1] - start for i, start in enumerate(starts[:-1])}
    out, moved = bytearray(), {}
    for name, _, local in sorted(central, key=lambda item: item[2]):
        if not (name.rsplit("/", 2)[-2] == "data" and name.rsplit("/", 1)[-1] != "0"):
            moved[name] = len(out)
            out += raw[local : local + extent[local]]
    first = next(name for name in moved if name.endswith("/data/0"))
    directory = bytearray()
    for name, entry, _ in central:
        entry[42:46] = struct.pack("<I", moved.get(name, moved[first]))
        directory += entry
    return bytes(out + directory + b"PK\x05\x06"
                 + struct.pack("<HHHHIIH", 0, 0, entries, entries, len(directory), len(out), 0))


def test_a_pth_whose_zip_records_share_bytes_is_refused_before_torch_loads_each_name(tmp_path: Path) -> None:
    # Before: 20 names pointing at one 20 MB record made a 20 MB file load as 400 MB (986 MB RSS); a 32 MiB
    # directory holds 700,000 such names.
    path = tmp_path / "overlap.pth"
    path.write_bytes(_zip_with_records_sharing_one(4, 1000))
    assert path.stat().st_size < 8000
    with pytest.raises(CorruptCheckpointError, match="overlap"):
        ckptio.load(path)
    assert verify_file(path).status == "corrupt"
    with pytest.raises(ValueError, match="overlap"):
        load_pretrained(torch.nn.Linear(1, 1), path)


def test_slim_refuses_shifted_views_of_one_storage_instead_of_copying_each(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    base = torch.zeros(1000)
    _sealed_torch(path, {"model_state_dict": {f"w{i}": base[i:] for i in range(500)}, "opt": torch.zeros(2)},
                  {"summary": {}, "name": "x"})
    with pytest.raises(ValueError, match="elements overlap"):
        slim_checkpoint(path, fsync=False)


def test_slim_keeps_working_for_tied_weights_and_slices(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_epoch_1_batch_1.pth"
    shared = torch.arange(6.0)
    state = {"model_state_dict": {"a": shared, "tied": shared, "head": shared[:2], "tail": shared[2:]},
             "opt": torch.zeros(2)}
    write_checkpoint(path, BufferSlot().take(state), name="x", fmt="torch", compression=None, fsync=False)
    assert slim_checkpoint(path, fsync=False).dropped == ("opt",)
    assert torch.equal(ckptio.load(path)["model_state_dict"]["tail"], shared[2:])


@pytest.mark.parametrize("where", ["header", "meta", "trailer"])
def test_an_integer_too_long_to_convert_is_damage_naming_the_file_not_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    # Before: ValueError("Exceeds the limit (4300 digits) ...") escaped as a plain ValueError without the file's
    # name, and the CLI called it a usage error (exit 2).
    big = "9" * 5000
    if where == "trailer":
        path = tmp_path / "big.pth.zst"
        body = ('{"algorithm":"xxh3_128","ckptio":1,"digest":"' + "0" * 32 + '","meta":{"n":' + big + "}}").encode()
        payload = body + struct.pack("<I", len(body)) + b"CKPTIO01"
        trailer = ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload
        path.write_bytes(ZSTD_LEADING_FRAME + zstandard.ZstdCompressor().compress(b"PK\x03\x04") + trailer)
    else:
        path = tmp_path / "big.safetensors"
        metadata = ('"__metadata__":{"ckptio.meta":"{\\"n\\":' + big + '}","ckptio.digest":"' + "0" * 32 + '"}'
                    if where == "meta" else '"n":' + big)
        header = ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' + metadata + "}").encode()
        header += b" " * (-len(header) % 8)
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CorruptCheckpointError, match="not valid JSON|metadata in the safetensors header is damaged"):
        ckptio.load(path)
    assert main(["load", str(path)]) == 1
    assert main(["info", str(path)]) == 1
    assert "big" in capsys.readouterr().err


def test_a_pth_the_weights_only_unpickler_refuses_is_reported_without_advising_weights_only_false(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: the message was torch's first line, which tells the user that re-running with weights_only=False
    # "will likely succeed" - for a file built to run code.
    path = tmp_path / "refused.pth"
    torch.save({"x": 10**6000}, path)
    with pytest.raises(CorruptCheckpointError, match="weights-only load refuses") as caught:
        ckptio.load(path)
    assert "will likely succeed" not in str(caught.value)
    assert main(["load", str(path)]) == 1
    assert "will likely succeed" not in capsys.readouterr().err


def test_pretrained_weights_refused_by_the_weights_only_unpickler_are_reported_without_torchs_advice(
        tmp_path: Path) -> None:
    path = tmp_path / "refused.pth"
    torch.save({"x": 10**6000}, path)
    with pytest.raises(ValueError, match="weights-only load refuses") as caught:
        load_pretrained(torch.nn.Linear(1, 1), path)
    assert "will likely succeed" not in str(caught.value)


def test_a_safetensors_zst_whose_tensors_cover_little_of_its_data_is_refused_before_a_second_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: 8 MiB of zeros behind a one-tensor header was copied whole (bytes(raw)) before safetensors refused
    # it: a zstd bomb cost twice its expansion.
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "weights.safetensors.zst"
    padding = struct.pack("<II", 0x184D2A50, 16_384) + bytes(range(256)) * 64  # a skippable frame: 1024x more room
    path.write_bytes(zstandard.ZstdCompressor().compress(struct.pack("<Q", len(header)) + header
                                                         + b"\0" * (8 * 2**20)) + padding)
    monkeypatch.setattr(fileio.formats, "read_safetensors", _never_read_whole)
    with pytest.raises(CorruptCheckpointError, match="cover 4 bytes"):
        ckptio.load(path)
