"""`make demo`: the whole system on one machine in a few minutes, with the same commands a cluster run uses.

1. An uncurated dump: the photos that scikit-image and scikit-learn ship, cropped, rescaled, rotated and re-encoded
   into about a thousand images with broken files and duplicates mixed in (or DUMP=path/to/images).
2. A real S3 endpoint on loopback (moto's server), reached through the standard AWS environment variables.
3. tools/shard.py cleans, deduplicates and shards the dump into s3://demo/shards/.
4. `deepspeed jobs/pretrain.py` trains CAN with a tiny ViT on two ranks (two CPU processes, or the GPUs when there
   are some), streaming the shards from S3 through the DALI pipeline.
5. It prints the ingest report, the loss falling, and where the checkpoint, metrics, TensorBoard logs and plot are.

    python -m jobs.demo [--dump DIR] [--out demo] [--count 1000] [--steps N]
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

import torch

from pipeline.ingest.report import format_table
from tools import local_s3
from tools.sample_dump import make_sample_dump

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo_cpu.yaml"


def prepare_dump(dump: str | None, out: Path, count: int) -> Path:
    if dump:
        path = Path(dump)
        if not path.exists():
            sys.exit(f"DUMP={dump}: no such file or directory")
        return path
    path = out / "dump"
    marker = path / ".complete"
    if not marker.exists():
        shutil.rmtree(path, ignore_errors=True)
        summary = make_sample_dump(path, count=count)
        marker.write_text(json.dumps(summary.__dict__))
        print(f"[demo] built a sample dump: {summary.files} files ({summary.broken} broken, "
              f"{summary.duplicates} duplicates, {summary.tiny} too small) in {path}")
    else:
        print(f"[demo] reusing the sample dump in {path}")
    return path


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("[demo] $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, cwd=REPO, check=True)


def shard(dump: Path, url: str, env: dict[str, str]) -> dict:
    run([sys.executable, "tools/shard.py", str(dump), "--output", url, "--samples-per-shard", "200",
         "--max-shorter-side", "64", "--quiet"], env)
    import fsspec

    with fsspec.open(f"{url}/report.json", "r") as f:
        return json.load(f)


def train(shards: str, run_dir: Path, steps: int | None, env: dict[str, str]) -> None:
    ranks = torch.cuda.device_count() or 2  # two CPU ranks show the distributed path where there is no GPU
    launcher = str(Path(sys.executable).with_name("deepspeed"))  # the venv's launcher, activated or not
    cmd = [launcher, "--num_gpus", str(ranks), "jobs/pretrain.py", "--config", str(DEMO_CONFIG),
           "--set", f"data.shards={shards}", "--set", f"output_dir={run_dir}"]
    if steps:
        cmd += ["--set", f"debug.max_steps={steps}"]
    run(cmd, env)


def summarise(report: dict, run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    print("\n[demo] ingest report (tools/shard.py):")
    print("\n".join("         " + line for line in format_table(report).splitlines()))
    if rows:
        first, last = rows[0], rows[-1]
        terms = [t for t in ("loss", "contrastive", "reconstruction", "denoise") if t in first]
        print(f"[demo] training, step {first['step']} -> step {last['step']} (mean over each logging window):")
        for term in terms:
            print(f"         {term:<15} {first[term]:8.4f} -> {last[term]:8.4f}")
        print(f"         images/s per rank {last['images_per_s_per_device']:.1f}, "
              f"data-wait share {100 * last['data_wait_share']:.1f}%")
    print(f"[demo] run directory: {run_dir}")
    for name in ("metrics.jsonl", "resolved.yaml", "loss.png", "encoder.safetensors", "tb", "checkpoints"):
        path = run_dir / name
        if path.exists():
            print(f"         {name:<20} {path}")
    print(f"[demo] TensorBoard: tensorboard --logdir {run_dir / 'tb'};  redraw the plot: python -m tools.plot {run_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", default=os.environ.get("DUMP"), help="a folder/archive/parquet of your images")
    parser.add_argument("--out", default="demo", help="where the dump and the run go")
    parser.add_argument("--count", type=int, default=1000, help="images in the generated sample dump")
    parser.add_argument("--steps", type=int, default=None, help="stop after N steps (default: the config's)")
    args = parser.parse_args()

    started = time.monotonic()
    out = (REPO / args.out).resolve()
    dump = prepare_dump(args.dump, out, args.count)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo shows a whole run each time, not a resume
    with local_s3.serve() as s3:
        env = {**os.environ, **s3.env}
        bucket = s3.make_bucket("demo")
        report = shard(dump, f"{bucket}/shards", env)
        train(f"{bucket}/shards", run_dir, args.steps, env)
    summarise(report, run_dir)
    print(f"[demo] done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
