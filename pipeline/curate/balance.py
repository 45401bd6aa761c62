"""Balanced sampling down a cluster hierarchy (Vo et al. 2024, Sec. 4.3): the target is split as evenly as possible
over the top-level clusters, each cluster's share as evenly over its children, down to level 1, where a cluster
keeps that many of its samples (the smallest ordinal hashes: a uniform random choice that is the same everywhere).

"As evenly as possible" is water-filling: every cluster gets min(size, cap), with the cap the largest that fits the
target; the few units left over go one each to clusters above the cap, chosen by a seeded hash of the cluster id
(Vo et al. choose them at random). Small clusters give everything, large ones are cut to the same size.
"""

from __future__ import annotations

import numpy as np

from pipeline.curate.hashing import unit_hash
from pipeline.curate.hkmeans import Hierarchy


def allocate(sizes: np.ndarray, target: int, seed: int, ids: np.ndarray | None = None, salt: int = 0) -> np.ndarray:
    """sizes: (K,) samples per cluster -> (K,) int64 quotas with quota <= size, sum = min(target, sum(sizes)),
    and no quota more than 1 below another's unless that cluster is exhausted. ids: (K,) the clusters' ids, which
    (with salt, the level) seed the choice of who gets the units left over."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.sum() <= target:
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # invariant: sum(min(sizes, lo)) <= target < sum(min(sizes, hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid
    quotas = np.minimum(sizes, lo)
    left = target - int(quotas.sum())
    above = np.flatnonzero(sizes > lo)
    tag = (np.arange(len(sizes)) if ids is None else np.asarray(ids, dtype=np.int64))[above]
    order = np.lexsort((tag, unit_hash(tag + (np.int64(salt) << 32), seed)))
    quotas[above[order[:left]]] += 1
    return quotas


def level_sizes(level1_sizes: np.ndarray, hierarchy: Hierarchy) -> list[np.ndarray]:
    """(k_1,) samples per level-1 cluster -> [(k_t,) samples per level-t cluster for t = 1..top]: a cluster holds
    the samples of its children."""
    sizes = [np.asarray(level1_sizes, dtype=np.int64)]
    for parent, upper in zip(hierarchy.parents, hierarchy.centroids[1:]):
        sizes.append(np.bincount(parent, weights=sizes[-1], minlength=len(upper)).astype(np.int64))
    return sizes


def hierarchical_quotas(level1_sizes: np.ndarray, hierarchy: Hierarchy, target: int, seed: int) -> np.ndarray:
    """level1_sizes: (k_1,) samples per level-1 cluster -> (k_1,) level-1 quotas summing to min(target, total)."""
    sizes = level_sizes(level1_sizes, hierarchy)
    quotas = allocate(sizes[-1], target, seed, salt=hierarchy.levels)
    for level in range(hierarchy.levels - 2, -1, -1):  # top-down: split each parent's quota over its children
        parent = hierarchy.parents[level]
        child_quotas = np.zeros(len(parent), dtype=np.int64)
        order = np.argsort(parent, kind="stable")
        bounds = np.searchsorted(parent[order], np.arange(len(quotas) + 1))
        for p in np.flatnonzero(quotas):
            children = order[bounds[p]:bounds[p + 1]]
            child_quotas[children] = allocate(sizes[level][children], int(quotas[p]), seed, children, salt=level + 1)
        quotas = child_quotas
    return quotas


def pick(hashes: np.ndarray, ordinals: np.ndarray, quota: int) -> np.ndarray:
    """Indices of the `quota` samples with the smallest (hash, ordinal), in input order."""
    order = np.lexsort((ordinals, hashes))
    return np.sort(order[:quota])
