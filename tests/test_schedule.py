"""The learning-rate schedule (train/schedule.py)."""

import pytest

from samovar.config import ConfigError
from samovar.train import TrainConfig, lr_at
from samovar.train.schedule import progress


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 0.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 60, 0.5) == pytest.approx(5.5e-4)
    assert lr_at(cfg, 110, 1.0) == pytest.approx(1e-4)


def test_wsd_schedule_holds_then_decays():
    cfg = TrainConfig(lr=1e-2, min_lr=0.0, warmup_steps=0, schedule="wsd", cooldown_frac=0.4)
    assert lr_at(cfg, 10, 0.1) == pytest.approx(1e-2)
    assert lr_at(cfg, 50, 0.6) == pytest.approx(1e-2)
    assert lr_at(cfg, 80, 0.8) == pytest.approx(0.5e-2)
    assert lr_at(cfg, 100, 1.0) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="schedule must be"):
        TrainConfig(schedule="linear")


def test_progress_follows_steps_or_the_clock_whichever_is_further():
    cfg = TrainConfig(warmup_steps=10, max_steps=110)
    assert progress(cfg, 60, elapsed=1e6) == pytest.approx(0.5)  # no time budget: steps only
    timed = cfg.replace(max_seconds=100.0)
    assert progress(timed, 60, elapsed=80.0) == pytest.approx(0.8)
    assert progress(timed, 60, elapsed=10.0) == pytest.approx(0.5)
