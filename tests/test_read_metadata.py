"""Reading the seal: the trailer and ckptio's metadata. Trailers built to be expensive to parse, metadata that is
not what ckptio wrote and integers too long to convert are damage naming the file; a long legitimate trailer loads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import zstandard
from helpers import _sealed_safetensors_of

import ckptio
from ckptio import CorruptCheckpointError
from ckptio.cli import main
from ckptio.fileio import verify_file, write_checkpoint
from ckptio.integrity import (
    DIGEST_PLACEHOLDER,
    ZSTD_LEADING_FRAME,
    ZSTD_SKIPPABLE_MAGIC,
    zstd_trailer,
)
from ckptio.snapshot import BufferSlot


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


def test_a_small_sealed_torch_checkpoint_with_a_long_trailer_loads(tmp_path: Path) -> None:
    # Before: torch.load (miniz) failed with "negative seek value" / EINVAL on a zip under ~80 KB behind a comment
    # over 4 KiB: a verified manifest of 50 shards, or a small state with long metadata, could not be loaded.
    path = tmp_path / "small.pth"
    write_checkpoint(path, BufferSlot().take({"x": torch.arange(3.0)}), name="small", fmt="torch", compression=None,
                     fsync=False, user_meta={"note": "n" * 6000})
    assert path.stat().st_size < 10_000
    assert verify_file(path).status == "verified"
    assert torch.equal(ckptio.load(path)["x"], torch.arange(3.0))


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


@pytest.mark.parametrize("skeleton", [
    "not json",
    json.dumps({"tensors": ["w"], "tree": {"T": 5}}),
    json.dumps({"tensors": ["missing"], "tree": {"T": 0}}),
    json.dumps({"tensors": ["w"], "tree": {"X": 1}}),
    json.dumps({"tensors": ["w"], "tree": {"D": [[1, {"T": 0}], [2]]}}),
    json.dumps({"tensors": "w", "tree": {"F": "1e999"}}),
    "[" * 100_000 + "]" * 100_000,
])
def test_ckptio_metadata_that_is_not_what_we_wrote_is_refused(tmp_path: Path, skeleton: str) -> None:
    path = tmp_path / "meta.safetensors"
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "__metadata__": {"ckptio.skeleton": skeleton, "ckptio.meta": "{}"}}
    _sealed_safetensors_of(path, header, b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="meta.safetensors"):
        ckptio.load(path)
