"""The learning-rate schedule (train/schedule.py)."""

import pytest

from samovar.config import ConfigError
from samovar.train import TrainConfig, lr_at
from samovar.train.schedule import progress, warmup


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(5.5e-4)
    assert lr_at(cfg, 110) == pytest.approx(1e-4)


def test_wsd_schedule_holds_then_decays():
    cfg = TrainConfig(lr=1e-2, min_lr=0.0, warmup_steps=0, schedule="wsd", cooldown_frac=0.4, max_steps=100)
    assert lr_at(cfg, 10) == pytest.approx(1e-2)
    assert lr_at(cfg, 60) == pytest.approx(1e-2)
    assert lr_at(cfg, 80) == pytest.approx(0.5e-2)
    assert lr_at(cfg, 100) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="schedule must be"):
        TrainConfig(schedule="linear")


def test_progress_follows_steps_or_the_clock_whichever_is_further():
    cfg = TrainConfig(warmup_steps=10, max_steps=110)
    assert progress(cfg, 60, elapsed=1e6) == pytest.approx(0.5)  # no time budget: steps only
    timed = cfg.replace(max_seconds=100.0)
    assert progress(timed, 60, elapsed=80.0) == pytest.approx(0.8)
    assert progress(timed, 60, elapsed=10.0) == pytest.approx(0.5)


def test_under_a_time_budget_warmup_ends_with_the_clock():
    """A short timed run never reached the end of a 100-step warmup; now warmup takes at most
    warmup_frac of the budget."""
    cfg = TrainConfig(lr=1e-3, warmup_steps=100, max_steps=10**9, max_seconds=20.0, warmup_frac=0.05,
                      schedule="wsd")
    assert warmup(cfg, 4, elapsed=0.5) == pytest.approx(0.5)  # by the clock: 0.5 s of a 1 s warmup
    assert warmup(cfg, 60, elapsed=0.1) == pytest.approx(0.61)  # by steps, when that is further
    assert lr_at(cfg, 19, elapsed=1.0) == pytest.approx(1e-3)  # 19 steps in: the full lr
    assert lr_at(cfg.replace(max_seconds=None, max_steps=1000), 19, elapsed=1.0) == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match="max_seconds must be positive"):
        TrainConfig(max_seconds=0)
    with pytest.raises(ConfigError, match="warmup_frac"):
        TrainConfig(warmup_frac=1.5)
