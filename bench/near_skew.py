"""Near dedup on a skewed band key: one reduce group of many distinct pHashes (images of an object on a plain
background share LSH bands), compared by near._dense (split again on the bits that vary within the group, down to
tiles) and by all pairs in tiles (what it did before, in row blocks), on the same synthetic hashes.

    python -m bench.near_skew [--sizes 40000 160000] [--free-bits 30] [--flip 0.3] [--threshold 4]
                              [--all-pairs-max 40000]

The hashes: one random 64-bit base, each of --free-bits chosen bit positions flipped with probability --flip,
distinct values kept (so every pair differs only in those bits: the group shares everything else, as a band
key's group shares its band). Prints CPU seconds and peak traced memory (numpy's buffers) of each way, how many
records found a near neighbour (equal for both: the split is exact), and the all-pairs time projected as N^2 where
it is not run (N over --all-pairs-max).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from pipeline.ingest import near


def hashes(n: int, free_bits: int, flip: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, dtype=np.uint64)
    pos = rng.choice(64, free_bits, replace=False).astype(np.uint64)
    h = np.full(n, base, np.uint64)
    for k in range(free_bits):
        h ^= np.where(rng.random(n) < flip, np.uint64(1) << pos[k], np.uint64(0))
    h = np.unique(h)
    return h, rng.permutation(len(h)).astype(np.int64)


def measure(fn) -> tuple[float, float, int]:
    tracemalloc.start()
    start = time.process_time()
    found = fn()
    seconds = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[40_000, 160_000])
    ap.add_argument("--free-bits", type=int, default=30)
    ap.add_argument("--flip", type=float, default=0.3)
    ap.add_argument("--threshold", type=int, default=4)
    ap.add_argument("--all-pairs-max", type=int, default=40_000)
    a = ap.parse_args()
    base_rate = None
    for size in a.sizes:
        h, o = hashes(size, a.free_bits, a.flip)
        n = len(h)

        def run(split: bool) -> int:
            best, bidx = np.full(n, near._NONE, np.int64), np.full(n, -1, np.int64)
            if split:
                near._dense(best, bidx, h, o, 0, n, a.threshold)
            else:
                near._tiles(best, bidx, h, o, np.arange(n), a.threshold, 2048)
            return int((bidx >= 0).sum())

        s, peak, found = measure(lambda: run(True))
        line = f"{n} distinct hashes: split {s:.1f} CPU-s, peak {peak:.0f} MB, {found} with a near neighbour"
        if n <= a.all_pairs_max:
            s2, peak2, found2 = measure(lambda: run(False))
            base_rate = s2 / n**2
            line += f"; all pairs {s2:.1f} CPU-s, peak {peak2:.0f} MB, {found2} ({s2 / s:.1f}x the split's time)"
        elif base_rate is not None:
            line += f"; all pairs projected {base_rate * n**2:.0f} CPU-s (N^2 from the largest size run)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
