"""Run state (train/state.py): counters, the run folder, pruning, the best checkpoint."""

import math

import pytest
import torch

from samovar import checkpoint as ckpt
from samovar.config import get_preset
from samovar.model import Transformer
from samovar.runtime import Dist
from samovar.tokenizer import Tokenizer
from samovar.train import TrainConfig, TrainingError, make_optimizer
from samovar.train.state import RunFolder, RunState, capture_rng, restore_rng


def test_run_state_round_trips_through_trainer_state_json():
    state = RunState(step=7, tokens_seen=700, elapsed=1.5, best_val=2.25, bad_evals=1,
                     last_eval={"step": 7, "train_loss": 2.0, "val_loss": 2.25})
    saved = state.to_json(world_size=2)
    assert saved == {"step": 7, "tokens_seen": 700, "elapsed_s": 1.5, "best_val_loss": 2.25, "bad_evals": 1,
                     "world_size": 2, "train_loss": 2.0, "val_loss": 2.25, "eval_step": 7}
    again = RunState.from_json(saved)
    assert (again.step, again.tokens_seen, again.elapsed, again.best_val, again.bad_evals) == (7, 700, 1.5, 2.25, 1)
    assert again.last_eval == state.last_eval  # a resumed run knows its last evaluation's step
    assert RunState.from_json(RunState().to_json(1)).best_val == math.inf  # none yet: null in the file


def test_saves_prune_to_the_last_and_the_best(tmp_path):
    cfg = get_preset("gpt2-tiny").replace(vocab_size=40)
    model = Transformer(cfg)
    tokenizer = Tokenizer.train("char", ["abcdefghij klmnop"])
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    run = RunFolder(tmp_path / "run", Dist())
    run.start(cfg, TrainConfig(), tmp_path / "data", tokenizer, fresh=True)
    state = RunState()
    for step, val in [(10, 2.0), (20, 1.5), (30, 1.7), (40, 1.8)]:
        state.step, state.last_eval = step, {"step": step, "train_loss": val, "val_loss": val}
        state.best_val = min(state.best_val, val)
        run.save(state, model, tokenizer, opt, fsdp=False, keep_last=1)
    names = [p.name for p in ckpt.list_checkpoints(run.out)]
    assert names == ["step-0000020", "step-0000040"]  # the best (1.5) and the last
    assert (run.out / "best.txt").read_text().strip() == "step-0000020"
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        run.start(cfg, TrainConfig(), tmp_path / "data", tokenizer, fresh=True)
    resumed, extra, adapter = run.resume(Transformer(cfg), "cpu")
    assert adapter is None
    assert resumed.step == 40 and set(extra) == {"optimizer", "rng"}


def test_rng_capture_and_restore_continue_the_same_dropout_stream():
    rng = capture_rng(Dist(), torch.device("cpu"))
    a = torch.rand(3)
    restore_rng(rng, Dist(), torch.device("cpu"))
    torch.testing.assert_close(torch.rand(3), a)
