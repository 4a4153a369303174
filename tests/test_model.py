"""Tests for the CRAFT network layout and its weight loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from craft_train.model import CRAFT, load_pretrained, load_pretrained_backbone, vgg16_bn_features

NBT = "num_batches_tracked"


def _model(seed: int = 0) -> CRAFT:
    torch.manual_seed(seed)
    return CRAFT().eval()


def _randomise_bn_stats(model: torch.nn.Module, seed: int) -> None:
    # Fresh BN layers have mean 0 / var 1, which would hide a running-stat mix-up.
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def test_forward_returns_half_resolution_scores_and_features() -> None:
    model = _model()
    with torch.no_grad():
        y, feature = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 32, 32, 2)
    assert feature.shape == (2, 32, 32, 32)
    assert torch.isfinite(y).all()


def test_non_square_input_keeps_aspect_at_half_resolution() -> None:
    with torch.no_grad():
        y, _ = _model()(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 32, 48, 2)


def test_state_dict_matches_the_official_release_layout() -> None:
    model = _model()
    state = model.state_dict()
    # 134 weights/biases/BN statistics + one num_batches_tracked per BN layer (12 + 8).
    assert len(state) == 154
    assert sum(1 for k in state if k.endswith(NBT)) == 20
    assert sum(p.numel() for p in model.parameters()) == 20_770_466
    expected_shapes = {
        "basenet.slice1.0.weight": (64, 3, 3, 3),
        "basenet.slice1.1.running_mean": (64,),
        "basenet.slice1.10.weight": (128, 128, 3, 3),
        "basenet.slice2.14.weight": (256, 128, 3, 3),
        "basenet.slice2.18.running_var": (256,),
        "basenet.slice3.20.weight": (256, 256, 3, 3),
        "basenet.slice3.24.weight": (512, 256, 3, 3),
        "basenet.slice4.37.weight": (512, 512, 3, 3),
        "basenet.slice4.38.bias": (512,),
        "basenet.slice5.1.weight": (1024, 512, 3, 3),
        "basenet.slice5.2.weight": (1024, 1024, 1, 1),
        "upconv1.conv.0.weight": (512, 1536, 1, 1),
        "upconv1.conv.1.running_mean": (512,),
        "upconv1.conv.3.weight": (256, 512, 3, 3),
        "upconv4.conv.0.weight": (64, 192, 1, 1),
        "upconv4.conv.4.weight": (32,),
        "conv_cls.0.weight": (32, 32, 3, 3),
        "conv_cls.8.weight": (2, 16, 1, 1),
        "conv_cls.8.bias": (2,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # Each slice keeps torchvision's feature indices for its conv (4-d weight) and BN children.
    convs: dict[str, set[int]] = {}
    norms: dict[str, set[int]] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "basenet" and parts[3] == "weight":
            (convs if value.dim() == 4 else norms).setdefault(parts[1], set()).add(int(parts[2]))
    assert convs == {
        "slice1": {0, 3, 7, 10}, "slice2": {14, 17}, "slice3": {20, 24, 27},
        "slice4": {30, 34, 37}, "slice5": {1, 2},
    }
    assert norms == {"slice1": {1, 4, 8, 11}, "slice2": {15, 18}, "slice3": {21, 25, 28},
                     "slice4": {31, 35, 38}}


def test_heads_start_with_official_initialisation() -> None:
    model = _model()
    assert torch.count_nonzero(model.conv_cls[0].bias) == 0
    assert torch.all(model.upconv2.conv[1].weight == 1)
    assert torch.count_nonzero(model.basenet.slice5[1].bias) == 0
    bound = (6.0 / (32 * 9 + 32 * 9)) ** 0.5  # xavier-uniform bound for a 32->32 3x3 conv
    assert model.conv_cls[0].weight.abs().max() <= bound


def test_freeze_fixes_only_the_first_slice() -> None:
    model = CRAFT(freeze=True)
    assert not any(p.requires_grad for p in model.basenet.slice1.parameters())
    assert all(p.requires_grad for p in model.basenet.slice2.parameters())


@pytest.mark.parametrize("with_nbt", [True, False])
def test_module_prefixed_weights_load_strictly_and_reproduce_outputs(tmp_path: Path, with_nbt: bool) -> None:
    source = _model(seed=1)
    _randomise_bn_stats(source, seed=2)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if with_nbt or not k.endswith(NBT)}
    path = tmp_path / "craft_mlt_25k.pth"
    # The 2019 release predates torch's zip format; weights_only loading must cope with both.
    torch.save(state, path, _use_new_zipfile_serialization=with_nbt)

    target = _model(seed=3)
    load_pretrained(target, path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(target(x)[0], source(x)[0])
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_unprefixed_weights_load_too(tmp_path: Path) -> None:
    source = _model(seed=5)
    path = tmp_path / "plain.pth"
    torch.save(source.state_dict(), path)
    target = _model(seed=6)
    load_pretrained(target, path)
    assert torch.equal(target.conv_cls[8].weight, source.conv_cls[8].weight)


def test_loading_garbage_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "not_weights.pth"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match=r"not_weights\.pth"):
        load_pretrained(_model(), path)
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(_model(), tmp_path / "missing.pth")


def test_missing_unexpected_and_misshapen_keys_are_reported(tmp_path: Path) -> None:
    model = _model()
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    del state["module.upconv3.conv.0.weight"]
    state["module.extra.weight"] = torch.zeros(1)
    state["module.conv_cls.8.weight"] = torch.zeros(3, 16, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"broken\.pth") as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert "missing keys: upconv3.conv.0.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "conv_cls.8.weight: file (3, 16, 1, 1) vs model (2, 16, 1, 1)" in message


def test_a_file_without_weights_or_model_state_dict_is_refused_naming_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(ValueError, match=r"neither a state dict of tensors nor a checkpoint .*model, step"):
        load_pretrained(_model(), path)


def test_pretrained_takes_the_guide_scripts_checkpoint_and_says_what_it_found(tmp_path: Path) -> None:
    source = _model(seed=7)
    path = tmp_path / "checkpoint_epoch_1_batch_100.pth"
    torch.save({"epoch": 1, "batch": 100, "total_batches": 1250, "model_state_dict": source.state_dict(),
                "optimizer_state_dict": {"state": {}, "param_groups": []}, "train_loss": 0.4}, path)
    target = _model(seed=8)
    found = load_pretrained(target, path)
    assert torch.equal(target.conv_cls[8].weight, source.conv_cls[8].weight)
    assert "a training checkpoint's model_state_dict (epoch 1, batch 100)" in found.source


def test_pretrained_takes_a_ckptio_checkpoint_and_checks_its_digest(tmp_path: Path) -> None:
    import ckptio

    source = _model(seed=9)
    with ckptio.CheckpointManager(tmp_path) as manager:
        manager.save({"model_state_dict": source.state_dict(), "kind": "craft_train", "epoch": 2, "batch": 4,
                      "config": {"image_size": 64}}, name="checkpoint_epoch_2_batch_4").result()
    target = _model(seed=10)
    found = load_pretrained(target, tmp_path / "checkpoint_epoch_2_batch_4.pth")
    assert torch.equal(target.conv_cls[8].weight, source.conv_cls[8].weight)
    assert found.source.startswith("a craft_train checkpoint's model_state_dict (epoch 2, batch 4)")
    assert "digest checked" in found.source and found.config == {"image_size": 64}


def test_pretrained_names_the_official_releases_legacy_prefixed_format(tmp_path: Path) -> None:
    path = tmp_path / "craft_mlt_25k.pth"
    torch.save({f"module.{k}": v for k, v in _model(seed=11).state_dict().items()}, path,
               _use_new_zipfile_serialization=False)
    found = load_pretrained(_model(), path)
    assert "module.-prefixed" in found.source and "legacy format" in found.source


def _torchvision_style_vgg(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    features = vgg16_bn_features()
    _randomise_bn_stats(features, seed)
    state = {f"features.{k}": v for k, v in features.state_dict().items() if not k.endswith(NBT)}
    state["classifier.0.weight"] = torch.zeros(4, 7)
    state["classifier.0.bias"] = torch.zeros(4)
    return state


def test_backbone_weights_map_torchvision_features_into_slices(tmp_path: Path) -> None:
    vgg = _torchvision_style_vgg(seed=7)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(vgg, path)
    model = _model(seed=8)
    slice5_before = model.basenet.slice5[1].weight.clone()
    head_before = model.upconv1.conv[0].weight.clone()

    load_pretrained_backbone(model, path)

    base = model.basenet.state_dict()
    assert torch.equal(base["slice1.0.weight"], vgg["features.0.weight"])
    assert torch.equal(base["slice2.14.weight"], vgg["features.14.weight"])
    assert torch.equal(base["slice3.28.running_var"], vgg["features.28.running_var"])
    assert torch.equal(base["slice4.38.running_mean"], vgg["features.38.running_mean"])
    assert torch.equal(model.basenet.slice5[1].weight, slice5_before)
    assert torch.equal(model.upconv1.conv[0].weight, head_before)


def test_backbone_loader_rejects_plain_vgg16_weights(tmp_path: Path) -> None:
    # Without BN every index after the first conv shifts, so the BN keys are missing.
    plain = {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64),
             "features.2.weight": torch.zeros(64, 64, 3, 3), "features.2.bias": torch.zeros(64)}
    path = tmp_path / "vgg16.pth"
    torch.save(plain, path)
    with pytest.raises(ValueError, match=r"vgg16\.pth.*missing keys: features\.1\.bias"):
        load_pretrained_backbone(_model(), path)
    torch.save({"backbone.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision vgg16_bn state dict"):
        load_pretrained_backbone(_model(), path)
