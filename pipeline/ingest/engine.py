"""run_ingest: source dumps -> cleaned, deduplicated WebDataset shards. The library behind tools/shard.py.

Three phases, each restartable:
  1. stage   (parallel, per unit)  read + clean + hash every input; stage cleaned JPEGs and a row per input.
  2. resolve (coordinator)         walk all rows in input order; first occurrence wins duplicates; number shards.
  3. shard   (parallel, per shard) copy staged bytes into shard-NNNNNN.tar (+ .idx), published atomically.
Then manifest.parquet, rejects.parquet, classes.json and, last, report.json (the run's completion mark).

Why this shape: global "first occurrence wins" needs every hash before any shard is numbered, and recomputing
cleaned pixels twice would double the dominant cost, so phase 1 keeps its output. Every artefact is a pure
function of (inputs, fingerprinted arguments), so after kill -9 at any moment a rerun redoes missing pieces and
yields exactly what a clean run yields, with any --workers or --engine.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.ingest.assemble import ShardTask, StagedSample, run_shard
from pipeline.ingest.atomic import put_bytes, url_to_fs
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.dedup import KEEP, Deduplicator
from pipeline.ingest.executor import default_workers, run_tasks
from pipeline.ingest.layout import Layout
from pipeline.ingest.preflight import check_output, write_config
from pipeline.ingest.report import build_report
from pipeline.ingest.sources import plan_units
from pipeline.ingest.stage import StageTask, run_stage

log = logging.getLogger(__name__)

# Test hook: "stage:N" or "shard:N" SIGKILLs this process group after N completed tasks of that phase.
KILL_HOOK_ENV = "CANVIT_INGEST_TEST_KILL_AFTER"


def run_ingest(cfg: IngestConfig) -> dict:
    start = time.perf_counter()
    layout = Layout(cfg.output.rstrip("/"))
    fingerprint = cfg.fingerprint()
    plan = plan_units(cfg.sources, cfg.unit_size, cfg.labels_from_folders, cfg.storage_options)
    check_output(layout, fingerprint, cfg.overwrite, cfg.storage_options)
    fs, _ = url_to_fs(layout.output, cfg.storage_options)
    done = _finished_report(fs, layout)
    if done is not None and done.get("fingerprint") == fingerprint:
        log.info("output %s is already complete", layout.output)
        return done
    write_config(layout, fingerprint, cfg.public_dict(), cfg.storage_options)
    workers = default_workers(cfg.workers)

    todo = [u for u in plan.units if not fs.exists(url_to_fs(layout.stage_table(u.index))[1])]
    tasks = [StageTask(u, layout, cfg.clean, cfg.image_column, cfg.label_column, cfg.storage_options) for u in todo]
    with _progress("stage", len(plan.units), len(plan.units) - len(todo), cfg.quiet) as bar:
        for n, result in enumerate(run_tasks(run_stage, tasks, workers, cfg.engine, cfg.ray_address), 1):
            bar.advance(result.inputs)
            _maybe_kill("stage", n)

    tables = [_read_table(fs, layout.stage_table(u.index)) for u in plan.units]
    verdicts, manifest_rows, reject_rows, shard_tasks = _resolve(tables, cfg, layout)

    existing = {t.index for t in shard_tasks if fs.exists(url_to_fs(layout.shard(t.index))[1])}
    with _progress("shard", len(shard_tasks), len(existing), cfg.quiet) as bar:
        todo_shards = [t for t in shard_tasks if t.index not in existing]
        for n, result in enumerate(run_tasks(run_shard, todo_shards, workers, cfg.engine, cfg.ray_address), 1):
            bar.advance(result.samples)
            _maybe_kill("shard", n)

    shard_bytes = sum(fs.size(url_to_fs(layout.shard(t.index))[1]) for t in shard_tasks)
    _write_parquet(layout.manifest, manifest_rows, MANIFEST_SCHEMA, cfg.storage_options)
    _write_parquet(layout.rejects, reject_rows, REJECTS_SCHEMA, cfg.storage_options)
    put_bytes(layout.classes, json.dumps(list(plan.classes)).encode(), cfg.storage_options)
    report = build_report(cfg.public_dict(), fingerprint, verdicts, len(shard_tasks), shard_bytes,
                          time.perf_counter() - start, plan.classes)
    put_bytes(layout.report, json.dumps(report, indent=1).encode(), cfg.storage_options)
    if not cfg.keep_staging:
        fs.rm(url_to_fs(layout.stage)[1], recursive=True)
    return report


def _resolve(tables: list[pa.Table], cfg: IngestConfig, layout: Layout):
    """Phase 2: verdict per input in input order; kept samples numbered into shards of samples_per_shard."""
    dedup = Deduplicator(cfg.dedup, cfg.near_threshold)
    verdicts: Counter = Counter()
    manifest, rejects, staged = [], [], []
    for unit, table in enumerate(tables):
        for row in table.to_pylist():
            d = dedup.decide(row["key"], row["status"], row["detail"], row["pixel_hash"], row["phash"])
            verdicts[d.verdict] += 1
            if d.verdict != KEEP:
                rejects.append({"source": row["source"], "reason": d.verdict, "detail": d.detail, "key": row["key"]})
                continue
            shard = len(staged) // cfg.samples_per_shard
            members = tuple((ext, row[f"{ext}_offset"], row[f"{ext}_size"]) for ext in ("jpg", "json", "cls")
                            if row[f"{ext}_offset"] >= 0)
            staged.append(StagedSample(unit, row["key"], members))
            manifest.append({"key": row["key"], "shard": layout.shard_name(shard), "width": row["width"],
                             "height": row["height"], "bytes": row["bytes"], "sha256": row["sha256"],
                             "phash": row["phash"], "source": row["source"], "label": row["label"]})
    size = cfg.samples_per_shard
    shard_tasks = [ShardTask(i // size, tuple(staged[i : i + size]), layout, cfg.storage_options)
                   for i in range(0, len(staged), size)]
    return verdicts, manifest, rejects, shard_tasks


def _finished_report(fs, layout: Layout) -> dict | None:
    path = url_to_fs(layout.report)[1]
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _read_table(fs, url: str) -> pa.Table:
    with fs.open(url_to_fs(url)[1], "rb") as f:
        return pq.ParquetFile(f).read()  # not pq.read_table: that imports pyarrow.dataset (~0.3 s per run)


def _write_parquet(url: str, rows: list[dict], schema: pa.Schema, storage_options: dict) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    put_bytes(url, buf.getvalue(), storage_options)


def _maybe_kill(phase: str, completed: int) -> None:
    hook = os.environ.get(KILL_HOOK_ENV, "")
    if hook == f"{phase}:{completed}":
        os.killpg(os.getpgrp(), signal.SIGKILL)


class _progress:
    """tqdm bar with images/s, or (quiet) one log line per finished task."""

    def __init__(self, phase: str, total: int, initial: int, quiet: bool):
        self.phase, self.quiet, self.images, self.start = phase, quiet, 0, time.perf_counter()
        self.bar = None if quiet else tqdm(total=total, initial=initial, desc=phase, unit="task", dynamic_ncols=True)
        self.tasks, self.total = initial, total

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def advance(self, images: int) -> None:
        self.images += images
        self.tasks += 1
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:.1f} images/s", refresh=False)
            self.bar.update(1)
        else:
            log.info("%s %d/%d tasks, %d images, %.1f images/s", self.phase, self.tasks, self.total, self.images, rate)


MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("phash", pa.uint64()), ("source", pa.string()),
    ("label", pa.int64()),
])
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                            ("key", pa.string())])
