"""Tests for the OHEM-weighted CRAFT loss on small hand-computable inputs."""

from __future__ import annotations

import pytest
import torch

from craft_train.loss import craft_loss, ohem_mse


def _row(values: list[float]) -> torch.Tensor:
    return torch.tensor([[values]], dtype=torch.float64)  # (N=1, H=1, W)


def _pred(region: list[float], affinity: list[float]) -> torch.Tensor:
    return torch.stack([_row(region), _row(affinity)], dim=-1)


REGION_LABEL = [0.8, 0, 0, 0, 0, 0, 0, 0]
REGION_PRED = [0.5, 0.1, 0.2, 0.3, 0.4, 0, 0, 0]


def test_positives_are_averaged_and_three_hard_negatives_per_positive_are_kept() -> None:
    pred = _pred(REGION_PRED, [0.1] * 8)
    total, cls_loss, geo_loss = craft_loss(pred, _row(REGION_LABEL), _row([0.0] * 8), torch.ones(1, 1, 8))
    # Region: positive loss 0.3^2; the 3 hardest of the 7 negatives are 0.4^2, 0.3^2, 0.2^2.
    assert cls_loss.item() == pytest.approx(0.09 + (0.16 + 0.09 + 0.04) / 3)
    # Affinity has no positives: all 8 (< 500) negatives are averaged.
    assert geo_loss.item() == pytest.approx(0.01)
    assert total.item() == pytest.approx(cls_loss.item() + geo_loss.item())


def test_masked_pixels_contribute_nothing_to_value_or_gradient() -> None:
    mask = torch.ones(1, 1, 8, dtype=torch.float64)
    mask[0, 0, 4] = 0.0
    pred = _pred(REGION_PRED, [0.1] * 8).requires_grad_(True)
    _, cls_loss, _ = craft_loss(pred, _row(REGION_LABEL), _row([0.0] * 8), mask)
    assert cls_loss.item() == pytest.approx(0.09 + (0.09 + 0.04 + 0.01) / 3)
    cls_loss.backward()
    assert pred.grad[0, 0, 4, 0] == 0

    changed = _pred([*REGION_PRED[:4], 5.0, *REGION_PRED[5:]], [0.1] * 8)
    _, cls_changed, _ = craft_loss(changed, _row(REGION_LABEL), _row([0.0] * 8), mask)
    assert cls_changed.item() == cls_loss.item()


def test_confidence_mask_scales_the_pixel_loss() -> None:
    mask = torch.ones(1, 1, 8, dtype=torch.float64)
    mask[0, 0, 0] = 0.5
    _, cls_loss, _ = craft_loss(_pred(REGION_PRED, [0.0] * 8), _row(REGION_LABEL), _row([0.0] * 8), mask)
    assert cls_loss.item() == pytest.approx(0.5 * 0.09 + (0.16 + 0.09 + 0.04) / 3)


def test_without_positives_the_top_500_negatives_are_averaged() -> None:
    pred = torch.linspace(0.0, 1.0, 900, dtype=torch.float64).reshape(1, 30, 30)
    loss = ohem_mse(pred, torch.zeros_like(pred), torch.ones_like(pred))
    expected = torch.sort(pred.flatten() ** 2, descending=True).values[:500].mean()
    assert loss.item() == pytest.approx(expected.item())


def test_images_are_mined_separately_and_averaged() -> None:
    pred = torch.tensor([[[0.5, 0.2, 0.1, 0.0]], [[0.0, 0.3, 0.0, 0.0]]], dtype=torch.float64)
    label = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    loss = ohem_mse(pred, label, torch.ones_like(pred))
    first = 0.25 + (0.04 + 0.01 + 0.0) / 3  # one positive, k = min(3, 3)
    second = 0.09 / 4  # no positive: all four negatives
    assert loss.item() == pytest.approx((first + second) / 2)


def test_gradient_reaches_positives_and_hard_negatives_only() -> None:
    pred = _pred(REGION_PRED, [0.0] * 8).requires_grad_(True)
    total, _, _ = craft_loss(pred, _row(REGION_LABEL), _row([0.0] * 8), torch.ones(1, 1, 8))
    total.backward()
    grad = pred.grad[0, 0, :, 0]
    assert grad[0] == pytest.approx(2 * (0.5 - 0.8))
    assert grad[4] == pytest.approx(2 * 0.4 / 3)
    assert grad[1] == 0  # 0.1^2 is not among the three hardest negatives


def test_empty_batch_gives_a_zero_tensor_that_supports_backward() -> None:
    pred = torch.zeros(0, 4, 4, 2, requires_grad=True)
    empty = torch.zeros(0, 4, 4)
    total, cls_loss, geo_loss = craft_loss(pred, empty, empty, empty)
    assert isinstance(total, torch.Tensor) and total.item() == 0.0
    assert cls_loss.item() == 0.0 and geo_loss.item() == 0.0
    total.backward()
    assert pred.grad is not None and pred.grad.shape == pred.shape


def test_fully_masked_image_has_zero_loss() -> None:
    pred = torch.rand(1, 4, 4, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
    total, _, _ = craft_loss(pred, labels, labels, torch.zeros(1, 4, 4))
    assert total.item() == 0.0


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="region must be"):
        craft_loss(torch.zeros(1, 4, 4, 2), torch.zeros(1, 4, 5), torch.zeros(1, 4, 4), torch.ones(1, 4, 4))


def test_half_precision_predictions_give_a_float32_loss() -> None:
    pred = _pred(REGION_PRED, [0.1] * 8).half()
    total, cls_loss, _ = craft_loss(pred, _row(REGION_LABEL).float(), _row([0.0] * 8).float(),
                                    torch.ones(1, 1, 8))
    assert total.dtype == torch.float32
    assert cls_loss.item() == pytest.approx(0.09 + (0.16 + 0.09 + 0.04) / 3, rel=1e-3)
