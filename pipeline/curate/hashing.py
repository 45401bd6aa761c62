"""A seeded hash of sample ordinals to [0, 1): the one source of "randomness" in curation.

Every random choice (which samples fit the centroids, which samples a cluster keeps) compares these values, which
depend only on (ordinal, seed): so the choice is the same whichever task, worker or rank sees the sample.
"""

from __future__ import annotations

import numpy as np


def unit_hash(ordinals: np.ndarray, seed: int) -> np.ndarray:
    """(N,) int64 ordinals -> (N,) float64 in [0, 1), splitmix64 of (ordinal, seed)."""
    with np.errstate(over="ignore"):
        z = np.asarray(ordinals, dtype=np.int64).astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
