"""`samovar speedrun` runs a recipe end to end and prints its result line (a tiny run: no timing asserted)."""

import re

from conftest import run_cli, shared_file


def test_speedrun_prints_time_to_target_and_whole_split_loss(tmp_path):
    corpus = shared_file("tinyshakespeare/input.txt")
    result = run_cli("speedrun", "--data", corpus, "--out", tmp_path / "sr", "--set", "max_steps=30",
                     "--set", "warmup_steps=5", "--target-loss", "3.5", "--seed", "1")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"time_to_target_s=(\S+) final_val_loss=(\S+)", last)
    assert m, last
    assert float(m.group(1)) < 120 and 2.0 < float(m.group(2)) < 3.5  # learned something in 30 steps
    meta = (tmp_path / "sr" / "data" / "meta.json").read_text()
    assert '"vocab_size": 65' in meta  # nanoGPT's vocabulary and split


def test_speedrun_misses_are_inf(tmp_path):
    corpus = shared_file("tinyshakespeare/input.txt")
    result = run_cli("speedrun", "--data", corpus, "--out", tmp_path / "sr", "--set", "max_steps=3",
                     "--set", "warmup_steps=1", "--target-loss", "0.5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("time_to_target_s=inf ")


def test_speedrun_refuses_a_missing_corpus(tmp_path):
    result = run_cli("speedrun", "--data", tmp_path / "nope.txt", "--out", tmp_path / "sr")
    assert result.returncode == 2 and "does not exist" in result.stderr
