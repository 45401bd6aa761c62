"""Phase 1: read, clean and hash one unit; stage the cleaned samples (tar) and one row per input (parquet).

The stage table holds every input of the unit in input order, kept candidates and rejections alike, with the
hashes phase 2 needs to resolve duplicates across the whole run. The tar is published first and the table last,
so a table on storage means a complete unit: a rerun after a kill redoes only units without one.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import put_bytes
from pipeline.ingest.clean import Rejected, clean_image
from pipeline.ingest.config import CleanConfig
from pipeline.ingest.layout import Layout
from pipeline.ingest.readers import RawItem, read_unit
from pipeline.ingest.sources import Unit
from pipeline.ingest.writer import write_shard

OK = "ok"


def key_for(source: str) -> str:
    """Stable, unique-per-identity key: 20 hex chars (no dots, so WebDataset and DALI split extensions cleanly)."""
    return hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


@dataclass(frozen=True)
class StageTask:
    unit: Unit
    layout: Layout
    clean: CleanConfig
    image_column: str | None
    label_column: str | None
    storage_options: dict


@dataclass(frozen=True)
class StageResult:
    unit: int
    inputs: int


def run_stage(task: StageTask) -> StageResult:
    rows: list[dict] = []
    samples: list[tuple[str, dict[str, bytes]]] = []
    keys: set[str] = set()
    items = read_unit(task.unit, task.clean.max_bytes, task.image_column, task.label_column, task.storage_options)
    for item in items:
        row = _process(item, task.clean)
        if row["status"] == OK and row["key"] in keys:
            row.update(status="duplicate_source", detail="same source identity listed twice")
        if row["status"] == OK:
            keys.add(row["key"])
            samples.append((row["key"], row.pop("_parts")))
        row.pop("_parts", None)
        rows.append(row)
    offsets = {}
    if samples:
        info = write_shard(task.layout.stage_tar(task.unit.index), samples, task.storage_options, write_index=False)
        offsets = {key: {c.ext: (c.offset, c.size) for c in comps} for key, comps in zip(info.keys, info.components)}
    for row in rows:
        for ext in ("jpg", "json", "cls"):
            row[f"{ext}_offset"], row[f"{ext}_size"] = offsets.get(row["key"], {}).get(ext, (-1, -1))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=STAGE_SCHEMA), buf)
    put_bytes(task.layout.stage_table(task.unit.index), buf.getvalue(), task.storage_options)
    return StageResult(task.unit.index, len(rows))


def _process(item: RawItem, cfg: CleanConfig) -> dict:
    row = {"key": key_for(item.source), "source": item.source, "label": item.label, "caption": item.caption,
           "status": OK, "detail": "", "width": 0, "height": 0, "bytes": 0, "sha256": "", "phash": 0,
           "pixel_hash": b""}
    if item.reject is not None:
        row["status"], row["detail"] = item.reject
        return row
    try:
        img = clean_image(item.data, cfg)
    except Rejected as r:
        row["status"], row["detail"] = r.reason, r.detail
        return row
    except Exception as e:  # noqa: BLE001 - a Pillow bug on a hostile file must not end the run
        row["status"], row["detail"] = "decode_error", f"{type(e).__name__}: {e}"[:300]
        return row
    sha = hashlib.sha256(img.jpeg).hexdigest()
    meta = {"key": row["key"], "source": item.source, "original_width": img.original_width,
            "original_height": img.original_height, "width": img.width, "height": img.height, "sha256": sha,
            "phash": f"{img.phash:016x}"}
    if item.caption is not None:
        meta["caption"] = item.caption
    if item.label >= 0:
        meta["label"] = item.label
    parts = {"jpg": img.jpeg, "json": json.dumps(meta, ensure_ascii=False).encode()}
    if item.label >= 0:
        parts["cls"] = str(item.label).encode()
    row.update(width=img.width, height=img.height, bytes=len(img.jpeg), sha256=sha, phash=img.phash,
               pixel_hash=img.pixel_hash, _parts=parts)
    return row


STAGE_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("label", pa.int64()), ("caption", pa.string()),
    ("status", pa.string()), ("detail", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("phash", pa.uint64()), ("pixel_hash", pa.binary()),
    ("jpg_offset", pa.int64()), ("jpg_size", pa.int64()), ("json_offset", pa.int64()), ("json_size", pa.int64()),
    ("cls_offset", pa.int64()), ("cls_size", pa.int64()),
])
