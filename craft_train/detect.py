"""``python -m craft_train.detect``: run a trained CRAFT over a folder of images.

Writes ``res_<stem>.txt`` (ICDAR2015 result format: ``x1,y1,x2,y2,x3,y3,x4,y4`` integers, one word a line)
and ``<stem>_det.jpg`` (the image with its boxes drawn) for every image; with ``--eval-gt DIR`` also scores
the boxes against ``DIR/gt_<stem>.txt`` and prints precision, recall and H-mean.

Weights come from any checkpoint (its ``model_state_dict``), a bare state dict, or the official
``craft_mlt_25k.pth`` (``module.``-prefixed keys, PyTorch's legacy format): read as ``--pretrained`` reads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .evaluate import DetectionCounts, detect_words, format_scores, match_image, parse_gt_quads
from .imaging import IMAGE_SUFFIXES, STRIDE, check_image_size, read_rgb, round_up_to_stride
from .model import CRAFT, load_pretrained
from .postprocess import DEFAULT_THRESHOLDS, Thresholds
from .weights import Weights

__all__ = ["CANVAS_SIZE", "format_result_lines", "load_detector", "main", "network_size", "write_result_file"]

CANVAS_SIZE = 1280
"""The largest side an image is given to the network at by default (the official demo's ``canvas_size``)."""
_BOX_COLOUR = (0, 0, 255)  # BGR red, as the official demo draws
GroundTruth = tuple[list[np.ndarray], list[np.ndarray]]


class DetectError(Exception):
    """A problem the user can fix (a wrong path, an unusable weights file): exit 2 with the message."""


# ---- weights ----------------------------------------------------------------------------------------------------

def load_detector(path: str | Path, device: torch.device | str = "cpu") -> tuple[CRAFT, dict[str, Any]]:
    """A CRAFT in eval mode with the weights of ``path``, and the training config stored with them (or ``{}``).

    The weights are read by :func:`craft_train.weights.read_weights`, as ``--pretrained`` reads them: any
    checkpoint's ``model_state_dict``, a bare or ``module.``-prefixed state dict, the official release in
    PyTorch's legacy format. Raises :class:`DetectError` for a missing, damaged or unfitting file.
    """
    model, weights = _load(Path(path), device)
    return model, weights.config


def _load(path: Path, device: torch.device | str) -> tuple[CRAFT, Weights]:
    if not path.is_file():
        raise DetectError(f"--checkpoint {path}: no such file")
    model = CRAFT()
    try:
        weights = load_pretrained(model, path)
    except ValueError as exc:
        raise DetectError(f"--checkpoint {path}: not usable CRAFT weights: {exc}") from exc
    return model.to(device).eval(), weights


# ---- result files -----------------------------------------------------------------------------------------------

def format_result_lines(boxes: np.ndarray) -> list[str]:
    """ICDAR2015 result lines ``x1,y1,...,x4,y4`` with coordinates rounded to integers."""
    rounded = np.rint(np.asarray(boxes, dtype=np.float64).reshape(-1, 8)).astype(np.int64)
    return [",".join(str(int(v)) for v in row) for row in rounded]


def write_result_file(path: str | Path, boxes: np.ndarray) -> None:
    lines = format_result_lines(boxes)
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _draw(image_rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    polygons = [np.rint(b).astype(np.int32).reshape(-1, 1, 2) for b in boxes]
    cv2.polylines(canvas, polygons, isClosed=True, color=_BOX_COLOUR, thickness=2)
    return canvas


# ---- the command ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m craft_train.detect", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint, bare state dict or craft_mlt_25k.pth")
    p.add_argument("--images", required=True, help="folder of .jpg/.jpeg/.png images")
    p.add_argument("--out", required=True, help="folder for res_<stem>.txt and <stem>_det.jpg (created)")
    p.add_argument("--eval-gt", help="folder of gt_<stem>.txt files: print precision, recall and H-mean")
    p.add_argument("--text-threshold", type=float, default=DEFAULT_THRESHOLDS.text_threshold)
    p.add_argument("--link-threshold", type=float, default=DEFAULT_THRESHOLDS.link_threshold)
    p.add_argument("--low-text", type=float, default=DEFAULT_THRESHOLDS.low_text)
    p.add_argument("--image-size", type=int,
                   help="longer image side for the network, a multiple of 32, for every image (default: each "
                        "image's own longer side times --mag-ratio, rounded up to a multiple of 32, at most "
                        "--canvas-size)")
    p.add_argument("--canvas-size", type=int, default=CANVAS_SIZE,
                   help="the largest side an image is run at without --image-size, a multiple of 32 (default: "
                        "%(default)s, as the official demo)")
    p.add_argument("--mag-ratio", type=float, default=1.0,
                   help="magnify images by this before detection, up to --canvas-size (default: %(default)s; the "
                        "official demo uses 1.5, which finds smaller words at more than twice the cost)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def network_size(image: np.ndarray, *, mag_ratio: float = 1.0, canvas_size: int = CANVAS_SIZE) -> int:
    """The side at which ``image`` goes through the network by default: its longer side times ``mag_ratio``,
    rounded up to a multiple of 32, at most ``canvas_size`` (the official demo's rule).

    Not the training crop size: a model trained on 512 px crops of words finds the words of a 640 px photo at
    640 px, while shrinking the photo to 512 px makes small words too small to find.
    """
    longer = max(image.shape[:2]) * mag_ratio
    return max(STRIDE, min(canvas_size, round_up_to_stride(longer)))


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DetectError(f"--images {folder}: no such directory")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DetectError(f"--images {folder}: no .jpg/.jpeg/.png images in it")
    return images


def _read_ground_truth(folder: Path, images: Sequence[Path]) -> dict[str, GroundTruth]:
    """Every image's ground truth, read before any work so that a bad file stops the run at once."""
    if not folder.is_dir():
        raise DetectError(f"--eval-gt {folder}: no such directory")
    files = {img.stem: folder / f"gt_{img.stem}.txt" for img in images}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DetectError(f"--eval-gt {folder}: missing ground truth {shown}")
    truth = {}
    for stem, path in files.items():
        try:
            truth[stem] = parse_gt_quads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise DetectError(f"--eval-gt {path}: {exc}") from exc
    return truth


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DetectError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _read_rgb(path: Path) -> np.ndarray | None:
    try:
        return read_rgb(path)
    except (OSError, ValueError, cv2.error):
        return None


def _run(args: argparse.Namespace) -> int:
    thresholds = Thresholds(args.text_threshold, args.link_threshold, args.low_text)
    if args.image_size is not None:
        check_image_size(args.image_size, "--image-size")
    check_image_size(args.canvas_size, "--canvas-size")
    if not (0 < args.mag_ratio <= 8):
        raise DetectError(f"--mag-ratio must be above 0 and at most 8, got {args.mag_ratio}")
    images = _list_images(Path(args.images))
    truth = _read_ground_truth(Path(args.eval_gt), images) if args.eval_gt else None
    device = _device(args.device)
    model, weights = _load(Path(args.checkpoint), device)
    print(f"--checkpoint {args.checkpoint}: {weights.source}")
    sizes: set[int] = set()
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DetectError(f"--out {out}: cannot create it: {exc}") from exc
    counts, unreadable, total = DetectionCounts(), [], 0
    for path in images:
        image = _read_rgb(path)
        if image is None:
            unreadable.append(path.name)
            print(f"warning: cannot decode {path}, skipped", file=sys.stderr)
            boxes = np.zeros((0, 4, 2), dtype=np.float32)  # its words still count, as missed
        else:
            size = args.image_size or network_size(image, mag_ratio=args.mag_ratio, canvas_size=args.canvas_size)
            sizes.add(size)
            boxes = detect_words(model, image, size, device, thresholds)
            total += len(boxes)
            write_result_file(out / f"res_{path.stem}.txt", boxes)
            cv2.imwrite(str(out / f"{path.stem}_det.jpg"), _draw(image, boxes))
        if truth is not None:
            words, dont_care = truth[path.stem]
            counts.add(match_image(words, boxes, dont_care))
    shown = (f"image size {min(sizes)}" if len(sizes) == 1 else
             f"each image's own size ({min(sizes)} to {max(sizes)} px)" if sizes else "no image size")
    print(f"{len(images) - len(unreadable)} images, {total} words detected at {shown}; results in {out}")
    if truth is not None:
        scores = counts.as_dict()
        print(format_scores(scores))
        report = {**scores, "image_size": args.image_size or "each image's own", "image_sizes": sorted(sizes),
                  "canvas_size": args.canvas_size, "mag_ratio": args.mag_ratio,
                  "thresholds": dataclasses.asdict(thresholds)}
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if unreadable else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 some images could not be decoded (the rest are done), 2 a usage error."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (DetectError, ValueError) as exc:
        print(f"craft_train.detect: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
