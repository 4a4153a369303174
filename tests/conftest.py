"""The learning tier and the one model it trains.

Tests marked ``learning`` need a CRAFT model trained for a few hundred steps (minutes of CPU). They are skipped
unless pytest is given ``--learning`` (``make test-learning``): the full suite must stay within its time budget
on 2 cores, and the rest of it already uses both.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TrainedOnSynthetic

from craft_train.config import TrainConfig

TRAINED_STEPS = 200
"""Enough for the region score to split words into characters better than an even split (weak supervision's
interim model) and to find words at the official thresholds."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--learning", action="store_true",
                     help="also run the tests marked 'learning' (they train CRAFT for a few minutes first)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="trains CRAFT for minutes: run with --learning (make test-learning)")
    for item in items:
        if item.get_closest_marker("learning") is not None and not config.getoption("--learning"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained_on_synthetic(tmp_path_factory: pytest.TempPathFactory) -> TrainedOnSynthetic:
    """``TRAINED_STEPS`` steps of ``craft_train.train`` from scratch: batch 4, 128 px, Adam 1e-3, no
    augmentation, synthetic seed 0 (968 training images, 32 held out); about 3.5 minutes on 2 cores."""
    from craft_train.model import CRAFT
    from craft_train.train import train

    config = TrainConfig(synthetic_size=1000, val_fraction=32 / 1000, image_size=128, augment=False, batch_size=4,
                         lr=1e-3, epochs=1, max_steps=TRAINED_STEPS, save_freq=0, workers=0, device="cpu",
                         save_dir=str(tmp_path_factory.mktemp("trained") / "checkpoints"))
    torch.manual_seed(config.seed)  # the trainer's initial weights
    untrained = CRAFT()
    result = train(config, say=lambda _: None)
    assert result.global_step == TRAINED_STEPS and result.model is not None
    return TrainedOnSynthetic(config, untrained.eval(), result.model.eval(), TRAINED_STEPS)
