"""Where tools/shard.py's CPU per image goes, and how far the codec alone is from a throughput goal.

    python -m bench.ingest_costs                          # 600 of bench/ingest.py's 1-3 MP JPEGs, from URLs
    python -m bench.ingest_costs --count 1000 --repeats 3 --img2dataset 31.0    # + what 2.5x that rate needs

Two parts, on bench/ingest.py's photos (its --dump), the figure each time the thread CPU (the kernel's count) per
image, the median over --repeats:
1. The run: tools/shard.py in this process (one worker: its tasks run here) on a url + caption parquet of the
   photos served over loopback HTTP (bench/ingest.py's web row, 8 download threads); the CPU of every
   clean_image call, of every fetch (in the download threads), of the shard phase and of the whole process, less
   the whole process on the first --small URLs (start-up: imports, the listing, the report), as bench/ingest.py's
   marginal rate does.
2. clean_image's steps alone, on the same photos in memory: the JPEG header walk; the decode at the DCT scale the
   cleaning picks (simplejpeg, BGR); the same decode to grey, which still entropy-decodes every component (the
   scans interleave them) but skips the chroma's IDCT, upsampling and the colour conversion: the Huffman floor,
   below which libjpeg-turbo does not go on these bytes, at any scale; the resize; the q95 encode; the BLAKE3 pixel
   hash.
With --img2dataset R (img2dataset's marginal images per CPU-second, from bench/ingest.py), it prints what 2.5x R
leaves per image, and how much of it the codec's floor (grey decode + encode) takes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import resource
import shutil
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import cv2
import simplejpeg

import pipeline.ingest.engine as engine_module
import pipeline.ingest.fetch as fetch_module
import pipeline.ingest.stage as stage_module
from bench.ingest import generate, http_server, url_parquet
from pipeline.ingest.clean import _dct_scale, _pixel_hash, _resize, target_size
from pipeline.ingest.jpeg_header import read_jpeg_header

_SIDE, _QUALITY = 512, 95


class _Timed:
    """Thread CPU of every call of a module's function, from any thread, summed."""

    def __init__(self, targets: dict[str, tuple[object, str]]):
        self.targets, self.cpu, self.lock = targets, Counter(), threading.Lock()
        self.saved = {key: getattr(module, name) for key, (module, name) in targets.items()}

    def __enter__(self) -> "_Timed":
        for key, (module, name) in self.targets.items():
            setattr(module, name, self._wrap(key, self.saved[key]))
        return self

    def __exit__(self, *exc) -> None:
        for key, (module, name) in self.targets.items():
            setattr(module, name, self.saved[key])

    def _wrap(self, key: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.cpu[key] += time.thread_time() - start
        return timed


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_costs(urls: Path, out: Path) -> dict[str, float]:
    """CPU seconds of one in-process tools/shard.py run on `urls`: in all, and per part."""
    from tools.shard import main as shard_main

    shutil.rmtree(out, ignore_errors=True)
    targets = {"clean_image": (stage_module, "clean_image"), "fetches (download threads)": (fetch_module, "fetch_one"),
               "shard phase": (engine_module, "run_shard")}
    start = _process_cpu()
    with _Timed(targets) as timed, contextlib.redirect_stdout(io.StringIO()):
        status = shard_main([str(urls), "--output", str(out), "--workers", "1", "--download-threads", "8",
                             "--max-shorter-side", str(_SIDE), "--quality", str(_QUALITY), "--web-unit-size", "250",
                             "--quiet"])
    if status != 0:
        raise RuntimeError(f"tools/shard.py exited {status} on {urls}")
    return {"process": _process_cpu() - start, **timed.cpu}


def step_costs(files: list[Path]) -> dict[str, float]:
    """CPU seconds per image of clean_image's steps, each over every photo in turn."""
    datas = [f.read_bytes() for f in files]
    plans = []
    for data in datas:
        header = read_jpeg_header(data)
        target = target_size(header.width, header.height, _SIDE)
        scale = _dct_scale((header.width, header.height), target)
        plans.append((-(-header.width // scale), -(-header.height // scale), target))
    decoded = [simplejpeg.decode_jpeg(d, "BGR", min_width=w, min_height=h) for d, (w, h, _) in zip(datas, plans)]
    resized = [_resize(p, t) if (w, h) != t else p for p, (w, h, t) in zip(decoded, plans)]
    steps: dict[str, Callable[[int], object]] = {
        "header walk": lambda i: read_jpeg_header(datas[i]),
        "decode at the DCT scale (BGR)": lambda i: simplejpeg.decode_jpeg(
            datas[i], "BGR", min_width=plans[i][0], min_height=plans[i][1]),
        "  the same to grey: the Huffman floor": lambda i: simplejpeg.decode_jpeg(
            datas[i], "GRAY", min_width=plans[i][0], min_height=plans[i][1]),
        "resize": lambda i: _resize(decoded[i], plans[i][2]) if plans[i][:2] != plans[i][2] else None,
        "encode q95": lambda i: cv2.imencode(".jpg", resized[i], (cv2.IMWRITE_JPEG_QUALITY, _QUALITY)),
        "pixel hash (BLAKE3)": lambda i: _pixel_hash(resized[i]),
    }
    costs = {}
    for name, step in steps.items():
        start = time.thread_time()
        for i in range(len(datas)):
            step(i)
        costs[name] = (time.thread_time() - start) / len(datas)
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", type=Path, default=Path("/tmp/ingest_bench/dump"))
    ap.add_argument("--output", type=Path, default=Path("/tmp/ingest_bench/costs"))
    ap.add_argument("--count", type=int, default=600)
    ap.add_argument("--small", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--img2dataset", type=float, help="img2dataset's marginal images per CPU-second (bench.ingest)")
    a = ap.parse_args()
    files = generate(a.dump, a.count)
    a.output.mkdir(parents=True, exist_ok=True)
    print(f"{a.count} JPEGs of bench/ingest.py, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    runs: dict[str, list[float]] = {}
    steps: dict[str, list[float]] = {}
    with http_server(a.dump) as base_url:
        urls = {n: url_parquet(files[:n], base_url, a.output / f"urls-{n}.parquet") for n in (a.count, a.small)}
        logging.disable(logging.INFO)  # tools/shard.py's progress lines
        run_costs(urls[a.small], a.output / "out")  # the lazy imports of a first run, in neither measurement
        for _ in range(a.repeats):
            whole, small = run_costs(urls[a.count], a.output / "out"), run_costs(urls[a.small], a.output / "out")
            runs.setdefault("the run, marginal (start-up excluded)", []).append(
                (whole["process"] - small["process"]) / (a.count - a.small))
            for key in whole:
                if key != "process":
                    runs.setdefault(f"  {key}", []).append((whole[key] - small[key]) / (a.count - a.small))
            for key, value in step_costs(files).items():
                steps.setdefault(key, []).append(value)
    print(f"{'':<48} {'ms per image':>12}")
    for name, values in {**runs, **{"clean_image's steps, alone:": []}, **steps}.items():
        print(f"{name:<48} {statistics.median(values) * 1e3:12.2f}" if values else name)
    if a.img2dataset:
        budget = 1e3 / (2.5 * a.img2dataset)
        floor = (statistics.median(steps["  the same to grey: the Huffman floor"]) +
                 statistics.median(steps["encode q95"])) * 1e3
        marginal = statistics.median(runs["the run, marginal (start-up excluded)"]) * 1e3
        print(f"2.5x img2dataset's {a.img2dataset:.1f} images per CPU-second leaves {budget:.2f} ms an image; this "
              f"run takes {marginal:.2f} ({1e3 / marginal / a.img2dataset:.2f}x); the Huffman floor and the encode "
              f"alone take {floor:.2f}, leaving {budget - floor:.2f} for the fetch, the resize, the hashes, the "
              f"rest of the decode, the staging and the shards")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
