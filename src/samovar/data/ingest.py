"""A pile of files -> normalised documents in sharded Parquet: the corpus pipeline's first stage.

    samovar data ingest INPUT... --out DIR [--field text] [--min-chars 32] [--min-letters 0.5]

Inputs are read as streams, one record at a time, never a whole corpus in memory:
    text files (.txt, .md, ...)    a document a file (a file over 8 MiB: pieces cut at blank lines)
    JSONL                           a document a line: its --field (default "text")
    Parquet, CSV                    a document a row: its --field column (pyarrow reads Parquet in batches)
    any of them .gz or .zst         decompressed on the fly (.zst needs the zstandard package)

Each document is normalised (Unicode NFC; CRLF and CR -> LF; control characters, trailing spaces of
each line and runs of more than one blank line removed; no leading or trailing whitespace) and dropped,
with a count per reason, when it is not text (undecodable UTF-8, a NUL, control characters in more
than 0.1% of it; a malformed record),
shorter than --min-chars, or mostly not letters (fewer than --min-letters of its non-space characters).

Output: DIR/shard-00000.parquet, ... (columns text, source, id; about --shard-mb of text each), each
written atomically, and DIR/ingest.json: the inputs, counts, and where reading stopped. A run that
was killed continues from its last complete shard when started again with the same inputs.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from ..checkpoint import atomic_path, atomic_write_text
from .corpus import DataError, find_files, parquet_column

COMPRESSED = {".gz", ".zst"}
REASONS = ("not_text", "too_short", "mostly_non_letters")
PIECE = 8 << 20  # a text file larger than this is cut into documents at blank lines
CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
BLANK_RUNS = re.compile(r"\n{3,}")
TRAILING = re.compile(r"[ \t\u00a0]+\n")


@dataclass
class IngestOptions:
    field: str = "text"  # the JSONL field, Parquet or CSV column holding the text
    min_chars: int = 32
    min_letters: float = 0.5  # the share of letters among a document's non-space characters
    shard_bytes: int = 64 << 20  # UTF-8 bytes of text a shard holds (about)


@dataclass
class IngestState:
    """ingest.json: what was read, what was kept and dropped, and where to go on after a kill."""

    inputs: list[str]
    options: dict
    shards: int = 0
    next_file: int = 0  # the first record not in a complete shard: file number, record number
    next_record: int = 0
    documents: int = 0
    bytes: int = 0
    dropped: dict = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    finished: bool = False


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL.sub("", text)  # a stray control character (binary text was dropped before: why_dropped)
    text = TRAILING.sub("\n", text + "\n")
    return BLANK_RUNS.sub("\n\n", text).strip()


def why_dropped(raw: str | None, text: str | None, options: IngestOptions) -> str | None:
    """The reason to drop a document (raw: as read, text: normalised), or None to keep it. Text with
    a NUL or with control characters in more than one of a thousand characters is binary."""
    if raw is None or "\x00" in raw or len(CONTROL.findall(raw)) * 1000 > len(raw):
        return "not_text"
    if len(text) < options.min_chars:
        return "too_short"
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < options.min_letters * len(visible):
        return "mostly_non_letters"
    return None


# ---- reading ---------------------------------------------------------------------------------------------
def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_binary(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def records(path: Path, options: IngestOptions) -> Iterator[str | None]:
    """The file's documents in order, as raw text (None for a record that is not text)."""
    kind = _kind(path)
    if kind == ".parquet":
        yield from (v if isinstance(v, str) else None for v in parquet_column(path, options.field))
        return
    with _open_binary(path) as raw:
        if kind in (".jsonl", ".json"):
            for line in raw:
                if line.strip():
                    yield _jsonl_text(line, options.field)
        elif kind == ".csv":
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
            reader = csv.DictReader(text)
            if reader.fieldnames is None or options.field not in reader.fieldnames:
                raise DataError(f"{path} has no column {options.field!r} (give --field COLUMN)")
            for row in reader:
                value = row.get(options.field)
                yield None if value is None or "\ufffd" in value else value  # (undecodable bytes became U+FFFD)
        else:
            yield from _text_pieces(raw)


def _jsonl_text(line: bytes, name: str) -> str | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = record.get(name) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _text_pieces(raw) -> Iterator[str | None]:
    """A text file as one document, or pieces of about PIECE cut at blank lines; None when a piece is
    not UTF-8 (the rest of the file is then skipped: one undecodable file is one dropped document)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buffer, first = "", True
    while True:
        chunk = raw.read(1 << 20)
        try:
            buffer += decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError:
            yield None
            return
        if first:
            buffer, first = buffer.removeprefix("\ufeff"), False
        while len(buffer) > PIECE:
            cut = buffer.rfind("\n\n", 0, PIECE)
            cut = PIECE if cut <= 0 else cut + 2
            yield buffer[:cut]
            buffer = buffer[cut:]
        if not chunk:
            if buffer.strip():
                yield buffer
            return


# ---- writing ---------------------------------------------------------------------------------------------
def _write_shard(path: Path, rows: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(rows["text"], pa.string()), "source": pa.array(rows["source"], pa.string()),
                      "id": pa.array(rows["id"], pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def ingest(inputs: list[str | Path], out: str | Path, options: IngestOptions = IngestOptions(),
           progress: bool = False) -> IngestState:
    """Read `inputs` into shards under `out` (see the module's docstring); returns the final state.
    A folder holding an unfinished ingest of the same inputs continues it."""
    from tqdm.auto import tqdm

    files = find_files(inputs, suffixes=None)  # every file: the kind is told by the suffixes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _resume_state(out, files, options)
    for stale in out.glob("shard-*.parquet"):  # a shard written after the last saved state
        if int(stale.stem.split("-")[1]) >= state.shards:
            stale.unlink()
    rows = {"text": [], "source": [], "id": []}
    size = 0
    at = (state.next_file, state.next_record)
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, disable=not progress,
               desc="ingest")
    bar.update(sum(f.stat().st_size for f in files[:state.next_file]))
    for i in range(state.next_file, len(files)):
        file = files[i]
        for n, raw in _readable(file, records(file, options)):
            if (i, n) < at:
                continue  # in a shard of the run that was killed
            text = normalise(raw) if raw is not None else None
            reason = why_dropped(raw, text, options)
            if reason is not None:
                state.dropped[reason] += 1
            else:
                rows["text"].append(text)
                rows["source"].append(str(file))
                rows["id"].append(f"{file.name}:{n}")
                size += len(text.encode("utf-8"))
            if size >= options.shard_bytes:
                _flush(out, state, rows, size, (i, n + 1))
                rows, size = {"text": [], "source": [], "id": []}, 0
        bar.update(file.stat().st_size)
        bar.set_postfix(kept=f"{state.documents + len(rows['text']):,}", refresh=False)
    if rows["text"]:
        _flush(out, state, rows, size, (len(files), 0))
    state.next_file, state.next_record, state.finished = len(files), 0, True
    atomic_write_text(out / "ingest.json", json.dumps(asdict(state), indent=2) + "\n")
    bar.close()
    if not state.documents:
        raise DataError("no document was kept: " + ", ".join(f"{v:,} {k.replace('_', ' ')}"
                                                              for k, v in state.dropped.items() if v))
    return state


def _readable(file: Path, stream: Iterator) -> Iterator[tuple[int, str | None]]:
    """enumerate(stream), with a corrupt or truncated file's error as one DataError line."""
    n = 0
    try:
        for n, item in enumerate(stream):
            yield n, item
    except DataError:
        raise
    except Exception as e:  # gzip's, zstandard's and the csv module's own errors
        raise DataError(f"{file}: cannot read it past record {n}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _flush(out: Path, state: IngestState, rows: dict, size: int, next_at: tuple[int, int]) -> None:
    """A shard, then the state that counts it (a kill between the two leaves a shard the next run removes)."""
    _write_shard(out / f"shard-{state.shards:05d}.parquet", rows)
    state.shards += 1
    state.documents += len(rows["text"])
    state.bytes += size
    state.next_file, state.next_record = next_at
    atomic_write_text(out / "ingest.json", json.dumps(asdict(state), indent=2) + "\n")


def _resume_state(out: Path, files: list[Path], options: IngestOptions) -> IngestState:
    fresh = IngestState(inputs=[str(f) for f in files], options=asdict(options))
    saved_file = out / "ingest.json"
    if not saved_file.exists():
        return fresh
    try:
        saved = IngestState(**json.loads(saved_file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"cannot read {saved_file}: {e}") from None
    if saved.inputs != fresh.inputs or saved.options != fresh.options:
        raise DataError(f"{out} holds an ingest of other inputs or options: choose another --out")
    if saved.finished:
        raise DataError(f"{out} holds a finished ingest of these inputs: choose another --out")
    return saved
