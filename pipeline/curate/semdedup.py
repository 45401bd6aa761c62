"""Semantic dedup within one cluster: samples whose cosine similarity exceeds a threshold are linked, the connected
components are the duplicate groups (as DINOv2's copy detection), and each group keeps its lowest ordinal.

Within a cluster the links come from faiss's exact range search (all pairs above the threshold, memory in the
number of links rather than n^2); across clusters no pair is compared, which is what makes it scale (SemDeDup,
NeMo Curator): k-means puts near-copies in one cluster, and a pair split by a cluster boundary is the approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass(frozen=True)
class Groups:
    """Per sample of the cluster (in the order given): keeper = index of its group's kept sample (itself when kept);
    similarity = cosine to that keeper (1.0 for a keeper)."""

    keeper: np.ndarray  # (n,) int64
    similarity: np.ndarray  # (n,) float32

    @property
    def removed(self) -> np.ndarray:
        return self.keeper != np.arange(len(self.keeper))


def duplicate_groups(x: np.ndarray, threshold: float) -> Groups:
    """x: (n, D) unit vectors of one cluster, sorted by ordinal (so the lowest index is the lowest ordinal).

    Two samples are linked when their cosine is > threshold; groups are the connected components."""
    n = len(x)
    if n == 0:
        return Groups(np.zeros(0, np.int64), np.zeros(0, np.float32))
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, nbrs = index.range_search(x, float(threshold))
    rows = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    graph = coo_matrix((np.ones(len(nbrs), np.int8), (rows, nbrs)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    # the lowest index of every component: its members are sorted, so the first occurrence
    first = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n))
    keeper = first[component]
    similarity = np.einsum("ij,ij->i", x, x[keeper]).astype(np.float32)
    return Groups(keeper, similarity)
