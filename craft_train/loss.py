"""CRAFT training loss: confidence-weighted MSE with online hard negative mining (OHEM)."""

from __future__ import annotations

import torch

__all__ = ["NEGATIVE_RATIO", "NO_POSITIVE_NEGATIVES", "POSITIVE_THRESHOLD", "craft_loss", "ohem_mse"]

POSITIVE_THRESHOLD = 0.1
NEGATIVE_RATIO = 3
NO_POSITIVE_NEGATIVES = 500


def ohem_mse(pred: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over images of (mean positive loss + mean hard-negative loss) for one channel.

    ``pred``, ``label`` and ``mask`` are ``(N, H, W)``.  Pixels with ``mask == 0`` are
    don't-care and join neither set.  Positives are ``label > 0.1``; the hard negatives are
    the ``min(3 * #pos, #neg)`` largest negative losses, or the top 500 when there are no
    positives.
    """
    n = pred.shape[0]
    if n == 0:
        # Still part of the graph so that callers can backward() through an empty batch.
        return pred.sum() * 0.0
    loss = (mask * (pred - label) ** 2).reshape(n, -1)
    valid = (mask > 0).reshape(n, -1)
    pos = valid & (label > POSITIVE_THRESHOLD).reshape(n, -1)
    neg = valid & ~pos
    n_pos = pos.sum(dim=1)
    n_neg = neg.sum(dim=1)
    pos_term = (loss * pos).sum(dim=1) / n_pos.clamp(min=1)
    k = torch.where(n_pos > 0, NEGATIVE_RATIO * n_pos, torch.full_like(n_pos, NO_POSITIVE_NEGATIVES))
    k = torch.minimum(k, n_neg)
    k_max = int(k.max())
    if k_max == 0:
        neg_term = torch.zeros_like(pos_term)
    else:
        # Non-negatives are zeroed rather than removed: since losses are >= 0 and k <= #neg,
        # the top-k sum is unchanged, and one batched topk replaces a per-image loop.
        top = torch.topk(torch.where(neg, loss, torch.zeros_like(loss)), k_max, dim=1).values
        keep = torch.arange(k_max, device=loss.device)[None, :] < k[:, None]
        neg_term = (top * keep).sum(dim=1) / k.clamp(min=1)
    return (pos_term + neg_term).mean()


def craft_loss(pred: torch.Tensor, region: torch.Tensor, affinity: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(total, cls_loss, geo_loss)`` for ``pred`` of shape ``(N, H, W, 2)``.

    Channel 0 is the region score (``cls_loss``), channel 1 the affinity (``geo_loss``);
    ``region``, ``affinity`` and the confidence ``mask`` are ``(N, H, W)``.
    """
    if pred.dim() != 4 or pred.shape[-1] != 2:
        raise ValueError(f"pred must be (N, H, W, 2), got {tuple(pred.shape)}")
    for name, t in (("region", region), ("affinity", affinity), ("mask", mask)):
        if t.shape != pred.shape[:3]:
            raise ValueError(f"{name} must be {tuple(pred.shape[:3])}, got {tuple(t.shape)}")
    # Under autocast pred may be half precision; squared errors and their sums need float32.
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, mask = pred.to(dtype), mask.to(dtype)
    cls_loss = ohem_mse(pred[..., 0], region.to(dtype), mask)
    geo_loss = ohem_mse(pred[..., 1], affinity.to(dtype), mask)
    return cls_loss + geo_loss, cls_loss, geo_loss
