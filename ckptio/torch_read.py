"""Loading a ``torch.save`` file, weights only: the legacy (pre-zip) format, a zip whose structure was checked first
(:func:`ckptio.formats.check_torch_zip`), read in place without a second copy, and torch's errors as one line.
"""

from __future__ import annotations

import io
import os
from typing import Any, BinaryIO

import torch

from .errors import CorruptCheckpointError
from .formats import ZIP_END_SIZE, ReadAt, check_torch_zip, find_zip_end

__all__ = ["LEGACY_TORCH_MAGIC", "is_legacy_torch", "read_torch", "torch_load_error"]

LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
"""The first bytes of a file ``torch.save`` wrote in its legacy (pre-1.6, pre-zip) format: a pickled magic number."""


def read_torch(source: bytes | bytearray | BinaryIO, path: Any, map_location: Any = None) -> Any:
    """``torch.load`` (weights only) from bytes or an open file, after :func:`check_torch_zip`."""
    if _is_legacy(source):
        # The legacy format has no zip directory to check; the weights-only unpickler still refuses any code.
        stream_: BinaryIO = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            return torch.load(stream_, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise CorruptCheckpointError(path, f"not a loadable torch file ({torch_load_error(exc)})") from None
    if isinstance(source, (bytes, bytearray)):
        view = memoryview(source)
        check_torch_zip(path, len(view), lambda offset, length: bytes(view[offset : offset + length]))
        stream: BinaryIO = io.BufferedReader(_ViewReader(view), buffer_size=2**20)  # no copy of the bytes
    else:
        fd = source.fileno()
        size = os.fstat(fd).st_size
        check_torch_zip(path, size, lambda offset, length: os.pread(fd, length, offset))
        stream = source
        if size < _SMALL_ZIP:
            stream = _without_comment(path, size, lambda offset, length: os.pread(fd, length, offset)) or source
    try:
        return torch.load(stream, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types (RuntimeError, UnpicklingError, EOFError...) for bad bytes
        raise CorruptCheckpointError(path, f"not a loadable torch file ({torch_load_error(exc)})") from None


def is_legacy_torch(path: str | os.PathLike[str]) -> bool:
    """Whether the file at ``path`` was written by ``torch.save`` in its legacy (pre-1.6, pre-zip) format."""
    try:
        with open(path, "rb") as stream:
            return stream.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC
    except OSError:
        return False


def _is_legacy(source: bytes | bytearray | BinaryIO) -> bool:
    """Whether ``source`` holds torch.save's legacy (pre-zip) format."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[: len(LEGACY_TORCH_MAGIC)]) == LEGACY_TORCH_MAGIC
    return os.pread(source.fileno(), len(LEGACY_TORCH_MAGIC), 0) == LEGACY_TORCH_MAGIC


def torch_load_error(exc: BaseException) -> str:
    """What ``torch.load`` said, in one line of at most 500 characters. For a file the weights-only unpickler
    refused, only its reason: torch's own first line advises loading again with weights_only=False, never right
    for a file that may have been built to run code."""
    text = str(exc)
    message = text.splitlines()[0] if text else type(exc).__name__
    if "WeightsUnpickler error:" in text:
        detail = next((line for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()), "")
        message = f"it holds objects a weights-only load refuses, which ckptio never runs: {detail.strip()}"
    return message[:500]


# torch.load (miniz) cannot find the end record of a zip under ~80 KB whose comment is over 4 KiB ("negative seek
# value"): a sealed manifest of many shards, or a small checkpoint with a long summary, whose digest verifies.
_SMALL_ZIP = 128 * 2**10


def _without_comment(path: Any, size: int, read_at: ReadAt) -> io.BytesIO | None:
    """A small zip's bytes without its archive comment (where ckptio keeps its seal, checked before this), for
    torch.load; ``None`` when it has no comment."""
    end = find_zip_end(path, size, read_at)
    if end + ZIP_END_SIZE == size:
        return None
    return io.BytesIO(read_at(0, end + ZIP_END_SIZE - 2) + b"\0\0")


class _ViewReader(io.RawIOBase):
    """A seekable read-only stream over a buffer, so ``torch.load`` can read decompressed bytes in place."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        n = max(0, min(len(target), len(self._view) - self._position))
        target[:n] = self._view[self._position : self._position + n]
        self._position += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

