"""Smoke tests for the benchmark scripts: they run end to end on a tiny state and report every method."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def save_latency() -> ModuleType:
    return _load("save_latency")


def test_save_latency_reports_every_method_with_positive_numbers(save_latency: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = save_latency.main(["--states", "1MB", "--reps", "1", "--zstd-on", "1MB", "--out", str(out), "--no-chart",
                           "--no-extra-rounds"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    expected = {m.name for m in save_latency.build_methods(with_zstd=True)}
    rows = {r["method"]: r for r in doc["results"] if r["state"] == "1MB"}
    assert set(rows) == expected
    assert {"ckptio async torch", "ckptio sync safetensors +zstd", "dcp.async_save", "torch.save + fsync",
            "safetensors.save_file + fsync"} <= expected
    for name, row in rows.items():
        assert row["reps"] == 1, name
        assert row["stall_s"]["median"] > 0, name
        assert row["durable_s"]["median"] >= row["stall_s"]["median"] > 0, name
        assert row["stall_over_memcpy_floor"] > 0 and row["durable_over_write_floor"] > 0, name
        if name != save_latency.FLOOR_MEMCPY:
            assert row["bytes_on_disk"] > 0.5e6, name
    assert doc["states"]["1MB"]["tensor_bytes"] > 0.9e6
    assert doc["machine"]["torch"] and doc["machine"]["logical_cores"] >= 1
    table = (out / "results.md").read_text()
    assert "| 1MB | ckptio async torch |" in table
    assert not any(out.glob("save_latency_*")), "the benchmark's scratch directory was left behind"


def test_synthetic_state_mixes_big_and_small_tensors(save_latency: ModuleType) -> None:
    bench = save_latency.synthetic_state(2 * 10**6)
    sizes = sorted(t.numel() * t.element_size() for t in bench.tensors)
    assert 1.9e6 < bench.tensor_bytes < 2.1e6
    assert sum(1 for s in sizes if s <= 4096) >= 40
    assert sizes[-1] > 0.3e6


def test_train_overhead_imports_without_running(tmp_path: Path) -> None:
    module = _load("train_overhead")
    assert callable(module.main)
    assert [c.save_freq for c in module.DEFAULT_CONFIGS] == [0, 1, 1, 10, 10]


def test_train_overhead_analysis_derives_every_100_steps_from_measured_costs() -> None:
    module = _load("train_overhead")
    configs = module.DEFAULT_CONFIGS
    step = 1.0  # seconds per step without checkpoints
    extra = {"no checkpoints": 0.0, "sync, every step": 0.5, "async, every step": 0.1,
             "sync, every 10 steps": 0.5, "async, every 10 steps": 0.05}  # seconds per save
    segments = []
    for r in range(2):
        for c in configs:
            saves = 0 if not c.save_freq else 10 // c.save_freq
            segments.append(module.Segment(
                config=c.name, round=r, steps=10, seconds=10 * step + saves * extra[c.name], saves=saves,
                blocked_seconds=saves * (extra[c.name] if not c.async_save else 0.01), final_wait_seconds=0.0,
                writer_cpu_seconds=saves * 0.2 if c.async_save else 0.0, step_seconds=[step] * 10))
    analysis = module.analyse(segments, configs)
    rows = {r["config"]: r for r in analysis["rows"]}
    assert rows["sync, every step"]["overhead_percent"] == pytest.approx(50.0)
    assert rows["async, every 10 steps"]["cost_per_save_s"] == pytest.approx(0.05)
    derived = {d["config"]: d for d in analysis["derived"]}
    assert derived["async, every 100 steps"]["overhead_percent"] == pytest.approx(0.05)
    assert derived["async, every 100 steps"]["overhead_percent_blocked_only"] == pytest.approx(0.01)
    assert derived["async, every 100 steps"]["overhead_percent_blocked_plus_writer_cpu"] == pytest.approx(0.21)
    assert derived["sync, every 100 steps"]["overhead_percent"] == pytest.approx(0.5)
    assert "**derived**" in module.markdown_table(analysis)
