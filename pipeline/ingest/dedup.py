"""Phase 2: duplicates across the whole run, as a shuffle by hash; the lowest input ordinal wins.

An input's ordinal is (unit << 32) | row: its position in input order. Three kinds of record, each keyed by a hash:
  source   the key of the source identity (always: the same file listed twice is stored once)
  exact    the pixel hash (--dedup exact or near)
  near     one record per LSH band (--dedup near; near.py)
Map (one task per group of units): read the stage tables' hash columns, emit every record into the bucket its hash
falls in: one file per group, a part per bucket (exchange.py). Reduce (one task per bucket): read the bucket's part
of every group's file, sort, and report each record that loses: for source and exact records, everything but the
earliest of equal hashes; for near records, anything with an earlier sample within the threshold (near.py). Losers
are written one file per bucket, a part per group, for the verdict phase. No process ever holds more than one
group's or one bucket's records, and both steps are sorts, so the result does not depend on which worker ran what.

Records for --dedup none are the source keys only; no pixel hash or pHash was computed for them (clean.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.atomic import url_to_fs
from pipeline.ingest.done import mark_done, read_done
from pipeline.ingest.exchange import read_parts, write_parts
from pipeline.ingest.layout import Layout
from pipeline.ingest.near import band_keys, bands, earliest_neighbours

SOURCE, EXACT, NEAR = 0, 1, 2  # record kinds; also the precedence of verdicts (lower wins)
VERDICTS = {SOURCE: "duplicate_source", EXACT: "duplicate_exact", NEAR: "duplicate_near"}
RECORD_SCHEMA = pa.schema([("kind", pa.int16()), ("k1", pa.uint64()), ("k2", pa.uint64()), ("ordinal", pa.int64()),
                           ("phash", pa.uint64()), ("key", pa.binary(10))])
_READ_THREADS = 16
LOSER_SCHEMA = pa.schema([("ordinal", pa.int64()), ("kind", pa.int8()), ("winner", pa.int64()),
                          ("winner_key", pa.binary(10))])


@dataclass(frozen=True)
class DedupMapTask:
    group: int
    first_unit: int
    end_unit: int
    buckets: int
    mode: str  # "none" | "exact" | "near"
    threshold: int
    per_band: int  # pHash blocks per LSH band (near.py's s, from the number of inputs)
    layout: Layout
    storage_options: dict
    skip: tuple[int, ...] = ()  # quarantined units of the group: not staged, left out


@dataclass(frozen=True)
class DedupReduceTask:
    bucket: int
    group_starts: tuple[int, ...]  # first unit of every group, ascending (a few thousand ints)
    threshold: int
    layout: Layout
    storage_options: dict
    buckets: int = 0  # parts of every map file (0: not checked)


def run_map(task: DedupMapTask) -> dict:
    done = read_done(task.layout, "map", task.group, task.storage_options)
    if done is not None:
        return done
    unit_of, rows, keys, pixel, phash = [], [], [], [], []
    columns = ["key", "status", "pixel_hash", "phash"]
    staged = [u for u in range(task.first_unit, task.end_unit) if u not in task.skip]
    for unit, table in read_stages(task.layout, staged, columns, task.storage_options):
        ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
        idx = np.flatnonzero(ok)
        unit_of.append(np.full(len(idx), unit, np.int64))
        rows.append(idx.astype(np.int64))
        keys.append(_take(table.column("key"), idx))
        pixel.append(_take(table.column("pixel_hash"), idx))
        phash.append(table.column("phash").to_numpy(zero_copy_only=False)[idx].astype(np.uint64))
    ords = (np.concatenate(unit_of or [np.zeros(0, np.int64)]) << 32) | np.concatenate(rows or [np.zeros(0, np.int64)])
    key_bytes = [bytes.fromhex(k) for part in keys for k in part]
    ph = np.concatenate(phash or [np.zeros(0, np.uint64)])
    k = _split64(key_bytes)
    kinds = [(SOURCE, k[0], k[1])]
    if task.mode != "none":
        p = _split64([b for part in pixel for b in part])
        kinds.append((EXACT, p[0], p[1]))
    if task.mode == "near":
        zero = np.zeros(len(ph), np.uint64)
        kinds += [(NEAR + i, band_keys(ph, band), zero) for i, band in enumerate(bands(task.threshold, task.per_band))]
    key_arr = pa.array(key_bytes, pa.binary(10))
    tables = []
    for kind, k1, k2 in kinds:
        tables.append(pa.table({"kind": np.full(len(ords), kind, np.int16), "k1": k1, "k2": k2, "ordinal": ords,
                                "phash": ph, "key": key_arr}, schema=RECORD_SCHEMA))
    records = pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()
    bucket = _bucket(records.column("kind").to_numpy(), records.column("k1").to_numpy(),
                     records.column("k2").to_numpy(), task.buckets)
    write_parts(task.layout.dedup_records(task.group), records, bucket, task.buckets, task.storage_options)
    return mark_done(task.layout, "map", task.group, {"records": records.num_rows}, task.storage_options)


def run_reduce(task: DedupReduceTask) -> dict:
    done = read_done(task.layout, "reduce", task.bucket, task.storage_options)
    if done is not None:
        return done
    so = task.storage_options
    records = read_parts([task.layout.dedup_records(g) for g in range(len(task.group_starts))], task.bucket,
                         RECORD_SCHEMA, so, parts=task.buckets)
    kind = records.column("kind").to_numpy().astype(np.int64)
    k1, k2 = records.column("k1").to_numpy(), records.column("k2").to_numpy()
    ords, ph = records.column("ordinal").to_numpy(), records.column("phash").to_numpy()
    keys = records.column("key")
    winner = np.full(len(ords), np.iinfo(np.int64).max, np.int64)
    windex = np.full(len(ords), -1, np.int64)
    hashed = kind < NEAR
    if hashed.any():
        i = np.flatnonzero(hashed)
        order = i[np.lexsort((ords[i], k2[i], k1[i], kind[i]))]
        head = np.r_[True, (kind[order][1:] != kind[order][:-1]) | (k1[order][1:] != k1[order][:-1])
                     | (k2[order][1:] != k2[order][:-1])]
        first = order[np.maximum.accumulate(np.where(head, np.arange(len(order)), 0))]
        winner[order[~head]], windex[order[~head]] = ords[first[~head]], first[~head]
    if (~hashed).any():
        i = np.flatnonzero(~hashed)
        # Band and key as one compact group id (~34 bits: band keys of <= 28 bits up to 2 billion inputs).
        key_bits = int(k1[i].max()).bit_length()
        group = ((kind[i] - NEAR) << key_bits) | k1[i].astype(np.int64)
        w, wi = earliest_neighbours(group, ph[i], ords[i], task.threshold)
        found = wi >= 0
        winner[i[found]], windex[i[found]] = w[found], i[wi[found]]
    lost = np.flatnonzero(windex >= 0)
    verdict = np.minimum(kind[lost], NEAR)
    # One row per losing input: the strongest verdict (source < exact < near), then the earliest winner.
    order = lost[np.lexsort((winner[lost], verdict, ords[lost]))]
    verdict = np.minimum(kind[order], NEAR)
    head = np.r_[True, ords[order][1:] != ords[order][:-1]][: len(order)]
    order, verdict = order[head], verdict[head]
    losers = pa.table({"ordinal": ords[order], "kind": verdict.astype(np.int8), "winner": winner[order],
                       "winner_key": keys.take(pa.array(windex[order]))}, schema=LOSER_SCHEMA)
    group_of = np.searchsorted(np.asarray(task.group_starts), ords[order] >> 32, side="right") - 1
    write_parts(task.layout.dedup_losers(task.bucket), losers, group_of, len(task.group_starts), so)
    return mark_done(task.layout, "reduce", task.bucket, {"records": len(ords), "losers": len(order)}, so)


def read_losers(layout: Layout, group: int, buckets: int, storage_options: dict, groups: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One group's losing inputs, merged over buckets (strongest verdict, then earliest winner), sorted by ordinal:
    (ordinal [L] int64, verdict kind [L] int8, winner key [L] hex str objects)."""
    table = read_parts([layout.dedup_losers(b) for b in range(buckets)], group, LOSER_SCHEMA, storage_options,
                       parts=groups)
    ords, kind, winner = (table.column(c).to_numpy() for c in ("ordinal", "kind", "winner"))
    order = np.lexsort((winner, kind, ords))
    head = np.r_[True, ords[order][1:] != ords[order][:-1]][: len(order)]
    order = order[head]
    keys = np.asarray([k.hex() for k in table.column("winner_key").take(pa.array(order, pa.int64())).to_pylist()],
                      dtype=object)
    return ords[order], kind[order], keys


def read_stages(layout: Layout, units: list[int], columns: list[str] | None, storage_options: dict
                ) -> Iterator[tuple[int, pa.Table]]:
    """(unit, stage table) for each unit in order, read by a pool of threads: a group is up to a thousand small
    objects, and one GET at a time would leave the task waiting on latency."""
    def read(unit: int) -> pa.Table:
        fs, path = url_to_fs(layout.stage_table(unit), storage_options)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read(columns=columns)  # not pq.read_table: that imports pyarrow.dataset

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        yield from zip(units, pool.map(read, units))


def _take(column: pa.ChunkedArray, idx: np.ndarray) -> list:
    return column.take(pa.array(idx, pa.int64())).to_pylist()


def _split64(values: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 words from the first 16 bytes of each value (zero-padded)."""
    buf = b"".join(v[:16].ljust(16, b"\0") for v in values)
    words = np.frombuffer(buf, dtype=">u8").astype(np.uint64).reshape(-1, 2) if values else np.zeros((0, 2), np.uint64)
    return words[:, 0].copy(), words[:, 1].copy()


def _bucket(kind: np.ndarray, k1: np.ndarray, k2: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each record: a multiplicative mix of (kind, k1, k2), so band keys with few bits spread too."""
    with np.errstate(over="ignore"):
        x = k1 * np.uint64(0x9E3779B97F4A7C15) ^ k2 * np.uint64(0xC2B2AE3D27D4EB4F) ^ \
            kind.astype(np.uint64) * np.uint64(0x165667B19E3779F9)
        x ^= x >> np.uint64(29)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(32)
    return (x % np.uint64(buckets)).astype(np.int64)
