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
