"""Reading zstd-compressed checkpoints: a file that claims or expands to more than its recorded raw size, sealed or
not, is refused with bounded memory; a file within the expansion limit still loads."""

from __future__ import annotations

import zipfile
from pathlib import Path

import psutil
import pytest
import zstandard
from helpers import _ZERO_BOMB, _sealed_zstd, _torch_zip_with, _write_real

import ckptio
from ckptio import CorruptCheckpointError
from ckptio.fileio import MAX_ZSTD_EXPANSION
from ckptio.integrity import DIGEST_PLACEHOLDER, HashingWriter, zstd_trailer


def test_a_zstd_bomb_beyond_its_recorded_size_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pth.zst"
    body = zstandard.ZstdCompressor(level=19).compress(b"\0" * (512 * 2**20))
    with open(path, "wb") as raw:
        sink = HashingWriter(raw)
        sink.write(body)
        meta = {"raw_size": 4096, "summary": {}}
        sink.seal_with(zstd_trailer(DIGEST_PLACEHOLDER, meta), lambda digest: zstd_trailer(digest, meta))
    before = psutil.Process().memory_info().rss
    with pytest.raises(CorruptCheckpointError, match="expands beyond|expands to"):
        ckptio.load(path)
    assert psutil.Process().memory_info().rss - before < 128 * 2**20


def test_an_unsealed_zstd_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pth.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(b"\0" * (512 * 2**20)))
    before = psutil.Process().memory_info().rss
    with pytest.raises(CorruptCheckpointError, match="beyond|does not start a torch zip"):
        ckptio.load(path)
    assert psutil.Process().memory_info().rss - before < 128 * 2**20


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
