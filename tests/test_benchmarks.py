"""Smoke tests for the benchmark scripts: they run end to end on a tiny state and report every method."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType

import psutil
import pytest
from helpers import load_benchmark


def _load(name: str) -> ModuleType:
    return load_benchmark(name)


@pytest.fixture(scope="module")
def save_latency() -> ModuleType:
    return _load("save_latency")


def test_save_latency_reports_every_method_with_positive_numbers(save_latency: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = save_latency.main(["--states", "1MB", "--reps", "1", "--zstd-on", "1MB", "--out", str(out), "--no-chart",
                           "--no-extra-rounds", "--no-dcp-best"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    expected = {m.name for m in save_latency.build_methods(with_zstd=True, dcp_best=False)}
    rows = {r["method"]: r for r in doc["results"] if r["state"] == "1MB"}
    assert set(rows) == expected
    assert {"ckptio async torch", "ckptio sync safetensors +zstd", "dcp.async_save", "torch.save + fsync",
            "safetensors.save_file + fsync"} <= expected
    for name, row in rows.items():
        assert row["reps"] == 1, name
        assert row["stall_s"]["median"] > 0, name
        assert row["durable_s"]["median"] >= row["stall_s"]["median"] > 0, name
        assert row["stall_over_memcpy_floor"] > 0 and row["durable_over_write_floor"] > 0, name
        assert len(row["first_saves"]) >= 2 and all(s["stall_s"] > 0 for s in row["first_saves"]), name
        assert isinstance(row["held_bytes"], int), name
        if name != save_latency.FLOOR_MEMCPY:
            assert row["bytes_on_disk"] > 0.5e6, name
    assert doc["states"]["1MB"]["tensor_bytes"] > 0.9e6
    assert doc["machine"]["torch"] and doc["machine"]["logical_cores"] >= 1
    table = (out / "results.md").read_text()
    assert "| 1MB | ckptio async torch |" in table
    if save_latency.process_writer_available():
        assert "ckptio process torch" in rows
    assert not any(out.glob("save_latency_*")), "the benchmark's scratch directory was left behind"


def test_dcp_best_mode_initialises_under_a_relative_output_directory_that_is_new(
        save_latency: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--out bench_out` (the default) is relative: as a file:// URL its first component read as a host name, and
    # the process group's store then waited 300 s for a directory that did not exist.
    monkeypatch.chdir(tmp_path)
    setup = save_latency.DcpBestSetup(cuda=False, store=Path("bench_out/run/dcp_best/pg_store"))
    setup.close()


def test_a_method_that_overruns_its_bound_is_reported_and_the_others_are_measured(
        save_latency: ModuleType, tmp_path: Path) -> None:
    release = threading.Event()

    class Stuck(save_latency.Method):
        name = "stuck"

        def run(self, tag: str) -> object:
            release.wait()  # never set while the benchmark runs: certain to overrun
            raise AssertionError("released")

    class Quick(save_latency.Method):
        name = "quick"

        def run(self, tag: str) -> object:
            return save_latency.Sample(0.001, 0.002, 10)

    logged: list[str] = []
    bench = save_latency.synthetic_state(10_000)
    try:
        rows, info = save_latency.measure_state(bench, [Stuck(), Quick()], 1, tmp_path, logged.append,
                                                method_timeout_s=0.5)
    finally:
        release.set()
    assert [r["method"] for r in rows] == ["quick"]
    assert list(info["timed_out"]) == ["stuck"] and "within 0.5 s" in info["timed_out"]["stuck"]
    assert any("TIMED OUT" in line and "stuck" in line for line in logged)


def test_synthetic_state_mixes_big_and_small_tensors(save_latency: ModuleType) -> None:
    bench = save_latency.synthetic_state(2 * 10**6)
    sizes = sorted(t.numel() * t.element_size() for t in bench.tensors)
    assert 1.9e6 < bench.tensor_bytes < 2.1e6
    assert sum(1 for s in sizes if s <= 4096) >= 40
    assert sizes[-1] > 0.3e6


# Helpers that live as long as the interpreter by design: multiprocessing's resource tracker (started by the
# first spawn) and torch's shared-memory manager.
_HELPERS = ("resource_tracker", "torch_shm_manager")


def _children_alive() -> list[str]:
    """Command lines of child processes still running up to 10 s after a benchmark returned (writer processes
    end then), helpers that live as long as the interpreter aside."""
    deadline = time.monotonic() + 10
    while True:
        alive = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                command = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if not any(helper in command for helper in _HELPERS):
                alive.append(command)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.slow
def test_save_latency_measures_dcp_best_mode_and_stops_its_writer_process(
        save_latency: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = save_latency.main(["--states", "1MB", "--reps", "1", "--zstd-on", "", "--out", str(out), "--no-chart",
                            "--no-extra-rounds"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    best = next(r for r in doc["results"] if r["method"] == save_latency.DCP_BEST)
    assert 0 < best["returned_s"]["median"] <= best["stall_s"]["median"] <= best["durable_s"]["median"]
    assert best["bytes_on_disk"] > 0.5e6
    assert any("StagingOptions" in n for n in doc["notes"])  # the CPU degradation is said
    assert not _children_alive(), "a writer process outlived the benchmark"


def test_train_overhead_builds_every_method_at_every_frequency() -> None:
    module = _load("train_overhead")
    assert callable(module.main)
    assert [c.save_freq for c in module.DEFAULT_CONFIGS] == [0, 1, 1, 10, 10]
    configs = module.build_configs(["async", "dcp-best", "torch.save"], [25, 100])
    assert [(c.method, c.save_freq, c.async_save) for c in configs] == [
        ("none", 0, False), ("async", 25, True), ("dcp-best", 25, True), ("torch.save", 25, False),
        ("async", 100, True), ("dcp-best", 100, True), ("torch.save", 100, False)]
    with pytest.raises(ValueError, match="unknown method"):
        module.make_saver("nope", Path("unused"), fmt="torch", compression=None, keep_count=2, cuda=False)


class _FakeSaver:
    """Busy for a fixed time after each save, like an asynchronous writer; blocks for none of it."""

    method = "fake"
    blocked_seconds = 0.0

    def __init__(self, write_s: float) -> None:
        self.write_s, self.until = write_s, 0.0

    def save(self, state: object, name: str) -> None:
        self.until = time.perf_counter() + self.write_s

    def before_optimizer_step(self) -> None:
        pass

    def busy(self) -> bool:
        return time.perf_counter() < self.until

    def wait(self) -> None:
        pass


class _FakeTrainer:
    global_step = 7
    saver = None

    def checkpoint_state(self) -> dict[str, int]:
        return {"step": 7}


def test_pace_probe_times_the_write_and_compares_the_loop_with_its_idle_rate() -> None:
    module = _load("train_overhead")
    probe = module.pace_probe(_FakeTrainer(), _FakeSaver(0.2), idle_seconds=0.2)
    assert probe["method"] == "fake"
    assert 0.15 <= probe["write_s"] < 5  # the fake write lasts 0.2 s; the probe starts a moment after it
    assert probe["pace_percent"] > 0 and probe["longest_gap_s"] >= 0
    assert probe["blocked_s"] == 0.0


@pytest.mark.slow
def test_train_overhead_quick_run_reports_each_method_and_its_pace(tmp_path: Path) -> None:
    module = _load("train_overhead")
    out = tmp_path / "out"
    # One save frequency: every manager costs first saves of the whole CRAFT state (the suite's time); frequencies
    # are the analysis's arithmetic, tested below. A 5-second budget: the first round is finished even when other
    # processes disturb it (any other job on a shared CI machine), instead of being retried for 40% of the budget.
    rc = module.main(["--methods", "sync,async,dcp-best", "--save-freqs", "1", "--segment", "2", "--rounds", "1",
                      "--image-size", "32", "--no-wait", "--budget", "5", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "train_overhead.json").read_text())
    rows = {r["config"]: r for r in doc["analysis"]["rows"]}
    assert {"no checkpoints", "sync, every step", "async, every step", "dcp-best, every step"} <= set(rows)
    assert rows["async, every step"]["saves"] == 2 and rows["sync, every step"]["saves"] == 2
    assert {p["method"] for p in doc["pace_probes"]} == {"async", "dcp-best"}
    assert "pace" in (out / "train_overhead.md").read_text()
    assert not _children_alive(), "a writer process outlived the benchmark"


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_on_the_cpu_and_writes_a_report(tmp_path: Path) -> None:
    module = _load("gpu_check")
    out = tmp_path / "out"
    # The training part is train_overhead.py's, tested above: skipping it here keeps the suite's time in check.
    assert module.main(["--quick", "--device", "cpu", "--skip-train", "--with-tests", "--budget", "600",
                        "--out", str(out)]) == 0
    report = (out / "gpu_check.md").read_text()
    summary = report.split("| section | outcome | s |", 1)[1].split("\n\n", 1)[0]  # the table read first
    assert "| ordering |" in summary and "| save latency | 1MB |" in summary
    assert "| pytest -m cuda | 0 passed, 0 failed," in summary  # no CUDA here: every test skipped
    assert "| test_the_amp_scaler_state_round_trips_through_a_checkpoint | skipped: needs a CUDA device |" in report
    assert "Ordering" in report and "0/" not in report.split("Ordering", 1)[1].split("\n", 1)[0]
    assert "| 1MB | dcp best" in report and "| 1MB | ckptio async torch |" in report
    # the FSDP2 path: a DTensor saved through ShardedCheckpointManager with each writer, in order, loaded back
    assert "| sharded (FSDP2) |" in summary
    assert "| FSDP2 mesh of 1 (gloo), thread writer | 2/2 |" in report
    assert "| FSDP2 mesh of 1 (gloo), process writer | 2/2 |" in report
    assert not any(out.glob("gpu_check_*")), "scratch files were left behind"
    assert not _children_alive(), "a writer process outlived the check"


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
    assert module.goals(analysis, cuda=False) == [
        "- async, every 100 steps (derived): overhead ≤ 1.0%: PASS (+0.05%)"]


CHECKOUT = Path(__file__).resolve().parent.parent


def _without_the_project(tmp_path: Path) -> Path:
    """A copy of the checkout's code, as on the GPU image: the dependencies installed, the project not."""
    copy = tmp_path / "checkout"
    for part in ("ckptio", "craft_train", "benchmarks", "tests"):
        shutil.copytree(CHECKOUT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg", "Makefile"):
        shutil.copy2(CHECKOUT / name, copy / name)
    return copy


def _bare_python(code: str, *, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python that has the installed packages but neither PYTHONPATH, the working directory
    (which ``-c`` would put first) nor the project (``-S`` skips the site module, so an editable install's .pth
    file is never read)."""
    prelude = f"import sys; sys.path.pop(0); sys.path.append({sysconfig.get_paths()['purelib']!r}); "
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_gpu_commands_run_from_a_copy_where_the_project_is_not_installed(tmp_path: Path) -> None:
    copy = _without_the_project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bare = _bare_python("import ckptio", cwd=copy)
    assert bare.returncode != 0 and "No module named 'ckptio'" in bare.stderr, "the project is importable anyway"
    # `pytest -m cuda tests/test_cuda.py`: the pytest script puts only its own directory on the path.
    collected = _bare_python(
        "import pytest; sys.exit(pytest.main(['-m', 'cuda', '--collect-only', '-q', 'tests/test_cuda.py']))",
        cwd=copy)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "test_kernels_queued_before_save_are_in_the_file" in collected.stdout
    # `python benchmarks/gpu_check.py`: the script's directory is sys.path[0], the checkout is not on the path.
    script = copy / "benchmarks" / "gpu_check.py"
    checked = _bare_python(
        f"sys.path.insert(0, {str(script.parent)!r}); sys.argv = [{str(script)!r}, '--quick', '--device', 'cpu', "
        f"'--skip-latency', '--skip-train', '--out', {str(tmp_path / 'out')!r}]; "
        f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", cwd=elsewhere)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Ordering" in (tmp_path / "out" / "gpu_check.md").read_text()
def test_load_latency_times_every_loader_warm_and_cold_against_torch_load(tmp_path: Path) -> None:
    module = _load("load_latency")
    out = tmp_path / "out"
    assert module.main(["--states", "1MB", "--reps", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "load_latency.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {module.TORCH_LOAD, module.SAFETENSORS_LOAD, "ckptio.load torch (digest checked)",
                         "ckptio.load safetensors (digest checked)"}
    for name, row in rows.items():
        assert row["warm_s"] > 0 and row["warm_ratio"] > 0, name
        if module.COLD_SUPPORTED:
            assert row["cold_s"] > 0 and row["cold_ratio"] > 0, name
    assert rows[module.TORCH_LOAD]["warm_ratio"] == 1.0
    assert "| 1MB |" in (out / "load_latency.md").read_text()
    assert not any(out.glob("load_latency_*")), "scratch files were left behind"
@pytest.mark.slow
def test_dcp_sharded_benchmark_reports_every_save_and_load_method_and_cleans_up(tmp_path: Path) -> None:
    bench = _load("dcp_sharded")
    out = tmp_path / "out"
    assert bench.main(["--state-mb", "4", "--reps", "1", "--no-best", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    saves = doc["saves"]["2"]["results"]
    assert set(saves) == set(bench.SAVE_MODES) - {"dcp best (process, shm stager)"}
    assert all(row["durable_s"] >= row["blocking_s"] > 0 for row in saves.values())
    assert set(doc["loads"]) == {"saved by 2, loaded by 1", "saved by 2, loaded by 2"}
    assert all(row["load_s"] > 0 for run in doc["loads"].values() for row in run["results"].values())
    assert "| 2 | ckptio Writer dcp.async_save |" in (out / "results.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
