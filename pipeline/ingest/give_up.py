"""--give-up-quarantined, for the units given up whole: their inputs written as rejects by tasks on the engine.

A unit given up whole could not be read, so what it holds comes from its listing rows (up to --unit-size per unit:
a loose file or an archive is one row; a run of a parquet file's rows is one row, FILE#rows=LO-HI). Tasks of
UNITS_PER_TASK units read those rows, each listing part once, and write one rejects part each
(rejects.parquet/quarantined-NNNNNN.parquet), so the driver holds a few numbers per unit, never the rows: after an
outage that outlasted two runs, that can be most of the inputs.
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
from pipeline.ingest.sources import read_part_spans
from pipeline.ingest.stage import key_for

UNITS_PER_TASK = 1000  # a task reads at most this many units' rows (250k at the default unit size)


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


def give_up_tasks(plan: Plan, quarantined: list[tuple[int, Failed]], layout: Layout, storage_options: dict
                  ) -> Iterator[tuple[int, GiveUpTask]]:
    """(chunk, task) over the given-up units in unit order, UNITS_PER_TASK a task."""
    units = [GiveUpUnit(plan.slices(u), tuple(int(x) for x in plan.unit_rows[u]), failed.reason)
             for u, failed in sorted(quarantined, key=lambda q: q[0])]
    for chunk, start in enumerate(range(0, len(units), UNITS_PER_TASK)):
        yield chunk, GiveUpTask(chunk, tuple(units[start:start + UNITS_PER_TASK]), layout, storage_options)


def run_give_up(task: GiveUpTask) -> dict:
    """Write the chunk's rejects part; returns {"rows": its row count}. Idempotent: a rerun writes the same part."""
    spans = [(part, a, b, unit) for unit in task.units for part, a, b in unit.slices]
    rows = []
    for part, group in groupby(spans, key=lambda s: s[0]):  # in unit order, so one part's spans are adjacent
        group = list(group)
        for (_, _, _, unit), entries in zip(group, read_part_spans(part, [(a, b) for _, a, b, _ in group],
                                                                    task.storage_options)):
            lo, hi = unit.rows
            for entry in entries:
                source = entry["url"] + (f"#rows={lo}-{hi}" if lo < hi else "")
                rows.append({"source": source, "reason": "quarantined", "detail": unit.reason, "key": key_for(source)})
    put_table(task.layout.rejects_given_up(task.chunk), pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA),
              task.storage_options)
    return {"rows": len(rows)}
