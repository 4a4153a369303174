"""What training CRAFT from scratch achieves, measured on the models the suite trains once (tests/conftest.py):
words found after 60 steps where an untrained model finds none, the official thresholds met after 200 (the
learning tier), and an interim model that splits words into characters better than the even split (the premise
of weak supervision).

The three tests share one file so that pytest-xdist (``make test``: ``--dist loadfile``) runs them on one worker,
which trains the models once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TrainedOnSynthetic

from craft_train.data import SyntheticTextDataset
from craft_train.evaluate import evaluate_model
from craft_train.weak import EVEN_SPLIT_CONFIDENCE
from craft_train.weak_quality import pseudo_label_quality

# Training the models is part of these tests' setup, which pytest-timeout counts: 200 steps take 2 minutes on a
# quiet 2-core machine, and several times that beside the other worker and a busy core.
pytestmark = pytest.mark.timeout(1800)

# ---- it finds words ---------------------------------------------------------------------------------------------

def _region_separation(model: torch.nn.Module, data: SyntheticTextDataset, indices: list[int]) -> float:
    """Median over images of (peak region score on characters) - (99th percentile on background)."""
    from craft_train.data import collate

    batch = collate([data[(i, 0)] for i in indices])
    model.eval()
    with torch.no_grad():
        region = model(batch["image"])[0][..., 0]
    label = batch["region"]
    gaps = []
    for pred, target in zip(region, label, strict=True):
        text, background = pred[target > 0.5], pred[target < 0.05]
        if len(text) and len(background):
            gaps.append(float(text.max() - torch.quantile(background, 0.99)))
    return float(np.median(gaps))


@pytest.mark.slow
def test_training_from_scratch_on_synthetic_text_finds_words_an_untrained_model_cannot(
    early_on_synthetic: TrainedOnSynthetic,
) -> None:
    """The suite's shared early model (tests/conftest.py: 60 steps of the real trainer from scratch, batch 4,
    128 px, Adam 1e-3, no augmentation) against its untrained start, on the trainer's 32 held-out images.

    Measured (torch 2.13 CPU, 2 threads, seed 0, 104 words):

    * untrained: no detections, H-mean 0.000; separation (peak on characters minus the 99th percentile on
      background) 0.002;
    * trained, lenient thresholds text/link/low 0.5/0.3/0.3: H-mean 0.750 (P 0.82, R 0.69), separation 0.48;
    * the official thresholds 0.7/0.4/0.4 need region peaks above 0.7, which come later: asserted by the
      learning tier's 200-step test below (``--learning``), not here.

    Bars, with margin for other machines and thread counts: lenient H-mean >= 0.5, separation >= 0.2.
    """
    from craft_train.data import split_indices
    from craft_train.postprocess import Thresholds

    config = early_on_synthetic.config
    lenient = Thresholds(text_threshold=0.5, link_threshold=0.3, low_text=0.3)
    n = config.synthetic_size
    _, val_indices = split_indices(n, config.val_fraction, config.seed)
    val = SyntheticTextDataset(n, config.image_size, config.seed, augment=False)
    assert len(val_indices) == 32

    untrained, trained = early_on_synthetic.untrained, early_on_synthetic.trained
    before = evaluate_model(untrained, val, val_indices, "cpu", thresholds=lenient)
    separation_before = _region_separation(untrained, val, val_indices)
    after = evaluate_model(trained, val, val_indices, "cpu", thresholds=lenient)
    separation_after = _region_separation(trained, val, val_indices)

    report = f"untrained {before}, sep {separation_before:.3f}; trained {after}, sep {separation_after:.3f}"
    assert before["num_gt"] > 60 and before["hmean"] == 0.0, report
    assert abs(separation_before) < 0.05, report
    assert after["hmean"] >= 0.5, report
    assert separation_after >= 0.2, report


@pytest.mark.slow
@pytest.mark.learning
def test_two_hundred_steps_find_words_at_the_official_thresholds(
    trained_on_synthetic: TrainedOnSynthetic,
) -> None:
    """The learning tier's model (tests/conftest.py: the 60-step run above resumed to 200 steps) against its
    untrained start, on the same 32 held-out images; this one runs with ``--learning``.

    Measured (torch 2.13 CPU, 2 threads, seed 0, 104 words):

    * untrained: no detections, H-mean 0.000; separation (peak on characters minus the 99th percentile on
      background) 0.002;
    * trained, official thresholds 0.7/0.4/0.4: H-mean 0.756 (P 0.96, R 0.63);
    * trained, lenient 0.5/0.3/0.3: H-mean 0.837 (P 0.89, R 0.79); separation 0.86.
    (The same run on one thread, through ``python -m craft_train``: 0.751, 0.863, 0.85. On another 2-core
    machine whose CPU kernels differ, where the 60 steps are shared with the test above: 0.667 (P 0.96,
    R 0.51), 0.798, 0.83.)

    Bars, with margin for other machines (other CPU kernels change the trajectory): lenient >= 0.6, official
    >= 0.4, separation >= 0.4.
    """
    from craft_train.data import split_indices
    from craft_train.postprocess import DEFAULT_THRESHOLDS, Thresholds

    config = trained_on_synthetic.config
    lenient = Thresholds(text_threshold=0.5, link_threshold=0.3, low_text=0.3)
    n = config.synthetic_size
    _, val_indices = split_indices(n, config.val_fraction, config.seed)
    val = SyntheticTextDataset(n, config.image_size, config.seed, augment=False)
    assert len(val_indices) == 32

    untrained, trained = trained_on_synthetic.untrained, trained_on_synthetic.trained
    before = evaluate_model(untrained, val, val_indices, "cpu", thresholds=lenient)
    separation_before = _region_separation(untrained, val, val_indices)
    after = evaluate_model(trained, val, val_indices, "cpu", thresholds=lenient)
    official = evaluate_model(trained, val, val_indices, "cpu", thresholds=DEFAULT_THRESHOLDS)
    separation_after = _region_separation(trained, val, val_indices)

    report = (f"untrained {before}, sep {separation_before:.3f}; trained {after}, official {official}, "
              f"sep {separation_after:.3f}")
    assert before["num_gt"] > 60 and before["hmean"] == 0.0, report
    assert abs(separation_before) < 0.05, report
    assert after["hmean"] >= 0.6, report
    assert official["hmean"] >= 0.4, report
    assert separation_after >= 0.4, report


# ---- it splits words into characters ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.learning
def test_an_interim_model_splits_words_into_characters_better_than_the_even_split(
    trained_on_synthetic: TrainedOnSynthetic,
) -> None:
    """The paper's premise, measured on word-level synthetic images whose true characters are known (other
    images than the model was trained on: seed + 1, 40 images, 115 words of two or more characters).

    Measured with the learning tier's 200-step model (tests/conftest.py; torch 2.13 CPU, 2 threads): mean IoU
    0.692 against the even split's 0.667 (+0.025); 64 % of the words split into as many characters as their
    transcription has, and the loss trusts the words 0.90 on average (the even split: 0.50). The same run on one
    thread gave 0.700 (+0.033), and so did another 2-core machine (0.701; 62 % matched, confidence 0.90); along
    benchmarks/learning_curve.py's run, +0.016 to +0.030 from 150 to 300 steps and less than the even split
    before 125 steps. The bar is +0.01.
    """
    config = trained_on_synthetic.config
    data = SyntheticTextDataset(40, config.image_size, config.seed + 1, augment=False, labels="word")
    words = []
    for index in range(len(data)):
        image, truth = data.render_chars(index)
        words += [(image, w.char_quads) for w in truth.words]

    interim = pseudo_label_quality(trained_on_synthetic.trained, words, config.image_size)
    untrained = pseudo_label_quality(trained_on_synthetic.untrained, words, config.image_size)
    report = f"interim {interim}; untrained {untrained}"
    assert interim.words >= 100, report
    assert interim.mean_iou >= interim.mean_iou_even_split + 0.01, report
    # words whose count matches the transcription are trusted fully, the even split only half
    assert interim.count_matches >= 0.4 and interim.mean_confidence_matched == 1.0, report
    assert interim.mean_confidence > EVEN_SPLIT_CONFIDENCE + 0.2, report
    # an untrained model finds no characters: every word falls back to the even split, at its confidence
    assert untrained.count_matches == 0.0 and untrained.mean_iou == untrained.mean_iou_even_split, report
    assert untrained.mean_confidence == EVEN_SPLIT_CONFIDENCE, report
