"""Near dedup (LSH bands + Hamming check) against brute force, and the bucket mix used by the shuffle."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ingest.dedup import _bucket
from pipeline.ingest.near import _NONE, band_keys, bands, earliest_neighbours


def _brute_force(phash: np.ndarray, ordinal: np.ndarray, threshold: int) -> np.ndarray:
    """Earliest earlier record within threshold bits, by comparing every pair."""
    out = np.full(len(phash), _NONE, np.int64)
    for i in range(len(phash)):
        near = (np.bitwise_count(phash ^ phash[i]) <= threshold) & (ordinal < ordinal[i])
        if near.any():
            out[i] = ordinal[near].min()
    return out


def _lsh(phash: np.ndarray, ordinal: np.ndarray, threshold: int, per_band: int) -> np.ndarray:
    """What the reduce tasks compute, all buckets together: the earliest winner over every band."""
    best = np.full(len(phash), _NONE, np.int64)
    for b, band in enumerate(bands(threshold, per_band)):
        group = band_keys(phash, band).astype(np.int64) * 100 + b
        winner, index = earliest_neighbours(group, phash, ordinal, threshold)
        found = index >= 0
        assert (ordinal[index[found]] == winner[found]).all()  # the index points at the winner
        best = np.minimum(best, winner)
    return best


def test_lsh_finds_every_near_pair_brute_force_finds():
    rng = np.random.default_rng(0)
    n, threshold = 4000, 4
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    for i in rng.choice(n, 1500, replace=False):  # planted near duplicates at every distance 0..threshold+1
        flips = rng.choice(64, rng.integers(0, threshold + 2), replace=False)
        phash[i] = phash[rng.integers(0, n)] ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64))
    # One cluster of hundreds of distinct values sharing band keys (skew: the dense path of near.py).
    two_bits = (np.uint64(1) << rng.integers(0, 64, 600).astype(np.uint64)) | \
        (np.uint64(1) << rng.integers(0, 64, 600).astype(np.uint64))
    phash[:600] = phash[0] ^ two_bits
    ordinal = rng.permutation(n).astype(np.int64) * 3
    want = _brute_force(phash, ordinal, threshold)
    assert (want < _NONE).sum() > 1000
    for per_band in (2, 3):  # 15 bands of 2 blocks (up to 32M inputs), 35 of 3 (beyond)
        np.testing.assert_array_equal(_lsh(phash, ordinal, threshold, per_band), want)


def test_bucket_mix_spreads_short_band_keys():
    keys = np.arange(4096, dtype=np.uint64)  # band keys with few bits: a plain modulo would fill few buckets
    counts = np.bincount(_bucket(np.full(4096, 2, np.int64), keys, np.zeros(4096, np.uint64), 16), minlength=16)
    assert counts.min() > 4096 / 16 / 2


def test_a_skewed_band_key_is_compared_in_tiles_and_matches_brute_force(monkeypatch):
    """One band key shared by many distinct hashes (skew) is compared all-pairs by near._dense, which held
    block x size at once (5 GB at 100k distinct hashes); now tiles of block x block. Small blocks here so that a
    group of 700 spans many tiles: every record's earliest neighbour within 4 bits is brute force's."""
    import functools

    from pipeline.ingest import near

    monkeypatch.setattr(near, "_dense", functools.partial(near._dense, block=64))
    rng = np.random.default_rng(3)
    n, t = 700, 4
    base = rng.integers(0, 2**63, 8, dtype=np.uint64)
    flips = rng.integers(0, 64, (n, 3))
    phash = base[rng.integers(0, 8, n)]
    for k in range(3):  # up to 3 random bits from one of 8 centres: many pairs within 4 bits, some not
        keep = rng.random(n) < 0.6
        phash = np.where(keep, phash ^ (np.uint64(1) << flips[:, k].astype(np.uint64)), phash)
    ordinal = rng.permutation(n).astype(np.int64) * 3
    winner, windex = earliest_neighbours(np.zeros(n, np.int64), phash, ordinal, t)
    dist = np.bitwise_count(phash[:, None] ^ phash[None, :])
    for i in range(n):
        earlier = np.flatnonzero((dist[i] <= t) & (ordinal < ordinal[i]))
        expected = ordinal[earlier].min() if len(earlier) else _NONE
        assert winner[i] == expected, i
        if len(earlier):
            assert ordinal[windex[i]] == expected


def test_a_skewed_band_keys_comparison_holds_a_tile_not_a_row_block_by_the_group():
    """near._dense's memory: a tile of block x block, whatever the group's size (numpy's buffers are traced)."""
    import tracemalloc

    from pipeline.ingest import near

    n, block = 6000, 256
    rng = np.random.default_rng(4)
    h = rng.integers(0, 2**63, n, dtype=np.uint64)
    o = np.arange(n, dtype=np.int64)
    best, bidx = np.full(n, _NONE, np.int64), np.full(n, -1, np.int64)
    tracemalloc.start()
    try:
        near._dense(best, bidx, h, o, 0, n, 4, block=block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * block * block, peak  # a row block by the group: ~26 x block x n = ~40 MB here


@pytest.mark.parametrize("threshold, free_bits, flip_p", [(2, 12, 0.5), (4, 24, 0.3), (4, 40, 0.2), (6, 30, 0.3),
                                                        (8, 42, 0.05), (6, 42, 0.05)])
def test_a_skewed_band_key_split_again_on_its_varying_bits_matches_brute_force(threshold, free_bits, flip_p):
    """near._near_pairs splits a large group on the bits that vary within it (pigeonhole again) instead of comparing
    all pairs; small leaves (block 100) so that it recurses: every record's earliest neighbour is brute force's.
    The last two cases cluster round a centre at a larger threshold, where splitting multiplied the work (review
    s16d: 90-550x all pairs); each level now falls back to all pairs when its runs would cost more."""
    from pipeline.ingest import near

    rng = np.random.default_rng(threshold * 100 + free_bits)
    base = rng.integers(0, 2**63, dtype=np.uint64)
    pos = rng.choice(64, free_bits, replace=False).astype(np.uint64)
    flips = rng.random((3000, free_bits)) < flip_p
    h = np.full(3000, base, np.uint64)
    for k in range(free_bits):
        h ^= np.where(flips[:, k], np.uint64(1) << pos[k], np.uint64(0))
    h = np.unique(h)
    o = rng.permutation(len(h)).astype(np.int64)
    best, bidx = np.full(len(h), _NONE, np.int64), np.full(len(h), -1, np.int64)
    near._dense(best, bidx, h, o, 0, len(h), threshold, block=100)
    dist = np.bitwise_count(h[:, None] ^ h[None, :]) <= threshold
    np.fill_diagonal(dist, False)
    expected = np.where(dist, o[None, :], _NONE).min(axis=1)
    assert (best == expected).all()
    assert (o[bidx[best != _NONE]] == best[best != _NONE]).all()
