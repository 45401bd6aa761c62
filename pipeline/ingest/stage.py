"""Phase 1: read, clean and hash one unit; stage the cleaned samples (tar) and one row per input (parquet).

The stage table holds every input of the unit in input order, kept candidates and rejections alike, with the
hashes dedup needs. The tar is published first and the table last, so a table on storage means a complete unit:
the task checks for it first and returns at once, so a rerun after a kill only pays for the units in flight.

A transient fault while reading (after the fetch layer's own retries) restarts the unit from its first input,
up to the retry policy's attempts; past that the task raises, and the engine quarantines the unit: no table is
written, so the next run retries it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import put_bytes_if_absent, url_to_fs
from pipeline.ingest.clean import Rejected, clean_image
from pipeline.ingest.config import CleanConfig
from pipeline.ingest.layout import Layout
from pipeline.ingest.readers import Item, RawItem, ReadOptions, read_archive, read_files, read_parquet
from pipeline.ingest.retry import TransientFailure, is_transient, retry
from pipeline.ingest.sources import read_part_rows
from pipeline.ingest.writer import write_shard

OK = "ok"
log = logging.getLogger(__name__)


def key_for(source: str) -> str:
    """Stable, unique-per-identity key: 20 hex chars (no dots, so WebDataset and DALI split extensions cleanly)."""
    return hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


@dataclass(frozen=True)
class StageTask:
    unit: int
    kind: str  # "files" | "archive" | "parquet"
    rows: tuple[tuple[str, int, int], ...]  # the unit's inputs: (listing part, first row, end row), in order
    file_rows: tuple[int, int]  # a parquet unit's rows of its file, [lo, hi); (-1, -1): all of them
    classes: tuple[str, ...]  # folder class names; a file's label is its class's index
    layout: Layout
    clean: CleanConfig
    dedup: str
    read: ReadOptions


def run_stage(task: StageTask) -> dict:
    """Summary: {"inputs": rows in the stage table, "seconds": time spent (0 when already staged)}."""
    start = time.perf_counter()
    fs, table_path = url_to_fs(task.layout.stage_table(task.unit), task.read.storage_options)
    if fs.exists(table_path):
        return {"inputs": _table_rows_and_meta(fs, table_path)[0], "seconds": 0.0}
    policy = task.read.policy
    for attempt in range(policy.attempts):
        tar = secrets.token_hex(6)
        try:
            rows = _stage_unit(task, tar)
            break
        except Exception as e:  # noqa: BLE001 - transient faults restart the unit; anything else propagates
            if not is_transient(e):
                raise
            if attempt == policy.attempts - 1:
                raise TransientFailure(f"unit {task.unit}", policy.attempts, e) from e
            time.sleep(policy.delay(attempt))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=STAGE_SCHEMA.with_metadata({STAGE_TAR_KEY: tar.encode()})), buf)
    # Published only if no other attempt of the unit has published its table: once map may have read a unit's table,
    # a late attempt (a worker left running by a killed driver, a task Ray reran) must not replace it with one whose
    # rows differ (URLs answer differently from one fetch to the next) and whose tar is another (review s16d).
    # Retried here: a transient fault of this last write would otherwise restage the unit whole (review s16c).
    table_url = task.layout.stage_table(task.unit)
    if not retry(lambda: put_bytes_if_absent(table_url, buf.getvalue(), task.read.storage_options), policy,
                 f"write {table_url}"):
        inputs, meta = retry(lambda: _table_rows_and_meta(fs, table_path), policy, f"read {table_url}")
        if meta.get(STAGE_TAR_KEY) != tar.encode():  # not this attempt's own write, answered late and retried
            _remove_tar(task.layout.stage_tar(task.unit, tar), task.read.storage_options, task.unit)
            return {"inputs": inputs, "seconds": round(time.perf_counter() - start, 3)}
    return {"inputs": len(rows), "seconds": round(time.perf_counter() - start, 3)}


def _table_rows_and_meta(fs, path: str) -> tuple[int, dict]:
    """A published stage table's row count and schema metadata (its footer only)."""
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f)
        return table.metadata.num_rows, table.schema_arrow.metadata or {}


def _remove_tar(url: str, storage_options: dict | None, unit: int) -> None:
    """This attempt's tar, which no table names: staging's removal at the end of the run would take it too."""
    try:
        fs, path = url_to_fs(url, storage_options)
        fs.rm_file(path)
    except Exception as e:  # noqa: BLE001 - left for staging's removal, which takes the whole folder
        log.warning("unit %d: another attempt published first; could not remove this attempt's tar %s (%s)",
                    unit, url, e)


def _stage_unit(task: StageTask, tar: str) -> list[dict]:
    """Clean every input as it arrives (fetched inputs in the order their fetches finish), streaming the kept
    candidates into the stage tar (memory: one sample, not the unit); returns one row per input, in input order,
    with where its members lie in the tar. Of the kept inputs with one identity (listed twice, or a tar that holds a
    member twice), the first in input order stays, whichever was cleaned first; the others are duplicate_source
    here, their staged bytes left unreferenced: left to dedup, they could still win its pixel-hash match against a
    later input with their pixels, which would then be lost with them (review s11)."""
    rows: dict[int, dict] = {}
    written: list[int] = []  # positions of the staged samples, in tar order

    def samples():
        for index, item in _items(task):
            row, parts = _process(item, task.clean, task.dedup)
            rows[index] = row
            if row["status"] == OK:
                written.append(index)
                yield row["key"], parts

    info = write_shard(task.layout.stage_tar(task.unit, tar), samples(), task.read.storage_options, write_index=False,
                       unique_keys=False)
    staged = dict(zip(written, info.components))
    ordered, kept = [rows[i] for i in sorted(rows)], set()
    for index, row in zip(sorted(rows), ordered):
        comps = staged.get(index, ())
        if row["status"] == OK and row["key"] in kept:
            row.update(status="duplicate_source", detail="same source identity listed twice")
            comps = ()
        elif row["status"] == OK:
            kept.add(row["key"])
        row["members"] = [{"ext": c.ext, "offset": c.offset, "size": c.size} for c in comps]
    return ordered


def _items(task: StageTask) -> Iterator[Item]:
    entries = [e for part, a, b in task.rows for e in read_part_rows(part, a, b, task.read.storage_options)]
    if task.kind == "files":
        index = {c: i for i, c in enumerate(task.classes)}
        return read_files([e["url"] for e in entries], [index.get(e["cls"], -1) for e in entries], task.read)
    if task.kind == "archive":
        return read_archive(entries[0]["url"], task.read)
    return read_parquet(entries[0]["url"], task.read, *task.file_rows)


def _process(item: RawItem, cfg: CleanConfig, dedup: str) -> tuple[dict, dict[str, bytes]]:
    row = {"key": key_for(item.source), "source": item.source, "label": item.label, "caption": item.caption,
           "status": OK, "detail": "", "width": 0, "height": 0, "bytes": 0, "sha256": "", "phash": 0,
           "pixel_hash": b""}
    if item.reject is not None:
        row["status"], row["detail"] = item.reject
        return row, {}
    try:
        img = clean_image(item.data, cfg, dedup)
    except Rejected as r:
        row["status"], row["detail"] = r.reason, r.detail
        return row, {}
    except Exception as e:  # noqa: BLE001 - a Pillow bug on a hostile file must not end the run
        row["status"], row["detail"] = "decode_error", f"{type(e).__name__}: {e}"[:300]
        return row, {}
    sha = hashlib.sha256(img.jpeg).hexdigest()
    meta = {"key": row["key"], "source": item.source, "original_width": img.original_width,
            "original_height": img.original_height, "width": img.width, "height": img.height, "sha256": sha}
    if dedup == "near":
        meta["phash"] = f"{img.phash:016x}"
    if item.caption is not None:
        meta["caption"] = item.caption
    if item.label >= 0:
        meta["label"] = item.label
    if item.meta is not None:
        meta["source_meta"] = item.meta
    parts = {"jpg": img.jpeg, "json": json.dumps(meta, ensure_ascii=False).encode()}
    if item.caption is not None:
        parts["txt"] = item.caption.encode("utf-8", "surrogatepass")
    if item.label >= 0:
        parts["cls"] = str(item.label).encode()
    row.update(width=img.width, height=img.height, bytes=len(img.jpeg), sha256=sha, phash=img.phash,
               pixel_hash=img.pixel_hash)
    return row, parts


# The stage table's metadata key naming its attempt's tar (Layout.stage_tar); absent in a table of a version that wrote
# one tar per unit.
STAGE_TAR_KEY = b"stage_tar_attempt"
MEMBER = pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
STAGE_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("label", pa.int64()), ("caption", pa.string()),
    ("status", pa.string()), ("detail", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("phash", pa.uint64()), ("pixel_hash", pa.binary()),
    ("members", pa.list_(MEMBER)),
])
