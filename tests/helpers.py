"""Assertions and loaders shared by the tests."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

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
