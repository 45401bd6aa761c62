"""The loader's host cost outside DALI's decode, from loopback S3: where reading, tar parsing and validation run, and
what is left for the training process.

    python -m bench.input_path                         # 1,024 photos at 512 px (q95, ~100 KB each), batch 64
    python -m bench.input_path --images 2048 --workers 1 2 4
    python -m bench.input_path --local                 # shards on local disk: the readers' own cost, no server
    python -m bench.input_path --local --loader-only --loader-batches 48   # only the training thread's cost
    python -m bench.input_path --local --reading-only --images 2048 --passes 5  # only the reading rows
    python -m bench.input_path --local --loader-only --loader-batches 48 --side 96 --img-size 64 --step-ms 150
                                                       # trainer-bound: DALI's outputs ready when the thread asks

Measured in one run, on the same shards, served by moto's S3 server in a process of its own (or, with --local, read
from local files: moto is a Python server, and on a 2-core machine it takes one of the cores the readers would use):
1. read + parse + validate + batch + draw augmentation parameters, samples/s per rank, with W readers as threads of
   one process (the loader before worker processes: every reader under the training process's GIL) and as W worker
   processes (pipeline/worker_pool.py, batches handed over in shared memory). Nothing is decoded. The ratio of W
   processes to W threads is the scaling the GIL took away.
2. the whole loader (worker processes + DALI decoding and augmenting on the CPU), and the CPU time its thread in the
   training process spends per batch (feeding DALI views of the shared memory, handing outputs to torch), DALI's own
   threads excluded: by the kernel's accounting of that thread, and by the loader's input_cpu_s counter. The goal is
   under 1 ms per batch of 64. --shuffle-buffer (default 5000, the production configs') sizes the stream state that
   travels with every batch.
Each figure is the median of --passes timed passes after a warm-up pass.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

from pipeline.config import AugmentConfig, DataConfig
from pipeline.counters import Counters
from pipeline.loader import build_loader, slot_bytes, worker_slots
from pipeline.prefetch import RetryPolicy
from pipeline.readers import ReadSettings
from pipeline.sampler import BatchStream, StreamClosed
from pipeline.shards import build_plan
from pipeline.view_params import draw_batch, pack_params
from pipeline.worker import WorkerSpec
from pipeline.worker_pool import WorkerPool
from tools.local_s3 import LocalS3, free_port

SIZE, PATCHES = 224, 196


def photo_jpegs(n: int, side: int = 512, seed: int = 0) -> list[bytes]:
    """Real photos (scikit-image's), randomly cropped and resized to `side` px on the shorter side, JPEG q95: what
    tools/shard.py stores (--max-shorter-side 512, --quality 95)."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        im = Image.fromarray(photos[i % len(photos)])
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x, y, x + cw, y + ch))
        scale = side / min(cw, ch)
        buf = io.BytesIO()
        im.resize((round(cw * scale), round(ch * scale)), Image.BICUBIC).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def read_settings() -> ReadSettings:
    return ReadSettings({}, 4 << 20, 4, RetryPolicy(), "header")


def batches_from_threads(prefix: str, workers: int, batch: int):
    """`workers` readers as threads of this process, each making batches of its own shards and drawing their
    augmentation parameters (the work a worker process does), into one queue; yields batch sizes, forever."""
    plan, _ = build_plan(DataConfig(shards=prefix).sources, workers, 0, {})
    counters, out, aug = Counters(), queue.Queue(maxsize=4 * workers), AugmentConfig()
    streams = [BatchStream(plan, True, [w], read_settings(), counters, batch, 0, 0, w) for w in range(workers)]

    def run(w: int) -> None:
        streams[w].start()
        try:
            for k in itertools.count():
                enc = streams[w].next_batch()
                views = draw_batch(enc.sizes, aug, 2, PATCHES, 0, 0, k * workers + w)
                out.put((len(enc.keys), pack_params(aug, views)))
        except StreamClosed:
            return

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    try:
        while True:
            yield out.get()[0]
    finally:  # stop the readers before the process exits (their fetchers refuse work once it is shutting down)
        for stream in streams:
            stream.close()
        while any(t.is_alive() for t in threads):  # a thread blocked on the full queue needs room to see the close
            with contextlib.suppress(queue.Empty):
                out.get(timeout=0.1)


def batches_from_processes(prefix: str, workers: int, batch: int):
    """`workers` worker processes (the loader's own), batches taken from shared memory in turn; yields batch sizes."""
    cfg = DataConfig(shards=prefix, batch_size=batch, img_size=SIZE, shuffle_buffer=0, workers=workers,
                     batches_per_iteration=1)  # (the threads' rows make one batch at a time)
    plan, _ = build_plan(cfg.sources, workers, 0, {})
    specs = [WorkerSpec(plan, True, 0, w, workers, read_settings(), batch, 0, 0, cfg.augment, 2, PATCHES, SIZE, None,
                        dict(os.environ), os.getpid()) for w in range(workers)]
    pool = WorkerPool(specs, worker_slots(cfg), slot_bytes(cfg, True), True, None)
    try:
        while True:
            b = pool.next_batch()
            pool.release(b)
            yield len(b.keys)
    finally:
        pool.close()


def time_source(batches, samples: int, passes: int) -> list[float]:
    """samples/s over `passes` timed passes of `samples` samples each, after one warm-up pass (in steady state: the
    readers were started once, before it)."""
    rates = []
    for p in range(passes + 1):
        t0, n = time.perf_counter(), 0
        while n < samples:
            n += next(batches)
        if p > 0:
            rates.append(n / (time.perf_counter() - t0))
    return rates


def time_loader(prefix: str, workers: int, batch: int, samples: int, threads: int, step_s: float = 0.0,
                img_size: int = SIZE, shuffle_buffer: int = 0,
                per_iteration: int = DataConfig.batches_per_iteration) -> tuple[float, float, float, float]:
    """(samples/s of the whole loader, the loader thread's CPU ms per batch by the kernel's accounting of that thread,
    the same by the loader's input_cpu_s counter, the training process's CPU ms per batch with DALI's threads) over
    `samples` samples; step_s: the consumer sleeps that long per batch, as a trainer whose step is the bottleneck
    (then DALI's outputs are ready when the loader's thread asks: no waiting in DALI's calls, which costs that thread
    CPU too). The kernel's figure counts all the thread does, whatever the loader's own accounting leaves out (before
    this bench read it, the counter missed the thread's wait for room in the trainer's queue)."""
    cfg = DataConfig(shards=prefix, batch_size=batch, img_size=img_size, shuffle_buffer=shuffle_buffer,
                     workers=workers, dali_threads=threads, device="cpu", batches_per_iteration=per_iteration)
    loader = build_loader(cfg, 0, 1, torch.device("cpu"))
    it = iter(loader)
    for _ in range(2):  # warm-up: workers started, DALI's pipeline built and filled
        next(it)
    tid = loader._active.native_id  # the loader's thread in this process (a bench may look inside)
    c0, k0, p0, t0 = (loader.counters()["input_cpu_s"], _thread_cpu_s(tid), time.process_time(),
                      time.perf_counter())
    n = 0
    while n < samples:
        n += len(next(it)["keys"])
        time.sleep(step_s)
    dt, batches = time.perf_counter() - t0, n / batch
    kernel_ms = 1e3 * (_thread_cpu_s(tid) - k0) / batches
    cpu_ms = 1e3 * (loader.counters()["input_cpu_s"] - c0) / batches
    process_ms = 1e3 * (time.process_time() - p0) / batches
    loader.close()
    return n / dt, kernel_ms, cpu_ms, process_ms


def _thread_cpu_s(tid: int) -> float:
    """CPU seconds a thread of this process has run, from the kernel's scheduler statistics."""
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


SOURCES = {"threads": batches_from_threads, "processes": batches_from_processes}


def _isolated(name: str, prefix: str, workers: int, batch: int, samples: int, passes: int, result) -> None:
    os.environ.update(result.pop("env"))
    batches = SOURCES[name](prefix, workers, batch)
    try:
        result["rates"] = time_source(batches, samples, passes)
    finally:
        batches.close()


def run_isolated(name: str, prefix: str, workers: int, batch: int, samples: int, passes: int) -> list[float]:
    """One reading configuration in a fresh process, so that no other configuration's threads compete with it."""
    import multiprocessing as mp

    with mp.Manager() as manager:
        result = manager.dict(env=dict(os.environ))
        proc = mp.get_context("spawn").Process(target=_isolated, args=(name, prefix, workers, batch, samples, passes,
                                                                       result))
        proc.start()
        proc.join()
        return list(result["rates"])


def serve_s3() -> tuple[subprocess.Popen, LocalS3]:
    """moto's S3 server in a process of its own: in a thread it would share the measured process's GIL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.local_s3", "--port", str(port), "--bucket", "bench-input"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("# serving"):
            break
    s3 = LocalS3(f"http://127.0.0.1:{port}")
    os.environ.update(s3.env)
    return proc, s3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--dali-threads", type=int, default=1)
    ap.add_argument("--local", action="store_true", help="shards on local disk instead of the loopback S3 server")
    ap.add_argument("--loader-only", action="store_true", help="skip the reading rows (1.): only the whole loader")
    ap.add_argument("--reading-only", action="store_true", help="skip the whole-loader rows (2.)")
    ap.add_argument("--side", type=int, default=512, help="the photos' shorter side, px")
    ap.add_argument("--img-size", type=int, default=SIZE, help="the views' size, px (whole-loader rows)")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="whole-loader rows: a trainer step per batch (sleep); with small --side and --img-size, "
                         "DALI on the CPU keeps ahead, as a GPU decoder does for a trainer that is the bottleneck")
    ap.add_argument("--shuffle-buffer", type=int, default=5000,
                    help="whole-loader rows: samples per worker's shuffle buffer (can_vit_large.yaml's; its indices "
                         "travel with every batch's stream state)")
    ap.add_argument("--batches-per-iteration", type=int, nargs="+", default=[1, 2],
                    help="whole-loader rows: batches DALI makes per iteration (data.batches_per_iteration); several "
                         "values are timed in turn, pass by pass")
    ap.add_argument("--loader-batches", type=int, default=0,
                    help="batches timed per whole-loader pass (default: one pass over the images)")
    args = ap.parse_args()
    if args.loader_only and args.reading_only:
        ap.error("--loader-only and --reading-only leave nothing to run")
    jpegs = photo_jpegs(args.images, side=args.side)
    print(f"{args.images} photos at {args.side} px, JPEG q95, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KB; batch "
          f"{args.batch}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of {args.passes} passes")
    server, s3 = (None, None) if args.local else serve_s3()
    tmp = tempfile.TemporaryDirectory()
    try:
        from pipeline.ingest.writer import write_shard

        prefix, per = (tmp.name + "/photos") if args.local else "s3://bench-input/photos", 128
        for s in range(0, args.images, per):
            write_shard(f"{prefix}/shard-{s // per:06d}.tar",
                        [(f"p{i:06d}", {"jpg": jpegs[i], "cls": b"0"}) for i in range(s, min(args.images, s + per))])
        samples = args.images  # one pass over the data per timed pass
        rows = {}
        for w in [] if args.loader_only else args.workers:
            # threads first, each in a child process of their own: a finished run's threads would steal the GIL
            for name in ("threads", "processes"):
                rows[(name, w)] = run_isolated(name, prefix, w, args.batch, samples, args.passes)
                print(f"read+parse+validate, {w} reader {name:9s}: {statistics.median(rows[(name, w)]):8.0f} "
                      f"samples/s  (passes: {', '.join(f'{r:.0f}' for r in rows[(name, w)])})", flush=True)
        w = max(args.workers)
        if not args.loader_only:
            print(f"{w} processes / {w} threads: {statistics.median(rows[('processes', w)]) / statistics.median(rows[('threads', w)]):.2f}x; "
                  f"{w} processes / 1 thread: {statistics.median(rows[('processes', w)]) / statistics.median(rows[('threads', min(args.workers))]):.2f}x")
        timed = args.loader_batches * args.batch or samples  # train mode: the loader goes on into further epochs
        for w in [] if args.reading_only else args.workers:
            runs: dict[int, list] = {k: [] for k in args.batches_per_iteration}
            for _ in range(args.passes):  # the settings alternate, so a change in the machine's load hits all alike
                for k in args.batches_per_iteration:
                    runs[k].append(time_loader(prefix, w, args.batch, timed, args.dali_threads, args.step_ms / 1e3,
                                               args.img_size, args.shuffle_buffer, k))
            for k, r in runs.items():
                rate, kernel, cpu, proc = (statistics.median(x[i] for x in r) for i in range(4))
                step = f", a {args.step_ms:.0f} ms trainer step per batch" if args.step_ms else ""
                print(f"whole loader, {w} worker processes, {k} batches per DALI iteration, DALI on the CPU "
                      f"({args.dali_threads} thread){step}, {args.img_size} px views, shuffle buffer "
                      f"{args.shuffle_buffer}: {rate:.0f} two-view images/s; the loader thread's CPU {kernel:.2f} ms "
                      f"per batch of {args.batch} (passes {', '.join(f'{x[1]:.2f}' for x in r)}; its input_cpu_s "
                      f"counter {cpu:.2f}); the training process's CPU with DALI's threads {proc:.1f} ms per batch",
                      flush=True)
    finally:
        tmp.cleanup()
        if server is not None:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
