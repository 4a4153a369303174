"""Does CRAFT learn? Validation H-mean (and loss) against optimizer steps for a from-scratch synthetic run.

The training step is the trainer's (``craft_train.train``): synthetic data in the trainer's epoch order and
augmentation seeds, CRAFT, ``craft_loss``, Adam and StepLR. Every ``--eval-every`` steps the model is scored on
held-out images with :func:`craft_train.evaluate.evaluate_model` at the official thresholds (0.7/0.4/0.4) and
at a lenient setting (0.5/0.3/0.3), which shows progress before the region peaks reach 0.7, and the
validation loss is measured on the trainer's un-augmented validation samples.

Run ``python benchmarks/learning_curve.py [--quick] [--out DIR]``; writes ``DIR/learning_curve.json``,
``DIR/learning_curve.md`` and, with matplotlib installed, ``DIR/learning_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft_train.config import TrainConfig
from craft_train.data import SyntheticTextDataset, collate, make_sample, split_indices
from craft_train.evaluate import DetectionCounts, evaluate_model, match_image, word_quads
from craft_train.loss import craft_loss
from craft_train.model import CRAFT
from craft_train.postprocess import DEFAULT_THRESHOLDS, Thresholds, detect_boxes, to_image_coordinates
from craft_train.resume import augmentation_seed, epoch_permutation

__all__ = ["LENIENT_THRESHOLDS", "Settings", "main", "markdown_report", "run"]

_DEFAULTS = TrainConfig()
WEIGHT_DECAY, LR_DECAY_STEPS, LR_GAMMA = _DEFAULTS.weight_decay, _DEFAULTS.lr_decay_steps, _DEFAULTS.lr_gamma
LENIENT_THRESHOLDS = Thresholds(text_threshold=0.5, link_threshold=0.3, low_text=0.3)


@dataclass(frozen=True)
class Settings:
    steps: int = 300
    eval_every: int = 25
    image_size: int = 128
    batch_size: int = 4
    lr: float = 1e-3
    val_images: int = 32
    synthetic_size: int = 1000
    augment: bool = False
    seed: int = 0


QUICK = Settings(steps=40, eval_every=20, val_images=8, synthetic_size=200)


def _validation_loss(model: torch.nn.Module, data: SyntheticTextDataset, indices: Sequence[int]) -> float:
    """Mean craft_loss on the trainer's validation samples (whole image in the S x S canvas)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(indices), 8):
            batch = collate([data[(i, 0)] for i in indices[start:start + 8]])
            prediction, _ = model(batch["image"])
            loss, _, _ = craft_loss(prediction, batch["region"], batch["affinity"], batch["mask"])
            total += loss.item() * int(batch["size"])
    return total / max(len(indices), 1)


def ceiling_hmean(data: SyntheticTextDataset, indices: Sequence[int], thresholds: Thresholds) -> float:
    """H-mean of the ground-truth score maps themselves through the post-processing: what a perfect model gets.

    Below 1 because the thresholded Gaussians and the dilation do not reproduce every word box (small or
    tightly spaced words merge or split); a trained model is measured against this, not against 1.
    """
    counts = DetectionCounts()
    for index in indices:
        image, annotation = data.render(index)
        sample = make_sample(image, annotation, data.image_size)  # the validation canvas: long side = S
        h, w = image.shape[:2]
        scale = data.image_size / max(h, w)
        ratio_w, ratio_h = w / max(1, round(w * scale)), h / max(1, round(h * scale))
        boxes = detect_boxes(sample["region"].numpy(), sample["affinity"].numpy(), thresholds)
        counts.add(match_image(word_quads(annotation), to_image_coordinates(boxes, ratio_w, ratio_h)))
    return counts.hmean


def _evaluate(model: torch.nn.Module, data: SyntheticTextDataset, indices: Sequence[int], step: int,
              train_loss: float | None, seconds: float) -> dict[str, Any]:
    official = evaluate_model(model, data, indices, "cpu", thresholds=DEFAULT_THRESHOLDS)
    lenient = evaluate_model(model, data, indices, "cpu", thresholds=LENIENT_THRESHOLDS)
    return {
        "step": step, "train_seconds": round(seconds, 2), "train_loss": train_loss,
        "val_loss": _validation_loss(model, data, indices),
        "hmean": official["hmean"], "precision": official["precision"], "recall": official["recall"],
        "num_det": official["num_det"], "num_gt": official["num_gt"],
        "hmean_lenient": lenient["hmean"], "precision_lenient": lenient["precision"],
        "recall_lenient": lenient["recall"],
    }


def _batches(settings: Settings, train_indices: list[int]) -> Iterator[list[tuple[int, int]]]:
    """(epoch, [(index, aug_seed), ...]) in the trainer's order, epoch after epoch."""
    epoch = 1
    while True:
        order = epoch_permutation(settings.seed, epoch, train_indices).tolist()
        for start in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
            yield [(int(i), augmentation_seed(settings.seed, epoch, int(i)))
                   for i in order[start:start + settings.batch_size]]
        epoch += 1


def run(settings: Settings, say: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Train from scratch; return one row per evaluation (step 0 is the untrained model) and the ceiling."""
    torch.manual_seed(settings.seed)
    train_set = SyntheticTextDataset(settings.synthetic_size, settings.image_size, settings.seed, settings.augment)
    val_set = SyntheticTextDataset(settings.synthetic_size, settings.image_size, settings.seed, augment=False)
    train_indices, val_indices = split_indices(settings.synthetic_size, settings.val_images / settings.synthetic_size,
                                               settings.seed)
    ceiling = {"hmean": ceiling_hmean(val_set, val_indices, DEFAULT_THRESHOLDS),
               "hmean_lenient": ceiling_hmean(val_set, val_indices, LENIENT_THRESHOLDS)}
    say(f"ceiling (ground-truth maps): hmean {ceiling['hmean']:.3f}  hmean@lenient {ceiling['hmean_lenient']:.3f}")
    model = CRAFT()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=WEIGHT_DECAY)
    # The trainer's defaults; a run this short never reaches the first decay, kept so the step is the same.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=LR_DECAY_STEPS, gamma=LR_GAMMA)
    rows = [_evaluate(model, val_set, val_indices, 0, None, 0.0)]
    say(_line(rows[-1]))
    losses: list[float] = []
    seconds = 0.0
    for step, keys in enumerate(_batches(settings, train_indices), start=1):
        started = time.perf_counter()
        model.train()
        batch = collate([train_set[k] for k in keys])
        prediction, _ = model(batch["image"])
        loss, _, _ = craft_loss(prediction, batch["region"], batch["affinity"], batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - started
        losses.append(loss.item())
        if step % settings.eval_every == 0 or step == settings.steps:
            rows.append(_evaluate(model, val_set, val_indices, step, float(np.mean(losses)), seconds))
            say(_line(rows[-1]))
            losses = []
        if step >= settings.steps:
            break
    return rows, ceiling


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _line(row: dict[str, Any]) -> str:
    return (f"step {row['step']:4d}  train {row['train_seconds']:7.1f}s  train_loss {_loss(row['train_loss'])}  "
            f"val_loss {row['val_loss']:.4f}  hmean {row['hmean']:.3f}  hmean@lenient {row['hmean_lenient']:.3f}")


def markdown_report(settings: Settings, rows: Sequence[dict[str, Any]], ceiling: dict[str, float],
                    machine: dict[str, Any]) -> str:
    lines = [
        "# CRAFT learning curve (synthetic data, from scratch, CPU)",
        "",
        f"{settings.image_size} px, batch {settings.batch_size}, Adam lr {settings.lr}, "
        f"augment={settings.augment}, {settings.val_images} validation images, seed {settings.seed}; "
        f"torch {machine['torch']} on {machine['cores']} threads. "
        f"H-mean at the official thresholds {_thresholds(DEFAULT_THRESHOLDS)} and at the lenient "
        f"{_thresholds(LENIENT_THRESHOLDS)} (text/link/low_text). A perfect model - the ground-truth score maps "
        f"through the same post-processing - scores {ceiling['hmean']:.3f} and {ceiling['hmean_lenient']:.3f}.",
        "",
        "| step | train s | train loss | val loss | P | R | H-mean | H-mean (lenient) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['step']} | {r['train_seconds']:.1f} | {_loss(r['train_loss'])} | {r['val_loss']:.4f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['hmean']:.3f} | {r['hmean_lenient']:.3f} |")
    return "\n".join(lines) + "\n"


def _thresholds(t: Thresholds) -> str:
    return f"{t.text_threshold}/{t.link_threshold}/{t.low_text}"


def _chart(rows: Sequence[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the chart (pip install matplotlib)"
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r["hmean"] for r in rows], marker="o", label="H-mean (0.7/0.4/0.4)")
    top.plot(steps, [r["hmean_lenient"] for r in rows], marker="s", label="H-mean (0.5/0.3/0.3)")
    top.set_ylim(0, 1)
    top.set_ylabel("validation H-mean")
    top.legend()
    bottom.plot(steps[1:], [r["train_loss"] for r in rows[1:]], marker="o", label="train loss")
    bottom.plot(steps, [r["val_loss"] for r in rows], marker="s", label="validation loss")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("loss")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK.steps} steps")
    parser.add_argument("--out", default="bench_out", help="output folder")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--val-images", type=int)
    parser.add_argument("--augment", action="store_true", default=None, help="the trainer's augmentation")
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Settings()
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__ and v is not None}
    settings = Settings(**{**asdict(base), **overrides})
    if settings.steps < 1 or settings.eval_every < 1 or settings.val_images < 1:
        parser.error("--steps, --eval-every and --val-images must be at least 1")
    needed = settings.val_images + settings.batch_size
    settings = Settings(**{**asdict(settings), "synthetic_size": max(settings.synthetic_size, needed)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, ceiling = run(settings, say=lambda line: print(line, flush=True))
    machine = {"torch": torch.__version__, "cores": torch.get_num_threads(), "python": platform.python_version(),
               "platform": platform.platform()}
    doc = {"settings": asdict(settings), "thresholds": {"official": asdict(DEFAULT_THRESHOLDS),
                                                        "lenient": asdict(LENIENT_THRESHOLDS)},
           "machine": machine, "wall_seconds": round(time.perf_counter() - started, 1), "ceiling": ceiling,
           "results": rows}
    (out / "learning_curve.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "learning_curve.md").write_text(markdown_report(settings, rows, ceiling, machine), encoding="utf-8")
    if not args.no_chart:
        note = _chart(rows, out / "learning_curve.png")
        if note:
            print(note, file=sys.stderr)
    print(f"wrote {out / 'learning_curve.json'} and {out / 'learning_curve.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
