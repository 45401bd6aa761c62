"""Stage 3: the hierarchy above level 1, the quotas, and the selection, as one pass of Ray tasks over dedup buckets.

  hierarchy (driver)            level-1 centroids of every bucket, sorted by (dedup cluster, piece): level-1 cluster
                                ids; levels 2.. fitted on them with resampling (hkmeans.py), saved to hierarchy.npz
  quotas    (driver)            balance.hierarchical_quotas over the level-1 sizes (or every sample: no target)
  select    (one task / bucket) a level-1 cluster lies inside one dedup cluster, hence one bucket: each cluster
                                keeps the `quota` non-duplicates with the smallest ordinal hashes. Selected rows are
                                shuffled by input part (for writing in input order), dropped rows written as removed

    BALANCE/hierarchy.npz                       centroids_<t>, parents_<t>, level-1 ids' (cluster, piece)
    BALANCE/selected/bucket-<part>/...          SELECTED_SCHEMA, shuffle.py's layout
    BALANCE/removed/bucket-000000.parquet       REMOVED_SCHEMA
    BALANCE/stats/bucket-000000.json            the task's counts (written last: the task is done)

The driver holds per-cluster arrays (k_1 level-1 centroids and counts), never per-sample ones.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.curate.balance import hierarchical_quotas, level_sizes, pick
from pipeline.curate.config import BalanceConfig
from pipeline.curate.dedup_stage import ROWS_SCHEMA, DedupPlan
from pipeline.curate.embeddings import EmbeddingSet
from pipeline.curate.hashing import unit_hash
from pipeline.curate.hkmeans import Hierarchy, build_hierarchy
from pipeline.curate.records import embedding_matrix, ordinal_shard, runs
from pipeline.curate.shuffle import write_buckets
from pipeline.curate.storage import exists, get_bytes, put_bytes, read_table, write_table
from pipeline.curate.tasks import run_tasks

log = logging.getLogger(__name__)

SELECTED_SCHEMA = pa.schema([("ordinal", pa.int64()), ("key", pa.string()), ("label", pa.int64()),
                             ("cluster", pa.int64()), ("level1", pa.int64()), ("top", pa.int64())])
REMOVED_SCHEMA = pa.schema([
    ("key", pa.string()), ("ordinal", pa.int64()),
    ("reason", pa.string()),  # "duplicate" or "balance" (its level-1 cluster's quota was full)
    ("duplicate_of", pa.string()),  # key of the kept near-copy ("" for balance)
    ("similarity", pa.float32()),  # cosine to it
    ("cluster", pa.int64()), ("level1", pa.int64()), ("top", pa.int64()),
])


@dataclass(frozen=True)
class Level1:
    """The level-1 clusters in id order: cluster (dedup cluster) and piece of each, and its kept samples."""

    cluster: np.ndarray  # (k_1,) int64
    piece: np.ndarray  # (k_1,) int64
    size: np.ndarray  # (k_1,) int64

    def ids(self, cluster: np.ndarray, piece: np.ndarray) -> np.ndarray:
        """(N,) dedup cluster and piece -> (N,) level-1 ids (the table is sorted by (cluster, piece))."""
        return np.searchsorted(_pair(self.cluster, self.piece), _pair(cluster, piece))


def _pair(cluster: np.ndarray, piece: np.ndarray) -> np.ndarray:
    return (np.asarray(cluster, np.int64) << 32) | np.asarray(piece, np.int64)


@dataclass(frozen=True)
class BalanceResult:
    folder: str
    hierarchy: Hierarchy
    level1: Level1
    quotas: np.ndarray  # (k_1,) samples each level-1 cluster keeps
    grid_tops: np.ndarray  # the top-level clusters clusters.png shows
    stats: list[dict]  # one per dedup bucket, as select_bucket returns it

    @property
    def selected_prefix(self) -> str:
        return f"{self.folder}/selected"

    def removed(self, bucket: int) -> str:
        return removed_url(self.folder, bucket)


def removed_url(folder: str, bucket: int) -> str:
    return f"{folder}/removed/bucket-{bucket:06d}.parquet"


def run_balance(emb: EmbeddingSet, dedup: DedupPlan, folder: str, cfg: BalanceConfig, seed: int, grid_clusters: int,
                grid_samples: int, workers: int, ray_address: str | None, so: dict) -> BalanceResult:
    """grid_clusters / grid_samples: the picture's clusters (the largest top-level ones after dedup, known before
    selection, so tasks collect thumbnails for those only) and thumbnails per side."""
    level1, hierarchy = _hierarchy(dedup, folder, cfg, seed, so)
    if cfg.target_size is None:
        quotas = level1.size.copy()
    else:
        quotas = hierarchical_quotas(level1.size, hierarchy, cfg.target_size, seed)
    top = hierarchy.ancestors(np.arange(len(level1.size)))[-1]
    grid_tops = np.argsort(-level_sizes(level1.size, hierarchy)[-1], kind="stable")[:grid_clusters]
    tasks = []
    for b in range(dedup.num_buckets):
        mine = np.flatnonzero(level1.cluster % dedup.num_buckets == b)  # this bucket's level-1 clusters
        tasks.append(SelectTask(b, dedup.rows(b), folder, level1.cluster[mine], level1.piece[mine], mine,
                                quotas[mine], top[mine], len(hierarchy.centroids[-1]), emb.shards_per_part, seed,
                                grid_tops, grid_samples, so))
    stats = run_tasks(select_bucket, tasks, workers, ray_address)
    return BalanceResult(folder, hierarchy, level1, quotas, grid_tops, stats)


def _hierarchy(dedup: DedupPlan, folder: str, cfg: BalanceConfig, seed: int, so: dict) -> tuple[Level1, Hierarchy]:
    """The level-1 table and the fitted hierarchy, from hierarchy.npz when a previous run saved them."""
    url = f"{folder}/hierarchy.npz"
    if exists(url, so):
        z = np.load(io.BytesIO(get_bytes(url, so)))
        levels = int(z["levels"])
        hierarchy = Hierarchy(tuple(z[f"centroids_{t}"] for t in range(levels)),
                              tuple(z[f"parents_{t}"] for t in range(levels - 1)))
        return Level1(z["cluster"], z["piece"], z["size"]), hierarchy
    tables = [read_table(dedup.level1(b), so) for b in range(dedup.num_buckets)]
    table = pa.concat_tables(tables)
    cluster, piece = table.column("cluster").to_numpy(), table.column("sub").to_numpy()
    order = np.lexsort((piece, cluster))
    level1 = Level1(cluster[order], piece[order], table.column("size").to_numpy()[order])
    upper = cfg.upper_clusters(len(order))
    hierarchy = build_hierarchy(embedding_matrix(table, "centroid")[order], upper, cfg.resampling_steps, seed, cfg.niter)
    log.info("hierarchy: %s clusters per level", [len(c) for c in hierarchy.centroids])
    arrays = {f"centroids_{t}": c for t, c in enumerate(hierarchy.centroids)}
    arrays |= {f"parents_{t}": p for t, p in enumerate(hierarchy.parents)}
    buf = io.BytesIO()
    np.savez(buf, levels=hierarchy.levels, cluster=level1.cluster, piece=level1.piece, size=level1.size, **arrays)
    put_bytes(url, buf.getvalue(), so)
    return level1, hierarchy


@dataclass(frozen=True)
class SelectTask:
    bucket: int
    rows: str
    folder: str
    cluster: np.ndarray  # this bucket's level-1 clusters: dedup cluster, piece, global id, quota, top-level id
    piece: np.ndarray
    level1: np.ndarray
    quota: np.ndarray
    top: np.ndarray
    num_top: int
    shards_per_part: int
    seed: int
    grid_tops: np.ndarray
    grid_samples: int
    storage_options: dict


def select_bucket(task: SelectTask) -> dict:
    """Selects this bucket's samples; returns (and saves, as the task's completion mark) its counts:
    parts {part: selected}, top {raw, dedup, selected} per top-level cluster, level1 {ids, raw, dedup, selected},
    labels {label: [raw, dedup, selected]}, groups [[size, kept key], ...] (its 10 largest duplicate groups),
    grid {top: {"before": [[hash, ordinal], ...], "after": [...]}} for the grid_tops clusters."""
    stats_url = f"{task.folder}/stats/bucket-{task.bucket:06d}.json"
    if exists(stats_url, task.storage_options):
        return json.loads(get_bytes(stats_url, task.storage_options))
    rows = read_table(task.rows, task.storage_options)
    ordinal = rows.column("ordinal").to_numpy()
    dup = rows.column("duplicate_of").to_numpy() >= 0
    lookup = Level1(task.cluster, task.piece, task.quota)
    local = lookup.ids(rows.column("cluster").to_numpy(), rows.column("sub").to_numpy())  # index into this task's arrays
    hashes = unit_hash(ordinal, task.seed)
    selected = np.zeros(len(ordinal), bool)
    candidates = np.flatnonzero(~dup)  # duplicates never count towards a quota
    order = candidates[np.lexsort((ordinal[candidates], local[candidates]))]
    for start, end in runs(local[order]):
        members = order[start:end]
        selected[members[pick(hashes[members], ordinal[members], int(task.quota[local[members[0]]]))]] = True
    level1, top = task.level1[local], task.top[local]
    base = rows.select(["ordinal", "key", "label", "cluster"])
    chosen = base.filter(pa.array(selected)).append_column("level1", pa.array(level1[selected])).append_column(
        "top", pa.array(top[selected]))
    part = ordinal_shard(ordinal[selected]) // task.shards_per_part
    write_buckets(chosen, part, f"{task.folder}/selected", task.bucket, task.storage_options)
    dropped = ~selected
    write_table(removed_url(task.folder, task.bucket), pa.table({
        "key": rows.column("key").filter(pa.array(dropped)), "ordinal": pa.array(ordinal[dropped]),
        "reason": pa.array(np.where(dup[dropped], "duplicate", "balance").tolist(), pa.string()),
        "duplicate_of": rows.column("duplicate_key").filter(pa.array(dropped)),
        "similarity": rows.column("similarity").filter(pa.array(dropped)),
        "cluster": rows.column("cluster").filter(pa.array(dropped)), "level1": pa.array(level1[dropped]),
        "top": pa.array(top[dropped])}, schema=REMOVED_SCHEMA), task.storage_options)
    stats = _stats(task, rows, hashes, dup, selected, local, top, part)
    put_bytes(stats_url, json.dumps(stats).encode(), task.storage_options)
    return stats


def _stats(task: SelectTask, rows: pa.Table, hashes: np.ndarray, dup: np.ndarray, selected: np.ndarray,
           local: np.ndarray, top: np.ndarray, part: np.ndarray) -> dict:
    def counts(index: np.ndarray, size: int) -> list[list[int]]:
        return [np.bincount(index[m], minlength=size).tolist() for m in (np.ones_like(dup), ~dup, selected)]

    labels = rows.column("label").to_numpy()
    label_ids, label_index = np.unique(labels, return_inverse=True)
    keeper, group_size = np.unique(rows.column("duplicate_key").to_numpy(zero_copy_only=False)[dup],
                                   return_counts=True)
    biggest = np.argsort(-group_size, kind="stable")[:10]
    grid: dict[str, dict[str, list]] = {}
    ordinal = rows.column("ordinal").to_numpy()
    for t in task.grid_tops:
        for name, mask in (("before", top == t), ("after", (top == t) & selected)):
            idx = np.flatnonzero(mask)
            idx = idx[np.lexsort((ordinal[idx], hashes[idx]))[:task.grid_samples]]
            grid.setdefault(str(t), {})[name] = [[float(hashes[i]), int(ordinal[i])] for i in idx]
    parts, per_part = np.unique(part, return_counts=True)
    return {
        "parts": {str(p): int(n) for p, n in zip(parts, per_part)},
        "top": dict(zip(("raw", "dedup", "selected"), counts(top, task.num_top))),
        "level1": {"ids": task.level1.tolist(),
                   **dict(zip(("raw", "dedup", "selected"), counts(local, len(task.level1))))},
        "labels": {str(lab): [int(c[i]) for c in counts(label_index, len(label_ids))] for i, lab in
                   enumerate(label_ids)},
        "groups": [[int(group_size[i]) + 1, str(keeper[i])] for i in biggest],
        "grid": grid,
    }
