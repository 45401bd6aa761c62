"""--give-up-quarantined, for the units given up whole: their inputs written as rejects by tasks on the engine.

A unit given up whole could not be read, so what it holds comes from its listing rows (up to --unit-size per unit,
--web-unit-size for a text list's URLs: a loose file or an archive is one row; a run of a parquet file's rows is one
row, FILE#rows=LO-HI). Tasks of up to UNITS_PER_TASK units and ROWS_PER_TASK rows read those rows, each listing
part once, and write one rejects part each (rejects.parquet/quarantined-NNNNNN.parquet), so the driver holds a few
numbers per unit, never the rows: after an outage that outlasted two runs, that can be most of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Iterator

import pyarrow as pa

from pipeline.ingest.atomic import put_table
from pipeline.ingest.executor import Failed
from pipeline.ingest.layout import Layout
from pipeline.ingest.plan import Plan
from pipeline.ingest.resolve import REJECTS_SCHEMA
from pipeline.ingest.retry import RetryPolicy, retry
from pipeline.ingest.sources import read_part_spans
from pipeline.ingest.stage import key_for

# A task takes at most this many units and, whatever --unit-size is, this many listing rows (~350 MB of rows at its
# peak, measured at 250k: within the 1 GB it asks Ray for).
UNITS_PER_TASK = 1000
ROWS_PER_TASK = 250_000


@dataclass(frozen=True)
class GiveUpUnit:
    slices: tuple[tuple[str, int, int], ...]  # Plan.slices: (listing part, first row, end row)
    rows: tuple[int, int]  # a parquet unit's rows of its file [lo, hi); (0, 0) or (-1, -1): the whole input
    reason: str  # the unit's last failure: the detail of each of its rejects


@dataclass(frozen=True)
class GiveUpTask:
    chunk: int
    units: tuple[GiveUpUnit, ...]
    layout: Layout
    storage_options: dict
    policy: RetryPolicy


def give_up_tasks(plan: Plan, quarantined: list[tuple[int, Failed]], layout: Layout, storage_options: dict,
                  policy: RetryPolicy) -> Iterator[tuple[int, GiveUpTask]]:
    """(chunk, task) over the given-up units in unit order, each chunk closed at UNITS_PER_TASK units or before it
    would pass ROWS_PER_TASK listing rows (a unit larger than that is a chunk of its own); built as they are taken."""
    chunk, units, rows = 0, [], 0
    for u, failed in sorted(quarantined, key=lambda q: q[0]):
        slices = plan.slices(u)
        n = sum(b - a for _, a, b in slices)
        if units and (len(units) == UNITS_PER_TASK or rows + n > ROWS_PER_TASK):
            yield chunk, GiveUpTask(chunk, tuple(units), layout, storage_options, policy)
            chunk, units, rows = chunk + 1, [], 0
        units.append(GiveUpUnit(slices, tuple(int(x) for x in plan.unit_rows[u]), failed.reason))
        rows += n
    if units:
        yield chunk, GiveUpTask(chunk, tuple(units), layout, storage_options, policy)


def run_give_up(task: GiveUpTask) -> dict:
    """Write the chunk's rejects part; returns {"rows": its row count}. Idempotent: a rerun writes the same part.
    Reads and the write are retried on transient faults, as every other task's."""
    spans = [(part, a, b, unit) for unit in task.units for part, a, b in unit.slices]
    rows = []
    for part, group in groupby(spans, key=lambda s: s[0]):  # in unit order, so one part's spans are adjacent
        group = list(group)
        wanted = [(a, b) for _, a, b, _ in group]
        read = retry(lambda: read_part_spans(part, wanted, task.storage_options), task.policy, f"read {part}")
        for (_, _, _, unit), entries in zip(group, read):
            lo, hi = unit.rows
            for entry in entries:
                source = entry["url"] + (f"#rows={lo}-{hi}" if lo < hi else "")
                rows.append({"source": source, "reason": "quarantined", "detail": unit.reason, "key": key_for(source)})
    table = pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)
    url = task.layout.rejects_given_up(task.chunk)
    retry(lambda: put_table(url, table, task.storage_options), task.policy, f"write {url}")
    return {"rows": len(rows)}
