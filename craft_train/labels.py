"""CRAFT ground-truth maps: region / affinity Gaussian heat maps and the confidence mask.

All functions are pure numpy/OpenCV.  Quads are ``(4, 2)`` float arrays ordered top-left,
top-right, bottom-right, bottom-left, in the pixel coordinates of the output map (OpenCV
convention: pixel centres at integer coordinates).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = [
    "affinity_quads",
    "gaussian_template",
    "is_drawable_quad",
    "render_labels",
    "render_score_map",
    "split_word_quad",
]

# Quads smaller than this (in output pixels squared) carry no usable signal.
_MIN_AREA = 1e-2
# Keeps fillPoly's fixed-point coordinates far away from int32 overflow.
_COORD_LIMIT = 1e5
_FILL_SHIFT = 4


def gaussian_template(size: int = 64, sigma: float = 0.5) -> np.ndarray:
    """Isotropic 2-D Gaussian on a ``size x size`` grid spanning [-1, 1] in both axes.

    With ``sigma=0.5`` the value is ~0.14 at the middle of each edge and ~0.02 in the corners,
    so most of a character box lies above the 0.1 positive threshold used by the loss.
    """
    if size < 2 or sigma <= 0:
        raise ValueError(f"gaussian_template needs size >= 2 and sigma > 0, got {size=}, {sigma=}")
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    sq = axis[None, :] ** 2 + axis[:, None] ** 2
    g = np.exp(-sq / (2.0 * sigma**2))
    return (g / g.max()).astype(np.float32)


def _signed_area(quad: np.ndarray) -> float:
    x, y = quad[:, 0], quad[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def is_drawable_quad(quad: np.ndarray) -> bool:
    """True for a finite, strictly convex quad with non-negligible area.

    A homography maps the template square onto a quad faithfully only when the quad is
    convex; bow-ties and collinear corners would produce mirrored or exploded warps.
    """
    q = np.asarray(quad, dtype=np.float64)
    if q.shape != (4, 2) or not np.all(np.isfinite(q)) or np.abs(q).max() > _COORD_LIMIT:
        return False
    if abs(_signed_area(q)) < _MIN_AREA:
        return False
    edges = np.roll(q, -1, axis=0) - q
    cross = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    lengths = np.linalg.norm(edges, axis=1) * np.linalg.norm(np.roll(edges, -1, axis=0), axis=1)
    if np.any(lengths == 0):
        return False
    sines = cross / lengths
    return bool(np.all(sines > 1e-6) or np.all(sines < -1e-6))


def _clipped_bbox(quad: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    x0 = max(int(np.floor(quad[:, 0].min())), 0)
    y0 = max(int(np.floor(quad[:, 1].min())), 0)
    x1 = min(int(np.ceil(quad[:, 0].max())) + 1, width)
    y1 = min(int(np.ceil(quad[:, 1].max())) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def render_score_map(quads: Sequence[np.ndarray] | np.ndarray, out_hw: tuple[int, int],
                     template: np.ndarray | None = None) -> np.ndarray:
    """Warp ``template`` into every drawable quad and combine overlaps with max."""
    if template is None:
        template = gaussian_template()
    height, width = out_hw
    score = np.zeros((height, width), dtype=np.float32)
    th, tw = template.shape
    # Template pixel centres sit at 0..tw-1, so its outer edges are at -0.5 and tw-0.5.
    src = np.array([[-0.5, -0.5], [tw - 0.5, -0.5], [tw - 0.5, th - 0.5], [-0.5, th - 0.5]], np.float32)
    for quad in quads:
        q = np.asarray(quad, dtype=np.float64)
        if not is_drawable_quad(q):
            continue
        box = _clipped_bbox(q, height, width)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        # Warping only into the quad's bounding box keeps the cost per character small.
        dst = (q - np.array([x0, y0], dtype=np.float64)).astype(np.float32)
        matrix = cv2.getPerspectiveTransform(src, dst)
        if not np.all(np.isfinite(matrix)):
            continue
        patch = cv2.warpPerspective(template, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        np.maximum(score[y0:y1, x0:x1], patch, out=score[y0:y1, x0:x1])
    return score


def affinity_quads(char_quads: np.ndarray) -> np.ndarray:
    """Affinity boxes between consecutive characters of one word, built the CRAFT way.

    For each character the centroid ``c`` splits the box into an upper triangle (tl, tr, c)
    and a lower one (bl, br, c); the affinity box joins the centres of those triangles of
    neighbouring characters: [top_i, top_{i+1}, bottom_{i+1}, bottom_i].
    """
    q = np.asarray(char_quads, dtype=np.float64).reshape(-1, 4, 2)
    if len(q) < 2:
        return np.zeros((0, 4, 2), dtype=np.float64)
    centre = q.mean(axis=1)
    top = (q[:, 0] + q[:, 1] + centre) / 3.0
    bottom = (q[:, 3] + q[:, 2] + centre) / 3.0
    return np.stack([top[:-1], top[1:], bottom[1:], bottom[:-1]], axis=1)


def split_word_quad(quad: np.ndarray, n: int) -> np.ndarray:
    """Cut a word quad into ``n`` character quads by equal steps along top and bottom edges."""
    q = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    if n < 1:
        raise ValueError(f"cannot split a word into {n} characters")
    t = np.linspace(0.0, 1.0, n + 1)[:, None]
    top = q[0] + (q[1] - q[0]) * t
    bottom = q[3] + (q[2] - q[3]) * t
    return np.stack([top[:-1], top[1:], bottom[1:], bottom[:-1]], axis=1)


def _fill_min(mask: np.ndarray, polygon: np.ndarray, value: float) -> None:
    """Lower ``mask`` to ``value`` inside ``polygon`` (order-independent for overlaps)."""
    p = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if len(p) < 3 or not np.all(np.isfinite(p)) or np.abs(p).max() > _COORD_LIMIT:
        return
    if abs(_signed_area(p)) < _MIN_AREA:
        return
    box = _clipped_bbox(p, *mask.shape)
    if box is None:
        return
    x0, y0, x1, y1 = box
    view = mask[y0:y1, x0:x1]
    layer = np.full_like(view, np.inf)
    pts = np.round((p - np.array([x0, y0])) * (1 << _FILL_SHIFT)).astype(np.int32)
    cv2.fillPoly(layer, [pts], float(value), lineType=cv2.LINE_8, shift=_FILL_SHIFT)
    np.minimum(view, layer, out=view)


def render_labels(
    char_quads_per_word: Sequence[np.ndarray],
    confidences: Sequence[float],
    dont_care_quads: Sequence[np.ndarray],
    out_hw: tuple[int, int],
    template: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(region, affinity, mask)`` float32 maps of shape ``out_hw``.

    ``mask`` is 1 on background, the word's confidence over the convex hull of its
    characters, and 0 over don't-care quads (which win over any overlapping word).
    """
    if len(char_quads_per_word) != len(confidences):
        raise ValueError(f"{len(char_quads_per_word)} words but {len(confidences)} confidences")
    if template is None:
        template = gaussian_template()
    words = [np.asarray(w, dtype=np.float64).reshape(-1, 4, 2) for w in char_quads_per_word]
    chars = [q for w in words for q in w]
    links = [q for w in words for q in affinity_quads(w)]
    region = render_score_map(chars, out_hw, template)
    affinity = render_score_map(links, out_hw, template)
    mask = np.ones(out_hw, dtype=np.float32)
    for word, conf in zip(words, confidences, strict=True):
        points = word.reshape(-1, 2)
        if len(points) == 0 or not np.all(np.isfinite(points)) or float(conf) >= 1.0:
            continue
        hull = cv2.convexHull(points.astype(np.float32)).reshape(-1, 2)
        _fill_min(mask, hull, max(float(conf), 0.0))
    for quad in dont_care_quads:
        _fill_min(mask, np.asarray(quad, dtype=np.float64), 0.0)
    return region, affinity, mask
