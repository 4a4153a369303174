"""How good weak supervision's pseudo character boxes are, measured against known true characters.

A diagnostic for benchmarks and tests (synthetic data, where the true character boxes are known); training does
not use it. Kept apart from :mod:`craft_train.weak` so that the labelling the trainer runs depends on no scoring
code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from craft_train.crops import crop_geometry, crop_word
from craft_train.geometry import polygon_iou
from craft_train.imaging import normalise
from craft_train.labels import split_word_quad
from craft_train.synthetic import word_box
from craft_train.weak import (
    MARKER_THRESHOLD,
    MIN_PROMINENCE,
    pseudo_char_quads,
    region_scores,
    split_region_score,
)

__all__ = ["PseudoLabelQuality", "pseudo_label_quality"]


@dataclass(frozen=True)
class PseudoLabelQuality:
    """How close pseudo character boxes come to the true ones, over the words of two or more characters."""

    words: int
    mean_iou: float
    """Mean over true characters of the best IoU with a box of the method's labels (pseudo or fallback)."""
    mean_iou_even_split: float
    """The same for the even split of the word box (the labels without weak supervision)."""
    count_matches: float
    """Share of words where the number of characters found equals the transcription length."""
    mean_confidence: float
    """Mean confidence the loss gives the words (0.5 for every word of the even split)."""
    mean_confidence_matched: float
    """Mean confidence of the words whose count matches (1.0 by the formula; NaN when there are none)."""


def pseudo_label_quality(model: torch.nn.Module, words: Sequence[tuple[np.ndarray, np.ndarray]],
                         image_size: int, device: torch.device | str = "cpu", *,
                         marker_threshold: float = MARKER_THRESHOLD,
                         min_prominence: float = MIN_PROMINENCE) -> PseudoLabelQuality:
    """Score pseudo-labels against the truth: ``words`` are ``(RGB image, true char quads (n, 4, 2))`` pairs.

    Each word's box is :func:`craft_train.synthetic.word_box` of its true characters (what an annotator gives).
    """
    geometry = crop_geometry(image_size)
    crops, items = [], []
    for image, chars in words:
        quad = word_box(chars)
        crop = crop_word(image, quad, geometry)
        if crop is None or len(chars) < 2:
            continue
        crops.append(crop)
        items.append((quad, np.asarray(chars, dtype=np.float64)))
    if not crops:
        raise ValueError("no word of two or more characters to score")
    scores = region_scores(model, torch.stack([normalise(c.pixels) for c in crops]), device)
    ious, even_ious, confidences, matched = [], [], [], []
    for score, crop, (quad, chars) in zip(scores, crops, items, strict=True):
        n = len(chars)
        boxes, confidence = pseudo_char_quads(score, crop.rect, np.linalg.inv(crop.to_crop), quad, n,
                                              marker_threshold, min_prominence)
        even = split_word_quad(quad, n)
        _, found = split_region_score(score, crop.rect, marker_threshold, min_prominence)
        matched.append(found == n)
        confidences.append(confidence)
        for true in chars:
            ious.append(max(polygon_iou(true, b) for b in boxes))
            even_ious.append(max(polygon_iou(true, b) for b in even))
    matched_conf = [c for c, m in zip(confidences, matched, strict=True) if m]
    return PseudoLabelQuality(
        words=len(items), mean_iou=float(np.mean(ious)), mean_iou_even_split=float(np.mean(even_ious)),
        count_matches=float(np.mean(matched)), mean_confidence=float(np.mean(confidences)),
        mean_confidence_matched=float(np.mean(matched_conf)) if matched_conf else float("nan"))
