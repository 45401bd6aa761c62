"""Spherical k-means and nearest-centroid assignment with faiss, in the curation's embedding space.

The space: embeddings standardised per dimension with the fit sample's mean and std (what the linear probe's
BatchNorm does), then scaled to unit norm, compared by inner product (= cosine). Raw mean-pooled ViT features share
a large common component that puts every pair of images near cosine 1; standardising removes it and separates
near-copies from distinct images best of what was measured (bench/curation.py's docstring: raw, centred,
standardised, PCA-whitened).

faiss (CPU or GPU build) runs the k-means; its result depends only on the points, their order, k and the seed (the
centroid update is split over threads by centroid, so the thread count does not change it), and callers give points
sorted by ordinal, so a fit is reproducible wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class EmbeddingSpace:
    """mean, std: (D,) float32 of the fit sample (std floored, so a constant dimension maps to 0)."""

    mean: np.ndarray
    std: np.ndarray

    @staticmethod
    def fit(sample: np.ndarray) -> "EmbeddingSpace":
        """sample: (N, D) raw embeddings."""
        x = sample.astype(np.float64)
        std = x.std(axis=0)
        return EmbeddingSpace(x.mean(axis=0).astype(np.float32),
                              np.maximum(std, 1e-6 * max(std.max(), 1e-12)).astype(np.float32))

    def project(self, x: np.ndarray) -> np.ndarray:
        """(N, D) raw embeddings -> (N, D) float32 unit vectors (a zero vector stays zero)."""
        return unit_rows((np.asarray(x, dtype=np.float32) - self.mean) / self.std)


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> np.ndarray:
    """x: (N, D) unit vectors -> (min(k, N), D) unit centroids.

    faiss subsamples to max_points_per_centroid * k points by default; callers pass the sample they mean, so that
    is turned off."""
    k = max(1, min(k, len(x)))
    if k == 1:
        return unit_rows(x.mean(axis=0, keepdims=True))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=len(x) + 1,
                      min_points_per_centroid=1, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: (N, D), centroids: (K, D) unit vectors -> ((N,) int64 index of the most similar centroid, (N,) its cosine).
    Ties go to the lower index (faiss's exhaustive search keeps the first best)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), sims[:, 0]
