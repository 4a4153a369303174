"""Any file in a checkpoint directory: empty, zeroed, random or crafted bytes, truncations and special files (fifos,
links to devices, loops) get a clear answer from ``ckptio.load`` / ``ckptio.verify`` and every CLI command, promptly,
without a traceback, and within the memory bound docs/guarantees.md documents."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import zstandard
from helpers import (
    SECONDS,
    _assert_clear,
    _cli,
    _crafted,
    _damage_index,
    _sealed_zstd,
    _within,
    _write_real,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptio
from ckptio import CorruptCheckpointError
from ckptio.fileio import verify_file, write_checkpoint
from ckptio.snapshot import BufferSlot


def _training_state() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"epoch": 1, "batch": 2, "w": torch.randn(16, 8, generator=generator), "b": torch.arange(5),
            "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}}


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("real")
    files = {}
    for fmt, suffix in (("torch", ".pth"), ("safetensors", ".safetensors")):
        for compression in (None, "zstd"):
            name = suffix + (".zst" if compression else "")
            path = directory / f"c{name}"
            write_checkpoint(path, BufferSlot().take(_training_state()), name="c", fmt=fmt, compression=compression,
                             fsync=False)
            files[name] = path.read_bytes()
    return files


SUFFIXES = [".pth", ".safetensors", ".pth.zst", ".safetensors.zst"]


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


def test_files_built_to_exhaust_memory_are_refused_within_the_documented_bound(tmp_path: Path) -> None:
    """256 MiB over the process's size before the calls (the README's bound; these files hold no legitimate
    data). A reader that trusts their headers spends more than 1 GiB on each."""
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
