"""Tests for label rendering, the datasets, augmentation and batching."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft_train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Annotation,
    IcdarDataset,
    SyntheticTextDataset,
    Word,
    collate,
    make_sample,
    parse_icdar_gt,
    split_indices,
)
from craft_train.labels import affinity_quads, render_labels, render_score_map, split_word_quad

BOX = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return BOX * [x1 - x0, y1 - y0] + [x0, y0]


def _word(x0: float, y0: float, n: int, char_w: float = 8.0, h: float = 10.0) -> np.ndarray:
    return np.stack([_box(x0 + i * char_w, y0, x0 + (i + 1) * char_w, y0 + h) for i in range(n)])


def _denormalise(image: torch.Tensor) -> np.ndarray:
    rgb = image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return rgb * 255.0


def _write_icdar(directory: Path, stem: str, gt: str, image: np.ndarray | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.full((64, 64, 3), 90, np.uint8)
        cv2.rectangle(image, (10, 10), (50, 30), (250, 250, 250), -1)
    cv2.imwrite(str(directory / f"{stem}.png"), image)
    (directory / f"gt_{stem}.txt").write_bytes(gt.encode("utf-8-sig"))


GT_TEXT = "10,10,50,10,50,30,10,30,a,b\r\n\n40,40,60,40,60,60,40,60,###\r\n"


# --- labels -----------------------------------------------------------------------------------


def test_region_label_peaks_inside_each_character_box() -> None:
    chars = _word(4, 6, 3)
    region, _, _ = render_labels([chars], [1.0], [], (32, 40))
    assert region.dtype == np.float32 and region.max() <= 1.0
    for quad in chars:
        x0, y0 = quad.min(axis=0).astype(int)
        x1, y1 = quad.max(axis=0).astype(int)
        inside = region[y0:y1 + 1, x0:x1 + 1]
        peak_y, peak_x = np.unravel_index(np.argmax(inside), inside.shape)
        centre = quad.mean(axis=0)
        assert abs(x0 + peak_x - centre[0]) <= 1 and abs(y0 + peak_y - centre[1]) <= 1
        assert inside.max() > 0.9
        # The middle 60% of the box (each way) is above the loss' 0.1 positive threshold.
        half = (quad.max(axis=0) - quad.min(axis=0)) * 0.3
        ys, xs = np.mgrid[0:region.shape[0], 0:region.shape[1]]
        core = (np.abs(xs - centre[0]) <= half[0]) & (np.abs(ys - centre[1]) <= half[1])
        assert region[core].min() > 0.1


def test_affinity_joins_neighbouring_characters_but_not_separate_words() -> None:
    left, right = _word(2, 4, 2), _word(40, 4, 2)
    _, affinity, _ = render_labels([left, right], [1.0, 1.0], [], (20, 60))
    # Peak on the shared edge of the two characters of each word.
    assert affinity[9, 10] > 0.8 and affinity[9, 48] > 0.8
    # Nothing between the words, nor inside a lone character's outer half.
    assert affinity[:, 22:36].max() == 0.0
    assert affinity[:, :4].max() == 0.0


def test_affinity_quads_use_triangle_centres() -> None:
    quads = affinity_quads(_word(0, 0, 2, char_w=6.0, h=6.0))
    # Centre (3, 3); upper triangle (0,0),(6,0),(3,3) has centre (3, 1), lower (3, 5).
    np.testing.assert_allclose(quads, [[[3, 1], [9, 1], [9, 5], [3, 5]]])
    assert affinity_quads(_word(0, 0, 1)).shape == (0, 4, 2)


def test_split_word_quad_divides_top_and_bottom_edges_evenly() -> None:
    slanted = np.array([[0, 0], [30, 3], [30, 13], [0, 10]], dtype=np.float64)
    chars = split_word_quad(slanted, 3)
    np.testing.assert_allclose(chars[1], [[10, 1], [20, 2], [20, 12], [10, 11]])
    np.testing.assert_allclose(chars[0][0], slanted[0])
    np.testing.assert_allclose(chars[-1][2], slanted[2])


def test_dont_care_is_zero_and_words_carry_their_confidence_in_the_mask() -> None:
    word = _word(2, 2, 3)
    dont_care = _box(30, 20, 40, 28)
    _, _, mask = render_labels([word], [0.5], [dont_care], (32, 48))
    assert mask[7, 10] == 0.5
    assert mask[24, 35] == 0.0
    assert mask[30, 2] == 1.0
    # Don't-care wins where it overlaps a word.
    _, _, overlap = render_labels([word], [0.5], [_box(0, 0, 10, 10)], (32, 48))
    assert overlap[5, 5] == 0.0


def test_degenerate_quads_are_skipped_without_crashing() -> None:
    bad = [
        np.zeros((4, 2)),  # zero area
        np.full((4, 2), np.nan),
        _box(-50, -50, -10, -10),  # entirely outside
        np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float),  # self-intersecting bow-tie
        np.array([[0, 0], [5, 0], [10, 0], [0, 5]], float),  # three collinear corners
        _box(-1e12, -1e12, 1e12, 1e12),
        np.array([[0, 0], [4, 0], [4, 4], [np.inf, 4]]),
    ]
    region = render_score_map(bad, (16, 16))
    assert region.max() == 0.0
    region, affinity, mask = render_labels([np.stack(bad)], [0.5], bad, (16, 16))
    assert np.isfinite(region).all() and np.isfinite(affinity).all() and np.isfinite(mask).all()
    # A quad partly outside is clipped, not dropped.
    partial = render_score_map([_box(-5, -5, 5, 5)], (16, 16))
    assert partial[0, 0] > 0.5


# --- ICDAR ------------------------------------------------------------------------------------


def test_icdar_gt_parsing_handles_bom_commas_and_dont_care() -> None:
    annotation = parse_icdar_gt("\ufeff" + GT_TEXT + "1,1,9,1,9,9,1,9,x\n0,0,1,0,1,1,0,1,\n")
    assert len(annotation.words) == 2
    ab, x = annotation.words
    assert ab.char_quads.shape == (3, 4, 2) and ab.confidence == 0.5  # "a,b" is three characters
    np.testing.assert_allclose(ab.char_quads[0], _box(10, 10, 10 + 40 / 3, 30))
    assert x.char_quads.shape == (1, 4, 2) and x.confidence == 1.0
    assert len(annotation.dont_care) == 2  # "###" and the empty transcription
    with pytest.raises(ValueError, match="line 1"):
        parse_icdar_gt("1,2,3\n")
    with pytest.raises(ValueError, match="non-numeric"):
        parse_icdar_gt("a,2,3,4,5,6,7,8,word\n")


def test_icdar_dataset_reads_the_flat_layout_and_masks_dont_care(tmp_path: Path) -> None:
    _write_icdar(tmp_path, "img_1", GT_TEXT)
    dataset = IcdarDataset(tmp_path, 64, augment=False)
    assert len(dataset) == 1
    sample = dataset[(0, 0)]
    assert sample is not None
    # 64x64 image at S=64: label coordinates are simply halved.
    assert sample["mask"][25, 25] == 0.0  # inside "###"
    assert sample["mask"][10, 15] == 0.5  # inside the split word
    assert sample["mask"][2, 2] == 1.0
    assert sample["region"][5:15, 5:25].max() > 0.9
    assert sample["region"][20:, 20:].max() == 0.0


def test_icdar_dataset_reads_images_and_gt_subfolders(tmp_path: Path) -> None:
    _write_icdar(tmp_path / "images", "a", GT_TEXT)
    _write_icdar(tmp_path / "images", "b", GT_TEXT)
    (tmp_path / "gt").mkdir()
    for stem in ("a", "b"):
        (tmp_path / "images" / f"gt_{stem}.txt").rename(tmp_path / "gt" / f"gt_{stem}.txt")
    (tmp_path / "images" / "b.png").rename(tmp_path / "images" / "b.JPEG")  # any suffix case
    dataset = IcdarDataset(tmp_path, 64, indices=[1])
    assert [p.name for p, _ in dataset.items] == ["b.JPEG"]
    assert dataset[(0, 3)] is not None
    with pytest.raises(IndexError):
        dataset[(1, 0)]


def test_icdar_dataset_without_images_explains_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "gt_x.txt").write_text(GT_TEXT)
    with pytest.raises(ValueError, match=r"no \.jpg.*expected DIR/\*\.jpg"):
        IcdarDataset(tmp_path, 64)
    with pytest.raises(ValueError, match="does not exist"):
        IcdarDataset(tmp_path / "nope", 64)
    cv2.imwrite(str(tmp_path / "y.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no ground-truth"):
        IcdarDataset(tmp_path, 64)


def test_corrupt_image_gives_none_and_collate_counts_one_error(tmp_path: Path) -> None:
    _write_icdar(tmp_path, "good", GT_TEXT)
    _write_icdar(tmp_path, "zbad", GT_TEXT)
    (tmp_path / "zbad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dataset = IcdarDataset(tmp_path, 64)
    samples = [dataset[(0, 1)], dataset[(1, 1)]]
    assert samples[1] is None
    batch = collate(samples)
    assert batch["errors"] == 1 and batch["size"] == 1
    assert batch["image"].shape == (1, 3, 64, 64) and batch["mask"].shape == (1, 32, 32)


def test_unparsable_ground_truth_gives_none(tmp_path: Path) -> None:
    _write_icdar(tmp_path, "a", "1,2,three,4,5,6,7,8,word\n")
    _write_icdar(tmp_path, "b", "ok")
    (tmp_path / "gt_b.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \x80")
    dataset = IcdarDataset(tmp_path, 64)
    assert dataset[(0, 0)] is None and dataset[(1, 0)] is None


def test_collate_of_only_failures_has_zero_rows() -> None:
    batch = collate([None, None])
    assert batch["errors"] == 2 and batch["size"] == 0
    assert all(batch[k].shape[0] == 0 for k in ("image", "region", "affinity", "mask"))


# --- determinism and augmentation ---------------------------------------------------------------


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_key_gives_bit_identical_samples_whatever_the_global_rng_state(tmp_path: Path) -> None:
    synthetic = SyntheticTextDataset(4, 64, seed=11)
    first = synthetic[(2, 5)]
    np.random.seed(123)
    torch.manual_seed(123)
    _assert_same(first, SyntheticTextDataset(4, 64, seed=11)[(2, 5)])

    _write_icdar(tmp_path, "img", GT_TEXT)
    icdar = IcdarDataset(tmp_path, 64)
    _assert_same(icdar[(0, 9)], icdar[(0, 9)])


def test_different_aug_seed_or_content_seed_changes_the_sample() -> None:
    dataset = SyntheticTextDataset(4, 64, seed=11)
    assert not torch.equal(dataset[(1, 0)]["image"], dataset[(1, 1)]["image"])
    assert not torch.equal(dataset[(1, 0)]["image"], dataset[(2, 0)]["image"])
    other = SyntheticTextDataset(4, 64, seed=12)
    assert not torch.equal(dataset[(1, 0)]["image"], other[(1, 0)]["image"])
    plain = SyntheticTextDataset(4, 64, seed=11, augment=False)
    _assert_same(plain[(1, 0)], plain[(1, 99)])


def test_dataloader_workers_reproduce_in_process_samples() -> None:
    dataset = SyntheticTextDataset(4, 64, seed=3)
    keys = [(0, 7), (3, 8)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=keys, num_workers=1,
                                         collate_fn=collate)
    (batch,) = list(loader)
    expected = collate([dataset[k] for k in keys])
    for name in ("image", "region", "affinity", "mask"):
        assert torch.equal(batch[name], expected[name]), name
    assert batch["errors"] == 0 and batch["size"] == 2


def test_samples_have_documented_shapes_and_dtypes() -> None:
    sample = SyntheticTextDataset(2, 96, seed=0)[(0, 0)]
    assert sample["image"].shape == (3, 96, 96)
    for name in ("region", "affinity", "mask"):
        assert sample[name].shape == (48, 48)
    assert all(t.dtype == torch.float32 for t in sample.values())
    assert 0.0 <= sample["region"].min() and sample["region"].max() <= 1.0
    assert sample["region"].max() > 0.5  # synthetic scenes always hold text
    with pytest.raises(ValueError, match="multiple of 32"):
        SyntheticTextDataset(2, 100, seed=0)
    with pytest.raises(TypeError, match="aug_seed"):
        SyntheticTextDataset(2, 64, seed=0)[0]  # type: ignore[index]


def test_synthetic_character_boxes_cover_the_drawn_text() -> None:
    image, annotation = SyntheticTextDataset(3, 128, seed=5).render(0)
    assert annotation.words and image.dtype == np.uint8
    for word in annotation.words:
        assert word.confidence == 1.0
        for quad in word.char_quads:
            x0, y0 = np.floor(quad.min(axis=0)).astype(int)
            x1, y1 = np.ceil(quad.max(axis=0)).astype(int)
            assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]


@pytest.mark.parametrize("seed", range(6))
def test_augmented_labels_stay_on_the_augmented_text(seed: int) -> None:
    # A bright square on black is the only "character": the region peak must land on it.
    image = np.zeros((96, 128, 3), np.uint8)
    image[30:50, 60:80] = 255
    annotation = Annotation((Word(_box(59.5, 29.5, 79.5, 49.5)[None], 1.0),), ())
    sample = make_sample(image, annotation, 64, np.random.default_rng(seed))
    region = sample["region"].numpy()
    assert region.max() > 0.5
    py, px = np.unravel_index(np.argmax(region), region.shape)
    bright = _denormalise(sample["image"]).mean(axis=2)
    # Half-resolution pixel p covers full-resolution pixels 2p and 2p + 1.
    assert bright[2 * py:2 * py + 2, 2 * px:2 * px + 2].mean() > 100


def test_validation_sample_keeps_the_whole_image_top_left_aligned() -> None:
    image = np.full((32, 64, 3), 200, np.uint8)
    sample = make_sample(image, Annotation(), 64)
    rgb = _denormalise(sample["image"])
    assert np.allclose(rgb[:32], 200, atol=1e-3) and np.allclose(rgb[32:], 0, atol=1e-3)
    assert sample["region"].max() == 0 and torch.all(sample["mask"] == 1)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(0, 200), fraction=st.floats(0.0, 0.9), seed=st.integers(0, 2**32 - 1))
def test_split_indices_is_deterministic_disjoint_and_complete(n: int, fraction: float, seed: int) -> None:
    train, val = split_indices(n, fraction, seed)
    assert (train, val) == split_indices(n, fraction, seed)
    assert sorted(train + val) == list(range(n))
    if fraction > 0 and n >= 2:
        assert len(val) >= 1 and len(train) >= 1
    if fraction == 0:
        assert val == []


def test_split_indices_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError):
        split_indices(10, 1.0, 0)
