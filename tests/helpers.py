"""Assertions, loaders and builders of hostile or damaged checkpoint files shared by the tests."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import pickle
import struct
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import zstandard

from ckptio.atomic import TEMP_SUFFIX
from ckptio.cli import main
from ckptio.fileio import write_checkpoint
from ckptio.integrity import (
    DIGEST_PLACEHOLDER,
    HashingWriter,
    compute_digest,
    file_reader,
    read_seal,
    seal_zip_file,
    zstd_trailer,
)
from ckptio.snapshot import BufferSlot
from craft_train.config import TrainConfig
from craft_train.model import CRAFT


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Same types, keys (in order), dtypes, shapes and bit-identical tensor values; NaN equals NaN."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.equal(_bits(actual), _bits(expected)), f"{where}: tensor bytes differ"
    elif isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), f"{where}: keys differ"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}/{i}")
    elif isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual!r} is not NaN"
        else:
            assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` (they are scripts, not a package), imported as a module."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class TrainedOnSynthetic:
    """A CRAFT model trained by the real trainer on character-level synthetic text, and where it started
    (the ``trained_on_synthetic`` fixture of conftest.py)."""

    config: TrainConfig
    untrained: CRAFT
    trained: CRAFT
    steps: int
    checkpoint: Path | None = None
    """The run's checkpoint of its last step, when it saved one."""


# -- a CUDA device played on the CPU ----------------------------------------------------------------------------


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on ``cuda:<device_index>``: enough for the snapshot's CUDA branch, whose
    streams and events :class:`FakeCuda` plays. Every tensor operation on it is logged in ``FakeCuda.log``."""

    device_index = 0
    fake: FakeCuda | None = None

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", self.device_index)

    def record_stream(self, stream: Any) -> None:  # type: ignore[override]
        pass

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if cls.fake is not None:
            with torch._C.DisableTorchFunctionSubclass():
                bits = [(a.is_conj(), a.is_neg()) for a in args if isinstance(a, torch.Tensor)]
            cls.fake.log.append((getattr(func, "__name__", str(func)), cls.fake.current, bits))
        return super().__torch_function__(func, types, args, kwargs or {})


class FakeCuda:
    """Stands in for ``torch.cuda``'s devices, streams and events (installed with :meth:`install`): records which
    device is current and which stream is active when each thing happens."""

    def __init__(self) -> None:
        self.current: tuple[str, Any] = ("device", 0)
        self.log: list[tuple[str, Any, Any]] = []
        self.events: list[FakeCuda.Event] = []

    def tensor(self, data: torch.Tensor, device_index: int) -> torch.Tensor:
        kind = type(f"FakeCudaTensorOn{device_index}", (FakeCudaTensor,), {"device_index": device_index,
                                                                            "fake": self})
        return data.as_subclass(kind)

    def install(self, monkeypatch: Any) -> FakeCuda:
        fake = self

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            def __enter__(self) -> None:
                self.previous, fake.current = fake.current, ("device", self.index)
                fake.log.append(("set_device", self.index, None))

            def __exit__(self, *exc: Any) -> None:
                fake.current = self.previous

        class Stream:
            def __init__(self, device: int | None = None) -> None:
                self.device = device

            def wait_stream(self, other: Any) -> None:
                pass

            def wait_event(self, event: Any) -> None:
                pass

        class StreamContext:
            def __init__(self, stream: Any) -> None:
                self.stream = stream

            def __enter__(self) -> None:
                self.previous, fake.current = fake.current, ("stream", self.stream.device)

            def __exit__(self, *exc: Any) -> None:
                fake.current = self.previous

        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", StreamContext)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
        monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: self._event(kwargs))
        return self

    class Event:
        def __init__(self, fake: FakeCuda, kwargs: dict[str, Any]) -> None:
            self.fake, self.kwargs = fake, kwargs
            self.waited_on: list[Any] = []

        def record(self, stream: Any) -> None:
            self.recorded_on = stream.device

        def synchronize(self) -> None:
            self.waited_on.append(self.fake.current)

    def _event(self, kwargs: dict[str, Any]) -> FakeCuda.Event:
        event = FakeCuda.Event(self, kwargs)
        self.events.append(event)
        return event


def jpeg_with_exif_orientation(image_rgb: Any, orientation: int) -> bytes:
    """``image_rgb`` as JPEG bytes whose EXIF orientation tag is ``orientation`` (6: "rotate 90 clockwise").

    Written by hand (an APP1 segment holding one little-endian TIFF IFD entry) so that no EXIF library is needed.
    """
    import struct

    import cv2

    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    data = encoded.tobytes()
    return data[:2] + app1 + data[2:]  # right after the SOI marker


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


def _periodic(directory: Path, step: int, mtime_ns: int, summary_override: Any = None) -> Path:
    path = directory / f"checkpoint_epoch_1_batch_{step}.safetensors"
    if summary_override is None:
        write_checkpoint(path, BufferSlot().take({"global_step": step, "w": torch.ones(2) * step}), name=path.name,
                         fmt="safetensors", compression=None, fsync=False)
    else:
        _sealed_safetensors(path, {"summary": summary_override})
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _sealed_safetensors_of(path: Path, header: dict, data: bytes) -> None:
    """Hand-made safetensors with a correct ckptio digest, so only structural checks can catch it."""
    header.setdefault("__metadata__", {})["ckptio.digest"] = DIGEST_PLACEHOLDER
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    buffer = io.BytesIO()
    sink = HashingWriter(buffer)
    sink.write(struct.pack("<Q", len(encoded)) + encoded + data)
    raw = buffer.getvalue().replace(DIGEST_PLACEHOLDER.encode(), sink.hexdigest().encode(), 1)
    path.write_bytes(raw)


SECONDS = 30  # "returns promptly": generous for a loaded 2-core machine; a hang is what this catches


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


COMBOS = [("torch", None), ("torch", "zstd"), ("safetensors", None), ("safetensors", "zstd")]


COMBO_IDS = ["pth", "pth.zst", "safetensors", "safetensors.zst"]


MiB = 2**20


def periodic(batch: int) -> str:
    return f"checkpoint_epoch_1_batch_{batch}"


def state(batch: int, elements: int = 1000) -> dict[str, Any]:
    return {"epoch": 1, "batch": batch, "w": torch.rand(elements, generator=torch.Generator().manual_seed(batch))}


def visible(directory: Path) -> set[str]:
    return {name for name in os.listdir(directory) if not name.startswith(".")}


def temp_names(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(TEMP_SUFFIX)]
