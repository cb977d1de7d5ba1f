"""The benchmark scripts run (on tiny settings); their figures live in benchmarks/RESULTS.md."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memmap_memory_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memmap_memory.py"), "--gigabytes", "0.05",
                             "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "peak resident memory" in result.stdout


def test_decode_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--configs", "tiny",
                             "--new-tokens", "16", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ratio" in result.stdout


def test_train_step_benchmark_runs():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--tiny", "--steps", "1",
                             "--repeats", "1", "--context", "32", "--batch", "2"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "MFU" in result.stdout


def test_prepare_benchmark_runs(tmp_path):
    (tmp_path / "a.txt").write_text("Мороз и солнце; день чудесный!\nTo be, or not to be.\n" * 400)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepare.py"), "--data", str(tmp_path),
                             "--vocab-size", "400", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ids identical" in result.stdout
