"""Training-step throughput: the model's own speed (synthetic batch already on the device) and with the real loader
(does the data keep up?), for the can and simclr recipes at one preset.

    python -m bench.train --preset vit_small --img-size 224 --batch 8 --steps 6            # CPU here
    python -m bench.train --preset vit_large --batch 64 --steps 30 --loader                # one H100: MFU vs 989e12
    python -m bench.train --preset vit_large --batch 64 --loader --shards s3://BUCKET/shards/

Per recipe and data source it prints images/s per device (median over the timed steps after --warmup), the step
time, MFU (model.flops cost model / the device's peak; null on CPU unless --peak-flops), the share of the step spent
waiting for data, and peak memory; then the SimCLR / CAN step-time ratio (the cost model predicts 1.71 for ViT-L/16).
The step is jobs.step.train_step inside the trainer's DeepSpeed engine, so the figures are the trainer's. --loader
without --shards writes JPEG shards (random 320x256 images) to a temporary directory first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from jobs.config import DeepSpeedConfig, OptimConfig
from jobs.derived import derive
from jobs.engine import build_engine
from jobs.launch import init_distributed
from jobs.metrics import TimedIterator, memory_stats, peak_flops
from jobs.step import train_step
from model.can import build_model
from model.config import ModelConfig
from model.flops import train_flops_per_image
from pipeline.config import AugmentConfig, DataConfig


def synthetic_batches(batch: int, img_size: int, num_patches: int, num_views: int, device: torch.device):
    """The same batch forever, made once on the device: no data cost at all."""
    b = {"keys": [str(i) for i in range(batch)], "labels": torch.zeros(batch, dtype=torch.long, device=device)}
    for v in range(1, num_views + 1):
        b[f"view{v}"] = torch.randn(batch, 3, img_size, img_size, device=device)
        b[f"mask_keys{v}"] = torch.rand(batch, num_patches, device=device)
    while True:
        yield b


def write_synthetic_shards(root: str, images: int, per_shard: int = 64) -> str:
    from PIL import Image

    from pipeline.ingest.writer import write_shard

    rng = np.random.default_rng(0)
    for s in range(0, images, per_shard):
        samples = []
        for i in range(s, min(images, s + per_shard)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            samples.append((f"img{i:07d}", {"jpg": buf.getvalue()}))
        write_shard(os.path.join(root, f"shard-{s // per_shard:06d}.tar"), samples)
    return root + "/"


def loader_batches(shards: str, cfg: ModelConfig, batch: int, num_views: int, device: torch.device):
    from pipeline.loader import build_loader

    data = DataConfig(shards=shards, batch_size=batch, img_size=cfg.img_size, patch_size=cfg.resolved_patch_size,
                      num_views=num_views, augment=AugmentConfig.preset("simclr" if cfg.recipe == "simclr" else "can"),
                      workers=2, dali_threads=2, validate="header")
    return iter(build_loader(data, 0, 1, device))


def bench_one(cfg: ModelConfig, batch: int, steps: int, warmup: int, source: str, shards: str | None, dist,
              peak: float | None) -> dict:
    """Times `steps` optimizer steps (after `warmup`) of one recipe fed by `source` ("synthetic" or "loader")."""
    model = build_model(cfg)
    d = derive(batch, batch, 1, 1e-4, 256, batch * (steps + warmup), 0)
    engine = build_engine(model, OptimConfig(global_batch=batch), DeepSpeedConfig(zero_stage=1), d, dist.device)
    if source == "synthetic":
        it = synthetic_batches(batch, cfg.img_size, model.num_patches, model.num_views, dist.device)
    else:
        it = loader_batches(shards, cfg, batch, model.num_views, dist.device)
    batches = TimedIterator(it)
    times, waits = [], []
    for i in range(warmup + steps):
        wait0, t0 = batches.wait_s, time.perf_counter()
        train_step(engine, batches, 1, 1e-4)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()  # per-step timing needs the device to finish; the trainer never does this
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            waits.append(batches.wait_s - wait0)
    step_s = statistics.median(times)
    flops = train_flops_per_image(cfg)
    ips = batch / step_s
    return {"recipe": cfg.recipe, "preset": cfg.preset, "img_size": cfg.img_size, "batch": batch, "source": source,
            "step_s": round(step_s, 4), "images_per_s_per_device": round(ips, 2),
            "train_gflops_per_image": round(flops / 1e9, 2), "achieved_tflops": round(ips * flops / 1e12, 4),
            "mfu": round(ips * flops / peak, 4) if peak else None,
            "data_wait_share": round(sum(waits) / sum(times), 4), **memory_stats(dist.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="images per step per device")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=["can", "simclr"])
    parser.add_argument("--loader", action="store_true", help="also time with the real loader")
    parser.add_argument("--shards", default=None, help="shard URL for --loader (default: synthetic JPEG shards)")
    parser.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s (default: table)")
    args = parser.parse_args()

    torch.manual_seed(0)
    dist = init_distributed()
    peak = peak_flops(dist.device, args.peak_flops)
    print(f"device: {torch.cuda.get_device_name(dist.device) if dist.device.type == 'cuda' else 'cpu'}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    sources = ["synthetic"] + (["loader"] if args.loader else [])
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if args.loader and shards is None:
            shards = write_synthetic_shards(tmp, images=args.batch * (args.steps + args.warmup + 2) * 2)
        results = []
        for recipe in args.recipes:
            cfg = ModelConfig(preset=args.preset, img_size=args.img_size, recipe=recipe)
            for source in sources:
                results.append(bench_one(cfg, args.batch, args.steps, args.warmup, source, shards, dist, peak))
                print(json.dumps(results[-1]), flush=True)
    by = {(r["recipe"], r["source"]): r for r in results}
    for source in sources:
        if ("can", source) in by and ("simclr", source) in by:
            ratio = by[("simclr", source)]["step_s"] / by[("can", source)]["step_s"]
            predicted = by[("simclr", source)]["train_gflops_per_image"] / by[("can", source)]["train_gflops_per_image"]
            print(f"{source}: SimCLR / CAN step time {ratio:.2f} (FLOPs model predicts {predicted:.2f})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
