"""Shared fixtures: tiny real corpora, prepared data folders, and the path to ../shared/data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SAMOVAR_SHARED_DATA", ROOT.parent / "shared" / "data"))
# dtype "auto" means bf16 on a CPU with native bf16 (runtime.resolve_dtype): the suite's numerical
# comparisons pin it to fp32 here and in the commands it runs (test_train tests auto itself)
os.environ.setdefault("SAMOVAR_DTYPE", "fp32")


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


# ---- serving: a tiny chat model and `samovar serve` around it ------------------------------------------
PAIRS = [("привет", "здравствуй!"), ("как дела?", "хорошо, спасибо."), ("кто ты?", "я самовар, я кипячу чай."),
         ("что ты умеешь?", "заваривать чай и болтать."), ("пока", "до встречи!")]


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A tiny chat model that has learned a few exchanges (so it answers, and ends its turns)."""
    import torch

    from samovar.chat import add_chat_tokens, render
    from samovar.checkpoint import save_checkpoint
    from samovar.config import get_preset
    from samovar.model import Transformer
    from samovar.tokenizer import Tokenizer

    corpus = " ".join(q + " " + a for q, a in PAIRS) + " the quick brown fox jumps over the lazy dog"
    tok = add_chat_tokens(Tokenizer.train("char", [corpus]))
    ids = []
    for q, a in PAIRS * 4:
        ids += render(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])[0]
    torch.manual_seed(0)
    model = memorize(Transformer(get_preset("llama-tiny").replace(vocab_size=tok.vocab_size, context_len=128)),
                     ids, steps=200)
    folder = tmp_path_factory.mktemp("chat_model") / "samovar-chat"
    save_checkpoint(folder, model, tok)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc, output=lambda: "", seconds: float = 120) -> None:
    """Wait for a server process to answer GET /health with 200 (failing with its output if it exits)."""
    import httpx

    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, output()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"{url} did not start"
        time.sleep(0.2)


class Server:
    """`samovar serve FOLDER OPTIONS` in a subprocess on a free port of 127.0.0.1, started and healthy."""

    def __init__(self, folder, *options, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(folder.parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "samovar", "serve", str(folder), "--port", str(self.port),
                                      "--device", "cpu", *map(str, options)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        wait_until_healthy(self.url, self.proc, self.output)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health").json()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
