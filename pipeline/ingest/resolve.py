"""Phase 3: the verdict for every input of one group of units, from its stage tables and the dedup losers.

Writes the group's kept samples, in input order, to _ingest/resolved/ (what the shard phase copies, with what the
manifest needs), and its rejects to rejects.parquet/part-GROUP.parquet; returns the kept count and the count per
verdict. The driver numbers shards by a prefix sum over the groups' kept counts, so shard i holds kept samples
[i*S, (i+1)*S) in input order, whatever the number of workers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from pipeline.ingest.atomic import put_table
from pipeline.ingest.dedup import VERDICTS, read_losers, read_stages
from pipeline.ingest.done import mark_done, read_done
from pipeline.ingest.layout import Layout
from pipeline.ingest.stage import MEMBER, OK, STAGE_TAR_KEY

KEEP = "keep"
RESOLVED_ROW_GROUP = 1024  # a shard task reads only the row groups of its samples

RESOLVED_SCHEMA = pa.schema([
    ("unit", pa.int64()), ("key", pa.string()), ("members", pa.list_(MEMBER)), ("width", pa.int32()),
    ("height", pa.int32()), ("bytes", pa.int64()), ("sha256", pa.string()), ("phash", pa.uint64()),
    ("source", pa.string()), ("label", pa.int64()), ("caption", pa.string()),
    ("attempt", pa.string()),  # which of the unit's stage tars holds the members (Layout.stage_tar)
])
STAGE_COLUMNS = ("key", "members", "width", "height", "bytes", "sha256", "phash", "source", "label", "caption",
                 "status", "detail")
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                            ("key", pa.string())])


@dataclass(frozen=True)
class ResolveTask:
    group: int
    first_unit: int
    end_unit: int
    buckets: int  # of the dedup shuffle: the reduce outputs to read this group's losers from
    layout: Layout
    storage_options: dict
    skip: tuple[int, ...] = ()  # quarantined units of the group: not staged, left out
    groups: int = 0  # of the dedup shuffle: parts of every reduce output (0: not checked)


def run_resolve(task: ResolveTask) -> dict:
    """Summary: {"kept": int, "verdicts": {verdict: count}}. Columnar (Arrow and numpy), no Python per input."""
    done = read_done(task.layout, "resolve", task.group, task.storage_options)
    if done is not None:
        return done
    lost_ord, lost_kind, lost_key = read_losers(task.layout, task.group, task.buckets, task.storage_options,
                                                task.groups)
    kept, rejects, verdicts = [], [], Counter()
    units = [u for u in range(task.first_unit, task.end_unit) if u not in task.skip]
    for unit, table in read_stages(task.layout, units, list(STAGE_COLUMNS), task.storage_options):
        ords = (np.int64(unit) << np.int64(32)) | np.arange(table.num_rows, dtype=np.int64)
        at = np.minimum(np.searchsorted(lost_ord, ords), max(len(lost_ord) - 1, 0))
        lost = (lost_ord[at] == ords) if len(lost_ord) else np.zeros(len(ords), bool)
        status = table.column("status").to_numpy(zero_copy_only=False).astype(object)
        ok = status == OK
        verdict = np.where(ok & ~lost, KEEP, status)
        dup = ok & lost
        verdict[dup] = np.asarray([VERDICTS[k] for k in range(3)], dtype=object)[lost_kind[at[dup]]]
        detail = table.column("detail").to_numpy(zero_copy_only=False).astype(object)
        detail[dup] = lost_key[at[dup]]
        verdicts.update(dict(zip(*np.unique(verdict.astype(str), return_counts=True))))
        keep = pa.array(verdict == KEEP)
        attempt = (table.schema.metadata or {}).get(STAGE_TAR_KEY, b"").decode()
        n = int(keep.true_count)
        kept.append(table.filter(keep).append_column("unit", pa.array(np.full(n, unit)))
                    .append_column("attempt", pa.repeat(attempt, n))  # one value, no list of n
                    .select(RESOLVED_SCHEMA.names).cast(RESOLVED_SCHEMA))
        reject = pa.compute.invert(keep)
        rejects.append(pa.table({"source": table.column("source").filter(reject),
                                 "reason": pa.array(verdict[~(verdict == KEEP)].astype(str)),
                                 "detail": pa.array(detail[~(verdict == KEEP)].astype(str)),
                                 "key": table.column("key").filter(reject)}, schema=REJECTS_SCHEMA))
    kept_table = pa.concat_tables(kept) if kept else RESOLVED_SCHEMA.empty_table()
    put_table(task.layout.resolved(task.group), kept_table, task.storage_options, row_group_size=RESOLVED_ROW_GROUP)
    put_table(task.layout.rejects_part(task.group),
              pa.concat_tables(rejects) if rejects else REJECTS_SCHEMA.empty_table(), task.storage_options)
    summary = {"kept": kept_table.num_rows, "verdicts": {str(k): int(v) for k, v in verdicts.items()}}
    return mark_done(task.layout, "resolve", task.group, summary, task.storage_options)
