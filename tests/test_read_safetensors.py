"""Reading safetensors files: forged headers (absurd lengths, empty arrays, offsets out of range) and padding far
beyond the tensors are refused before the file is read whole; a legitimate file still loads and verifies."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from helpers import SECONDS, _sealed_safetensors, _sealed_safetensors_of, _within

import ckptio
from ckptio import CorruptCheckpointError, fileio
from ckptio.cli import main
from ckptio.fileio import verify_file, write_checkpoint
from ckptio.snapshot import BufferSlot


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


def test_a_safetensors_header_built_of_empty_arrays_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    header = b'{"x":[' + b"[]," * 1_300_000 + b'[]]}'
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CorruptCheckpointError, match="would cost about"):
        ckptio.read_meta(path)
    assert main(["verify", str(path)]) == 1


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


def test_a_safetensors_header_with_an_absurd_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header is longer than the file"):
        ckptio.load(path)
    assert verify_file(path).status == "corrupt"


def test_safetensors_offsets_out_of_range_are_refused_even_with_a_valid_digest(tmp_path: Path) -> None:
    path = tmp_path / "offsets.safetensors"
    _sealed_safetensors_of(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4000]}}, b"\0" * 16)
    assert verify_file(path).status == "verified"
    with pytest.raises(CorruptCheckpointError, match="offsets.safetensors"):
        ckptio.load(path)


def test_a_safetensors_header_length_beyond_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", 2**39))
        file.truncate(2**40)  # the claim fits the file, so only the cap can refuse it

    with pytest.raises(CorruptCheckpointError, match="more than the .* bytes ckptio reads"):
        _within(SECONDS, lambda: ckptio.read_meta(path), tmp_path)
    assert "more than" in _within(SECONDS, lambda: ckptio.verify(path), tmp_path).files[0].reason
