"""What the corpus stages that keep some documents (dedup.py, quality.py) share: their input shards,
a work folder that a killed run continues, per-shard work in worker processes, and the kept rows
written shard by shard."""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..checkpoint import atomic_path, atomic_write_text
from .corpus import DataError, parquet_column


@dataclass
class StageReport:
    """What a stage that keeps some of a corpus's documents read and kept (the JSON file beside its shards)."""

    input: str
    documents: int = 0
    bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    resumed_shards: int = 0  # shards an earlier run, killed, had done


def shards_of(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give the output of `samovar data ingest`")
    shards = sorted(folder.glob("*.parquet"))
    if not shards:
        raise DataError(f"{folder} holds no Parquet shards: run `samovar data ingest` first")
    return shards


def open_work(folder: Path, shards: list[Path], out: Path, stage: str, settings: dict) -> Path:
    """out/.work, the stage's per-shard files. Those a killed run left are kept only when they were
    made from the same shards (name, size, modification time) with the same settings; a finished
    run in `out` (its report, <stage>.json, there), or `out` being the input, is refused."""
    if out.resolve() == folder.resolve():
        raise DataError("--out must be another folder than the input")
    if (out / f"{stage}.json").exists():
        raise DataError(f"{out} holds a finished {stage}: choose another --out")
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    record = {"input": [[str(s.resolve()), s.stat().st_size, s.stat().st_mtime_ns] for s in shards], **settings}
    saved = work / "run.json"
    try:
        same = json.loads(saved.read_text(encoding="utf-8")) == record if saved.exists() else True
    except json.JSONDecodeError:
        same = False
    if not same:
        for f in work.iterdir():
            f.unlink()
    atomic_write_text(saved, json.dumps(record) + "\n")
    return work


def each_shard(job: Callable[[Path, Path], int], shards: list[Path], work: Path, done_suffix: str, workers: int,
               progress: bool, desc: str, initializer=None, initargs=(), rate: str | None = None) -> tuple[int, int]:
    """job(shard, work) for each shard without its work file (stem + done_suffix) yet, in `workers`
    processes (each started with initializer(*initargs); one: here, started the same way), with a
    progress bar over the shards' sizes. Returns (shards done before, the sum of the jobs' results);
    `rate` names that sum per second on the bar."""
    from tqdm.auto import tqdm

    todo = [s for s in shards if not (work / f"{s.stem}{done_suffix}").exists()]
    bar = tqdm(total=sum(s.stat().st_size for s in shards), unit="B", unit_scale=True, disable=not progress, desc=desc)
    bar.update(sum(s.stat().st_size for s in shards if s not in todo))
    workers = max(1, min(workers, len(todo) or 1))
    pool = ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) if workers > 1 else None
    if pool is None and initializer is not None:
        initializer(*initargs)
    results = pool.map(job, todo, [work] * len(todo)) if pool else (job(s, work) for s in todo)
    total, start = 0, time.perf_counter()
    try:
        for shard, result in zip(todo, results):
            total += result
            bar.update(shard.stat().st_size)
            if rate:
                bar.set_postfix({rate: f"{total / (time.perf_counter() - start):,.0f}"}, refresh=False)
    finally:
        if pool:
            pool.shutdown()
        bar.close()
    return len(shards) - len(todo), total


def texts_at(shards: list[Path], wanted: set[int]) -> dict[int, str]:
    """The texts of the documents numbered `wanted` (in shard order), read until the last is found."""
    texts, doc = {}, 0
    for shard in shards:
        if len(texts) == len(wanted):
            break
        for text in parquet_column(shard, "text"):
            if doc in wanted:
                texts[doc] = text
            doc += 1
            if len(texts) == len(wanted):
                break
    return texts


def write_kept(shards: list[Path], out: Path, keep: np.ndarray, progress: bool) -> tuple[int, int, int]:
    """Each shard's kept rows into out/<the shard's name>, written batch by batch; returns the
    documents kept, and the bytes of text read and kept."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    doc, kept, read_bytes, kept_bytes = 0, 0, 0, 0
    for shard in tqdm(shards, desc="writing kept", disable=not progress):
        source = pq.ParquetFile(shard)
        with atomic_path(out / shard.name) as tmp:
            writer = pq.ParquetWriter(tmp, source.schema_arrow)
            for batch in source.iter_batches(batch_size=1024):
                mask = keep[doc:doc + batch.num_rows]
                doc += batch.num_rows
                lengths = pc.binary_length(batch.column(batch.schema.get_field_index("text")))
                read_bytes += int(pc.sum(lengths).as_py() or 0)
                kept_bytes += int(pc.sum(lengths.filter(pa.array(mask))).as_py() or 0)
                kept += int(mask.sum())
                writer.write_batch(batch.filter(pa.array(mask)))
            writer.close()
    return kept, read_bytes, kept_bytes
