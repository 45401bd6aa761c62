"""Stage 4: the curated dataset as NEW shards, written by the ingest's shard writer, in input order.

Curated shard i holds selected samples [i * S, (i + 1) * S) in ordinal order. The selected rows were shuffled by
input part (balance_stage.py), and every part's count is known, so a task finds its rows in the one or two parts
that hold them, reads exactly those samples' bytes from the input shards (ranged reads at the offsets of the input's
index), and writes the tar, its index, and its manifest rows. A shard whose manifest rows exist is done.

Why new shards rather than a selection the reader applies to the input tars (300M inputs, ~100 KB each, 30 TB;
a curated half, 150M samples): rewriting reads the selected 15 TB once and writes 15 TB once, and every training
epoch then streams 15 TB sequentially in whole-shard reads, as the loader does for any dataset. A selection written
as (shard, offset, size) rows is ~5 GB and free to make, but each epoch then either streams the full 30 TB and
throws half away (2x the bytes of every epoch, forever), or issues one ranged GET per sample: 150M requests an epoch
(~$60 in S3 GET fees, and at ~100 KB per request object stores deliver a fraction of their sequential bandwidth).
One rewrite costs 150M reads once, what one epoch of the selection would cost. New shards also keep shuffling,
resuming and the training configs exactly as they are: only data.shards changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.curate.balance_stage import SELECTED_SCHEMA
from pipeline.curate.layout import Layout
from pipeline.curate.records import ordinal_position, ordinal_shard, runs
from pipeline.curate.shard_samples import list_samples, read_members
from pipeline.curate.shuffle import read_bucket
from pipeline.curate.storage import exists, write_table
from pipeline.curate.tasks import run_tasks
from pipeline.ingest.writer import write_shard

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("label", pa.int64()),
    ("ordinal", pa.int64()),  # place in the input: (input shard index << 32) | position
    ("input_shard", pa.string()),
    ("cluster", pa.int64()), ("level1", pa.int64()), ("top", pa.int64()),  # dedup, level-1 and top-level clusters
])


@dataclass(frozen=True)
class WriteTask:
    index: int  # curated shard number
    start: int  # first selected sample it holds, counted in its first part
    count: int
    parts: tuple[int, ...]  # input parts holding its samples, in order
    part_shards: tuple[tuple[str, ...], ...]  # each part's input shard URLs
    shards_per_part: int
    selected: str  # prefix of the selected rows by part
    layout: Layout
    manifest: str  # this shard's manifest rows
    storage_options: dict


def plan_writes(part_counts: dict[int, int], shards_per_part: int, part_shards, selected: str, layout: Layout,
                manifest_prefix: str, samples_per_shard: int, storage_options: dict) -> list[WriteTask]:
    """part_counts: selected samples per input part -> one task per curated shard. part_shards(p): part p's URLs."""
    parts = sorted(p for p, n in part_counts.items() if n)
    ends = np.cumsum([part_counts[p] for p in parts])
    starts = ends - np.array([part_counts[p] for p in parts], dtype=np.int64)
    total = int(ends[-1]) if len(parts) else 0
    tasks = []
    for i, first in enumerate(range(0, total, samples_per_shard)):
        last = min(first + samples_per_shard, total)
        lo, hi = np.searchsorted(ends, first, side="right"), np.searchsorted(starts, last, side="left")
        span = tuple(parts[lo:hi])
        tasks.append(WriteTask(i, first - int(starts[lo]), last - first, span,
                               tuple(part_shards(p) for p in span), shards_per_part, selected, layout,
                               f"{manifest_prefix}/shard-{i:06d}.parquet", storage_options))
    return tasks


def write_curated(tasks: list[WriteTask], workers: int, ray_address: str | None) -> list[str]:
    """Runs the tasks not done yet; returns every shard's manifest-rows URL in shard order."""
    todo = [t for t in tasks if not exists(t.manifest, t.storage_options)]
    run_tasks(write_one, todo, workers, ray_address)
    return [t.manifest for t in tasks]


def write_one(task: WriteTask) -> None:
    so = task.storage_options
    rows = pa.concat_tables([_sorted(read_bucket(task.selected, p, SELECTED_SCHEMA, so)) for p in task.parts])
    rows = rows.slice(task.start, task.count)
    ordinal = rows.column("ordinal").to_numpy()
    shard_index = ordinal_shard(ordinal)
    urls = {}
    for s in np.unique(shard_index):
        p, j = divmod(int(s), task.shards_per_part)
        urls[int(s)] = task.part_shards[task.parts.index(p)][j]
    write_shard(task.layout.shard(task.index), _samples(ordinal, shard_index, urls, so), so)
    name = task.layout.shard_name(task.index)
    write_table(task.manifest, pa.table({
        "key": rows.column("key"), "shard": pa.array([name] * rows.num_rows, pa.string()),
        "label": rows.column("label"), "ordinal": rows.column("ordinal"),
        "input_shard": pa.array([urls[int(s)] for s in shard_index], pa.string()),
        "cluster": rows.column("cluster"), "level1": rows.column("level1"), "top": rows.column("top")},
        schema=MANIFEST_SCHEMA), so)


def _sorted(table: pa.Table) -> pa.Table:
    return table.take(pa.array(np.argsort(table.column("ordinal").to_numpy(), kind="stable")))


def _samples(ordinal: np.ndarray, shard_index: np.ndarray, urls: dict[int, str], so: dict):
    """(key, {ext: bytes}) of the samples, in ordinal order, read shard by shard."""
    position = ordinal_position(ordinal)
    for start, end in runs(shard_index):
        url = urls[int(shard_index[start])]
        listing = list_samples(url, so)
        yield from read_members(url, [listing[int(p)] for p in position[start:end]], so)
