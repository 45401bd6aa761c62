"""Typed settings of a curation run (tools/curate.py builds them from its flags). Nothing edits them once built."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class DedupConfig:
    """Semantic dedup (SemDeDup / NeMo Curator): k-means into clusters of about `cluster_size` samples, then
    duplicate groups within each cluster."""

    threshold: float = 0.95  # cosine above which two samples are near-copies (in kmeans.EmbeddingSpace)
    # Mean samples per dedup cluster: all-pairs range search is O(n^2 D) per cluster, and a cluster's rows must fit a
    # worker (10,000 x 768 float32 = 31 MB). k = ceil(N / cluster_size).
    cluster_size: int = 10_000
    fit_points_per_cluster: int = 100  # the centroids are fitted on a sample of k x this many samples (NeMo: a sample)
    niter: int = 20


@dataclass(frozen=True)
class BalanceConfig:
    """Hierarchical k-means and balanced sampling (Vo et al. 2024)."""

    target_size: int | None = None  # samples to keep; None = every deduplicated sample (no balancing)
    # Level 1 splits each dedup cluster by k-means into pieces of about this many samples (Vo et al. split the
    # clusters of a first k-means the same way to reach 10M level-1 clusters over 743M images: 74 each).
    level1_size: int = 75
    levels: int = 3
    clusters: tuple[int, ...] | None = None  # k of levels 2..levels; None = each level 10x fewer than the one below
    resampling_steps: int = 10  # per level above 1 (Vo et al.'s configuration: 10, and none at level 1)
    niter: int = 20

    def upper_clusters(self, level1_clusters: int) -> tuple[int, ...]:
        """k of levels 2..levels, given how many level-1 clusters the split produced."""
        if self.clusters is not None:
            if len(self.clusters) != self.levels - 1:
                raise ValueError(f"--clusters gives {len(self.clusters)} counts for levels 2..{self.levels}: "
                                 f"need {self.levels - 1}")
            return tuple(self.clusters)
        ks = [level1_clusters]
        for _ in range(self.levels - 1):
            ks.append(max(1, round(ks[-1] / 10)))
        return tuple(ks[1:])


@dataclass(frozen=True)
class CurateConfig:
    output: str  # URL of the curated dataset (shards, manifest.parquet, removed.parquet, report.json, clusters.png)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    samples_per_shard: int = 5000
    # Rows per shuffle bucket: what one reduce task holds (1M x 768 float32 = 3 GB). Buckets = ceil(N / this).
    bucket_rows: int = 1_000_000
    seed: int = 0
    workers: int = 1  # 1 = in this process; N = Ray on N local CPUs (or the cluster at ray_address)
    ray_address: str | None = None
    storage_options: dict = field(default_factory=dict)
    overwrite: bool = False  # replace a curated dataset made with other arguments at `output`
    grid_clusters: int = 6  # clusters drawn in clusters.png
    grid_samples: int = 8  # thumbnails per cluster, before and after


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-able values (dataclasses included): names a stage's working folder, so changed
    arguments get a fresh folder and unchanged ones reuse the finished work."""
    plain = [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:12]
