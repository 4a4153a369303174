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
