"""The learning tier, and the two models the suite trains from scratch.

The suite trains CRAFT once, for 60 steps (``early_on_synthetic``: the learning test that every run has).
Tests marked ``learning`` need a model trained for 200 steps (``trained_on_synthetic``), which resumes that run
from its checkpoint: a run with ``--learning`` trains 200 steps in all. They are skipped unless pytest is given
``--learning``: ``make test-learning`` runs them alone, CI (``.ci/run``) runs them with the rest, and
``make test`` leaves them out to stay within its time budget on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import TrainedOnSynthetic

from craft_train.config import TrainConfig

TRAINED_STEPS = 200
"""Enough for the region score to split words into characters better than an even split (weak supervision's
interim model) and to find words at the official thresholds."""
EARLY_STEPS = 60
"""Enough to find words at lenient thresholds (the learning test that every run has); the learning tier's model
resumes from this one's checkpoint, so a run with ``--learning`` trains 200 steps in all, not 260."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--learning", action="store_true",
                     help="also run the tests marked 'learning' (they train CRAFT for a few minutes first)")


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist each worker gets its share of the cores, and so do the trainers its tests start (they
    # inherit OMP_NUM_THREADS): torch's default of one thread per core in every worker makes its threads spin
    # against each other's, which made the suite slower with two workers than with one. Results stay comparable:
    # a test's in-process and subprocess runs use the same count.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, len(os.sched_getaffinity(0)) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="trains CRAFT for minutes: run with --learning (make test-learning)")
    for item in items:
        if item.get_closest_marker("learning") is not None and not config.getoption("--learning"):
            item.add_marker(skip)
    # make test runs two pytest-xdist workers, each given whole files (--dist loadfile, in this order): the
    # longest work first, so that the many short files fill the gaps instead of one long file running alone at
    # the end. First the file that trains the shared models (test_learning.py: the only users of the session's
    # trained models, so they are trained once), then the files with end-to-end tests, then the rest.
    rank: dict[str, int] = {}
    for item in items:
        file = item.nodeid.split("::")[0]
        if item.get_closest_marker("skip") is None:
            kind = 0 if TRAINED_MODELS & set(getattr(item, "fixturenames", ())) else (
                1 if item.get_closest_marker("slow") is not None else 2)
            rank[file] = min(rank.get(file, 2), kind)
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], 2))


TRAINED_MODELS = {"early_on_synthetic", "trained_on_synthetic"}


def learning_config(**overrides: object) -> TrainConfig:
    """From scratch on character-level synthetic text: batch 4, 128 px, Adam 1e-3, no augmentation, seed 0;
    968 training images, 32 held out."""
    settings: dict[str, object] = dict(
        synthetic_size=1000, val_fraction=32 / 1000, image_size=128, augment=False, batch_size=4, lr=1e-3,
        epochs=1, workers=0, device="cpu")
    return TrainConfig(**{**settings, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def early_on_synthetic(tmp_path_factory: pytest.TempPathFactory) -> TrainedOnSynthetic:
    """``EARLY_STEPS`` steps of ``craft_train.train`` (:func:`learning_config`), checkpointed at the last one;
    about 40 s on 2 cores."""
    from craft_train.model import CRAFT
    from craft_train.train import train

    config = learning_config(max_steps=EARLY_STEPS, save_freq=EARLY_STEPS,
                             save_dir=str(tmp_path_factory.mktemp("early") / "checkpoints"))
    torch.manual_seed(config.seed)  # the trainer's initial weights
    untrained = CRAFT()
    result = train(config, say=lambda _: None)
    assert result.global_step == EARLY_STEPS and result.model is not None
    assert [p.name for p in result.saved_paths] == [f"checkpoint_epoch_1_batch_{EARLY_STEPS}.pth"]
    return TrainedOnSynthetic(config, untrained.eval(), result.model.eval(), EARLY_STEPS, result.saved_paths[0])


@pytest.fixture(scope="session")
def trained_on_synthetic(tmp_path_factory: pytest.TempPathFactory,
                         early_on_synthetic: TrainedOnSynthetic) -> TrainedOnSynthetic:
    """``TRAINED_STEPS`` steps: the early model's run resumed to step 200 (an exact resume, so the same weights as
    200 steps without a stop: tests/test_resume.py); about 1.5 minutes more on 2 cores."""
    from craft_train.train import train

    assert early_on_synthetic.checkpoint is not None
    config = learning_config(max_steps=TRAINED_STEPS, save_freq=0, resume=str(early_on_synthetic.checkpoint),
                             save_dir=str(tmp_path_factory.mktemp("trained") / "checkpoints"))
    result = train(config, say=lambda _: None)
    assert result.start_step == EARLY_STEPS and result.global_step == TRAINED_STEPS and result.model is not None
    return TrainedOnSynthetic(config, early_on_synthetic.untrained, result.model.eval(), TRAINED_STEPS)


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory elsewhere holding a file that must never change."""
    directory = tmp_path_factory.mktemp("outside")
    (directory / "precious.txt").write_text("precious")
    return directory
