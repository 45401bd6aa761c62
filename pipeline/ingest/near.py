"""Near duplicates among 64-bit pHashes: banded LSH whose bands are sets of blocks, checked by Hamming distance.

Split the 64 bits into b = t + s blocks. Two hashes within Hamming distance t differ in at most t blocks, so at
least s blocks agree exactly (pigeonhole): every such pair shares the key of at least one of the C(t + s, s) bands
(a band = the bits of s blocks). Recall is therefore 100% of brute force for distance <= t, whatever s is
(bench/ingest_scale.py measures it anyway); s only trades records for candidates. A band key of k bits gives each
record about N / 2^k random candidates per band, so s grows with N (`blocks_per_band`): for t = 4, s = 2 (15 bands
of 20-22 bits) up to 16.7M images, s = 3 (35 bands of 27-28 bits) up to 2 billion, so the candidates per record
stay at most ~16 per band and the cost stays linear in N up to a bounded factor. Within one s the candidates grow
with N: checking one costs ~25 ns against ~0.8 us of shuffling, sorting and resolving per record (measured at 4M
and 8M inputs), so they add ~5% per doubling at 8M and up to ~50% just below the step where s changes, which
multiplies the records by 35 / 15.

The rule every engine applies: a sample is a near duplicate when an EARLIER sample (lower input ordinal) lies
within t bits of it; its winner is the earliest such sample. This is a property of each pair, so it can be
decided band by band in any order and on any worker, and the result is the same: deterministic and independent
of the number of workers (and of s).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

_NONE = np.iinfo(np.int64).max  # "no winner"
_SMALL_GROUP = 64  # groups up to this size are compared by offsets; larger ones (skew) by dense blocks


_MAX_CANDIDATES = 16  # random band-key neighbours per record and band that a choice of s may leave


def blocks_per_band(threshold: int, inputs: int) -> int:
    """The smallest s (>= 2) whose band keys have at least log2(inputs / _MAX_CANDIDATES) bits."""
    s = 2
    while min(_band_bits(threshold, s)) < np.log2(max(inputs, 1) / _MAX_CANDIDATES) and s < 64 - threshold:
        s += 1
    return s


def bands(threshold: int, per_band: int = 2) -> list[tuple[tuple[int, int], ...]]:
    """The band definitions for `threshold` with `per_band` blocks per band: tuples of (lo, hi) bit ranges."""
    blocks = threshold + per_band
    bounds = [(64 * i // blocks, 64 * (i + 1) // blocks) for i in range(blocks)]
    return [tuple(bounds[i] for i in chosen) for chosen in combinations(range(blocks), per_band)]


def _band_bits(threshold: int, per_band: int) -> list[int]:
    return [sum(hi - lo for lo, hi in band) for band in bands(threshold, per_band)]


def band_keys(phash: np.ndarray, band: tuple[tuple[int, int], ...]) -> np.ndarray:
    """uint64 key of each hash for one band: the band's bits, concatenated."""
    key = np.zeros(len(phash), np.uint64)
    for lo, hi in band:
        key = (key << np.uint64(hi - lo)) | ((phash >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1))
    return key


def earliest_neighbours(group: np.ndarray, phash: np.ndarray, ordinal: np.ndarray, threshold: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """For each record, the earliest other record of the same group within `threshold` bits that comes before it.

    group: [N] int64 group id (band and key, hashed); phash: [N] uint64; ordinal: [N] int64, unique.
    Returns (winner ordinal [N] int64, _NONE where none; winner index [N] int64 into the inputs, -1 where none).
    """
    n = len(group)
    winner, windex = np.full(n, _NONE, np.int64), np.full(n, -1, np.int64)
    if n == 0:
        return winner, windex
    order = _lexsort3(group, phash, ordinal)
    g, h, o = group[order], phash[order], ordinal[order]
    # Identical hashes in a group collapse to one value, represented by its earliest record.
    first = np.ones(n, bool)
    first[1:] = (g[1:] != g[:-1]) | (h[1:] != h[:-1])
    value = np.cumsum(first) - 1  # value id of each sorted record
    vpos = np.flatnonzero(first)  # sorted position of each value's earliest record
    vg, vh, vo = g[vpos], h[vpos], o[vpos]
    best, bval = _value_neighbours(vg, vh, vo, threshold)  # per value: earliest OTHER value within threshold
    # Later records of a value have its earliest record (distance 0) as a candidate too.
    cand_o, cand_p = best[value], vpos[np.maximum(bval[value], 0)]
    later = ~first
    own = vo[value]
    take_own = later & (own < cand_o)
    cand_o = np.where(take_own, own, cand_o)
    cand_p = np.where(take_own, vpos[value], cand_p)
    valid = cand_o < o
    winner[order] = np.where(valid, cand_o, _NONE)
    windex[order] = np.where(valid, order[np.maximum(cand_p, 0)], -1)
    return winner, windex


def _lexsort3(group: np.ndarray, phash: np.ndarray, ordinal: np.ndarray) -> np.ndarray:
    """np.lexsort((ordinal, phash, group)) at about a third of its cost (the reduce's largest cost; lexsort is three
    stable merge sorts): one quicksort of a 64-bit key made of the group's rank and phash's top bits, then exact
    lexsort only inside runs of equal keys (same group and same top bits: identical hashes, mostly)."""
    lo, span = int(group.min()), int(group.max()) - int(group.min())
    if span.bit_length() <= 40:  # a compact group id is its own rank
        rank = (group - lo).astype(np.uint64)
    else:
        by_group = np.argsort(group)
        g = group[by_group]
        rank = np.empty(len(group), np.uint64)
        rank[by_group] = np.cumsum(np.r_[False, g[1:] != g[:-1]])
    bits = max(1, int(rank.max()).bit_length())
    key = (rank << np.uint64(64 - bits)) | (phash >> np.uint64(bits))
    order = np.argsort(key)
    k = key[order]
    equal = k[1:] == k[:-1]
    runs = np.flatnonzero(np.r_[equal, False] | np.r_[False, equal])
    inside = order[runs]
    order[runs] = inside[np.lexsort((ordinal[inside], phash[inside], k[runs]))]
    return order


def _value_neighbours(g: np.ndarray, h: np.ndarray, o: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct value (sorted by group): min ordinal among the other values of its group within threshold
    bits, and which value that is (-1: none)."""
    m = len(g)
    best, bidx = np.full(m, _NONE, np.int64), np.full(m, -1, np.int64)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, m])
    _small_runs(best, bidx, h, o, np.arange(m), starts, sizes, threshold)
    for s, z in zip(starts[sizes > _SMALL_GROUP], sizes[sizes > _SMALL_GROUP]):
        _dense(best, bidx, h, o, s, z, threshold)
    return best, bidx


def _small_runs(best, bidx, h, o, members: np.ndarray, starts: np.ndarray, sizes: np.ndarray, threshold: int) -> None:
    """All pairs within each run of 2 to _SMALL_GROUP of `members` (value indices laid out run after run), by
    offsets, vectorised over the runs; larger runs are left to the caller."""
    pos = np.arange(len(members)) - np.repeat(starts, sizes)  # position within the run
    size = np.repeat(sizes, sizes)
    i = np.flatnonzero((size <= _SMALL_GROUP) & (size > 1))
    for j in range(1, _SMALL_GROUP):
        i = i[pos[i] + j < size[i]]  # shrinks every step: the work follows the runs still that large
        if len(i) == 0:
            break
        x, y = members[i], members[i + j]
        near = np.bitwise_count(h[x] ^ h[y]) <= threshold
        a, b = x[near], y[near]
        _improve(best, bidx, a, o[b], b)
        _improve(best, bidx, b, o[a], a)


def _improve(best: np.ndarray, bidx: np.ndarray, at: np.ndarray, ords: np.ndarray, src: np.ndarray) -> None:
    """best[at] = min(best[at], ords), with duplicates in `at` resolved to the minimum."""
    if len(at) == 0:
        return
    order = np.lexsort((ords, at))
    at, ords, src = at[order], ords[order], src[order]
    head = np.r_[True, at[1:] != at[:-1]]
    at, ords, src = at[head], ords[head], src[head]
    better = ords < best[at]
    best[at[better]], bidx[at[better]] = ords[better], src[better]


def _dense(best, bidx, h, o, start: int, size: int, threshold: int, block: int = 2048) -> None:
    """All near pairs of one large group (a band key that many distinct hashes share: skew; review s16b measured
    0.9% of synthetic "object on a white background" images on one key), without comparing all pairs: _near_pairs."""
    _near_pairs(best, bidx, h, o, np.arange(start, start + size), threshold, block)


def _near_pairs(best, bidx, h, o, idx: np.ndarray, threshold: int, block: int) -> None:
    """Every pair of records `idx` within `threshold` bits, each record's best improved by them. The band trick
    again, on the bits that vary among them: split those into threshold + 1 sub-blocks; two hashes within threshold
    bits differ in at most threshold of them, so they agree on a whole sub-block (pigeonhole) and meet in one run of
    equal sub-block values, which is split the same way (its varying bits fewer by at least that sub-block), down
    to runs of at most `block`, compared all pairs in tiles (_tiles), and runs of at most _SMALL_GROUP, compared by
    offsets for all of them at once. Exact, as all pairs are; at most one tile of memory (all pairs of the group
    held block x group: 5 GB at 100k hashes); the comparisons fall from group^2 to about the sum of the runs'
    squares when the varying bits spread the group, and a level whose runs would cost more than all pairs (hashes
    clustered round a centre) compares all pairs instead, so no level costs more than all pairs."""
    if len(idx) <= block:
        _tiles(best, bidx, h, o, idx, threshold, block)
        return
    hs = h[idx]
    varying = int(np.bitwise_or.reduce(hs ^ hs[0]))
    bits = [b for b in range(64) if varying >> b & 1]
    if len(bits) <= threshold:  # no two of them differ in more bits than that: every pair is near
        first = int(np.argmin(o[idx]))
        second = int(np.argmin(np.where(np.arange(len(idx)) == first, _NONE, o[idx])))
        src = np.full(len(idx), idx[first])
        src[first] = idx[second]
        _improve(best, bidx, idx, o[src], src)
        return
    k = threshold + 1
    splits, cost = [], 0.0
    for j in range(k):
        key = hs & np.uint64(sum(1 << b for b in bits[j * len(bits) // k:(j + 1) * len(bits) // k]))
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
        sizes = np.diff(np.r_[starts, len(idx)])
        cost += float((sizes.astype(np.float64) ** 2).sum())
        splits.append((idx[order], starts, sizes))
    if cost >= float(len(idx)) ** 2:
        # The sub-blocks hardly split them (hashes clustered round a centre, a larger threshold): each level would
        # multiply the work by up to threshold + 1 (review s16d: 90-550x all pairs at t = 6-8); all pairs it is.
        _tiles(best, bidx, h, o, idx, threshold, block)
        return
    for members, starts, sizes in splits:
        _small_runs(best, bidx, h, o, members, starts, sizes, threshold)
        for s, z in zip(starts[sizes > _SMALL_GROUP], sizes[sizes > _SMALL_GROUP]):
            _near_pairs(best, bidx, h, o, members[s:s + z], threshold, block)


def _tiles(best, bidx, h, o, idx: np.ndarray, threshold: int, block: int) -> None:
    """All pairs of records `idx` (both orders: each row's best over every column), in tiles of block x block."""
    hs, os_ = h[idx], o[idx]
    size = len(idx)
    for r in range(0, size, block):
        rows = np.arange(r, min(r + block, size))
        val = np.full(len(rows), _NONE, np.int64)
        col = np.zeros(len(rows), np.int64)
        for c in range(0, size, block):
            cols = np.arange(c, min(c + block, size))
            near = np.bitwise_count(hs[rows, None] ^ hs[None, cols]) <= threshold
            near &= rows[:, None] != cols[None, :]
            masked = np.where(near, os_[None, cols], _NONE)
            arg = masked.argmin(axis=1)
            tile = masked[np.arange(len(rows)), arg]
            better = tile < val
            val[better], col[better] = tile[better], cols[arg[better]]
        _improve(best, bidx, idx[rows], val, idx[col])
