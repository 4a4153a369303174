"""craft_train.imaging: the one image reader and its orientation rule, the size rule, the resize, normalisation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import jpeg_with_exif_orientation

from craft_train.imaging import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_image_size,
    fit_longer_side,
    normalise,
    read_rgb,
    round_up_to_stride,
)


def _left_half_white(height: int, width: int) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = 255
    return image


def test_a_jpeg_tagged_as_rotated_is_read_on_its_stored_pixel_grid(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_with_exif_orientation(_left_half_white(48, 96), orientation=6))
    # The tag is real: a reader that honours it turns the image upright.
    assert cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR).shape == (96, 48, 3)
    image = read_rgb(path)
    assert image.shape == (48, 96, 3) and image.dtype == np.uint8
    assert image[:, :40].min() > 200 and image[:, 56:].max() < 50  # white stays on the left: not rotated


def test_read_rgb_gives_rgb_and_raises_on_undecodable_or_missing_files(tmp_path: Path) -> None:
    bgr = np.zeros((8, 8, 3), dtype=np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    assert tuple(read_rgb(tmp_path / "red.png")[0, 0]) == (255, 0, 0)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image"):
        read_rgb(tmp_path / "broken.jpg")
    with pytest.raises(OSError):
        read_rgb(tmp_path / "missing.jpg")


def test_image_size_must_be_a_positive_multiple_of_32_and_the_message_names_the_setting() -> None:
    assert check_image_size(64) == 64
    for bad in (0, -32, 100):
        with pytest.raises(ValueError, match="--canvas-size must be a positive multiple of 32"):
            check_image_size(bad, "--canvas-size")
    with pytest.raises(TypeError):
        check_image_size(64.0)  # type: ignore[arg-type]
    assert [round_up_to_stride(n) for n in (1, 32, 33, 64.5)] == [32, 32, 64, 96]


def test_fit_longer_side_keeps_the_aspect_ratio() -> None:
    assert fit_longer_side(np.zeros((90, 200, 3), dtype=np.uint8), 128).shape == (58, 128, 3)
    assert fit_longer_side(np.zeros((10, 5, 3), dtype=np.uint8), 64).shape == (64, 32, 3)


def test_normalise_gives_channels_first_imagenet_normalised_float32() -> None:
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[..., 1] = 255
    tensor = normalise(pixels)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    expected = [(v - m) / s for v, m, s in zip((0.0, 1.0, 0.0), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert tensor[:, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)
