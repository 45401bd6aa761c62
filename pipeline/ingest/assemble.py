"""Phase 4: write one final shard, its DALI index and its manifest part from its samples' staged bytes.

Shard i holds kept samples [i*S, (i+1)*S) in input order; the driver hands it the slices of the resolved group
tables that hold them (a prefix sum over the groups' kept counts), so its content is fixed by phase 3 alone and a
rerun writes the same bytes. A stage tar's members are read in windows of rows, each window's byte ranges sorted,
merged and fetched together (a stage tar is in cleaning order, not input order). The shard's done mark is written
after the tar, so a kill between the two only rewrites the shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import merge_offset_ranges

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
    # promote: resolved tables of a version without their "attempt" column may sit beside this one's
    rows = pa.concat_tables([_read_rows(task.layout.resolved(g), a, b, task.storage_options)
                             for g, a, b in task.slices], promote_options="default").to_pylist()
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


READ_WINDOW = 256  # a unit's rows whose members are fetched together (~25 MB of 100 KB samples)
# Members of a window less than this apart are fetched in one ranged read: the gaps, other windows' members, are read
# for nothing (review s11b, simulated: 1.3-1.8x the tar's bytes at 1 MiB, 1.1-1.3x at 256 KiB).
MERGE_GAP = 256 << 10


def _samples(rows: list[dict], task: ShardTask) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The rows' staged members, in the rows' (input) order. A stage tar is in the order its unit's inputs were
    cleaned, which for fetched inputs is the order their fetches finished (stage.py), so reading it in input order
    would seek back and forth: through a file object's read-ahead block every backward seek fetches a new block (25x
    the tar's bytes, measured in review s11). Instead each window of READ_WINDOW rows of one unit has its members'
    byte ranges sorted and merged and fetched at once (concurrent ranged GETs on an object store), then sliced."""
    # A resolved table of a version without per-attempt tars has no "attempt": its unit's one tar.
    for (unit, attempt), same_unit in groupby(rows, key=lambda r: (r["unit"], r.get("attempt") or "")):
        fs, path = url_to_fs(task.layout.stage_tar(unit, attempt), task.storage_options)
        same_unit = list(same_unit)
        for lo in range(0, len(same_unit), READ_WINDOW):
            window = same_unit[lo:lo + READ_WINDOW]
            data = _read_members(fs, path, [m for row in window for m in row["members"]])
            for row in window:
                yield row["key"], {m["ext"]: data[m["offset"]] for m in row["members"]}


def _read_members(fs, path: str, members: list[dict]) -> dict[int, bytes]:
    """offset -> bytes of each member, read in as few ranged requests as MERGE_GAP allows."""
    out = {m["offset"]: b"" for m in members if m["size"] == 0}  # never fetched: an empty range reads the object
    spans = sorted({(m["offset"], m["offset"] + m["size"]) for m in members if m["size"] > 0})
    if not spans:
        return out
    _, starts, ends = merge_offset_ranges([path] * len(spans), [a for a, _ in spans], [b for _, b in spans],
                                          max_gap=MERGE_GAP)
    blobs = fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise")
    k = 0
    for a, b in spans:
        while ends[k] < b:  # the merged ranges are sorted and cover every span
            k += 1
        out[a] = bytes(memoryview(blobs[k])[a - starts[k]:b - starts[k]])
    return out
