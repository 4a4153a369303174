"""CRAFT post-processing on hand-made score maps: words become boxes where they are, thresholds are respected."""

from __future__ import annotations

import numpy as np
import pytest

from craft_train.labels import render_labels
from craft_train.postprocess import DEFAULT_THRESHOLDS, Thresholds, detect_boxes, to_image_coordinates

MAP_HW = (64, 96)


def _word(x0: float, y0: float, char_w: float, char_h: float, n: int, gap: float = 1.0) -> np.ndarray:
    """``n`` axis-aligned character quads in a row, left to right."""
    quads = []
    for i in range(n):
        left = x0 + i * (char_w + gap)
        quads.append([[left, y0], [left + char_w, y0], [left + char_w, y0 + char_h], [left, y0 + char_h]])
    return np.asarray(quads, dtype=np.float64)


def _maps(*words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    region, affinity, _ = render_labels(list(words), [1.0] * len(words), [], MAP_HW)
    return region, affinity


def _extent(box: np.ndarray) -> tuple[float, float, float, float]:
    return float(box[:, 0].min()), float(box[:, 1].min()), float(box[:, 0].max()), float(box[:, 1].max())


def test_a_gaussian_word_becomes_one_box_around_it() -> None:
    word = _word(20, 20, 8, 12, 4)  # x 20..55, y 20..32
    boxes = detect_boxes(*_maps(word))
    assert boxes.shape == (1, 4, 2) and boxes.dtype == np.float32
    left, top, right, bottom = _extent(boxes[0])
    # The box hugs the word: the thresholded Gaussians plus the dilation stay within a couple of pixels of it.
    assert 18 <= left <= 24 and 52 <= right <= 57
    assert 18 <= top <= 24 and 28 <= bottom <= 34


def test_box_corners_start_top_left_and_run_clockwise_on_screen() -> None:
    box = detect_boxes(*_maps(_word(20, 20, 8, 12, 4)))[0]
    tl, tr, br, bl = box
    assert tl[0] < tr[0] and tl[1] < bl[1]
    assert br[0] > bl[0] and br[1] > tr[1]


def test_two_separated_words_become_two_boxes() -> None:
    boxes = detect_boxes(*_maps(_word(5, 10, 8, 12, 3), _word(50, 40, 8, 12, 4)))
    assert len(boxes) == 2
    centres = sorted(tuple(np.round(b.mean(axis=0))) for b in boxes)
    assert abs(centres[0][0] - 18) <= 2 and abs(centres[0][1] - 16) <= 2
    assert abs(centres[1][0] - 67) <= 2 and abs(centres[1][1] - 46) <= 2


def test_characters_without_affinity_stay_separate_words() -> None:
    region, _ = _maps(_word(10, 20, 8, 12, 3, gap=3.0))
    boxes = detect_boxes(region, np.zeros_like(region))
    assert len(boxes) == 3


def test_a_rotated_word_gets_a_rotated_box() -> None:
    word = _word(20, 26, 8, 12, 5)
    centre = word.reshape(-1, 2).mean(axis=0)
    angle = np.deg2rad(25.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rotated = (word - centre) @ rot.T + centre
    box = detect_boxes(*_maps(rotated))[0]
    edge = box[1] - box[0]
    assert abs(np.rad2deg(np.arctan2(edge[1], edge[0])) - 25.0) < 5.0


def test_peak_below_text_threshold_is_dropped() -> None:
    region, affinity = _maps(_word(20, 20, 8, 12, 4))
    dim = 0.6 * region  # peak 0.6: above low_text, below the default text_threshold of 0.7
    assert len(detect_boxes(dim, affinity)) == 0
    assert len(detect_boxes(dim, affinity, Thresholds(text_threshold=0.55))) == 1


def test_low_text_decides_what_counts_as_character() -> None:
    region = np.zeros(MAP_HW, dtype=np.float32)
    region[20:30, 20:30] = 0.5
    region[24:26, 24:26] = 0.9
    assert len(detect_boxes(region, np.zeros_like(region))) == 1
    assert len(detect_boxes(region, np.zeros_like(region), Thresholds(low_text=0.6))) == 0  # only 4 pixels left


def test_link_threshold_decides_whether_characters_join() -> None:
    region, affinity = _maps(_word(10, 20, 8, 12, 3, gap=3.0))
    assert len(detect_boxes(region, affinity)) == 1
    assert len(detect_boxes(region, affinity, Thresholds(link_threshold=0.99))) == 3


def test_components_under_ten_pixels_are_noise() -> None:
    region = np.zeros(MAP_HW, dtype=np.float32)
    region[5:8, 5:8] = 1.0  # 9 pixels
    region[30:32, 30:35] = 1.0  # 10 pixels
    boxes = detect_boxes(region, np.zeros_like(region))
    assert len(boxes) == 1 and _extent(boxes[0])[0] >= 29


def test_a_single_square_character_gets_an_axis_aligned_box_not_a_diamond() -> None:
    region = np.zeros(MAP_HW, dtype=np.float32)
    region[20:31, 20:31] = 1.0
    box = detect_boxes(region, np.zeros_like(region))[0]
    assert np.allclose(box[:, 0].min(), box[0, 0]) and np.allclose(box[0, 1], box[1, 1])


def test_pure_link_pixels_do_not_widen_the_box() -> None:
    region = np.zeros(MAP_HW, dtype=np.float32)
    region[20:30, 20:40] = 1.0
    link = np.zeros_like(region)
    link[24:26, 40:70] = 1.0  # a link leading nowhere: part of the component but removed from the segmentation
    box = detect_boxes(region, link)[0]
    assert _extent(box)[2] < 46


def test_empty_and_blank_maps_give_no_boxes() -> None:
    blank = np.zeros(MAP_HW, dtype=np.float32)
    assert detect_boxes(blank, blank).shape == (0, 4, 2)
    assert detect_boxes(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)).shape == (0, 4, 2)


def test_maps_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        detect_boxes(np.zeros((4, 4)), np.zeros((4, 5)))


def test_non_finite_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="low_text"):
        Thresholds(low_text=float("nan"))
    assert DEFAULT_THRESHOLDS == Thresholds(0.7, 0.4, 0.4)


def test_image_coordinates_double_the_map_and_apply_the_resize_ratio() -> None:
    boxes = np.array([[[1, 2], [3, 2], [3, 4], [1, 4]]], dtype=np.float32)
    out = to_image_coordinates(boxes, ratio_w=1.5, ratio_h=0.5)
    assert np.allclose(out[0, 0], [3.0, 2.0]) and np.allclose(out[0, 2], [9.0, 4.0])
    assert to_image_coordinates(np.zeros((0, 4, 2))).shape == (0, 4, 2)


def _official_get_det_boxes_core(textmap: np.ndarray, linkmap: np.ndarray, text_threshold: float,
                                 link_threshold: float, low_text: float) -> list[np.ndarray]:
    """clovaai/CRAFT-pytorch ``craft_utils.getDetBoxes_core`` (MIT), boxes only, kept line for line."""
    import math

    import cv2

    img_h, img_w = textmap.shape
    _, text_score = cv2.threshold(textmap, low_text, 1, 0)
    _, link_score = cv2.threshold(linkmap, link_threshold, 1, 0)
    text_score_comb = np.clip(text_score + link_score, 0, 1)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(text_score_comb.astype(np.uint8), connectivity=4)
    det = []
    for k in range(1, n_labels):
        size = stats[k, cv2.CC_STAT_AREA]
        if size < 10:
            continue
        if np.max(textmap[labels == k]) < text_threshold:
            continue
        segmap = np.zeros(textmap.shape, dtype=np.uint8)
        segmap[labels == k] = 255
        segmap[np.logical_and(link_score == 1, text_score == 0)] = 0
        x, y = stats[k, cv2.CC_STAT_LEFT], stats[k, cv2.CC_STAT_TOP]
        w, h = stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT]
        niter = int(math.sqrt(size * min(w, h) / (w * h)) * 2)
        sx, ex, sy, ey = x - niter, x + w + niter + 1, y - niter, y + h + niter + 1
        sx, sy = max(sx, 0), max(sy, 0)
        ex, ey = min(ex, img_w), min(ey, img_h)
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (1 + niter, 1 + niter))
        segmap[sy:ey, sx:ex] = cv2.dilate(segmap[sy:ey, sx:ex], kernel)
        np_contours = np.roll(np.array(np.where(segmap != 0)), 1, axis=0).transpose().reshape(-1, 2)
        box = cv2.boxPoints(cv2.minAreaRect(np_contours))
        w, h = np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[1] - box[2])
        box_ratio = max(w, h) / (min(w, h) + 1e-5)
        if abs(1 - box_ratio) <= 0.1:
            left, right = min(np_contours[:, 0]), max(np_contours[:, 0])
            top, bottom = min(np_contours[:, 1]), max(np_contours[:, 1])
            box = np.array([[left, top], [right, top], [right, bottom], [left, bottom]], dtype=np.float32)
        startidx = box.sum(axis=1).argmin()
        det.append(np.roll(box, 4 - startidx, 0))
    return det


@pytest.mark.parametrize("seed", range(6))
def test_boxes_equal_the_official_implementation_on_random_score_maps(seed: int) -> None:
    import cv2

    rng = np.random.default_rng(seed)

    def peaks() -> np.ndarray:
        # Smoothed noise squashed around one standard deviation: dozens of blobs of every size and shape, some
        # touching the borders, some joined by links - what a half-trained model produces.
        t = cv2.GaussianBlur(rng.random((120, 160)).astype(np.float32), (0, 0), 2.0)
        z = (t - t.mean()) / t.std()
        return (1.0 / (1.0 + np.exp(-3.0 * (z - 1.0)))).astype(np.float32)

    text, link = peaks(), peaks()
    expected = _official_get_det_boxes_core(text, link, 0.7, 0.4, 0.4)
    boxes = detect_boxes(text, link)
    assert len(expected) >= 20
    assert len(boxes) == len(expected)
    for got, want in zip(boxes, expected, strict=True):
        # The window shifts minAreaRect's input, which moves its float32 corners by a few ulps.
        assert np.allclose(got, want, atol=1e-3)
