"""Ingest throughput: tools/shard.py against the floor of a bare Pillow decode -> resize -> encode loop.

    python bench/ingest.py                       # generate 2,000 JPEGs of 1-3 MP under /tmp/ingest_bench, run both
    python bench/ingest.py --dump DIR --workers 2

Prints images/s per core for both, measured in the same run on the same files. The floor is what a naive
converter costs per image (full decode, LANCZOS resize to the same size, JPEG q95 encode); shard.py adds checks,
hashing, dedup and two copies of the output, and wins back more than that with JPEG draft decoding.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

# Run as a script, this folder leads sys.path and bench/pipeline.py would shadow the `pipeline` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from pipeline.ingest.clean import target_size  # noqa: E402

_REPO = Path(__file__).resolve().parent.parent


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
    existing = sorted(folder.glob("*.jpg"))
    if len(existing) < count:
        with Pool(os.cpu_count()) as pool:
            pool.map(_make_one, [(folder, i) for i in range(count)], chunksize=16)
    return sorted(folder.glob("*.jpg"))[:count]


def floor(files: list[Path], max_shorter_side: int, quality: int) -> float:
    """images/s of one process: decode -> resize -> encode, nothing else."""
    start = time.perf_counter()
    for path in files:
        img = Image.open(path).convert("RGB")
        img = img.resize(target_size(*img.size, max_shorter_side), Image.Resampling.LANCZOS)
        img.save(io.BytesIO(), "JPEG", quality=quality)
    return len(files) / (time.perf_counter() - start)


def shard_py(folder: Path, out: Path, workers: int) -> float:
    """images/s of the whole tools/shard.py run (all three phases, manifest and report included)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    cmd = [sys.executable, "tools/shard.py", str(folder), "--output", str(out), "--workers", str(workers), "--quiet"]
    subprocess.run(cmd, cwd=_REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    count = len(list(folder.glob("*.jpg")))
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", type=Path, default=Path("/tmp/ingest_bench/dump"))
    p.add_argument("--output", type=Path, default=Path("/tmp/ingest_bench/out"))
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    a = p.parse_args()
    files = generate(a.dump, a.count)
    mp = np.mean([Image.open(f).size[0] * Image.open(f).size[1] for f in files]) / 1e6
    print(f"dump: {len(files)} JPEGs, mean {mp:.2f} MP, {a.workers} workers for shard.py")
    base = floor(files, 512, 95)
    ours = shard_py(a.dump, a.output, a.workers)
    print(f"{'floor (decode->resize->encode, 1 process)':<46} {base:8.1f} images/s per core")
    print(f"{'tools/shard.py':<46} {ours / a.workers:8.1f} images/s per core ({ours:.1f} total)")
    print(f"{'ratio':<46} {ours / a.workers / base:8.2f}x")


if __name__ == "__main__":
    main()
