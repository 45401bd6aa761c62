"""Phase 2: decide, over the whole run and in input order, which staged samples are kept; first occurrence wins.

Runs in the coordinator on the stage tables only (hashes, no pixels), so its result is the same whatever the
number of workers or the engine. Exact duplicates: equal pixel hashes. Near duplicates: pHash Hamming distance
<= t, found without comparing all pairs by multi-index hashing: split the 64 bits into t+1 bands; two hashes
within distance t agree exactly on at least one band (pigeonhole), so only samples sharing a band are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.ingest.phash import hamming

KEEP = "keep"


@dataclass(frozen=True)
class Decision:
    verdict: str  # KEEP, a rejection reason from phase 1, or "duplicate_exact" / "duplicate_near" / "duplicate_source"
    detail: str  # for duplicates: the key of the sample kept instead


class Deduplicator:
    def __init__(self, mode: str, near_threshold: int):
        self.mode, self.threshold = mode, near_threshold
        self._keys: set[str] = set()
        self._order: dict[str, int] = {}  # key -> rank among kept samples, to report the earliest near match
        self._exact: dict[bytes, str] = {}
        bands = near_threshold + 1
        self._bounds = [(64 * i // bands, 64 * (i + 1) // bands) for i in range(bands)]
        self._bands: list[dict[int, list[tuple[int, str]]]] = [{} for _ in range(bands)]

    def decide(self, key: str, status: str, detail: str, pixel_hash: bytes, phash: int) -> Decision:
        if status != "ok":
            return Decision(status, detail)
        if key in self._keys:
            return Decision("duplicate_source", "same source identity listed twice")
        if self.mode != "none":
            first = self._exact.get(pixel_hash)
            if first is not None:
                return Decision("duplicate_exact", first)
        if self.mode == "near":
            first = self._near(phash)
            if first is not None:
                return Decision("duplicate_near", first)
        self._register(key, pixel_hash, phash)
        return Decision(KEEP, "")

    def _band_values(self, phash: int) -> list[int]:
        return [(phash >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self._bounds]

    def _near(self, phash: int) -> str | None:
        best: tuple[int, str] | None = None
        for table, value in zip(self._bands, self._band_values(phash)):
            for other, key in table.get(value, ()):
                if hamming(phash, other) <= self.threshold:
                    best = min(best or (1 << 62, ""), (self._order[key], key))
        return None if best is None else best[1]

    def _register(self, key: str, pixel_hash: bytes, phash: int) -> None:
        self._order[key] = len(self._keys)
        self._keys.add(key)
        self._exact.setdefault(pixel_hash, key)
        if self.mode == "near":
            for table, value in zip(self._bands, self._band_values(phash)):
                table.setdefault(value, []).append((phash, key))
