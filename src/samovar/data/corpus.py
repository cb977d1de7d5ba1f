"""Reading corpora: text files, folders of them, JSONL ({"text": ...} per line) and Parquet (a
"text" column; needs pyarrow), as one string per document."""

from __future__ import annotations

import json
from pathlib import Path

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
    """One string per document: a whole text file, or each "text" of a JSONL file. CRLF -> LF."""
    docs = []
    for file in files:
        if file.suffix.lower() == ".parquet":
            docs.extend(_parquet_texts(file))
            continue
        text = read_text(file)
        if file.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_texts(file, text))
        elif text.strip():
            docs.append(text)
    if not any(d.strip() for d in docs):
        raise DataError("the corpus is empty: no text in " + ", ".join(str(f) for f in files[:3]))
    return docs


def read_text(file: Path) -> str:
    """A UTF-8 text file (its BOM dropped, CRLF as LF), or one clear error for a binary or other-encoded one."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if b"\0" in raw[:65536]:  # text in any 8-bit encoding has no NUL bytes; images and archives do
            raise DataError(f"{file} looks binary (it holds NUL bytes), not text: give text files") from None
        raise DataError(f"{file} is not UTF-8 text (bad byte at offset {e.start}); "
                        "convert it first, e.g. iconv -f cp1251 -t utf-8") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _jsonl_texts(file: Path, text: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{file}:{n}: expected an object with a "text" string')
        out.append(record["text"])
    return out


def _parquet_texts(file: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(file, columns=["text"])
    except Exception as e:  # pyarrow's own errors: a corrupt file, no "text" column
        raise DataError(f"{file}: cannot read a \"text\" column: {str(e).splitlines()[0]}") from None
    return [t.replace("\r\n", "\n") for t in table.column("text").to_pylist() if isinstance(t, str)]
