"""Detection quality: polygon IoU, ICDAR2015-style one-to-one matching, pooled precision/recall/H-mean, and
:func:`evaluate_model`, which runs a CRAFT model over dataset images and scores its word boxes.

Matching follows the ICDAR2015 IoU protocol: a detection covering more than half of its own area with a
don't-care (``###``) region is ignored, don't-care ground truth is not counted, and the remaining pairs are
matched one-to-one, greedily by decreasing IoU, when their IoU reaches the threshold (0.5). Scores are pooled
over a dataset (total matches over total ground truth / detections), not averaged per image.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from craft_train.annotations import Annotation, parse_icdar_gt
from craft_train.geometry import as_polygon, overlap, polygon_area, polygon_iou
from craft_train.imaging import check_image_size, fit_longer_side, normalise, round_up_to_stride
from craft_train.postprocess import DEFAULT_THRESHOLDS, Thresholds, detect_boxes, to_image_coordinates

__all__ = [
    "DetectionCounts",
    "ImageMatch",
    "detect_words",
    "evaluate_model",
    "format_scores",
    "match_image",
    "parse_gt_quads",
    "polygon_area",
    "polygon_iou",
    "pooled_scores",
    "predict_maps",
    "prepare_image",
    "word_quad",
    "word_quads",
]

IOU_THRESHOLD = 0.5
DONT_CARE_OVERLAP = 0.5
# Chars whose shared edges agree to this many pixels tile one word quad (split from an ICDAR quad).
_TILE_TOLERANCE = 1e-3
_LOAD_ERRORS = (OSError, ValueError, UnicodeDecodeError, cv2.error)


# ---- matching ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageMatch:
    """One image's matching result: counts that pool over a dataset, plus the pairs for inspection."""

    matched: int
    num_gt: int
    """Ground-truth words that count (don't-care excluded)."""
    num_det: int
    """Detections that count (those mostly inside a don't-care region excluded)."""
    pairs: tuple[tuple[int, int], ...] = ()
    """(gt index, detection index) of every match."""
    ignored_dets: tuple[int, ...] = ()


def _ignored_detections(dets: Sequence[np.ndarray], dont_care: Sequence[np.ndarray], min_overlap: float) -> set[int]:
    ignored = set()
    for j, det in enumerate(dets):
        for region in dont_care:
            inter, det_area, _ = overlap(det, region)
            if det_area > 0.0 and inter / det_area > min_overlap:
                ignored.add(j)
                break
    return ignored


def _bounds(polygons: Sequence[np.ndarray]) -> np.ndarray:
    if not polygons:
        return np.zeros((0, 4))
    return np.array([[*p.min(axis=0), *p.max(axis=0)] if len(p) else [np.nan] * 4 for p in polygons])


def _bounds_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    # NaN bounds compare False, so a polygon with non-finite corners overlaps nothing.
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def match_image(gt_quads: Sequence[np.ndarray], det_quads: Sequence[np.ndarray] | np.ndarray,
                dont_care: Sequence[np.ndarray] = (), *, iou_threshold: float = IOU_THRESHOLD,
                dont_care_overlap: float = DONT_CARE_OVERLAP) -> ImageMatch:
    """Match detections to ground truth one-to-one: highest IoU first, each pair needing ``IoU >= iou_threshold``.

    ``gt_quads`` are the words that count; ``dont_care`` the ``###`` regions, which only serve to ignore the
    detections that cover them by more than ``dont_care_overlap`` of their own area.
    """
    gts = [as_polygon(g) for g in gt_quads]
    dets = [as_polygon(d) for d in det_quads]
    ignored = _ignored_detections(dets, [as_polygon(r) for r in dont_care], dont_care_overlap)
    gt_boxes, det_boxes = _bounds(gts), _bounds(dets)
    candidates = []
    for i, gt in enumerate(gts):
        for j, det in enumerate(dets):
            # Most pairs are far apart: their bounding boxes settle it without any polygon work.
            if j in ignored or not _bounds_overlap(gt_boxes[i], det_boxes[j]):
                continue
            iou = polygon_iou(gt, det)
            if iou >= iou_threshold and iou > 0.0:
                candidates.append((-iou, i, j))
    candidates.sort()  # ties fall back to the lower indices: deterministic
    used_gt: set[int] = set()
    used_det: set[int] = set()
    pairs = []
    for _, i, j in candidates:
        if i not in used_gt and j not in used_det:
            used_gt.add(i)
            used_det.add(j)
            pairs.append((i, j))
    return ImageMatch(len(pairs), len(gts), len(dets) - len(ignored), tuple(sorted(pairs)), tuple(sorted(ignored)))


@dataclass
class DetectionCounts:
    """Pooled counts over a dataset; precision, recall and H-mean follow the ICDAR script (0 when undefined)."""

    matched: int = 0
    num_gt: int = 0
    num_det: int = 0
    images: int = 0

    def add(self, match: ImageMatch) -> None:
        self.matched += match.matched
        self.num_gt += match.num_gt
        self.num_det += match.num_det
        self.images += 1

    @property
    def precision(self) -> float:
        return self.matched / self.num_det if self.num_det else 0.0

    @property
    def recall(self) -> float:
        return self.matched / self.num_gt if self.num_gt else 0.0

    @property
    def hmean(self) -> float:
        p, r = self.precision, self.recall
        return 2.0 * p * r / (p + r) if p + r > 0.0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"precision": self.precision, "recall": self.recall, "hmean": self.hmean, "matched": self.matched,
                "num_gt": self.num_gt, "num_det": self.num_det, "images": self.images}


def pooled_scores(matches: Iterable[ImageMatch]) -> DetectionCounts:
    counts = DetectionCounts()
    for match in matches:
        counts.add(match)
    return counts


# ---- ground truth -----------------------------------------------------------------------------------------------

def _order_top_left_first(box: np.ndarray) -> np.ndarray:
    return np.roll(box, 4 - int(box.sum(axis=1).argmin()), axis=0)


def word_quad(char_quads: np.ndarray) -> np.ndarray:
    """One ``(4, 2)`` quad around a word's character quads ``(n, 4, 2)``.

    Characters split evenly from an ICDAR word quad tile it (each one's right edge is the next one's left
    edge), so its outline - first char's left edge, last char's right edge - is exactly the annotated quad.
    Synthetic glyph boxes have gaps and different heights; for them the minimum-area rectangle around every
    corner is the word box, rotated text included.
    """
    chars = np.asarray(char_quads, dtype=np.float64).reshape(-1, 4, 2)
    if len(chars) == 0:
        raise ValueError("a word needs at least one character quad")
    tiles = np.allclose(chars[:-1, 1], chars[1:, 0], atol=_TILE_TOLERANCE) and np.allclose(
        chars[:-1, 2], chars[1:, 3], atol=_TILE_TOLERANCE)
    if tiles:
        return np.stack([chars[0, 0], chars[-1, 1], chars[-1, 2], chars[0, 3]])
    box = cv2.boxPoints(cv2.minAreaRect(chars.reshape(-1, 2).astype(np.float32))).astype(np.float64)
    return _order_top_left_first(box)


def word_quads(annotation: Annotation) -> list[np.ndarray]:
    """The word quads of an annotation's words (don't-care regions are separate); non-finite words are skipped."""
    return [word_quad(w.char_quads) for w in annotation.words if np.all(np.isfinite(w.char_quads))]


def parse_gt_quads(text: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(word quads, don't-care quads)`` from an ICDAR2015 ``gt_<stem>.txt``; same rules as the trainer's."""
    annotation = parse_icdar_gt(text)
    return word_quads(annotation), [np.asarray(q, dtype=np.float64) for q in annotation.dont_care]


# ---- inference --------------------------------------------------------------------------------------------------

def prepare_image(image: np.ndarray, image_size: int) -> tuple[torch.Tensor, float, float]:
    """Resize an RGB uint8 image so its longer side is ``image_size``, zero-pad to multiples of 32, normalise.

    Returns ``(tensor (3, H, W), ratio_w, ratio_h)`` with the ratios original over resized size. The resize is
    the trainer's validation resize (:func:`craft_train.imaging.fit_longer_side`).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    size = check_image_size(image_size)
    resized = fit_longer_side(image, size)
    (h, w), (new_h, new_w) = image.shape[:2], resized.shape[:2]
    canvas = np.zeros((round_up_to_stride(new_h), round_up_to_stride(new_w), 3), dtype=np.float32)
    canvas[:new_h, :new_w] = resized
    return normalise(canvas), w / new_w, h / new_h


def predict_maps(model: torch.nn.Module, image: np.ndarray, image_size: int, device: torch.device | str,
                 *, use_amp: bool = False) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(region map, affinity map, ratio_w, ratio_h)`` for one RGB image; the model must be in eval mode."""
    tensor, ratio_w, ratio_h = prepare_image(image, image_size)
    device = torch.device(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        prediction, _ = model(tensor.unsqueeze(0).to(device))
    maps = prediction[0].float().cpu().numpy()
    return maps[..., 0], maps[..., 1], ratio_w, ratio_h


def detect_words(model: torch.nn.Module, image: np.ndarray, image_size: int, device: torch.device | str,
                 thresholds: Thresholds = DEFAULT_THRESHOLDS, *, use_amp: bool = False) -> np.ndarray:
    """Word boxes ``(K, 4, 2)`` in the original image's pixels; the model must be in eval mode."""
    text, link, ratio_w, ratio_h = predict_maps(model, image, image_size, device, use_amp=use_amp)
    return to_image_coordinates(detect_boxes(text, link, thresholds), ratio_w, ratio_h)


# ---- a model over a dataset -------------------------------------------------------------------------------------

def _image_reader(dataset_like: Any) -> Any:
    # SyntheticTextDataset.render and IcdarDataset.load both give (un-augmented RGB image, Annotation).
    for name in ("load", "render"):
        reader = getattr(dataset_like, name, None)
        if callable(reader):
            return reader
    raise TypeError(f"{type(dataset_like).__name__} has neither load(index) nor render(index)")


def evaluate_model(model: torch.nn.Module, dataset_like: Any, indices: Iterable[int], device: torch.device | str,
                   *, image_size: int | None = None, thresholds: Thresholds = DEFAULT_THRESHOLDS,
                   use_amp: bool = False, iou_threshold: float = IOU_THRESHOLD) -> dict[str, float | int]:
    """Detect words in ``dataset_like``'s images ``indices`` and score them against their annotations.

    Returns ``precision``, ``recall``, ``hmean`` (pooled), ``matched``, ``num_gt``, ``num_det``, ``images``
    and ``errors`` (images that could not be read, skipped as the trainer skips them). ``image_size``
    defaults to the dataset's. The model is put in eval mode and restored to its previous mode afterwards.
    """
    read = _image_reader(dataset_like)
    size = operator.index(image_size if image_size is not None else dataset_like.image_size)
    counts, errors = DetectionCounts(), 0
    was_training = model.training
    model.eval()
    try:
        for index in indices:
            try:
                image, annotation = read(int(index))
            except _LOAD_ERRORS:
                errors += 1
                continue
            boxes = detect_words(model, image, size, device, thresholds, use_amp=use_amp)
            counts.add(match_image(word_quads(annotation), boxes, annotation.dont_care, iou_threshold=iou_threshold))
    finally:
        model.train(was_training)
    result = counts.as_dict()
    result["errors"] = errors
    return result


def format_scores(scores: dict[str, Any]) -> str:
    """``precision=0.812 recall=0.700 hmean=0.752 (matched 70 of 100 gt, 86 det)`` for logs."""
    text = f"precision={scores['precision']:.3f} recall={scores['recall']:.3f} hmean={scores['hmean']:.3f}"
    if "matched" in scores:
        text += f" (matched {scores['matched']} of {scores['num_gt']} gt, {scores['num_det']} det)"
    return text
