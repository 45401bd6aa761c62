"""run_curation: embeddings -> dedup -> hierarchy and balanced selection -> new shards, manifest, report, picture.

Stages (each restartable, each a set of Ray tasks or one in-process loop with workers=1, none holding per-sample
state in the driver):
  2. dedup_stage.run_dedup        k-means -> shuffle by cluster -> duplicate groups + level-1 pieces per bucket
  3. balance_stage.run_balance    upper levels, quotas -> per-bucket selection -> selected rows shuffled by part
  4. write_stage                  curated shards in input order + manifest rows per shard
  5. here                         manifest.parquet, removed.parquet, clusters.png, then report.json (= done)
Stage 1, the embedding pass, needs the model and runs on the training ranks: jobs/curate/embed.py.

The selection is a function of (embeddings, arguments) alone: every choice is a hash of ordinals or a seeded faiss
k-means over inputs sorted by ordinal, and tasks' results are combined in task order; so the same inputs and
arguments give the same curated dataset with any number of ranks (parts do not depend on them) or workers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import pyarrow as pa

from pipeline.curate.balance_stage import REMOVED_SCHEMA, run_balance
from pipeline.curate.config import CurateConfig, fingerprint
from pipeline.curate.dedup_stage import run_dedup
from pipeline.curate.embeddings import EmbeddingSet
from pipeline.curate.grid import draw_grid
from pipeline.curate.layout import Layout
from pipeline.curate.report import build_report
from pipeline.curate.storage import (concat_tables, exists, get_bytes, list_files, put_bytes, remove, url_to_fs,
                                     write_table)
from pipeline.curate.write_stage import MANIFEST_SCHEMA, plan_writes, write_curated
from pipeline.ingest.cluster import start_engine

log = logging.getLogger(__name__)


class OutputExists(Exception):
    """The output prefix holds a curated dataset made with other arguments (and --overwrite was not given)."""


def run_curation(emb: EmbeddingSet, cfg: CurateConfig, embedded_now: int = 0, embed_seconds: float = 0.0,
                 ranks: int = 1) -> dict:
    """Stages 2-5 on the finished embeddings; returns the report. embedded_now / embed_seconds / ranks: what the
    embedding pass of this run did (for the report's throughput)."""
    so = cfg.storage_options
    layout = Layout(cfg.output.rstrip("/"))
    fp_dedup = fingerprint(emb.folder, cfg.dedup, cfg.balance.level1_size, cfg.bucket_rows, cfg.seed)
    fp_balance = fingerprint(fp_dedup, cfg.balance)
    fp_output = fingerprint(fp_balance, cfg.samples_per_shard)
    done = _previous(layout, fp_output, cfg.overwrite, so)
    if done is not None:
        log.info("%s is already curated with these arguments", layout.output)
        return done
    if cfg.workers > 1 or cfg.ray_address:
        _start_ray(cfg, emb)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    dedup = run_dedup(emb, layout.stage("dedup", fp_dedup), cfg.dedup, cfg.balance.level1_size, cfg.bucket_rows,
                      cfg.seed, cfg.workers, cfg.ray_address, so)
    seconds["dedup"], t0 = time.monotonic() - t0, time.monotonic()
    balance = run_balance(emb, dedup, layout.stage("balance", fp_balance), cfg.balance, cfg.seed, cfg.grid_clusters,
                          cfg.grid_samples, cfg.workers, cfg.ray_address, so)
    seconds["balance"], t0 = time.monotonic() - t0, time.monotonic()
    part_counts: dict[int, int] = {}
    for s in balance.stats:
        for p, n in s["parts"].items():
            part_counts[int(p)] = part_counts.get(int(p), 0) + n
    tasks = plan_writes(part_counts, emb.shards_per_part, emb.part_shards, balance.selected_prefix, layout,
                        f"{layout.stage('output', fp_output)}/manifest", cfg.samples_per_shard, so)
    _remove_shards_from(layout, len(tasks), so)
    manifests = write_curated(tasks, cfg.workers, cfg.ray_address)
    concat_tables(manifests, layout.manifest, so, MANIFEST_SCHEMA)
    write_table(layout.shard_index, pa.table({"shard": [layout.shard_name(t.index) for t in tasks],
                                              "samples": [t.count for t in tasks]}), so)
    concat_tables([balance.removed(b) for b in range(dedup.num_buckets)], layout.removed, so, REMOVED_SCHEMA)
    seconds["write"], t0 = time.monotonic() - t0, time.monotonic()
    put_bytes(layout.grid, draw_grid(emb, balance, cfg.grid_samples, so), so)
    fs, _ = url_to_fs(layout.output, so)
    shard_bytes = sum(fs.size(url_to_fs(layout.shard(t.index), so)[1]) for t in tasks)
    config = asdict(cfg) | {"storage_options": "<redacted>", "fingerprint": fp_output, "embeddings": emb.folder}
    embedding = {"samples": embedded_now, "seconds": round(embed_seconds, 2), "ranks": ranks,
                 "images_per_s": round(embedded_now / embed_seconds, 1) if embedded_now else None}
    report = build_report(config, emb, balance, dedup.num_clusters, len(tasks), shard_bytes, seconds) | {
        "embedding": embedding}
    put_bytes(layout.report, json.dumps(report, indent=1).encode(), so)
    return report


def _start_ray(cfg: CurateConfig, emb: EmbeddingSet) -> None:
    """Ray as the ingest starts it: joining a cluster ships the `pipeline` package (every task of stages 2-4 lives
    in it) to each node, and a multi-node cluster is refused a local output or input (each node would see its own
    disk). The input shards share one store, so the first stands for all."""
    start_engine("ray", cfg.workers, cfg.ray_address, cfg.output, emb.shards[:1], cfg.storage_options)


def check_output(cfg: CurateConfig) -> None:
    """Fail before any work when `cfg.output` holds a finished curation made with other arguments (no --overwrite)."""
    layout = Layout(cfg.output.rstrip("/"))
    if cfg.overwrite or not exists(layout.report, cfg.storage_options):
        return
    previous = json.loads(get_bytes(layout.report, cfg.storage_options))["config"]
    if {k: v for k, v in previous.items() if k in _ARGUMENTS} != _arguments(cfg):
        raise OutputExists(f"{layout.output} holds a curated dataset made with other arguments: pass --overwrite "
                           "to replace it")


_ARGUMENTS = ("dedup", "balance", "samples_per_shard", "bucket_rows", "seed")


def _arguments(cfg: CurateConfig) -> dict:
    """The arguments that change the result, as JSON values (as the report's config records them)."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k in _ARGUMENTS}))


def _previous(layout: Layout, fp: str, overwrite: bool, so: dict) -> dict | None:
    """The finished report of a run with the same arguments; None when there is none (or it may be replaced)."""
    if not exists(layout.report, so):
        return None
    report = json.loads(get_bytes(layout.report, so))
    if report["config"]["fingerprint"] == fp:
        return report
    if not overwrite:
        raise OutputExists(f"{layout.output} holds a curated dataset made with other arguments "
                           f"({report['config']['fingerprint']} vs {fp}): pass --overwrite to replace it")
    remove(layout.report, so)  # first: from here on the prefix no longer claims to be complete
    return None


def _remove_shards_from(layout: Layout, first: int, so: dict) -> None:
    """Delete curated shards numbered >= `first` left by an earlier run with more of them: a loader listing the
    prefix would read them."""
    for url in list_files(layout.output, so):
        name = url.rsplit("/", 1)[-1]
        if name.startswith("shard-") and int(name[6:12]) >= first:
            remove(url, so)
