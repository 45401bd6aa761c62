"""Units given up whole (--give-up-quarantined): their listing rows become rejects in give-up tasks, a rejects part
per chunk of units, each listing part read once; the same rows, in unit order, as reading each unit's rows alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest import give_up
from pipeline.ingest.executor import Failed
from pipeline.ingest.layout import Layout
from pipeline.ingest.plan import Plan
from pipeline.ingest.retry import RetryPolicy
from pipeline.ingest.sources import ENTRY_SCHEMA, PART_ROW_GROUP, read_part_rows


def _part(path, rows: int, name: str) -> str:
    kinds = ["file"] * (rows - 1) + ["parquet"]
    urls = [f"s3://b/{name}/{i:05d}.jpg" for i in range(rows - 1)] + [f"s3://b/{name}/table.parquet"]
    table = pa.table({"kind": kinds, "url": urls, "cls": [None] * rows, "size": [1] * rows, "version": [""] * rows},
                     schema=ENTRY_SCHEMA)
    pq.write_table(table, path, row_group_size=PART_ROW_GROUP)
    return str(path)


def test_given_up_units_are_written_by_tasks_in_chunks(tmp_path, monkeypatch):
    parts = (_part(tmp_path / "p0.parquet", 5000, "a"), _part(tmp_path / "p1.parquet", 3000, "b"))
    # (first part, first row, last part, end row, parquet rows lo, hi) per unit
    units = [(0, 0, 0, 1000, 0, 0), (0, 3500, 0, 4500, 0, 0),  # the second crosses a row group
             (0, 4900, 1, 100, 0, 0),  # runs from one part into the next
             (1, 100, 1, 2999, 0, 0), (1, 2999, 1, 3000, 250, 500)]  # a parquet file's rows 250-500
    u = np.asarray(units, np.int64)
    plan = Plan(parts, np.asarray([5000, 3000]), np.zeros(len(u), np.int8), u[:, 0].astype(np.int32), u[:, 1],
                u[:, 2].astype(np.int32), u[:, 3], u[:, 4:6], (), "f")
    layout = Layout(str(tmp_path / "out"))
    quarantined = [(4, Failed("TransientFailure: parquet", "x")), (1, Failed("TransientFailure: one", "x")),
                   (2, Failed("TransientFailure: two", "x"))]
    policy = RetryPolicy(2, 0.0)
    monkeypatch.setattr(give_up, "ROWS_PER_TASK", 1100)  # units 1 and 2 (1,000 and 200 rows) do not fit one task
    assert [len(t.units) for _, t in give_up.give_up_tasks(plan, quarantined, layout, {}, policy)] == [1, 2]
    monkeypatch.setattr(give_up, "ROWS_PER_TASK", 250_000)
    monkeypatch.setattr(give_up, "UNITS_PER_TASK", 2)
    tasks = list(give_up.give_up_tasks(plan, quarantined, layout, {}, policy))
    assert [(chunk, len(t.units)) for chunk, t in tasks] == [(0, 2), (1, 1)]
    assert sum(give_up.run_give_up(t)["rows"] for _, t in tasks) == 1000 + 200 + 1
    got = [r for chunk in range(2) for r in pq.read_table(layout.rejects_given_up(chunk)).to_pylist()]
    expected = []
    for unit, reason in ((1, "one"), (2, "two"), (4, "parquet")):
        lo, hi = units[unit][4:6]
        for part, a, b in plan.slices(unit):
            expected += [(e["url"] + (f"#rows={lo}-{hi}" if lo < hi else ""), f"TransientFailure: {reason}")
                         for e in read_part_rows(part, a, b, {})]
    assert [(r["source"], r["detail"]) for r in got] == expected
    assert {r["reason"] for r in got} == {"quarantined"} and len({r["key"] for r in got}) == len(got)
    assert got[-1]["source"] == "s3://b/b/table.parquet#rows=250-500"


def test_given_up_parts_of_an_earlier_run_past_this_runs_go(tmp_path):
    """An interrupted run gave up more units (4 parts; or an older version's single quarantined.parquet) than the
    run that finished (2 parts, or none when nothing is given up): only this run's parts stay."""
    from pipeline.ingest.engine import _remove_stale_outputs
    from pipeline.ingest.atomic import url_to_fs

    layout = Layout(str(tmp_path / "out"))
    rejects = tmp_path / "out/rejects.parquet"
    for kept, expected in ((2, ["part-000000.parquet", "quarantined-000000.parquet", "quarantined-000001.parquet"]),
                           (0, ["part-000000.parquet"])):
        rejects.mkdir(parents=True, exist_ok=True)
        for name in ["part-000000.parquet", "quarantined.parquet", *(f"quarantined-{i:06d}.parquet" for i in range(4))]:
            (rejects / name).write_bytes(b"x")
        _remove_stale_outputs(url_to_fs(layout.output)[0], layout, 0, 1, kept)
        assert sorted(p.name for p in rejects.iterdir()) == expected


def test_a_give_up_read_that_fails_once_is_retried(tmp_path, monkeypatch):
    """A transient fault reading a listing part (a reset connection) is retried, not turned into a failed task."""
    part = _part(tmp_path / "p0.parquet", 100, "a")
    plan = Plan((part,), np.asarray([100]), np.zeros(1, np.int8), np.zeros(1, np.int32), np.zeros(1, np.int64),
                np.zeros(1, np.int32), np.asarray([100]), np.zeros((1, 2), np.int64), (), "f")
    layout = Layout(str(tmp_path / "out"))
    real, calls = give_up.read_part_spans, []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise ConnectionResetError("reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(give_up, "read_part_spans", flaky)
    [(_, task)] = give_up.give_up_tasks(plan, [(0, Failed("TransientFailure: x", "x"))], layout, {},
                                        RetryPolicy(3, 0.0))
    assert give_up.run_give_up(task) == {"rows": 100} and calls == [part, part]
