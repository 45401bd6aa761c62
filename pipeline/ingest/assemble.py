"""Phase 4: write one final shard, its DALI index and its manifest part from its samples' staged bytes.

Shard i holds kept samples [i*S, (i+1)*S) in input order; the driver hands it the slices of the resolved group
tables that hold them (a prefix sum over the groups' kept counts), so its content is fixed by phase 3 alone and a
rerun writes the same bytes. Each stage tar a shard touches is opened once and read forward (ranged reads on an
object store). The shard's done mark is written after the tar, so a kill between the two only rewrites the shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import put_table, url_to_fs
from pipeline.ingest.done import mark_done, read_done
from pipeline.ingest.layout import Layout
from pipeline.ingest.resolve import RESOLVED_ROW_GROUP
from pipeline.ingest.writer import write_shard

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("phash", pa.uint64()), ("source", pa.string()),
    ("label", pa.int64()), ("caption", pa.string()),
])


@dataclass(frozen=True)
class ShardTask:
    index: int
    slices: tuple[tuple[int, int, int], ...]  # (group, first row, end row) of resolved tables, in input order
    layout: Layout
    storage_options: dict


def run_shard(task: ShardTask) -> dict:
    """Summary: {"samples": int, "bytes": int}."""
    done = read_done(task.layout, "shard", task.index, task.storage_options)
    if done is not None:
        return done
    rows = pa.concat_tables([_read_rows(task.layout.resolved(g), a, b, task.storage_options)
                             for g, a, b in task.slices]).to_pylist()
    info = write_shard(task.layout.shard(task.index), _samples(rows, task), task.storage_options)
    name = task.layout.shard_file(task.index)
    manifest = [{**{k: r[k] for k in MANIFEST_SCHEMA.names if k != "shard"}, "shard": name} for r in rows]
    put_table(task.layout.manifest_part(task.index), pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA),
              task.storage_options)
    return mark_done(task.layout, "shard", task.index, {"samples": info.num_samples, "bytes": info.num_bytes},
                     task.storage_options)


def _read_rows(url: str, start: int, end: int, storage_options: dict) -> pa.Table:
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        first, last = start // RESOLVED_ROW_GROUP, (end - 1) // RESOLVED_ROW_GROUP
        table = pq.ParquetFile(f).read_row_groups(list(range(first, last + 1)))
    return table.slice(start - first * RESOLVED_ROW_GROUP, end - start)


def _samples(rows: list[dict], task: ShardTask) -> Iterator[tuple[str, dict[str, bytes]]]:
    handle, current = None, None
    try:
        for row in rows:
            if row["unit"] != current:  # units appear in input order: each stage tar is opened once
                if handle is not None:
                    handle.close()
                fs, path = url_to_fs(task.layout.stage_tar(row["unit"]), task.storage_options)
                handle, current = fs.open(path, "rb"), row["unit"]
            parts = {}
            for m in row["members"]:
                handle.seek(m["offset"])
                parts[m["ext"]] = handle.read(m["size"])
            yield row["key"], parts
    finally:
        if handle is not None:
            handle.close()
