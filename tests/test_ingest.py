"""`samovar data ingest`: every input format streamed in, normalised, filtered with counts per reason,
written as atomic Parquet shards, and continued exactly after a SIGKILL."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
import unicodedata

import pytest

from conftest import SHARED_DATA, run_cli
from samovar.data import DataError
from samovar.data.ingest import IngestOptions, ingest, normalise

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

LONG = "Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный."


def texts(folder) -> list[dict]:
    return [row for shard in sorted(folder.glob("shard-*.parquet")) for row in pq.read_table(shard).to_pylist()]


def test_every_format_is_read_normalised_and_filtered_with_reasons(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    nfd = unicodedata.normalize("NFD", "Ёлка и йод: " + LONG)
    (src / "a.txt").write_bytes((nfd + "  \r\nвторая строка\r\n\r\n\r\n\r\nтретья").encode("utf-8"))
    lines = [{"body": LONG + " (1)"}, {"body": "коротко"}, {"body": "1234 5678 9012 3456 7890 1234 5678 9012 !!"},
             {"other": LONG}, {"body": LONG + " (2)"}]
    jsonl = "\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\nnot json at all\n"
    with gzip.open(src / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(jsonl)
    (src / "sub" / "c.csv").write_text(f'body,n\n"{LONG} (3)",1\n"ok",2\n', encoding="utf-8")
    pq.write_table(pa.table({"body": [LONG + " (4)", None, "x" * 5]}), src / "sub" / "d.parquet")
    (src / "e.txt").write_bytes(b"\xff\xfe binary \x00\x01 junk" * 10)
    zstandard = pytest.importorskip("zstandard")
    (src / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        json.dumps({"body": LONG + " (5)"}, ensure_ascii=False).encode("utf-8")))
    result = run_cli("data", "ingest", src, "--out", tmp_path / "out", "--field", "body", "--shard-mb", "0.0001")
    assert result.returncode == 0, result.stderr
    rows = texts(tmp_path / "out")
    assert [r["text"] for r in rows] == [
        unicodedata.normalize("NFC", nfd) + "\nвторая строка\n\nтретья",
        LONG + " (1)", LONG + " (2)", LONG + " (5)", LONG + " (3)", LONG + " (4)"]
    assert rows[1]["id"] == "b.jsonl.gz:0" and rows[1]["source"].endswith("b.jsonl.gz")
    state = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert state["dropped"] == {"not_text": 4, "too_short": 3, "mostly_non_letters": 1}  # junk file, bad line,
    # no field, null cell; 'коротко', 'ok', 'xxxxx'; the digits
    assert state["documents"] == 6 and state["shards"] == 6 and state["finished"]
    assert "6 documents" in result.stdout and "4 not text, 3 too short, 1 mostly non letters" in result.stdout
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left
    again = run_cli("data", "ingest", src, "--out", tmp_path / "out", "--field", "body")
    assert again.returncode == 2 and "other inputs or options" in again.stderr


def test_normalise_is_idempotent_and_keeps_paragraphs():
    text = "a \t\r\nb\r\rc\n\n\n\nd  "
    assert normalise(text) == "a\nb\n\nc\n\nd"
    assert normalise(normalise(text)) == normalise(text)


def test_a_killed_ingest_continues_to_the_same_shards(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(4):
        with open(src / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            for n in range(6000):
                f.write(json.dumps({"text": f"{LONG} документ {k}-{n} " + "слово " * (n % 50)}, ensure_ascii=False)
                        + "\n")
    whole = ingest([src], tmp_path / "whole", IngestOptions(shard_bytes=200_000))
    cmd = [sys.executable, "-m", "samovar", "data", "ingest", str(src), "--out", str(tmp_path / "cut"),
           "--shard-mb", str(200_000 / (1 << 20))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "shard-00005.parquet").exists():
        assert time.time() < deadline and proc.poll() is None, "the ingest ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((tmp_path / "cut" / "ingest.json").read_text())
    assert not state["finished"] and 5 <= state["shards"] < whole.shards
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert texts(tmp_path / "cut") == texts(tmp_path / "whole")
    final = json.loads((tmp_path / "cut" / "ingest.json").read_text())
    assert final["documents"] == whole.documents == 24000 and final["dropped"] == whole.dropped


def test_bad_inputs_get_one_line(tmp_path):
    missing = run_cli("data", "ingest", tmp_path / "nope", "--out", tmp_path / "out")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "junk.txt").write_bytes(b"\x00\x01\x02" * 100)
    nothing = run_cli("data", "ingest", tmp_path / "junk.txt", "--out", tmp_path / "out2")
    assert nothing.returncode == 2 and "no document was kept: 1 not text" in nothing.stderr
    with pytest.raises(DataError, match="no column 'body'"):
        (tmp_path / "t.csv").write_text("text\nhello\n")
        ingest([tmp_path / "t.csv"], tmp_path / "out3", IngestOptions(field="body"))


def test_an_ingested_corpus_prepares_and_trains(tmp_path):
    novels = SHARED_DATA / "russian_novels"
    if not novels.is_dir():
        pytest.skip("reads ../shared/data/russian_novels")
    result = run_cli("data", "ingest", novels, "--out", tmp_path / "docs", "--shard-mb", "1")
    assert result.returncode == 0, result.stderr
    rows = texts(tmp_path / "docs")
    assert len(rows) >= 5 and all("\r" not in r["text"] for r in rows)
    prepared = run_cli("prepare", tmp_path / "docs", "--tokenizer", "char", "--out", tmp_path / "data")
    assert prepared.returncode == 0, prepared.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["documents"] == len(rows) == 5 and meta["train_tokens"] > 2_000_000  # the five novels, in chars
