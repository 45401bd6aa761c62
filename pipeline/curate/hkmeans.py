"""Hierarchical k-means with resampling (Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning").

Level 1 clusters the points; level t > 1 clusters the centroids of level t - 1, so a dense region of the data
(many level-1 centroids) ends up as many level-1 clusters under FEW upper-level clusters: the top level spreads
over concepts roughly uniformly rather than over points, which is what balanced sampling (balance.py) needs.
Resampling (their Sec. 4.2): after a level's k-means, repeat `steps` times: take the r points closest to each
centroid, re-run k-means on their union, and re-assign every input of the level. It moves centroids from dense
regions towards sparse ones. r is half the level's mean cluster size, as their released configuration; like it,
level 1 has none (it is fitted piecewise inside the dedup clusters: dedup_stage.py), and the levels above are fitted
on the level below's centroids in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.curate.kmeans import nearest, spherical_kmeans


@dataclass(frozen=True)
class Hierarchy:
    """centroids[t]: (k_t, D) unit centroids of level t + 1 (index 0 = level 1, the finest);
    parents[t]: (k_t,) int64, the level t + 2 cluster of each level t + 1 cluster (len(parents) = levels - 1)."""

    centroids: tuple[np.ndarray, ...]
    parents: tuple[np.ndarray, ...]

    @property
    def levels(self) -> int:
        return len(self.centroids)

    def ancestors(self, level1: np.ndarray) -> list[np.ndarray]:
        """(N,) level-1 cluster ids -> [ids at level 1, level 2, ..., top]."""
        out = [np.asarray(level1, dtype=np.int64)]
        for parent in self.parents:
            out.append(parent[out[-1]])
        return out


def fit_level(x: np.ndarray, k: int, steps: int, seed: int, niter: int) -> np.ndarray:
    """x: (N, D) unit vectors -> (k', D) centroids after k-means and `steps` resampling steps (k' = min(k, N))."""
    centroids = spherical_kmeans(x, k, seed, niter)
    k = len(centroids)
    r = max(1, round(len(x) / k / 2))
    if r <= 1:  # clusters of about 2 points: resampling would keep one point each and change nothing
        return centroids
    for step in range(steps):
        assign, sims = nearest(x, centroids)
        # r points closest to each centroid: sort by (cluster, -similarity, index), keep the first r of each cluster
        order = np.lexsort((np.arange(len(x)), -sims, assign))
        starts = np.searchsorted(assign[order], np.arange(k))
        rank = np.arange(len(x)) - starts[assign[order]]
        chosen = np.sort(order[rank < r])
        centroids = spherical_kmeans(x[chosen], k, seed + 1 + step, niter)
    return centroids


def build_hierarchy(level1: np.ndarray, upper: tuple[int, ...], resampling_steps: int, seed: int,
                    niter: int = 20) -> Hierarchy:
    """level1: (k_1, D) unit centroids of level 1 (however they were fitted); upper: k of levels 2, 3, ...
    Each level clusters the centroids of the one below, with resampling."""
    centroids: list[np.ndarray] = [level1]
    parents: list[np.ndarray] = []
    for level, k in enumerate(upper, start=2):
        c = fit_level(centroids[-1], k, resampling_steps, seed + 1000 * level, niter)
        parents.append(nearest(centroids[-1], c)[0])
        centroids.append(c)
    return Hierarchy(tuple(centroids), tuple(parents))
