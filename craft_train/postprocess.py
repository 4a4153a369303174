"""Score maps to word boxes, as the official CRAFT ``craft_utils.getDetBoxes_core`` does it.

The region map is binarised at ``low_text`` and the affinity map at ``link_threshold``; their union is split
into 4-connected components, each of which becomes one word box:

1. components under ``min_size`` pixels, or whose peak region score is below ``text_threshold``, are dropped;
2. the component minus its pure-link pixels (affinity on, region off) is dilated by a square kernel whose size
   grows with the component's thickness, ``niter = int(sqrt(size * min(w, h) / (w * h)) * 2)``;
3. ``cv2.minAreaRect`` of the dilated pixels gives the box; near-square boxes (a single character, where the
   rectangle's angle is arbitrary) are replaced by the axis-aligned bounding box - the "diamond" fix;
4. corners start at the one with the smallest ``x + y`` (top-left) and go clockwise on screen.

Boxes come out in score-map pixel coordinates; :func:`to_image_coordinates` maps them back to the input image
(the network's output is at half resolution, and the image was usually resized before inference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["DEFAULT_THRESHOLDS", "MIN_COMPONENT_SIZE", "Thresholds", "detect_boxes", "to_image_coordinates"]

MIN_COMPONENT_SIZE = 10
"""Components smaller than this many score-map pixels are noise, not words (official value)."""
_DIAMOND_TOLERANCE = 0.1
_NET_SCALE = 2.0


@dataclass(frozen=True)
class Thresholds:
    """The three thresholds of CRAFT's post-processing (official defaults)."""

    text_threshold: float = 0.7
    """A component is a word only if its peak region score reaches this."""
    link_threshold: float = 0.4
    """Affinity above this joins characters into one word."""
    low_text: float = 0.4
    """Region score above this belongs to a character."""

    def __post_init__(self) -> None:
        for name in ("text_threshold", "link_threshold", "low_text"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")


DEFAULT_THRESHOLDS = Thresholds()


def _check_maps(textmap: np.ndarray, linkmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    text = np.asarray(textmap, dtype=np.float32)
    link = np.asarray(linkmap, dtype=np.float32)
    if text.ndim != 2 or text.shape != link.shape:
        raise ValueError(f"region and affinity maps must be 2-D and of one shape, got {text.shape} and {link.shape}")
    return text, link


def _order_corners(box: np.ndarray) -> np.ndarray:
    # boxPoints' starting corner depends on the rectangle's angle; evaluation and drawing want top-left first.
    start = int(box.sum(axis=1).argmin())
    return np.roll(box, 4 - start, axis=0)


def _box_from_pixels(segmap: np.ndarray) -> np.ndarray | None:
    """Minimum-area rectangle around the nonzero pixels of ``segmap`` (x, y pixel-centre coordinates)."""
    ys, xs = np.nonzero(segmap)
    if len(xs) == 0:
        return None
    points = np.stack([xs, ys], axis=1).astype(np.int32)
    box = cv2.boxPoints(cv2.minAreaRect(points)).astype(np.float32)
    w, h = np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[1] - box[2])
    ratio = max(w, h) / (min(w, h) + 1e-5)
    if abs(1.0 - ratio) <= _DIAMOND_TOLERANCE:
        # A square's minAreaRect may come out rotated 45 degrees (a diamond); its bounding box is the sane answer.
        left, right, top, bottom = xs.min(), xs.max(), ys.min(), ys.max()
        box = np.array([[left, top], [right, top], [right, bottom], [left, bottom]], dtype=np.float32)
    return _order_corners(box)


def _component_box(labels: np.ndarray, stats: np.ndarray, k: int, pure_link: np.ndarray) -> np.ndarray | None:
    """The official segmentation-map-and-dilate step for component ``k``, done inside its bounding window.

    Working on the window (the component's box grown by the dilation margin) gives the same pixels as the
    official full-map version, since everything outside the component is zero, at a fraction of the cost.
    """
    img_h, img_w = labels.shape
    x, y = int(stats[k, cv2.CC_STAT_LEFT]), int(stats[k, cv2.CC_STAT_TOP])
    w, h = int(stats[k, cv2.CC_STAT_WIDTH]), int(stats[k, cv2.CC_STAT_HEIGHT])
    size = int(stats[k, cv2.CC_STAT_AREA])
    niter = int(math.sqrt(size * min(w, h) / (w * h)) * 2)
    sx, ex = max(x - niter, 0), min(x + w + niter + 1, img_w)
    sy, ey = max(y - niter, 0), min(y + h + niter + 1, img_h)
    window = (slice(sy, ey), slice(sx, ex))
    segmap = np.where(labels[window] == k, np.uint8(255), np.uint8(0))
    segmap[pure_link[window]] = 0
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (1 + niter, 1 + niter))
    segmap = cv2.dilate(segmap, kernel)
    box = _box_from_pixels(segmap)
    return None if box is None else box + np.array([sx, sy], dtype=np.float32)


def detect_boxes(textmap: np.ndarray, linkmap: np.ndarray, thresholds: Thresholds = DEFAULT_THRESHOLDS,
                 *, min_size: int = MIN_COMPONENT_SIZE) -> np.ndarray:
    """Word boxes ``(K, 4, 2)`` float32 in score-map pixels from a region and an affinity map.

    Corners are top-left first, clockwise on screen. Boxes are in component-label order (top-to-bottom scan).
    """
    text, link = _check_maps(textmap, linkmap)
    text_on = text > thresholds.low_text
    link_on = link > thresholds.link_threshold
    combined = (text_on | link_on).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(combined, connectivity=4)
    pure_link = link_on & ~text_on
    boxes = []
    for k in range(1, count):
        if stats[k, cv2.CC_STAT_AREA] < min_size:
            continue
        x, y = int(stats[k, cv2.CC_STAT_LEFT]), int(stats[k, cv2.CC_STAT_TOP])
        w, h = int(stats[k, cv2.CC_STAT_WIDTH]), int(stats[k, cv2.CC_STAT_HEIGHT])
        window = (slice(y, y + h), slice(x, x + w))
        if text[window][labels[window] == k].max() < thresholds.text_threshold:
            continue
        box = _component_box(labels, stats, k, pure_link)
        if box is not None:
            boxes.append(box)
    if not boxes:
        return np.zeros((0, 4, 2), dtype=np.float32)
    return np.stack(boxes).astype(np.float32)


def to_image_coordinates(boxes: np.ndarray, ratio_w: float = 1.0, ratio_h: float = 1.0,
                         net_scale: float = _NET_SCALE) -> np.ndarray:
    """Map score-map boxes to the original image: ``x * net_scale * ratio_w``, ``y * net_scale * ratio_h``.

    ``ratio_w``/``ratio_h`` are original size over network-input size (official ``adjustResultCoordinates``).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2)
    return b * np.array([net_scale * ratio_w, net_scale * ratio_h], dtype=np.float32)
