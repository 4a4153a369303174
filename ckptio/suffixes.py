"""The one place that maps a checkpoint file's suffix to its format and compression, and back.

``NAME.pth`` is a ``torch.save`` zip, ``NAME.safetensors`` a safetensors file, either followed by ``.zst``
when zstd-compressed. Lightning's names (``.ckpt``, ``.pt``, ``.bin``) are torch files too, but only the four
suffixes ckptio writes make a file a checkpoint of a directory listing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKPOINT_SUFFIXES", "container_of", "file_name", "format_of", "split_suffix"]

CHECKPOINT_SUFFIXES = (".pth.zst", ".safetensors.zst", ".pth", ".safetensors")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def file_name(name: str, fmt: str, compression: str | None) -> str:
    """``NAME`` plus the suffix of ``fmt`` (``torch`` or ``safetensors``) and ``compression`` (``zstd``)."""
    return name + (".pth" if fmt == "torch" else ".safetensors") + (".zst" if compression else "")


def split_suffix(filename: str) -> tuple[str, str] | None:
    """``("best_model", ".pth.zst")`` for a checkpoint file name, ``None`` for anything else."""
    for suffix in CHECKPOINT_SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], suffix
    return None


def format_of(path: Path | str) -> tuple[str, str | None]:
    """``(format, compression)`` of a checkpoint file from its name: ``("safetensors", "zstd")`` for
    ``x.safetensors.zst``; any other name is a torch file (a Lightning ``.ckpt`` included)."""
    name = Path(path).name
    compression = "zstd" if name.endswith(".zst") else None
    inner = name[:-4] if compression else name
    return ("safetensors" if inner.endswith(".safetensors") else "torch"), compression


def container_of(path: Path) -> str:
    """``zstd``, ``torch`` or ``safetensors``: how the file's bytes are laid out, from its suffix."""
    name = path.name
    if name.endswith(".zst"):
        return "zstd"
    if name.endswith(_TORCH_SUFFIXES):
        return "torch"
    if name.endswith(".safetensors"):
        return "safetensors"
    raise ValueError(
        f"{path}: unknown checkpoint suffix; expected .pth, .safetensors, or either followed by .zst"
    )
