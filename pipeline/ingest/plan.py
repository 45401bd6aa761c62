"""Phase 0's result: the plan. Every source listed in parallel, units cut, fingerprinted by what was listed.

Directories are listed by tasks (sources.py): the top levels first, then one task per sub-folder. The plan is the
ordered listing parts and, per unit, where its inputs lie (arrays: a few tens of bytes per unit). It is saved
(plan.json, units.npz); if an interrupted run listed something else (another fingerprint), its staged work is
stale and is discarded rather than reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from pipeline.ingest.atomic import put_bytes, url_to_fs
from pipeline.ingest.executor import Engine, Failed
from pipeline.ingest.phase import RESOURCES, QuarantineError, Run, maybe_kill
from pipeline.ingest.retry import RetryPolicy
from pipeline.ingest.sources import ListTask, run_listing, subfolder_tasks

log = logging.getLogger(__name__)

UNIT_KINDS = ("files", "archive", "parquet")


@dataclass(frozen=True)
class Plan:
    """Phase 0's result: listing parts and the units cut from them, as arrays (a few tens of bytes per unit)."""

    parts: tuple[str, ...]
    unit_kind: np.ndarray  # [U] index into _UNIT_KINDS
    unit_part: np.ndarray  # [U] index into parts
    unit_start: np.ndarray  # [U] first row in the part
    unit_end: np.ndarray  # [U] end row
    unit_rows: np.ndarray  # [U, 2] a parquet unit's rows of its file, [lo, hi); -1 -1: all; 0 0: not parquet
    classes: tuple[str, ...]
    fingerprint: str  # of everything listed (paths, sizes, ETags or mtimes)


def build_plan(run: Run, first: list[ListTask], policy: RetryPolicy) -> Plan:
    """Phase 0: list every source in parallel (top levels, then their sub-folders), cut units, and compare with the
    plan of an interrupted run."""
    layout = run.layout
    results: dict[str, object] = {}
    listing = _ListFn(policy)
    _list_into(run.engine, listing, first, results)
    subs: list[ListTask] = []
    for i, top in enumerate(first):
        subs += subfolder_tasks(top, results[top.part_url], lambda j, i=i: layout.list_part(i, j))
    _list_into(run.engine, listing, subs, results)
    ordered = sorted(results)  # part names sort in input order: list-TASK-SUB
    kinds, part, starts, ends, rows, classes, digest = [], [], [], [], [], set(), hashlib.sha256()
    for p, url in enumerate(ordered):
        r = results[url]
        digest.update(f"{url.rsplit('/', 1)[-1]}\t{r.rows}\t{r.digest}\n".encode())
        classes.update(r.classes)
        for kind, a, b, lo, hi in r.units:
            kinds.append(UNIT_KINDS.index(kind))
            part.append(p)
            starts.append(a)
            ends.append(b)
            rows.append((lo, hi))
    plan = Plan(tuple(ordered), np.asarray(kinds, np.int8), np.asarray(part, np.int32),
                np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(rows, np.int64).reshape(-1, 2),
                tuple(sorted(classes)), digest.hexdigest()[:16])
    _check_plan(run, plan)
    return plan


class _ListFn:
    """run_listing with the retry policy bound (a picklable callable, for the process pool and Ray)."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy

    def __call__(self, task: ListTask):
        return run_listing(task, self.policy)


def _list_into(engine: Engine, fn, tasks: list[ListTask], results: dict) -> None:
    failures = []
    for i, result in engine.run(fn, enumerate(tasks), RESOURCES["list"]):
        if isinstance(result, Failed):
            failures.append((i, result))
            continue
        results[tasks[i].part_url] = result
        maybe_kill("list", len(results))
    if failures:
        raise QuarantineError("list", failures)


def _check_plan(run: Run, plan: Plan) -> None:
    """Save the plan; if an interrupted run listed something else, its staged work is stale: discard it."""
    layout, so = run.layout, run.cfg.storage_options
    fs, path = url_to_fs(layout.plan, so)
    if fs.exists(path):
        before = json.loads(fs.cat_file(path))["fingerprint"]
        if before == plan.fingerprint:
            return
        log.warning("the sources changed since the interrupted run (listing %s, now %s): its staged work is "
                    "discarded and the run starts over", before, plan.fingerprint)
        for folder in ("stage", "dedup", "resolved", "done"):
            p = url_to_fs(f"{layout.work}/{folder}", so)[1]
            if fs.exists(p):
                fs.rm(p, recursive=True)
    buf = io.BytesIO()
    np.savez(buf, kind=plan.unit_kind, part=plan.unit_part, start=plan.unit_start, end=plan.unit_end,
             rows=plan.unit_rows)
    put_bytes(f"{layout.work}/plan/units.npz", buf.getvalue(), so)
    body = {"fingerprint": plan.fingerprint, "parts": list(plan.parts), "units": len(plan.unit_kind),
            "classes": list(plan.classes)}
    put_bytes(layout.plan, json.dumps(body).encode(), so)
