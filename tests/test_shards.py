"""`samovar prepare` of plain text: token shards written by worker processes, equal to encoding the
whole corpus at once, continued after a kill, read by the trainer as one stream; the tokenizer
trained on a sample; and the corpus pipeline from files to training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from samovar.data import TokenData, find_files, prepare, read_documents
from samovar.data.shards import ShardedTokens, sample_text
from samovar.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "tinyshakespeare").exists(), reason="../shared/data is absent")
CORPUS = [SHARED / "tinyshakespeare", SHARED / "russian_novels" / "Chekhov_Dama.txt"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    Tokenizer.train("bpe", read_documents([SHARED / "tinyshakespeare" / "input.txt"]), vocab_size=600).save(path)
    return path


def stream(folder: Path) -> np.ndarray:
    data = TokenData.open(folder)
    return np.concatenate([np.asarray(data.train), data.val])


def test_shards_from_two_workers_are_the_whole_corpus_encoded_at_once(tmp_path, bpe):
    meta = prepare(CORPUS, tmp_path / "sharded", tokenizer=str(bpe), workers=2, shard_mb=0.1)
    assert len(meta["shards"]) >= 10 and meta["documents"] == 2
    tok = Tokenizer.load(bpe)
    reference = []  # HF tokenizers, each document as one string, eos between documents
    for doc in read_documents(find_files(CORPUS)):
        reference += ([tok.eos_id] if reference else []) + tok.hf.encode(doc, add_special_tokens=False).ids
    assert stream(tmp_path / "sharded").tolist() == reference
    assert meta["train_tokens"] + meta["val_tokens"] == len(reference) == sum(s["tokens"] for s in meta["shards"])
    one = prepare(CORPUS, tmp_path / "one", tokenizer=str(bpe), workers=1)
    assert len(one["shards"]) == 1 and stream(tmp_path / "one").tolist() == reference
    assert {k: v for k, v in one.items() if k != "shards"} == {k: v for k, v in meta.items() if k != "shards"}


def test_windows_across_shard_boundaries_are_the_streams(tmp_path, bpe):
    prepare(CORPUS, tmp_path / "d", tokenizer=str(bpe), workers=2, shard_mb=0.05)
    data = TokenData.open(tmp_path / "d")
    whole = np.asarray(data.train)
    bounds = data.train.starts[1:-1]
    for b in bounds[:5]:
        assert np.array_equal(data.train[b - 7:b + 9], whole[b - 7:b + 9])
    x, y = data.batch("train", 64, 32, torch.Generator().manual_seed(0))
    starts = torch.randint(len(whole) - 32, (64,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.from_numpy(np.stack([whole[i:i + 32] for i in starts]).astype(np.int64)))
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert len(data.train) == data.meta["train_tokens"] < sum(s["tokens"] for s in data.meta["shards"])


def test_a_killed_prepare_keeps_its_finished_shards(tmp_path):
    corpus = [SHARED / "russian_novels"]
    args = [sys.executable, "-m", "samovar", "prepare", *map(str, corpus), "--tokenizer", "char", "--workers", "1",
            "--shard-mb", "0.05", "--out"]
    proc = subprocess.Popen(args + [str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    third = tmp_path / "killed" / "tokens-00003.bin"
    while not third.exists() and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "meta.json").exists()  # it was killed before the end
    kept = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "killed").glob("tokens-*.bin")}
    assert len(kept) >= 4
    again = subprocess.run(args + [str(tmp_path / "killed")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert all((tmp_path / "killed" / name).stat().st_mtime_ns == t for name, t in kept.items())
    subprocess.run(args + [str(tmp_path / "whole")], check=True, capture_output=True)
    assert np.array_equal(stream(tmp_path / "killed"), stream(tmp_path / "whole"))
    assert (tmp_path / "killed" / "tokenizer.json").read_bytes() == (tmp_path / "whole" / "tokenizer.json").read_bytes()
    # other arguments into the same folder start afresh rather than mixing two runs
    subprocess.run(args[:-1] + ["--val-fraction", "0.2", "--tokenizer-sample-mb", "1", "--out",
                                str(tmp_path / "killed")], check=True, capture_output=True)
    assert json.loads((tmp_path / "killed" / "prepare.json").read_text())["sample_bytes"] == 1 << 20


def test_the_tokenizer_trains_on_a_sample(tmp_path):
    files = sorted((SHARED / "russian_novels").glob("*.txt"))
    total = sum(f.stat().st_size for f in files)
    sample = sample_text(files, budget=total // 10)
    size = sum(len(p.encode()) for p in sample)
    assert 0.05 * total < size < 0.2 * total
    last = files[-1].read_text(encoding="utf-8")
    assert any(p in last for p in sample[-3:])  # the sample reaches the last file
    meta = prepare(files, tmp_path / "out", tokenizer="bpe", vocab_size=800, sample_mb=size / 2**20 / 2)
    assert meta["unknown_tokens"] == 0  # byte-level BPE encodes any text
    run = subprocess.run([sys.executable, "-m", "samovar", "prepare", *map(str, files), "--tokenizer", "char",
                          "--tokenizer-sample-mb", "0.01", "--out", str(tmp_path / "char")], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "<|unk|>" in run.stdout  # a rare character the sample missed is reported


def test_an_ingested_deduplicated_corpus_prepares_and_trains(tmp_path):
    """The whole pipeline from the command line: files -> ingest -> dedup -> prepare -> train."""
    def samovar(*args):
        run = subprocess.run([sys.executable, "-m", "samovar", *map(str, args)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout

    copies = tmp_path / "copies"
    copies.mkdir()
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()
    for i in range(3):  # the same play three times: two are exact duplicates
        (copies / f"play{i}.txt").write_text(text[:200_000])
    samovar("data", "ingest", copies, SHARED / "russian_novels" / "Chekhov_Dama.txt", "--out", tmp_path / "ingested")
    assert "2 exact" in samovar("data", "dedup", tmp_path / "ingested", "--out", tmp_path / "unique")
    out = samovar("prepare", tmp_path / "unique", "--tokenizer", "bpe", "--vocab-size", "400", "--shard-mb", "0.1",
                  "--out", tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["documents"] == 2 and len(meta["shards"]) >= 3 and "shard(s)" in out
    samovar("train", "--preset", "gpt2-tiny", "--data", tmp_path / "data", "--out", tmp_path / "run",
            *[a for kv in ("max_steps=3", "batch_size=2", "context_len=32", "eval_interval=3") for a in ("--set", kv)])
    assert (tmp_path / "run" / "metrics.csv").exists()


def test_a_changed_input_is_prepared_again_not_taken_from_old_shards(tmp_path, small_text):
    (tmp_path / "a.txt").write_text(small_text)
    prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer="char", shard_mb=0.001, workers=1)
    (tmp_path / "a.txt").write_text(small_text.upper())
    prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer="char", shard_mb=0.001, workers=1)
    data = TokenData.open(tmp_path / "out")
    assert data.tokenizer().decode(stream(tmp_path / "out").tolist()) == small_text.upper()


def test_bad_settings_are_one_line_errors(tmp_path):
    for option, value in (("--workers", "0"), ("--shard-mb", "-1"), ("--tokenizer-sample-mb", "0")):
        run = subprocess.run([sys.executable, "-m", "samovar", "prepare", str(SHARED / "tinyshakespeare"),
                              option, value, "--out", str(tmp_path / "o")], capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "must be positive" in run.stderr


def test_sharded_tokens_refuse_steps():
    with pytest.raises(IndexError):
        ShardedTokens([], np.uint16)[::2]
