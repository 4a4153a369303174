"""What a mirror target is: four verbs on whole files named by key, and the error a target raises. The local and
S3 targets implement it (:mod:`ckptio.mirror`, :mod:`ckptio.mirror_s3`).
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from .fileio import FileCheck, verify_file

__all__ = ["MirrorError", "MirrorTarget"]

class MirrorError(OSError):
    """The mirror could not be reached or refused an operation; the message says what to change."""


class MirrorTarget(ABC):
    """Where mirrored files live: four verbs on whole files named by key (a file name, no directories)."""

    url: str

    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Store ``source``'s bytes under ``key``, visible only once complete."""

    @abstractmethod
    def get_file(self, key: str, destination: Path) -> None:
        """Write the bytes stored under ``key`` into ``destination`` (a new file)."""

    @abstractmethod
    def list_keys(self) -> list[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="ckptio-mirror-") as scratch:
            path = Path(scratch) / key
            path.write_bytes(data)
            self.put_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="ckptio-mirror-") as scratch:
            path = Path(scratch) / key
            self.get_file(key, path)
            return path.read_bytes()

    def check_copy(self, key: str) -> FileCheck:
        """Verify the bytes stored under ``key`` against the digest sealed in them (downloaded to a scratch file)."""
        with tempfile.TemporaryDirectory(prefix="ckptio-verify-") as scratch:
            path = Path(scratch) / key
            self.get_file(key, path)
            return verify_file(path)
