"""Rectified word crops: each word-level word cut out of its source image onto a fixed canvas, for weak
supervision (:mod:`craft_train.weak`) to label with the model. Made by the datasets, in the DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from craft_train.imaging import STRIDE, round_up_to_stride

__all__ = ["CropGeometry", "WordCrop", "crop_geometry", "crop_word"]

# The word's height in the crop, as a share of the training image side: the interim model saw words of roughly
# 6-18 % of the image side, so this keeps the crops at the scale it knows.
_WORD_HEIGHT_SHARE = 1 / 8
_MIN_WORD_HEIGHT = 16


@dataclass(frozen=True)
class CropGeometry:
    """The fixed canvas every word crop is drawn into, and the word's height inside it."""

    height: int
    width: int
    word_height: int


def crop_geometry(image_size: int) -> CropGeometry:
    """Canvas for training images of side ``image_size``: the word is ``image_size / 8`` px high, centred.

    The canvas is twice the word height (the Gaussians of the first and last characters need room) and as wide
    as the training image, both multiples of 32 as the model needs.
    """
    word_height = max(_MIN_WORD_HEIGHT, round(image_size * _WORD_HEIGHT_SHARE))
    height = round_up_to_stride(2 * word_height)
    width = max(round_up_to_stride(image_size), 2 * STRIDE)
    return CropGeometry(height, width, word_height)


@dataclass(frozen=True)
class WordCrop:
    """A rectified word: the crop, where the word lies in it, and the homography from source pixels to it."""

    pixels: np.ndarray
    """``(height, width, 3)`` RGB uint8 canvas."""
    rect: tuple[float, float, float, float]
    """The word quad's corners in the canvas, ``(x0, y0, x1, y1)`` (OpenCV pixel-centre coordinates)."""
    to_crop: np.ndarray
    """``(3, 3)`` homography from source-image pixels to canvas pixels."""


def _side_lengths(quad: np.ndarray) -> tuple[float, float]:
    width = 0.5 * (np.linalg.norm(quad[1] - quad[0]) + np.linalg.norm(quad[2] - quad[3]))
    height = 0.5 * (np.linalg.norm(quad[3] - quad[0]) + np.linalg.norm(quad[2] - quad[1]))
    return float(width), float(height)


def crop_word(image: np.ndarray, quad: np.ndarray, geometry: CropGeometry) -> WordCrop | None:
    """Rectify the word ``quad`` (source pixels, top-left first, clockwise) into the crop canvas.

    The word keeps its aspect ratio at ``geometry.word_height`` px (smaller when it would not fit the width)
    and is centred; the rest of the canvas shows the word's surroundings. ``None`` for a degenerate quad.
    """
    q = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    if not np.all(np.isfinite(q)):
        return None
    width, height = _side_lengths(q)
    if width < 1e-3 or height < 1e-3:
        return None
    word_h = float(geometry.word_height)
    word_w = word_h * width / height
    room = geometry.width - word_h  # half a word height of margin on each side
    if word_w > room:
        word_h, word_w = word_h * room / word_w, room
    x0, y0 = (geometry.width - word_w) / 2.0, (geometry.height - word_h) / 2.0
    x1, y1 = x0 + word_w, y0 + word_h
    dst = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)
    src = q.astype(np.float32)
    to_crop = cv2.getPerspectiveTransform(src, dst).astype(np.float64)
    if not np.all(np.isfinite(to_crop)):
        return None
    pixels = cv2.warpPerspective(image, to_crop, (geometry.width, geometry.height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
    return WordCrop(pixels, (x0, y0, x1, y1), to_crop)
