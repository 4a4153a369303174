"""Synthetic scene-text images rendered with OpenCV's Hershey fonts, with exact character boxes.

Everything is drawn from the ``numpy.random.Generator`` passed in, so a fixed seed gives a
bit-identical image and annotation in any process.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["CHARSET", "FONTS", "RenderedWord", "render_scene", "word_box"]

CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789&?!#%+"
FONTS: tuple[int, ...] = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_COMPLEX_SMALL,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
)
_LUMA = np.array([0.299, 0.587, 0.114])
_PLACEMENT_TRIES = 6


@dataclass(frozen=True)
class RenderedWord:
    """One word's text and its ``(len(text), 4, 2)`` character quads in image pixels."""

    text: str
    char_quads: np.ndarray


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = int(rng.integers(4))
    base = rng.integers(0, 256, size=3).astype(np.float64)
    if kind == 0:
        img = np.broadcast_to(base, (height, width, 3)).copy()
    elif kind == 1:
        other = rng.integers(0, 256, size=3).astype(np.float64)
        theta = rng.uniform(0.0, 2.0 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
        img = base * (1.0 - t[..., None]) + other * t[..., None]
    elif kind == 2:
        noise = rng.normal(0.0, rng.uniform(10.0, 60.0), size=(height, width, 3))
        noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=float(rng.uniform(0.5, 4.0)))
        img = base + noise
    else:
        img = np.broadcast_to(base, (height, width, 3)).copy()
        for _ in range(int(rng.integers(3, 12))):
            colour = tuple(float(c) for c in rng.integers(0, 256, size=3))
            x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
            shape = int(rng.integers(3))
            if shape == 0:
                cv2.rectangle(img, (x0, y0), (x1, y1), colour, thickness=-1)
            elif shape == 1:
                radius = int(rng.integers(2, max(3, min(height, width) // 3)))
                cv2.circle(img, (x0, y0), radius, colour, thickness=-1)
            else:
                cv2.line(img, (x0, y0), (x1, y1), colour, thickness=int(rng.integers(1, 4)))
    return np.clip(img, 0, 255).astype(np.uint8)


def _render_word(rng: np.random.Generator, text: str, font: int, scale: float,
                 thickness: int, letter_gaps: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``text`` white-on-black into a tight patch; return (alpha patch, char quads).

    ``letter_gaps`` > 0 widens each gap between letters by its own random amount, up to that fraction of the text
    height (nothing is drawn from ``rng`` for it otherwise, so regular words stay bit-identical)."""
    metrics = [cv2.getTextSize(ch, font, scale, thickness) for ch in text]
    ascent = max(h for (_, h), _ in metrics)
    descent = max(b for _, b in metrics)
    spacing = int(rng.integers(0, max(1, thickness) + 1))
    gaps = [spacing] * len(text)  # after each letter (the last one's is never used)
    if letter_gaps > 0:
        gaps = [spacing + int(extra) for extra in rng.integers(0, round(letter_gaps * ascent) + 1, size=len(text))]
    pad = thickness + 2
    width = sum(w for (w, _), _ in metrics) + sum(gaps[:-1]) + 2 * pad
    height = ascent + descent + 2 * pad
    alpha = np.zeros((height, width), dtype=np.uint8)
    scratch = np.zeros_like(alpha)
    quads = []
    x, baseline = pad, pad + ascent
    for ch, ((w, h), b), gap in zip(text, metrics, gaps, strict=True):
        # Drawing each glyph alone gives its exact pixel extent as the character box.
        scratch[:] = 0
        cv2.putText(scratch, ch, (x, baseline), font, scale, 255, thickness, cv2.LINE_AA)
        ys, xs = np.nonzero(scratch)
        if len(xs):
            x0, x1, y0, y1 = xs.min() - 0.5, xs.max() + 0.5, ys.min() - 0.5, ys.max() + 0.5
        else:
            x0, x1, y0, y1 = x - 0.5, x + w - 0.5, baseline - h - 0.5, baseline + b - 0.5
        quads.append([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        np.maximum(alpha, scratch, out=alpha)
        x += w + gap
    return alpha, np.asarray(quads, dtype=np.float64)


def _rotate(alpha: np.ndarray, quads: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the patch about its centre into a canvas large enough to keep every pixel."""
    h, w = alpha.shape
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(np.ceil(w * cos + h * sin)), int(np.ceil(w * sin + h * cos))
    matrix[0, 2] += new_w / 2.0 - w / 2.0
    matrix[1, 2] += new_h / 2.0 - h / 2.0
    rotated = cv2.warpAffine(alpha, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    moved = quads @ matrix[:, :2].T + matrix[:, 2]
    return rotated, moved


def _text_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    bg_luma = float(background.reshape(-1, 3).mean(axis=0) @ _LUMA)
    colour = rng.integers(0, 256, size=3).astype(np.float64)
    if abs(float(colour @ _LUMA) - bg_luma) < 80.0:
        colour = rng.integers(0, 70, size=3) if bg_luma > 128 else rng.integers(185, 256, size=3)
    return np.asarray(colour, dtype=np.float64)


def word_box(char_quads: np.ndarray) -> np.ndarray:
    """The word-level annotation of a rendered word: the tightest box around its glyph boxes, in reading order.

    Glyph quads are rotated rectangles sharing one rotation, so the first one's top edge gives the reading
    direction; the box is aligned with it, so its corners come top-left first, clockwise, as an annotator
    would give them, even for rotated words.
    """
    q = np.asarray(char_quads, dtype=np.float64).reshape(-1, 4, 2)
    along = q[0, 1] - q[0, 0]
    norm = float(np.linalg.norm(along))
    along = along / norm if norm > 0 else np.array([1.0, 0.0])
    down = np.array([-along[1], along[0]])  # along rotated by +90 degrees: down the screen for upright text
    points = q.reshape(-1, 2)
    u, v = points @ along, points @ down
    corners = [(u.min(), v.min()), (u.max(), v.min()), (u.max(), v.max()), (u.min(), v.max())]
    return np.array([a * along + b * down for a, b in corners])


def render_scene(rng: np.random.Generator, height: int, width: int,
                 max_words: int = 6, letter_gaps: float = 0.0) -> tuple[np.ndarray, list[RenderedWord]]:
    """Render an RGB uint8 image with up to ``max_words`` non-overlapping words; ``letter_gaps`` > 0 spaces
    their letters irregularly (see :func:`_render_word`), where an even split of a word box is wrong."""
    image = _background(rng, height, width).astype(np.float64)
    placed: list[tuple[int, int, int, int]] = []
    words: list[RenderedWord] = []
    for _ in range(int(rng.integers(2, max_words + 1))):
        text = "".join(rng.choice(list(CHARSET), size=int(rng.integers(1, 9))))
        font = int(FONTS[int(rng.integers(len(FONTS)))])
        if rng.random() < 0.2:
            font |= cv2.FONT_ITALIC
        target_h = rng.uniform(0.06, 0.18) * min(height, width)
        unit_h = cv2.getTextSize("H", font, 1.0, 1)[0][1]
        scale = max(target_h, 6.0) / unit_h
        thickness = int(rng.integers(1, max(2, int(target_h / 10)) + 1))
        alpha, quads = _render_word(rng, text, font, scale, thickness, letter_gaps)
        if rng.random() < 0.4:
            alpha, quads = _rotate(alpha, quads, float(rng.uniform(-35.0, 35.0)))
        ph, pw = alpha.shape
        if ph > height or pw > width:
            continue
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(0, width - pw + 1)), int(rng.integers(0, height - ph + 1))
            box = (x0, y0, x0 + pw, y0 + ph)
            if all(box[0] >= b[2] or box[2] <= b[0] or box[1] >= b[3] or box[3] <= b[1] for b in placed):
                break
        else:
            continue
        placed.append(box)
        region = image[y0:y0 + ph, x0:x0 + pw]
        a = alpha.astype(np.float64)[..., None] / 255.0
        region[:] = region * (1.0 - a) + _text_colour(rng, region) * a
        words.append(RenderedWord(text, quads + np.array([x0, y0], dtype=np.float64)))
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=float(rng.uniform(0.3, 1.0)))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), words
