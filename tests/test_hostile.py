"""Hostile and damaged files: each is refused with ckptio's own error, nothing from the file ever runs, and
memory stays bounded."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import psutil
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptio
from ckptio import CorruptCheckpointError
from ckptio.fileio import verify_file, write_checkpoint
from ckptio.integrity import DIGEST_PLACEHOLDER, HashingWriter, seal_zip_file, zstd_trailer
from ckptio.snapshot import BufferSlot


def _state() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"epoch": 1, "batch": 2, "w": torch.randn(16, 8, generator=generator), "b": torch.arange(5),
            "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}}


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


def test_a_safetensors_header_with_an_absurd_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header is longer than the file"):
        ckptio.load(path)
    assert verify_file(path).status == "corrupt"


def _sealed_safetensors(path: Path, header: dict, data: bytes) -> None:
    """Hand-made safetensors with a correct ckptio digest, so only structural checks can catch it."""
    header.setdefault("__metadata__", {})["ckptio.digest"] = DIGEST_PLACEHOLDER
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    buffer = io.BytesIO()
    sink = HashingWriter(buffer)
    sink.write(struct.pack("<Q", len(encoded)) + encoded + data)
    raw = buffer.getvalue().replace(DIGEST_PLACEHOLDER.encode(), sink.hexdigest().encode(), 1)
    path.write_bytes(raw)


def test_safetensors_offsets_out_of_range_are_refused_even_with_a_valid_digest(tmp_path: Path) -> None:
    path = tmp_path / "offsets.safetensors"
    _sealed_safetensors(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4000]}}, b"\0" * 16)
    assert verify_file(path).status == "verified"
    with pytest.raises(CorruptCheckpointError, match="offsets.safetensors"):
        ckptio.load(path)


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
    _sealed_safetensors(path, header, b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="meta.safetensors"):
        ckptio.load(path)


@pytest.mark.parametrize("content", [b"", b"\0" * 4096, b"PK\x03\x04" + b"\0" * 100, b"hello"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".pth.zst", ".safetensors.zst"])
def test_empty_zeroed_and_garbage_files_are_flagged_by_verify_and_refused_by_load(
    tmp_path: Path, content: bytes, suffix: str
) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    assert verify_file(path).status == "corrupt"
    with pytest.raises(CorruptCheckpointError, match="bad"):
        ckptio.load(path)


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("real")
    files = {}
    for fmt, suffix in (("torch", ".pth"), ("safetensors", ".safetensors")):
        for compression in (None, "zstd"):
            name = suffix + (".zst" if compression else "")
            path = directory / f"c{name}"
            write_checkpoint(path, BufferSlot().take(_state()), name="c", fmt=fmt, compression=compression,
                             fsync=False)
            files[name] = path.read_bytes()
    return files


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    suffix=st.sampled_from([".pth", ".safetensors", ".pth.zst", ".safetensors.zst"]),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255),
                             st.sampled_from(["flip", "set", "cut", "insert"])), min_size=1, max_size=4),
    check_digest=st.booleans(),
)
def test_fuzzed_checkpoints_only_ever_raise_ckptio_errors_or_load(
    tmp_path: Path, real_checkpoints: dict[str, bytes], suffix: str, edits: list, check_digest: bool
) -> None:
    data = bytearray(real_checkpoints[suffix])
    for where, value, how in edits:
        at = int(where * len(data)) if data else 0
        if how == "flip" and data:
            data[at] ^= value or 1
        elif how == "set" and data:
            data[at] = value
        elif how == "cut":
            del data[at:]
        else:
            data[at:at] = bytes([value]) * 3
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(bytes(data))
    changed = bytes(data) != real_checkpoints[suffix]
    try:
        ckptio.load(path, verify=check_digest)
    except CorruptCheckpointError as exc:
        assert "fuzz" in str(exc)
    else:
        assert not (changed and check_digest), "a changed file loaded although its digest was checked"
    if changed:
        assert verify_file(path).status == "corrupt"
    os.unlink(path)
