"""A shuffle through storage: map tasks split their rows into buckets, each reduce task reads one whole bucket.

    PREFIX/bucket-000003/from-000017.parquet    rows of map task 17 that belong to bucket 3 (absent when none)
    PREFIX/done/from-000017                     written after all of map task 17's files: the task is complete

A bucket is a set of clusters (cluster % num_buckets), so a reduce task sees every member of its clusters, and
the bytes a worker holds are one bucket's (num_buckets is chosen from the row count, so a bucket fits a worker).
Reading a bucket concatenates its files in map-task order; reducers sort what they need by ordinal, so what a
reducer computes does not depend on which map task saw a row first.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.curate.records import runs
from pipeline.curate.storage import exists, list_files, put_bytes, read_table, write_table


def bucket_dir(prefix: str, bucket: int) -> str:
    return f"{prefix}/bucket-{bucket:06d}"


def _done_url(prefix: str, source: int) -> str:
    return f"{prefix}/done/from-{source:06d}"


def map_done(prefix: str, source: int, storage_options: dict) -> bool:
    return exists(_done_url(prefix, source), storage_options)


def write_buckets(table: pa.Table, buckets: np.ndarray, prefix: str, source: int, storage_options: dict) -> None:
    """Split `table` by `buckets` ((N,) int bucket per row) into the bucket folders, then mark map task `source` done."""
    order = np.argsort(buckets, kind="stable")
    table, buckets = table.take(pa.array(order)), buckets[order]
    for start, end in runs(buckets):
        write_table(f"{bucket_dir(prefix, int(buckets[start]))}/from-{source:06d}.parquet",
                    table.slice(start, end - start), storage_options)
    put_bytes(_done_url(prefix, source), b"", storage_options)


def read_bucket(prefix: str, bucket: int, schema: pa.Schema, storage_options: dict) -> pa.Table:
    """Every row sent to `bucket`, in map-task order (an empty table with `schema` when none was)."""
    files = list_files(bucket_dir(prefix, bucket), storage_options, ".parquet")
    tables = [read_table(f, storage_options) for f in files]
    return pa.concat_tables(tables) if tables else schema.empty_table()
