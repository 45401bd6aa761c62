"""run_ingest: source dumps -> cleaned, deduplicated WebDataset shards. The library behind tools/shard.py.

Five phases, each a set of independent tasks on the engine (executor.py: a local pool or Ray), each task's output
saved before it reports done, each phase's summaries saved when it ends:
  0. list     (per source folder)   listing parts in input order; units cut from them; fingerprint of what was listed
  1. stage    (per unit)            read + clean + hash every input; staged JPEGs and one row per input
  2. dedup    (map per unit group,  a shuffle by hash (source key, pixel hash, pHash LSH bands); the lowest
               reduce per bucket)   input ordinal wins
  3. resolve  (per unit group)      verdict per input; kept rows in input order; rejects
  4. shard    (per shard)           shards numbered by a prefix sum over the groups' kept counts, written in parallel
Then shards.parquet (one row per shard), classes.json and, last, report.json (the run's completion mark).

The driver holds arrays that grow with the number of units, groups and shards (tens of bytes each), never a row per
image. Every artefact is a pure function of (what was listed, fingerprinted arguments), so after kill -9 at any
moment a rerun redoes only the tasks that were in flight and yields exactly what a clean run yields, with any
--workers or --engine. A task that fails (a unit whose transient faults outlast the retries, or anything
unexpected) is quarantined: the phase finishes the other tasks, saves its progress, and the run stops with the
list (QuarantineError); the next run retries exactly those.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.ingest.assemble import ShardTask, run_shard
from pipeline.ingest.atomic import put_bytes, put_table, url_to_fs
from pipeline.ingest.cluster import start_engine
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.dedup import DedupMapTask, DedupReduceTask, run_map, run_reduce
from pipeline.ingest.executor import Engine, Failed, Resources
from pipeline.ingest.layout import Layout
from pipeline.ingest.near import bands, blocks_per_band
from pipeline.ingest.preflight import check_output, write_config
from pipeline.ingest.readers import ReadOptions
from pipeline.ingest.report import build_report
from pipeline.ingest.resolve import ResolveTask, run_resolve
from pipeline.ingest.retry import RetryPolicy
from pipeline.ingest.sources import IngestError, ListTask, expand_sources, run_listing, subfolder_tasks
from pipeline.ingest.stage import StageTask, run_stage

log = logging.getLogger(__name__)

# Test hook: "PHASE:N" SIGKILLs this process group after N completed tasks of that phase (list, stage, map,
# reduce, resolve, shard).
KILL_HOOK_ENV = "CANVIT_INGEST_TEST_KILL_AFTER"
CHECKPOINT_S = 60.0  # how often a running phase's summaries are saved (a kill costs at most this much re-checking)
# Memory each task asks Ray for (MB): what it holds at its peak, with room for Python and Pillow.
_RESOURCES = {"list": Resources(1, 1024), "stage": Resources(1, 1536), "map": Resources(1, 2048),
              "reduce": Resources(1, 3072), "resolve": Resources(1, 2048), "shard": Resources(1, 1024)}
_UNIT_KINDS = ("files", "archive", "parquet")


class QuarantineError(IngestError):
    """Some tasks failed after their retries; everything else of the phase is saved. Rerun to retry them."""

    def __init__(self, phase: str, failures: list[tuple[int, Failed]]):
        self.phase, self.failures = phase, failures
        lines = [f"  {phase} {i}: {f.reason} ({f.where})" for i, f in failures[:20]]
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        super().__init__(f"{len(failures)} {phase} task(s) quarantined after retries; the rest of the phase is "
                         f"saved. Rerun the same command to retry them.\n" + "\n".join(lines) + more)


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


def run_ingest(cfg: IngestConfig) -> dict:
    start = time.perf_counter()
    layout = Layout(cfg.output.rstrip("/"))
    fingerprint = cfg.fingerprint()
    # Sources are checked first: a missing one fails the run before anything is written anywhere.
    listing = expand_sources(cfg.sources, cfg.labels_from_folders, cfg.unit_size, cfg.storage_options,
                             layout.list_part)
    engine = start_engine(cfg.engine, cfg.workers, cfg.ray_address, layout.output, cfg.sources, cfg.storage_options)
    check_output(layout, fingerprint, cfg.overwrite, cfg.storage_options)
    fs, _ = url_to_fs(layout.output, cfg.storage_options)
    done = _finished_report(fs, layout)
    if done is not None and done.get("fingerprint") == fingerprint and not done.get("quarantined"):
        log.info("output %s is already complete", layout.output)
        engine.close()
        return done
    write_config(layout, fingerprint, cfg.public_dict(), cfg.storage_options)
    try:
        report = _run_phases(_Run(cfg, layout, engine, fs), listing, fingerprint, start)
    finally:
        engine.close()
    if not cfg.keep_staging and not report["quarantined"]:  # staged work stays for the rerun that retries them
        # config.json stays: it ties the output to its arguments for later reruns
        for p in fs.ls(url_to_fs(layout.work, cfg.storage_options)[1], detail=False):
            if not p.endswith("/config.json"):
                fs.rm(p, recursive=True)
    return report


def _run_phases(run: "_Run", listing: list[ListTask], fingerprint: str, start: float) -> dict:
    cfg, layout, fs = run.cfg, run.layout, run.fs
    policy = RetryPolicy(cfg.retries, cfg.retry_base_s)

    plan = _list(run, listing, policy)
    quarantined: list[tuple[int, Failed]] = []
    inputs = run.phase("stage", run_stage, _stage_tasks(plan, cfg, layout, policy), len(plan.unit_kind),
                       ("inputs", "seconds"), progress="inputs", quarantine=quarantined)["inputs"]
    skip = {i for i, _ in quarantined}  # units that could not be staged: the run goes on without them
    _forget_dedup_if_staging_changed(run, sorted(skip))
    group_starts = _groups(inputs, cfg.group_inputs)
    per_band = blocks_per_band(cfg.near_threshold, int(inputs.sum()))
    per_input = 1 + (cfg.dedup != "none") + (len(bands(cfg.near_threshold, per_band)) if cfg.dedup == "near" else 0)
    records = int(inputs.sum()) * per_input
    buckets = max(1, -(-records // cfg.bucket_records))
    groups = [(g, int(a), int(b)) for g, (a, b) in enumerate(zip(group_starts, [*group_starts[1:], len(inputs)]))]
    so = cfg.storage_options
    maps = ((g, DedupMapTask(g, a, b, buckets, cfg.dedup, cfg.near_threshold, per_band, layout, so,
                             _within(skip, a, b))) for g, a, b in groups)
    run.phase("map", run_map, maps, len(groups), ("records",))
    starts = tuple(int(x) for x in group_starts)
    reduces = ((b, DedupReduceTask(b, starts, cfg.near_threshold, layout, so)) for b in range(buckets))
    run.phase("reduce", run_reduce, reduces, buckets, ("records", "losers"))
    resolves = ((g, ResolveTask(g, a, b, buckets, layout, so, _within(skip, a, b))) for g, a, b in groups)
    resolved = run.phase("resolve", run_resolve, resolves, len(groups), ("kept",), keep_json="verdicts")
    kept = resolved["kept"]
    num_shards = -(-int(kept.sum()) // cfg.samples_per_shard)
    shards = run.phase("shard", run_shard, _shard_tasks(kept, cfg.samples_per_shard, layout, so), num_shards,
                       ("samples", "bytes"), progress="samples")

    verdicts: Counter = Counter()
    for v in resolved["verdicts"]:
        verdicts.update(json.loads(v))
    names = [layout.shard_file(i) for i in range(num_shards)]
    put_table(layout.shard_index, pa.table({"shard": names, "samples": shards["samples"], "bytes": shards["bytes"]}),
              so)
    _remove_stale_outputs(fs, layout, num_shards, len(groups))
    put_bytes(layout.classes, json.dumps(list(plan.classes)).encode(), so)
    report = build_report(cfg.public_dict(), fingerprint, verdicts, num_shards, int(shards["bytes"].sum()),
                          time.perf_counter() - start, plan.classes)
    report["listing_fingerprint"] = plan.fingerprint
    report["quarantined"] = [{"unit": i, "reason": f.reason, "where": f.where} for i, f in quarantined]
    report["nodes"] = len(run.engine.nodes)  # that ran this run's tasks (1 for the local engine)
    put_bytes(layout.report, json.dumps(report, indent=1).encode(), so)
    return report


def _within(units: set[int], first: int, end: int) -> tuple[int, ...]:
    return tuple(sorted(u for u in units if first <= u < end))


def _forget_dedup_if_staging_changed(run: _Run, skipped: list[int]) -> None:
    """Dedup, resolve and shard results hold for one set of staged units. If a rerun staged units an earlier run
    had quarantined, those results are stale: their done marks and summaries go, so the phases run again (and
    rewrite every shard). Removed first, recorded second: a kill in between removes them again."""
    fs, path = url_to_fs(run.layout.quarantined, run.cfg.storage_options)
    before = json.loads(fs.cat_file(path)) if fs.exists(path) else None
    done = url_to_fs(f"{run.layout.work}/done", run.cfg.storage_options)[1]
    if before is not None and before != skipped and fs.exists(done):
        for p in fs.ls(done, detail=False):
            if any(p.rsplit("/", 1)[-1].startswith(phase) for phase in ("map", "reduce", "resolve", "shard")):
                fs.rm(p, recursive=True)
    put_bytes(run.layout.quarantined, json.dumps(skipped).encode(), run.cfg.storage_options)


class _Run:
    """One run's phases: saved summaries, quarantine, progress and the kill hook."""

    def __init__(self, cfg: IngestConfig, layout: Layout, engine: Engine, fs):
        self.cfg, self.layout, self.engine, self.fs = cfg, layout, engine, fs

    def phase(self, name: str, fn: Callable, tasks: Iterator[tuple[int, object]], n: int, fields: tuple[str, ...],
              progress: str | None = None, keep_json: str | None = None,
              quarantine: list[tuple[int, Failed]] | None = None) -> dict[str, np.ndarray]:
        """Run `n` tasks (id, task); returns each summary field as an array indexed by task id. A phase whose
        summaries were saved is not run again; one interrupted resumes from its last checkpoint (tasks done since
        find their own done marks). Failed tasks raise QuarantineError once the others are done, or, given a
        `quarantine` list, are appended to it (their fields stay 0) and the phase is left unfinished, so the next
        run retries exactly them."""
        saved = self._load(self.layout.phase_done(name))
        if saved is not None:
            return saved
        partial = self._load(self.layout.phase_done(name + ".partial"))
        cols = {f: np.zeros(n, np.float64 if f == "seconds" else np.int64) for f in fields}
        if keep_json:
            cols[keep_json] = np.full(n, "{}", dtype=object)
        done = np.zeros(n, bool)
        if partial is not None:
            done[partial["id"]] = True
            for f in cols:
                cols[f][partial["id"]] = partial[f]
        failures: list[tuple[int, Failed]] = []
        last_save = time.monotonic()
        bar = _Progress(name, n, int(done.sum()), self.cfg.quiet, progress)
        pending = ((i, t) for i, t in tasks if not done[i])
        for count, (i, result) in enumerate(self.engine.run(fn, pending, _RESOURCES[name]), 1):
            if isinstance(result, Failed):
                failures.append((i, result))
                log.warning("%s task %d quarantined: %s (%s)", name, i, result.reason, result.where)
                continue
            done[i] = True
            for f in cols:
                cols[f][i] = json.dumps(result[f]) if f == keep_json else result[f]
            bar.advance(result.get(progress, 0) if progress else 0)
            _maybe_kill(name, count)
            if time.monotonic() - last_save > CHECKPOINT_S:
                self._save(self.layout.phase_done(name + ".partial"), done, cols)
                last_save = time.monotonic()
        bar.close()
        if failures:
            self._save(self.layout.phase_done(name + ".partial"), done, cols)
            if quarantine is None:
                raise QuarantineError(name, failures)
            quarantine.extend(failures)
        else:
            self._save(self.layout.phase_done(name), done, cols)
        return {f: cols[f] for f in cols}

    def _save(self, url: str, done: np.ndarray, cols: dict[str, np.ndarray]) -> None:
        ids = np.flatnonzero(done)
        table = pa.table({"id": ids, **{f: (list(c[ids]) if c.dtype == object else c[ids]) for f, c in cols.items()}})
        put_table(url, table, self.cfg.storage_options)

    def _load(self, url: str) -> dict[str, np.ndarray] | None:
        fs, path = url_to_fs(url, self.cfg.storage_options)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read()
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _list(run: _Run, first: list[ListTask], policy: RetryPolicy) -> Plan:
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
            kinds.append(_UNIT_KINDS.index(kind))
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
    for i, result in engine.run(fn, enumerate(tasks), _RESOURCES["list"]):
        if isinstance(result, Failed):
            failures.append((i, result))
            continue
        results[tasks[i].part_url] = result
        _maybe_kill("list", len(results))
    if failures:
        raise QuarantineError("list", failures)


def _check_plan(run: _Run, plan: Plan) -> None:
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


def _stage_tasks(plan: Plan, cfg: IngestConfig, layout: Layout, policy: RetryPolicy):
    read = ReadOptions(cfg.clean.max_bytes, cfg.image_column, cfg.label_column, cfg.storage_options, policy,
                       cfg.download_threads)
    for u in range(len(plan.unit_kind)):
        lo, hi = (int(x) for x in plan.unit_rows[u])
        yield u, StageTask(u, _UNIT_KINDS[plan.unit_kind[u]], plan.parts[plan.unit_part[u]], int(plan.unit_start[u]),
                           int(plan.unit_end[u]), (lo, hi), plan.classes, layout, cfg.clean, cfg.dedup, read)


def _groups(inputs: np.ndarray, group_inputs: int) -> np.ndarray:
    """First unit of each dedup group: contiguous units of about group_inputs inputs (a bigger unit alone)."""
    starts, total = [0], 0
    for u, n in enumerate(inputs):
        if total and total + n > group_inputs:
            starts.append(u)
            total = 0
        total += int(n)
    return np.asarray(starts if len(inputs) else [], np.int64)


def _shard_tasks(kept: np.ndarray, per_shard: int, layout: Layout, so: dict):
    """Shard i = kept samples [i*S, (i+1)*S): the slices of the groups' resolved tables that hold them."""
    ends = np.cumsum(kept)
    begins = ends - kept
    total = int(ends[-1]) if len(ends) else 0
    for i, lo in enumerate(range(0, total, per_shard)):
        hi = min(lo + per_shard, total)
        first = int(np.searchsorted(ends, lo, side="right"))
        slices = []
        g = first
        while g < len(kept) and begins[g] < hi:
            a, b = max(lo, begins[g]) - begins[g], min(hi, ends[g]) - begins[g]
            if b > a:
                slices.append((g, int(a), int(b)))
            g += 1
        yield i, ShardTask(i, tuple(slices), layout, so)


def _remove_stale_outputs(fs, layout: Layout, num_shards: int, num_groups: int) -> None:
    """Shards, manifest and rejects parts numbered past this run's: left by a run over sources that changed."""
    root = url_to_fs(layout.output)[1]
    for pattern, limit in (("shard-*.tar", num_shards), ("shard-*.idx", num_shards),
                           ("manifest.parquet/part-*.parquet", num_shards),
                           ("rejects.parquet/part-*.parquet", num_groups)):
        for p in fs.glob(f"{root}/{pattern}"):
            if int(p.rsplit("-", 1)[1].split(".")[0]) >= limit:
                fs.rm_file(p)


def _finished_report(fs, layout: Layout) -> dict | None:
    path = url_to_fs(layout.report)[1]
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _maybe_kill(phase: str, completed: int) -> None:
    hook = os.environ.get(KILL_HOOK_ENV, "")
    if hook == f"{phase}:{completed}":
        os.killpg(os.getpgrp(), signal.SIGKILL)


class _Progress:
    """tqdm bar with items/s, or (quiet) one log line per 5% of the tasks."""

    def __init__(self, phase: str, total: int, initial: int, quiet: bool, unit: str | None):
        self.phase, self.quiet, self.unit, self.items, self.start = phase, quiet, unit, 0, time.perf_counter()
        self.bar = None if quiet else tqdm(total=total, initial=initial, desc=phase, unit="task", dynamic_ncols=True)
        self.tasks, self.total, self.step = initial, total, max(1, total // 20)

    def advance(self, items: int) -> None:
        self.items += items
        self.tasks += 1
        rate = self.items / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            if self.unit:
                self.bar.set_postfix_str(f"{rate:.1f} {self.unit}/s", refresh=False)
            self.bar.update(1)
        elif self.tasks % self.step == 0 or self.tasks == self.total:
            log.info("%s %d/%d tasks%s", self.phase, self.tasks, self.total,
                     f", {self.items} {self.unit}, {rate:.1f}/s" if self.unit else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
