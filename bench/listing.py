"""Listing a big flat prefix: what a range-listing task costs per key, and how a prefix splits into rounds of tasks.

    python -m bench.listing [--keys 20000] [--shape-keys 3000000 --shape-cap 2000]

1. Per key, on the loopback moto S3 server: a child process runs one listing task (sources.run_listing: the
   ListObjectsV2 pages through s3fs, the rows, their digest, the part written back to the server) over a flat
   prefix of --keys keys, then list_range alone, then s3fs's own find (what a "tree" task called before the
   ranges, with botocore's default timestamp parsing); it prints CPU-us and wall-us per key. The server runs in this
   process, so the child's CPU is the client's alone. moto is a Python server on the same 2 cores: its latency
   is not S3's (30-80 ms a page there), so the wall figure says nothing about S3.
2. Rounds, without a server: the same list_range and cut points over an in-memory ListObjectsV2 (a sorted key
   list, the same paging contract) for several key shapes, with keys / cap = 1,500 = 300M / LIST_CAP: prints the
   rounds, tasks, empty tasks, requests and the most keys a task held, and checks the parts, in name order, give
   every key once, in order.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import resource
import subprocess
import sys
import time

from pipeline.ingest import key_ranges
from pipeline.ingest.atomic import url_to_fs
from pipeline.ingest.layout import Layout
from pipeline.ingest.retry import RetryPolicy
from pipeline.ingest.sources import ListTask, run_listing

BUCKET = "bench-listing"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(endpoint: str, keys: int) -> None:
    """In the child: one listing task over the prefix, then list_range alone; JSON figures on stdout."""
    import s3fs

    so = {"client_kwargs": {"endpoint_url": endpoint}}
    key_ranges.LIST_CAP = keys + 1  # one task lists it all: the per-key cost, not the splitting
    task = ListTask(Layout(f"s3://{BUCKET}/out"), (0, 0), "tree", f"s3://{BUCKET}/flat", None, so)
    plain = s3fs.S3FileSystem(**so, skip_instance_cache=True)
    fs = key_ranges.lister(plain)
    # Connect before timing (a client costs ~0.3 CPU-s to build: once per worker process, not per task).
    shared = url_to_fs(task.path, so)[0]  # the task's client for its part
    for client in (fs, plain, shared, key_ranges.lister(shared)):
        client.call_s3("list_objects_v2", Bucket=BUCKET, Prefix="flat/", MaxKeys=1)
    figures = {"rss_mb": _peak_rss_mb()}
    for name, fn in (("task", lambda: run_listing(task, RetryPolicy())),
                     ("list_range", lambda: key_ranges.list_range(fs, BUCKET, "flat/", False, None, None,
                                                                  RetryPolicy())),
                     ("s3fs find", lambda: plain.find(f"{BUCKET}/flat", detail=True))):
        cpu, wall = _cpu_s(), time.perf_counter()
        fn()
        figures[name] = {"cpu_us_per_key": (_cpu_s() - cpu) / keys * 1e6,
                         "wall_us_per_key": (time.perf_counter() - wall) / keys * 1e6,
                         "peak_rss_mb": _peak_rss_mb()}
    print(json.dumps(figures))


def per_key(keys: int, repeats: int) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from tools import local_s3

    with local_s3.serve() as server:
        server.make_bucket(BUCKET)
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for i in range(keys):  # straight into moto's store: a PUT per key over HTTP would take minutes
            backend.put_object(BUCKET, f"flat/{i:09d}.jpg", b"x" * 100)
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-m", "bench.listing", "--child", server.endpoint_url,
                                  "--keys", str(keys)], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout))
    for name in ("task", "list_range", "s3fs find"):
        cpu = sorted(r[name]["cpu_us_per_key"] for r in runs)
        wall = sorted(r[name]["wall_us_per_key"] for r in runs)
        print(f"{name:>10}: {cpu[len(cpu) // 2]:.1f} CPU-us per key (runs {', '.join(f'{c:.1f}' for c in cpu)}), "
              f"{wall[len(wall) // 2]:.1f} wall-us per key on moto, {keys} keys; the child's peak RSS "
              f"{runs[0]['rss_mb']:.0f} MB before any, {runs[0][name]['peak_rss_mb']:.0f} MB after this one")


class _SortedStore:
    """ListObjectsV2 over a sorted list of keys (no delimiter): Prefix, StartAfter, MaxKeys, ContinuationToken."""

    def __init__(self, keys: list[str]):
        self.keys, self.requests = keys, 0

    def call_s3(self, method: str, Bucket: str, Prefix: str, MaxKeys: int, StartAfter: str = "",  # noqa: N803
                ContinuationToken: str | None = None) -> dict:
        self.requests += 1
        start = bisect.bisect_right(self.keys, ContinuationToken or StartAfter)
        page = [k for k in self.keys[start:start + MaxKeys] if k.startswith(Prefix)]
        more = start + MaxKeys < len(self.keys)
        return {"Contents": [{"Key": k, "Size": 0, "ETag": ""} for k in page], "IsTruncated": more,
                **({"NextContinuationToken": page[-1]} if more else {})}


def _shapes(n: int) -> dict[str, list[str]]:
    digits = len(str(n * 10 // 3 - 1))  # 300M keys are 9 digits: the first digit runs 0-2, like n here
    return {
        "numbered": [f"{i:0{digits}d}.jpg" for i in range(n)],
        "hashes": sorted(hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() + ".jpg" for i in range(n)),
        # img2dataset's layout listed whole (a "tree" task): 300M keys are 30k folders of 10k, so n / 30k here
        "folders": [f"{i // max(1, n // 30_000):05d}/{i:09d}.jpg" for i in range(n)],
    }


def rounds(n: int, cap: int) -> None:
    for shape, keys in _shapes(n).items():
        store = _SortedStore(keys)
        tasks, per_round, listed, empty, biggest = [(None, None, ())], [], [], 0, 0
        while tasks:
            per_round.append(len(tasks))
            later = []
            for after, upto, branch in tasks:
                got = key_ranges.list_range(store, BUCKET, "", False, after, upto, RetryPolicy(), cap)
                listed.append((branch, [key for key, _, _ in got.objects]))
                empty, biggest = empty + (not got.objects), max(biggest, len(got.objects))
                bounds = (*got.rest, upto)
                later += [(a, b, branch + (i,)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]), 1)]
            tasks = later
        assert [k for _, part in sorted(listed) for k in part] == keys, f"{shape}: the parts lost or reordered keys"
        print(f"{shape:>9}: {n:,} keys, cap {cap:,}: {len(per_round)} rounds of {' + '.join(map(str, per_round))} = "
              f"{sum(per_round):,} tasks ({empty:,} empty), {store.requests:,} requests (the unsplit listing: "
              f"{-(-n // 1000):,}), at most {biggest:,} keys a task")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=20_000, help="keys of the flat prefix on moto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shape-keys", type=int, default=3_000_000)
    p.add_argument("--shape-cap", type=int, default=2_000)
    p.add_argument("--child", metavar="ENDPOINT", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.keys)
        return
    per_key(a.keys, a.repeats)
    rounds(a.shape_keys, a.shape_cap)


if __name__ == "__main__":
    main()
