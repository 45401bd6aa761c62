"""Phase 3: the verdict for every input of one group of units, from its stage tables and the dedup losers.

Writes the group's kept samples, in input order, to _ingest/resolved/ (what the shard phase copies, with what the
manifest needs), and its rejects to rejects.parquet/part-GROUP.parquet; returns the kept count and the count per
verdict. The driver numbers shards by a prefix sum over the groups' kept counts, so shard i holds kept samples
[i*S, (i+1)*S) in input order, whatever the number of workers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from pipeline.ingest.atomic import put_table
from pipeline.ingest.dedup import VERDICTS, read_losers, read_stage
from pipeline.ingest.done import mark_done, read_done
from pipeline.ingest.layout import Layout
from pipeline.ingest.stage import MEMBER, OK

KEEP = "keep"
RESOLVED_ROW_GROUP = 1024  # a shard task reads only the row groups of its samples

RESOLVED_SCHEMA = pa.schema([
    ("unit", pa.int64()), ("key", pa.string()), ("members", pa.list_(MEMBER)), ("width", pa.int32()),
    ("height", pa.int32()), ("bytes", pa.int64()), ("sha256", pa.string()), ("phash", pa.uint64()),
    ("source", pa.string()), ("label", pa.int64()), ("caption", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                            ("key", pa.string())])


@dataclass(frozen=True)
class ResolveTask:
    group: int
    first_unit: int
    end_unit: int
    layout: Layout
    storage_options: dict


def run_resolve(task: ResolveTask) -> dict:
    """Summary: {"kept": int, "verdicts": {verdict: count}}."""
    done = read_done(task.layout, "resolve", task.group, task.storage_options)
    if done is not None:
        return done
    losers = read_losers(task.layout, task.group, task.storage_options)
    kept: list[dict] = []
    rejects: list[dict] = []
    verdicts: Counter = Counter()
    for unit in range(task.first_unit, task.end_unit):
        for row_index, row in enumerate(read_stage(task.layout, unit, None, task.storage_options).to_pylist()):
            verdict, detail = row["status"], row["detail"]
            if verdict == OK:
                lost = losers.get((unit << 32) | row_index)
                verdict, detail = (KEEP, "") if lost is None else (VERDICTS[lost[0]], lost[2].hex())
            verdicts[verdict] += 1
            if verdict == KEEP:
                kept.append({"unit": unit, **{k: row[k] for k in RESOLVED_SCHEMA.names if k != "unit"}})
            else:
                rejects.append({"source": row["source"], "reason": verdict, "detail": detail, "key": row["key"]})
    put_table(task.layout.resolved(task.group), pa.Table.from_pylist(kept, schema=RESOLVED_SCHEMA),
              task.storage_options, row_group_size=RESOLVED_ROW_GROUP)
    put_table(task.layout.rejects_part(task.group), pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
              task.storage_options)
    return mark_done(task.layout, "resolve", task.group, {"kept": len(kept), "verdicts": dict(verdicts)},
                     task.storage_options)
