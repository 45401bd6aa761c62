"""The files of a shuffle: one parquet file per writing task, one row group per reading task.

A map task writes its records for every bucket into ONE file, a row group per bucket (in bucket order), and lists
the buckets in the file's metadata; a reduce task reads, from every map file, the footer and then only its own row
group (two ranged GETs). So a shuffle of G writers and B readers makes G objects, not G x B small ones: at 300M
images with ~1,200 groups and ~1,300 buckets that is the difference between 1,200 PUTs and 1.5M (and as many
fsyncs on a local disk). The same layout carries the losers back from the reduce tasks to the resolve tasks.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import atomic_writer, url_to_fs

_PARTS_KEY = b"canvit.parts"
_READ_THREADS = 16


def write_parts(url: str, table: pa.Table, part: np.ndarray, storage_options: dict) -> int:
    """Write `table`'s rows grouped by `part` ([N] int, one per row): one row group per part present.
    Returns the number of parts written."""
    order = np.argsort(part, kind="stable")
    parts, starts = np.unique(part[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    schema = table.schema.with_metadata({_PARTS_KEY: json.dumps([int(p) for p in parts]).encode()})
    # One take of the whole table, then zero-copy slices: a take per part would cost the whole table each time.
    ordered = table.take(pa.array(order)).replace_schema_metadata(schema.metadata)
    with atomic_writer(url, storage_options) as f, pq.ParquetWriter(f, schema) as writer:
        for a, b in zip(starts, ends):
            writer.write_table(ordered.slice(a, b - a), row_group_size=max(1, int(b - a)))
    return len(parts)


def read_parts(urls: list[str], part: int, schema: pa.Schema, storage_options: dict) -> pa.Table:
    """The rows of `part` from every writer's file, in the order of `urls`. A thread pool hides the latency of the
    ~2 x len(urls) small reads (a reducer reads from every group: a thousand files at 300M images)."""
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        tables = list(pool.map(lambda url: read_part(url, part, schema, storage_options), urls))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_part(url: str, part: int, schema: pa.Schema, storage_options: dict) -> pa.Table:
    """The rows of `part` in the file at `url` (none if the writer had none for it)."""
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        parts = json.loads(pf.schema_arrow.metadata[_PARTS_KEY])
        if part not in parts:
            return schema.empty_table()
        return pf.read_row_group(parts.index(part)).replace_schema_metadata(None)
