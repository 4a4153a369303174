"""Tests for ckptio.fileio (with formats and integrity): sealed files, standard readers, damage detection."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import zstandard
from helpers import assert_same, state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import ckptio
import ckptio.atomic
import ckptio.dir_index
import ckptio.naming
from ckptio import CheckpointManager, CheckpointWriteError, CorruptCheckpointError
from ckptio.fileio import load, read_meta, verify_file, write_checkpoint
from ckptio.naming import file_name
from ckptio.snapshot import BufferSlot

COMBOS = [("torch", None), ("torch", "zstd"), ("safetensors", None), ("safetensors", "zstd")]
COMBO_IDS = ["pth", "pth.zst", "safetensors", "safetensors.zst"]


# -- helpers ---------------------------------------------------------------------------------------------------




def sample_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=g)
    return {
        "epoch": 1,
        "batch": 100,
        "loss": float("nan"),
        "best": float("inf"),
        "model_state_dict": OrderedDict(
            [("w", weight), ("w_t", weight.t()), ("b", torch.randn(3, generator=g).to(torch.bfloat16))]
        ),
        "optimizer_state_dict": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4, 3)}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0], "foreach": None}],
        },
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 2, dtype=torch.int64),
        "scalar": torch.tensor(-0.0, dtype=torch.float64),
        "specials": torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=torch.float16),
        "tags": ["a", "b"],
    }


def write(directory: Path, fmt: str, compression: str | None, state: Any, name: str = "ckpt"
          ) -> ckptio.SavedCheckpoint:
    path = directory / file_name(name, fmt, compression)
    return write_checkpoint(path, BufferSlot().take(state), name=name, fmt=fmt, compression=compression,
                            fsync=False)


def damage_outcome(path: Path) -> str | None:
    """``None`` when both ``verify_file`` and ``load`` report the damage properly, else what went wrong."""
    problems = []
    check = verify_file(path)
    if check.status != "corrupt":
        problems.append(f"verify={check.status}")
    try:
        load(path)
    except CorruptCheckpointError as exc:
        if path.name not in str(exc):
            problems.append("load error does not name the file")
    except Exception as exc:
        problems.append(f"load raised {type(exc).__name__}: {str(exc)[:60]}")
    else:
        problems.append("load succeeded")
    return ", ".join(problems) or None


def summarize(misses: list[tuple[int, str]], size: int) -> str:
    misses = sorted(misses)
    shown = "; ".join(f"@{pos}/{size}: {what}" for pos, what in misses[:8])
    return f"{len(misses)} undetected (first: {shown}; last at {misses[-1][0]})" if misses else ""


# -- round trips and standard readers --------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_written_file_loads_back_to_an_equal_state(tmp_path, fmt, compression) -> None:
    state = sample_state()
    saved = write(tmp_path, fmt, compression, state)
    assert_same(load(saved.path), state)
    assert_same(load(saved.path, map_location="cpu"), state)


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_written_file_is_sealed_with_its_digest_and_meta(tmp_path, fmt, compression) -> None:
    saved = write(tmp_path, fmt, compression, sample_state(), name="checkpoint_epoch_1_batch_100")
    expected_name = "checkpoint_epoch_1_batch_100" + {"torch": ".pth", "safetensors": ".safetensors"}[fmt]
    assert saved.path.name == expected_name + (".zst" if compression else "")
    assert saved.size == saved.path.stat().st_size
    check = verify_file(saved.path)
    assert check.status == "verified" and check.ok
    assert check.digest == saved.digest
    seal, size = read_meta(saved.path)
    assert seal is not None and seal.digest == saved.digest and size == saved.size
    assert seal.meta["name"] == "checkpoint_epoch_1_batch_100"
    assert seal.meta["format"] == fmt and seal.meta["compression"] == compression
    assert seal.meta["summary"] == {"epoch": 1, "batch": 100, "loss": "nan", "best": "inf"}
    assert seal.meta["tensors"] == 9


def test_plain_torch_load_with_weights_only_reads_our_pth_file(tmp_path) -> None:
    state = sample_state()
    saved = write(tmp_path, "torch", None, state)
    assert_same(torch.load(saved.path, weights_only=True), state)


def test_plain_zstd_decoder_and_torch_load_read_our_pth_zst_file(tmp_path) -> None:
    state = sample_state()
    saved = write(tmp_path, "torch", "zstd", state)
    reader = zstandard.ZstdDecompressor().stream_reader(saved.path.read_bytes(), read_across_frames=True)
    assert_same(torch.load(io.BytesIO(reader.read()), weights_only=True), state)


def test_safe_open_reads_our_safetensors_file_with_key_paths_as_tensor_names(tmp_path) -> None:
    state = sample_state()
    saved = write(tmp_path, "safetensors", None, state)
    with safe_open(saved.path, framework="pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("model_state_dict/w"), state["model_state_dict"]["w"])
        assert torch.equal(f.get_tensor("optimizer_state_dict/state/0/step"), torch.tensor(3.0))
        assert torch.equal(f.get_tensor("mask"), state["mask"])
        assert {"ckptio.digest", "ckptio.meta", "ckptio.skeleton"} <= set(f.metadata())
    assert "model_state_dict/w_t" in names and "empty" in names and "scalar" in names
    flat = safetensors.torch.load_file(saved.path)
    assert torch.equal(flat["model_state_dict/w_t"], state["model_state_dict"]["w_t"])


def test_both_formats_load_to_the_same_structure(tmp_path) -> None:
    state = sample_state()
    results = [load(write(tmp_path, fmt, compression, state).path) for fmt, compression in COMBOS]
    for result in results:
        assert_same(result, results[0])


def test_the_same_tensor_twice_loads_as_one_tensor_in_both_places(tmp_path) -> None:
    shared = torch.arange(6.0)
    for fmt in ("torch", "safetensors"):
        loaded = load(write(tmp_path, fmt, None, {"a": shared, "b": [shared]}).path)
        assert loaded["a"] is loaded["b"][0]
        assert torch.equal(loaded["a"], shared)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_a_conjugate_view_loads_with_its_own_values(tmp_path, fmt) -> None:
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    loaded = load(write(tmp_path, fmt, None, {"z": z, "z_conj": z.conj()}).path)
    assert torch.equal(loaded["z"], z)
    assert torch.equal(loaded["z_conj"].resolve_conj(), torch.tensor([1 - 2j, 3 + 4j], dtype=torch.complex64))


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_many_top_level_string_scalars_can_be_saved(tmp_path, fmt, compression) -> None:
    state: dict[str, Any] = {f"note_{i}": "n" * 150 for i in range(500)}
    state["w"] = torch.ones(2)
    assert_same(load(write(tmp_path, fmt, compression, state).path), state)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))
small_tensors = st.builds(
    lambda dtype, shape, seed: (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(dtype),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]),
    st.sampled_from([(), (0,), (2,), (2, 2)]),
    st.integers(0, 1000),
)
keys = st.one_of(st.integers(0, 100), st.text(max_size=5))
states = st.recursive(
    st.one_of(scalars, small_tensors),
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=3),
        st.dictionaries(keys, children, max_size=3).map(OrderedDict),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=8,
)


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=states)
def test_any_nested_state_survives_a_file_round_trip(tmp_path, fmt, compression, state) -> None:
    saved = write(tmp_path, fmt, compression, state)
    assert_same(load(saved.path), state)
    assert verify_file(saved.path).status == "verified"


# -- damage detection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0xFF, 0x01], ids=["all-bits", "low-bit"])
@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_a_flipped_byte_anywhere_is_detected_by_load_and_verify(tmp_path, fmt, compression, mask) -> None:
    state = {"w": torch.randn(3, 3, generator=torch.Generator().manual_seed(3)), "step": 7, "lr": [0.1]}
    path = write(tmp_path, fmt, compression, state).path
    original = path.read_bytes()
    misses = []
    with open(path, "r+b", buffering=0) as file:
        for position in range(len(original)):  # header, middle and end: every byte of a small file
            file.seek(position)
            file.write(bytes([original[position] ^ mask]))
            outcome = damage_outcome(path)
            if outcome:
                misses.append((position, outcome))
            file.seek(position)
            file.write(original[position : position + 1])
    assert path.read_bytes() == original
    assert not misses, summarize(misses, len(original))


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_truncation_at_any_offset_is_detected_by_load_and_verify(tmp_path, fmt, compression) -> None:
    state = {"w": torch.randn(3, 3, generator=torch.Generator().manual_seed(4)), "step": 7}
    path = write(tmp_path, fmt, compression, state).path
    original = path.read_bytes()
    misses = []
    for length in range(len(original) - 1, -1, -1):  # every shorter length, down to an empty file
        os.truncate(path, length)
        outcome = damage_outcome(path)
        if outcome:
            misses.append((length, outcome))
    assert not misses, summarize(misses, len(original))


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_corruption_is_reported_with_the_file_name_and_a_digest_mismatch(tmp_path, fmt, compression) -> None:
    state = {"w": torch.zeros(64)}
    path = write(tmp_path, fmt, compression, state).path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError) as info:
        load(path)
    assert info.value.path == path
    assert str(info.value).startswith(str(path))
    assert isinstance(info.value, ValueError)
    check = verify_file(path)
    assert check.status == "corrupt" and not check.ok and check.reason


@pytest.mark.parametrize("suffix", [".pth", ".pth.zst", ".safetensors", ".safetensors.zst"])
def test_an_empty_file_is_corrupt(tmp_path, suffix) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=rf"empty{suffix}: the file is empty"):
        load(path)
    check = verify_file(path)
    assert check.status == "corrupt" and check.reason == "the file is empty"


@pytest.mark.parametrize(
    ("written", "renamed", "message"),
    [
        (("torch", "zstd"), "ckpt.pth", "name it .pth.zst"),
        (("torch", None), "ckpt.pth.zst", "not a zstd stream"),
        (("safetensors", None), "ckpt.pth", "not a torch zip file"),
        (("safetensors", "zstd"), "ckpt.safetensors", "safetensors"),
        (("torch", None), "ckpt.safetensors", "safetensors"),
    ],
    ids=["zst-named-pth", "pth-named-zst", "safetensors-named-pth", "zst-named-safetensors", "pth-named-safetensors"],
)
def test_a_file_with_the_wrong_suffix_is_reported_corrupt(tmp_path, written, renamed, message) -> None:
    saved = write(tmp_path, *written, {"w": torch.ones(3)})
    target = tmp_path / "renamed"
    target.mkdir()
    path = saved.path.rename(target / renamed)
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        load(path)
    assert renamed in str(info.value)
    assert verify_file(path).status == "corrupt"


def test_an_unknown_suffix_is_a_value_error_listing_the_known_ones(tmp_path) -> None:
    path = tmp_path / "ckpt.txt"
    path.write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"unknown checkpoint suffix; expected \.pth, \.safetensors"):
        load(path)
    assert verify_file(path).status == "corrupt"


def test_files_larger_than_the_io_chunks_round_trip_and_verify(tmp_path) -> None:
    g = torch.Generator().manual_seed(7)
    state = {"big": torch.rand(2_400_000, generator=g), "small": torch.arange(5)}  # about 9.2 MiB
    for fmt, compression in COMBOS:
        saved = write(tmp_path, fmt, compression, state)
        assert verify_file(saved.path).status == "verified"
        assert_same(load(saved.path), state)


@pytest.mark.parametrize("threads", [0, 2, -1])
def test_multithreaded_zstd_files_round_trip_and_verify(tmp_path, threads) -> None:
    state = {"w": torch.rand(300_000, generator=torch.Generator().manual_seed(8)), "step": 3}
    path = tmp_path / "c.pth.zst"
    write_checkpoint(path, BufferSlot().take(state), name="c", fmt="torch", compression="zstd", threads=threads,
                     level=1, fsync=False)
    assert verify_file(path).status == "verified"
    assert_same(load(path), state)


def test_colliding_key_paths_get_distinct_safetensors_names(tmp_path) -> None:
    state = {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}, "__metadata__": torch.full((1,), 2.0),
             "a/b#2": torch.full((1,), 3.0), "": torch.full((1,), 4.0), "tensor": torch.full((1,), 5.0)}
    saved = write(tmp_path, "safetensors", None, state)
    assert_same(load(saved.path), state)
    with safe_open(saved.path, framework="pt") as f:
        assert len(list(f.keys())) == 6


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_a_copied_file_verifies_and_loads_alone_in_another_directory(tmp_path, fmt, compression) -> None:
    state = sample_state()
    (tmp_path / "run").mkdir()
    saved = write(tmp_path / "run", fmt, compression, state)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = Path(shutil.copy(saved.path, elsewhere))
    shutil.rmtree(tmp_path / "run")
    report = ckptio.verify(copy, record=False)
    assert [c.status for c in report.files] == ["verified"]
    assert report.files[0].digest == saved.digest
    assert_same(load(copy), state)


def test_a_plain_torch_save_file_loads_and_verifies_as_unsealed(tmp_path) -> None:
    state = {"w": torch.randn(2, 2), "epoch": 3, "betas": (0.9, 0.99)}
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    assert_same(load(path), state)
    check = verify_file(path)
    assert check.status == "unsealed" and check.ok and check.digest is None
    report = ckptio.verify(path, record=False)
    assert report.ok and [c.status for c in report.files] == ["unsealed"]


def test_a_plain_zstd_compressed_torch_file_loads_and_verifies_as_unsealed(tmp_path) -> None:
    state = {"w": torch.randn(2, 2)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = tmp_path / "plain.pth.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(buffer.getvalue()))
    assert_same(load(path), state)
    assert verify_file(path).status == "unsealed"


def test_a_plain_safetensors_file_loads_as_its_flat_mapping_and_verifies_as_unsealed(tmp_path) -> None:
    tensors = {"encoder.weight": torch.randn(2, 3), "encoder.bias": torch.zeros(3)}
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, path)
    loaded = load(path)
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert verify_file(path).status == "unsealed"


def test_a_damaged_plain_torch_file_is_corrupt_even_without_a_digest(tmp_path) -> None:
    path = tmp_path / "plain.pth"
    torch.save({"w": torch.randn(2, 2)}, path)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(CorruptCheckpointError, match=r"plain\.pth"):
        load(path)
    assert verify_file(path).status == "corrupt"


def test_verify_of_a_directory_reports_each_checkpoint_file_and_flags_the_damaged_one(tmp_path) -> None:
    good = write(tmp_path, "torch", None, {"w": torch.ones(4)}, name="good")
    bad = write(tmp_path, "safetensors", "zstd", {"w": torch.ones(4)}, name="bad")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    data = bytearray(bad.path.read_bytes())
    data[20] ^= 0xFF
    bad.path.write_bytes(data)
    report = ckptio.verify(tmp_path)
    statuses = {c.path.name: c.status for c in report.files}
    assert statuses == {"good.pth": "verified", "bad.safetensors.zst": "corrupt", "plain.pth": "unsealed"}
    assert not report.ok
    assert [c.path for c in report.corrupt] == [bad.path]
    assert good.path.exists()


def test_verify_and_load_of_a_missing_path_raise_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        ckptio.verify(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load(tmp_path / "nope.pth")
    assert verify_file(tmp_path / "nope.pth").status == "corrupt"


def test_load_of_a_directory_asks_for_a_file_inside_it(tmp_path) -> None:
    directory = tmp_path / "run.pth"
    directory.mkdir()
    with pytest.raises(IsADirectoryError, match="name a checkpoint file inside it"):
        load(directory)


# -- atomic writes ---------------------------------------------------------------------------------------------


def test_rewriting_a_name_replaces_the_file_whole(tmp_path) -> None:
    write(tmp_path, "torch", None, {"v": torch.zeros(3)})
    saved = write(tmp_path, "torch", None, {"v": torch.ones(3)})
    assert torch.equal(load(saved.path)["v"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_a_failed_write_leaves_no_temporary_file_and_keeps_the_previous_checkpoint(tmp_path) -> None:
    previous = write(tmp_path, "safetensors", None, {"v": torch.ones(3)})
    before = previous.path.read_bytes()
    with pytest.raises(ValueError, match="safetensors cannot store"):
        write(tmp_path, "safetensors", None, {"v": torch.ones(3, dtype=torch.complex128)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    assert previous.path.read_bytes() == before


def test_the_meta_records_the_user_metadata_and_sizes(tmp_path) -> None:
    path = tmp_path / "m.pth.zst"
    saved = write_checkpoint(path, BufferSlot().take({"w": torch.zeros(10)}), name="m", fmt="torch",
                             compression="zstd", fsync=False, user_meta={"git": "abc123"})
    seal, _ = read_meta(path)
    assert seal is not None
    assert seal.meta["user"] == {"git": "abc123"}
    assert seal.meta["elements"] == 10 and seal.meta["tensor_bytes"] == 40
    assert isinstance(seal.meta["raw_size"], int) and seal.meta["raw_size"] > saved.size // 2
    json.dumps(seal.meta)


def test_a_sealed_safetensors_checkpoint_is_read_once_to_load_and_verify(tmp_path, monkeypatch) -> None:
    # One pass: each tensor's bytes go from the file into the tensor and are hashed there, instead of a hash
    # pass followed by a second read of the whole file.
    import ckptio.fileio as fileio

    state = {"w": torch.randn(256, 256), "b": torch.arange(1000), "h": torch.ones(7, dtype=torch.bfloat16)}
    saved = write(tmp_path, "safetensors", None, state)
    read = [0]
    real_pread, real_preadv, real_read_all = os.pread, os.preadv, fileio._read_all

    def pread(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        read[0] += len(data)
        return data

    def preadv(fd: int, buffers: Any, offset: int) -> int:
        n = real_preadv(fd, buffers, offset)
        read[0] += n
        return n

    def read_all(fd: int, size: int) -> bytes:
        data = real_read_all(fd, size)
        read[0] += len(data)
        return data

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(fileio, "_read_all", read_all)
    assert_same(load(saved.path), state)
    size = saved.path.stat().st_size
    header = size - sum(t.numel() * t.element_size() for t in state.values())
    assert read[0] <= size + 3 * header, f"read {read[0]} bytes of a {size}-byte file"


# -- what a reader could not read back is refused when it is saved ---------------------------------------------


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_thirty_emoji_strings_of_199_characters_fit_in_every_format(tmp_path, fmt, compression) -> None:
    emoji = {f"note{i}": "\N{GRINNING FACE}" * 199 for i in range(30)}
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        mgr.save({**state(1), **emoji}, name="c")
    loaded = ckptio.load(mgr.path_for("c"))
    assert {k: loaded[k] for k in emoji} == emoji
    summary = ckptio.read_meta(mgr.path_for("c"))[0].meta["summary"]
    assert len(json.dumps(summary)) <= 8192


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_a_name_too_long_for_its_temporary_file_is_refused_in_save_naming_the_limit(tmp_path, fmt,
                                                                                   compression) -> None:
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        with pytest.raises(ValueError, match=r"may be at most \d+ bytes"):
            mgr.save(state(1), name="n" * 230)
        with pytest.raises(ValueError) as refused:
            mgr.save(state(1), name="n" * 300)
        longest = int(str(refused.value).split("at most ")[1].split()[0])
        mgr.save(state(1), name="n" * longest)  # the limit itself works, in the background too
        mgr.wait()
    assert ckptio.verify(tmp_path).ok


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2])
def test_dtypes_safetensors_cannot_store_are_refused_in_save_pointing_to_the_torch_format(tmp_path, dtype) -> None:
    with CheckpointManager(tmp_path, format="safetensors") as mgr:
        with pytest.raises(ValueError, match="format='torch'"):
            mgr.save({"w": torch.zeros(16, dtype=torch.uint8).view(dtype)}, name="c")
        assert mgr.pending == 0
    with CheckpointManager(tmp_path / "torch", format="torch") as mgr:
        mgr.save({"w": torch.zeros(16, dtype=torch.uint8).view(dtype)}, name="c")
    assert ckptio.load(mgr.path_for("c"))["w"].dtype == dtype


@pytest.mark.parametrize(("fmt", "compression"), COMBOS, ids=COMBO_IDS)
def test_two_distinct_empty_tensors_load_as_two_objects_and_one_shared_stays_shared(tmp_path, fmt,
                                                                                   compression) -> None:
    a, b = torch.zeros(0), torch.empty(0)
    with CheckpointManager(tmp_path, format=fmt, compression=compression) as mgr:
        mgr.save({"a": a, "b": b, "again": a}, name="c")
    loaded = ckptio.load(mgr.path_for("c"))
    assert loaded["a"] is not loaded["b"]
    assert loaded["a"] is loaded["again"]


def test_a_state_whose_safetensors_header_would_be_unreadable_is_refused_when_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptio.formats

    # 200 tensors need at least 25,200 header bytes and take ~38,000: over 30,000 only the exact header tells
    monkeypatch.setattr(ckptio.formats, "MAX_SAFETENSORS_HEADER", 30_000)  # 150,000 tensors would take minutes
    many = {f"layer{i:03}.weight_with_a_long_name": torch.zeros(1) for i in range(200)}
    with CheckpointManager(tmp_path, async_save=False, format="safetensors") as mgr:
        with pytest.raises(CheckpointWriteError, match="use format='torch'"):
            mgr.save(many, name="big")
    assert not list(tmp_path.glob("big*"))


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_torch_state_whose_zip_directory_would_be_unreadable_is_refused_before_it_is_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str | None) -> None:
    import ckptio.formats

    monkeypatch.setattr(ckptio.formats, "MAX_ZIP_DIRECTORY", 4096)  # 500,000 tensors would take minutes
    many = {f"layer{i:03}.weight": torch.zeros(1) for i in range(200)}  # ~60 bytes of directory each
    with CheckpointManager(tmp_path, async_save=False, compression=compression) as mgr:
        with pytest.raises(CheckpointWriteError, match="zip directory would be .* use format='safetensors'"):
            mgr.save(many, name="big")
        mgr.save({"w": torch.zeros(3)}, name="small")  # a state within the cap is still written
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "small.pth" + (".zst" if compression else "")]


def test_metadata_whose_trailer_would_cost_too_much_to_parse_is_refused_before_it_is_committed(
        tmp_path: Path) -> None:
    nested = {"runs": [{}] * 1_500_000}  # 4.5 MB of JSON, within the trailer's length, ~230 MiB to parse
    with CheckpointManager(tmp_path, async_save=False, compression="zstd", fsync=False) as mgr:
        with pytest.raises(CheckpointWriteError, match="metadata= nests too many"):
            mgr.save({"w": torch.zeros(3)}, name="meta", metadata=nested)
    assert not list(tmp_path.glob("meta*"))


def test_a_state_whose_safetensors_header_certainly_passes_the_cap_is_refused_in_save_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptio.formats

    monkeypatch.setattr(ckptio.formats, "MAX_SAFETENSORS_HEADER", 20_000)
    many = {f"layer{i:03}.weight_with_a_long_name": torch.zeros(1) for i in range(200)}
    with CheckpointManager(tmp_path, format="safetensors") as mgr:
        with pytest.raises(ValueError, match="use format='torch'") as refused:
            mgr.save(many, name="big")  # asynchronous: only a check in save() itself can raise here
        assert not isinstance(refused.value, CheckpointWriteError)
        assert mgr.stats.requested == 0
    assert not list(tmp_path.glob("big*"))
