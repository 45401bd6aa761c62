"""The files of a shuffle: one parquet file per writing task, one row group per reading task.

A map task writes its records for every bucket into ONE file, a row group per bucket (in bucket order), and lists
the buckets in the file's metadata; a reduce task reads, from every map file, the footer and then only its own row
group (two ranged GETs). So a shuffle of G writers and B readers makes G objects, not G x B small ones: at 300M
images with ~1,200 groups and ~1,300 buckets that is the difference between 1,200 PUTs and 1.5M (and as many
fsyncs on a local disk). The same layout carries the losers back from the reduce tasks to the resolve tasks.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import atomic_writer, url_to_fs

_PARTS_KEY = b"canvit.parts"


def write_parts(url: str, table: pa.Table, part: np.ndarray, storage_options: dict) -> int:
    """Write `table`'s rows grouped by `part` ([N] int, one per row): one row group per part present.
    Returns the number of parts written."""
    order = np.argsort(part, kind="stable")
    parts, starts = np.unique(part[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    schema = table.schema.with_metadata({_PARTS_KEY: json.dumps([int(p) for p in parts]).encode()})
    with atomic_writer(url, storage_options) as f, pq.ParquetWriter(f, schema) as writer:
        for a, b in zip(starts, ends):
            writer.write_table(table.take(pa.array(order[a:b])).replace_schema_metadata(schema.metadata),
                               row_group_size=max(1, int(b - a)))
    return len(parts)


def read_part(url: str, part: int, schema: pa.Schema, storage_options: dict) -> pa.Table:
    """The rows of `part` in the file at `url` (none if the writer had none for it)."""
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        parts = json.loads(pf.schema_arrow.metadata[_PARTS_KEY])
        if part not in parts:
            return schema.empty_table()
        return pf.read_row_group(parts.index(part)).replace_schema_metadata(None)
