"""Plane geometry shared by labels, augmentation, weak supervision and evaluation: point transforms and polygons.

Points are ``(..., 2)`` float arrays of ``(x, y)`` in OpenCV pixel-centre coordinates. Affine transforms are
OpenCV's ``2 x 3`` matrices, homographies ``3 x 3``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = [
    "apply_homography",
    "as_homography",
    "as_polygon",
    "overlap",
    "polygon_area",
    "polygon_iou",
    "transform_points",
]

# Raster fallback for non-convex polygons: the longer side of their joint bounding box in raster pixels.
_RASTER_SIDE = 512
_RASTER_SHIFT = 4


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``(n, 2)`` points through a ``2 x 3`` affine transform."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def as_homography(affine: np.ndarray) -> np.ndarray:
    """A ``2 x 3`` affine transform as the ``3 x 3`` homography that does the same."""
    return np.concatenate([affine, [[0.0, 0.0, 1.0]]], axis=0)


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (any shape ending in 2) through a ``3 x 3`` homography, as ``(n, 2)``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mapped = np.concatenate([p, np.ones((len(p), 1))], axis=1) @ matrix.T
    return mapped[:, :2] / mapped[:, 2:3]


# ---- polygons ---------------------------------------------------------------------------------------------------

def as_polygon(poly: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Any polygon-like input as an ``(n, 2)`` float64 array."""
    return np.asarray(poly, dtype=np.float64).reshape(-1, 2)


def polygon_area(poly: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Absolute shoelace area; 0 for fewer than 3 points or non-finite coordinates."""
    p = as_polygon(poly)
    if len(p) < 3 or not np.all(np.isfinite(p)):
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _is_convex(p: np.ndarray) -> bool:
    return bool(cv2.isContourConvex(p.astype(np.float32).reshape(-1, 1, 2)))


def _has_area(p: np.ndarray) -> bool:
    # The hull, not the shoelace: a bow-tie's signed lobes cancel to zero yet it covers pixels.
    if len(p) < 3 or not np.all(np.isfinite(p)):
        return False
    return polygon_area(cv2.convexHull(p.astype(np.float32)).reshape(-1, 2)) > 0.0


def _raster_overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(intersection, area a, area b) by filling both polygons on a common grid: exact enough for any shape."""
    both = np.concatenate([a, b])
    origin = both.min(axis=0)
    extent = float((both.max(axis=0) - origin).max())
    if not extent > 0.0:
        return 0.0, 0.0, 0.0
    scale = _RASTER_SIDE / extent
    side = _RASTER_SIDE + 2
    masks = []
    for p in (a, b):
        mask = np.zeros((side, side), dtype=np.uint8)
        pts = np.round((p - origin) * scale * (1 << _RASTER_SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_RASTER_SHIFT)
        masks.append(mask.astype(bool))
    unit = 1.0 / (scale * scale)
    inter = float(np.count_nonzero(masks[0] & masks[1])) * unit
    return inter, float(np.count_nonzero(masks[0])) * unit, float(np.count_nonzero(masks[1])) * unit


def overlap(a_in: np.ndarray, b_in: np.ndarray) -> tuple[float, float, float]:
    """(intersection area, area of a, area of b); zeros for polygons with no area or non-finite corners."""
    a, b = as_polygon(a_in), as_polygon(b_in)
    if not (_has_area(a) and _has_area(b)):
        return 0.0, polygon_area(a), polygon_area(b)
    if _is_convex(a) and _is_convex(b):
        area_a, area_b = polygon_area(a), polygon_area(b)
        inter, _ = cv2.intersectConvexConvex(a.astype(np.float32), b.astype(np.float32))
        return max(float(inter), 0.0), area_a, area_b
    # Non-convex or self-intersecting quads (rare, annotation slips): the shoelace area is wrong for a bow-tie
    # too, so every area comes from the same raster.
    return _raster_overlap(a, b)


def polygon_iou(a: np.ndarray | Sequence[Sequence[float]], b: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Intersection over union of two polygons (0 when either has no area)."""
    inter, area_a, area_b = overlap(np.asarray(a), np.asarray(b))
    union = area_a + area_b - inter
    return inter / union if union > 0.0 and inter > 0.0 else 0.0
