"""The curation's algorithms on small synthetic embeddings, against brute-force computations (no model, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.curate.balance import allocate, hierarchical_quotas, pick
from pipeline.curate.hashing import unit_hash
from pipeline.curate.hkmeans import Hierarchy, build_hierarchy
from pipeline.curate.kmeans import EmbeddingSpace, nearest, spherical_kmeans, unit_rows
from pipeline.curate.semdedup import duplicate_groups
from pipeline.curate.shard_samples import _scan_tar, list_samples, read_members
from pipeline.ingest.writer import write_shard


def _blobs(rng: np.random.Generator, sizes: list[int], dim: int = 16, spread: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around len(sizes) random centres; returns (x, blob id)."""
    centres = unit_rows(rng.normal(size=(len(sizes), dim)))
    blob = np.repeat(np.arange(len(sizes)), sizes)
    return unit_rows(centres[blob] + spread * rng.normal(size=(len(blob), dim))), blob


def test_nearest_is_the_brute_force_argmax():
    rng = np.random.default_rng(0)
    x, c = unit_rows(rng.normal(size=(500, 16))), unit_rows(rng.normal(size=(20, 16)))
    ids, sims = nearest(x, c)
    sim = x @ c.T
    np.testing.assert_array_equal(ids, sim.argmax(1))
    np.testing.assert_allclose(sims, sim.max(1), rtol=1e-5, atol=1e-6)


def test_spherical_kmeans_is_reproducible_and_finds_the_blobs():
    rng = np.random.default_rng(1)
    x, blob = _blobs(rng, [80, 60, 40, 30, 20])
    c1, c2 = spherical_kmeans(x, 5, seed=3), spherical_kmeans(x, 5, seed=3)
    np.testing.assert_array_equal(c1, c2)  # same points, order and seed: same centroids, bit for bit
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, rtol=1e-5)
    assign = nearest(x, c1)[0]
    # every blob is one cluster and every cluster one blob
    assert all(len(set(assign[blob == b])) == 1 for b in range(5)) and len(set(assign)) == 5
    assert len(spherical_kmeans(x[:3], 5, seed=0)) == 3  # k is capped at the number of points


def test_embedding_space_standardises_then_normalises():
    rng = np.random.default_rng(2)
    raw = 5.0 + rng.normal(size=(200, 8)) * np.arange(1, 9)  # a large common component, unequal scales
    space = EmbeddingSpace.fit(raw)
    z = space.project(raw)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    std = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(z, std / np.linalg.norm(std, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)


def _brute_force_groups(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph sim > threshold by breadth-first search; keeper = lowest index."""
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    keeper = np.full(len(x), -1)
    for start in range(len(x)):
        if keeper[start] >= 0:
            continue
        keeper[start], frontier = start, [start]
        while frontier:
            i = frontier.pop()
            for j in np.flatnonzero(sim[i] > threshold):
                if keeper[j] < 0:
                    keeper[j] = start
                    frontier.append(j)
    return keeper, sim[np.arange(len(x)), keeper]


@pytest.mark.parametrize("threshold", [0.9, 0.97])
def test_duplicate_groups_match_brute_force(threshold):
    rng = np.random.default_rng(3)
    base = unit_rows(rng.normal(size=(200, 24)))
    # 30 of them get 1-6 near-copies each, at distances that straddle the thresholds (some chains, some misses)
    copies = [unit_rows(base[i] + s * rng.normal(size=(n, 24)))
              for i, n, s in zip(rng.choice(200, 30, replace=False), rng.integers(1, 7, 30), rng.uniform(0.02, 0.12, 30))]
    x = np.concatenate([base, *copies])[rng.permutation(200 + sum(len(c) for c in copies))]
    groups = duplicate_groups(x, threshold)
    keeper, similarity = _brute_force_groups(x, threshold)
    np.testing.assert_array_equal(groups.keeper, keeper)
    np.testing.assert_allclose(groups.similarity, similarity, rtol=1e-5, atol=1e-5)
    assert 10 < groups.removed.sum() < 150  # the data has duplicates, and the threshold separates them from the rest


def test_allocate_water_fills_exactly():
    rng = np.random.default_rng(4)
    for _ in range(50):
        sizes = rng.integers(0, 60, rng.integers(1, 12))
        target = int(rng.integers(0, sizes.sum() + 20))
        q = allocate(sizes, target, seed=0)
        assert (q >= 0).all() and (q <= sizes).all() and q.sum() == min(target, sizes.sum())
        # balanced: a quota more than 1 below another's only when its cluster gave everything it had
        for i in range(len(q)):
            assert q[i] == sizes[i] or q[i] >= q.max() - 1
    np.testing.assert_array_equal(allocate(np.array([1, 50, 3, 20, 7]), 30, seed=0), [1, 9, 3, 10, 7])


def test_hierarchical_quotas_split_the_target_evenly_down_the_tree():
    # level 1: six clusters under level 2 [0, 0, 1, 2, 2, 3], under the top level [0, 0, 1, 1]
    hierarchy = Hierarchy(centroids=(np.zeros((6, 2)), np.zeros((4, 2)), np.zeros((2, 2))),
                          parents=(np.array([0, 0, 1, 2, 2, 3]), np.array([0, 0, 1, 1])))
    sizes = np.array([50, 50, 50, 2, 10, 100])
    # top: 150 vs 112 -> 40 / 40; top 0: 20 / 20 -> 10, 10 | 20; top 1: 12 (all) / 28 -> 2, 10 | 28
    np.testing.assert_array_equal(hierarchical_quotas(sizes, hierarchy, 80, seed=0), [10, 10, 20, 2, 10, 28])
    np.testing.assert_array_equal(hierarchical_quotas(sizes, hierarchy, 10_000, seed=0), sizes)


def test_pick_takes_the_smallest_hashes():
    ordinals = np.arange(100, 200)
    hashes = unit_hash(ordinals, seed=7)
    chosen = pick(hashes, ordinals, 10)
    np.testing.assert_array_equal(chosen, np.sort(np.argsort(hashes)[:10]))


def test_unit_hash_is_deterministic_and_uniform():
    ordinals = np.arange(20_000, dtype=np.int64) << 32
    h = unit_hash(ordinals, seed=0)
    np.testing.assert_array_equal(h, unit_hash(ordinals, seed=0))
    assert (h >= 0).all() and (h < 1).all() and abs(h.mean() - 0.5) < 0.01
    assert np.histogram(h, bins=10, range=(0, 1))[0].min() > 1800  # no bin far below 2,000
    assert not np.array_equal(h, unit_hash(ordinals, seed=1))


def test_hierarchy_levels_are_consistent():
    rng = np.random.default_rng(5)
    level1 = spherical_kmeans(_blobs(rng, [300, 30, 30, 30, 30, 30])[0], 60, seed=0)
    h = build_hierarchy(level1, (12, 4), resampling_steps=3, seed=0)
    assert [len(c) for c in h.centroids] == [60, 12, 4]
    for t, parent in enumerate(h.parents):  # a cluster's parent is the nearest centroid of the level above
        np.testing.assert_array_equal(parent, nearest(h.centroids[t], h.centroids[t + 1])[0])
    top = h.ancestors(np.arange(60))[-1]
    np.testing.assert_array_equal(top, h.parents[1][h.parents[0]])


def test_shard_listing_from_the_index_and_from_the_tar(tmp_path):
    samples = [(f"k{i:03d}", {"jpg": bytes([i]) * (100 + i), "cls": str(i % 3).encode()}) for i in range(7)]
    url = str(tmp_path / "shard-000000.tar")
    write_shard(url, samples)
    listed = list_samples(url, {})
    assert [s.key for s in listed] == [k for k, _ in samples]
    assert listed == _scan_tar(url, {})  # DALI's index and the tar headers agree
    got = dict(read_members(url, [listed[5], listed[2]], {}))
    assert got == {"k005": samples[5][1], "k002": samples[2][1]}
