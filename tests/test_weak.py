"""Weak supervision (craft_train.weak): pseudo character boxes from the model, their confidence, the word-level
synthetic data and the trainer's switch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_benchmark
from torch import nn

from craft_train.cli import main as craft_train_main
from craft_train.config import TrainConfig
from craft_train.crops import crop_geometry, crop_word
from craft_train.data import (
    Annotation,
    MixedDataset,
    SyntheticTextDataset,
    Word,
    collate,
    make_sample,
    parse_icdar_gt,
)
from craft_train.evaluate import polygon_iou
from craft_train.labels import split_word_quad
from craft_train.model import CRAFT
from craft_train.order import epoch_permutation, mix_in
from craft_train.synthetic import word_box
from craft_train.weak import (
    EVEN_SPLIT_CONFIDENCE,
    pseudo_char_quads,
    pseudo_targets,
    split_region_score,
    word_confidence,
)


class BrightPixelsModel(nn.Module):
    """A stand-in for CRAFT whose region score is 1 where the (normalised) input is bright: white glyphs on
    black give one region blob per glyph, exactly where the glyph is."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1)  # only so that the tests can see eval mode and untouched statistics

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = nn.functional.avg_pool2d(x[:, :1], 2)
        self.norm(half)
        region = (half[:, 0] > 0).float()
        return torch.stack([region, torch.zeros_like(region)], dim=-1), half


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _proportional_word() -> tuple[np.ndarray, np.ndarray]:
    """A 128 x 128 black image with three white glyphs of very different widths: what an even split gets wrong."""
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    glyphs = np.stack([_rect(20, 50, 60, 70), _rect(64, 50, 70, 70), _rect(74, 50, 100, 70)])
    for g in glyphs:
        x0, y0 = g[0].astype(int)
        x1, y1 = g[2].astype(int)
        image[y0:y1, x0:x1] = 255
    return image, glyphs


def _iou_1d(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


# ---- the confidence formula -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("length", "found", "expected"),
                         [(5, 5, 1.0), (5, 4, 0.8), (5, 6, 0.8), (5, 2, 0.4), (5, 0, 0.0), (2, 5, 0.0), (1, 1, 1.0)])
def test_word_confidence_is_the_papers_formula(length: int, found: int, expected: float) -> None:
    assert word_confidence(length, found) == pytest.approx(expected)


def test_word_confidence_refuses_an_empty_transcription() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        word_confidence(0, 0)


# ---- splitting the region score ---------------------------------------------------------------------------------

def test_three_peaks_in_the_region_score_give_three_characters_cut_at_the_valleys() -> None:
    region = np.zeros((16, 64), dtype=np.float32)
    columns = np.arange(64)
    for centre in (10, 20, 40):  # half-resolution columns
        region[4:12] = np.maximum(region[4:12], np.exp(-((columns - centre) / 3.0) ** 2))
    rect = (8.0, 8.0, 110.0, 24.0)  # canvas pixels: half-resolution columns 4..54
    cuts, found = split_region_score(region, rect, 0.5)
    assert found == 3
    assert cuts[0] == rect[0] and cuts[-1] == rect[2]
    # valleys at half-resolution columns 15 and 30 -> canvas x = 2c + 0.5
    assert cuts[1:-1] == pytest.approx([30.5, 60.5], abs=2.1)


def test_a_region_score_without_peaks_finds_no_character_and_falls_back_to_the_even_split() -> None:
    region = np.zeros((16, 64), dtype=np.float32)
    quad = _rect(0, 0, 30, 10)
    chars, confidence = pseudo_char_quads(region, (8.0, 8.0, 110.0, 24.0), np.eye(3), quad, 3)
    assert confidence == EVEN_SPLIT_CONFIDENCE
    np.testing.assert_allclose(chars, split_word_quad(quad, 3))


def test_peaks_outside_the_word_rectangle_are_not_counted() -> None:
    region = np.zeros((16, 64), dtype=np.float32)
    region[4:12, 2] = 1.0  # left of the word
    region[0:2, 20] = 1.0  # above it
    region[4:12, 30] = 1.0
    _, found = split_region_score(region, (20.0, 8.0, 110.0, 24.0), 0.5)
    assert found == 1


# ---- crops and pseudo boxes, end to end on a proportional word ---------------------------------------------------

def test_a_rectified_crop_puts_the_word_quad_on_its_rectangle() -> None:
    image, glyphs = _proportional_word()
    quad = word_box(glyphs)
    crop = crop_word(image, quad, crop_geometry(128))
    assert crop is not None and crop.pixels.shape == (32, 128, 3)
    corners = np.concatenate([quad, np.ones((4, 1))], axis=1) @ crop.to_crop.T
    x0, y0, x1, y1 = crop.rect
    np.testing.assert_allclose(corners[:, :2] / corners[:, 2:], _rect(x0, y0, x1, y1), atol=1e-3)
    assert y1 - y0 == pytest.approx(16.0)  # image_size / 8


def test_pseudo_boxes_of_a_proportional_word_follow_its_glyphs_where_the_even_split_does_not() -> None:
    image, glyphs = _proportional_word()
    quad = word_box(glyphs)
    crop = crop_word(image, quad, crop_geometry(128))
    assert crop is not None
    crops = torch.from_numpy(((crop.pixels / 255.0 - 0.485) / 0.229).transpose(2, 0, 1)[None].astype(np.float32))
    region = BrightPixelsModel()(crops)[0][0, ..., 0].numpy()
    chars, confidence = pseudo_char_quads(region, crop.rect, np.linalg.inv(crop.to_crop), quad, 3)
    assert confidence == 1.0 and chars.shape == (3, 4, 2)
    even = split_word_quad(quad, 3)
    spans = [(g[0, 0], g[1, 0]) for g in glyphs]
    pseudo_iou = np.mean([_iou_1d(s, (c[0, 0], c[1, 0])) for s, c in zip(spans, chars, strict=True)])
    even_iou = np.mean([_iou_1d(s, (c[0, 0], c[1, 0])) for s, c in zip(spans, even, strict=True)])
    assert pseudo_iou > even_iou + 0.15  # measured 0.82 vs 0.62; cuts in the gaps make the tiling's best
    # the cuts fall in the gaps between the glyphs (x 60-64 and 70-74), within a half-resolution pixel
    assert 59 <= chars[0, 1, 0] <= 65 and 69 <= chars[1, 1, 0] <= 75


def test_pseudo_targets_label_the_word_in_the_training_sample_and_leave_the_model_as_it_was() -> None:
    image, glyphs = _proportional_word()
    annotation = Annotation((Word(split_word_quad(word_box(glyphs), 3), 0.5, word_level=True),))
    sample = make_sample(image, annotation, 128, weak_supervision=True)
    assert float(sample["region"].max()) == 0.0  # the word is left to the model
    batch = collate([sample, make_sample(image, Annotation(), 128, weak_supervision=True)])
    assert batch["word_owner"].tolist() == [0]
    model = BrightPixelsModel().train()
    stats = model.norm.running_mean.clone(), model.norm.num_batches_tracked.clone()
    labelled = pseudo_targets(model, batch)
    assert model.training
    assert torch.equal(model.norm.running_mean, stats[0])
    assert torch.equal(model.norm.num_batches_tracked, stats[1])
    assert labelled is not batch and float(batch["region"].max()) == 0.0  # the input batch is not modified
    region = labelled["region"][0].numpy()
    # one region peak per glyph, at its centre (label map = half resolution); the second image has none
    for g in glyphs:
        cx, cy = (g[:, 0].mean() + 0.5) / 2 - 0.5, (g[:, 1].mean() + 0.5) / 2 - 0.5
        assert region[round(cy), round(cx)] > 0.9
    assert float(labelled["region"][1].max()) == 0.0
    assert float(labelled["mask"][0].min()) == 1.0  # count matches: confidence 1


def test_pseudo_targets_are_bit_identical_for_the_same_weights_and_batch() -> None:
    data = SyntheticTextDataset(4, 64, seed=3, labels="word", weak_supervision=True)
    batch = collate([data[(i, 11)] for i in range(4)])
    assert int(batch["word_crops"].shape[0]) > 0
    torch.manual_seed(0)
    model = CRAFT()
    first, second = pseudo_targets(model, batch), pseudo_targets(model, batch)
    for key in ("region", "affinity", "mask"):
        assert torch.equal(first[key], second[key]), key


def test_a_batch_without_word_level_words_comes_back_unchanged() -> None:
    data = SyntheticTextDataset(2, 64, seed=3)
    batch = collate([data[(0, 0)], data[(1, 0)]])
    assert pseudo_targets(BrightPixelsModel(), batch) is batch


# ---- word-level data ----------------------------------------------------------------------------------------------

def test_word_level_synthetic_data_shows_the_same_images_with_word_boxes_only() -> None:
    chars = SyntheticTextDataset(3, 128, seed=5)
    words = SyntheticTextDataset(3, 128, seed=5, labels="word")
    for index in range(3):
        image_c, exact = chars.render(index)
        image_w, coarse = words.render(index)
        assert np.array_equal(image_c, image_w)
        assert len(exact.words) == len(coarse.words)
        for true, word in zip(exact.words, coarse.words, strict=True):
            n = len(true.char_quads)
            assert len(word.char_quads) == n and word.word_level == (n > 1)
            np.testing.assert_allclose(word.word_quad(), word_box(true.char_quads), atol=1e-9)
            assert word.confidence == (1.0 if n == 1 else 0.5)
        _, again = words.render_chars(index)
        assert all(np.array_equal(a.char_quads, b.char_quads) for a, b in zip(again.words, exact.words, strict=True))


def _even_split_iou(data: SyntheticTextDataset, images: int) -> float:
    ious = []
    for index in range(images):
        for word in data.render_chars(index)[1].words:
            chars = word.char_quads
            if len(chars) > 1:
                even = split_word_quad(word_box(chars), len(chars))
                ious += [max(polygon_iou(true, box) for box in even) for true in chars]
    return float(np.mean(ious))


def test_letter_gaps_space_letters_irregularly_where_the_even_split_is_wrong() -> None:
    regular = SyntheticTextDataset(20, 128, seed=5, labels="word")
    gapped = SyntheticTextDataset(20, 128, seed=5, labels="word", letter_gaps=1.0)
    assert np.array_equal(regular.render(3)[0], SyntheticTextDataset(20, 128, seed=5, letter_gaps=0.0).render(3)[0])
    spreads = []
    for index in range(20):
        for word in gapped.render_chars(index)[1].words:
            if len(word.char_quads) > 2:
                lefts, rights = word.char_quads[:, :, 0].min(axis=1), word.char_quads[:, :, 0].max(axis=1)
                gaps = lefts[1:] - rights[:-1]  # upright words only would be exact; rotated ones still vary
                spreads.append(float(gaps.max() - gaps.min()))
    assert np.median(spreads) > 3.0  # pixels: gaps of one word differ
    assert _even_split_iou(gapped, 20) < _even_split_iou(regular, 20) - 0.1
    with pytest.raises(ValueError, match="letter_gaps"):
        SyntheticTextDataset(2, 64, seed=0, letter_gaps=-0.5)


def test_word_box_of_a_rotated_word_starts_at_its_top_left_and_encloses_every_glyph() -> None:
    angle = np.deg2rad(-30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    glyphs = np.stack([_rect(0, 0, 10, 20), _rect(12, 5, 20, 20), _rect(22, 0, 30, 20)]) @ rotation.T
    box = word_box(glyphs)
    np.testing.assert_allclose(box, _rect(0, 0, 30, 20) @ rotation.T, atol=1e-9)


def test_icdar_words_of_several_characters_are_word_level_and_single_characters_exact() -> None:
    annotation = parse_icdar_gt("0,0,30,0,30,10,0,10,abc\n40,0,50,0,50,10,40,10,x\n60,0,70,0,70,10,60,10,###\n")
    assert [w.word_level for w in annotation.words] == [True, False]
    np.testing.assert_allclose(annotation.words[0].word_quad(), _rect(0, 0, 30, 10))
    assert len(annotation.dont_care) == 1


def test_weakly_supervised_samples_keep_dont_care_and_character_level_words_in_their_maps() -> None:
    image, glyphs = _proportional_word()
    annotation = Annotation((Word(glyphs[:1], 1.0), Word(split_word_quad(_rect(20, 90, 60, 110), 4), 0.5,
                                                              word_level=True)), (_rect(100, 100, 120, 120),))
    sample = make_sample(image, annotation, 128, weak_supervision=True)
    plain = make_sample(image, annotation, 128)
    assert float(sample["region"][30, 19]) > 0.9  # the exact glyph is drawn
    assert float(sample["region"][50, 19]) == 0.0 < float(plain["region"][50, 19])  # the word is left to the model
    assert float(sample["mask"][55, 55]) == 0.0  # don't-care stays don't-care
    assert sample["word_crops"].shape == (1, 3, 32, 128) and sample["word_length"].tolist() == [4]
    assert "word_crops" not in plain


# ---- the trainer's switch -------------------------------------------------------------------------------------------

def test_weak_supervision_auto_is_on_for_word_level_data_and_off_for_character_level_data() -> None:
    assert not TrainConfig().uses_weak_supervision
    assert TrainConfig(synthetic_labels="word").uses_weak_supervision
    assert TrainConfig(data_dir="some/dir").uses_weak_supervision
    assert not TrainConfig(data_dir="some/dir", weak_supervision="off").uses_weak_supervision
    assert TrainConfig(weak_supervision="on").uses_weak_supervision


@pytest.mark.parametrize(("field", "value"), [("weak_supervision", "yes"), ("synthetic_labels", "chars")])
def test_invalid_weak_supervision_settings_are_refused_with_the_choices(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be"):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


# ---- character-level synthetic images mixed into word-level data (the paper's 1:5) --------------------------------

def test_mixing_puts_one_synthetic_index_after_every_n_of_the_epochs_own_and_keeps_their_order() -> None:
    order = torch.tensor([5, 3, 8, 1, 0, 9, 2])
    mixed = mix_in(order, seed=0, epoch=1, every=3, first=100, count=50)
    assert len(mixed) == 10  # 7 own + one after each of the groups of 3, 3 and 1
    assert [int(i) >= 100 for i in mixed] == [False] * 3 + [True] + [False] * 3 + [True, False, True]
    assert mixed[mixed < 100].tolist() == order.tolist()
    picks = mixed[mixed >= 100].tolist()
    assert len(set(picks)) == 3 and all(100 <= i < 150 for i in picks)
    # a pure function of seed and epoch: the same again, other images in another epoch
    assert torch.equal(mixed, mix_in(order, seed=0, epoch=1, every=3, first=100, count=50))
    assert mix_in(order, seed=0, epoch=2, every=3, first=100, count=50)[mixed >= 100].tolist() != picks


def test_mixing_cycles_the_synthetic_images_when_an_epoch_needs_more_than_there_are() -> None:
    mixed = mix_in(torch.arange(10), seed=0, epoch=1, every=1, first=10, count=3)
    picks = mixed[1::2].tolist()
    assert mixed[0::2].tolist() == list(range(10))
    assert sorted(picks.count(i) for i in (10, 11, 12)) == [3, 3, 4]
    with pytest.raises(ValueError, match="every >= 1"):
        mix_in(torch.arange(3), seed=0, epoch=1, every=0, first=3, count=1)


def test_a_mixed_dataset_serves_the_runs_images_then_character_level_ones_it_never_sees_as_words() -> None:
    words = SyntheticTextDataset(4, 64, seed=5, labels="word", weak_supervision=True)
    chars = SyntheticTextDataset(4 + 6, 64, seed=5, labels="char", weak_supervision=True)
    mixed = MixedDataset(words, chars, synthetic_offset=4)
    assert len(mixed) == 4 + 6 and mixed.synthetic_count == 6
    own, extra = mixed[(1, 7)], mixed[(4, 7)]
    assert all(torch.equal(own[k], words[(1, 7)][k]) for k in own)
    assert all(torch.equal(extra[k], chars[(4, 7)][k]) for k in extra)
    assert extra["word_crops"].shape[0] == 0 < own["word_crops"].shape[0]  # exact boxes: nothing to pseudo-label
    image, annotation = mixed.load(4)
    assert annotation.words and not any(w.word_level for w in annotation.words)
    assert not any(np.array_equal(image, words.render(i)[0]) for i in range(4))  # not one of the run's images
    batch = collate([own, extra])
    assert set(batch["word_owner"].tolist()) == {0} and batch["size"] == 2
    assert mixed.describe(4) == "mixed-in synthetic image 4 (seed 5)"
    assert mixed.describe(0) == "synthetic image 0 (seed 5)"
    with pytest.raises(ValueError, match="character-level"):
        MixedDataset(words, words)
    with pytest.raises(ValueError, match="synthetic_offset"):
        MixedDataset(words, chars, synthetic_offset=10)


def test_mix_synthetic_is_refused_for_character_level_data_and_below_zero_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert TrainConfig(data_dir="some/dir", mix_synthetic=5).mix_synthetic == 5
    assert TrainConfig(synthetic_labels="word", mix_synthetic=5).mix_synthetic == 5
    with pytest.raises(ValueError, match="--mix-synthetic must be 0"):
        TrainConfig(synthetic_labels="word", mix_synthetic=-1)
    assert craft_train_main(["--mix-synthetic", "5"]) == 2  # refused before any model or data is set up
    err = capsys.readouterr().err
    assert "--mix-synthetic mixes character-level synthetic images into word-level data" in err
    assert "--synthetic-labels word" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_learning_curve_benchmark_compares_the_even_split_with_weak_supervision(tmp_path: Path) -> None:
    module = load_benchmark("learning_curve")
    out = tmp_path / "out"
    assert module.main(["--weak-compare", "--steps", "1", "--finetune-steps", "2", "--eval-every", "1",
                        "--val-images", "1", "--image-size", "64", "--mix-char-every", "2", "--out", str(out)]) == 0
    doc = json.loads((out / "weak_supervision.json").read_text())
    assert set(doc["results"]) == {"even_split", "weak"}
    for rows in doc["results"].values():
        assert [r["step"] for r in rows] == [0, 1, 2]  # step 2 trained on character-level data
        assert all(0.0 <= r["char_iou"] <= 1.0 and r["region_mse"] >= 0.0 for r in rows)
    # both runs start from the same interim weights
    assert doc["results"]["weak"][0] == doc["results"]["even_split"][0]
    assert doc["mix_char_every"] == 2 and "| weak | 2 |" in (out / "weak_supervision.md").read_text()
    assert module.main(["--weak-compare", "--interim-weights", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert module.main(["--weak-compare", "--mix-synthetic", "-1", "--out", str(out)]) == 2


def test_the_benchmarks_mix_synthetic_batches_are_the_trainers_mixed_order() -> None:
    module = load_benchmark("learning_curve")
    settings = module.Settings(synthetic_size=20, batch_size=4, seed=1)
    words = SyntheticTextDataset(20, 64, seed=1, labels="word")
    mixed = MixedDataset(words, SyntheticTextDataset(40, 64, seed=1), synthetic_offset=20, every=2)
    own = list(range(0, 20, 2))
    batches = module._batches(settings, own, mixed)
    first_epoch = [i for _ in range(3) for i, _ in next(batches)]  # 10 own + 5 mixed: 3 full batches of 4
    expected = mix_in(epoch_permutation(1, 1, own), seed=1, epoch=1, every=2, first=20, count=20)
    assert first_epoch == expected.tolist()[:12]
    assert [int(i) >= 20 for i in first_epoch[:6]] == [False, False, True, False, False, True]
