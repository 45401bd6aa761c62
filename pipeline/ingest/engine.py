"""run_ingest: source dumps -> cleaned, deduplicated WebDataset shards. The library behind tools/shard.py.

Five phases, each a set of independent tasks on the engine (executor.py: a local pool or Ray), each task's output
saved before it reports done, each phase's summaries saved when it ends:
  0. list     (per folder / key     listing parts in input order; units cut from them; fingerprint of what was
               range, in rounds)     listed
  1. stage    (per unit)            read + clean + hash every input; staged JPEGs and one row per input
  2. dedup    (map per unit group,  a shuffle by hash (source key, pixel hash, pHash LSH bands); the lowest
               reduce per bucket)   input ordinal wins
  3. resolve  (per unit group)      verdict per input; kept rows in input order; rejects
  4. shard    (per shard)           shards numbered by a prefix sum over the groups' kept counts, written in parallel
Then shards.parquet (one row per shard), classes.json and, last, report.json (the run's completion mark).

The driver holds arrays that grow with the number of units, groups and shards (tens of bytes each), never a row per
image. Every artefact is a pure function of (what was listed, fingerprinted arguments), so after kill -9 at any
moment a rerun redoes only the tasks that were in flight and yields exactly what a clean run yields, with any
--workers or --engine. A unit whose transient faults outlast the retries is quarantined: the run goes on without
it, report.json lists it, and the next run stages it and redoes dedup, resolve and shards; or, with
give_up_quarantined, a later run gives up what failed in both runs: a unit quarantined because of some of its
loose files (each named by the failure) is staged with those files, if they fail again, as "quarantined" rejects
and its other inputs kept; a unit that failed as a whole in both runs (an archive, a parquet file, an outage of
most of its files) is left out, its inputs "quarantined" rejects written from its listing rows by give-up tasks
(give_up.py); the output is then final.
A failing task of any other phase stops the run once the rest of its phase is done (phase.py: QuarantineError);
the next run retries it.
Phase bookkeeping (saved summaries, checkpoints, progress) is phase.py; listing and the plan, plan.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa

from pipeline.ingest.assemble import ShardTask, run_shard
from pipeline.ingest.atomic import put_bytes, put_table, url_to_fs
from pipeline.ingest.cluster import start_engine
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.dedup import DedupMapTask, DedupReduceTask, run_map, run_reduce
from pipeline.ingest.executor import Failed
from pipeline.ingest.layout import Layout
from pipeline.ingest.near import bands, blocks_per_band
from pipeline.ingest.give_up import give_up_tasks, run_give_up
from pipeline.ingest.phase import RESOURCES, QuarantineError, Run
from pipeline.ingest.plan import UNIT_KINDS, Plan, build_plan
from pipeline.ingest.preflight import check_output, write_config
from pipeline.ingest.readers import ReadOptions
from pipeline.ingest.report import build_report
from pipeline.ingest.resolve import ResolveTask, run_resolve
from pipeline.ingest.retry import RetryPolicy, retry
from pipeline.ingest.sources import IngestError, ListTask, check_columns, expand_sources, read_part_rows
from pipeline.ingest.stage import StageTask, run_stage

log = logging.getLogger(__name__)


def run_ingest(cfg: IngestConfig) -> dict:
    start = time.perf_counter()
    layout = Layout(cfg.output.rstrip("/"))
    fingerprint = cfg.fingerprint()
    # Sources are checked first: a missing one fails the run before anything is written anywhere.
    listing = expand_sources(cfg.sources, cfg.labels_from_folders, cfg.storage_options, layout)
    engine = start_engine(cfg.engine, cfg.workers, cfg.ray_address, layout.output, cfg.sources, cfg.storage_options)
    legacy = cfg.fingerprint(before_opt_outs=True)  # an output the version before opt-outs finished is complete
    check_output(layout, fingerprint, cfg.overwrite, cfg.storage_options, legacy)
    fs, _ = url_to_fs(layout.output, cfg.storage_options)
    done = _finished_report(fs, layout)
    if done is not None and done.get("fingerprint") in (fingerprint, legacy) and (
            not done.get("quarantined") or done.get("gave_up_quarantined")):
        log.info("output %s is already complete", layout.output)
        engine.close()
        # Staging a run killed (or failed) while removing it: ~20 TB of staged JPEGs at 300M. Not that of a run that
        # kept it on purpose (--keep-staging, in its report's config; review s16c).
        if not cfg.keep_staging and not done.get("config", {}).get("keep_staging"):
            _remove_staging(fs, layout, cfg)
        return done
    write_config(layout, fingerprint, cfg.public_dict(), cfg.storage_options)
    try:
        report = _run_phases(Run(cfg, layout, engine, fs), listing, fingerprint, start)
    finally:
        engine.close()
    final = not report["quarantined"] or report["gave_up_quarantined"]
    if not cfg.keep_staging and final:  # else staged work stays for the rerun that retries the quarantined units
        _remove_staging(fs, layout, cfg)
    return report


def _remove_staging(fs, layout: Layout, cfg: IngestConfig) -> None:
    """The work folder but config.json (it ties the output to its arguments for later reruns), with retries. Also
    run when a rerun finds the output complete: a run killed, or failing, while removing it left it billed, and
    every later rerun returned before removing it (review s16a)."""
    policy = RetryPolicy(cfg.retries, cfg.retry_base_s)
    work = url_to_fs(layout.work, cfg.storage_options)[1]
    for p in retry(lambda: fs.ls(work, detail=False) if fs.exists(work) else [], policy, f"list {layout.work}"):
        if not p.endswith("/config.json"):
            retry(lambda: _rm(fs, p), policy, f"remove {p}")


def _rm(fs, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:  # removed by an attempt that then reported an error (review s16c)
        pass


def _run_phases(run: "Run", listing: list[ListTask], fingerprint: str, start: float) -> dict:
    cfg, layout, fs = run.cfg, run.layout, run.fs
    policy = RetryPolicy(cfg.retries, cfg.retry_base_s)

    try:
        plan = build_plan(run, listing, policy, cfg.unit_size, cfg.web_unit_size)
        _check_columns(plan, cfg, policy)
    except IngestError:  # e.g. a glob the range tasks found matched nothing
        _forget_config_if_nothing_staged(run)
        raise
    before = _earlier_quarantine(run)
    # The objects an earlier run's units failed on are given up if they fail again (readers.ReadOptions.give_up).
    salvage = {u: frozenset(objects) for u, objects in (before or {}).items() if objects and cfg.give_up_quarantined}
    # Units that failed whole before: in a give-up run, an outage their web URLs seem to show is confirmed first.
    confirm = {u for u, objects in (before or {}).items() if not objects and cfg.give_up_quarantined}
    quarantined: list[tuple[int, Failed]] = []
    inputs = run.phase("stage", run_stage, _stage_tasks(plan, cfg, layout, policy, salvage, confirm),
                       len(plan.unit_kind), ("inputs", "seconds"), progress="inputs", quarantine=quarantined)["inputs"]
    skip = {i for i, _ in quarantined}  # units that could not be staged: the run goes on without them
    skipped = np.asarray(sorted(skip), np.int64)
    # What each unit failed on: its loose files (those that failed before too stay named), or [] for the whole unit.
    failed_on = {u: sorted(set(f.objects) | set((before or {}).get(u, ()))) if f.objects else []
                 for u, f in quarantined}
    _forget_dedup_if_staging_changed(run, before, failed_on)
    per_band = blocks_per_band(cfg.near_threshold, int(inputs.sum()))
    per_input = 1 + (cfg.dedup != "none") + (len(bands(cfg.near_threshold, per_band)) if cfg.dedup == "near" else 0)
    # Groups by shuffle records, not inputs alone: a map task holds its group's records, and a --near-threshold of 5
    # or more has 3.5-12x more bands than 4 at 300M (126, 462), past a map task's memory (review s16b).
    group_starts = _groups(inputs, min(cfg.group_inputs, max(1, GROUP_RECORDS // per_input)))
    records = int(inputs.sum()) * per_input
    buckets = max(1, -(-records // cfg.bucket_records))
    groups = [(g, int(a), int(b)) for g, (a, b) in enumerate(zip(group_starts, [*group_starts[1:], len(inputs)]))]
    _forget_dedup_if_layout_changed(run, group_starts, buckets, per_band)
    so = cfg.storage_options
    maps = ((g, DedupMapTask(g, a, b, buckets, cfg.dedup, cfg.near_threshold, per_band, layout, so,
                             _within(skipped, a, b))) for g, a, b in groups)
    run.phase("map", run_map, maps, len(groups), ("records",))
    starts = tuple(int(x) for x in group_starts)
    reduces = ((b, DedupReduceTask(b, starts, cfg.near_threshold, layout, so, buckets)) for b in range(buckets))
    run.phase("reduce", run_reduce, reduces, buckets, ("records", "losers"))
    resolves = ((g, ResolveTask(g, a, b, buckets, layout, so, _within(skipped, a, b), len(groups)))
                for g, a, b in groups)
    resolved = run.phase("resolve", run_resolve, resolves, len(groups), ("kept",), keep_json="verdicts")
    kept = resolved["kept"]
    num_shards = -(-int(kept.sum()) // cfg.samples_per_shard)
    shards = run.phase("shard", run_shard, _shard_tasks(kept, cfg.samples_per_shard, layout, so), num_shards,
                       ("samples", "bytes"), progress="samples")

    verdicts: Counter = Counter()
    for v in resolved["verdicts"]:
        verdicts.update(json.loads(v))
    # Given up whole only when every unit still quarantined had failed whole in the earlier run too: a fault that
    # lasts minutes (an S3 slowdown under 1,280 readers, a full disk) quarantines units in one run and is gone by
    # the next, and giving them up at once would make a passing fault lost data (and final: reruns are no-ops). A
    # unit that now fails on loose files that did not fail before is quarantined for the first time, for them.
    again = {u for u in skip if (before or {}).get(u) == [] and failed_on[u] == []}
    give_up = bool(quarantined) and cfg.give_up_quarantined and skip <= again
    if quarantined and cfg.give_up_quarantined and not give_up:
        log.warning("--give-up-quarantined: %d unit(s) failed for the first time (or on files that had not failed "
                    "before) are not given up; a rerun retries them and gives up what fails again", len(skip - again))
    chunks = 0  # the given-up rejects parts this run wrote: any numbered past them are an earlier run's
    if give_up:
        rows, chunks = _give_up(run, plan, quarantined, policy)
        verdicts["quarantined"] += rows
    names = [layout.shard_file(i) for i in range(num_shards)]
    put_table(layout.shard_index, pa.table({"shard": names, "samples": shards["samples"], "bytes": shards["bytes"]}),
              so)
    _remove_stale_outputs(fs, layout, num_shards, len(groups), chunks)
    put_bytes(layout.classes, json.dumps(list(plan.classes)).encode(), so)
    report = build_report(cfg.public_dict(), fingerprint, verdicts, num_shards, int(shards["bytes"].sum()),
                          time.perf_counter() - start, plan.classes)
    report["listing_fingerprint"] = plan.fingerprint
    report["quarantined"] = [{"unit": i, "reason": f.reason, "where": f.where} for i, f in quarantined]
    report["gave_up_quarantined"] = give_up  # then the output is final without them (their inputs in rejects)
    report["nodes"] = len(run.engine.nodes)  # that ran this run's tasks (1 for the local engine)
    put_bytes(layout.report, json.dumps(report, indent=1).encode(), so)
    return report


def _within(units: np.ndarray, first: int, end: int) -> tuple[int, ...]:
    """The sorted `units` in [first, end): by bisection, as it runs for every group (a scan was groups x units)."""
    return tuple(int(u) for u in units[np.searchsorted(units, first):np.searchsorted(units, end)])


def _check_columns(plan: Plan, cfg: IngestConfig, policy: RetryPolicy) -> None:
    """The parquet columns the arguments name, against the first parquet source listed that reads
    (sources.check_columns)."""
    hash_column = (cfg.hash_check() or (None,))[0]
    if not cfg.keep_columns and hash_column is None:
        return
    parquet = np.flatnonzero(plan.unit_kind == UNIT_KINDS.index("parquet"))
    if not len(parquet):
        flags = [f for f, on in (("--keep-columns", cfg.keep_columns), ("--verify-hash", hash_column)) if on]
        raise IngestError(f"{' and '.join(flags)}: parquet columns, but no source is a parquet file")

    def urls():  # each parquet file once (a big one spans several units), read from the plan as needed
        last = None
        for u in parquet:
            part, start, _ = plan.slices(int(u))[0]
            url = retry(lambda: read_part_rows(part, start, start + 1, cfg.storage_options), policy,
                        f"read {part}")[0]["url"]
            if url != last:
                yield url
            last = url

    check_columns(urls(), cfg.keep_columns, hash_column, cfg.storage_options, policy)


def _forget_config_if_nothing_staged(run: Run) -> None:
    """A run stopped while planning, before any unit was staged under its arguments: its config.json goes, so the
    corrected command on the same output is not refused as "made with different arguments"."""
    stage = url_to_fs(f"{run.layout.work}/stage", run.cfg.storage_options)[1]
    config = url_to_fs(run.layout.config, run.cfg.storage_options)[1]
    report = url_to_fs(run.layout.report, run.cfg.storage_options)[1]  # an earlier run's output: config stays
    if not run.fs.exists(stage) and not run.fs.exists(report) and run.fs.exists(config):
        run.fs.rm_file(config)


def _earlier_quarantine(run: Run) -> dict[int, list[str]] | None:
    """The units the earlier run had quarantined, each with the loose files it failed on ([]: the unit failed
    whole); None: no earlier run got past staging. (A list of units, from before the files were recorded, reads as
    units that failed whole.)"""
    fs, path = url_to_fs(run.layout.quarantined, run.cfg.storage_options)
    if not fs.exists(path):
        return None
    saved = json.loads(fs.cat_file(path))
    return {int(u): [] for u in saved} if isinstance(saved, list) else {int(u): list(o) for u, o in saved.items()}


def _forget_dedup_if_staging_changed(run: Run, before: dict[int, list[str]] | None,
                                     failed_on: dict[int, list[str]]) -> None:
    """Dedup, resolve and shard results hold for one set of staged units. If a rerun staged units an earlier run
    had quarantined, those results are stale: their done marks and summaries go, so the phases run again (and
    rewrite every shard). Removed first, recorded second (the units quarantined now, with what they failed on):
    a kill in between removes them again."""
    if before is not None and sorted(before) != sorted(failed_on):
        _forget_dedup(run)
    record = {str(u): failed_on[u] for u in sorted(failed_on)}
    put_bytes(run.layout.quarantined, json.dumps(record).encode(), run.cfg.storage_options)


def _forget_dedup_if_layout_changed(run: Run, group_starts: np.ndarray, buckets: int, per_band: int) -> None:
    """The done marks and summaries of map, reduce, resolve and shard are numbered by dedup group and bucket, so
    they hold for one cut of the shuffle. `group_inputs` and `bucket_records` are not fingerprinted (the output does
    not depend on them), but a rerun under other values (or a version with other defaults) would mix two cuts:
    groups of one read as groups of the other, the parts of buckets past the new count never reduced: samples lost
    or duplicates kept, silently (reviews s16a/s16b reproduced both). So the cut is recorded, and a rerun that cuts
    differently forgets those phases and redoes them (minutes at 300M; staging, the hours, is kept). Removed
    first, recorded second: a kill in between removes them again."""
    cut = {"group_starts": hashlib.sha256(np.asarray(group_starts, "<i8").tobytes()).hexdigest(),
           "groups": len(group_starts), "buckets": buckets, "per_band": per_band}
    fs, path = url_to_fs(run.layout.dedup_layout, run.cfg.storage_options)
    if fs.exists(path) and json.loads(fs.cat_file(path)) == cut:
        return
    _forget_dedup(run)  # no record: a first run (nothing to forget) or one by a version that did not record its cut
    put_bytes(run.layout.dedup_layout, json.dumps(cut).encode(), run.cfg.storage_options)


def _forget_dedup(run: Run) -> None:
    """Remove the done marks and saved summaries of map, reduce, resolve and shard: they run again. The shards will
    be rewritten (renumbered when units were added), so an earlier run's report.json and shards.parquet go first:
    they would describe tars that change under them, and a kill would leave them so (review s16a)."""
    for url in (run.layout.report, run.layout.shard_index):
        path = url_to_fs(url, run.cfg.storage_options)[1]
        if run.fs.exists(path):
            run.fs.rm_file(path)
    done = url_to_fs(f"{run.layout.work}/done", run.cfg.storage_options)[1]
    if not run.fs.exists(done):
        return
    for p in run.fs.ls(done, detail=False):
        if any(p.rsplit("/", 1)[-1].startswith(phase) for phase in ("map", "reduce", "resolve", "shard")):
            run.fs.rm(p, recursive=True)


def _stage_tasks(plan: Plan, cfg: IngestConfig, layout: Layout, policy: RetryPolicy,
                 salvage: dict[int, frozenset[str]], confirm: set[int]):
    read = ReadOptions(cfg.clean.max_bytes, cfg.image_column, cfg.label_column, cfg.storage_options, policy,
                       cfg.download_threads, cfg.http_timeout_s, frozenset(cfg.opt_out_directives), cfg.keep_columns,
                       hash_check=cfg.hash_check())
    for u in range(len(plan.unit_kind)):
        lo, hi = (int(x) for x in plan.unit_rows[u])
        yield u, StageTask(u, UNIT_KINDS[plan.unit_kind[u]], plan.slices(u), (lo, hi), plan.classes, layout,
                           cfg.clean, cfg.dedup, replace(read, give_up=salvage.get(u, frozenset()),
                                                         confirm_outages=u in confirm))


GROUP_RECORDS = 250_000 * 37  # shuffle records a map task holds at most: the default group at t = 4, 35 bands


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


def _give_up(run: Run, plan: Plan, quarantined: list[tuple[int, Failed]], policy: RetryPolicy) -> tuple[int, int]:
    """The units given up whole, as rejects written by give-up tasks (give_up.py): (rows written, parts written).
    A task that fails stops the run (QuarantineError) once the others are done; the rerun writes every part again."""
    rows, chunks, failures = 0, 0, []
    tasks = give_up_tasks(plan, quarantined, run.layout, run.cfg.storage_options, policy)
    for chunk, result in run.engine.run(run_give_up, tasks, RESOURCES["give_up"]):
        chunks = max(chunks, chunk + 1)
        if isinstance(result, Failed):
            failures.append((chunk, result))
        else:
            rows += result["rows"]
    if failures:
        raise QuarantineError("give_up", failures)
    return rows, chunks


def _remove_stale_outputs(fs, layout: Layout, num_shards: int, num_groups: int, given_up_chunks: int) -> None:
    """Shards, manifest and rejects parts numbered past this run's: left by a run over sources that changed; and
    the given-up units' rejects of an interrupted run whose units this run could read after all (or of a version
    that wrote them as one quarantined.parquet)."""
    root = url_to_fs(layout.output)[1]
    if fs.exists(f"{root}/rejects.parquet/quarantined.parquet"):
        fs.rm_file(f"{root}/rejects.parquet/quarantined.parquet")
    for pattern, limit in (("shard-*.tar", num_shards), ("shard-*.idx", num_shards),
                           ("manifest.parquet/part-*.parquet", num_shards),
                           ("rejects.parquet/part-*.parquet", num_groups),
                           ("rejects.parquet/quarantined-*.parquet", given_up_chunks)):
        for p in fs.glob(f"{root}/{pattern}"):
            if int(p.rsplit("-", 1)[1].split(".")[0]) >= limit:
                fs.rm_file(p)


def _finished_report(fs, layout: Layout) -> dict | None:
    path = url_to_fs(layout.report)[1]
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


