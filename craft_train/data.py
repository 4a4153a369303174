"""Datasets, augmentation and batching for CRAFT training.

Determinism contract: ``dataset[(index, aug_seed)]`` draws all of its randomness from
``numpy.random.default_rng`` generators seeded from the key (and, for synthetic data, the
dataset seed) - never from global RNG state - so the same key yields a bit-identical sample
in any process, DataLoader workers included.  A sample is a dict of float32 tensors::

    image     (3, S, S)      RGB, ImageNet-normalised
    region    (S/2, S/2)     character region score
    affinity  (S/2, S/2)     link score between neighbouring characters
    mask      (S/2, S/2)     loss confidence: 1 background, word confidence, 0 don't-care

With weak supervision (``weak_supervision=True``) the word-level words are left out of those maps and come as
rectified crops instead, for the training step to label with the model (:mod:`craft_train.weak`)::

    word_crops     (W, 3, Hc, Wc)  the words cut out of the source image, ImageNet-normalised
    word_rect      (W, 4)          each word's (x0, y0, x1, y1) in its crop
    word_to_label  (W, 3, 3)       homography from crop pixels to the label map
    word_quad      (W, 4, 2)       the word quad in the label map
    word_length    (W,)            transcription length

Unreadable samples come back as ``None`` and are dropped (and counted) by :func:`collate`. Images are read and
normalised by :mod:`craft_train.imaging`; the annotation types and the ICDAR parser live in
:mod:`craft_train.annotations` (re-exported here).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch

from craft_train.annotations import Annotation, Word, as_word_level, parse_icdar_gt
from craft_train.crops import crop_geometry, crop_word
from craft_train.geometry import as_homography, transform_points
from craft_train.imaging import (
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_image_size,
    fit_longer_side,
    normalise,
    read_rgb,
    scale_image,
)
from craft_train.labels import gaussian_template, render_labels
from craft_train.synthetic import render_scene

from .order import mix_in

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Annotation",
    "IcdarDataset",
    "MixedDataset",
    "SyntheticLabels",
    "SyntheticTextDataset",
    "Word",
    "collate",
    "make_sample",
    "parse_icdar_gt",
    "render_labels",
    "split_indices",
]

_SAMPLE_KEYS = ("image", "region", "affinity", "mask")
_WORD_KEYS = ("word_crops", "word_rect", "word_to_label", "word_quad", "word_length")
SyntheticLabels = Literal["char", "word"]
# Domain tags keep content and augmentation streams apart even when the seeds coincide.
_CONTENT_STREAM = 1
_AUGMENT_STREAM = 2
_LAYOUT_HELP = "expected DIR/*.jpg with DIR/gt_<stem>.txt, or DIR/images/*.jpg with DIR/gt/gt_<stem>.txt"


def _check_key(key: object, length: int) -> tuple[int, int]:
    if not isinstance(key, (tuple, list)) or len(key) != 2:
        raise TypeError(f"dataset keys are (index, aug_seed) pairs of ints, got {key!r}")
    index, aug_seed = operator.index(key[0]), operator.index(key[1])
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} samples")
    if aug_seed < 0:
        raise ValueError(f"aug_seed must be non-negative, got {aug_seed}")
    return index, aug_seed


def _augment_rng(aug_seed: int, index: int) -> np.random.Generator:
    # The index is mixed in so one seed per epoch still gives every sample its own draw.
    return np.random.default_rng([aug_seed, index, _AUGMENT_STREAM])


def _crop_origin(rng: np.random.Generator, lo: float, hi: float, size: int, target: float | None) -> float:
    """Pick the crop start on one axis, keeping ``target`` well inside when possible."""
    a, b = (lo, hi - size) if hi - lo >= size else (hi - size, lo)
    if target is not None:
        margin = 0.15 * size
        a2, b2 = max(a, target - size + margin), min(b, target - margin)
        if a2 <= b2:
            a, b = a2, b2
    return float(rng.uniform(a, b)) if b > a else float(a)


def _geometry(rng: np.random.Generator | None, image: np.ndarray, annotation: Annotation,
              size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (resized image, 2x3 source->resized affine, 2x3 resized->crop affine)."""
    h, w = image.shape[:2]
    if rng is None:
        # Validation: whole image, aspect kept, top-left aligned and zero padded.
        resized = fit_longer_side(image, size)
    else:
        resized = scale_image(image, size / min(h, w) * float(rng.uniform(0.7, 1.5)))
    new_h, new_w = resized.shape[:2]
    to_resized = np.array([[new_w / w, 0.0, 0.0], [0.0, new_h / h, 0.0]])
    if rng is None:
        return resized, to_resized, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    angle = float(rng.uniform(-10.0, 10.0)) if rng.random() < 0.5 else 0.0
    rot = cv2.getRotationMatrix2D((new_w / 2.0, new_h / 2.0), angle, 1.0)
    corners = transform_points(np.array([[0, 0], [new_w, 0], [new_w, new_h], [0, new_h]], float), rot)
    target = None
    if annotation.words and rng.random() < 0.9:
        word = annotation.words[int(rng.integers(len(annotation.words)))]
        centre = word.char_quads.reshape(-1, 2).mean(axis=0)
        if np.all(np.isfinite(centre)):
            target = transform_points(transform_points(centre[None], to_resized), rot)[0]
    ox = _crop_origin(rng, corners[:, 0].min(), corners[:, 0].max(), size,
                      None if target is None else float(target[0]))
    oy = _crop_origin(rng, corners[:, 1].min(), corners[:, 1].max(), size,
                      None if target is None else float(target[1]))
    rot[:, 2] -= (ox, oy)
    return resized, to_resized, rot


def _colour_jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    img = image.astype(np.float32)
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img *= np.float32(rng.uniform(0.75, 1.25))
    mean = np.float32((img @ luma).mean())
    img = (img - mean) * np.float32(rng.uniform(0.75, 1.25)) + mean
    gray = (img @ luma)[..., None]
    img = gray + (img - gray) * np.float32(rng.uniform(0.7, 1.3))
    return np.clip(img, 0.0, 255.0)


def _word_crops(image: np.ndarray, words: Sequence[Word], to_label: np.ndarray,
                image_size: int) -> dict[str, torch.Tensor]:
    """Rectified crops of the word-level words that reach the label map, and how to map back from them."""
    geometry = crop_geometry(image_size)
    half = image_size // 2
    crops, rects, homographies, quads, lengths = [], [], [], [], []
    for word in words:
        quad = word.word_quad()
        placed = transform_points(quad, to_label[:2])
        if (placed[:, 0].max() < 0 or placed[:, 1].max() < 0 or placed[:, 0].min() > half - 1
                or placed[:, 1].min() > half - 1):
            continue  # augmentation cropped it away: nothing to label
        crop = crop_word(image, quad, geometry)
        if crop is None:
            continue
        crops.append(normalise(crop.pixels))
        rects.append(crop.rect)
        homographies.append(to_label @ np.linalg.inv(crop.to_crop))
        quads.append(placed)
        lengths.append(len(word.char_quads))
    if not crops:
        return {"word_crops": torch.zeros((0, 3, geometry.height, geometry.width)),
                "word_rect": torch.zeros((0, 4), dtype=torch.float64),
                "word_to_label": torch.zeros((0, 3, 3), dtype=torch.float64),
                "word_quad": torch.zeros((0, 4, 2), dtype=torch.float64),
                "word_length": torch.zeros((0,), dtype=torch.int64)}
    return {"word_crops": torch.stack(crops),
            "word_rect": torch.tensor(rects, dtype=torch.float64),
            "word_to_label": torch.from_numpy(np.stack(homographies)),
            "word_quad": torch.from_numpy(np.stack(quads)),
            "word_length": torch.tensor(lengths, dtype=torch.int64)}


def make_sample(image: np.ndarray, annotation: Annotation, image_size: int,
                rng: np.random.Generator | None = None,
                template: np.ndarray | None = None, *, weak_supervision: bool = False) -> dict[str, torch.Tensor]:
    """Turn an RGB uint8 image and its annotation into a training sample.

    With ``rng`` the image gets random scale, small rotation, a crop preferring text and
    colour jitter; without it the whole image is resized into the S x S canvas (validation).
    With ``weak_supervision`` the word-level words are not drawn into the maps (their even split would be)
    but come as ``word_*`` crops for :func:`craft_train.weak.pseudo_targets`.
    """
    size = check_image_size(image_size)
    resized, to_resized, to_crop = _geometry(rng, image, annotation, size)
    canvas = cv2.warpAffine(resized, to_crop, (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    pixels = _colour_jitter(rng, canvas) if rng is not None else canvas.astype(np.float32)
    # Full-resolution pixel centre x maps to (x + 0.5) / 2 - 0.5 on the half-resolution map.
    to_label = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25]])

    def place(points: np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        flat = p.reshape(-1, 2)
        for m in (to_resized, to_crop, to_label):
            flat = transform_points(flat, m)
        return flat.reshape(p.shape)

    half = (size // 2, size // 2)
    drawn = [w for w in annotation.words if not (weak_supervision and w.word_level)]
    region, affinity, mask = render_labels(
        [place(w.char_quads) for w in drawn],
        [w.confidence for w in drawn],
        [place(q) for q in annotation.dont_care],
        half,
        template,
    )
    sample = {
        "image": normalise(pixels),
        "region": torch.from_numpy(region),
        "affinity": torch.from_numpy(affinity),
        "mask": torch.from_numpy(mask),
    }
    if weak_supervision:
        source_to_label = as_homography(to_label) @ as_homography(to_crop) @ as_homography(to_resized)
        sample.update(_word_crops(image, [w for w in annotation.words if w.word_level], source_to_label, size))
    return sample


class IcdarDataset:
    """ICDAR2015-style folder: images plus ``gt_<image stem>.txt`` files.

    Layouts: ``DIR/*.jpg`` + ``DIR/gt_*.txt``, or ``DIR/images/`` + ``DIR/gt/`` (a ``gt/``
    folder next to the images also works).  ``indices`` selects a subset of the images in
    sorted file-name order; dataset keys index into that subset.
    """

    def __init__(self, data_dir: str | Path, image_size: int, indices: Sequence[int] | None = None,
                 augment: bool = True, *, weak_supervision: bool = False) -> None:
        self.image_size = check_image_size(image_size)
        self.augment = augment
        self.weak_supervision = weak_supervision
        root = Path(data_dir)
        if not root.is_dir():
            raise ValueError(f"ICDAR data directory {str(root)!r} does not exist; {_LAYOUT_HELP}")
        image_dir = root / "images" if (root / "images").is_dir() else root
        images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"no .jpg/.jpeg/.png images in {str(image_dir)!r}; {_LAYOUT_HELP}")
        gt_dirs = [d for d in (root / "gt", image_dir / "gt", image_dir, root) if d.is_dir()]
        items = [(img, self._find_gt(gt_dirs, img.stem)) for img in images]
        if all(gt is None for _, gt in items):
            raise ValueError(f"found {len(images)} images in {str(image_dir)!r} but no ground-truth "
                             f"files gt_<stem>.txt; {_LAYOUT_HELP}")
        if indices is not None:
            chosen = [operator.index(i) for i in indices]
            bad = [i for i in chosen if not 0 <= i < len(items)]
            if bad:
                raise ValueError(f"indices {bad[:5]} out of range for {len(items)} images in {str(root)!r}")
            items = [items[i] for i in chosen]
        self.items: list[tuple[Path, Path | None]] = items
        self._template = gaussian_template()

    @staticmethod
    def _find_gt(gt_dirs: Sequence[Path], stem: str) -> Path | None:
        for directory in gt_dirs:
            candidate = directory / f"gt_{stem}.txt"
            if candidate.is_file():
                return candidate
        return None

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for messages about it."""
        return str(self.items[index][0])

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        """Read image ``index`` (RGB uint8) and its annotation; raises on bad files."""
        image_path, gt_path = self.items[index]
        if gt_path is None:
            raise ValueError(f"no ground truth for {image_path}")
        annotation = parse_icdar_gt(gt_path.read_text(encoding="utf-8-sig"))
        return read_rgb(image_path), annotation

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        index, aug_seed = _check_key(key, len(self))
        try:
            image, annotation = self.load(index)
        except (OSError, ValueError, UnicodeDecodeError, cv2.error):
            return None
        rng = _augment_rng(aug_seed, index) if self.augment else None
        return make_sample(image, annotation, self.image_size, rng, self._template,
                           weak_supervision=self.weak_supervision)


class SyntheticTextDataset:
    """``size`` OpenCV-rendered scenes; content depends only on ``(seed, index)``.

    ``labels="word"`` gives the same images with word-level annotations only (word box + transcription
    length, as real data has), so that weak supervision can be measured against the exact character boxes,
    which :meth:`render_chars` still gives. ``letter_gaps`` > 0 spaces the letters of each word irregularly (up to
    that fraction of the text height per gap), as signs and hand-set text are and as an even split assumes
    they are not: to measure weak supervision where the even split is wrong.
    """

    def __init__(self, size: int, image_size: int, seed: int, augment: bool = True, *,
                 labels: SyntheticLabels = "char", weak_supervision: bool = False,
                 letter_gaps: float = 0.0) -> None:
        if operator.index(size) < 0 or operator.index(seed) < 0:
            raise ValueError(f"size and seed must be non-negative, got {size=}, {seed=}")
        if labels not in ("char", "word"):
            raise ValueError(f"synthetic labels must be 'char' or 'word', not {labels!r}")
        self.size = operator.index(size)
        self.seed = operator.index(seed)
        self.image_size = check_image_size(image_size)
        self.augment = augment
        self.labels = labels
        self.weak_supervision = weak_supervision
        if not 0.0 <= letter_gaps <= 2.0:
            raise ValueError(f"letter_gaps must be between 0 and 2 (a fraction of the text height), got "
                             f"{letter_gaps}")
        self.letter_gaps = letter_gaps
        self._template = gaussian_template()

    def __len__(self) -> int:
        return self.size

    def render_chars(self, index: int) -> tuple[np.ndarray, Annotation]:
        """The un-augmented RGB image and exact character annotation of item ``index``."""
        rng = np.random.default_rng([self.seed, index, _CONTENT_STREAM])
        s = self.image_size
        height, width = s, round(s * rng.uniform(1.0, 1.4))
        image, words = render_scene(rng, height, width, letter_gaps=self.letter_gaps)
        return image, Annotation(tuple(Word(w.char_quads, 1.0) for w in words), ())

    def render(self, index: int) -> tuple[np.ndarray, Annotation]:
        """The un-augmented RGB image of item ``index`` and its annotation (character- or word-level)."""
        image, annotation = self.render_chars(index)
        return image, annotation if self.labels == "char" else as_word_level(annotation)

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for messages about it."""
        return f"synthetic image {index} (seed {self.seed})"

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        """The same as :meth:`render` (rendering cannot fail): the interface :class:`IcdarDataset` has."""
        return self.render(index)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        index, aug_seed = _check_key(key, len(self))
        image, annotation = self.render(index)
        rng = _augment_rng(aug_seed, index) if self.augment else None
        return make_sample(image, annotation, self.image_size, rng, self._template,
                           weak_supervision=self.weak_supervision)


class MixedDataset:
    """A run's training images followed by character-level synthetic ones, under one index space.

    Keys ``(i, aug_seed)`` with ``i < len(primary)`` go to ``primary``; key ``len(primary) + j`` is synthetic
    image ``synthetic_offset + j``. The offset lets a run on synthetic word-level data mix in character-level
    images it never trains on as word-level ones (those after its own ``synthetic_size``). An epoch puts one
    synthetic image after every ``every`` of the primary's (:meth:`epoch_order`).
    """

    def __init__(self, primary: IcdarDataset | SyntheticTextDataset, synthetic: SyntheticTextDataset,
                 synthetic_offset: int = 0, *, every: int = 1) -> None:
        if synthetic.labels != "char":
            raise ValueError("the images mixed in must have character-level labels")
        if not 0 <= synthetic_offset < len(synthetic):
            raise ValueError(f"synthetic_offset must be in [0, {len(synthetic)}), got {synthetic_offset}")
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.primary = primary
        self.synthetic = synthetic
        self.synthetic_offset = synthetic_offset
        self.every = every

    @classmethod
    def with_synthetic(cls, primary: IcdarDataset | SyntheticTextDataset, *, every: int, count: int, seed: int,
                       augment: bool, weak_supervision: bool) -> MixedDataset:
        """``primary`` with ``count`` character-level synthetic images of ``seed`` mixed in (the trainer's
        ``--mix-synthetic``): rendered after the primary's own images when it is synthetic data of that seed."""
        own = len(primary) if isinstance(primary, SyntheticTextDataset) and primary.seed == seed else 0
        synthetic = SyntheticTextDataset(own + count, primary.image_size, seed, augment, labels="char",
                                         weak_supervision=weak_supervision)
        return cls(primary, synthetic, synthetic_offset=own, every=every)

    def epoch_order(self, own_order: torch.Tensor, *, seed: int, epoch: int) -> torch.Tensor:
        """An epoch's order of the primary's indices with the synthetic ones mixed in (:func:`mix_in`)."""
        return mix_in(own_order, seed=seed, epoch=epoch, every=self.every, first=len(self.primary),
                      count=self.synthetic_count)

    @property
    def synthetic_count(self) -> int:
        """How many synthetic images the index space holds after the primary's."""
        return len(self.synthetic) - self.synthetic_offset

    def __len__(self) -> int:
        return len(self.primary) + self.synthetic_count

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for messages about it."""
        if index < len(self.primary):
            return self.primary.describe(index)
        return f"mixed-in {self.synthetic.describe(self.synthetic_offset + index - len(self.primary))}"

    def load(self, index: int) -> tuple[np.ndarray, Annotation]:
        """The un-augmented image and annotation of sample ``index`` (raises on unreadable files)."""
        if index < len(self.primary):
            return self.primary.load(index)
        return self.synthetic.load(self.synthetic_offset + index - len(self.primary))

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        index, aug_seed = _check_key(key, len(self))
        if index < len(self.primary):
            return self.primary[(index, aug_seed)]
        return self.synthetic[(self.synthetic_offset + index - len(self.primary), aug_seed)]


def collate(samples: Sequence[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor | int]:
    """Stack the readable samples; ``errors`` counts dropped ``None`` samples.

    When nothing is left the tensors have zero rows (``image`` is ``(0, 3, 0, 0)``). Word crops of weakly
    supervised samples are concatenated, with ``word_owner`` giving each word's row in the batch.
    """
    kept = [s for s in samples if s is not None]
    batch: dict[str, torch.Tensor | int] = {}
    for name in _SAMPLE_KEYS:
        if kept:
            batch[name] = torch.stack([s[name] for s in kept])
        else:
            batch[name] = torch.zeros((0, 3, 0, 0) if name == "image" else (0, 0, 0), dtype=torch.float32)
    if kept and all("word_crops" in s for s in kept):
        for name in _WORD_KEYS:
            batch[name] = torch.cat([s[name] for s in kept])
        batch["word_owner"] = torch.cat([torch.full((len(s["word_length"]),), row, dtype=torch.int64)
                                         for row, s in enumerate(kept)])
    batch["errors"] = len(samples) - len(kept)
    batch["size"] = len(kept)
    return batch


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic shuffled split of ``range(n)`` into sorted (train, val) index lists.

    With ``val_fraction > 0`` and ``n >= 2`` both parts get at least one item.
    """
    if n < 0 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need n >= 0 and 0 <= val_fraction < 1, got {n=}, {val_fraction=}")
    order = np.random.default_rng([operator.index(seed), n]).permutation(n)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])
