"""Reading ``.pth`` files (torch zip archives): forged zip directories, compressed or shared records, pickles
that would run code or that the weights-only unpickler refuses, are refused from their headers with ckptio's own
error, and nothing from the file runs."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import SECONDS, _torch_zip_with, _within

import ckptio
from ckptio import CorruptCheckpointError
from ckptio.cli import main
from ckptio.fileio import verify_file
from ckptio.formats import MAX_ZIP_DIRECTORY
from ckptio.integrity import seal_zip_file
from craft_train.model import load_pretrained


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


class _RunsCode:
    """Pickles into a call of ``open(marker, "w")``: loading must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _sealed_torch_file(path: Path, obj: object) -> None:
    """A .pth sealed exactly as ckptio seals its own (so only weights_only stands in the way)."""
    torch.save(obj, path)
    fd = os.open(path, os.O_RDWR)
    try:
        seal_zip_file(fd, {"summary": {}})
    finally:
        os.close(fd)


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


@pytest.mark.parametrize("sealed", [False, True])
def test_a_pth_whose_pickle_would_run_code_is_refused_and_nothing_runs(tmp_path: Path, sealed: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model_state_dict": {"w": torch.zeros(2)}, "x": _RunsCode(marker)}
    if sealed:
        _sealed_torch_file(path, payload)
    else:
        torch.save(payload, path)
    with pytest.raises(CorruptCheckpointError, match="evil.pth"):
        ckptio.load(path)
    assert verify_file(path).status == ("verified" if sealed else "corrupt")  # the digest is not a trust anchor
    assert not marker.exists()


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
