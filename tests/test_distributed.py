"""torchrun with 2 CPU processes (gloo) trains exactly what one process trains on the same global batch."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

COMMON = ["--preset", "gpt2-tiny", "--set", "context_len=32", "--set", "max_steps=8", "--set", "eval_interval=4",
          "--set", "eval_steps=2", "--set", "log_interval=1", "--set", "dropout=0", "--set", "device=cpu",
          "--set", "warmup_steps=2", "--set", "lr=3e-3", "--set", "peak_flops=1e11"]


def torchrun(*args, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "samovar", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def losses(run):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"]), r["val_loss"]) for r in csv.DictReader(f)]


def weights(run):
    return load_file(run / "checkpoints" / "step-0000008" / "model.safetensors")


@pytest.mark.parametrize("strategy, shape", [
    ("ddp", ["--set", "batch_size=4", "--set", "grad_accum=2"]),  # whole micro-batches per rank
    ("ddp", ["--set", "batch_size=4", "--set", "grad_accum=1"]),  # half of each batch's rows per rank
    ("fsdp", ["--set", "batch_size=2", "--set", "grad_accum=2"]),
])
def test_two_processes_follow_the_single_process_curve(tmp_path, char_data, strategy, shape):
    single = run_cli("train", "--data", char_data, "--out", tmp_path / "one", *COMMON, *shape)
    assert single.returncode == 0, single.stderr
    multi = torchrun("train", "--data", char_data, "--out", tmp_path / "two", *COMMON, *shape,
                     "--set", f"strategy={strategy}")
    assert multi.returncode == 0, multi.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-0000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == list(range(1, 9))  # rank 0 alone logs
    for (_, a, va), (_, b, vb) in zip(one, two):
        assert a == pytest.approx(b, abs=1e-4)
        assert (va == "") == (vb == "") and (va == "" or float(va) == pytest.approx(float(vb), abs=1e-4))
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        # 8 Adam steps at lr 3e-3 move a weight by up to ~2e-2; Adam's m / sqrt(v) can turn a last-bit
        # difference of an all-reduced, near-zero gradient into ~1e-5 of that motion
        torch.testing.assert_close(w1[k], w2[k], atol=3e-5, rtol=1e-4)


def test_fsdp_run_resumes(tmp_path, char_data):
    shape = ["--set", "batch_size=2", "--set", "grad_accum=2", "--set", "strategy=fsdp"]
    full = torchrun("train", "--data", char_data, "--out", tmp_path / "run", *COMMON, *shape)
    assert full.returncode == 0, full.stderr[-3000:]
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000008")
    again = torchrun("train", "--data", char_data, "--resume", tmp_path / "run", *COMMON, *shape)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [s for s, _, _ in losses(tmp_path / "run")]
    assert steps == list(range(1, 9))


def test_a_batch_that_does_not_split_fails_before_training(tmp_path, char_data):
    result = torchrun("train", "--data", char_data, "--out", tmp_path / "run", *COMMON,
                      "--set", "batch_size=3", "--set", "grad_accum=1")
    assert result.returncode != 0
    assert "cannot be split evenly over 2 processes" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
