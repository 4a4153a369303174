"""Does CRAFT learn? Validation H-mean (and loss) against optimizer steps for a from-scratch synthetic run.

The training step is the trainer's (``craft_train.train``): synthetic data in the trainer's epoch order and
augmentation seeds, CRAFT, ``craft_loss``, Adam and StepLR. Every ``--eval-every`` steps the model is scored on
held-out images with :func:`craft_train.evaluate.evaluate_model` at the official thresholds (0.7/0.4/0.4) and
at a lenient setting (0.5/0.3/0.3), which shows progress before the region peaks reach 0.7, and the
validation loss is measured on the trainer's un-augmented validation samples.

Run ``python benchmarks/learning_curve.py [--quick] [--out DIR]``; writes ``DIR/learning_curve.json``,
``DIR/learning_curve.md`` and, with matplotlib installed, ``DIR/learning_curve.png``.

``--weak-compare`` measures weak supervision (:mod:`craft_train.weak`) instead: an interim model trained
``--steps`` steps on character-level synthetic data (or loaded with ``--interim-weights``) is fine-tuned
``--finetune-steps`` steps on word-level-only synthetic data (other images: seed + 1) twice, from the same
weights and in the same batch order: with the even split of each word (confidence 0.5) and with weak
supervision. Both are scored on held-out word-level images: H-mean, and at the character level the pseudo-label
quality of the model's region score against the true character boxes (mean IoU, share of words whose character
count matches) and the region score's mean squared error against the true character-level map. Writes
``DIR/weak_supervision.json`` and ``DIR/weak_supervision.md``.
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
from craft_train.data import MixedDataset, SyntheticTextDataset, collate, make_sample, split_indices
from craft_train.evaluate import DetectionCounts, evaluate_model, match_image, word_quads
from craft_train.loss import craft_loss
from craft_train.model import CRAFT
from craft_train.order import augmentation_seed, epoch_permutation
from craft_train.postprocess import DEFAULT_THRESHOLDS, Thresholds, detect_boxes, to_image_coordinates
from craft_train.weak import pseudo_targets
from craft_train.weak_quality import pseudo_label_quality

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
    finetune_lr: float = 1e-4
    """With --weak-compare: the fine-tuning runs' learning rate (a fresh Adam at the interim model's 1e-3 undoes
    what it learned in both runs before either label can help)."""
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


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> torch.Tensor:
    """One optimizer step on ``batch``; returns its loss."""
    prediction, _ = model(batch["image"])
    loss, _, _ = craft_loss(prediction, batch["region"], batch["affinity"], batch["mask"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _batches(settings: Settings, train_indices: list[int],
             mixed: MixedDataset | None = None) -> Iterator[list[tuple[int, int]]]:
    """[(index, aug_seed), ...] in the trainer's order, epoch after epoch; with ``mixed``, its synthetic images
    mixed in as the trainer's ``--mix-synthetic`` does."""
    epoch = 1
    while True:
        own = epoch_permutation(settings.seed, epoch, train_indices)
        order = (own if mixed is None else mixed.epoch_order(own, seed=settings.seed, epoch=epoch)).tolist()
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
        loss = _train_step(model, optimizer, batch)
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


# ---- weak supervision ---------------------------------------------------------------------------------------------

def _character_scores(model: torch.nn.Module, data: SyntheticTextDataset, indices: Sequence[int]) -> dict[str, float]:
    """Character-level quality of the model's region score on word-level images whose true characters are known."""
    words = []
    squared, pixels = 0.0, 0
    model.eval()
    for index in indices:
        image, truth = data.render_chars(index)
        words += [(image, w.char_quads) for w in truth.words]
        sample = make_sample(image, truth, data.image_size)  # the true character-level maps
        with torch.no_grad():
            region = model(sample["image"][None])[0][0, ..., 0]
        squared += float(((region - sample["region"]) ** 2).sum())
        pixels += region.numel()
    quality = pseudo_label_quality(model, words, data.image_size)
    return {"char_iou": quality.mean_iou, "char_iou_even_split": quality.mean_iou_even_split,
            "count_matches": quality.count_matches, "mean_confidence": quality.mean_confidence,
            "region_mse": squared / max(pixels, 1)}


def _evaluate_word_level(model: torch.nn.Module, data: SyntheticTextDataset, indices: Sequence[int], step: int,
                         train_loss: float | None, seconds: float) -> dict[str, Any]:
    row = _evaluate(model, data, indices, step, train_loss, seconds)
    row.update(_character_scores(model, data, indices))
    return row


def _character_level_training_data(settings: Settings) -> tuple[SyntheticTextDataset, list[int]]:
    """The synthetic images of ``settings.seed`` with character boxes, and the indices not held out."""
    data = SyntheticTextDataset(settings.synthetic_size, settings.image_size, settings.seed, settings.augment)
    train_indices, _ = split_indices(settings.synthetic_size, settings.val_images / settings.synthetic_size,
                                     settings.seed)
    return data, train_indices


def _interim_model(settings: Settings, say: Callable[[str], None], weights: str | None) -> CRAFT:
    torch.manual_seed(settings.seed)
    model = CRAFT()
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        say(f"interim model: loaded {weights}")
        return model
    data, train_indices = _character_level_training_data(settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=WEIGHT_DECAY)
    started = time.perf_counter()
    for step, keys in enumerate(_batches(settings, train_indices), start=1):
        model.train()
        batch = collate([data[k] for k in keys])
        loss = _train_step(model, optimizer, batch)
        if step % 50 == 0 or step == settings.steps:
            say(f"interim model: step {step}/{settings.steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - started:.0f}s)")
        if step >= settings.steps:
            break
    return model


WEAK_RUNS = ("even_split", "weak")


def weak_comparison(settings: Settings, finetune_steps: int, say: Callable[[str], None] = print,
                    interim_weights: str | None = None, runs: Sequence[str] = WEAK_RUNS,
                    mix_every: int = 0, mix_synthetic: int = 0,
                    letter_gaps: float = 0.0) -> dict[str, list[dict[str, Any]]]:
    """Fine-tune the interim model on word-level data with the even split and with weak supervision.

    Returns ``{"even_split": rows, "weak": rows}``, one row per evaluation (step 0 is the interim model).
    ``runs`` picks one of them, e.g. to run the two in separate processes. ``mix_every`` > 0: every
    ``mix_every``-th step trains on a batch of the interim model's character-level data instead (the paper mixes
    SynthText in at 1:5 so that character regions stay separated), in both runs alike. ``mix_synthetic`` > 0:
    the trainer's ``--mix-synthetic`` instead (one character-level image of the fine-tuning seed, from after its
    own images, after every ``mix_synthetic`` word-level ones, within the batches). ``letter_gaps`` > 0: the
    word-level images (fine-tuning and validation) space their letters irregularly, where the even split is wrong.
    """
    interim = _interim_model(settings, say, interim_weights)
    state = {k: v.clone() for k, v in interim.state_dict().items()}
    seed = settings.seed + 1  # other images than the interim model saw
    words = Settings(**{**asdict(settings), "seed": seed})
    train_indices, val_indices = split_indices(settings.synthetic_size, settings.val_images / settings.synthetic_size,
                                               seed)
    val_set = SyntheticTextDataset(settings.synthetic_size, settings.image_size, seed, augment=False, labels="word",
                                   letter_gaps=letter_gaps)
    char_set, char_indices = _character_level_training_data(settings)  # what the interim model trains on
    results: dict[str, list[dict[str, Any]]] = {}
    for name in runs:
        weak = name == "weak"
        torch.manual_seed(settings.seed)
        model = CRAFT()
        model.load_state_dict(state)
        train_set: SyntheticTextDataset | MixedDataset = SyntheticTextDataset(
            settings.synthetic_size, settings.image_size, seed, settings.augment, labels="word",
            weak_supervision=weak, letter_gaps=letter_gaps)
        mixed = None
        if mix_synthetic:  # as craft_train's data section builds it
            mixed = train_set = MixedDataset.with_synthetic(
                train_set, every=mix_synthetic, count=settings.synthetic_size, seed=seed, augment=settings.augment,
                weak_supervision=weak)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.finetune_lr, weight_decay=WEIGHT_DECAY)
        rows = [_evaluate_word_level(model, val_set, val_indices, 0, None, 0.0)]
        say(f"{name:10s} {_weak_line(rows[-1])}")
        losses: list[float] = []
        seconds = 0.0
        char_batches = _batches(settings, char_indices)
        for step, keys in enumerate(_batches(words, train_indices, mixed), start=1):
            started = time.perf_counter()
            model.train()
            if mix_every and step % mix_every == 0:
                batch = collate([char_set[k] for k in next(char_batches)])
            else:
                batch = pseudo_targets(model, collate([train_set[k] for k in keys]))
            loss = _train_step(model, optimizer, batch)
            seconds += time.perf_counter() - started
            losses.append(loss.item())
            if step % settings.eval_every == 0 or step == finetune_steps:
                rows.append(_evaluate_word_level(model, val_set, val_indices, step, float(np.mean(losses)), seconds))
                say(f"{name:10s} {_weak_line(rows[-1])}")
                losses = []
            if step >= finetune_steps:
                break
        results[name] = rows
    return results


def _weak_line(row: dict[str, Any]) -> str:
    return (f"step {row['step']:4d}  train {row['train_seconds']:7.1f}s  hmean {row['hmean']:.3f}  "
            f"hmean@lenient {row['hmean_lenient']:.3f}  char IoU {row['char_iou']:.3f} "
            f"(even split {row['char_iou_even_split']:.3f})  count matches {row['count_matches']:.3f}  "
            f"region MSE {row['region_mse']:.4f}")


def weak_markdown(settings: Settings, finetune_steps: int, results: dict[str, list[dict[str, Any]]],
                  machine: dict[str, Any], interim: str, mix_every: int = 0, mix_synthetic: int = 0,
                  letter_gaps: float = 0.0) -> str:
    mixed = (f", every {mix_every}th step on the interim model's character-level data instead" if mix_every
             else "")
    if mix_synthetic:
        mixed += f", one character-level image after every {mix_synthetic} (--mix-synthetic {mix_synthetic})"
    if letter_gaps:
        mixed += f", letters spaced irregularly (--letter-gaps {letter_gaps})"
    lines = [
        "# Weak supervision vs. the even split (word-level synthetic data, CPU)",
        "",
        f"Interim model: {interim}. Fine-tuned {finetune_steps} steps on word-level-only synthetic data (seed "
        f"{settings.seed + 1}{mixed}), {settings.image_size} px, batch {settings.batch_size}, "
        f"Adam lr {settings.finetune_lr}, augment={settings.augment}; {settings.val_images} validation images; "
        f"torch {machine['torch']} on "
        f"{machine['cores']} threads. H-mean at {_thresholds(DEFAULT_THRESHOLDS)} and (lenient) "
        f"{_thresholds(LENIENT_THRESHOLDS)}; char IoU: mean IoU of the characters the model's region score splits "
        "each word into (1-D watershed, even split below s_conf 0.5) against the true character boxes; count "
        "matches: share of words where that split finds as many characters as the transcription has; region MSE: "
        "against the true character-level region map.",
        "",
        "| labels | step | H-mean | H-mean (lenient) | char IoU | count matches | region MSE | val loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['step']} | {r['hmean']:.3f} | {r['hmean_lenient']:.3f} | {r['char_iou']:.3f} "
                         f"| {r['count_matches']:.3f} | {r['region_mse']:.4f} | {r['val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--seed", type=int,
                        help="synthetic data seed (default 0; --weak-compare: fine-tunes on seed + 1)")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--weak-compare", action="store_true",
                        help="fine-tune an interim model on word-level data: even split vs. weak supervision")
    parser.add_argument("--finetune-steps", type=int, default=100, help="with --weak-compare")
    parser.add_argument("--finetune-lr", type=float, help=f"with --weak-compare (default {Settings.finetune_lr})")
    parser.add_argument("--interim-weights", help="with --weak-compare: a CRAFT state_dict instead of training one")
    parser.add_argument("--mix-char-every", type=int, default=0, metavar="N",
                        help="with --weak-compare: every N-th fine-tuning step on character-level data (0: never)")
    parser.add_argument("--mix-synthetic", type=int, default=0, metavar="N",
                        help="with --weak-compare: the trainer's --mix-synthetic N (one character-level image "
                             "after every N word-level ones, within the batches)")
    parser.add_argument("--letter-gaps", type=float, default=0.0, metavar="F",
                        help="with --weak-compare: space the word-level images' letters irregularly, each gap up to "
                             "F x the text height (0: the renderer's regular spacing)")
    parser.add_argument("--weak-runs", choices=(*WEAK_RUNS, "both"), default="both",
                        help="with --weak-compare: only one of the fine-tuning runs (they are independent)")
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
    if args.weak_compare:
        return _main_weak(args, settings, out, started)
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


def _main_weak(args: argparse.Namespace, settings: Settings, out: Path, started: float) -> int:
    if args.finetune_steps < 1 or args.mix_char_every < 0 or args.mix_synthetic < 0 or not 0 <= args.letter_gaps <= 2:
        print("learning_curve: error: --finetune-steps must be at least 1, --mix-char-every and --mix-synthetic "
              "0 or more, --letter-gaps between 0 and 2", file=sys.stderr)
        return 2
    if args.interim_weights is not None and not Path(args.interim_weights).is_file():
        print(f"learning_curve: error: --interim-weights {args.interim_weights}: no such file", file=sys.stderr)
        return 2
    runs = WEAK_RUNS if args.weak_runs == "both" else (args.weak_runs,)
    results = weak_comparison(settings, args.finetune_steps, lambda line: print(line, flush=True),
                              args.interim_weights, runs, args.mix_char_every, args.mix_synthetic, args.letter_gaps)
    machine = {"torch": torch.__version__, "cores": torch.get_num_threads(), "python": platform.python_version(),
               "platform": platform.platform()}
    interim = (f"weights from {args.interim_weights}" if args.interim_weights else
               f"{settings.steps} steps on character-level synthetic data (seed {settings.seed})")
    doc = {"settings": asdict(settings), "finetune_steps": args.finetune_steps, "interim": interim,
           "mix_char_every": args.mix_char_every, "mix_synthetic": args.mix_synthetic,
           "letter_gaps": args.letter_gaps,
           "machine": machine, "wall_seconds": round(time.perf_counter() - started, 1), "results": results}
    (out / "weak_supervision.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    report = weak_markdown(settings, args.finetune_steps, results, machine, interim, args.mix_char_every,
                           args.mix_synthetic, args.letter_gaps)
    (out / "weak_supervision.md").write_text(report, encoding="utf-8")
    print(f"wrote {out / 'weak_supervision.json'} and {out / 'weak_supervision.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
