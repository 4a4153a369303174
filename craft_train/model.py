"""CRAFT text detector, layer for layer as the official clovaai/CRAFT-pytorch release.

The module tree (and therefore every state-dict key) matches the official ``craft.py`` and
``basenet/vgg16_bn.py`` so that ``craft_mlt_25k.pth`` loads strictly.  The VGG16-BN backbone
is built here instead of through torchvision, keeping torchvision's ``features`` indices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .weights import Weights, read_weights

__all__ = [
    "CRAFT",
    "VGG16BN",
    "DoubleConv",
    "VggOutputs",
    "init_weights",
    "load_pretrained",
    "load_pretrained_backbone",
    "vgg16_bn_features",
]

# torchvision's configuration "D" (VGG16); "M" is a 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)
# (start, stop) of torchvision feature indices that form slice1..slice4 in the official code.
_SLICES: tuple[tuple[int, int], ...] = ((0, 12), (12, 19), (19, 29), (29, 39))
_NBT_SUFFIX = ".num_batches_tracked"
_MAX_LISTED = 8


def vgg16_bn_features() -> nn.Sequential:
    """Return a freshly initialised ``nn.Sequential`` numbered exactly like torchvision's
    ``vgg16_bn().features`` (44 modules, ``ReLU(inplace=True)`` as torchvision uses)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_ch = int(item)
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch),
                       nn.ReLU(inplace=True)]
            in_ch = out_ch
    return nn.Sequential(*layers)


def init_weights(modules: Iterable[nn.Module]) -> None:
    """Official CRAFT initialisation: Xavier-uniform convs with zero bias, BN to identity."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class VggOutputs(NamedTuple):
    """Backbone feature maps, deepest first, as the official namedtuple."""

    fc7: torch.Tensor
    relu5_3: torch.Tensor
    relu4_3: torch.Tensor
    relu3_2: torch.Tensor
    relu2_2: torch.Tensor


class VGG16BN(nn.Module):
    """VGG16-BN trunk split into five slices (strides 2, 4, 8, 16, 16)."""

    def __init__(self, pretrained: bool = False, freeze: bool = False) -> None:
        """``pretrained`` only skips re-initialising slice1-4 (weights come later from
        :func:`load_pretrained_backbone`); ``freeze`` fixes slice1 as the official code does."""
        super().__init__()
        features = vgg16_bn_features()
        self.slice1 = nn.Sequential()
        self.slice2 = nn.Sequential()
        self.slice3 = nn.Sequential()
        self.slice4 = nn.Sequential()
        slices = (self.slice1, self.slice2, self.slice3, self.slice4)
        for seq, (start, stop) in zip(slices, _SLICES, strict=True):
            for i in range(start, stop):
                # Keeping torchvision's index as the child name is what makes the keys match.
                seq.add_module(str(i), features[i])
        # fc6/fc7 as convolutions; never pretrained, so always initialised.
        self.slice5 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
            nn.Conv2d(1024, 1024, kernel_size=1),
        )
        if not pretrained:
            for seq in (self.slice1, self.slice2, self.slice3, self.slice4):
                init_weights(seq.modules())
        init_weights(self.slice5.modules())
        if freeze:
            for p in self.slice1.parameters():
                p.requires_grad = False

    def forward(self, x: torch.Tensor) -> VggOutputs:
        # Each slice after the first starts with an in-place ReLU, so the stored outputs of
        # the previous slice end up rectified - the official model behaves the same way.
        h2 = self.slice1(x)
        h3 = self.slice2(h2)
        h4 = self.slice3(h3)
        h5 = self.slice4(h4)
        fc7 = self.slice5(h5)
        return VggOutputs(fc7, h5, h4, h3, h2)


class DoubleConv(nn.Module):
    """1x1 fuse of (upsampled + skip) channels followed by a 3x3 conv, both with BN+ReLU."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch + mid_ch, mid_ch, kernel_size=1),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CRAFT(nn.Module):
    """Character Region Awareness For Text detection.

    ``forward`` returns ``(y, feature)`` with ``y`` of shape ``(N, H/2, W/2, 2)`` (channel 0:
    region score, 1: affinity score) and ``feature`` of shape ``(N, 32, H/2, W/2)``.
    """

    def __init__(self, pretrained: bool = False, freeze: bool = False) -> None:
        super().__init__()
        self.basenet = VGG16BN(pretrained, freeze)
        self.upconv1 = DoubleConv(1024, 512, 256)
        self.upconv2 = DoubleConv(512, 256, 128)
        self.upconv3 = DoubleConv(256, 128, 64)
        self.upconv4 = DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 2, kernel_size=1),
        )
        for head in (self.upconv1, self.upconv2, self.upconv3, self.upconv4, self.conv_cls):
            init_weights(head.modules())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sources = self.basenet(x)
        y = torch.cat([sources[0], sources[1]], dim=1)
        y = self.upconv1(y)

        y = F.interpolate(y, size=sources[2].size()[2:], mode="bilinear", align_corners=False)
        y = torch.cat([y, sources[2]], dim=1)
        y = self.upconv2(y)

        y = F.interpolate(y, size=sources[3].size()[2:], mode="bilinear", align_corners=False)
        y = torch.cat([y, sources[3]], dim=1)
        y = self.upconv3(y)

        y = F.interpolate(y, size=sources[4].size()[2:], mode="bilinear", align_corners=False)
        y = torch.cat([y, sources[4]], dim=1)
        feature = self.upconv4(y)

        y = self.conv_cls(feature)
        return y.permute(0, 2, 3, 1), feature


def _list(names: Iterable[str]) -> str:
    items = sorted(names)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in total)" if len(items) > _MAX_LISTED else "")


def _check_and_fill(
    target: Mapping[str, torch.Tensor], given: dict[str, torch.Tensor], path: str | Path
) -> dict[str, torch.Tensor]:
    """Compare ``given`` against ``target`` keys/shapes; old (torch<0.4.1) files lack
    ``num_batches_tracked`` so those alone are filled in from ``target``."""
    missing = set(target) - set(given)
    tolerated = {k for k in missing if k.endswith(_NBT_SUFFIX)}
    missing -= tolerated
    unexpected = set(given) - set(target)
    mismatched = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(given) & set(target))
        if given[k].shape != target[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_list(mismatched)}")
    if problems:
        raise ValueError(f"weights file {str(path)!r} does not match the model; " + "; ".join(problems))
    filled = dict(given)
    for k in tolerated:
        filled[k] = target[k].clone()
    return filled


def load_pretrained(model: nn.Module, path: str | Path) -> Weights:
    """Load full CRAFT weights strictly into ``model`` and say what the file was.

    Takes any file :func:`craft_train.weights.read_weights` reads: a checkpoint (its ``model_state_dict``), a
    bare state dict, or the official ``craft_mlt_25k.pth`` (``module.`` prefix, legacy format). Only absent
    ``num_batches_tracked`` buffers are tolerated. Raises ``ValueError`` naming the file and the mismatch otherwise.
    """
    weights = read_weights(path)
    state = _check_and_fill(model.state_dict(), weights.state_dict, path)
    model.load_state_dict(state, strict=True)
    return weights


def load_pretrained_backbone(model: CRAFT, path: str | Path) -> None:
    """Load a torchvision-style ``vgg16_bn`` state dict into ``model.basenet.slice1..4``.

    ``features.{i}.*`` for ``i < 39`` map to ``basenet.slice{k}.{i}.*``; the remaining
    features (conv5_3 onwards, unused by CRAFT) and ``classifier.*`` are ignored.
    """
    given = read_weights(path).state_dict
    slice_of = {i: n + 1 for n, (start, stop) in enumerate(_SLICES) for i in range(start, stop)}
    used: dict[str, torch.Tensor] = {}
    foreign = []
    for key, value in given.items():
        head, _, rest = key.partition(".")
        if head == "classifier":
            continue
        index, _, param = rest.partition(".")
        if head != "features" or not index.isdigit() or not param:
            foreign.append(key)
        elif int(index) in slice_of:
            used[key] = value
    if foreign:
        raise ValueError(
            f"weights file {str(path)!r} is not a torchvision vgg16_bn state dict "
            f"(unexpected keys: {_list(foreign)})"
        )
    # Compare in torchvision naming so that error messages speak the file's language.
    to_model: dict[str, str] = {}
    for key in model.basenet.state_dict():
        name, index, param = key.split(".", 2)
        if name != "slice5":
            to_model[f"features.{index}.{param}"] = key
    current = model.basenet.state_dict()
    target = {feat: current[key] for feat, key in to_model.items()}
    state = _check_and_fill(target, used, path)
    model.basenet.load_state_dict({to_model[k]: v for k, v in state.items()}, strict=False)
