"""How the curation reads and writes its artefacts on any fsspec URL: whole objects, published atomically with the
ingest's writer (pipeline/ingest/atomic.py: a hidden temporary name and a rename on local paths, one PUT on object
stores). So a file that exists is complete, and a killed task leaves either nothing or the whole file: a rerun skips
what exists."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import atomic_writer as atomic_file
from pipeline.ingest.atomic import put_bytes, url_to_fs


def get_bytes(url: str, storage_options: dict) -> bytes:
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: dict) -> bool:
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)


def list_files(prefix: str, storage_options: dict, suffix: str = "") -> list[str]:
    """URLs of the files directly under `prefix` ending in `suffix`, sorted by name ([] if there is no such folder)."""
    fs, path = url_to_fs(prefix, storage_options)
    if not fs.isdir(path):
        return []
    base = prefix.rstrip("/")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [f"{base}/{n}" for n in names if n.endswith(suffix) and not n.startswith(".")]


def remove(url: str, storage_options: dict) -> None:
    """Delete a file or a whole folder; nothing if absent."""
    fs, path = url_to_fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_table(url: str, table: pa.Table, storage_options: dict) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    put_bytes(url, buf.getvalue(), storage_options)


def read_table(url: str, storage_options: dict, columns: list[str] | None = None) -> pa.Table:
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def num_rows(url: str, storage_options: dict) -> int:
    """Rows of a parquet file, from its footer alone."""
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def concat_tables(urls: list[str], out_url: str, storage_options: dict, schema: pa.Schema) -> int:
    """Stream the parquet files `urls`, in order, into one parquet file at `out_url` (memory: one input at a time).
    Returns the number of rows."""
    rows = 0
    with atomic_file(out_url, storage_options) as f, pq.ParquetWriter(f, schema) as writer:
        for url in urls:
            table = read_table(url, storage_options).select(schema.names).cast(schema)
            writer.write_table(table)
            rows += table.num_rows
    return rows
