"""Reading corpora: text files, folders of them, JSONL ({"text": ...} per line) and Parquet (a
"text" column; needs pyarrow), as one string per document."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = {".txt", ".md", ".text", ".jsonl", ".parquet", ""}


class DataError(ValueError):
    pass


def find_files(inputs: list[str | Path], suffixes: set[str] | None = TEXT_SUFFIXES) -> list[Path]:
    """The files given, and those under the folders given (hidden ones left out), of `suffixes`
    only when it is not None."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and (suffixes is None or p.suffix.lower() in suffixes)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"folder {path} holds no " + ("files" if suffixes is None else
                                                             "text files (.txt, .md, .jsonl, .parquet)"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    return files


def read_documents(files: list[Path]) -> list[str]:
    """One string per document: a whole text file, or each "text" of a JSONL file or Parquet row. CRLF -> LF."""
    docs: list[list[str]] = []
    for first, piece in document_pieces(files):
        if first:
            docs.append([])
        docs[-1].append(piece)
    return ["".join(d) for d in docs]


def document_pieces(files: list[Path]) -> Iterator[tuple[bool, str]]:
    """The documents of read_documents streamed, in pieces of about 64 KB cut where encoding each on its
    own gives the ids of the whole (split_for_encoding): (True, piece) starts a document. A corpus of
    any size passes through in a few megabytes."""
    empty = True
    for file in files:
        suffix = file.suffix.lower()
        texts = (_parquet_texts(file) if suffix == ".parquet" else _jsonl_texts(file) if suffix == ".jsonl"
                 else _text_file(file))
        for text in texts:
            pieces = text if isinstance(text, Iterator) else iter(split_for_encoding(text))
            for n, piece in enumerate(pieces):
                empty = empty and not piece.strip()
                yield n == 0, piece
    if empty:
        raise DataError("the corpus is empty: no text in " + ", ".join(str(f) for f in files[:3]))


def _text_file(file: Path, chunk: int = 1 << 20) -> Iterator[Iterator[str]]:
    """A text file as one document (none when it is all whitespace), read a megabyte at a time."""
    with open(file, "rb") as f:
        head = f.read(chunk)
        if not head.removeprefix(b"\xef\xbb\xbf").strip():
            if not f.read(1):
                return
        yield _text_pieces(file, f, head, chunk)


def _text_pieces(file: Path, f, head: bytes, chunk: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    raw, buffer, offset = head, "", 0
    while True:
        try:
            buffer += decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise not_utf8(file, head, offset + e.start) from None
        if offset == 0:
            buffer = buffer.removeprefix("\ufeff")
        offset += len(raw)
        if not raw:
            if buffer:
                yield from split_for_encoding(buffer.replace("\r\n", "\n"))
            return
        held = buffer.endswith("\r")  # its \n may come with the next chunk
        pieces = split_for_encoding((buffer[:-1] if held else buffer).replace("\r\n", "\n"))
        yield from pieces[:-1]
        buffer = pieces[-1] + ("\r" if held else "")
        raw = f.read(chunk)


def read_text(file: Path) -> str:
    """A UTF-8 text file (its BOM dropped, CRLF as LF), or one clear error for a binary or other-encoded one."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(file, raw, e.start) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def not_utf8(file: Path, head: bytes, offset: int) -> DataError:
    """The error for a file that does not decode (`head`: its first bytes, `offset`: the bad one's)."""
    if b"\0" in head[:65536]:  # text in any 8-bit encoding has no NUL bytes; images and archives do
        return DataError(f"{file} looks binary (it holds NUL bytes), not text: give text files")
    return DataError(f"{file} is not UTF-8 text (bad byte at offset {offset}); "
                     "convert it first, e.g. iconv -f cp1251 -t utf-8")


def _jsonl_texts(file: Path) -> Iterator[str]:
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff") if n == 1 else raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{file}:{n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{file}:{n}: expected an object with a "text" string')
            yield record["text"]


def _parquet_texts(file: Path) -> Iterator[str]:
    for t in parquet_column(file, "text"):
        if isinstance(t, str):
            yield t.replace("\r\n", "\n")


def parquet_column(file: Path, name: str) -> Iterator:
    """The values of a Parquet file's column, read a batch of rows at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(file)
        if name not in table.schema_arrow.names:
            raise KeyError("no such column")
        for batch in table.iter_batches(columns=[name], batch_size=1024):
            yield from batch.column(0).to_pylist()
    except (OSError, ValueError, KeyError) as e:  # pyarrow's own errors: a corrupt file, no such column
        raise DataError(f"{file}: cannot read a {name!r} column: {str(e).splitlines()[0]}") from None


def split_for_encoding(text: str, target: int = 1 << 16) -> list[str]:
    """Cut `text` into ~64 KB pieces, before a single space between two non-space characters, or
    after a lone newline that follows a non-space character and is followed by one (or by a single
    space and one).

    The pre-tokenizers (GPT-2's, the word tokenizer's, and any character's) split the text there
    whether or not it goes on after the cut: a single space joins the word after it, and a lone
    newline at the end of a string is a piece of its own as it is inside one (a longer run of
    whitespace at the end would be one piece instead). So encoding the pieces separately gives the
    same ids as encoding the whole text, in parallel."""
    def boundary(i: int) -> bool:
        if text[i - 1] == "\n":
            return not text[i - 2].isspace() and (not text[i].isspace()
                                                  or (text[i] == " " and not text[i + 1].isspace()))
        return text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()

    pieces, start = [], 0
    while len(text) - start > target:
        cut = start + target
        while cut < len(text) - 2 and not boundary(cut):
            cut += 1
        if cut >= len(text) - 2:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
