"""Stage 2: semantic dedup, and level 1 of the cluster hierarchy, as three passes of Ray tasks over storage.

  fit     (one task per part)    a hash-chosen sample of the embeddings -> the driver fits the embedding space and
                                 k = ceil(N / cluster_size) spherical k-means centroids on it (space.npz)
  map     (one task per part)    nearest centroid of every sample; rows shuffled to bucket = cluster % buckets
  reduce  (one task per bucket)  per cluster, sorted by ordinal: duplicate groups (semdedup.py); then the kept
                                 samples are split by k-means into pieces of about level1_size: the level-1 clusters
                                 of the hierarchy (Vo et al. reach their 10M level-1 clusters the same way)

    DEDUP/space.npz                  mean, std (D,), centroids (k, D)
    DEDUP/shuffle/...                shuffle.py's layout: ordinal, key, label, cluster, embedding (unit vectors)
    DEDUP/rows/bucket-000000.parquet every sample of the bucket: ROWS_SCHEMA (no embedding)
    DEDUP/level1/bucket-000000.parquet  one row per level-1 cluster: cluster, sub, size (kept samples), centroid;
                                     written last, so its presence marks the bucket done

After this stage no embedding is read again: balancing needs only the level-1 centroids and the rows.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa

from pipeline.curate.config import DedupConfig
from pipeline.curate.embeddings import EmbeddingSet
from pipeline.curate.hashing import unit_hash
from pipeline.curate.kmeans import EmbeddingSpace, nearest, spherical_kmeans
from pipeline.curate.records import embedding_column, embedding_matrix, runs
from pipeline.curate.semdedup import duplicate_groups
from pipeline.curate.shuffle import map_done, read_bucket, write_buckets
from pipeline.curate.storage import exists, get_bytes, put_bytes, read_table, write_table
from pipeline.curate.tasks import run_tasks

log = logging.getLogger(__name__)

ROWS_SCHEMA = pa.schema([
    ("ordinal", pa.int64()), ("key", pa.string()), ("label", pa.int64()),
    ("cluster", pa.int64()),  # dedup cluster
    ("sub", pa.int64()),  # level-1 piece of that cluster (a duplicate gets its keeper's)
    ("duplicate_of", pa.int64()),  # ordinal of the group's kept sample; -1 when this one is kept
    ("duplicate_key", pa.string()),  # its key; "" when kept
    ("similarity", pa.float32()),  # cosine to the kept sample (1 when kept)
])


@dataclass(frozen=True)
class DedupPlan:
    folder: str
    num_clusters: int
    num_buckets: int

    @property
    def space(self) -> str:
        return f"{self.folder}/space.npz"

    @property
    def shuffle(self) -> str:
        return f"{self.folder}/shuffle"

    def rows(self, bucket: int) -> str:
        return f"{self.folder}/rows/bucket-{bucket:06d}.parquet"

    def level1(self, bucket: int) -> str:
        return f"{self.folder}/level1/bucket-{bucket:06d}.parquet"


def run_dedup(emb: EmbeddingSet, folder: str, cfg: DedupConfig, level1_size: int, bucket_rows: int, seed: int,
              workers: int, ray_address: str | None, so: dict) -> DedupPlan:
    """All three passes; each skips the work whose output exists. Returns where the outputs are."""
    plan = DedupPlan(folder, max(1, -(-emb.embedded // cfg.cluster_size)), max(1, -(-emb.embedded // bucket_rows)))
    if not exists(plan.space, so):
        frac = min(1.0, plan.num_clusters * cfg.fit_points_per_cluster / max(1, emb.embedded))
        samples = run_tasks(sample_part, [SampleTask(emb.part(p), frac, seed, so) for p in range(emb.num_parts)],
                            workers, ray_address)
        sample = np.concatenate([s for s in samples if len(s)]) if any(len(s) for s in samples) else None
        if sample is None:
            raise ValueError(f"{emb.folder}: no embeddings to curate (every input sample was unreadable?)")
        space = EmbeddingSpace.fit(sample)
        centroids = spherical_kmeans(space.project(sample), plan.num_clusters, seed, cfg.niter)
        log.info("dedup: %d clusters fitted on %d of %d samples", len(centroids), len(sample), emb.embedded)
        buf = io.BytesIO()
        np.savez(buf, mean=space.mean, std=space.std, centroids=centroids)
        put_bytes(plan.space, buf.getvalue(), so)
    maps = [MapTask(p, emb.part(p), plan.space, plan.num_buckets, plan.shuffle, so) for p in range(emb.num_parts)
            if not map_done(plan.shuffle, p, so)]
    run_tasks(map_part, maps, workers, ray_address)
    reduces = [ReduceTask(b, plan, emb.dim, cfg.threshold, level1_size, seed, so) for b in range(plan.num_buckets)
               if not exists(plan.level1(b), so)]
    rows = -(-emb.embedded // plan.num_buckets)  # per bucket, on average (k-means clusters are uneven: 2.5x slack)
    run_tasks(reduce_bucket, reduces, workers, ray_address, memory_bytes=_bucket_bytes(rows, emb.dim))
    return plan


def _bucket_bytes(rows: int, dim: int) -> int:
    """What a reduce task holds: its rows' unit vectors, twice (the table and the sorted copy), with slack."""
    return int(2.5 * 2 * rows * dim * 4) + (256 << 20)


@dataclass(frozen=True)
class SampleTask:
    part: str
    fraction: float
    seed: int
    storage_options: dict


def sample_part(task: SampleTask) -> np.ndarray:
    """(n, D) raw embeddings of the part's samples whose ordinal hash < fraction, in ordinal order."""
    table = read_table(task.part, task.storage_options)
    keep = unit_hash(table.column("ordinal").to_numpy(), task.seed) < task.fraction
    return embedding_matrix(table)[keep]


@lru_cache(maxsize=2)
def _load_space(url: str, storage_options_json: str) -> tuple[EmbeddingSpace, np.ndarray]:
    """(space, (k, D) centroids), read once per worker process."""
    z = np.load(io.BytesIO(get_bytes(url, json.loads(storage_options_json))))
    return EmbeddingSpace(z["mean"], z["std"]), z["centroids"]


@dataclass(frozen=True)
class MapTask:
    part_index: int
    part: str
    space: str
    num_buckets: int
    shuffle: str
    storage_options: dict


def map_part(task: MapTask) -> None:
    space, centroids = _load_space(task.space, json.dumps(task.storage_options, sort_keys=True))
    table = read_table(task.part, task.storage_options)
    x = space.project(embedding_matrix(table))
    cluster, _ = nearest(x, centroids)
    out = table.drop_columns(["embedding"]).append_column("cluster", pa.array(cluster)).append_column(
        "embedding", embedding_column(x))
    write_buckets(out, cluster % task.num_buckets, task.shuffle, task.part_index, task.storage_options)


@dataclass(frozen=True)
class ReduceTask:
    bucket: int
    plan: DedupPlan
    dim: int
    threshold: float
    level1_size: int
    seed: int
    storage_options: dict


def reduce_bucket(task: ReduceTask) -> None:
    """Duplicate groups and level-1 pieces of every cluster in the bucket; writes rows, then level-1 centroids."""
    table = read_bucket(task.plan.shuffle, task.bucket, shuffle_schema(task.dim), task.storage_options)
    order = np.lexsort((table.column("ordinal").to_numpy(), table.column("cluster").to_numpy()))
    table = table.take(pa.array(order))
    cluster, ordinal = table.column("cluster").to_numpy(), table.column("ordinal").to_numpy()
    x_all = embedding_matrix(table)
    keeper = np.arange(len(ordinal))  # row index of each row's kept sample
    sub = np.zeros(len(ordinal), np.int64)
    similarity = np.ones(len(ordinal), np.float32)
    level1: dict[str, list] = {"cluster": [], "sub": [], "size": [], "centroid": []}
    for start, end in runs(cluster):
        x = x_all[start:end]
        groups = duplicate_groups(x, task.threshold)
        kept = np.flatnonzero(~groups.removed)
        centroids = spherical_kmeans(x[kept], max(1, round(len(kept) / task.level1_size)),
                                     task.seed + int(cluster[start]))
        kept_piece = nearest(x[kept], centroids)[0]
        piece = np.zeros(end - start, np.int64)
        piece[kept] = kept_piece
        sub[start:end] = piece[groups.keeper]  # a duplicate joins its keeper's piece
        keeper[start:end] = start + groups.keeper
        similarity[start:end] = groups.similarity
        level1["cluster"] += [int(cluster[start])] * len(centroids)
        level1["sub"] += list(range(len(centroids)))
        level1["size"] += np.bincount(kept_piece, minlength=len(centroids)).tolist()
        level1["centroid"].append(centroids)
    removed = keeper != np.arange(len(ordinal))
    keys = table.column("key").to_numpy(zero_copy_only=False)
    rows = pa.table({
        "ordinal": pa.array(ordinal, pa.int64()), "key": table.column("key"), "label": table.column("label"),
        "cluster": pa.array(cluster, pa.int64()), "sub": pa.array(sub),
        "duplicate_of": pa.array(np.where(removed, ordinal[keeper], -1)),
        "duplicate_key": pa.array(np.where(removed, keys[keeper], ""), pa.string()),
        "similarity": pa.array(similarity)}, schema=ROWS_SCHEMA)
    write_table(task.plan.rows(task.bucket), rows, task.storage_options)
    centroids = np.concatenate(level1["centroid"]) if level1["centroid"] else np.zeros((0, task.dim), np.float32)
    write_table(task.plan.level1(task.bucket), pa.table({
        "cluster": pa.array(level1["cluster"], pa.int64()), "sub": pa.array(level1["sub"], pa.int64()),
        "size": pa.array(level1["size"], pa.int64()), "centroid": embedding_column(centroids)}), task.storage_options)


def shuffle_schema(dim: int) -> pa.Schema:
    return pa.schema([("ordinal", pa.int64()), ("key", pa.string()), ("label", pa.int64()), ("cluster", pa.int64()),
                      ("embedding", pa.list_(pa.float32(), dim))])
