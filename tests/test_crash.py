"""SIGKILL at any moment, even mid-checkpoint: the run folder always holds a loadable checkpoint, and
`--resume` continues to the same losses, step by step, as a run that was never interrupted."""

import csv
import os
import random
import signal
import subprocess
import sys
import time


from samovar.api import load
from samovar.checkpoint import list_checkpoints

ARGS = ["--preset", "gpt2-tiny", "--set", "context_len=32", "--set", "batch_size=4", "--set", "max_steps=40",
        "--set", "eval_interval=10", "--set", "eval_steps=2", "--set", "log_interval=1",
        "--set", "checkpoint_interval=1", "--set", "keep_last=2", "--set", "dropout=0.1",
        "--set", "device=cpu", "--set", "peak_flops=1e11"]


def command(data, run, resume=False):
    where = ["--resume", str(run)] if resume else ["--out", str(run)]
    return [sys.executable, "-m", "samovar", "train", "--data", str(data), *where, *ARGS]


def rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_losses(tmp_path, char_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(command(char_data, tmp_path / "reference"), capture_output=True, text=True, env=env)
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "crashed"
    rng = random.Random(0)
    kills, resume = 0, False
    for _ in range(12):
        done = len(rows(run)) if (run / "metrics.csv").exists() and resume else 0
        proc = subprocess.Popen(command(char_data, run, resume), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        target = done + rng.randint(2, 8)  # let it log a few more steps, then kill it at a random instant
        while proc.poll() is None and not ((run / "metrics.csv").exists() and len(rows(run)) >= target):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))  # a checkpoint is written after every step: often mid-save
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        resume = True
        if list_checkpoints(run):  # whatever the moment of the kill, the latest checkpoint loads
            model, tokenizer = load(run, device="cpu")
            assert tokenizer is not None and model.num_params() > 0
    else:
        final = subprocess.run(command(char_data, run, True), capture_output=True, text=True, env=env)
        assert final.returncode == 0, final.stderr
    assert kills >= 3, "the run finished before it could be killed often enough"

    got, want = rows(run), rows(tmp_path / "reference")
    assert [int(r["step"]) for r in got] == list(range(1, 41))  # one row per step, no duplicates
    for a, b in zip(got, want):
        assert (a["step"], a["loss"], a["val_loss"], a["lr"], a["grad_norm"]) == \
               (b["step"], b["loss"], b["val_loss"], b["lr"], b["grad_norm"])
    names = [p.name for p in list_checkpoints(run)]
    assert names[-1] == "step-0000040" and len(names) <= 3  # keep_last=2, plus the best
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def test_nan_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, char_data):
    result = subprocess.run(
        [sys.executable, "-m", "samovar", "train", "--data", str(char_data), "--out", str(tmp_path / "run"),
         "--preset", "gpt2-tiny", "--set", "context_len=32", "--set", "batch_size=4", "--set", "lr=1e30",
         "--set", "warmup_steps=0", "--set", "grad_clip=0", "--set", "checkpoint_interval=1",
         "--set", "max_bad_steps=3", "--set", "device=cpu", "--set", "peak_flops=1e11"],
        capture_output=True, text=True)
    assert result.returncode == 2
    assert "non-finite losses in a row" in result.stderr and "is skipped" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("samovar: error:")
    checkpoints = list_checkpoints(tmp_path / "run")
    assert checkpoints, "the step before the losses went bad was checkpointed"
    model, _ = load(tmp_path / "run", device="cpu")  # the kept checkpoint loads
    assert model.num_params() > 0
