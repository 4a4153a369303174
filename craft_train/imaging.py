"""Pixels in and out of the network: reading images, the image-size rule, the validation resize, normalisation.

Training (:mod:`craft_train.data`), evaluation (:mod:`craft_train.evaluate`), weak supervision and
``python -m craft_train.detect`` all go through these functions, so every one of them sees the same pixel grid and
feeds the model the same numbers.

EXIF orientation is ignored everywhere: an image is the pixel grid stored in its file. Ground-truth coordinates
(ICDAR ``gt_<stem>.txt``) refer to that grid, the official CRAFT reads images the same way, and so the boxes that
``detect`` writes and scores lie on the grid its ground truth was drawn on, whatever a camera wrote into the file's
orientation tag. A photo whose tag says "rotate" is therefore trained on and detected in its stored, unrotated form.
"""

from __future__ import annotations

import operator
from pathlib import Path

import cv2
import numpy as np
import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "STRIDE",
    "check_image_size",
    "fit_longer_side",
    "normalise",
    "read_rgb",
    "round_up_to_stride",
    "scale_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
STRIDE = 32
"""CRAFT halves its input five times, so every side it is given is a multiple of this."""
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
_STD = np.array(IMAGENET_STD, dtype=np.float32) * 255.0


def check_image_size(image_size: int, what: str = "image_size") -> int:
    """``image_size`` as an int; ``ValueError`` naming ``what`` unless it is a positive multiple of 32."""
    size = operator.index(image_size)
    if size <= 0 or size % STRIDE:
        raise ValueError(f"{what} must be a positive multiple of {STRIDE} (CRAFT halves it 5 times), "
                         f"got {image_size}")
    return size


def round_up_to_stride(length: float) -> int:
    """The smallest multiple of 32 that is at least ``length``."""
    return -(-int(np.ceil(length)) // STRIDE) * STRIDE


def read_rgb(path: str | Path) -> np.ndarray:
    """The image at ``path`` as RGB uint8 ``(H, W, 3)``, on its stored pixel grid (EXIF orientation ignored).

    Raises ``OSError`` when the file cannot be read and ``ValueError`` when it cannot be decoded.
    """
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def scale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` resized by ``scale`` on both axes (each side rounded, at least 1 px)."""
    h, w = image.shape[:2]
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # INTER_AREA averages when shrinking (no aliasing); it degenerates to nearest-neighbour when enlarging.
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interp)


def fit_longer_side(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized, aspect kept, so that its longer side is ``size``: the validation and detection resize."""
    return scale_image(image, size / max(image.shape[:2]))


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """RGB ``(H, W, 3)`` pixels in 0..255 as the network's ``(3, H, W)`` float32 ImageNet-normalised input."""
    normalised = ((pixels.astype(np.float32) - _MEAN) / _STD).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(normalised, dtype=np.float32))
