import json

import numpy as np
import pytest
import torch

from samovar.data import DataError, TokenData, prepare, split_for_encoding
from samovar.tokenizer import Tokenizer

from conftest import shared_file


def test_prepare_writes_bins_and_meta(tmp_path, small_text):
    (tmp_path / "a.txt").write_text(small_text, encoding="utf-8")
    meta = prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer="char")
    out = tmp_path / "out"
    assert meta["shards"] == [{"file": "tokens-00000.bin", "tokens": len(small_text)}]
    train = np.fromfile(out / "tokens-00000.bin", dtype=np.uint16)[:meta["train_tokens"]]
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert len(train) + len(val) == len(small_text)
    assert len(val) == int(len(small_text) * 0.1)  # the tail of the corpus, as nanoGPT splits it
    tok = Tokenizer.load(out / "tokenizer.json")
    assert tok.decode(val.tolist()) == small_text[len(train):]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["val_bytes"] == len(small_text[len(train):].encode())


def test_folders_jsonl_and_document_separators(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "one.txt").write_text("first document " * 40)
    (docs / "sub" / "two.txt").write_text("second document\r\n" * 40)  # CRLF becomes LF
    (docs / "more.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 20}) for i in range(5)))
    meta = prepare([docs], tmp_path / "out", tokenizer="char")
    assert meta["documents"] == 7 and len(meta["sources"]) == 3
    data = TokenData.open(tmp_path / "out")
    tok = data.tokenizer()
    ids = np.concatenate([data.train, data.val]).tolist()
    assert ids.count(tok.eos_id) == 6
    assert "\r" not in tok.decode(ids)


def test_uint32_when_the_vocabulary_is_large(tmp_path):
    words = " ".join(f"w{i}" for i in range(70_000))
    (tmp_path / "big.txt").write_text(words)
    meta = prepare([tmp_path / "big.txt"], tmp_path / "out", tokenizer="word")
    assert meta["vocab_size"] > 65536 and meta["dtype"] == "uint32"
    data = TokenData.open(tmp_path / "out")
    assert data.train.dtype == np.uint32 and int(data.train[:].max()) > 65535


def test_bpe_prepare_equals_one_string_encoding(tmp_path):
    text = shared_file("russian_novels/Pushkin_CapitanskaaDochka.txt").read_bytes().decode("utf-8")
    text = text.replace("\r\n", "\n")
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    prepare([tmp_path / "p.txt"], tmp_path / "out", tokenizer="bpe", vocab_size=2000)
    data = TokenData.open(tmp_path / "out")
    tok = data.tokenizer()
    ids = np.concatenate([data.train, data.val]).tolist()
    assert ids == tok.hf.encode(text, add_special_tokens=False).ids
    assert len(split_for_encoding(text)) > 1  # the chunked, parallel path was taken


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe bad bytes \xc3\x28", "is not UTF-8"),
    (b"", "the corpus is empty"),
    (b"   \n\n  ", "the corpus is empty"),
    (b"tiny", "too short"),
])
def test_bad_corpora_get_one_clear_error(tmp_path, content, message):
    (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare([tmp_path / "c.txt"], tmp_path / "out", tokenizer="char")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_inputs_and_malformed_jsonl(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: malformed JSON"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        prepare([tmp_path / "empty_dir"], tmp_path / "out")


def test_corpus_shorter_than_a_context(tmp_path, small_text):
    (tmp_path / "c.txt").write_text(small_text[:3000])
    with pytest.raises(DataError, match="fewer than one context of 513"):
        prepare([tmp_path / "c.txt"], tmp_path / "out", context_len=512)
    prepare([tmp_path / "c.txt"], tmp_path / "out")
    with pytest.raises(DataError, match="val.bin has 300 tokens, fewer than one context"):
        TokenData.open(tmp_path / "out").check_context(512)


def test_batches_are_shifted_windows_and_reproducible(char_data):
    data = TokenData.open(char_data)
    x, y = data.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    x2, _ = data.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    seen = sum(b[0].numel() for b in data.sequential_batches("val", 8, 16))
    assert seen == (len(data.val) - 1) // 16 * 16


def test_open_refuses_folders_without_tokens(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TokenData.open(tmp_path / "none")
    with pytest.raises(DataError, match="no meta.json"):
        TokenData.open(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(DataError, match="no tokens in train.bin"):
        TokenData.open(tmp_path)


def test_chunked_parallel_bpe_equals_one_string_at_blank_lines(tmp_path):
    """Pieces are cut only after a lone newline or before a single space between words: "\\n\\n" at the
    end of a piece would pre-tokenize as one whitespace run, but as two pieces inside the whole text."""
    from samovar.data import encode_documents

    text = "".join(f"T: line {i}\nQ: what {i}?\nA: word{i % 7}\n\n" for i in range(6000))
    tok = Tokenizer.train("bpe", [text], vocab_size=600)
    pieces = split_for_encoding(text, target=4096)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert all((p.endswith("\n") and not p.endswith("\n\n")) or (not p[-1].isspace() and q[0] == " " != q[1])
               for p, q in zip(pieces, pieces[1:]))
    assert encode_documents(tok, [text]) == tok.hf.encode(text, add_special_tokens=False).ids


def test_real_qa_corpus_prepares_to_the_one_string_ids(tmp_path):
    text = shared_file("ru_qa/premise_question_answer6.txt").read_text(encoding="utf-8")[:1_500_000]
    (tmp_path / "qa.txt").write_text(text, encoding="utf-8")
    prepare([tmp_path / "qa.txt"], tmp_path / "out", tokenizer="bpe", vocab_size=3000)
    data = TokenData.open(tmp_path / "out")
    ids = np.concatenate([data.train, data.val]).tolist()
    assert ids == data.tokenizer().hf.encode(text, add_special_tokens=False).ids


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"document {i}: " + "Мороз и солнце; " * 30 for i in range(6)]
    pq.write_table(pa.table({"text": texts, "id": list(range(6))}), tmp_path / "docs.parquet")
    meta = prepare([tmp_path / "docs.parquet"], tmp_path / "out", tokenizer="char")
    assert meta["documents"] == 6
    data = TokenData.open(tmp_path / "out")
    tok = data.tokenizer()
    assert tok.decode(np.concatenate([data.train, data.val]).tolist()) == "<|eos|>".join(texts)
    pq.write_table(pa.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="cannot read a 'text' column"):
        prepare([tmp_path / "bad.parquet"], tmp_path / "out2")
