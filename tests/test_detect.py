"""``python -m craft_train.detect``: weights from every source, ICDAR result files, drawn images, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import jpeg_with_exif_orientation

import ckptio
from craft_train.data import IcdarDataset
from craft_train.detect import format_result_lines, load_detector, main, write_result_file
from craft_train.model import CRAFT

SIDE = 64


def _everything_is_text() -> dict[str, torch.Tensor]:
    """A CRAFT whose region score is 1 everywhere: one box over the whole image, whatever the input."""
    torch.manual_seed(0)
    model = CRAFT()
    last = model.conv_cls[-1]
    assert isinstance(last, torch.nn.Conv2d)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([1.0, 0.0]))
    return model.state_dict()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return _everything_is_text()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, weights: dict[str, torch.Tensor]) -> Path:
    """What the trainer writes: ckptio, the weights under model_state_dict, the config beside them."""
    directory = tmp_path_factory.mktemp("ck")
    state = {"model_state_dict": weights, "config": {"image_size": SIDE}, "kind": "craft_train", "global_step": 3}
    with ckptio.CheckpointManager(directory) as manager:
        manager.save(state, name="best_model")
        return manager.path_for("best_model")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        image = np.full((SIDE, SIDE, 3), 90, dtype=np.uint8)
        cv2.putText(image, "Hi", (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        cv2.imwrite(str(folder / name), image)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _gt(folder: Path, *stems: str, text: str = "0,0,63,0,63,63,0,63,WORD\n") -> Path:
    folder.mkdir(exist_ok=True)
    for stem in stems:
        (folder / f"gt_{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def test_detection_writes_an_icdar_result_file_and_a_drawn_image_per_image(
        checkpoint: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_det.jpg", "b_det.jpg", "res_a.txt", "res_b.txt"]
    lines = (out / "res_a.txt").read_text().splitlines()
    assert len(lines) == 1
    corners = np.array([int(v) for v in lines[0].split(",")]).reshape(4, 2)
    # The whole 32x32 score map is text: pixel centres 0..31, doubled, at the checkpoint's image size of 64.
    assert corners.tolist() == [[0, 0], [62, 0], [62, 62], [0, 62]]
    drawn = cv2.imread(str(out / "a_det.jpg"))
    assert drawn.shape == (SIDE, SIDE, 3)
    assert drawn[0, 30, 2] > 200 and drawn[0, 30, 0] < 80  # the red box edge along the top
    assert "2 images, 2 words detected at image size 64" in capsys.readouterr().out


def test_eval_gt_prints_precision_recall_and_hmean(checkpoint: Path, images: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    gt = _gt(tmp_path / "gt", "a")
    (gt / "gt_b.txt").write_text("0,0,63,0,63,63,0,63,###\n", encoding="utf-8")  # b's box is ignored
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--eval-gt", str(gt)])
    assert rc == 0
    assert "precision=1.000 recall=1.000 hmean=1.000 (matched 1 of 1 gt, 1 det)" in capsys.readouterr().out
    assert '"hmean": 1.0' in (out / "eval.json").read_text()


def test_a_rotated_jpeg_is_trained_on_and_scored_on_the_same_pixel_grid(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A camera photo 96 px wide, 48 px high as stored, whose EXIF tag says "rotate 90 degrees clockwise".
    stored = np.full((48, 96, 3), 90, dtype=np.uint8)
    stored[:, :48] = 200
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "r.jpg").write_bytes(jpeg_with_exif_orientation(stored, orientation=6))
    gt = _gt(tmp_path / "gt", "r", text="0,0,95,0,95,47,0,47,WORD\n")  # drawn on the stored grid
    trained_on, _ = IcdarDataset(tmp_path, image_size=64, augment=False).load(0)
    assert trained_on.shape == (48, 96, 3)
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(checkpoint), "--images", str(tmp_path / "images"), "--out", str(out),
               "--eval-gt", str(gt)])
    assert rc == 0
    # The whole-image box of the detector matches the word only on the grid the ground truth was drawn on.
    assert "(matched 1 of 1 gt, 1 det)" in capsys.readouterr().out
    drawn = cv2.imread(str(out / "r_det.jpg"), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert drawn.shape == trained_on.shape
    inside = (slice(8, 40), slice(8, 88))
    difference = np.abs(cv2.cvtColor(drawn, cv2.COLOR_BGR2RGB)[inside].astype(int) - trained_on[inside].astype(int))
    assert np.median(difference) <= 4  # the same pixels, up to JPEG re-encoding


def test_thresholds_and_image_size_flags_reach_the_detector(checkpoint: Path, images: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--image-size", "128",
               "--text-threshold", "1.5"])  # above the constant score of 1: nothing is a word
    assert rc == 0
    assert (out / "res_a.txt").read_text() == ""
    assert "0 words detected at image size 128" in capsys.readouterr().out


def test_bare_and_module_prefixed_state_dicts_load_like_the_official_weights(
        weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    bare, prefixed = tmp_path / "bare.pth", tmp_path / "craft_mlt_25k.pth"
    torch.save(weights, bare)
    torch.save({f"module.{k}": v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, prefixed)
    for path in (bare, prefixed):
        model, config = load_detector(path)
        assert config == {} and not model.training
        assert torch.equal(model.conv_cls[-1].bias, torch.tensor([1.0, 0.0]))


def test_without_image_size_each_image_runs_at_its_own_size_bounded_by_the_canvas(
        checkpoint: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from craft_train.detect import network_size

    # the checkpoint was trained at 64 px: a 100 x 200 photo must not be shrunk to that
    cv2.imwrite(str(images / "c.jpg"), np.full((100, 200, 3), 90, dtype=np.uint8))
    assert main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "out")]) == 0
    assert "3 images, 3 words detected at each image's own size (64 to 224 px)" in capsys.readouterr().out
    photo = np.zeros((480, 640, 3), dtype=np.uint8)
    assert network_size(photo) == 640
    assert network_size(photo, mag_ratio=1.5) == 960
    assert network_size(np.zeros((2000, 3000, 3), dtype=np.uint8)) == 1280
    assert network_size(photo, canvas_size=512) == 512


def test_the_official_weights_in_the_legacy_format_load_in_detect(
        weights: dict[str, torch.Tensor], images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    legacy = tmp_path / "craft_mlt_25k.pth"
    torch.save({f"module.{k}": v for k, v in weights.items()}, legacy, _use_new_zipfile_serialization=False)
    rc = main(["--checkpoint", str(legacy), "--images", str(images), "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "module.-prefixed keys" in capsys.readouterr().out


def test_a_trainer_checkpoint_brings_its_training_config(checkpoint: Path) -> None:
    _, config = load_detector(checkpoint)
    assert config == {"image_size": SIDE}


@pytest.mark.parametrize("problem", ["checkpoint", "images", "empty_images", "gt_dir", "gt_file", "image_size",
                                     "not_weights", "wrong_weights", "bad_gt"])
def test_usage_errors_exit_2_with_a_message_before_writing_anything(
        problem: str, checkpoint: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = {"--checkpoint": str(checkpoint), "--images": str(images), "--out": str(out)}
    if problem == "checkpoint":
        args["--checkpoint"] = str(tmp_path / "missing.pth")
    elif problem == "images":
        args["--images"] = str(tmp_path / "nowhere")
    elif problem == "empty_images":
        (tmp_path / "empty").mkdir()
        args["--images"] = str(tmp_path / "empty")
    elif problem == "gt_dir":
        args["--eval-gt"] = str(tmp_path / "no_gt")
    elif problem == "gt_file":
        args["--eval-gt"] = str(_gt(tmp_path / "gt", "a"))  # gt_b.txt is missing
    elif problem == "bad_gt":
        args["--eval-gt"] = str(_gt(tmp_path / "gt", "a", "b", text="1,2,3\n"))
    elif problem == "image_size":
        args["--image-size"] = "100"
    elif problem == "not_weights":
        (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
        args["--checkpoint"] = str(tmp_path / "junk.pth")
    elif problem == "wrong_weights":
        torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
        args["--checkpoint"] = str(tmp_path / "other.pth")
    rc = main([item for pair in args.items() for item in pair])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("craft_train.detect: error: ") and "Traceback" not in err
    assert not out.exists()


def test_an_undecodable_image_is_reported_and_the_others_are_done(checkpoint: Path, images: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (images / "c.jpg").write_bytes(b"broken")
    out = tmp_path / "out"
    gt = _gt(tmp_path / "gt", "a", "b", "c")
    rc = main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--eval-gt", str(gt)])
    assert rc == 1
    captured = capsys.readouterr()
    assert "cannot decode" in captured.err
    assert "(matched 2 of 3 gt, 2 det)" in captured.out  # the unreadable image's word counts as missed
    assert sorted(p.name for p in out.glob("res_*.txt")) == ["res_a.txt", "res_b.txt"]


def test_result_lines_are_rounded_integer_corners() -> None:
    boxes = np.array([[[0.4, 0.6], [10.5, 0.49], [10.51, 20.0], [-0.6, 20.2]]], dtype=np.float32)
    assert format_result_lines(boxes) == ["0,1,10,0,11,20,-1,20"]  # numpy rounds halves to even
    assert format_result_lines(np.zeros((0, 4, 2))) == []


def test_result_file_has_one_line_per_box_and_is_empty_without_boxes(tmp_path: Path) -> None:
    boxes = np.array([[[0, 0], [4, 0], [4, 2], [0, 2]], [[5, 5], [9, 5], [9, 7], [5, 7]]], dtype=np.float32)
    write_result_file(tmp_path / "res_x.txt", boxes)
    assert (tmp_path / "res_x.txt").read_text() == "0,0,4,0,4,2,0,2\n5,5,9,5,9,7,5,7\n"
    write_result_file(tmp_path / "res_y.txt", np.zeros((0, 4, 2)))
    assert (tmp_path / "res_y.txt").read_text() == ""


def test_module_runs_as_a_script() -> None:
    done = subprocess.run([sys.executable, "-m", "craft_train.detect", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--eval-gt" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "craft_train.detect", "--checkpoint", "x", "--images", "y",
                              "--out", "z"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--images y: no such directory" in missing.stderr
