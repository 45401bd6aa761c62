"""Phase 0's result: the plan. Every source listed in parallel, units cut, fingerprinted by what was listed.

Listing runs in rounds of tasks on the engine (sources.py): the top levels of the sources, with their key ranges
(S3: each task at most LIST_CAP keys, handing back the rest of its range cut into sub-ranges for the next round);
then the sub-folders found, in the same way. The driver holds per part a few numbers and per unit a few more, and
range bounds between rounds, never a key. The plan is the ordered listing parts and, per unit, where its inputs lie
(arrays: a few tens of bytes per unit). Units are cut over a segment's parts as if they were one listing (a unit
may span parts), and the fingerprint adds up each segment's row digests, so where the ranges were cut changes
neither. It is saved (plan.json, units.npz); if an interrupted run listed something else (another fingerprint), its
staged work is stale and is discarded rather than reused. Until then each listing task leaves a record of its result
(done/list, sources.run_listing), so a kill during the first listing costs the tasks in flight, not the listing
done. Once a plan is saved, every rerun lists everything again (records of it are deleted first): that listing is
what notices a source changed since, so it cannot be taken from before the change.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from pipeline.ingest.atomic import put_bytes, url_to_fs
from pipeline.ingest.executor import Engine, Failed
from pipeline.ingest.phase import RESOURCES, QuarantineError, Run, maybe_kill
from pipeline.ingest.retry import RetryPolicy
from pipeline.ingest.sources import IngestError, ListedPart, ListTask, rest_tasks, run_listing, subfolder_tasks

log = logging.getLogger(__name__)

UNIT_KINDS = ("files", "archive", "parquet")


@dataclass(frozen=True)
class Plan:
    """Phase 0's result: listing parts and the units cut from them, as arrays (a few tens of bytes per unit).
    Unit u's inputs are rows [unit_start, ...) of part unit_part through rows [..., unit_end) of part unit_last,
    with every part between them whole."""

    parts: tuple[str, ...]
    part_rows: np.ndarray  # [P] rows of each part
    unit_kind: np.ndarray  # [U] index into UNIT_KINDS
    unit_part: np.ndarray  # [U] index into parts of the unit's first row
    unit_start: np.ndarray  # [U] that row
    unit_last: np.ndarray  # [U] index into parts of the unit's last row
    unit_end: np.ndarray  # [U] end row in that part
    unit_rows: np.ndarray  # [U, 2] a parquet unit's rows of its file, [lo, hi); -1 -1: all; 0 0: not parquet
    classes: tuple[str, ...]
    fingerprint: str  # of everything listed (paths, sizes, ETags or mtimes), however it was cut into parts

    def slices(self, u: int) -> tuple[tuple[str, int, int], ...]:
        """Unit u's rows as (part URL, first row, end row), in order, leaving out parts with none of them."""
        first, last = int(self.unit_part[u]), int(self.unit_last[u])
        spans = ((p, int(self.unit_start[u]) if p == first else 0,
                  int(self.unit_end[u]) if p == last else int(self.part_rows[p])) for p in range(first, last + 1))
        return tuple((self.parts[p], a, b) for p, a, b in spans if b > a)


def build_plan(run: Run, first: list[ListTask], policy: RetryPolicy, unit_size: int, web_unit_size: int) -> Plan:
    """Phase 0: list every source in parallel (top levels, then their sub-folders), cut units, and compare with the
    plan of an interrupted run."""
    fs, saved_plan = url_to_fs(run.layout.plan, run.cfg.storage_options)
    if fs.exists(saved_plan):
        # A plan is saved, perhaps with staged work: this listing is the check that the sources did not change since,
        # so it lists everything now. Records of a relisting killed earlier (or of the listing that made the plan,
        # if a kill came between saving it and deleting them) predate a change this must see.
        _forget_listing(run)
    listing = _Listing(run.engine, policy)
    listing.run(first)
    listing.run([t for i, top in enumerate(first) for t in subfolder_tasks(top, sorted(listing.subfolders.get(i, ())))])
    parts = listing.parts
    listed = {segment[0] for segment, part in parts.values() if part.rows}
    for i, top in enumerate(first):
        if top.pattern is not None and i not in listed:  # a glob the range tasks listed (sources.py)
            _forget_listing(run)  # the rerun after the files are uploaded must not reuse this empty listing
            raise IngestError(f"SOURCE {top.source!r} matched no files")
    ordered = sorted(parts)  # part names sort in input order: list-TASK-SUB_RANGE...
    units = [np.zeros((0, 7), np.int64)]  # per segment: (kind, first part, first row, last part, end row, lo, hi)
    digest = hashlib.sha256()
    for segment, members in groupby(range(len(ordered)), key=lambda p: parts[ordered[p]][0]):
        indexed = [(p, parts[ordered[p]][1]) for p in members]
        rows, total = sum(part.rows for _, part in indexed), sum(part.digest for _, part in indexed) % 2**256
        digest.update(f"{segment[0]}\t{segment[1]}\t{rows}\t{total:064x}\n".encode())
        units.append(np.asarray(cut_units(indexed, unit_size, web_unit_size), np.int64).reshape(-1, 7))
    u = np.concatenate(units)
    plan = Plan(tuple(ordered), np.asarray([parts[p][1].rows for p in ordered], np.int64), u[:, 0].astype(np.int8),
                u[:, 1].astype(np.int32), u[:, 2], u[:, 3].astype(np.int32), u[:, 4], u[:, 5:7],
                tuple(sorted(listing.classes)), digest.hexdigest()[:16])
    _check_plan(run, plan)
    # The listing tasks' records served a rerun after a kill during listing; a rerun from now on must list again,
    # to see whether the sources changed (the plan's fingerprint).
    _forget_listing(run)
    return plan


def _forget_listing(run: Run) -> None:
    """Delete the listing tasks' records (sources.run_listing): the next listing lists every task again."""
    fs, records = url_to_fs(f"{run.layout.work}/done/list", run.cfg.storage_options)
    fs.invalidate_cache(records)  # the tasks wrote them, maybe on other nodes: no cached listing of ours may hide them
    if fs.exists(records):
        fs.rm(records, recursive=True)


def cut_units(parts: list[tuple[int, ListedPart]], unit_size: int, web_unit_size: int
              ) -> list[tuple[int, int, int, int, int, int, int]]:
    """A segment's units, over its parts (index, part) in order, as (kind, first part, first row, last part, end
    row, parquet lo, parquet hi): runs of up to unit_size loose files (across part boundaries); each archive a
    unit of its own; each parquet file runs of unit_size of its rows. Inputs downloaded from the web (a text list's
    URLs, a parquet file of URLs) are cut at web_unit_size instead: a unit ends with its slowest URL, a dead host's
    timeouts, a small share of a long unit's cleaning. Units depend on the listing alone, never on the worker
    count or where the ranges were cut: that is what makes output independent of --workers."""
    units = []
    run_start, run_files, run_end = None, 0, None  # the open run of loose files: first (part, row), count, end
    run_kind, size = None, unit_size

    def close_run() -> None:
        nonlocal run_start, run_files
        if run_start is not None:
            units.append((0, *run_start, *run_end, 0, 0))
            run_start, run_files = None, 0

    for p, part in parts:
        row = 0
        for kind, n, file_rows in part.runs:
            if kind in ("file", "web"):
                if kind != run_kind:
                    close_run()
                    run_kind, size = kind, web_unit_size if kind == "web" else unit_size
                while n:
                    if run_start is None:
                        run_start = (p, row)
                    take = min(n, size - run_files)
                    run_files, row, n = run_files + take, row + take, n - take
                    run_end = (p, row)
                    if run_files == size:
                        close_run()
                continue
            close_run()
            run_kind = None
            rows = web_unit_size if kind == "web_parquet" else unit_size
            kind = "parquet" if kind == "web_parquet" else kind
            if kind == "parquet" and file_rows > 0:
                units += [(UNIT_KINDS.index(kind), p, row, p, row + 1, lo, min(file_rows, lo + rows))
                          for lo in range(0, file_rows, rows)]
            else:
                units.append((UNIT_KINDS.index(kind), p, row, p, row + 1, -1, -1))
            row += 1
    close_run()
    return units


class _ListFn:
    """run_listing with the retry policy bound (a picklable callable, for the process pool and Ray)."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy

    def __call__(self, task: ListTask):
        return run_listing(task, self.policy)


class _Listing:
    """What the listing rounds gathered so far: the parts, classes and sub-folders (a few numbers per part)."""

    def __init__(self, engine: Engine, policy: RetryPolicy):
        self.engine, self.fn = engine, _ListFn(policy)
        self.parts: dict[str, tuple[tuple[int, int], ListedPart]] = {}  # part URL -> (segment, part)
        self.classes: set[str] = set()
        self.subfolders: dict[int, set[str]] = {}  # "top" task -> the sub-folders its ranges found
        self.tasks_done = 0

    def run(self, tasks: list[ListTask]) -> None:
        """Run listing tasks in rounds: the range tasks of a round that reached LIST_CAP hand the rest of their
        range, cut into sub-ranges, to the next round."""
        while tasks:
            failures, later = [], []
            for i, result in self.engine.run(self.fn, enumerate(tasks), RESOURCES["list"]):
                if isinstance(result, Failed):
                    failures.append((i, result))
                    continue
                task = tasks[i]
                self.parts.update((part.url, (task.segment, part)) for part in result.parts)
                self.classes.update(result.classes)
                if task.mode == "top":
                    self.subfolders.setdefault(task.segment[0], set()).update(result.subfolders)
                later += rest_tasks(task, result)
                self.tasks_done += 1
                maybe_kill("list", self.tasks_done)
            if failures:
                raise QuarantineError("list", failures)
            tasks = later


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
        # What each unit failed on is keyed by unit number, which now names other inputs: a unit's first failure in
        # this plan must not count as its second (--give-up-quarantined).
        p = url_to_fs(layout.quarantined, so)[1]
        if fs.exists(p):
            fs.rm_file(p)
    buf = io.BytesIO()
    np.savez(buf, part_rows=plan.part_rows, kind=plan.unit_kind, part=plan.unit_part, start=plan.unit_start,
             last=plan.unit_last, end=plan.unit_end, rows=plan.unit_rows)
    put_bytes(f"{layout.work}/plan/units.npz", buf.getvalue(), so)
    body = {"fingerprint": plan.fingerprint, "parts": list(plan.parts), "units": len(plan.unit_kind),
            "classes": list(plan.classes)}
    put_bytes(layout.plan, json.dumps(body).encode(), so)
