"""What URLs that hang (a host that accepts and never answers: a web dump's common dead link) cost tools/shard.py.

    python -m bench.ingest_stragglers                       # 400 URLs, 0% and 2% hanging, 2 s timeout, 1 worker
    python -m bench.ingest_stragglers --count 400 --hang 0 0.01 0.02 --timeout 2 --retries 5 2
    python -m bench.ingest_stragglers --count 1000 --timeout 1 --web-unit-size 250 1000   # production, scaled
    python -m bench.ingest_stragglers --count 10000 --distinct 1000 --timeout 10          # production, as is

A LAION-style parquet (url, caption) of the bench's 1-3 MP JPEGs, served over loopback HTTP by a threaded server in
a process of its own; a fraction of the URLs (every k-th, the same ones in every run) point at a path whose request
the server holds for --hold seconds without a byte of answer. tools/shard.py runs on it with one worker and its
default download threads; the time is wall-clock, the rate URLs per second, next to the same run with no
hanging URL, and the peak RSS of the shard.py process (one worker: the tasks run in it). A hanging URL costs its
thread two timeouts and a backoff (a timed-out web URL is tried twice, whatever --retries): what it costs the run
depends on whether the other threads, and the cleaning, go on meanwhile, and on how long a unit cleans against that
wait (a unit ends with its slowest URL).

Scale: what counts is the ratio of the wait to a unit's cleaning. In production (--http-timeout 10, 10,000 URLs a
unit at ~15 ms a core each) it is ~20.5 s to ~150 s; here, --timeout 1 (~2.3 s) with 1,000 URLs a unit at ~20 ms
each (1 worker, the server beside it) is the same ratio. Or run production's own figures: 10,000 URLs (over 1,000
distinct files: --distinct) in one unit of the default size, at the default timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.ingest import generate
from tools.local_s3 import free_port, wait_until_up

_REPO = Path(__file__).resolve().parent.parent

_SERVER = r"""
import http.server, os, sys, time
folder, hold = sys.argv[1], float(sys.argv[2])
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=folder, **kw)
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.path.startswith("/hang/"):
            time.sleep(hold)  # accepted, never answered (the client times out first)
            return
        super().do_GET()
http.server.ThreadingHTTPServer.daemon_threads = True
# A web server's accept queue, not socketserver's 5: 128 download threads connecting at once would overflow 5, and
# the dropped connections time out as if the host were dead.
http.server.ThreadingHTTPServer.request_queue_size = 1024
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), H).serve_forever()
"""


def serve(folder: Path, hold_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(folder), str(hold_s), str(port)])
    wait_until_up("127.0.0.1", port)
    return proc, f"http://127.0.0.1:{port}"


def url_table(files: list[Path], count: int, base: str, hang: float, path: Path) -> tuple[Path, int]:
    """`count` URLs over the files (a query string tells the copies apart: the server ignores it, shard.py's
    identities do not); every k-th URL hangs (k = 1 / hang). Returns the parquet and how many hang."""
    every = round(1 / hang) if hang > 0 else 0
    urls = [f"{base}/{'hang/' if every and i % every == every // 2 else ''}{files[i % len(files)].name}?{i}"
            for i in range(count)]
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(count)]}), path)
    return path, sum("/hang/" in u for u in urls)


# tools/shard.py in a process that reports its peak RSS when it exits (with one worker the tasks run in it).
_PEAK = ("import resource, runpy, sys\n"
         "sys.argv = sys.argv[1:]\n"
         "try:\n"
         "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
         "finally:\n"
         "    print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def run(urls: Path, out: Path, timeout: float, retries: int, workers: int, unit: int | None
        ) -> tuple[float, float, dict[str, int]]:
    """(wall seconds, peak RSS of the shard.py process in MiB, rejects by reason but the copies' duplicate_exact):
    a URL of a live server given up on (download_failed) would make a fast run a lossy one."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", _PEAK, "tools/shard.py", str(urls), "--output", str(out), "--workers",
           str(workers), "--http-timeout", str(timeout), "--retries", str(retries), "--quiet"]
    cmd += ["--web-unit-size", str(unit)] if unit else []
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, cwd=_REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    peak = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("peak_rss_kb")]
    rejected = json.loads((out / "report.json").read_text())["rejected_by_reason"]
    return wall, int(peak[-1]) / 1024, {k: v for k, v in rejected.items() if k != "duplicate_exact"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=400, help="URLs")
    ap.add_argument("--distinct", type=int, default=0, help="distinct images behind them (0: --count); the copies "
                    "are cleaned like the others and then dropped as exact duplicates")
    ap.add_argument("--hang", type=float, nargs="+", default=[0.0, 0.02], help="fractions of URLs that hang")
    ap.add_argument("--timeout", type=float, default=2.0, help="tools/shard.py --http-timeout, s")
    ap.add_argument("--retries", type=int, nargs="+", default=[5], help="tools/shard.py --retries")
    ap.add_argument("--hold", type=float, default=600.0, help="how long the server holds a hanging request, s")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--web-unit-size", type=int, nargs="+", default=[0], help="tools/shard.py --web-unit-size "
                    "(0: its default)")
    ap.add_argument("--dump", type=Path, default=Path("/tmp/ingest_bench/dump"))
    a = ap.parse_args()
    files = generate(a.dump, a.distinct or a.count)
    print(f"{a.count} URLs of {len(files)} JPEGs of 1-3 MP over loopback HTTP; tools/shard.py --workers {a.workers}, "
          f"--http-timeout {a.timeout:g}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    server, base = serve(a.dump, a.hold)
    tmp = Path(tempfile.mkdtemp())
    try:
        for unit in a.web_unit_size:
            for retries in a.retries:
                base_wall = None
                for hang in a.hang:
                    urls, hanging = url_table(files, a.count, base, hang, tmp / f"urls-{hang}.parquet")
                    wall, peak, rejected = run(urls, tmp / "out", a.timeout, retries, a.workers, unit)
                    base_wall = wall if base_wall is None else base_wall
                    extra = wall - base_wall
                    per = f"; {extra / hanging:.2f} s more per hanging URL" if hanging else ""
                    print(f"--web-unit-size {unit or 'default'} --retries {retries}, {hang:.1%} hanging ({hanging} "
                          f"URLs): {wall:.1f} s, {a.count / wall:.1f} URLs/s ({wall / base_wall:.2f}x the run "
                          f"without{per}); peak RSS {peak:.0f} MiB; rejects {rejected}", flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
