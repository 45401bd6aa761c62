"""Ingest throughput: tools/shard.py against the floor of a bare Pillow decode -> resize -> encode loop.

    python -m bench.ingest                              # from the repo root: 2,000 JPEGs of 1-3 MP, workers 1 and 2
    python -m bench.ingest --workers 2 --repeats 3 --dump DIR

Prints, for both, measured in the same run on the same files: images/s per core (wall clock; shard.py's rate
divided by --workers) and images per CPU-second (user+sys of the process tree: what a dedicated core would do,
and the steadier figure on a shared machine), each with its ratio to the floor. Medians over --repeats; each
repetition runs the floor and every worker count back to back (alternating which goes first), so a change in
the load hits both sides.
The floor is one process doing only what a naive converter must: full-resolution decode, resize to shorter
side 512 with the filter shard.py uses (clean.RESAMPLE), JPEG q95 encode.
shard.py does more (header checks, EXIF, two hashes, dedup, a staged copy, tar + index + parquet) and still wins,
because it decodes JPEGs in draft mode (DCT scaling) and so never touches most of the pixels the floor decodes.
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
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.ingest.clean import RESAMPLE, target_size

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


def _children_cpu() -> float:
    """CPU seconds of all finished, reaped descendants: shard.py plus the pool workers it reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def shard_py(file_list: Path, count: int, out: Path, workers: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) of a whole tools/shard.py run (all phases, start-up and report included)."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), _children_cpu()
    cmd = [sys.executable, "tools/shard.py", str(file_list), "--output", str(out), "--workers", str(workers),
           "--max-shorter-side", str(_MAX_SHORTER_SIDE), "--quality", str(_QUALITY), "--quiet"]
    subprocess.run(cmd, cwd=_REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return count / (time.perf_counter() - start), count / (_children_cpu() - cpu)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", type=Path, default=Path("/tmp/ingest_bench/dump"))
    p.add_argument("--output", type=Path, default=Path("/tmp/ingest_bench/out"))
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="shard.py worker counts to measure")
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    files = generate(a.dump, a.count)
    file_list = a.output.parent / f"files-{a.count}.txt"  # a text-list SOURCE: exactly these files, in this order
    file_list.write_text("".join(f"{f.resolve()}\n" for f in files))
    sizes = [Image.open(f).size for f in files]
    mp = np.mean([w * h for w, h in sizes]) / 1e6
    print(f"dump: {len(files)} JPEGs, mean {mp:.2f} MP ({min(w * h for w, h in sizes) / 1e6:.2f}-"
          f"{max(w * h for w, h in sizes) / 1e6:.2f}), filter {RESAMPLE.name}, shorter side {_MAX_SHORTER_SIDE}, "
          f"q{_QUALITY}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    floors, ours = [], {w: [] for w in a.workers}  # (wall images/s per core, images per CPU-second)
    for rep in range(a.repeats):
        # Odd repetitions run shard.py first: a load that drifts within the run then biases neither side.
        if rep % 2 == 0:
            floors.append(floor(files))
        for w in a.workers:
            rate, per_cpu = shard_py(file_list, len(files), a.output / f"w{w}", w)
            ours[w].append((rate / w, per_cpu))
        if rep % 2 == 1:
            floors.append(floor(files))
        line = ", ".join(f"shard.py w{w} {ours[w][-1][0]:.2f}" for w in a.workers)
        print(f"repeat {rep + 1}: floor {floors[-1][0]:.2f}, {line} images/s/core (load {os.getloadavg()[0]:.2f})",
              flush=True)
    base = [statistics.median(f[k] for f in floors) for k in (0, 1)]
    print(f"{'':<40} {'images/s/core':>14} {'ratio':>6}   {'images/CPU-s':>12} {'ratio':>6}")
    print(f"{'floor (decode->resize->encode, 1 proc)':<40} {base[0]:14.2f} {1:6.2f}x  {base[1]:12.2f} {1:6.2f}x")
    for w in a.workers:
        med = [statistics.median(o[k] for o in ours[w]) for k in (0, 1)]
        print(f"{f'tools/shard.py --workers {w}':<40} {med[0]:14.2f} {med[0] / base[0]:6.2f}x  {med[1]:12.2f} "
              f"{med[1] / base[1]:6.2f}x")
    psnr = stored_psnr(a.output / f"w{a.workers[0]}")
    print(f"quality: stored vs full-decode Lanczos, mean PSNR {psnr:.1f} dB; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
