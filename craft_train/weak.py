"""Weakly-supervised character labels for word-level annotations (CRAFT paper, Baek et al. 2019, sec. 3.2).

Real annotations give word boxes and transcriptions, not character boxes. The interim model itself proposes
the characters of each word:

1. the word quad is cropped out of the source image and rectified (a homography onto a horizontal rectangle of
   fixed height, :func:`craft_train.crops.crop_word`; done in the DataLoader workers, so loading stays parallel);
2. the model being trained runs on the batch's crops in eval mode without gradients (:func:`pseudo_targets`,
   in the training step, so the labels follow the weights and an exact resume replays them);
3. the region score inside the rectified word is split into characters by a watershed on its column profile
   (:func:`split_region_score`): every run of columns above ``MARKER_THRESHOLD`` is one character's marker,
   and neighbouring characters are cut at the lowest column between their markers. In a rectified crop the
   characters follow each other along x, so this is the 2-D watershed of the paper reduced to the axis that
   separates them; it does not depend on the transcription, which only scores the result;
4. the cuts are mapped back through the inverse homography into the training sample's label map, and the word
   is trusted as much as its character count matches the transcription (:func:`word_confidence`):
   ``s_conf = (l - min(l, |l - l_c|)) / l``; below 0.5 the even split with confidence 0.5 is used instead.

``###`` words stay don't-care and words with an empty transcription are masked the same way (without a length
there is nothing to split into or to score the split against); one-character words are exact boxes already.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from craft_train.geometry import apply_homography
from craft_train.labels import gaussian_template, render_labels, split_word_quad

__all__ = [
    "EVEN_SPLIT_CONFIDENCE",
    "MARKER_THRESHOLD",
    "MIN_PROMINENCE",
    "pseudo_char_quads",
    "pseudo_targets",
    "region_scores",
    "split_region_score",
    "word_confidence",
]

EVEN_SPLIT_CONFIDENCE = 0.5
MARKER_THRESHOLD = 0.2
"""Region score a character's peak in the rectified word must exceed."""
MIN_PROMINENCE = 0.1
"""How far a character's peak must rise above the valleys that separate it from its neighbours."""
# Crop batches go through the model in chunks of this many words to bound peak memory.
_CHUNK = 64


def word_confidence(length: int, found: int) -> float:
    """The paper's ``s_conf(w) = (l - min(l, |l - l_c|)) / l`` for transcription length ``l``, ``l_c`` found."""
    if length < 1:
        raise ValueError(f"a word's transcription length must be at least 1, got {length}")
    return (length - min(length, abs(length - found))) / length


def _rect_window(shape: tuple[int, ...], rect: Sequence[float]) -> tuple[slice, slice, int] | None:
    """Rows and columns of a half-resolution map whose pixel centres lie inside ``rect`` (canvas pixels)."""
    x0, y0, x1, y1 = (float(v) for v in rect)
    h, w = shape
    # Half-resolution pixel c has its centre at canvas x = 2c + 0.5.
    c0, c1 = max(int(np.ceil((x0 - 0.5) / 2.0)), 0), min(int(np.floor((x1 - 0.5) / 2.0)), w - 1)
    r0, r1 = max(int(np.ceil((y0 - 0.5) / 2.0)), 0), min(int(np.floor((y1 - 0.5) / 2.0)), h - 1)
    if c0 > c1 or r0 > r1:
        return None
    return slice(r0, r1 + 1), slice(c0, c1 + 1), c0


def _prominent_peaks(profile: np.ndarray, min_height: float, min_prominence: float) -> list[int]:
    """Indices of the local maxima (a plateau counts once, at its middle) that stand ``min_prominence`` above the
    higher of the lowest points separating them from a higher peak (or the ends) on either side."""
    peaks = []
    n = len(profile)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and profile[j + 1] == profile[i]:
            j += 1
        left_lower = i == 0 or profile[i - 1] < profile[i]
        right_lower = j == n - 1 or profile[j + 1] < profile[i]
        if left_lower and right_lower and profile[i] > min_height:
            peaks.append((i + j) // 2)
        i = j + 1
    kept = []
    for p in peaks:
        height = profile[p]
        left = p
        while left > 0 and profile[left - 1] <= height:
            left -= 1
        right = p
        while right < n - 1 and profile[right + 1] <= height:
            right += 1
        # left/right stop at a higher point or the end; the base on each side is the lowest point passed.
        base = max(profile[left:p + 1].min(), profile[p:right + 1].min())
        if left == 0 and right == n - 1:
            base = min(base, 0.0)  # the highest peak has no higher neighbour: measured from zero
        if height - base >= min_prominence:
            kept.append(p)
    return kept


def split_region_score(region: np.ndarray, rect: Sequence[float], marker_threshold: float = MARKER_THRESHOLD,
                       min_prominence: float = MIN_PROMINENCE) -> tuple[np.ndarray, int]:
    """``(cuts, l_c)``: the characters found in a crop's half-resolution region score, inside the word ``rect``.

    A 1-D watershed on the column profile (the highest score in each column of the rectified word): every
    maximum above ``marker_threshold`` that stands ``min_prominence`` above the valleys around it is one
    character, and neighbouring characters are cut at the lowest column between their peaks. ``rect`` is the
    word's ``(x0, y0, x1, y1)`` in canvas pixels; ``cuts`` are the canvas x of the character boundaries, ends
    included: ``l_c + 1`` increasing values from ``x0`` to ``x1`` (``[x0, x1]`` when ``l_c`` is 0 or 1).
    """
    x0, x1 = float(rect[0]), float(rect[2])
    window = _rect_window(region.shape, rect)
    if window is None:
        return np.array([x0, x1]), 0
    rows, cols, c0 = window
    profile = np.asarray(region, dtype=np.float32)[rows, cols].max(axis=0)
    peaks = _prominent_peaks(profile, marker_threshold, min_prominence)
    cuts = [x0]
    for left, right in itertools.pairwise(peaks):
        valley = left + int(np.argmin(profile[left:right + 1]))
        cuts.append(2.0 * (c0 + valley) + 0.5)
    cuts.append(x1)
    return np.clip(np.asarray(cuts, dtype=np.float64), x0, x1), len(peaks)


def pseudo_char_quads(region: np.ndarray, rect: Sequence[float], crop_to_target: np.ndarray, word_quad: np.ndarray,
                      length: int, marker_threshold: float = MARKER_THRESHOLD,
                      min_prominence: float = MIN_PROMINENCE) -> tuple[np.ndarray, float]:
    """``(character quads (n, 4, 2), confidence)`` of one word, in the target frame of ``crop_to_target``.

    ``region`` is the model's half-resolution region score of the word's crop, ``rect`` the word in the crop,
    ``crop_to_target`` the homography from canvas pixels to the target frame (where ``word_quad`` is given).
    With ``s_conf >= 0.5`` the cuts become the characters (``l_c`` of them, not necessarily ``length``) with
    confidence ``s_conf``; otherwise the word is split evenly into ``length`` characters at confidence 0.5.
    """
    cuts, found = split_region_score(region, rect, marker_threshold, min_prominence)
    confidence = word_confidence(length, found)
    if confidence < EVEN_SPLIT_CONFIDENCE:
        return split_word_quad(word_quad, length), EVEN_SPLIT_CONFIDENCE
    _, y0, _, y1 = (float(v) for v in rect)
    top = np.stack([cuts, np.full_like(cuts, y0)], axis=1)
    bottom = np.stack([cuts, np.full_like(cuts, y1)], axis=1)
    top, bottom = apply_homography(crop_to_target, top), apply_homography(crop_to_target, bottom)
    quads = np.stack([top[:-1], top[1:], bottom[1:], bottom[:-1]], axis=1)
    return quads, confidence


_TEMPLATE = gaussian_template()


def region_scores(model: torch.nn.Module, crops: torch.Tensor, device: torch.device | str = "cpu") -> np.ndarray:
    """The model's half-resolution region scores ``(W, Hc/2, Wc/2)`` of normalised word crops ``(W, 3, Hc, Wc)``.

    Runs ``model`` in eval mode without gradients (BatchNorm running statistics are left alone), in chunks that
    bound peak memory, and restores its training mode.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [model(crops[i:i + _CHUNK].to(device))[0][..., 0].float().cpu()
                     for i in range(0, crops.shape[0], _CHUNK)]
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy()


def pseudo_targets(model: torch.nn.Module, batch: dict[str, torch.Tensor | int],
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor | int]:
    """The batch with its word-level words' pseudo character labels merged into ``region/affinity/mask``.

    Runs ``model`` in eval mode without gradients on ``batch["word_crops"]`` (BatchNorm running statistics are
    left alone) and restores its training mode. Returns a new dict; a batch without word-level words comes
    back unchanged. Deterministic on CPU: the same weights and batch give bit-identical labels.
    """
    crops = batch.get("word_crops")
    if not isinstance(crops, torch.Tensor) or crops.shape[0] == 0:
        return batch
    scores = region_scores(model, crops, device)
    region_t, affinity_t, mask_t = (batch[k] for k in ("region", "affinity", "mask"))
    assert isinstance(region_t, torch.Tensor) and isinstance(affinity_t, torch.Tensor)
    assert isinstance(mask_t, torch.Tensor)
    owners = _tensor(batch, "word_owner").numpy()
    rects = _tensor(batch, "word_rect").numpy()
    to_label = _tensor(batch, "word_to_label").numpy()
    quads = _tensor(batch, "word_quad").numpy()
    lengths = _tensor(batch, "word_length").numpy()
    per_sample: dict[int, tuple[list[np.ndarray], list[float]]] = {}
    for i in range(len(owners)):
        chars, conf = pseudo_char_quads(scores[i], rects[i], to_label[i], quads[i], int(lengths[i]))
        words, confs = per_sample.setdefault(int(owners[i]), ([], []))
        words.append(chars)
        confs.append(conf)
    region, affinity, mask = region_t.clone(), affinity_t.clone(), mask_t.clone()
    out_hw = (int(region.shape[1]), int(region.shape[2]))
    for owner, (words, confs) in sorted(per_sample.items()):
        r, a, m = render_labels(words, confs, (), out_hw, _TEMPLATE)
        region[owner] = torch.maximum(region[owner], torch.from_numpy(r))
        affinity[owner] = torch.maximum(affinity[owner], torch.from_numpy(a))
        mask[owner] = torch.minimum(mask[owner], torch.from_numpy(m))  # don't-care (0) still wins
    return {**batch, "region": region, "affinity": affinity, "mask": mask}


def _tensor(batch: dict[str, torch.Tensor | int], key: str) -> torch.Tensor:
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"batch[{key!r}] must be a tensor, got {type(value).__name__}")
    return value
