"""The benchmark scripts run (on tiny settings); their figures live in benchmarks/RESULTS.md."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_memmap_memory_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memmap_memory.py"), "--gigabytes", "0.05",
                             "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "peak resident memory" in result.stdout


def test_decode_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--configs", "tiny",
                             "--new-tokens", "16", "--repeats", "1", "--compile", "--bf16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for row in ("samovar compiled", "samovar bf16 compiled", "x HF", "bf16 compiled agrees with float32"):
        assert row in result.stdout


def test_aot_step_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_step.py"), "--configs", "tiny",
                             "--new-tokens", "8", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "logits and written keys agree" in result.stdout and "x the compiled step's steps/s" in result.stdout


def test_eager_floor_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eager_floor.py"), "--configs", "tiny",
                             "--new-tokens", "16", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "greedy tokens equal the Engine's" in result.stdout and "lean step, 7 products" in result.stdout


def test_train_step_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--tiny", "--steps", "1",
                             "--repeats", "1", "--context", "32", "--batch", "2", "--bf16"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "MFU" in result.stdout and "under bf16 autocast" in result.stdout


def test_prepare_benchmark_runs(tmp_path):
    (tmp_path / "a.txt").write_text("Мороз и солнце; день чудесный!\nTo be, or not to be.\n" * 400)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepare.py"), "--data", str(tmp_path),
                             "--vocab-size", "400", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ids identical" in result.stdout


def test_int8_benchmark_runs(tmp_path):
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    assert run_cli("prepare", tmp_path / "text.txt", "--tokenizer", "char", "--out", tmp_path / "data").returncode == 0
    trained = run_cli("train", "--preset", "llama-tiny", "--data", tmp_path / "data", "--out", tmp_path / "run",
                      "--set", "max_steps=5", "--set", "context_len=32", "--set", "batch_size=4", "--set", "device=cpu")
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8.py"), str(tmp_path / "run"),
                             "--data", str(tmp_path / "text.txt"), "--max-tokens", "500", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "int8 cost: perplexity" in result.stdout and "int8wo cost: perplexity" in result.stdout


def test_head_loss_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "head_loss.py"), "--tiny", "--repeats", "1",
                             "--batch", "2", "--context", "32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "samovar/HF: memory" in result.stdout


def test_sft_benchmark_runs():
    from conftest import shared_file

    shared_file("ru_dialogues/anekdot_dialogues.txt")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sft.py"), "--steps", "2", "--batch", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pack=true" in result.stdout and "pack=false" in result.stdout and "x real tokens per second" in result.stdout


@pytest.mark.slow
def test_russian_chat_benchmark_runs_the_whole_path(tmp_path):
    from conftest import shared_file

    shared_file("ru_qa/premise_question_answer6.txt")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "russian_chat.py"), "--work", str(tmp_path),
                             "--pretrain-minutes", "0.2", "--sft-minutes", "0.1", "--examples", "10",
                             "--report", str(tmp_path / "report.md")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "LSTM seq2seq baseline" in report and "always the most frequent answer" in report
    assert report.count("> ") >= 3 and "cleaned validation" in report
