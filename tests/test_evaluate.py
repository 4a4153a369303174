"""Detection scoring: polygon IoU, one-to-one matching with don't-care regions, pooled H-mean, evaluate_model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_benchmark

from craft_train.data import Annotation, IcdarDataset, SyntheticTextDataset, Word
from craft_train.evaluate import (
    DetectionCounts,
    ImageMatch,
    evaluate_model,
    format_scores,
    match_image,
    parse_gt_quads,
    polygon_area,
    polygon_iou,
    pooled_scores,
    prepare_image,
    word_quad,
    word_quads,
)
from craft_train.labels import split_word_quad
from craft_train.model import CRAFT


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


# ---- polygons ---------------------------------------------------------------------------------------------------

def test_identical_squares_have_iou_one() -> None:
    assert polygon_iou(_rect(0, 0, 10, 10), _rect(0, 0, 10, 10)) == pytest.approx(1.0)


def test_half_shifted_squares_have_iou_one_third() -> None:
    assert polygon_iou(_rect(0, 0, 10, 10), _rect(5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_disjoint_and_edge_touching_squares_have_iou_zero() -> None:
    assert polygon_iou(_rect(0, 0, 10, 10), _rect(20, 0, 30, 10)) == 0.0
    assert polygon_iou(_rect(0, 0, 10, 10), _rect(10, 0, 20, 10)) == 0.0


def test_iou_ignores_corner_order_and_orientation() -> None:
    a, b = _rect(0, 0, 10, 10), _rect(5, 5, 15, 15)
    assert polygon_iou(a[::-1], np.roll(b, 2, axis=0)) == pytest.approx(polygon_iou(a, b)) == pytest.approx(25 / 175)


def test_nested_rotated_square_iou_is_its_area_share() -> None:
    diamond = np.array([[5, 0], [10, 5], [5, 10], [0, 5]], dtype=np.float64)  # area 50 inside a 100 square
    assert polygon_iou(_rect(0, 0, 10, 10), diamond) == pytest.approx(0.5)


def test_non_convex_quads_fall_back_to_a_raster_that_agrees_with_the_exact_area() -> None:
    # An arrow-head quad (area 50 of its 10x10 box): the convex-convex routine cannot take it.
    dart = np.array([[0, 0], [10, 0], [10, 10], [5, 5]], dtype=np.float64)
    exact = polygon_area(dart) / 100.0
    assert polygon_iou(dart, _rect(0, 0, 10, 10)) == pytest.approx(exact, abs=0.01)


def test_self_intersecting_quad_does_not_crash_and_scores_by_its_filled_area() -> None:
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], dtype=np.float64)
    assert 0.3 < polygon_iou(bowtie, _rect(0, 0, 10, 10)) < 0.7


def test_degenerate_and_non_finite_polygons_have_no_area_and_no_overlap() -> None:
    line = np.array([[0, 0], [10, 0], [10, 0], [0, 0]], dtype=np.float64)
    assert polygon_area(line) == 0.0 and polygon_iou(line, _rect(0, 0, 10, 10)) == 0.0
    nan = _rect(0, 0, 10, 10)
    nan[0, 0] = math.nan
    assert polygon_iou(nan, _rect(0, 0, 10, 10)) == 0.0


# ---- matching ---------------------------------------------------------------------------------------------------

def test_perfect_detections_match_every_word() -> None:
    gts = [_rect(0, 0, 10, 10), _rect(20, 0, 30, 10)]
    match = match_image(gts, list(reversed(gts)))
    assert (match.matched, match.num_gt, match.num_det) == (2, 2, 2)
    assert match.pairs == ((0, 1), (1, 0))


def test_iou_at_the_threshold_matches_and_just_below_does_not() -> None:
    gt = _rect(0, 0, 12, 10)
    assert match_image([gt], [_rect(4, 0, 16, 10)]).matched == 1  # IoU 8/16 = 0.5
    assert match_image([gt], [_rect(4.1, 0, 16.1, 10)]).matched == 0


def test_one_detection_covering_two_words_matches_at_most_one() -> None:
    gts = [_rect(0, 0, 10, 10), _rect(10, 0, 13, 10)]
    match = match_image(gts, [_rect(0, 0, 13, 10)])
    assert (match.matched, match.num_gt, match.num_det) == (1, 2, 1)
    assert match.pairs == ((0, 0),)


def test_duplicate_detections_of_one_word_count_one_match_and_one_false_positive() -> None:
    gt = _rect(0, 0, 10, 10)
    match = match_image([gt], [_rect(1, 0, 11, 10), _rect(0, 0, 10, 10)])
    assert match.pairs == ((0, 1),)  # the better one wins
    assert (match.matched, match.num_det) == (1, 2)


def test_detections_mostly_inside_a_dont_care_region_are_ignored() -> None:
    dont_care = [_rect(100, 100, 200, 150)]
    inside = _rect(110, 110, 150, 140)
    half_out = _rect(180, 110, 220, 140)  # exactly half inside: not "more than half", so it counts
    match = match_image([_rect(0, 0, 10, 10)], [_rect(0, 0, 10, 10), inside, half_out], dont_care)
    assert match.ignored_dets == (1,)
    assert (match.matched, match.num_gt, match.num_det) == (1, 1, 2)


def test_dont_care_regions_are_not_words_to_find() -> None:
    match = match_image([], [], [_rect(0, 0, 10, 10)])
    assert (match.matched, match.num_gt, match.num_det) == (0, 0, 0)


def test_empty_ground_truth_and_detections_are_handled() -> None:
    assert match_image([], []) == ImageMatch(0, 0, 0)
    missed = match_image([_rect(0, 0, 5, 5)], np.zeros((0, 4, 2)))
    assert (missed.matched, missed.num_gt, missed.num_det) == (0, 1, 0)
    spurious = match_image([], [_rect(0, 0, 5, 5)])
    assert (spurious.matched, spurious.num_gt, spurious.num_det) == (0, 0, 1)


# ---- pooling ----------------------------------------------------------------------------------------------------

def test_scores_are_pooled_over_images_not_averaged() -> None:
    counts = pooled_scores([ImageMatch(1, 1, 1), ImageMatch(0, 3, 1)])
    # Per-image recall would average (1 + 0) / 2 = 0.5; pooled it is 1 of 4.
    assert counts.recall == pytest.approx(0.25)
    assert counts.precision == pytest.approx(0.5)
    assert counts.hmean == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    assert counts.as_dict() == {"precision": 0.5, "recall": 0.25, "hmean": pytest.approx(1 / 3), "matched": 1,
                                "num_gt": 4, "num_det": 2, "images": 2}


def test_no_detections_or_no_ground_truth_score_zero_without_dividing_by_zero() -> None:
    assert DetectionCounts().as_dict()["hmean"] == 0.0
    nothing_found = pooled_scores([ImageMatch(0, 5, 0)])
    assert (nothing_found.precision, nothing_found.recall, nothing_found.hmean) == (0.0, 0.0, 0.0)


def test_scores_format_for_logs() -> None:
    text = format_scores(pooled_scores([ImageMatch(3, 4, 5)]).as_dict())
    assert text == "precision=0.600 recall=0.750 hmean=0.667 (matched 3 of 4 gt, 5 det)"


# ---- ground truth -----------------------------------------------------------------------------------------------

def test_word_quad_of_an_icdar_split_word_is_the_annotated_quad() -> None:
    quad = np.array([[10, 12], [60, 8], [62, 30], [11, 33]], dtype=np.float64)  # not a rectangle
    assert np.allclose(word_quad(split_word_quad(quad, 5)), quad)


def test_word_quad_of_synthetic_glyph_boxes_encloses_every_character() -> None:
    chars = np.array([_rect(0, 4, 6, 14), _rect(8, 0, 14, 14), _rect(16, 6, 20, 18)])
    quad = word_quad(chars)
    assert np.allclose(quad, _rect(0, 0, 20, 18))


def test_word_quad_of_a_rotated_synthetic_word_is_rotated() -> None:
    chars = np.array([_rect(0, 0, 6, 10), _rect(8, 2, 14, 10), _rect(16, 0, 22, 10)])
    angle = np.deg2rad(30.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    quad = word_quad(chars @ rot.T)
    assert polygon_area(quad) == pytest.approx(220.0, rel=1e-3)
    assert quad.sum(axis=1).argmin() == 0


def test_icdar_ground_truth_gives_word_quads_and_dont_care_regions() -> None:
    text = "\ufeff10,10,50,10,50,30,10,30,HELLO\n60,10,90,10,90,30,60,30,###\n1,1,9,1,9,9,1,9,a,b\n"
    words, dont_care = parse_gt_quads(text)
    assert len(words) == 2 and len(dont_care) == 1
    assert np.allclose(words[0], _rect(10, 10, 50, 30)) and np.allclose(words[1], _rect(1, 1, 9, 9))
    assert np.allclose(dont_care[0], _rect(60, 10, 90, 30))


def test_word_quads_skip_words_with_non_finite_coordinates() -> None:
    bad = _rect(0, 0, 5, 5)[None].copy()
    bad[0, 0, 0] = math.inf
    annotation = Annotation((Word(_rect(0, 0, 5, 5)[None], 1.0), Word(bad, 1.0)))
    assert len(word_quads(annotation)) == 1


# ---- inference and evaluate_model -------------------------------------------------------------------------------

def test_prepare_image_resizes_the_long_side_and_pads_to_multiples_of_32() -> None:
    image = np.full((90, 200, 3), 255, dtype=np.uint8)
    tensor, ratio_w, ratio_h = prepare_image(image, 128)
    assert tuple(tensor.shape) == (3, 64, 128)  # 200x90 -> 128x58, padded to 128x64
    assert ratio_w == pytest.approx(200 / 128) and ratio_h == pytest.approx(90 / 58)
    assert tensor[0, 0, 0] == pytest.approx((1.0 - 0.485) / 0.229, rel=1e-5)
    assert tensor[0, 63, 0] == pytest.approx(-0.485 / 0.229, rel=1e-5)  # black padding, as in training
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_image(image, 100)


class _OracleModel(torch.nn.Module):
    """Stands in for a perfect CRAFT: returns the ground-truth score maps of the image it is shown."""

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[2] // 2, x.shape[3] // 2
        return self.maps[None, :h, :w], x


def test_ground_truth_score_maps_score_perfectly_through_evaluate_model() -> None:
    # Square image, so the trainer's validation sample (S x S, no augmentation) is exactly what the model sees.
    from craft_train.data import make_sample

    class OneImage:
        image_size = 128

        def render(self, index: int) -> tuple[np.ndarray, Annotation]:
            image = np.zeros((256, 256, 3), dtype=np.uint8)
            word = np.array([_rect(40 + 24 * i, 60, 60 + 24 * i, 90) for i in range(4)])
            lone = np.array([_rect(150, 170, 190, 210)])
            return image, Annotation((Word(word, 1.0), Word(lone, 1.0)))

    data = OneImage()
    image, annotation = data.render(0)
    sample = make_sample(image, annotation, 128)
    model = _OracleModel(torch.stack([sample["region"], sample["affinity"]], dim=-1))
    scores = evaluate_model(model, data, [0], "cpu")
    assert scores == {"precision": 1.0, "recall": 1.0, "hmean": 1.0, "matched": 2, "num_gt": 2, "num_det": 2,
                      "images": 1, "errors": 0}


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "gt_a.txt").write_text("1,1,9,1,9,9,1,9,AB\n")
    model = CRAFT()
    scores = evaluate_model(model, IcdarDataset(tmp_path, 64), [0], "cpu")
    assert scores["errors"] == 1 and scores["images"] == 0 and scores["hmean"] == 0.0


def test_an_untrained_model_finds_nothing_and_keeps_its_training_mode() -> None:
    torch.manual_seed(0)
    model = CRAFT()
    model.train()
    data = SyntheticTextDataset(4, 64, seed=0, augment=False)
    scores = evaluate_model(model, data, [0, 1], "cpu")
    assert model.training
    assert scores["num_gt"] > 0 and scores["hmean"] == 0.0 and scores["images"] == 2


def test_a_dataset_without_load_or_render_is_refused() -> None:
    with pytest.raises(TypeError, match="load"):
        evaluate_model(CRAFT(), object(), [0], "cpu", image_size=64)


def test_learning_curve_benchmark_writes_json_markdown_and_a_chart(tmp_path: Path) -> None:
    import importlib.util
    import json

    module = load_benchmark("learning_curve")

    out = tmp_path / "out"
    assert module.main(["--steps", "2", "--eval-every", "1", "--val-images", "2", "--image-size", "64",
                        "--out", str(out)]) == 0
    doc = json.loads((out / "learning_curve.json").read_text())
    assert [r["step"] for r in doc["results"]] == [0, 1, 2]
    assert doc["results"][0]["train_loss"] is None and doc["results"][2]["train_loss"] > 0
    assert all(0.0 <= r["hmean"] <= 1.0 and r["val_loss"] > 0 for r in doc["results"])
    assert 0.0 <= doc["ceiling"]["hmean"] <= 1.0 and doc["settings"]["steps"] == 2
    assert "| 2 |" in (out / "learning_curve.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "learning_curve.png").stat().st_size > 0
