"""What a web dump's own files cost the ingest: a text list of URLs listed, and a unit of a URL parquet whose rows
are all one row group.

    python -m bench.web_sources [--lines 1000000 3000000] [--rows 4000000] [--baseline CHECKOUT]

1. Text list: --lines web URLs in a local file (each size in turn: memory that grows with the list shows), listed by one listing task (sources.run_listing, mode "list": the
   lines read, the rows hashed, the parts of 200,000 rows written) in a child process of this checkout, and of
   --baseline's (another checkout of this repository, e.g. a worktree of an older commit) in the same run. Prints
   CPU-us per line and the child's peak RSS.
2. One-group parquet: --rows URLs and captions in a single row group (what pyarrow before 15 wrote by default). A
   child reads the rows of one 10,000-row unit from its middle (readers._records: the stage task's read), streamed
   in batches (this checkout) and decoded whole (the group-size threshold raised past the file's: what the code did
   before), and prints CPU-s, bytes read from the file and peak RSS above what the child held before the read.
Figures are from this machine's child processes; nothing here measures S3.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a file (by _child), this folder comes first on sys.path, and its pipeline.py would shadow the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.listing import _peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent


def _cpu_s() -> float:
    return time.process_time()


def list_child(path: str, out: str) -> dict:
    from pipeline.ingest import key_ranges, sources
    from pipeline.ingest.layout import Layout
    from pipeline.ingest.retry import RetryPolicy
    from pipeline.ingest.sources import ListTask, run_listing

    task = ListTask(Layout(out), (0, 0), "list", path, None, {})
    lines = sum(1 for _ in open(path, "rb"))
    cpu = _cpu_s()
    run_listing(task, RetryPolicy())
    return {"us_per_line": (_cpu_s() - cpu) / lines * 1e6, "peak_rss_mb": _peak_rss_mb(), "cap": key_ranges.LIST_CAP,
            "code": sources.__file__}


class _Counting(io.FileIO):
    read_bytes = 0

    def readinto(self, b):
        n = super().readinto(b)
        _Counting.read_bytes += n or 0
        return n

    def read(self, n=-1):
        data = super().read(n)
        _Counting.read_bytes += len(data)
        return data


def parquet_child(path: str, whole: bool) -> dict:
    from pipeline.ingest import readers

    if whole:
        readers._WHOLE_GROUP_ROWS = readers._WHOLE_GROUP_BYTES = 1 << 62
    pf = pq.ParquetFile(_Counting(path, "rb"))
    rows = pf.metadata.num_rows
    lo = rows // 2
    before, cpu = _peak_rss_mb(), _cpu_s()
    got = sum(1 for _ in readers._records(path, pf, ["url", "caption"], None, lo, lo + 10_000))
    assert got == 10_000
    return {"cpu_s": _cpu_s() - cpu, "read_mb": _Counting.read_bytes / 1e6, "rss_above_mb": _peak_rss_mb() - before}


def _child(args: list[str], checkout: Path) -> dict:
    # This file run as a script (its own folder first on sys.path, then PYTHONPATH): `pipeline` is the checkout's.
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, env=env,
                         cwd=checkout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, nargs="+", default=[1_000_000, 3_000_000])
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--baseline", type=Path, help="another checkout whose listing of the text list is measured too")
    p.add_argument("--list-child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--parquet-child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.list_child:
        print(json.dumps(list_child(*a.list_child)))
        return
    if a.parquet_child:
        print(json.dumps(parquet_child(a.parquet_child[0], a.parquet_child[1] == "whole")))
        return
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "urls.txt"
        for lines in a.lines:
            with open(text, "w") as f:
                for i in range(lines):
                    f.write(f"https://img{i % 997}.example.com/a/{int(rng.integers(1 << 60)):x}.jpg?w=800\n")
            checkouts = [("this checkout", ROOT)] + ([("baseline", a.baseline.resolve())] if a.baseline else [])
            for name, checkout in checkouts:
                r = _child(["--list-child", str(text), str(Path(tmp) / f"out-{name[0]}{lines}")], checkout)
                print(f"text list, {name} ({r['code']}): {r['us_per_line']:.2f} CPU-us a line over {lines:,} web "
                      f"URLs ({text.stat().st_size / 1e6:.0f} MB), the listing child's peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB")
        table = pa.table({"url": [f"http://h{int(x)}.example.com/p/{int(y):x}.jpg" for x, y in
                                  zip(rng.integers(0, 10**6, a.rows), rng.integers(0, 2**60, a.rows))],
                          "caption": [f"caption {int(y):x} words {int(z):x}" for y, z in
                                      zip(rng.integers(0, 2**60, a.rows), rng.integers(0, 2**60, a.rows))]})
        one = Path(tmp) / "one_group.parquet"
        pq.write_table(table, one, row_group_size=a.rows)
        del table
        print(f"one-group parquet: {a.rows:,} rows, {one.stat().st_size / 1e6:.0f} MB")
        for how in ("streamed", "whole"):
            r = _child(["--parquet-child", str(one), how], ROOT)
            print(f"  a 10,000-row unit from its middle, {how}: {r['cpu_s']:.2f} CPU-s, {r['read_mb']:.0f} MB read, "
                  f"peak RSS +{r['rss_above_mb']:.0f} MB")


if __name__ == "__main__":
    main()
