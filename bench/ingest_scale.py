"""Ingest at scale without images: synthetic stage tables through the real dedup, resolve and shard numbering.

    python -m bench.ingest_scale                          # N = 1M 2M 4M 8M, --dedup near, local Ray, all cores
    python -m bench.ingest_scale --sizes 1000000 --dedup exact --recall-sample 20000

For each N: writes N synthetic input rows (content hash, pHash, ordinal, unit; 5% exact and 5% near duplicates
planted, 2% rejects) as stage tables of 10,000 inputs per unit (an img2dataset tar's worth), then, in a fresh
driver process on a local Ray instance, runs the engine's own phases on them (dedup map, dedup reduce, resolve,
and the prefix sum that numbers shards), and prints per phase the wall time, the tasks' CPU seconds (and the
system part of them), their page faults and the peak RSS of the largest task, plus the driver's peak RSS over the
whole run. On a shared machine CPU seconds also grow with the load (two vCPUs that other processes share run
slower), so compare the ratios of runs made at similar load. Generation and Ray's start-up are not
timed. Then the near-dedup recall of the LSH bands against brute force (every pair compared) on a separate sample
with planted near duplicates at distances 0..t.

Goals (issue 14): time per doubling of N <= 2.2x, driver peak RSS < 1 GB at every N, recall >= 99%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.layout import Layout
from pipeline.ingest.near import _NONE, band_keys, bands, blocks_per_band, earliest_neighbours
from pipeline.ingest.stage import STAGE_SCHEMA

UNIT_INPUTS = 10_000
_REPO = Path(__file__).resolve().parent.parent


def write_stage_tables(layout: Layout, n: int, seed: int = 0) -> int:
    """N synthetic inputs as stage tables; returns the number of units."""
    rng = np.random.default_rng(seed)
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    pixel = rng.integers(0, 2**63, (n, 2), dtype=np.int64)
    exact = rng.random(n) < 0.05
    near = (rng.random(n) < 0.05) & ~exact
    src = rng.integers(0, np.arange(n).clip(1))  # an earlier input
    pixel[exact], phash[exact] = pixel[src[exact]], phash[src[exact]]
    flips = rng.integers(0, 64, (n, 4)).astype(np.uint64)
    count = rng.integers(1, 5, n)
    noise = np.zeros(n, np.uint64)
    for j in range(4):
        noise |= np.where(count > j, np.uint64(1) << flips[:, j], np.uint64(0))
    phash[near] = phash[src[near]] ^ noise[near]
    status = np.where(rng.random(n) < 0.02, "undecodable", "ok")
    units = -(-n // UNIT_INPUTS)
    folder = Path(layout.stage_table(0)).parent
    folder.mkdir(parents=True, exist_ok=True)
    for u in range(units):
        lo, hi = u * UNIT_INPUTS, min(n, (u + 1) * UNIT_INPUTS)
        m = hi - lo
        ok = status[lo:hi] == "ok"
        offsets = np.cumsum(np.full(m, 40_000)) * ok
        table = pa.table({
            "key": [f"{i:020x}" for i in range(lo, hi)],
            "source": [f"s3://bench/raw/part-{u:06d}.tar::{i:09d}.jpg" for i in range(lo, hi)],
            "label": np.full(m, -1, np.int64), "caption": pa.nulls(m, pa.string()),
            "status": status[lo:hi], "detail": np.where(ok, "", "synthetic"),
            "width": np.full(m, 512, np.int32), "height": np.full(m, 384, np.int32),
            "bytes": np.full(m, 39_000, np.int64), "sha256": [f"{i:064x}" for i in range(lo, hi)],
            "phash": np.where(ok, phash[lo:hi], 0).astype(np.uint64),
            "pixel_hash": [p.tobytes() if o else b"" for p, o in zip(pixel[lo:hi], ok)],
            "members": [[{"ext": "jpg", "offset": int(o), "size": 39_000}, {"ext": "json", "offset": int(o) + 39_424,
                         "size": 300}] if k else [] for o, k in zip(offsets, ok)],
        }, schema=STAGE_SCHEMA)
        pq.write_table(table, layout.stage_table(u))
    return units


def run_phases(output: str, units: int, dedup: str, threshold: int, workers: int) -> dict:
    """The driver: the engine's dedup, resolve and numbering on local Ray. Returns timings and peak RSS."""
    import ray

    from pipeline.ingest.config import IngestConfig
    from pipeline.ingest.dedup import DedupMapTask, DedupReduceTask, run_map, run_reduce
    from pipeline.ingest.engine import _groups, _shard_tasks
    from pipeline.ingest.executor import Engine, Failed
    from pipeline.ingest.resolve import ResolveTask, run_resolve

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    cfg = IngestConfig(sources=("synthetic",), output=output, dedup=dedup, near_threshold=threshold)
    layout, engine = Layout(output), Engine("ray", 0)
    inputs = np.full(units, UNIT_INPUTS, np.int64)
    starts = _groups(inputs, cfg.group_inputs)
    groups = [(g, int(a), int(b)) for g, (a, b) in enumerate(zip(starts, [*starts[1:], units]))]
    per_band = blocks_per_band(threshold, int(inputs.sum()))
    per_input = 1 + (dedup != "none") + (len(bands(threshold, per_band)) if dedup == "near" else 0)
    buckets = max(1, -(-int(inputs.sum()) * per_input // cfg.bucket_records))
    phases = {
        "map": (run_map, [(g, DedupMapTask(g, a, b, buckets, dedup, threshold, per_band, layout, {}))
                          for g, a, b in groups]),
        "reduce": (run_reduce, [(b, DedupReduceTask(b, tuple(int(x) for x in starts), threshold, layout, {}))
                                for b in range(buckets)]),
        "resolve": (run_resolve, [(g, ResolveTask(g, a, b, buckets, layout, {})) for g, a, b in groups]),
    }
    out: dict = {"groups": len(groups), "buckets": buckets}
    kept = np.zeros(len(groups), np.int64)
    for name, (fn, tasks) in phases.items():
        start, peak, cost = time.perf_counter(), 0, np.zeros(4)
        for i, measured in engine.run(_Measured(fn), tasks):
            assert not isinstance(measured, Failed), measured
            result, rss, used = measured
            peak, cost = max(peak, rss), cost + used
            if name == "resolve":
                kept[i] = result["kept"]
        out[name] = {"seconds": round(time.perf_counter() - start, 2), "cpu_s": round(cost[0] + cost[1], 2),
                     "sys_s": round(cost[1], 2), "minor_faults": int(cost[2]), "major_faults": int(cost[3]),
                     "task_peak_mb": round(peak / 1024)}
    start = time.perf_counter()
    shards = sum(1 for _ in _shard_tasks(kept, 5000, layout, {}))
    out["numbering"] = {"seconds": round(time.perf_counter() - start, 2), "shards": shards}
    out["kept"] = int(kept.sum())
    out["driver_peak_mb"] = round(peak_rss_kb() / 1024)
    return out


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: that survives exec, so a process
    started by a big parent (this bench, after generating N rows) would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


class _Measured:
    """fn(task), the peak RSS (KB) of the process that ran it (a Ray worker runs many tasks: an upper bound) and
    the task's CPU seconds (its own threads included): the cost that contention on a shared machine does not move."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, task):
        import resource
        before, usage = os.times(), resource.getrusage(resource.RUSAGE_SELF)
        result = self.fn(task)
        after, end = os.times(), resource.getrusage(resource.RUSAGE_SELF)
        return result, peak_rss_kb(), (after.user - before.user, after.system - before.system,
                                       end.ru_minflt - usage.ru_minflt, end.ru_majflt - usage.ru_majflt)


def recall(n: int, threshold: int, seed: int = 1) -> tuple[float, int]:
    """LSH bands vs brute force on n pHashes with planted near duplicates; (recall, near duplicates found by brute
    force). Recall counts an input as found when LSH names the same earliest winner."""
    rng = np.random.default_rng(seed)
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    planted = rng.choice(n, n // 5, replace=False)
    for i in planted:
        flips = rng.choice(64, rng.integers(0, threshold + 1), replace=False).astype(np.uint64)
        phash[i] = phash[rng.integers(0, n)] ^ np.bitwise_or.reduce(np.uint64(1) << flips, initial=np.uint64(0))
    ordinal = np.arange(n, dtype=np.int64)
    lsh = np.full(n, _NONE, np.int64)
    for b, band in enumerate(bands(threshold)):
        group = band_keys(phash, band).astype(np.int64) * 1000 + b
        lsh = np.minimum(lsh, earliest_neighbours(group, phash, ordinal, threshold)[0])
    brute = np.full(n, _NONE, np.int64)
    for lo in range(0, n, 512):  # all pairs, 512 rows at a time
        rows = slice(lo, min(n, lo + 512))
        close = np.bitwise_count(phash[rows, None] ^ phash[None, :]) <= threshold
        close &= ordinal[None, :] < ordinal[rows, None]
        brute[rows] = np.where(close, ordinal[None, :], _NONE).min(axis=1)
    found = brute < _NONE
    return float((lsh[found] == brute[found]).mean()), int(found.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000, 8_000_000])
    p.add_argument("--dedup", choices=("none", "exact", "near"), default="near")
    p.add_argument("--threshold", type=int, default=4)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--recall-sample", type=int, default=100_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/ingest_scale"))
    p.add_argument("--driver", nargs=4, metavar=("OUTPUT", "UNITS", "DEDUP", "THRESHOLD"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.driver:
        output, units, dedup, threshold = a.driver
        print(json.dumps(run_phases(output, int(units), dedup, int(threshold), a.workers)))
        return
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, --dedup {a.dedup}, t={a.threshold}, "
          f"{a.workers} Ray workers")
    previous = None
    for n in a.sizes:
        shutil.rmtree(a.work, ignore_errors=True)
        layout = Layout(str(a.work / f"n{n}"))
        units = write_stage_tables(layout, n)
        cmd = [sys.executable, "-m", "bench.ingest_scale", "--workers", str(a.workers), "--driver", layout.output,
               str(units), a.dedup, str(a.threshold)]
        proc = subprocess.run(cmd, cwd=_REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"driver failed at N={n}:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        total = sum(res[k]["seconds"] for k in ("map", "reduce", "resolve", "numbering"))  # Ray start-up excluded
        cpu = sum(res[k]["cpu_s"] for k in ("map", "reduce", "resolve"))
        phases = ", ".join(f"{k} {res[k]['seconds']} s / {res[k]['cpu_s']} CPU-s ({res[k]['sys_s']} system; "
                           f"{res[k]['minor_faults'] / 1e6:.2f}M minor, {res[k]['major_faults']} major page faults; "
                           f"task peak {res[k]['task_peak_mb']} MB)" for k in ("map", "reduce", "resolve"))
        ratio = f", {total / previous[0]:.2f}x wall and {cpu / previous[1]:.2f}x CPU of the previous N" \
            if previous else ""
        print(f"N={n:,}: {total:.1f} s wall, {cpu:.1f} task CPU-s{ratio} ({res['groups']} groups, {res['buckets']} "
              f"buckets; {phases}; numbering {res['numbering']['seconds']} s for {res['numbering']['shards']} "
              f"shards); kept {res['kept']:,}; driver peak RSS {res['driver_peak_mb']} MB; "
              f"{cpu / n * 1e6:.1f} CPU-us per input; load average {os.getloadavg()[0]:.2f}", flush=True)
        previous = (total, cpu)
    shutil.rmtree(a.work, ignore_errors=True)
    if a.recall_sample:
        start = time.perf_counter()
        r, found = recall(a.recall_sample, a.threshold)
        print(f"near-dedup recall vs brute force on {a.recall_sample:,} pHashes ({found:,} near duplicates): "
              f"{100 * r:.2f}% ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
