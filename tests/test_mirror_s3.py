"""The S3 mirror against a real S3-compatible server (moto's server mode) that the tests start on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptio
from ckptio import cli as ckptio_cli
from ckptio.mirror import newer_from_mirror, open_target, remote_checkpoints
from craft_train.config import TrainConfig
from craft_train.train import train

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")


class S3Server:
    """moto's server on a free port of 127.0.0.1; it keeps its data in memory, so a restart starts empty."""

    def __init__(self, *, authenticate: bool = False) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if authenticate else {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + 60
        while True:  # ready when it accepts connections
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture
def server(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    s3 = S3Server()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    yield s3
    s3.kill()


def _bucket() -> str:
    name = f"ckptio-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def _state(step: int, elements: int = 256) -> dict[str, object]:
    return {"weights": torch.full((elements,), float(step)), "global_step": step}


def _save(manager: ckptio.CheckpointManager, step: int, elements: int = 256) -> None:
    manager.save(_state(step, elements), name=f"checkpoint_epoch_1_batch_{step}",
                 metadata={"summary": {"global_step": step}})


def test_checkpoints_mirrored_to_s3_are_listed_verified_and_pulled_by_the_cli(
        server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{_bucket()}/run1"
    with ckptio.CheckpointManager(tmp_path / "local", async_save=True, mirror=url) as manager:
        _save(manager, 1)
        _save(manager, 2)
    assert manager.mirror is not None and manager.mirror.unmirrored == [] and manager.mirror.failures == 0
    assert ckptio_cli.main(["list", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["file"] for c in listed["checkpoints"]] == ["checkpoint_epoch_1_batch_2.pth",
                                                          "checkpoint_epoch_1_batch_1.pth"]
    assert ckptio_cli.main(["verify", url]) == 0
    assert "2 file(s)" in capsys.readouterr().out
    assert ckptio_cli.main(["info", f"{url}/checkpoint_epoch_1_batch_2.pth"]) == 0
    assert "global_step: 2" in capsys.readouterr().out
    assert ckptio_cli.main(["pull", f"{url}/checkpoint_epoch_1_batch_2.pth", str(tmp_path / "restore")]) == 0
    restored = ckptio.load(tmp_path / "restore" / "checkpoint_epoch_1_batch_2.pth")
    assert torch.equal(restored["weights"], _state(2)["weights"])


def test_a_corrupted_object_on_s3_is_refused_by_verify_and_resume_which_take_the_previous_one(
        server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = _bucket()
    url = f"s3://{bucket}/run1"
    with ckptio.CheckpointManager(tmp_path / "local", async_save=False, mirror=url) as manager:
        _save(manager, 1)
        _save(manager, 2)
    client = boto3.client("s3")
    key = "run1/checkpoint_epoch_1_batch_2.pth"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))  # the manifest still names the right digest
    assert ckptio_cli.main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert "checkpoint_epoch_1_batch_2.pth: corrupt" in out and "1 failed" in out
    said: list[str] = []
    chosen = newer_from_mirror(None, open_target(url), tmp_path / "fresh", said.append)
    assert chosen == tmp_path / "fresh" / "checkpoint_epoch_1_batch_1.pth"
    assert any("skipping checkpoint_epoch_1_batch_2.pth" in line for line in said)
    assert not (tmp_path / "fresh" / "checkpoint_epoch_1_batch_2.pth").exists()


def test_a_server_killed_mid_upload_leaves_nothing_visible_and_the_copy_completes_after_its_restart(
        server: S3Server, tmp_path: Path) -> None:
    bucket = _bucket()
    url = f"s3://{bucket}/run1"
    from ckptio.mirror_s3 import S3Target

    seen_mid_upload: list[list[str]] = []

    def kill_after_first_part(**_: object) -> None:
        if not seen_mid_upload:
            seen_mid_upload.append(open_target(url).list_keys())
            server.kill()

    with ckptio.CheckpointManager(tmp_path / "local", async_save=True, mirror=url) as manager:
        assert manager.mirror is not None
        target = S3Target(url, part_size=5 * 2**20, concurrency=1)  # 12 MB: three parts, one at a time
        target.client.meta.events.register("after-call.s3.UploadPart", kill_after_first_part)
        manager.mirror.target = target
        _save(manager, 1, elements=3 * 2**20)
        deadline = time.monotonic() + 120
        while manager.mirror.failures == 0:  # the mirror thread saw the store go away
            assert time.monotonic() < deadline, "the mirror never noticed the server's death"
            time.sleep(0.05)
        _save(manager, 2)  # training goes on: the next save is committed locally meanwhile
        manager.wait()
        assert (tmp_path / "local" / "checkpoint_epoch_1_batch_2.pth").exists()
        server.start()  # an empty store again: recreate the bucket
        boto3.client("s3").create_bucket(Bucket=bucket)
        assert manager.mirror.wait(timeout=120)
    assert seen_mid_upload == [[]]  # while parts were being uploaded, nothing was listed
    assert "refused" not in (manager.mirror.last_error or "")
    entries = remote_checkpoints(open_target(url))
    assert [e.key for e in entries] == ["checkpoint_epoch_1_batch_2.pth", "checkpoint_epoch_1_batch_1.pth"]
    assert ckptio_cli.main(["verify", url]) == 0


def test_wrong_credentials_are_reported_clearly_and_training_goes_on(aws_env: None, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = S3Server(authenticate=True)  # knows no access key at all: every key is wrong
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    try:
        said: list[str] = []
        config = TrainConfig(synthetic_size=10, image_size=64, batch_size=2, epochs=1, val_fraction=0.2, seed=7,
                             workers=0, max_steps=2, save_freq=1, save_dir=str(tmp_path / "run"),
                             mirror="s3://ckptio-wrong/run1", grace=1.0)
        result = train(config, say=said.append)
    finally:
        s3.kill()
    assert result.global_step == 2 and result.saves == 2
    summary = [line for line in said if line.startswith("mirror ")]
    assert summary and all("refused the credentials" in line and "AWS_ACCESS_KEY_ID" in line for line in summary)
    assert "not mirrored: checkpoint_epoch_1_batch_1" in summary[-1], summary
    assert any("retrying, training goes on" in line for line in summary)
