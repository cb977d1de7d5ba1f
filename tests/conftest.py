"""Shared fixtures: tiny real corpora, prepared data folders, and the path to ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SAMOVAR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or a clean skip when the folder is absent (a user's machine)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared/data is only beside the project in CI)")
    return path


def memorize(model, ids: list[int], steps: int, context: int = 48):
    """Train `model` on random windows of `ids` until it knows them; returns it in eval mode."""
    import torch

    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        starts = torch.randint(len(data) - context - 1, (16,), generator=torch.Generator().manual_seed(step))
        batch = torch.stack([data[s:s + context + 1] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def small_text() -> str:
    """About 60 KB of real text: the start of tinyshakespeare, or a built-in passage without it."""
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")[:60_000]
    lines = [
        "To be, or not to be, that is the question:",
        "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,",
        "Or to take arms against a sea of troubles",
        "And by opposing end them. To die: to sleep;",
    ]
    return ("\n".join(lines) + "\n\n") * 250


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, small_text) -> Path:
    from samovar.data import prepare

    folder = tmp_path_factory.mktemp("char_data")
    (folder / "corpus.txt").write_text(small_text, encoding="utf-8")
    prepare([folder / "corpus.txt"], folder / "data", tokenizer="char")
    return folder / "data"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `samovar` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "samovar", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)
