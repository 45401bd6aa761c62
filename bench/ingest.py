"""Ingest throughput: tools/shard.py against the floor of a bare Pillow decode -> resize -> encode loop, and
against img2dataset on the same images served over loopback HTTP.

    python -m bench.ingest                              # from the repo root: 2,000 JPEGs of 1-3 MP, workers 1 and 2
    python -m bench.ingest --workers 2 --repeats 3 --dump DIR
    python -m bench.ingest --web 0                      # without the img2dataset rows
    git worktree add /tmp/before HEAD~3 && python -m bench.ingest --baseline /tmp/before   # before/after, one run

The web rows (--web W processes, default the largest --workers): the dump is served by `python -m http.server` on
127.0.0.1, both tools get the same parquet of url + caption, and make 512 px q95 JPEGs in WebDataset tars with W
processes of 8 download threads (img2dataset: --resize_mode keep_ratio --resize_only_if_bigger, i.e. the same
shorter-side-512 rule). img2dataset 1.47.0 is installed from the registry into a virtual environment of its own
(--img2dataset-venv, made on first use): its pins (opencv, albumentations, pandas, wandb) are not ours.

Prints, for both, measured in the same run on the same files: images/s per core (wall clock; shard.py's rate divided
by --workers) and images per CPU-second (user+sys of the process tree, orphans included: the bench is a child
subreaper and reaps every process a tool leaves behind; what a dedicated core would do, and the steadier figure on a
shared machine), each with its ratio to the floor; and each tool's marginal rate, images per CPU-second once its
start-up is paid (every tool also runs on the first --small images: (count - small) / (CPU(count) - CPU(small))).
The marginal ratio is the one that holds at 300M images; the whole-run ratio at a few thousand images flatters the
tool with the cheaper start-up (img2dataset's is ~7-9 CPU-s, shard.py's ~1.6). Medians over --repeats; each repetition runs the floor and every
worker count back to back (alternating which goes first), so a change in
the load hits both sides.
The floor is one process doing only what a naive converter must: full-resolution decode, resize to shorter
side 512 with the filter shard.py uses (clean.RESAMPLE), JPEG q95 encode.
shard.py does more (header checks, EXIF, two hashes, dedup, a staged copy, tar + index + parquet) and still wins,
because it decodes JPEGs at a reduced DCT scale (libjpeg-turbo through simplejpeg, no pixel copies between
libraries) and so never touches most of the pixels the floor decodes.
--baseline DIR adds a web row for tools/shard.py of another checkout (its own `pipeline` package, through
PYTHONPATH), so a change is measured against the code before it in the same run, under the same load.
The quality line is the PSNR of shard.py's stored images against a full-decode Lanczos reference of the same size.
Load average (1 min) is printed at the start and the end: compare runs only at similar load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.ingest.clean import RESAMPLE, target_size
from tools.local_s3 import free_port, wait_until_up

_REPO = Path(__file__).resolve().parent.parent
_MAX_SHORTER_SIDE = 512
_QUALITY = 95


def _make_one(args: tuple[Path, int]) -> None:
    from skimage import data as skdata

    folder, i = args
    rng = np.random.default_rng(i)
    base = Image.fromarray([skdata.astronaut, skdata.chelsea, skdata.coffee, skdata.rocket][i % 4]())
    megapixels = rng.uniform(1.0, 3.0)
    aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0]) * (1 if rng.random() < 0.7 else -1)
    aspect = abs(aspect) if aspect > 0 else 1 / abs(aspect)  # 30% portrait
    w = int(np.sqrt(megapixels * 1e6 * aspect))
    h = int(megapixels * 1e6 / w)
    img = base.resize((w, h), Image.Resampling.BILINEAR)
    noise = rng.integers(-6, 7, (h, w, 1), dtype=np.int16)  # texture, and makes every file distinct
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(folder / f"img{i:05d}.jpg", quality=90)


def generate(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    missing = [(folder, i) for i in range(count) if not (folder / f"img{i:05d}.jpg").exists()]
    if missing:
        with Pool(os.cpu_count()) as pool:
            pool.map(_make_one, missing, chunksize=16)
    return [folder / f"img{i:05d}.jpg" for i in range(count)]


def floor(files: list[Path]) -> tuple[float, float]:
    """(images/s, images per CPU-second) of one process: full decode -> resize (shard.py's filter) -> encode."""
    start, cpu = time.perf_counter(), time.process_time()
    for path in files:
        img = Image.open(path)
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize(target_size(*img.size, _MAX_SHORTER_SIDE), RESAMPLE)
        img.save(io.BytesIO(), "JPEG", quality=_QUALITY)
    return len(files) / (time.perf_counter() - start), len(files) / (time.process_time() - cpu)


_LONG_LIVED: set[int] = set()  # our own children that outlive a measurement (the HTTP server)


def _become_subreaper() -> bool:
    """Orphans (a fork server, a resource tracker, a daemon a tool leaves behind) are re-parented to us instead of
    init, so their CPU time can be counted: without it a tool that moved work into a process outliving it would
    look cheaper than it is. Linux only (prctl PR_SET_CHILD_SUBREAPER)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_orphans(timeout_s: float = 30.0) -> None:
    """Wait for every child but the long-lived ones to exit, and reap it, so RUSAGE_CHILDREN includes it."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        left = [c for c in psutil.Process().children() if c.pid not in _LONG_LIVED]
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes still running after a measured run: {[c.pid for c in left]}")
        time.sleep(0.05)


def _children_cpu() -> float:
    """CPU seconds of all finished, reaped descendants: the tool's process, the pool workers it reaped, and (we are
    a subreaper) any process of its tree that outlived it."""
    _reap_orphans()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def shard_py(file_list: Path, count: int, out: Path, workers: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) of a whole tools/shard.py run (all phases, start-up and report included)."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), _children_cpu()
    cmd = [sys.executable, "tools/shard.py", str(file_list), "--output", str(out), "--workers", str(workers),
           "--max-shorter-side", str(_MAX_SHORTER_SIDE), "--quality", str(_QUALITY), "--quiet"]
    subprocess.run(cmd, cwd=_REPO, env=_checkout_env(_REPO), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return count / (time.perf_counter() - start), count / (_children_cpu() - cpu)


def _checkout_env(repo: Path) -> dict[str, str]:
    """The environment with `repo` first on PYTHONPATH: the venv's editable install points at one checkout, and a
    worktree of another commit must run its own pipeline package."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}


def stored_psnr(out: Path, samples: int = 24) -> float:
    """Mean PSNR (dB) of stored images against full decode + Lanczos to the same size, over the first shard."""
    scores = []
    with tarfile.open(out / "shard-000000.tar") as tar:
        members = {m.name: m for m in tar}
        for name in [n for n in members if n.endswith(".json")][:samples]:
            meta = json.loads(tar.extractfile(members[name]).read())
            stored = Image.open(io.BytesIO(tar.extractfile(members[name[:-4] + "jpg"]).read())).convert("RGB")
            ref = Image.open(meta["source"].removeprefix("file://")).convert("RGB")
            ref = ref.resize(stored.size, Image.Resampling.LANCZOS)
            err = np.mean((np.asarray(stored, np.float64) - np.asarray(ref, np.float64)) ** 2)
            scores.append(10 * np.log10(255**2 / max(err, 1e-9)))
    return float(np.mean(scores))


_IMG2DATASET = "img2dataset==1.47.0"


@contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """`python -m http.server` (threaded) on a free loopback port, serving `folder`; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _LONG_LIVED.add(proc.pid)  # serves both tools; its CPU is neither's
    try:
        wait_until_up("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def url_parquet(files: list[Path], base_url: str, path: Path) -> Path:
    """What a LAION-style download starts from: one row per image, url and caption."""
    pq.write_table(pa.table({"url": [f"{base_url}/{f.name}" for f in files],
                             "caption": [f"image {f.stem}" for f in files]}), path)
    return path


def img2dataset_bin(venv: Path) -> Path:
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"installing {_IMG2DATASET} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", _IMG2DATASET], check=True)
    return exe


def _timed(cmd: list[str], count: int, **kw) -> tuple[float, float]:
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return count / (time.perf_counter() - start), count / (_children_cpu() - cpu)


def shard_py_web(urls: Path, count: int, out: Path, workers: int, repo: Path = _REPO) -> tuple[float, float]:
    """tools/shard.py of the checkout `repo` (its own pipeline package first on the path) on the URL parquet."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "tools/shard.py", str(urls), "--output", str(out), "--workers", str(workers),
           "--download-threads", "8", "--max-shorter-side", str(_MAX_SHORTER_SIDE), "--quality", str(_QUALITY),
           "--quiet"]
    if repo == _REPO:  # 250 URLs a unit, as before there was --web-unit-size: one 10,000-URL unit would idle a worker
        cmd += ["--web-unit-size", "250"]
    return _timed(cmd, count, cwd=repo, env=_checkout_env(repo))


def img2dataset(exe: Path, urls: Path, count: int, out: Path, workers: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(exe), "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url", "--caption_col",
           "caption", "--output_format", "webdataset", "--output_folder", str(out), "--processes_count", str(workers),
           "--thread_count", "8", "--image_size", str(_MAX_SHORTER_SIDE), "--resize_mode", "keep_ratio",
           "--resize_only_if_bigger", "True", "--encode_quality", str(_QUALITY), "--number_sample_per_shard", "5000",
           "--distributor", "multiprocessing", "--enable_wandb", "False"]
    rates = _timed(cmd, count)
    done = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    if done != count:
        raise RuntimeError(f"img2dataset stored {done} of {count} images")
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", type=Path, default=Path("/tmp/ingest_bench/dump"))
    p.add_argument("--output", type=Path, default=Path("/tmp/ingest_bench/out"))
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="shard.py worker counts to measure")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--web", type=int, default=None, help="processes for the web rows (0: none; default: max workers)")
    p.add_argument("--small", type=int, default=50,
                   help="each tool also runs on the first SMALL images, for its cost per image without start-up")
    p.add_argument("--img2dataset-venv", type=Path, default=Path("/tmp/ingest_bench/img2dataset-venv"))
    p.add_argument("--baseline", type=Path, help="another checkout whose tools/shard.py gets a web row too")
    a = p.parse_args()
    if not 0 < a.small < a.count:
        p.error("--small must be between 0 and --count")
    if not _become_subreaper():
        print("note: not a child subreaper (not Linux?): CPU of processes that outlive a tool is not counted")
    web = max(a.workers) if a.web is None else a.web
    files = generate(a.dump, a.count)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    file_lists = {}  # count -> a text-list SOURCE: exactly these files, in this order
    for n in (a.count, a.small):
        file_lists[n] = a.output.parent / f"files-{n}.txt"
        file_lists[n].write_text("".join(f"{f.resolve()}\n" for f in files[:n]))
    sizes = [Image.open(f).size for f in files]
    mp = np.mean([w * h for w, h in sizes]) / 1e6
    print(f"dump: {len(files)} JPEGs, mean {mp:.2f} MP ({min(w * h for w, h in sizes) / 1e6:.2f}-"
          f"{max(w * h for w, h in sizes) / 1e6:.2f}), filter {RESAMPLE.name}, shorter side {_MAX_SHORTER_SIDE}, "
          f"q{_QUALITY}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    exe = img2dataset_bin(a.img2dataset_venv) if web else None
    # name -> per repeat (wall images/s per core, images/CPU-s, images per marginal CPU-second)
    rows: dict[str, list[tuple[float, float, float]]] = {}

    def measure(name: str, run, processes: int) -> None:
        """A tool's whole-run rates on --count images, and its marginal rate: the extra images over the extra CPU
        of the same tool on --small images, i.e. what each image costs once the start-up (imports, process and
        pool start, the report) is paid. At 300M images only that figure counts: img2dataset's start-up alone is
        worth hundreds of its images."""
        wall, per_cpu = run(a.count)
        small = run(a.small)[1] if processes else None
        marginal = (a.count - a.small) / (a.count / per_cpu - a.small / small) if small else per_cpu
        rows.setdefault(name, []).append((wall / max(processes, 1), per_cpu, marginal))

    with http_server(a.dump) as base_url:
        urls = {n: url_parquet(files[:n], base_url, a.output.parent / f"urls-{n}.parquet") for n in (a.count, a.small)}
        for rep in range(a.repeats):
            # (name, run(count) -> rates, processes; 0 for the floor: one loop, nothing to start, no second run)
            contenders = [("floor (decode->resize->encode, 1 proc)", lambda n: floor(files[:n]), 0)]
            for w in a.workers:
                contenders.append((f"tools/shard.py --workers {w}",
                                   lambda n, w=w: shard_py(file_lists[n], n, a.output / f"w{w}", w), w))
            if web and a.baseline:
                contenders.append((f"baseline tools/shard.py, URLs over HTTP, {web} x 8 threads", lambda n: (
                    shard_py_web(urls[n], n, a.output / "web-baseline", web, a.baseline.resolve())), web))
            if web:
                contenders.append((f"tools/shard.py, URLs over HTTP, {web} x 8 threads",
                                   lambda n: shard_py_web(urls[n], n, a.output / "web", web), web))
                contenders.append((f"img2dataset 1.47, URLs over HTTP, {web} x 8 threads",
                                   lambda n: img2dataset(exe, urls[n], n, a.output / "i2d", web), web))
            # Odd repetitions run in reverse order: a load that drifts within the run then biases no contender.
            for name, run, processes in contenders if rep % 2 == 0 else contenders[::-1]:
                measure(name, run, processes)
            print(f"repeat {rep + 1}: " + ", ".join(f"{n.split(',')[0]} {v[-1][0]:.2f}" for n, v in rows.items())
                  + f" images/s/core (load {os.getloadavg()[0]:.2f})", flush=True)
    med = {n: [statistics.median(r[k] for r in v) for k in (0, 1, 2)] for n, v in rows.items()}
    base = next(iter(med.values()))
    print(f"{'':<56} {'images/s/core':>14} {'ratio':>6}   {'images/CPU-s':>12} {'ratio':>6}   "
          f"{'marginal':>8} {'ratio':>6}")
    for name, (rate, per_cpu, marginal) in med.items():
        print(f"{name:<56} {rate:14.2f} {rate / base[0]:6.2f}x  {per_cpu:12.2f} {per_cpu / base[1]:6.2f}x  "
              f"{marginal:9.2f} {marginal / base[2]:6.2f}x")
    print(f"marginal: images per CPU-second beyond the first {a.small} (start-up excluded; the floor has none)")
    if web:
        ours, theirs = (med[n] for n in list(med)[-2:])
        print(f"tools/shard.py / img2dataset on the same URLs: {ours[0] / theirs[0]:.2f}x (wall), "
              f"{ours[1] / theirs[1]:.2f}x (CPU, {a.count} images), {ours[2] / theirs[2]:.2f}x (CPU per image, "
              f"marginal: what a large run sees)")
    if web and a.baseline:
        before = med[list(med)[-3]]
        print(f"baseline tools/shard.py / img2dataset: {before[1] / theirs[1]:.2f}x (CPU); this checkout / baseline: "
              f"{ours[1] / before[1]:.3f}x (CPU), {ours[2] / before[2]:.3f}x (marginal CPU), "
              f"{ours[0] / before[0]:.3f}x (wall)")
    psnr = stored_psnr(a.output / f"w{a.workers[0]}")
    print(f"quality: stored vs full-decode Lanczos, mean PSNR {psnr:.1f} dB; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
