"""Decompressing a checkpoint's zstd body into memory, bounded before any byte is read.

A compressed file is a claim like any other: its output is capped (by the raw size its seal records, at most
physical memory, or by :data:`MAX_ZSTD_EXPANSION` for a file without one) and must start as the container its
name says, checked on the first bytes out, so a zstd bomb is refused before it costs memory.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from . import formats
from .errors import CorruptCheckpointError
from .integrity import ReadAt, Seal
from .suffixes import format_of

__all__ = ["MAX_ZSTD_EXPANSION", "decompress", "physical_memory", "zstandard_module"]


# An unsealed .zst file (or one whose seal records no raw size) may expand to at most this many times its
# compressed size (plus 1 MiB). zstd level 1 reaches ~1.1x on trained fp32 weights and optimizer state, but
# zero-initialised weights, fresh optimizer moments or LoRA adapters pass 1024x: a sealed file ckptio wrote records
# its raw size, and that size (at most physical memory) bounds it instead, checked as the bytes come out, after
# their first bytes proved to start the container the name says.
MAX_ZSTD_EXPANSION = 1024


def decompress(path: Path, read_at: ReadAt, size: int, seal: Seal | None) -> bytearray:
    """Stream-decompress the file's zstd body into one buffer whose size is bounded before any byte is read.

    A raw size recorded in the seal is a claim, as is everything in the file: it allows that many bytes (never
    more than physical memory), so a forged claim costs what a real state of that size would. What stops a bomb
    that claims its true size is that its output must start as the container says (a torch zip's first record, a
    safetensors header within the caps), checked on the first bytes out, before the rest is decompressed.
    """
    start, end = (seal.body_start, seal.body_length) if seal else (0, size)
    limit = allowed = min(MAX_ZSTD_EXPANSION * (end - start) + 2**20, physical_memory())
    declared = seal.meta.get("raw_size") if seal else None
    if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 0:
        if declared > physical_memory():
            raise CorruptCheckpointError(
                path, f"it records a raw size of {declared} bytes, more than this machine's physical memory "
                f"({physical_memory()} bytes); refusing to decompress it")
        limit = allowed = declared
    else:
        declared = None
    out = bytearray()
    prefix_checked = False
    zstandard = zstandard_module()
    decoder = zstandard.ZstdDecompressor().decompressobj(write_size=2**20)
    in_frame = False  # the current decoder has taken bytes of a frame that has not ended yet
    position = start
    try:
        while position < end:
            # zstd expands one input byte to at most ~32 KiB: near the allowed size, feed small pieces so that one
            # call cannot overshoot it by much. The first pieces are small too: the prefix check comes early.
            step = max(512, min(2**20, (allowed - len(out)) // 32768, 512 if not prefix_checked else 2**20))
            piece = read_at(position, min(step, end - position))
            if not piece:
                raise CorruptCheckpointError(path, "the file became shorter while it was read")
            position += len(piece)
            while piece:
                out += decoder.decompress(piece)
                in_frame = True
                if len(out) > limit:
                    raise CorruptCheckpointError(
                        path, f"zstd data expands beyond the {limit} bytes allowed for it; refusing to decompress "
                        "further")
                if not prefix_checked and len(out) >= _PREFIX:
                    _check_prefix(path, bytes(out[:_PREFIX]), limit)
                    prefix_checked = True
                if not decoder.eof:
                    break
                piece = decoder.unused_data  # the next frame starts inside this piece
                decoder = zstandard.ZstdDecompressor().decompressobj(write_size=2**20)
                in_frame = False
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(path, f"zstd data is broken ({exc})") from None
    if in_frame or position == start:
        raise CorruptCheckpointError(path, "the zstd stream ends early: the file is truncated")
    if declared is not None and len(out) != declared:
        raise CorruptCheckpointError(path, f"zstd data expands to {len(out)} bytes, {declared} were recorded")
    if not prefix_checked:
        _check_prefix(path, bytes(out[:_PREFIX]), limit)
    return out


_PREFIX = 9  # a zip's local header signature; a safetensors header's length and its opening brace


def _check_prefix(path: Path, head: bytes, limit: int) -> None:
    """Refuse decompressed bytes that do not start the container the file's name says."""
    if format_of(path)[0] == "torch":
        if not head.startswith(b"PK\x03\x04"):
            raise CorruptCheckpointError(path, "its zstd data does not start a torch zip file: damaged or not a "
                                               "checkpoint; refusing to decompress further")
        return
    if len(head) < _PREFIX or head[8:9] != b"{":
        raise CorruptCheckpointError(path, "its zstd data does not start a safetensors header: damaged or not a "
                                           "checkpoint; refusing to decompress further")
    (length,) = struct.unpack("<Q", head[:8])
    formats.check_safetensors_header_length(length, limit, path)


def zstandard_module() -> Any:
    """The zstandard module, imported on first use: only .zst files need it."""
    try:
        import zstandard
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "reading or writing .zst checkpoints needs the 'zstandard' package: run `. .venv/bin/activate` "
            "first (after `make install`), or use format/compression settings without zstd", name="zstandard",
        ) from None
    return zstandard


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2**40
